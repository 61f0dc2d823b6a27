"""NextLat on a world-modeling task (Teoh et al., arXiv:2511.05963, the Manhattan taxi experiment):
a GPT trained with next-token prediction and the same GPT trained with NextLat learn turn-by-turn
routes on a street map; each is asked to drive between held-out origin-destination pairs, with
and without random detours forced on it, and the compactness of its hidden states is measured.

Paper (spec nextlat.md section 4): effective latent rank 160.1 (GPT) vs 52.7 (NextLat); valid
trajectories out of distribution 97.0% vs 98.7%. The paper's routes are taxi rides on Manhattan's
street graph, which is not available offline; this stand-in draws a synthetic street grid with
closed blocks and one-way streets (strongly connected) and routes between random intersections
that follow a shortest path except for a random legal turn with probability ``noise`` per step.
``CPU`` is an 8 x 8 grid and a 4-layer model for about 30 minutes of the 2-core development CPU;
``PAPER`` a 16 x 16 grid and a 6-layer model (a GPU job); ``QUICK`` checks the pipeline.

    python -m fastmodels.reproduce.nextlat_world --out runs/nextlat-world [--preset quick|cpu|paper] [--horizon 4 ...]

Tokens: intersections 0..n-1, then the moves N, E, S, W, then EOS (and PAD, never a target). A
sequence is ``origin destination move ... move EOS``; EOS comes exactly when the route reaches the
destination. Both models get the cross-entropy on the moves and EOS only (the origin and
destination are the prompt, as the spec's context masking).

Measures, per model:

* valid trajectories: the model drives from each origin-destination pair by sampling its own moves
  (temperature 1); a trajectory is valid when every move follows a street in its direction and the
  model says EOS on reaching the destination (never earlier, never driving through it), within
  ``max_moves``. On training pairs, on held-out pairs, and on held-out pairs with detours: at each
  step, with probability ``detour``, the model's (legal) move is replaced by another legal one, as
  in Vafa et al.'s detour test of taxi world models;
* effective rank of the hidden states (exp of the entropy of the normalized singular values) at
  the positions of held-out routes (the first ``rank_positions``): lower is more compact;
* a ridge-regression probe of the current intersection from the hidden state (trained on training
  routes, tested on held-out ones): does the latent hold the world state;
* held-out next-token cross-entropy and the share of positions whose most likely token is legal.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmodels.reproduce import register
from fastmodels.reproduce._gpt import TinyGPT, effective_rank, gpt_and_nextlat
from fastmodels.reproduce._lm import cli_main, registry_run, resolve_device, run_environment

_STEP = ((0, 1), (1, 0), (0, -1), (-1, 0))  # (dx, dy) of N, E, S, W


@dataclass(frozen=True)
class WorldConfig:
    width: int = 16  # intersections per row
    height: int = 16
    closed: float = 0.15  # share of street segments removed
    one_way: float = 0.25  # share of the remaining segments made one-way
    noise: float = 0.3  # probability of a random legal turn instead of a shortest-path one
    max_moves: int = 80  # longer routes are redrawn; generation stops here
    heldout: float = 0.2  # share of origin-destination pairs never seen in training
    n_train: int = 200_000
    n_test: int = 2000  # held-out routes (cross-entropy, legal next token, rank, probe)
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    steps: int = 20_000
    batch_size: int = 128
    lr: float = 6e-4
    warmup: int = 500
    horizon: int = 4  # NextLat's d
    mlp_hidden: int = 0  # width of NextLat's transition MLP (0: 4 * d_model)
    lambda_h: float = 1.0
    lambda_kl: float = 1.0
    n_eval_pairs: int = 1000  # origin-destination pairs driven per test set
    detour: float = 0.1
    temperature: float = 1.0  # 0: greedy
    rank_positions: int = 8192  # hidden states in the effective-rank matrix
    n_probe_train: int = 4000  # training routes the probe is fitted on
    probe_ridge: float = 1e-3
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)
    device: str = "auto"  # "auto": CUDA when visible, else the CPU


PAPER = WorldConfig()
CPU = dataclasses.replace(PAPER, width=8, height=8, max_moves=40, n_train=40_000, n_test=1000, d_model=128, n_layers=4,
                          n_heads=4, steps=6000, batch_size=64, lr=1e-3, warmup=200, mlp_hidden=256, n_eval_pairs=500,
                          rank_positions=4096, n_probe_train=2000)
QUICK = dataclasses.replace(CPU, width=4, height=4, max_moves=16, n_train=2000, n_test=200, d_model=32, n_layers=2,
                            n_heads=2, steps=400, batch_size=32, lr=3e-3, warmup=20, horizon=2, n_eval_pairs=64,
                            rank_positions=1024, n_probe_train=200)
PRESETS = {"quick": QUICK, "cpu": CPU, "paper": PAPER}


# -- the street map ------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreetGrid:
    """A width x height grid of intersections (id y * width + x) whose streets may be closed or
    one-way; ``moves[u][k]`` is where direction k (N, E, S, W) leads from u, or -1."""

    width: int
    height: int
    moves: tuple[tuple[int, ...], ...]

    @property
    def n(self) -> int:
        return self.width * self.height

    def legal(self, u: int) -> list[int]:
        return [k for k in range(4) if self.moves[u][k] >= 0]

    def distances_to(self, d: int) -> list[int]:
        """Moves needed to reach ``d`` from every intersection (BFS on the reversed streets)."""
        return _bfs(_reversed(self.moves), d)


def _bfs(neighbours, start: int) -> list[int]:
    """Hops from ``start`` to every node along ``neighbours[u]`` (entries -1 skipped), -1 where
    unreachable."""
    dist, queue = [-1] * len(neighbours), deque([start])
    dist[start] = 0
    while queue:
        u = queue.popleft()
        for v in neighbours[u]:
            if v >= 0 and dist[v] < 0:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def _reversed(moves) -> list[list[int]]:
    into = [[] for _ in moves]
    for u, out in enumerate(moves):
        for v in out:
            if v >= 0:
                into[v].append(u)
    return into


def _strongly_connected(moves) -> bool:
    """Every intersection reaches 0 and 0 reaches every intersection."""
    return min(_bfs(moves, 0)) >= 0 and min(_bfs(_reversed(moves), 0)) >= 0


def make_street_grid(width: int, height: int, closed: float, one_way: float, rng: random.Random) -> StreetGrid:
    """A full grid of two-way streets, then (in random order) ``closed`` of the segments removed
    and ``one_way`` of the rest made one-way in a random direction, each change kept only if every
    intersection can still reach every other."""
    if width < 2 or height < 2:
        raise ValueError(f"width, height: expected at least 2 x 2 intersections, got {width} x {height}")
    for name, v in (("closed", closed), ("one_way", one_way)):
        if not 0 <= v < 1:
            raise ValueError(f"{name}: expected a share in [0, 1), got {v}")
    moves = [[-1] * 4 for _ in range(width * height)]
    segments = []
    for y in range(height):
        for x in range(width):
            for k, (dx, dy) in enumerate(_STEP):
                if 0 <= x + dx < width and 0 <= y + dy < height:
                    moves[y * width + x][k] = (y + dy) * width + x + dx
                    if k in (0, 1):  # each segment once
                        segments.append((y * width + x, k))
    rng.shuffle(segments)
    n_closed, n_one_way = round(closed * len(segments)), round(one_way * len(segments) * (1 - closed))
    for u, k in segments:
        v, back = moves[u][k], (k + 2) % 4
        if n_closed > 0:
            moves[u][k] = moves[v][back] = -1
            if _strongly_connected(moves):
                n_closed -= 1
                continue
            moves[u][k], moves[v][back] = v, u
        elif n_one_way > 0:
            a, b, side = (u, v, k) if rng.random() < 0.5 else (v, u, back)
            moves[a][side] = -1
            if _strongly_connected(moves):
                n_one_way -= 1
                continue
            moves[a][side] = b
    return StreetGrid(width, height, tuple(map(tuple, moves)))


# -- routes and tokens ---------------------------------------------------------------------------

class Routes:
    """Route sampling and the token layout of one street grid."""

    def __init__(self, grid: StreetGrid, noise: float, max_moves: int):
        self.grid, self.noise, self.max_moves = grid, noise, max_moves
        self.dist = [grid.distances_to(d) for d in range(grid.n)]  # dist[d][u]
        n = grid.n
        self.move0, self.eos, self.pad, self.vocab_size = n, n + 4, n + 5, n + 6

    def sample(self, o: int, d: int, rng: random.Random) -> list[int]:
        """Directions (0..3) of one route from o to d (redrawn while longer than max_moves)."""
        if o == d:
            raise ValueError(f"o, d: expected two different intersections, got {o} twice")
        if self.dist[d][o] > self.max_moves:
            raise ValueError(f"max_moves: {self.max_moves} is shorter than the shortest route from {o} to {d} ({self.dist[d][o]})")
        g, dist = self.grid, self.dist[d]
        while True:
            cur, route = o, []
            while cur != d and len(route) < self.max_moves:
                legal = g.legal(cur)
                if rng.random() >= self.noise:
                    legal = [k for k in legal if dist[g.moves[cur][k]] == dist[cur] - 1]
                k = rng.choice(legal)
                route.append(k)
                cur = g.moves[cur][k]
            if cur == d:
                return route

    def encode(self, o: int, d: int, route: list[int]) -> list[int]:
        return [o, d] + [self.move0 + k for k in route] + [self.eos]

    def nodes(self, o: int, route: list[int]) -> list[int]:
        """Where the car is after each token of the encoded route: the origin at the prompt's two
        positions, then where each move leads, and the destination again at EOS."""
        out = [o, o]
        for k in route:
            out.append(self.grid.moves[out[-1]][k])
        return out + out[-1:]

    def collate(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded tokens [B, T] (PAD) and the attention mask (True on real tokens)."""
        T = max(map(len, seqs))
        tokens = torch.full((len(seqs), T), self.pad, dtype=torch.int64)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.tensor(s)
        return tokens, tokens != self.pad


def split_pairs(n: int, heldout: float, rng: random.Random) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Origin-destination pairs (o != d), shuffled and split into training and held-out ones."""
    pairs = [(o, d) for o in range(n) for d in range(n) if o != d]
    rng.shuffle(pairs)
    k = max(1, round(heldout * len(pairs)))
    return pairs[k:], pairs[:k]


def draw_routes(routes: Routes, pairs: list[tuple[int, int]], count: int, rng: random.Random) -> list[tuple[int, int, list[int]]]:
    return [(o, d, routes.sample(o, d, rng)) for o, d in (rng.choice(pairs) for _ in range(count))]


# -- training -----------------------------------------------------------------------------------

def target_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """True at positions 2.. of real tokens: the moves and EOS are targets, the prompt is not."""
    mask = attention_mask.clone()
    mask[:, :2] = False
    return mask


# -- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def drive(model: TinyGPT, routes: Routes, pairs: list[tuple[int, int]], *, detour: float, temperature: float,
          gen: torch.Generator, rng: random.Random) -> dict:
    """Lets the model drive every (origin, destination) of ``pairs`` (see the module docstring).
    Returns the share and count of valid trajectories, the count of each failure and of the
    detours forced."""
    g, device = routes.grid, next(model.parameters()).device
    B = len(pairs)
    tokens = torch.tensor(pairs, dtype=torch.int64, device=device)
    cur = [o for o, _ in pairs]
    status = [None] * B  # None while driving, then "valid" or the failure
    detours = 0
    for _ in range(routes.max_moves + 1):
        alive = [i for i in range(B) if status[i] is None]
        if not alive:
            break
        logits = model.lm_head(model(tokens[alive]))[:, -1].float()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen).squeeze(1).tolist()
        else:
            nxt = logits.argmax(-1).tolist()
        step = torch.full((B,), routes.pad, dtype=torch.int64)
        for i, tok in zip(alive, nxt):
            d = pairs[i][1]
            if tok == routes.eos:
                status[i] = "valid" if cur[i] == d else "stopped_early"
                continue
            k = tok - routes.move0
            if not 0 <= k < 4:
                status[i] = "not_a_move"
                continue
            if cur[i] == d:
                status[i] = "drove_through_destination"
                continue
            legal = g.legal(cur[i])
            if k not in legal:
                status[i] = "illegal_move"
                continue
            others = [j for j in legal if j != k]
            if detour > 0 and others and rng.random() < detour:
                k = rng.choice(others)
                detours += 1
            cur[i] = g.moves[cur[i]][k]
            step[i] = routes.move0 + k
        tokens = torch.cat([tokens, step.to(device)[:, None]], dim=1)
    status = ["too_long" if s is None else s for s in status]
    failures = {s: status.count(s) for s in sorted(set(status)) if s != "valid"}
    valid = status.count("valid")
    return {"valid": round(valid / B, 4), "valid_count": valid, "pairs": B, "failures": failures, "detours": detours}


@torch.no_grad()
def hidden_states(model: TinyGPT, routes: Routes, rows: list[tuple[int, int, list[int]]], batch_size: int = 256):
    """Per route: (hidden states [len, D], tokens [len], intersections [len]) of its real positions."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        tokens, am = routes.collate([routes.encode(o, d, r) for o, d, r in chunk])
        hidden = model(tokens.to(device)).double().cpu()
        for j, (o, d, r) in enumerate(chunk):
            n = int(am[j].sum())
            out.append((hidden[j, :n], tokens[j, :n], torch.tensor(routes.nodes(o, r))))
    return out


def teacher_forced(model: TinyGPT, routes: Routes, states) -> dict:
    """Held-out cross-entropy of the moves and EOS, and the share of positions 1.. (before EOS)
    whose most likely next token is legal (a move along a street, or EOS exactly at the
    destination)."""
    W = model.lm_head.weight.detach().double().cpu()
    nll, n_tok, legal, n_pos = 0.0, 0, 0, 0
    for hidden, tokens, nodes in states:
        logp = torch.log_softmax(hidden[1:-1] @ W.T, -1)  # positions 1 .. len-2 predict tokens 2 .. len-1
        nll -= float(logp.gather(1, tokens[2:, None]).sum())
        n_tok += len(tokens) - 2
        d = int(tokens[1])
        for t, best in enumerate(logp.argmax(-1).tolist(), start=1):
            u = int(nodes[t])
            ok = best == routes.eos if u == d else 0 <= best - routes.move0 < 4 and routes.grid.moves[u][best - routes.move0] >= 0
            legal += ok
            n_pos += 1
    return {"cross_entropy": round(nll / n_tok, 4), "legal_next_token": round(legal / n_pos, 4)}


def probe_accuracy(train_states, test_states, n_nodes: int, ridge: float) -> float:
    """Fits a ridge-regression probe (one-hot intersection ~ [h, 1]) on positions 1.. of the
    training routes and returns its accuracy on the held-out ones."""
    def design(states):
        X = torch.cat([h[1:] for h, _, _ in states])
        y = torch.cat([nodes[1:] for _, _, nodes in states])
        return torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1), y

    X, y = design(train_states)
    Y = torch.nn.functional.one_hot(y, n_nodes).double()
    A = X.T @ X + ridge * len(X) * torch.eye(X.shape[1], dtype=X.dtype)
    Wp = torch.linalg.solve(A, X.T @ Y)
    Xt, yt = design(test_states)
    return round(float(((Xt @ Wp).argmax(-1) == yt).double().mean()), 4)


def evaluate(model: TinyGPT, routes: Routes, train_pairs, test_pairs, probe_rows, test_rows, cfg: WorldConfig,
             seed: int) -> dict:
    gen = torch.Generator(model.lm_head.weight.device).manual_seed(seed)  # sampling the moves
    rng = random.Random(seed)  # the detours
    pick = random.Random(seed + 1)
    train_eval = pick.sample(train_pairs, min(cfg.n_eval_pairs, len(train_pairs)))
    test_eval = pick.sample(test_pairs, min(cfg.n_eval_pairs, len(test_pairs)))
    valid = {
        "training_pairs": drive(model, routes, train_eval, detour=0.0, temperature=cfg.temperature, gen=gen, rng=rng),
        "heldout_pairs": drive(model, routes, test_eval, detour=0.0, temperature=cfg.temperature, gen=gen, rng=rng),
        "heldout_pairs_detours": drive(model, routes, test_eval, detour=cfg.detour, temperature=cfg.temperature, gen=gen, rng=rng),
    }
    test_states = hidden_states(model, routes, test_rows)
    mat = torch.cat([h[1:] for h, _, _ in test_states])[: cfg.rank_positions]
    return {"valid_trajectories": valid, **teacher_forced(model, routes, test_states),
            "effective_rank": round(effective_rank(mat), 2), "rank_matrix": list(mat.shape),
            "probe_accuracy": probe_accuracy(hidden_states(model, routes, probe_rows), test_states, routes.grid.n, cfg.probe_ridge)}


def run_config(cfg: WorldConfig, out_dir: Path, *, log=print) -> dict:
    """Trains the GPT and the NextLat model on the same routes from the same initialization,
    evaluates both, writes ``summary.json`` and both state dicts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    rng = random.Random(cfg.seed)
    grid = make_street_grid(cfg.width, cfg.height, cfg.closed, cfg.one_way, rng)
    routes = Routes(grid, cfg.noise, cfg.max_moves)
    train_pairs, test_pairs = split_pairs(grid.n, cfg.heldout, rng)
    train_rows = draw_routes(routes, train_pairs, cfg.n_train, rng)
    test_rows = draw_routes(routes, test_pairs, cfg.n_test, rng)
    tokens, am = routes.collate([routes.encode(o, d, r) for o, d, r in train_rows])
    lengths = am.sum(1)
    targets = target_mask(am)
    segments = sum(v >= 0 for m in grid.moves for v in m)
    two_way = sum(grid.moves[v][(k + 2) % 4] == u for u, m in enumerate(grid.moves) for k, v in enumerate(m) if v >= 0)
    summary = {"config": dataclasses.asdict(cfg), "environment": run_environment(device),
               "data": {"intersections": grid.n, "directed_streets": segments, "one_way_streets": segments - two_way,
                        "two_way_streets": two_way // 2, "pairs_train": len(train_pairs), "pairs_heldout": len(test_pairs),
                        "train_routes": len(train_rows), "mean_moves": round(float(lengths.double().mean()) - 3, 2),
                        "mean_shortest": round(sum(routes.dist[d][o] for o, d, _ in train_rows) / len(train_rows), 2)},
               "models": {}}
    for name, model, res in gpt_and_nextlat(cfg, routes.vocab_size, cfg.max_moves + 3, tokens, targets, am, device, log):
        res.update(evaluate(model, routes, train_pairs, test_pairs, train_rows[: cfg.n_probe_train], test_rows, cfg,
                            cfg.seed + 1))
        summary["models"][name] = res
        torch.save(model.state_dict(), out_dir / f"{name}.pt")
        log({"model": name, **{k: res[k] for k in ("cross_entropy", "legal_next_token", "effective_rank", "probe_accuracy")},
             "valid": {k: v["valid"] for k, v in res["valid_trajectories"].items()}})
    m = summary["models"]
    summary["headline"] = {
        "effective_rank": {k: m[k]["effective_rank"] for k in m},
        "valid_heldout": {k: m[k]["valid_trajectories"]["heldout_pairs"]["valid"] for k in m},
        "valid_heldout_detours": {k: m[k]["valid_trajectories"]["heldout_pairs_detours"]["valid"] for k in m},
        "probe_accuracy": {k: m[k]["probe_accuracy"] for k in m},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


run = registry_run(run_config, PRESETS)
register("nextlat-world-model", "NextLat (arXiv:2511.05963), world modeling",
         "GPT vs NextLat on turn-by-turn routes of a street grid: valid trajectories (held-out pairs, detours), effective latent rank")(run)


def main(argv: list[str] | None = None) -> int:
    return cli_main(run_config, PRESETS, argv, "nextlat_world", __doc__, "runs/nextlat-world")


if __name__ == "__main__":
    sys.exit(main())

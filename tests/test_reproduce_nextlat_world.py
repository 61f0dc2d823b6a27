"""The NextLat world-model reproduction: street grids, routes, the driving test (against oracle
drivers whose answers are known), the measures, the small GPT, and a quick run."""

import itertools
import json
import random

import pytest
import torch
from torch import nn

from fastmodels.reproduce import nextlat_world as nw
from fastmodels.reproduce import reproductions
from fastmodels.reproduce._gpt import TinyGPT, effective_rank, next_token_ce


def grid_and_routes(seed=0, w=5, h=4, closed=0.2, one_way=0.3, noise=0.3, max_moves=30):
    grid = nw.make_street_grid(w, h, closed, one_way, random.Random(seed))
    return grid, nw.Routes(grid, noise, max_moves)


@pytest.mark.parametrize("seed", range(4))
def test_street_grid_is_a_strongly_connected_grid_with_the_asked_closures(seed):
    w, h = 6, 5
    grid = nw.make_street_grid(w, h, 0.2, 0.3, random.Random(seed))
    segments = (w - 1) * h + w * (h - 1)
    closed = one_way = 0
    for y, x in itertools.product(range(h), range(w)):
        u = y * w + x
        for k, (dx, dy) in enumerate(nw._STEP):
            inside = 0 <= x + dx < w and 0 <= y + dy < h
            v = (y + dy) * w + x + dx
            assert grid.moves[u][k] in ((v, -1) if inside else (-1,))  # a street leads to the neighbour in its direction
            if inside and k in (0, 1):  # each segment once
                there, back = grid.moves[u][k] >= 0, grid.moves[v][(k + 2) % 4] >= 0
                closed += not there and not back
                one_way += there != back
    assert closed == round(0.2 * segments)
    assert one_way == round(0.3 * segments * 0.8)
    for d in range(grid.n):  # everyone reaches everyone
        assert min(grid.distances_to(d)) >= 0


def test_distances_are_shortest_paths():
    grid, _ = grid_and_routes(seed=1)
    n, inf = grid.n, float("inf")
    dist = [[0 if u == v else inf for v in range(n)] for u in range(n)]
    for u in range(n):
        for v in grid.moves[u]:
            if v >= 0:
                dist[u][v] = 1
    for k, u, v in itertools.product(range(n), repeat=3):  # Floyd-Warshall
        dist[u][v] = min(dist[u][v], dist[u][k] + dist[k][v])
    for d in range(n):
        assert grid.distances_to(d) == [dist[u][d] for u in range(n)]


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_routes_follow_streets_and_end_at_the_destination(noise):
    grid, routes = grid_and_routes(noise=noise)
    rng = random.Random(0)
    longer = 0
    for _ in range(300):
        o, d = rng.sample(range(grid.n), 2)
        r = routes.sample(o, d, rng)
        nodes = routes.nodes(o, r)
        tokens = routes.encode(o, d, r)
        assert len(nodes) == len(tokens) == len(r) + 3 and tokens[-1] == routes.eos
        assert nodes[:2] == [o, o] and nodes[-1] == nodes[-2] == d and d not in nodes[:-2]
        for u, k, v in zip(nodes[1:], r, nodes[2:]):
            assert grid.moves[u][k] == v >= 0
        assert len(r) <= routes.max_moves
        if noise == 0:
            assert len(r) == routes.dist[d][o]
        longer += len(r) > routes.dist[d][o]
    assert (longer > 50) == (noise > 0)


def test_route_and_grid_errors():
    grid, routes = grid_and_routes()
    with pytest.raises(ValueError, match="two different"):
        routes.sample(3, 3, random.Random(0))
    far = max(range(grid.n), key=lambda u: routes.dist[0][u])
    with pytest.raises(ValueError, match="max_moves"):
        nw.Routes(grid, 0.3, routes.dist[0][far] - 1).sample(far, 0, random.Random(0))
    with pytest.raises(ValueError, match="width, height"):
        nw.make_street_grid(1, 5, 0.1, 0.1, random.Random(0))
    with pytest.raises(ValueError, match="closed"):
        nw.make_street_grid(4, 4, 1.0, 0.1, random.Random(0))


def test_pairs_split_is_a_partition():
    train, held = nw.split_pairs(7, 0.25, random.Random(0))
    assert len(set(train) | set(held)) == 42 and not set(train) & set(held) and len(held) == round(0.25 * 42)
    assert all(o != d for o, d in train + held)


class Oracle(nn.Module):
    """A driver that knows the map: the logits (through an identity LM head) put all mass on
    ``policy(node, destination)`` at every position after the prompt."""

    def __init__(self, routes, policy):
        super().__init__()
        V = routes.vocab_size
        self.routes, self.policy = routes, policy
        self.lm_head = nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(V))

    def forward(self, tokens):
        r, V = self.routes, self.routes.vocab_size
        out = torch.zeros(*tokens.shape, V)
        for b, row in enumerate(tokens.tolist()):
            d, cur = row[1], row[0]
            for t in range(1, len(row)):
                k = row[t] - r.move0
                if t >= 2 and 0 <= k < 4:
                    cur = r.grid.moves[cur][k] if cur >= 0 else -1
                out[b, t, self.policy(cur, d)] = 30.0
        return out


def shortest(routes):
    def policy(u, d):
        if u == d:
            return routes.eos
        dist = routes.dist[d]
        return routes.move0 + next(k for k in routes.grid.legal(u) if dist[routes.grid.moves[u][k]] == dist[u] - 1)
    return policy


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_drive_scores_an_oracle_valid_even_with_detours(temperature):
    grid, routes = grid_and_routes(max_moves=200)  # room for the detours
    pairs = random.Random(0).sample([(o, d) for o in range(grid.n) for d in range(grid.n) if o != d], 40)
    model = Oracle(routes, shortest(routes))
    for detour in (0.0, 0.3):
        res = nw.drive(model, routes, pairs, detour=detour, temperature=temperature, gen=torch.Generator().manual_seed(0),
                       rng=random.Random(1))
        assert res["valid"] == 1.0 and res["failures"] == {} and res["pairs"] == 40
        assert (res["detours"] > 0) == (detour > 0)


def test_drive_names_each_failure():
    grid, routes = grid_and_routes(seed=2)
    pairs = [(o, d) for o in range(grid.n) for d in range(grid.n) if o != d]
    kw = dict(detour=0.0, temperature=0.0, gen=torch.Generator().manual_seed(0), rng=random.Random(0))
    assert nw.drive(Oracle(routes, lambda u, d: routes.eos), routes, pairs, **kw)["failures"] == {"stopped_early": len(pairs)}
    assert nw.drive(Oracle(routes, lambda u, d: 0), routes, pairs, **kw)["failures"] == {"not_a_move": len(pairs)}
    # always north: illegal where there is no street north, otherwise north until it stops being legal
    res = nw.drive(Oracle(routes, lambda u, d: routes.move0), routes, pairs, **kw)
    expect = {"illegal_move": 0, "drove_through_destination": 0}
    for o, d in pairs:
        u = o
        while u != d and grid.moves[u][0] >= 0:
            u = grid.moves[u][0]
        expect["drove_through_destination" if u == d else "illegal_move"] += 1
    assert res["failures"] == {k: v for k, v in expect.items() if v} and res["valid"] == 0.0

    # always the first legal move, never EOS: drives until max_moves (or through the destination)
    short = nw.Routes(grid, 0.3, 3)
    res = nw.drive(Oracle(short, lambda u, d: short.move0 + grid.legal(u)[0]), short, pairs, **kw)
    assert set(res["failures"]) <= {"too_long", "drove_through_destination"} and res["failures"].get("too_long", 0) > 0


def test_teacher_forced_legality_of_the_oracle_and_a_wrong_driver():
    grid, routes = grid_and_routes()
    rng = random.Random(0)
    rows = nw.draw_routes(routes, nw.split_pairs(grid.n, 0.2, rng)[0], 50, rng)
    states = nw.hidden_states(Oracle(routes, shortest(routes)), routes, rows, batch_size=16)
    assert [len(h) for h, _, _ in states] == [len(r) + 3 for _, _, r in rows]
    res = nw.teacher_forced(Oracle(routes, shortest(routes)), routes, states)
    assert res["legal_next_token"] == 1.0
    # cross-entropy: each target the oracle does not predict costs 30 (+ log normaliser)
    eos_states = nw.hidden_states(Oracle(routes, lambda u, d: routes.eos), routes, rows)
    bad = nw.teacher_forced(Oracle(routes, lambda u, d: routes.eos), routes, eos_states)
    moves = sum(len(r) for _, _, r in rows)
    assert bad["legal_next_token"] == pytest.approx(len(rows) / (moves + len(rows)), abs=1e-4)
    assert bad["cross_entropy"] == pytest.approx(30 * moves / (moves + len(rows)), rel=1e-3)


def test_effective_rank():
    torch.manual_seed(0)
    u = torch.randn(50, 1)
    assert effective_rank(u @ torch.randn(1, 8)) == pytest.approx(1.0, abs=1e-6)
    q, _ = torch.linalg.qr(torch.randn(40, 6, dtype=torch.float64))
    assert effective_rank(3 * q) == pytest.approx(6.0, rel=1e-9)
    x = torch.randn(30, 10, dtype=torch.float64)
    s = torch.linalg.svdvals(x).numpy()
    p = s / s.sum()
    assert effective_rank(x) == pytest.approx(float(torch.tensor(-(p * torch.tensor(p).log().numpy()).sum()).exp()), rel=1e-12)
    with pytest.raises(ValueError, match="states"):
        effective_rank(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="states"):
        effective_rank(torch.zeros(0, 3))


def test_probe_reads_the_intersection_when_the_state_holds_it():
    grid, routes = grid_and_routes()
    rng = random.Random(0)
    rows = nw.draw_routes(routes, nw.split_pairs(grid.n, 0.2, rng)[0], 80, rng)
    g = torch.Generator().manual_seed(0)

    def states(rows, informative):
        out = []
        for o, d, r in rows:
            nodes = torch.tensor(routes.nodes(o, r))
            h = torch.randn(len(nodes), 24, generator=g, dtype=torch.float64)
            if informative:
                h[:, : grid.n] += 8 * torch.nn.functional.one_hot(nodes, grid.n)
            out.append((h, None, nodes))
        return out

    assert nw.probe_accuracy(states(rows[:60], True), states(rows[60:], True), grid.n, 1e-3) > 0.95
    assert nw.probe_accuracy(states(rows[:60], False), states(rows[60:], False), grid.n, 1e-3) < 0.3


def test_tiny_gpt_right_padding_and_length_checks():
    torch.manual_seed(0)
    model = TinyGPT(11, d_model=16, n_layers=2, n_heads=2, max_len=9).eval()
    tokens = torch.randint(0, 10, (3, 6))
    padded = torch.cat([tokens, torch.full((3, 3), 10)], 1)
    torch.testing.assert_close(model(padded)[:, :6], model(tokens), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="d_model"):
        TinyGPT(11, d_model=15, n_heads=2)


def test_gpt_loss_is_the_masked_next_token_cross_entropy():
    grid, routes = grid_and_routes()
    rng = random.Random(0)
    rows = nw.draw_routes(routes, nw.split_pairs(grid.n, 0.2, rng)[0], 6, rng)
    tokens, am = routes.collate([routes.encode(o, d, r) for o, d, r in rows])
    torch.manual_seed(0)
    model = TinyGPT(routes.vocab_size, 16, 1, 2, max_len=40).double()
    ce = next_token_ce(model, tokens, nw.target_mask(am))
    logits = model.lm_head(model(tokens))[:, :-1]
    keep = am[:, 1:].clone()
    keep[:, 0] = False  # the destination (prompt) is no target
    want = torch.nn.functional.cross_entropy(logits[keep], tokens[:, 1:][keep])
    torch.testing.assert_close(ce, want, rtol=1e-12, atol=1e-12)
    assert int(keep.sum()) == sum(len(r) + 1 for _, _, r in rows)


def test_quick_run_writes_both_models(tmp_path):
    assert "nextlat-world-model" in reproductions()
    summary = nw.run_config(nw.QUICK, tmp_path, log=lambda row: None)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["headline"] == summary["headline"]
    for name in ("gpt", "nextlat"):
        m = summary["models"][name]
        assert m["final"]["ce"] < m["history"][0]["ce"]  # it learned
        assert 1 <= m["effective_rank"] <= nw.QUICK.d_model and 0 <= m["probe_accuracy"] <= 1
        for res in m["valid_trajectories"].values():
            assert res["valid"] == round(res["valid_count"] / res["pairs"], 4)
            assert res["valid_count"] + sum(res["failures"].values()) == res["pairs"]
        v = m["valid_trajectories"]
        assert v["training_pairs"]["pairs"] == nw.QUICK.n_eval_pairs  # 192 training pairs to draw from
        assert v["heldout_pairs"]["pairs"] == v["heldout_pairs_detours"]["pairs"] == summary["data"]["pairs_heldout"] == 48
        assert (tmp_path / f"{name}.pt").exists()
    assert set(summary["models"]["nextlat"]["final"]) >= {"latent", "kl"}
    assert summary["models"]["gpt"]["history"][0]["ce"] == summary["models"]["nextlat"]["history"][0]["ce"]  # same init

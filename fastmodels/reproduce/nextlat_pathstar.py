"""NextLat on path-star graphs (Teoh et al., arXiv:2511.05963, planning; the task of Bachmann and
Nagarajan, "The pitfalls of next-token prediction", 2024): a GPT trained with next-token prediction
and the same GPT trained with NextLat read a star graph's shuffled edge list, its center and one
leaf, and must write the path from the center to that leaf.

Teacher forcing makes every step after the first easy (follow the edge out of the node just
written: the "Clever Hans" cheat), so next-token training learns those and leaves the first step,
which needs planning back from the leaf, at chance (1 / degree). Paper (spec nextlat.md section
4): G(7, 7) accuracy at most 13% for GPT, about 94% for NextLat. ``PAPER`` is G(7, 7) with a
6-layer model (a GPU job); ``CPU`` G(2, 3) and a 4-layer model for about 16 minutes of the 2-core
development CPU; ``QUICK`` checks the pipeline.

    python -m fastmodels.reproduce.nextlat_pathstar --out runs/nextlat-pathstar [--preset quick|cpu|paper] [--degree 3 ...]

A graph has a center and ``degree`` arms of ``arm_length`` nodes, labelled with distinct random
labels out of ``labels``; edges point away from the center. Tokens: labels, then ``|`` (after
each edge), ``/`` (the query), ``=`` (the answer follows) and EOS. A sequence is
``u v | u v | ... / center leaf = center n1 ... leaf EOS``; the answer (from the center after
``=`` through EOS) is the training target, the rest the prompt. Measures: the share of test
graphs whose greedy answer is exactly right; of those whose greedy first step (the arm) is right;
and, teacher-forced, of those whose every later step is right (what the cheat learns).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmodels.reproduce import register
from fastmodels.reproduce._gpt import TinyGPT, gpt_and_nextlat
from fastmodels.reproduce._lm import cli_main, registry_run, resolve_device, run_environment


@dataclass(frozen=True)
class PathStarConfig:
    degree: int = 7  # arms
    arm_length: int = 7  # nodes per arm (the answer has arm_length + 1 nodes)
    labels: int = 100  # node label vocabulary (>= 1 + degree * arm_length)
    n_train: int = 400_000
    n_test: int = 2000
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    steps: int = 30_000
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 500
    horizon: int = 4  # NextLat's d
    mlp_hidden: int = 0  # width of NextLat's transition MLP (0: 4 * d_model)
    lambda_h: float = 1.0
    lambda_kl: float = 1.0
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)
    device: str = "auto"  # "auto": CUDA when visible, else the CPU


PAPER = PathStarConfig()
CPU = dataclasses.replace(PAPER, degree=2, arm_length=3, labels=16, n_train=50_000, n_test=1000, d_model=128, n_layers=4,
                          n_heads=4, steps=4000, batch_size=64, lr=1e-3, warmup=100, mlp_hidden=256)
QUICK = dataclasses.replace(CPU, degree=2, arm_length=3, labels=12, n_train=3000, n_test=200, d_model=32, n_layers=2,
                           n_heads=2, steps=300, batch_size=32, lr=3e-3, warmup=20, horizon=2, mlp_hidden=0)
PRESETS = {"quick": QUICK, "cpu": CPU, "paper": PAPER}


class PathStar:
    """The token layout of G(degree, arm_length) graphs and their sampler."""

    def __init__(self, degree: int, arm_length: int, labels: int):
        if degree < 2 or arm_length < 1:
            raise ValueError(f"degree, arm_length: expected at least 2 arms of at least 1 node, got {degree}, {arm_length}")
        if labels < 1 + degree * arm_length:
            raise ValueError(f"labels: expected at least 1 + degree * arm_length = {1 + degree * arm_length} labels "
                             f"(every node has its own), got {labels}")
        self.degree, self.arm_length, self.labels = degree, arm_length, labels
        self.sep, self.query, self.equals, self.eos = labels, labels + 1, labels + 2, labels + 3
        self.vocab_size = labels + 4
        self.answer_start = 3 * degree * arm_length + 4  # position of the center after "="
        self.length = self.answer_start + arm_length + 2  # the answer's nodes and EOS

    def sample(self, rng: random.Random) -> tuple[list[int], int]:
        """(tokens of one graph, its correct arm)."""
        nodes = rng.sample(range(self.labels), 1 + self.degree * self.arm_length)
        center, L = nodes[0], self.arm_length
        arms = [nodes[1 + a * L : 1 + (a + 1) * L] for a in range(self.degree)]
        edges = [(([center] + arm)[i], arm[i]) for arm in arms for i in range(L)]
        rng.shuffle(edges)
        arm = rng.randrange(self.degree)
        prompt = [t for u, v in edges for t in (u, v, self.sep)] + [self.query, center, arms[arm][-1], self.equals]
        return prompt + [center] + arms[arm] + [self.eos], arm

    def target_mask(self, n: int) -> torch.Tensor:
        """[n, length]: True on the answer (the center after "=" through EOS)."""
        mask = torch.zeros(n, self.length, dtype=torch.bool)
        mask[:, self.answer_start :] = True
        return mask


@torch.no_grad()
def evaluate(model: TinyGPT, task: PathStar, tokens: torch.Tensor, batch_size: int = 500) -> dict:
    """Greedy answers of the test graphs ``tokens [n, length]`` (see the module docstring)."""
    device = next(model.parameters()).device
    a = task.answer_start
    exact = first = later = 0
    for i in range(0, len(tokens), batch_size):
        gold = tokens[i : i + batch_size].to(device)
        seq = gold[:, :a]
        for _ in range(task.length - a):
            nxt = model.lm_head(model(seq)[:, -1]).argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
        exact += int((seq[:, a:] == gold[:, a:]).all(1).sum())
        first += int((seq[:, a + 1] == gold[:, a + 1]).sum())  # the arm (the answer's center is a copy)
        pred = model.lm_head(model(gold[:, :-1])).argmax(-1)  # teacher-forced
        later += int((pred[:, a + 1 :] == gold[:, a + 2 :]).all(1).sum())  # the steps after the first, and EOS
    n = len(tokens)
    return {"accuracy": round(exact / n, 4), "first_step": round(first / n, 4), "later_steps_teacher_forced": round(later / n, 4),
            "chance_first_step": round(1 / task.degree, 4)}


def run_config(cfg: PathStarConfig, out_dir: Path, *, log=print) -> dict:
    """Trains the GPT and the NextLat model on the same graphs from the same initialization,
    evaluates both on fresh graphs, writes ``summary.json`` and both state dicts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    task = PathStar(cfg.degree, cfg.arm_length, cfg.labels)
    rng = random.Random(cfg.seed)
    train_seqs = [task.sample(rng)[0] for _ in range(cfg.n_train)]
    test = [task.sample(rng) for _ in range(cfg.n_test)]
    tokens = torch.tensor(train_seqs)
    test_tokens = torch.tensor([t for t, _ in test])
    am = torch.ones_like(tokens, dtype=torch.bool)
    summary = {"config": dataclasses.asdict(cfg), "environment": run_environment(device),
               "data": {"sequence_length": task.length, "vocab_size": task.vocab_size, "train_graphs": cfg.n_train,
                        "test_graphs": cfg.n_test, "test_arm_counts": [sum(a == k for _, a in test) for k in range(cfg.degree)]},
               "models": {}}
    for name, model, res in gpt_and_nextlat(cfg, task.vocab_size, task.length, tokens, task.target_mask(len(tokens)), am,
                                            device, log):
        res.update(evaluate(model, task, test_tokens))
        summary["models"][name] = res
        torch.save(model.state_dict(), out_dir / f"{name}.pt")
        log({"model": name, **{k: res[k] for k in ("accuracy", "first_step", "later_steps_teacher_forced")}})
    m = summary["models"]
    summary["headline"] = {k: {name: m[name][k] for name in m} for k in ("accuracy", "first_step")}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


run = registry_run(run_config, PRESETS)
register("nextlat-path-star", "NextLat (arXiv:2511.05963), planning",
         "GPT vs NextLat on path-star graphs: the path from the center to a given leaf (next-token training learns only the easy steps)")(run)


def main(argv: list[str] | None = None) -> int:
    return cli_main(run_config, PRESETS, argv, "nextlat_pathstar", __doc__, "runs/nextlat-pathstar")


if __name__ == "__main__":
    sys.exit(main())

"""The NextLat path-star reproduction: graphs and their tokens, the measures (against oracle
solvers whose answers are known), and a quick run."""

import json
import random

import pytest
import torch
from torch import nn

from fastmodels.reproduce import nextlat_pathstar as ps
from fastmodels.reproduce import reproductions


def parse(task, tokens):
    """(edges, center, leaf, answer) of one encoded graph."""
    a = task.answer_start
    prompt = tokens[: a - 4]
    edges = [(prompt[i], prompt[i + 1]) for i in range(0, len(prompt), 3)]
    assert all(prompt[i + 2] == task.sep for i in range(0, len(prompt), 3))
    assert tokens[a - 4] == task.query and tokens[a - 1] == task.equals
    return edges, tokens[a - 3], tokens[a - 2], tokens[a:]


@pytest.mark.parametrize("degree,arm_length", [(2, 1), (3, 4), (5, 2)])
def test_graphs_are_stars_and_the_answer_is_the_path(degree, arm_length):
    task = ps.PathStar(degree, arm_length, 40)
    rng = random.Random(0)
    arms = []
    for _ in range(200):
        tokens, arm = task.sample(rng)
        assert len(tokens) == task.length and max(tokens) < task.vocab_size
        edges, center, leaf, answer = parse(task, tokens)
        nodes = {u for e in edges for u in e}
        assert len(edges) == degree * arm_length and len(nodes) == 1 + degree * arm_length and max(nodes) < 40
        succ = {}
        for u, v in edges:
            succ.setdefault(u, []).append(v)
        assert len(succ[center]) == degree and all(len(s) == 1 for u, s in succ.items() if u != center)
        assert leaf not in succ and answer[-1] == task.eos and answer[0] == center and answer[-2] == leaf
        path = answer[:-1]
        assert len(path) == arm_length + 1 and all(v in succ[u] for u, v in zip(path, path[1:]))
        arms.append(arm)
    assert set(arms) == set(range(degree))
    mask = task.target_mask(3)
    assert mask.shape == (3, task.length) and mask[0].nonzero().flatten().tolist() == list(range(task.answer_start, task.length))


def test_bad_graph_sizes():
    with pytest.raises(ValueError, match="labels"):
        ps.PathStar(3, 4, 12)
    with pytest.raises(ValueError, match="degree"):
        ps.PathStar(1, 4, 40)


class Solver(nn.Module):
    """Reads the edge list and answers through an identity LM head: the right arm first
    (``plan=True``) or the arm of the center's first edge in the list (the Clever Hans cheat),
    then the edge out of the last node, then EOS at the leaf."""

    def __init__(self, task, plan):
        super().__init__()
        self.task, self.plan = task, plan
        self.lm_head = nn.Linear(task.vocab_size, task.vocab_size, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(task.vocab_size))

    def forward(self, tokens):
        task, a = self.task, self.task.answer_start
        out = torch.zeros(*tokens.shape, task.vocab_size)
        for b, row in enumerate(tokens.tolist()):
            edges, center, leaf, _ = parse(task, row + [0] * (task.length - len(row)))
            succ, pred = {}, {v: u for u, v in edges}
            for u, v in edges:
                succ.setdefault(u, []).append(v)
            for t in range(a - 1, len(row)):
                answer = row[a : t + 1]
                if not answer:
                    nxt = center
                elif answer[-1] == leaf:
                    nxt = task.eos
                elif len(answer) == 1 and self.plan:
                    nxt = leaf
                    while pred[nxt] != center:
                        nxt = pred[nxt]
                else:
                    nxt = succ.get(answer[-1], [task.eos])[0]
                out[b, t, nxt] = 30.0
        return out


def test_evaluate_scores_a_planner_and_the_clever_hans_cheat():
    task = ps.PathStar(3, 3, 30)
    rng = random.Random(0)
    test = [task.sample(rng) for _ in range(90)]
    tokens = torch.tensor([t for t, _ in test])
    res = ps.evaluate(Solver(task, plan=True), task, tokens, batch_size=32)
    assert res == {"accuracy": 1.0, "first_step": 1.0, "later_steps_teacher_forced": 1.0, "chance_first_step": round(1 / 3, 4)}
    cheat = ps.evaluate(Solver(task, plan=False), task, tokens, batch_size=32)

    def first_edge_out_of_center(t):
        edges, center, _, _ = parse(task, t.tolist())
        return next(v for u, v in edges if u == center)

    right = sum(int(first_edge_out_of_center(t) == t[task.answer_start + 1]) for t in tokens) / len(tokens)
    assert cheat["first_step"] == cheat["accuracy"] == pytest.approx(right, abs=1e-4)
    assert 0.15 < right < 0.6 and cheat["later_steps_teacher_forced"] == 1.0


def test_quick_run_writes_both_models(tmp_path):
    assert "nextlat-path-star" in reproductions()
    summary = ps.run_config(ps.QUICK, tmp_path, log=lambda row: None)
    assert json.loads((tmp_path / "summary.json").read_text())["headline"] == summary["headline"]
    for name in ("gpt", "nextlat"):
        m = summary["models"][name]
        assert m["final"]["ce"] < m["history"][0]["ce"]
        assert 0 <= m["accuracy"] <= m["first_step"] <= 1 and 0 <= m["later_steps_teacher_forced"] <= 1
        assert (tmp_path / f"{name}.pt").exists()
    assert summary["models"]["gpt"]["history"][0]["ce"] == summary["models"]["nextlat"]["history"][0]["ce"]  # same init
    assert sum(summary["data"]["test_arm_counts"]) == ps.QUICK.n_test

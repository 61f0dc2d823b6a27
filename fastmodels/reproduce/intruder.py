"""Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv:2410.21228) on a real small LM: fine-tune SmolLM2-135M on factual recall with
full fine-tuning and with LoRA of several ranks, reach similar accuracy, and count in each adapted
matrix the intruder dimensions: top-k singular vectors of the fine-tuned matrix with
max_i |cos(y_j, x_i)| < eps against every singular vector of the pre-trained one (k = 10,
eps = 0.5, the paper's defaults), by :func:`fastmodels.ops.intruder_dimensions` (a LoRA adapter is
analysed as ``(W, B, A, scale)`` without forming ``W + scale B A``).

The paper: LoRA models have intruder dimensions and full fine-tuning has (almost) none; higher
ranks and rank-stabilized LoRA (scale alpha / sqrt(r)) have fewer; models with intruders forget
more of the pre-training distribution. Here the fine-tuning task is the CounterFact-style country
facts of the LASER reproduction (a training split), and forgetting is read off the facts the
model was not trained on (held out, same relations).

    python -m fastmodels.reproduce.intruder --out runs/intruder [--preset quick|cpu|paper] [--steps N ...]

Methods: ``full`` (every parameter), ``lora<r>`` (alpha = ``alpha_ratio`` * r, scale alpha / r)
and ``rslora<r>`` (scale alpha / sqrt(r)), on the ``targets`` matrices of every decoder layer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmodels.ops import intruder_dimensions
from fastmodels.reproduce import register
from fastmodels.reproduce._facts import (answer_batches, answer_logprobs, country_facts, decoder_layers, encode_facts, evaluate,
                                         linear_at, load_smollm2, sample_facts, split_facts)
from fastmodels.reproduce._lm import cli_main, registry_run, resolve_device, run_environment

ALL_LINEAR = "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.o_proj,mlp.gate_proj,mlp.up_proj,mlp.down_proj"


@dataclass(frozen=True)
class IntruderConfig:
    methods: str = "full,lora8,lora64,rslora64"
    targets: str = ALL_LINEAR  # per decoder layer: adapted by LoRA and analysed
    steps: int = 300
    batch_size: int = 16
    lr_full: float = 2e-5
    lr_lora: float = 3e-4
    alpha_ratio: float = 2.0  # LoRA alpha = alpha_ratio * r
    warmup: int = 20
    k: int = 10  # top singular vectors examined
    eps: float = 0.5  # cosine threshold
    test_fraction: float = 0.3  # facts held out of fine-tuning (forgetting)
    max_facts: int = 0  # 0: every fact
    seed: int = 0
    threads: int = 0
    device: str = "auto"


PAPER = IntruderConfig()
QUICK = dataclasses.replace(PAPER, methods="full,lora4", targets="mlp.up_proj,mlp.down_proj", steps=8, batch_size=8, max_facts=80)
PRESETS = {"quick": QUICK, "cpu": PAPER, "paper": PAPER}  # the 135M model takes the paper-style runs on a CPU


# -- LoRA ----------------------------------------------------------------------------------------

class LoRALinear(torch.nn.Module):
    """``base(x) + scale * (x A^T) B^T`` with a frozen ``base`` Linear, A [r, in] (Kaiming-uniform)
    and B [out, r] (zeros: the adapted model starts as the base model); scale alpha / r, or
    alpha / sqrt(r) when ``rank_stabilized`` (rsLoRA)."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, rank_stabilized: bool = False):
        super().__init__()
        if r < 1 or r > min(base.in_features, base.out_features):
            raise ValueError(f"r: expected 1..{min(base.in_features, base.out_features)} for a {base.out_features} x "
                             f"{base.in_features} Linear, got {r}")
        self.base = base
        base.requires_grad_(False)
        w = base.weight
        self.A = torch.nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))
        self.scale = alpha / (math.sqrt(r) if rank_stabilized else r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.A.mT) @ self.B.mT)

    def adapter(self) -> tuple:
        """``(W, B, A, scale)``: the form :func:`fastmodels.ops.intruder_dimensions` takes."""
        return self.base.weight.detach(), self.B.detach(), self.A.detach(), self.scale


def parse_method(name: str) -> tuple[str, int, bool]:
    """'full' -> ('full', 0, False); 'lora8' -> ('lora', 8, False); 'rslora64' -> ('lora', 64, True)."""
    if name == "full":
        return "full", 0, False
    m = re.fullmatch(r"(rs)?lora(\d+)", name)
    if not m or int(m.group(2)) < 1:
        raise ValueError(f"methods: expected 'full', 'lora<r>' or 'rslora<r>' (r >= 1), got {name!r}")
    return "lora", int(m.group(2)), bool(m.group(1))


def add_lora(model, targets: list[str], r: int, alpha: float, rank_stabilized: bool = False) -> dict:
    """Replaces every ``targets`` Linear of every decoder layer by a :class:`LoRALinear`; freezes
    every other parameter. Returns {(layer, target): LoRALinear}."""
    model.requires_grad_(False)
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for t in targets:
            lin = linear_at(layer, t, "targets")
            parent_path, _, attr = t.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            lora = LoRALinear(lin, r, alpha, rank_stabilized)
            setattr(parent, attr, lora)
            out[(i, t)] = lora
    return out


# -- fine-tuning ---------------------------------------------------------------------------------

def fine_tune(model, examples, params: list, *, steps: int, batch_size: int, lr: float, warmup: int, seed: int,
              log=lambda row: None) -> dict:
    """AdamW (weight decay 0, betas 0.9/0.999) on the mean answer NLL of random batches of
    ``examples``; linear warm-up then cosine decay to 0; gradients clipped at norm 1."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    model.train()
    t0, hist = time.perf_counter(), []
    for step in range(steps):
        batch = [examples[i] for i in rng.sample(range(len(examples)), min(batch_size, len(examples)))]
        (_, ids, mask, rows, pos, tgt, _), = answer_batches(batch, len(batch))
        lp, _ = answer_logprobs(model, ids.to(device), mask.to(device), rows.to(device), pos.to(device), tgt.to(device))
        loss = -lp.sum() / len(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            row = {"step": step, "loss": round(loss.item(), 4), "s": round(time.perf_counter() - t0, 1)}
            hist.append(row)
            log(row)
    model.eval()
    return {"train_s": round(time.perf_counter() - t0, 1), "history": hist}


# -- the analysis --------------------------------------------------------------------------------

def base_left_vectors(model, targets: list[str]) -> dict:
    """{(layer, target): (pre-trained W, all its left singular vectors)} (float64 SVD), computed
    once and shared by every method's analysis."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for t in targets:
            W = linear_at(layer, t, "targets").weight.detach().clone()
            out[(i, t)] = (W, torch.linalg.svd(W.double(), full_matrices=False).U)
    return out


def count_intruders(base: dict, tuned: dict, k: int, eps: float) -> dict:
    """Intruder dimensions of each tuned matrix: ``tuned`` maps (layer, target) to a fine-tuned
    weight or a LoRA adapter tuple. Returns per-matrix counts and minimum max-cosines, and totals
    per target type."""
    per, by_target = {}, {}
    for key, t in tuned.items():
        W0, U0 = base[key]
        res = intruder_dimensions(W0, t, k=k, eps=eps, base_svd=U0)
        per[f"{key[0]}.{key[1]}"] = {"count": res.count, "min_max_cos": round(float(res.max_cos.min()), 4)}
        by_target[key[1]] = by_target.get(key[1], 0) + res.count
    return {"total": sum(v["count"] for v in per.values()), "matrices_with_intruders": sum(v["count"] > 0 for v in per.values()),
            "matrices": len(per), "by_target": by_target, "per_matrix": per}


def run_config(cfg: IntruderConfig, out_dir: Path, *, log=print, model=None, tokenizer=None) -> dict:
    """Fine-tunes a copy of SmolLM2-135M (or of ``model``, any Hugging Face causal LM, with its
    ``tokenizer``; left unchanged) once per method and writes ``summary.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    methods = [(m.strip(), *parse_method(m.strip())) for m in cfg.methods.split(",") if m.strip()]
    targets = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    if not methods or not targets:
        raise ValueError(f"methods/targets: expected non-empty lists, got {cfg.methods!r} / {cfg.targets!r}")
    if model is None:
        model, tokenizer = load_smollm2(device)
    elif tokenizer is None:
        raise ValueError("tokenizer: expected the model's tokenizer with the model")
    model = model.to(device).eval()
    facts = sample_facts(country_facts(), cfg.max_facts, cfg.seed)
    examples = encode_facts(tokenizer, facts)
    held, train = split_facts(len(examples), cfg.test_fraction, cfg.seed)
    train_ex, held_ex = [examples[i] for i in train], [examples[i] for i in held]

    t0 = time.perf_counter()
    base = base_left_vectors(model, targets)
    base_svd_s = time.perf_counter() - t0
    before = {"train": evaluate(model, train_ex), "held_out": evaluate(model, held_ex)}
    summary = {"config": dataclasses.asdict(cfg), "environment": run_environment(device),
               "data": {"facts": len(facts), "train": len(train), "held_out": len(held)},
               "base": {s: {"acc": round(r["acc"], 4), "loss": round(r["loss"], 4)} for s, r in before.items()},
               "base_svd_s": round(base_svd_s, 1), "methods": {}}
    log({"base": summary["base"]})
    for name, kind, r, rs in methods:
        tuned_model = copy.deepcopy(model)  # every method starts from the pre-trained weights
        torch.manual_seed(cfg.seed)
        if kind == "full":
            tuned_model.requires_grad_(True)
            params = list(tuned_model.parameters())
            lr = cfg.lr_full
        else:
            adapters = add_lora(tuned_model, targets, r, cfg.alpha_ratio * r, rs)
            params = [p for a in adapters.values() for p in (a.A, a.B)]
            lr = cfg.lr_lora
        res = fine_tune(tuned_model, train_ex, params, steps=cfg.steps, batch_size=cfg.batch_size, lr=lr, warmup=cfg.warmup,
                        seed=cfg.seed, log=lambda row, n=name: log({"method": n, **row}))
        res["trainable_parameters"] = sum(p.numel() for p in params)
        for split, ex in (("train", train_ex), ("held_out", held_ex)):
            e = evaluate(tuned_model, ex)
            res[split] = {"acc": round(e["acc"], 4), "loss": round(e["loss"], 4)}
        if kind == "full":
            layers = decoder_layers(tuned_model)
            tuned = {key: linear_at(layers[key[0]], key[1]).weight.detach() for key in base}
        else:
            tuned = {key: a.adapter() for key, a in adapters.items()}
        t0 = time.perf_counter()
        res["intruders"] = count_intruders(base, tuned, cfg.k, cfg.eps)
        res["analysis_s"] = round(time.perf_counter() - t0, 1)
        log({"method": name, "train": res["train"], "held_out": res["held_out"], "intruders": res["intruders"]["total"]})
        summary["methods"][name] = res
        del tuned_model, params
    summary["headline"] = {name: {"intruders": m["intruders"]["total"], "train_acc": m["train"]["acc"],
                                  "held_out_acc": m["held_out"]["acc"]} for name, m in summary["methods"].items()}
    summary["headline"]["base"] = {"intruders": 0, "train_acc": summary["base"]["train"]["acc"],
                                   "held_out_acc": summary["base"]["held_out"]["acc"]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


run = registry_run(run_config, PRESETS)
register("intruder-dimensions", "LoRA vs full fine-tuning: intruder dimensions (arXiv:2410.21228)",
         "SmolLM2-135M fine-tuned on facts by full fine-tuning and LoRA of several ranks: intruder dimensions per matrix, forgetting")(run)


def main(argv: list[str] | None = None) -> int:
    return cli_main(run_config, PRESETS, argv, "intruder", __doc__, "runs/intruder")


if __name__ == "__main__":
    sys.exit(main())

"""Shared pieces of the reproductions: the Pushdown LM ones' batching of (tokens, gold spans)
examples into (tokens, StackTape) batches and training loop, and every reproduction's entry
points (the registry's ``run``, the command line's ``main``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import random
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch

from fastmodels.pushdown.lm import PushdownLM
from fastmodels.pushdown.tape import StackTape

Example = tuple[list[int], list[tuple[int, int]]]  # token ids, binary spans over those positions


def collate(examples: list[Example]) -> tuple[torch.Tensor, StackTape]:
    """Right-padded tokens [B, T] (padding id 0: ignored by the loss) and the gold tape."""
    T = max(len(t) for t, _ in examples)
    tokens = torch.zeros(len(examples), T, dtype=torch.int64)
    for i, (t, _) in enumerate(examples):
        tokens[i, : len(t)] = torch.tensor(t)
    return tokens, StackTape.from_spans([(len(t), s) for t, s in examples], pad_to=T)


def token_batches(examples: list[Example], batch_tokens: int, rng: random.Random) -> Iterator[tuple[torch.Tensor, StackTape]]:
    """Endless shuffled batches of at most ``batch_tokens`` padded tokens, examples of similar
    length together."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    groups, cur, cur_max = [], [], 0
    for i in order:
        n = len(examples[i][0])
        if cur and max(cur_max, n) * (len(cur) + 1) > batch_tokens:
            groups.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        groups.append(cur)
    while True:
        rng.shuffle(groups)
        for g in groups:
            yield collate([examples[i] for i in g])


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when visible, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    return device


def run_environment(device: torch.device) -> dict:
    """Where and at which commit a reproduction ran (the benchmark rows' facts)."""
    from fastmodels.bench.harness import environment

    return environment(device.type)


def train_lm(model: PushdownLM, data: Iterable[tuple[torch.Tensor, StackTape]], *, steps: int, lr: float, warmup: int,
             log=lambda row: None) -> dict:
    """AdamW (weight decay 0.01, betas 0.9/0.98), linear warm-up then cosine decay to lr / 10,
    gradients clipped at norm 1; the loss of :meth:`PushdownLM.loss`. Returns the log."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    model.train()
    device = next(model.parameters()).device
    data = iter(data)
    t0, hist = time.perf_counter(), []
    for step in range(steps):
        tokens, tape = next(data)
        loss = model.loss(tokens.to(device), tape.to(device))
        opt.zero_grad(set_to_none=True)
        loss["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            row = {"step": step, **{k: round(v.item(), 4) for k, v in loss.items()}, "s": round(time.perf_counter() - t0, 1)}
            hist.append(row)
            log(row)
    model.eval()
    return {"train_s": round(time.perf_counter() - t0, 1), "final": hist[-1], "history": hist}


def _flag(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (or 1/0), got {value!r}")


def config_from_argv(presets: dict, argv: list[str] | None, prog: str, description: str, default_out: str):
    """(config, out dir) from ``--preset NAME`` and ``--<field> VALUE`` for every field of the
    presets' dataclass (booleans as true/false)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--preset", choices=sorted(presets), default="paper")
    base = presets["paper"]
    for f in dataclasses.fields(base):
        default = getattr(base, f.name)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=_flag if isinstance(default, bool) else type(default), default=None)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(base) if getattr(args, f.name) is not None}
    return dataclasses.replace(presets[args.preset], **overrides), Path(args.out)


def registry_run(run_config, presets: dict):
    """The registry's ``run(quick, out_dir)`` of a reproduction: ``run_config`` at the ``quick``
    or the ``paper`` preset, quietly; returns the headline and where the summary is."""
    def run(quick: bool, out_dir: Path) -> dict:
        summary = run_config(presets["quick" if quick else "paper"], Path(out_dir), log=lambda r: None)
        return {"headline": summary["headline"], "summary": str(Path(out_dir) / "summary.json")}

    return run


def cli_main(run_config, presets: dict, argv: list[str] | None, module: str, doc: str, default_out: str) -> int:
    """``python -m fastmodels.reproduce.<module>``: the config from ``--preset`` and field flags,
    progress rows as JSON on stderr, the headline on stdout."""
    cfg, out = config_from_argv(presets, argv, f"python -m fastmodels.reproduce.{module}", doc.split("\n\n")[0], default_out)
    summary = run_config(cfg, out, log=lambda r: print(json.dumps(r), file=sys.stderr, flush=True))
    print(json.dumps(summary["headline"], indent=2))
    return 0

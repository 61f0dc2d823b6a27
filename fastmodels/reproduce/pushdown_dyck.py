"""Pushdown Layers on Dyck (Murty et al., EMNLP 2023, section 4.1): a Pushdown LM and the base LM,
trained on Dyck(k, m) strings with gold stack tapes, tested on predicting the closing bracket
(a) of nestings deeper than any in training (depth generalization) and (b) whose open bracket is
far back (long-range dependency). The Pushdown LM infers its tape of every test prefix with a
beam search over attachments; it is also scored on gold tapes as a diagnostic.

Paper (spec pushdown.md section 5): depth generalization 40.6 (base) vs 68.3 (Pushdown);
long-range (>= 300) 14.1 vs 42.9. The paper's setup is ``PAPER`` (6 layers, width 128, 100k
strings, k=20, m=10, beam 50; a GPU job); ``CPU`` is a 4-layer model for about 20 minutes of the
2-core development CPU (results in docs/reproductions.md); ``QUICK`` checks the pipeline in about
20 s of it.

    python -m fastmodels.reproduce.pushdown_dyck --out runs/dyck [--preset quick|cpu|paper] [--steps N ...]

Data follows the authors' generator: at depth 0 the string ends with probability 1/2 (resampled
while shorter than ``min_len``), at depth m it must close, otherwise it opens a uniformly chosen
bracket type or closes with probability 1/2 each. Tokens: opens 0..k-1, closes k..2k-1, BOS 2k,
EOS 2k+1. The tape: a close bracket reduces with everything back to its open bracket; BOS and EOS
shift. Both LMs are trained with the attachment loss (as the paper's base LM is).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmodels.pushdown.lm import PushdownLM
from fastmodels.pushdown.tape import StackTape
from fastmodels.reproduce import register
from fastmodels.reproduce._lm import cli_main, collate, registry_run, resolve_device, run_environment, token_batches, train_lm


@dataclass(frozen=True)
class DyckConfig:
    bracket_types: int = 20  # k
    max_depth: int = 10  # m, of the training strings
    min_len: int = 20  # resample strings shorter than this
    max_len: int = 200  # and longer than this
    n_train: int = 100_000
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    steps: int = 20_000
    batch_tokens: int = 8192  # tokens per training batch (strings of similar length batched together)
    lr: float = 5e-4
    warmup: int = 500
    beam: int = 50
    # depth generalization: nestings depth_lo .. depth_hi - 1 of the first `depth_types` types, with
    # a test string inserted at a random place (as the authors' eval_dyck.py)
    depth_lo: int = 15
    depth_hi: int = 50
    depth_types: int = 10
    n_depth_eval: int = 105
    # long-range: prefixes ending before a close whose open is >= long_min_dep tokens back, taken
    # from strings of max depth long_max_depth, at most long_max_len tokens
    long_min_dep: int = 300
    long_max_depth: int = 40
    long_max_len: int = 600
    n_long_eval: int = 50
    n_iid_eval: int = 200  # held-out strings of the training distribution (every closing bracket)
    attach_rel_pos: bool = True  # the attachment head's relative-position term (the authors' head has it)
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)
    device: str = "auto"  # "auto": CUDA when visible, else the CPU


PAPER = DyckConfig()
CPU = dataclasses.replace(PAPER, n_train=20_000, d_model=128, n_layers=4, steps=3000, batch_tokens=2048, lr=5e-4, warmup=200,
                          beam=10, n_depth_eval=70, long_min_dep=100, long_max_depth=20, long_max_len=200, n_long_eval=40,
                          n_iid_eval=100)
QUICK = dataclasses.replace(PAPER, bracket_types=4, max_depth=4, min_len=8, max_len=40, n_train=2000, d_model=32, n_layers=2,
                            n_heads=2, steps=500, batch_tokens=1024, lr=2e-3, warmup=50, beam=4, depth_lo=6, depth_hi=10,
                            depth_types=4, n_depth_eval=12, long_min_dep=30, long_max_depth=8, long_max_len=80,
                            n_long_eval=8, n_iid_eval=20)
PRESETS = {"quick": QUICK, "cpu": CPU, "paper": PAPER}


# -- data ----------------------------------------------------------------------------------------

def sample_dyck(rng: random.Random, k: int, m: int, min_len: int, max_len: int | None = None) -> list[int]:
    """One string of bracket tokens (opens 0..k-1, closes k..2k-1) from the authors' generator."""
    while True:
        out: list[int] = []
        stack: list[int] = []
        while True:
            if not stack:
                if rng.random() < 0.5:  # end; a draw at depth 0 gives END with probability 1/2
                    if len(out) >= min_len:
                        break
                    continue  # resample the draw
                push = True
            elif len(stack) == m:
                push = False
            else:
                push = rng.random() < 0.5
            if push:
                b = rng.randrange(k)
                stack.append(b)
                out.append(b)
            else:
                out.append(k + stack.pop())
            if max_len is not None and len(out) > max_len:
                break
        if max_len is None or len(out) <= max_len:
            return out


def matching_opens(brackets: list[int], k: int) -> list[int | None]:
    """For each token, None for an open bracket, else the position of its open bracket."""
    stack, out = [], []
    for p, b in enumerate(brackets):
        if b < k:
            stack.append(p)
            out.append(None)
        else:
            if not stack or brackets[stack[-1]] != b - k:
                raise ValueError(f"brackets: unmatched close bracket {b} at position {p}")
            out.append(stack.pop())
    return out


def dyck_spans(brackets: list[int], k: int, offset: int = 1) -> list[tuple[int, int]]:
    """The binary spans of the Dyck parse (a close bracket reduces with every stack constituent
    back to its open bracket, one node per constituent, innermost first), positions shifted by
    ``offset`` (the BOS token)."""
    stack: list[int] = []  # constituent starts
    spans = []
    for p, o in enumerate(matching_opens(brackets, k)):
        if o is None:
            stack.append(p)
            continue
        while stack[-1] > o:
            spans.append((stack.pop() + offset, p + offset))
        spans.append((stack.pop() + offset, p + offset))
        stack.append(o)
    return spans


def encode(brackets: list[int], k: int, *, eos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokens [BOS] + brackets (+ [EOS]) and their spans."""
    return [2 * k] + list(brackets) + ([2 * k + 1] if eos else []), dyck_spans(brackets, k)


def depth_generalization_set(cfg: DyckConfig, rng: random.Random, fillers: list[list[int]]) -> list[tuple[list[int], int]]:
    """(prefix brackets, target close) pairs: d nested opens of random types (d in
    [depth_lo, depth_hi)), their closes but the last, and a filler string inserted at a random
    place; the target is the last close (matching the first open)."""
    k, out = cfg.bracket_types, []
    while len(out) < cfg.n_depth_eval:
        for d in range(cfg.depth_lo, cfg.depth_hi):
            opens = [rng.randrange(cfg.depth_types) for _ in range(d)]
            seq = opens + [k + b for b in reversed(opens)]
            target, seq = seq[-1], seq[:-1]
            at = rng.randint(0, len(seq))
            out.append((seq[:at] + rng.choice(fillers) + seq[at:], target))
            if len(out) == cfg.n_depth_eval:
                break
    return out


def long_range_set(cfg: DyckConfig, rng: random.Random) -> list[tuple[list[int], int]]:
    """(prefix, target close) pairs from strings of max depth ``long_max_depth`` whose close is
    at least ``long_min_dep`` tokens after its open, prefixes of at most ``long_max_len`` tokens."""
    k, out = cfg.bracket_types, []
    for _ in range(100_000):
        s = sample_dyck(rng, k, cfg.long_max_depth, cfg.long_min_dep + 1, cfg.long_max_len + 1)
        for p, o in enumerate(matching_opens(s, k)):
            if o is not None and p - o >= cfg.long_min_dep and p <= cfg.long_max_len:
                out.append((s[:p], s[p]))
                break  # one prefix per string: independent examples
        if len(out) == cfg.n_long_eval:
            return out
    raise RuntimeError(f"long-range set: found {len(out)} of {cfg.n_long_eval} prefixes; lower long_min_dep")


def iid_set(cfg: DyckConfig, rng: random.Random, train: set) -> list[list[int]]:
    out = []
    while len(out) < cfg.n_iid_eval:
        s = sample_dyck(rng, cfg.bracket_types, cfg.max_depth, cfg.min_len, cfg.max_len)
        if tuple(s) not in train:
            out.append(s)
    return out


# -- training and evaluation ---------------------------------------------------------------------

@torch.no_grad()
def next_close(model: PushdownLM, prefixes: list[list[int]], k: int) -> list[int]:
    """The model's most likely closing bracket after each prefix, on the gold tape (the base LM's
    attention ignores it)."""
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]))
    out = [0] * len(prefixes)
    for s in range(0, len(order), 16):
        idx = order[s : s + 16]
        encoded = [encode(prefixes[i], k, eos=False) for i in idx]
        tokens, tape = collate(encoded)
        device = next(model.parameters()).device
        logits = model.logits(model(tokens.to(device), tape.to(device))).cpu()
        for row, i in enumerate(idx):
            last = len(encoded[row][0]) - 1
            out[i] = k + int(logits[row, last, k : 2 * k].argmax())
    return out


def beam_eval(model: PushdownLM, prefixes: list[list[int]], k: int, beam: int) -> tuple[list[int], list[bool]]:
    """Per prefix: the most likely closing bracket on the model's own beam-search tape, and
    whether that tape is the gold one (every attachment right)."""
    preds, exact = [], []
    for p in prefixes:
        toks, spans = encode(p, k, eos=False)
        res = model.beam_parse(toks, beam=beam)
        preds.append(k + int(res.next_log_probs[k : 2 * k].argmax()))
        exact.append(torch.equal(res.tape.dense().cpu(), StackTape.from_spans([(len(toks), spans)]).dense()))
    return preds, exact


def accuracy(preds: list[int], targets: list[int]) -> float:
    return sum(p == t for p, t in zip(preds, targets)) / max(1, len(targets))


def iid_prefixes(strings: list[list[int]], k: int) -> tuple[list[list[int]], list[int]]:
    """Every prefix of the held-out strings that ends before a closing bracket."""
    prefixes, targets = [], []
    for s in strings:
        for p, b in enumerate(s):
            if b >= k:
                prefixes.append(s[:p])
                targets.append(b)
    return prefixes, targets


def run_config(cfg: DyckConfig, out_dir: Path, *, log=print) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    k = cfg.bracket_types
    train_strings = [sample_dyck(rng, k, cfg.max_depth, cfg.min_len, cfg.max_len) for _ in range(cfg.n_train)]
    train_set = {tuple(s) for s in train_strings}
    iid = iid_set(cfg, rng, train_set)
    depth = depth_generalization_set(cfg, rng, iid)
    long = long_range_set(cfg, rng)
    iid_p, iid_t = iid_prefixes(iid, k)
    # the in-distribution check scores every close of a subset of prefixes (beam search costs a
    # forward step per token per prefix)
    sub = random.Random(cfg.seed + 1).sample(range(len(iid_p)), min(len(iid_p), cfg.n_iid_eval))
    iid_p, iid_t = [iid_p[i] for i in sub], [iid_t[i] for i in sub]
    device = resolve_device(cfg.device)
    summary: dict = {"config": dataclasses.asdict(cfg), "environment": run_environment(device),
                     "data": {"train_strings": len(train_strings), "mean_train_len": round(sum(map(len, train_strings)) / len(train_strings), 1),
                              "depth_eval": len(depth), "mean_depth_prefix_len": round(sum(len(p) for p, _ in depth) / len(depth), 1),
                              "long_eval": len(long), "mean_long_prefix_len": round(sum(len(p) for p, _ in long) / len(long), 1),
                              "iid_eval_prefixes": len(iid_p)},
                     "models": {}}
    sets = {"depth_generalization": ([p for p, _ in depth], [t for _, t in depth]),
            "long_range": ([p for p, _ in long], [t for _, t in long]),
            "in_distribution": (iid_p, iid_t)}
    for name, pushdown in (("base", False), ("pushdown", True)):
        torch.manual_seed(cfg.seed)
        model = PushdownLM(2 * k + 2, cfg.d_model, cfg.n_layers, cfg.n_heads, pushdown=pushdown, binary=True,
                           relative_positions=cfg.attach_rel_pos).to(device)
        log({"model": name, "parameters": sum(p.numel() for p in model.parameters())})
        data = token_batches([encode(s, k) for s in train_strings], cfg.batch_tokens, random.Random(cfg.seed))
        res = train_lm(model, data, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, log=lambda r, n=name: log({"model": n, **r}))
        res["accuracy"] = {}
        for set_name, (prefixes, targets) in sets.items():
            t0 = time.perf_counter()
            preds, exact = beam_eval(model, prefixes, k, cfg.beam)
            acc = {"beam_tape" if pushdown else "no_tape": accuracy(preds if pushdown else next_close(model, prefixes, k), targets),
                   "beam_tape_exact": sum(exact) / len(exact)}
            if pushdown:
                acc["gold_tape"] = accuracy(next_close(model, prefixes, k), targets)
            res["accuracy"][set_name] = {**{a: round(v, 4) for a, v in acc.items()}, "eval_s": round(time.perf_counter() - t0, 1)}
            log({"model": name, set_name: res["accuracy"][set_name]})
        summary["models"][name] = res
        torch.save(model.state_dict(), out_dir / f"{name}.pt")
    summary["headline"] = {s: {"base": summary["models"]["base"]["accuracy"][s]["no_tape"],
                               "pushdown": summary["models"]["pushdown"]["accuracy"][s]["beam_tape"]} for s in sets}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


run = registry_run(run_config, PRESETS)
register("pushdown-dyck", "Pushdown Layers (arXiv:2310.19089), section 4.1",
         "Pushdown LM vs base LM on Dyck(k, m): closing-bracket accuracy under depth generalization and long-range dependencies")(run)


def main(argv: list[str] | None = None) -> int:
    return cli_main(run_config, PRESETS, argv, "pushdown_dyck", __doc__, "runs/pushdown-dyck")


if __name__ == "__main__":
    sys.exit(main())

"""Beam-search parsing with a Pushdown LM (spec section 4): ``PushdownLM.beam_parse`` (KV caches,
the beams' depth rows from one StackTapeBuilder, one top-k over every (beam, attachment) candidate
per step) against the same search without a KV cache, which re-encodes every beam's whole prefix
at each step as the authors' implementation does (it also deep-copies layer states per beam and
syncs once per candidate, which this peer does not reproduce: it is the faster of the two).

Inputs: a Dyck prefix (the Dyck reproduction's depth-generalization shape) through a randomly
initialized 4-layer, width-128 Pushdown LM; both searches must return the same best parse."""

from __future__ import annotations

import random

import torch

from fastmodels.bench.harness import Case, register_cases
from fastmodels.pushdown.lm import PushdownLM
from fastmodels.pushdown.tape import StackTapeBuilder


def _setup(n_tokens: int, beam: int, threads: int | None = None):
    def make():
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        k = 20
        model = PushdownLM(2 * k + 2, d_model=128, n_layers=4, n_heads=4, binary=True).eval()
        rng = random.Random(0)
        depth, toks = 0, [2 * k]
        stack = []
        while len(toks) < n_tokens:  # a random Dyck prefix
            if depth == 0 or (depth < 30 and rng.random() < 0.55):
                stack.append(rng.randrange(k))
                toks.append(stack[-1])
                depth += 1
            else:
                toks.append(k + stack.pop())
                depth -= 1
        return {"model": model, "tokens": toks, "beam": beam}

    return make


def _ours(x):
    res = x["model"].beam_parse(x["tokens"], beam=x["beam"])
    return res.log_prob, res.attachments


@torch.no_grad()
def _no_cache(x):
    """The same word-synchronous search, every step re-running the model over each beam's whole
    prefix (dense tapes from the beams' builders) instead of one cached step."""
    model, toks, beam = x["model"], torch.tensor(x["tokens"]), x["beam"]
    builder = StackTapeBuilder(1)
    builder.push(None)
    scores = torch.zeros(1, dtype=torch.float64)
    atts: list[list] = [[None]]
    for t in range(len(toks) - 1):
        k = builder.batch_size
        prefix = toks[: t + 1].expand(k, t + 1)
        tape = builder.tape()  # StackTape of the beams' prefixes
        hidden = model(prefix, tape)
        log_p = torch.log_softmax(model.logits(hidden[:, -1]).double(), -1)
        nxt = toks[t + 1].expand(k)[:, None]
        att = model.attach(hidden[:, -1:], model.embed(nxt), tape.dense()[:, -1:, :], context=hidden,
                           mask=builder.attach_mask[:, None, :], check_values=False)
        cand = (scores[:, None] + log_p[:, toks[t + 1]][:, None] + torch.log_softmax(att[:, 0].double(), -1)).flatten()
        best, idx = cand.topk(min(beam, int(torch.isfinite(cand).sum())))
        parents, choice = (idx // (t + 2)).tolist(), (idx % (t + 2)).tolist()
        new = [None if c == t + 1 else c for c in choice]
        builder = builder.select(parents)
        builder.push(new)
        atts = [atts[p] + [a] for p, a in zip(parents, new)]
        scores = best
    top = int(scores.argmax())
    return float(scores[top]), atts[top]


def _mismatch(x, result):
    ours_lp, ours_atts = _ours(x)
    lp, atts = result
    return {"parse_mismatch_err": float(atts != ours_atts), "log_prob_abs_err": abs(lp - ours_lp)}


@register_cases("pushdown_lm")
def cases(device: str, quick: bool) -> list[Case]:
    if device != "cpu":
        return []
    out = []
    for n, beam in ((40, 10), (120, 10), (120, 50)):
        out.append(Case(
            op="pushdown_lm", name=f"beam_parse Dyck prefix n{n} beam{beam} d128 L4", device="cpu",
            setup=_setup(n, beam), impls={"fastmodels": _ours, "no_kv_cache": _no_cache}, error=_mismatch,
            error_name="parse_mismatch_err", quick=(n, beam) == (40, 10),
            note="one prefix parsed by word-synchronous beam search; no_kv_cache re-encodes each beam's prefix every step "
                 "(the authors' design, without their per-beam deep copies and per-candidate syncs); "
                 "parse_mismatch_err 0: both return the same best parse (log_prob_abs_err: the difference of its score)",
        ))
    return out

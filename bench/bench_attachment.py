"""The Pushdown LM's attachment head, forward + backward of its loss, against the authors' form.

Every implementation computes the same head (same parameters): attachment logits over
[keys ; shift] for every query position and the cross-entropy against the gold attachments, then
the gradients of every parameter and of the hidden states.

* ``fastmodels``: ``AttachmentHead`` on the default backend (the fused ``attachment_scores``);
* ``factored_reference``: the same factored head with the op's reference backend (it materializes
  relu(keys_j + depth_feat[S]) as [B, T, T, hidden]);
* ``authors_mlp``: the authors' form, the per-pair MLP q~ . MLP([k'_j ; E'[S(t, j)]]) applied to
  the concatenation of every (t, j) pair ([B, T, T, d_model + d_depth] inputs, two per-pair GEMMs),
  with the depth table folded so that it is the same function (E' [V, d_depth], W1 = [W_k | W_e]).

Shapes: "dyck" is the paper's Dyck setup (6 layers of width 128; the head at twice the width, as in
the authors' code; binary tape, 32 strings of 128 brackets); "english" a wider head on an
n-ary-tree tape (V = 50). Error: RMS-relative error of the logits and of the hidden states'
gradient against float64 (CPU) or float32 (CUDA) on the factored reference.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from fastmodels.bench.bench_pushdown import _random_tree
from fastmodels.bench.harness import Case, register_cases
from fastmodels.pushdown import AttachmentHead, StackTape
from fastmodels.testing import rms_ratio

_D_DEPTH = 32  # the authors' depth-embedding width before the per-pair MLP


def _random_dyck(rng: random.Random, n: int) -> str:
    """A Dyck string of n brackets (n even), 20 bracket types as in the paper, nesting <= 10."""
    opens = [chr(0x4E00 + i) for i in range(20)]
    s, stack = [], []
    while len(s) < n:
        left = n - len(s)
        if stack and (len(stack) >= min(10, left) or rng.random() < 0.5):
            s.append(stack.pop())
        else:
            o = rng.randrange(20)
            s.append(opens[o])
            stack.append(chr(0x5E00 + o))
    return "".join(s)


def _setup(kind, B, T, d_model, width, V, binary, dtype, device, threads=None):
    def make():
        if threads is not None:
            torch.set_num_threads(threads)
        rng = random.Random(0)
        if binary:
            pairs = {chr(0x4E00 + i): chr(0x5E00 + i) for i in range(20)}
            tape = StackTape.from_brackets([_random_dyck(rng, T) for _ in range(B)], pairs=pairs, device=device)
        else:
            tape = StackTape.from_trees([_random_tree(rng, T) for _ in range(B)], device=device)
        torch.manual_seed(0)
        head = AttachmentHead(d_model, width=width, max_depth=V, binary=binary).to(device=device, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        E2 = (torch.randn(head.depth_feat.shape[0], _D_DEPTH, generator=g) * _D_DEPTH ** -0.5).to(device=device, dtype=dtype)
        We = torch.linalg.lstsq(E2.float().cpu(), head.depth_feat.detach().float().cpu()).solution  # depth_feat ~= E2 @ We
        with torch.no_grad():
            head.depth_feat.copy_((E2.float().cpu() @ We).to(device=device, dtype=dtype))  # exactly E' W_e
        hidden = torch.randn(B, T, d_model, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
        nxt = torch.randn(B, T, d_model, generator=g).to(device=device, dtype=dtype)
        x = {"head": head, "E2": E2, "We": We.t().to(device=device, dtype=dtype).requires_grad_(True), "hidden": hidden,
             "next": nxt, "tape": tape, "targets": tape.attachment_targets(), "mask": tape.attachment_mask()}
        ref_dtype = torch.float64 if device == "cpu" else torch.float32
        ref_head = AttachmentHead(d_model, width=width, max_depth=V, binary=binary, backend="reference").to(device=device, dtype=ref_dtype)
        ref_head.load_state_dict(head.state_dict())
        h = hidden.detach().to(ref_dtype).requires_grad_(True)
        logits = ref_head(h, nxt.to(ref_dtype), tape, mask=x["mask"])
        (dh,) = torch.autograd.grad(ref_head.loss(logits, x["targets"]), h)
        x["ref"] = (logits.detach(), dh)
        return x

    return make


def _run_head(x, backend):
    head = x["head"]
    head.backend = backend
    logits = head(x["hidden"], x["next"], x["tape"], mask=x["mask"])
    loss = head.loss(logits, x["targets"])
    grads = torch.autograd.grad(loss, [x["hidden"], *head.parameters()])
    return logits, grads[0]


def _ours(x):
    return _run_head(x, None)


def _factored_reference(x):
    return _run_head(x, "reference")


def _authors(x):
    """q~ . (W2 relu(W1 [k'_j ; E'[S]] + b1) + b2), the MLP on every pair's concatenation."""
    head, h, tape = x["head"], x["hidden"], x["tape"]
    B, T, _ = h.shape
    V = head.depth_feat.shape[0]
    S = tape.dense()
    idx = (S > 0).long() if head.binary else S.long().clamp(0, V - 1)
    cat = torch.cat([h, x["next"]], -1)
    qt = head.query(cat)
    pair = torch.cat([h[:, None].expand(B, T, T, -1), x["E2"][idx]], -1)  # [B, T, T, d_model + d_depth]
    W1 = torch.cat([head.key.weight, x["We"]], 1)
    mlp = F.linear(torch.relu(F.linear(pair, W1, head.key.bias)), head.out.weight, head.out.bias)
    reduce = torch.einsum("btw,btjw->btj", qt, mlp).float()
    reduce = reduce.masked_fill(~x["mask"], float("-inf"))
    shift = (qt * head.shift(cat)).sum(-1, keepdim=True).float()
    logits = torch.cat([reduce, shift], -1)
    loss = head.loss(logits, x["targets"])
    grads = torch.autograd.grad(loss, [h, x["We"], *head.parameters()], allow_unused=True)
    return logits, grads[0]


def _error(x, result):
    logits, dh = result
    ref_logits, ref_dh = x["ref"]
    finite = torch.isfinite(ref_logits)
    if not torch.equal(finite, torch.isfinite(logits)):
        return float("inf")
    errs = {"err_logits": rms_ratio(logits[finite], ref_logits[finite]), "err_dhidden": rms_ratio(dh, ref_dh)}
    return {"max_rms_rel_err": max(errs.values()), **errs}


_SHAPES = {
    # name: (B, T, d_model, width, V, binary)
    "dyck": (32, 128, 128, 256, 2, True),
    "english": (8, 128, 256, 512, 50, False),
}


@register_cases("attachment_scores")
def cases(device: str, quick: bool) -> list[Case]:
    out = []
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for kind, (B, T, d, w, V, binary) in _SHAPES.items():
        for threads in ((None, 1) if device == "cpu" else (None,)):
            tag = "" if threads is None else f" {threads} thread"
            out.append(Case(
                op="attachment_scores", name=f"head fwd+bwd {kind} {str(dtype)[6:]} B{B} T{T} d{d} W{w} V{V}{tag}", device=device,
                setup=_setup(kind, B, T, d, w, V, binary, dtype, device, threads),
                impls={"fastmodels": _ours, "factored_reference": _factored_reference, "authors_mlp": _authors},
                error=_error, error_name="max_rms_rel_err", quick=kind == "dyck" and threads is None,
                note="AttachmentHead loss fwd+bwd (all parameter and hidden-state gradients); authors_mlp: the per-pair MLP on [k'_j ; E'[S]] as in the authors' code",
            ))
    return out

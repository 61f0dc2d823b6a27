"""linear_cross_entropy_kl (NextLat's CE + d-horizon KL): forward + backward vs the full-logit
reference, eager and (on GPU) under torch.compile.

Inputs mirror NextLatHead at horizon d: N true rows (all with a target) and M = d * N predicted
rows, predicted row (i, t) taught by position (t + i) mod N, unit KL weights.
"""

from __future__ import annotations

import torch

from fastmodels.bench.harness import Case, register_cases
from fastmodels.ops.nextlat import linear_cross_entropy_kl, linear_cross_entropy_kl_reference


def _setup(N, D, V, d, dtype, device):
    def make():
        g = torch.Generator(device="cpu").manual_seed(0)
        hidden = torch.randn(N, D, generator=g).to(device, dtype)
        weight = (torch.randn(V, D, generator=g) / D**0.5).to(device, dtype)
        targets = torch.randint(0, V, (N,), generator=g).to(device)
        pos = torch.arange(N)
        teacher_index = torch.cat([(pos + i) % N for i in range(1, d + 1)]).to(device)
        pred = (hidden.float().cpu()[teacher_index.cpu()] + 0.3 * torch.randn(d * N, D, generator=g)).to(device, dtype)
        return {
            "hidden": hidden.requires_grad_(),
            "weight": weight.requires_grad_(),
            "targets": targets,
            "pred": pred.requires_grad_(),
            "teacher_index": teacher_index,
            "kl_weight": torch.ones(d * N, device=device),
            # per-row upstream gradients of the reduction="none" cases
            "u_ce": (torch.rand(N, generator=g) + 0.5).to(device),
            "u_kl": (torch.rand(d * N, generator=g) + 0.5).to(device),
        }

    return make


def _fwd_bwd(loss_fn):
    # autograd.grad, not .backward(): gradients left in .grad by the previous call would sit in the
    # memory baseline and be freed inside the measured call, hiding their size from the peak
    def run(x):
        ce, kl = loss_fn(x)
        grads = torch.autograd.grad(ce + kl, (x["hidden"], x["weight"], x["pred"]))
        return (ce.detach(), kl.detach(), *grads)

    return run


def _fwd_bwd_rows(loss_fn):
    """reduction="none": per-row losses, each with its own upstream gradient."""
    def run(x):
        ce, kl = loss_fn(x, "none")
        loss = (x["u_ce"] * ce).sum() + (x["u_kl"] * kl).sum()
        grads = torch.autograd.grad(loss, (x["hidden"], x["weight"], x["pred"]))
        return (ce.detach(), kl.detach(), *grads)

    return run


def _ours(x, reduction="mean"):
    return linear_cross_entropy_kl(x["hidden"], x["weight"], x["targets"], x["pred"], x["teacher_index"], kl_weight=x["kl_weight"], reduction=reduction)


def _reference(x, reduction="mean"):
    return linear_cross_entropy_kl_reference(x["hidden"], x["weight"], x["targets"], x["pred"], x["teacher_index"], None, x["kl_weight"], -100, reduction)


_compiled_reference = None


def _reference_compiled(x):
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(linear_cross_entropy_kl_reference)
    return _compiled_reference(x["hidden"], x["weight"], x["targets"], x["pred"], x["teacher_index"], None, x["kl_weight"], -100)


def _error(x, out, reference=_fwd_bwd(_reference)):
    """Worst RMS-relative error of (ce, kl, dhidden, dweight, dpred) against the fp32 reference
    (computed once per case, after the timed implementations' warm-up call)."""
    if "_ref" not in x:
        try:
            x["_ref"] = [t.clone() for t in reference(x)]
        except torch.cuda.OutOfMemoryError:  # the reference itself does not fit: no error figure
            torch.cuda.empty_cache()
            x["_ref"] = None
    if x["_ref"] is None:
        return float("nan")
    worst = 0.0
    for a, r in zip(out, x["_ref"]):
        a, r = a.double(), r.double()
        worst = max(worst, (torch.linalg.vector_norm(a - r) / torch.linalg.vector_norm(r).clamp_min(1e-30)).item())
    return worst


def _flops(N, D, V, d):
    # (3 + 2 d) N x D x V matmuls of 2 flops each for forward + backward (CE fwd, dh, dW; per
    # horizon: student logits and dpred); the teacher softmax is shared with the CE.
    return lambda x: 2.0 * (3 + 2 * d) * N * D * V


@register_cases("linear_cross_entropy_kl")
def cases(device: str, quick: bool) -> list[Case]:
    out = []
    if device == "cpu":
        for (N, D, V, d, q) in ((4096, 256, 32000, 1, False), (512, 128, 8000, 1, True)):
            out.append(Case(
                op="linear_cross_entropy_kl", name=f"N{N}_D{D}_V{V}_d{d}_fp32_fwdbwd", device=device,
                setup=_setup(N, D, V, d, torch.float32, device),
                impls={"fastmodels_cpu_chunked": _fwd_bwd(_ours), "reference_eager": _fwd_bwd(_reference)},
                error=_error, flops=_flops(N, D, V, d),
                # fp32 vs the fp32 reference: both carry fp32 rounding of V- and N-long sums. The quick
                # case fits one workspace chunk, so it has no memory target.
                targets={"time_ratio:reference_eager": 1.0, "rms_rel_err": 1e-4, **({} if q else {"mem_ratio:reference_eager": 10.0})},
                quick=q,
            ))
        N, D, V = 4096, 256, 32000
        out.append(Case(
            op="linear_cross_entropy_kl", name=f"N{N}_D{D}_V{V}_d1_fp32_fwdbwd_rows", device=device,
            setup=_setup(N, D, V, 1, torch.float32, device),
            impls={"fastmodels_cpu_chunked": _fwd_bwd_rows(_ours), "reference_eager": _fwd_bwd_rows(_reference)},
            error=lambda x, out: _error(x, out, _fwd_bwd_rows(_reference)), flops=_flops(N, D, V, 1),
            targets={"time_ratio:reference_eager": 1.0, "rms_rel_err": 1e-4, "mem_ratio:reference_eager": 10.0},
            note='reduction="none" with a different upstream gradient per row (the cpu backend recomputes the chunks in the backward)',
        ))
    elif device == "cuda":
        N, D, V = 8192, 768, 50257
        for d in (1, 4):
            out.append(Case(
                op="linear_cross_entropy_kl", name=f"N{N}_D{D}_V{V}_d{d}_bf16_fwdbwd", device=device,
                setup=_setup(N, D, V, d, torch.bfloat16, device),
                impls={"fastmodels_triton": _fwd_bwd(_ours), "reference_eager": _fwd_bwd(_reference)},
                error=_error, flops=_flops(N, D, V, d),
                targets={"time_ratio:reference_eager": 2.0, "mem_ratio:reference_eager": 10.0, "rms_rel_err": 2e-2},
            ))
        # The compiled reference last (its compile is the slowest step), at d = 1 only.
        out.append(Case(
            op="linear_cross_entropy_kl", name=f"N{N}_D{D}_V{V}_d1_bf16_fwdbwd_vs_compiled", device=device,
            setup=_setup(N, D, V, 1, torch.bfloat16, device),
            impls={"fastmodels_triton": _fwd_bwd(_ours), "reference_compiled": _fwd_bwd(_reference_compiled)},
            error=_error, flops=_flops(N, D, V, 1),
            note="the reference under torch.compile (default mode), same inputs as the d1 case",
        ))
    return out


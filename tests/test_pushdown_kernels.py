"""Direct tests of the pushdown-attention Triton launchers (kernels/pushdown.py) against a small
float64 PyTorch reference written here (gather form), independent of fastmodels.ops.

Ground truth for compact tapes comes from random binary trees: S(t, j) counts the spans [a, b] with
a <= j <= b <= t, computed straight from the spans (not from the compact formula the kernel uses).
"""

from __future__ import annotations

import random

import pytest
import torch

from fastmodels.testing import assert_rms_close, lowp_error_budget

pytestmark = pytest.mark.triton

kernels = pytest.importorskip("fastmodels.kernels.pushdown")

from fastmodels.pushdown import StackTape  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def depth_index(S: torch.Tensor, V: int, binary: bool) -> torch.Tensor:
    S = S.clamp(min=0)
    return ((S > 0).long() if binary else S.long()).clamp(max=V - 1)


def reference(q, k, v, emb, idx, scale):
    """Gather form: score = scale * (q.k + QE[t, idx(t, j)]), causal with queries at the end."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    qe = torch.einsum("bhtd,hvd->bhtv", q, emb)
    bias = torch.gather(qe, 3, idx[:, None].expand(B, H, Tq, Tk))
    s = scale * (q @ k.transpose(-1, -2) + bias)
    t = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    j = torch.arange(Tk, device=q.device)[None, :]
    s = s.masked_fill(j > t, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.softmax(s, dim=-1) @ v, lse


def random_spans(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """Spans of the binary nodes of a random binary tree over tokens [0, n)."""
    spans = []

    def build(a, b):
        if b - a < 1:
            return
        spans.append((a, b))
        m = rng.randint(a, b - 1)
        build(a, m)
        build(m + 1, b)

    build(0, n - 1)
    return spans


def random_tape(lengths, T, seed=0):
    """Compact (depth, boundary) [B, T] int32 and dense S [B, T, T] from random trees, padded."""
    rng = random.Random(seed)
    B = len(lengths)
    depth = torch.zeros(B, T, dtype=torch.int32)
    boundary = torch.zeros(B, T, dtype=torch.int32)
    S = torch.zeros(B, T, T, dtype=torch.int32)
    for b, n in enumerate(lengths):
        for a, e in random_spans(n, rng):
            depth[b, a : e + 1] += 1
            boundary[b, a:e] += 1  # boundaries k|k+1 with a <= k < e
            S[b, e:, a : e + 1] += 1  # closed once t >= e
    return depth, boundary, S


def test_grid_limits_are_a_clear_error():
    """The grids are (blocks, H, B): B or H above CUDA's 65535 on grid axes 1/2 is refused with a
    clear message instead of a launch failure ("invalid argument")."""
    q = torch.zeros(65536, 1, 1, 16)
    depth = torch.zeros(65536, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="B and heads H must each be <= 65535, got B=65536, H=1"):
        kernels.pushdown_attention_fwd(q, q, q, torch.zeros(1, 4, 16), depth, depth, None, 1.0, False)


def make_inputs(B, H, Tq, Tk, D, V, dtype, device, shared_emb=False):
    q = torch.randn(B, H, Tq, D, dtype=dtype, device=device)
    k = torch.randn(B, H, Tk, D, dtype=dtype, device=device)
    v = torch.randn(B, H, Tk, D, dtype=dtype, device=device)
    if shared_emb:
        emb = torch.randn(V, D, dtype=torch.float32, device=device)[None].expand(H, V, D)
    else:
        emb = torch.randn(H, V, D, dtype=torch.float32, device=device)
    return q, k, v, emb


def run_ref(q, k, v, emb, idx, scale, do=None):
    leaves = [t.detach().double().requires_grad_(do is not None) for t in (q, k, v, emb)]
    out, lse = reference(*leaves, idx.to(q.device), scale)
    if do is None:
        return out, lse
    out.backward(do.double())
    return out, lse, [t.grad for t in leaves]


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else None


# (B, H, Tq, Tk, D, V, binary): odd sizes, T = 1, 7, 33, decode shapes (Tq < Tk)
SHAPES = [
    (1, 1, 1, 1, 16, 2, False),
    (2, 3, 7, 7, 60, 5, False),
    (1, 3, 33, 33, 16, 50, False),
    (2, 1, 33, 33, 60, 5, True),
    (1, 3, 1, 33, 16, 5, False),
    (2, 1, 7, 40, 60, 50, False),
]


def dense_tape(B, Tq, Tk, V, device):
    """A random dense tape, 0 above the diagonal, values spanning 0..V+1 (so clamping is exercised)."""
    S = torch.randint(0, V + 2, (B, Tq, Tk), dtype=torch.int32)
    t = torch.arange(Tq)[:, None] + (Tk - Tq)
    S = S.masked_fill(torch.arange(Tk)[None, :] > t, 0)
    return S


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Tq{}Tk{}D{}V{}{}".format(*s[:6], "bin" if s[6] else ""))
@pytest.mark.parametrize("tape_dtype", [torch.int8, torch.int32])
def test_fwd_dense(shape, tape_dtype, device):
    B, H, Tq, Tk, D, V, binary = shape
    q, k, v, emb = make_inputs(B, H, Tq, Tk, D, V, torch.float32, device, shared_emb=(H == 3))
    S = dense_tape(B, Tq, Tk, V, device)
    scale = D**-0.5
    out, lse = kernels.pushdown_attention_fwd(q, k, v, emb, None, None, S.to(tape_dtype).to(device), scale, binary)
    ref_out, ref_lse = run_ref(q, k, v, emb, depth_index(S, V, binary), scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_rms_close(out, ref_out, 1e-5, "out")
    assert_rms_close(lse, ref_lse, 1e-6, "lse")


@pytest.mark.parametrize("T,lengths,V,binary", [(1, [1], 3, False), (7, [7, 4], 50, False), (33, [33, 20], 5, False),
                                                (40, [40], 4, False), (33, [29, 33], 2, True)])
def test_fwd_compact_matches_trees(T, lengths, V, binary, device):
    """In-kernel S from (depth, boundary) equals S counted from the trees' spans."""
    B, H, D = len(lengths), 2, 16
    depth, boundary, S = random_tape(lengths, T, seed=T)
    q, k, v, emb = make_inputs(B, H, T, T, D, V, torch.float32, device)
    scale = 0.3
    out, lse = kernels.pushdown_attention_fwd(q, k, v, emb, depth.to(device), boundary.to(device), None, scale, binary)
    out_d, lse_d = kernels.pushdown_attention_fwd(q, k, v, emb, None, None, S.to(device), scale, binary)
    ref_out, ref_lse = run_ref(q, k, v, emb, depth_index(S, V, binary), scale)
    assert_rms_close(out, ref_out, 1e-5, "out (compact)")
    assert_rms_close(lse, ref_lse, 1e-6, "lse (compact)")
    assert_rms_close(out, out_d, 1e-6, "compact vs dense")


def formula_tape(B, T, seed):
    """Arbitrary depth/boundary values (incl. a huge 'still open' marker) and S from the compact
    formula itself, S = max(0, D_j - min c): exercises every gap/prefix minimum of the kernels."""
    g = torch.Generator().manual_seed(seed)
    depth = torch.randint(0, 8, (B, T), dtype=torch.int32, generator=g)
    boundary = torch.randint(0, 8, (B, T), dtype=torch.int32, generator=g)
    boundary[:, -1] = 2**30
    boundary[-1, T // 3] = 2**30
    S = torch.zeros(B, T, T, dtype=torch.int64)
    for t in range(T):
        for j in range(t + 1):
            S[:, t, j] = depth[:, j] - boundary[:, j : t + 1].min(dim=1).values
    return depth, boundary, S


def test_fwd_compact_formula(device):
    B, H, T, D, V = 2, 1, 50, 16, 6
    depth, boundary, S = formula_tape(B, T, seed=1)
    q, k, v, emb = make_inputs(B, H, T, T, D, V, torch.float32, device)
    out, lse = kernels.pushdown_attention_fwd(q, k, v, emb, depth.to(device), boundary.to(device), None, 0.25, False)
    ref_out, ref_lse = run_ref(q, k, v, emb, depth_index(S, V, False), 0.25)
    assert_rms_close(out, ref_out, 1e-5, "out")
    assert_rms_close(lse, ref_lse, 1e-6, "lse")


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


def check_bwd(q, k, v, emb, depth, boundary, dense, idx, scale, binary, ratio):
    out, lse = kernels.pushdown_attention_fwd(q, k, v, emb, depth, boundary, dense, scale, binary)
    do = torch.randn_like(out)
    dq, dk, dv, demb = kernels.pushdown_attention_bwd(do, q, k, v, emb, depth, boundary, dense, out, lse, scale, binary)
    _, _, grads = run_ref(q, k, v, emb, idx, scale, do)
    assert dq.dtype == q.dtype and dk.dtype == k.dtype and dv.dtype == v.dtype and demb.dtype == torch.float32
    assert demb.shape == (emb.shape[0], emb.shape[1], emb.shape[2])
    for name, got, ref in zip(("dq", "dk", "dv", "demb"), (dq, dk, dv, demb), grads):
        assert_rms_close(got, ref, ratio, name)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Tq{}Tk{}D{}V{}{}".format(*s[:6], "bin" if s[6] else ""))
def test_bwd_dense(shape, device):
    B, H, Tq, Tk, D, V, binary = shape
    q, k, v, emb = make_inputs(B, H, Tq, Tk, D, V, torch.float32, device, shared_emb=(H == 3))
    S = dense_tape(B, Tq, Tk, V, device)
    check_bwd(q, k, v, emb, None, None, S.to(torch.int16).to(device), depth_index(S, V, binary), D**-0.5, binary, 1e-5)


@pytest.mark.parametrize("T,lengths,D,V,binary", [(1, [1], 16, 3, False), (7, [7, 5], 60, 50, False),
                                                  (33, [33, 18], 16, 5, False), (33, [33], 60, 2, True)])
def test_bwd_compact(T, lengths, D, V, binary, device):
    B, H = len(lengths), 2
    depth, boundary, S = random_tape(lengths, T, seed=100 + T)
    q, k, v, emb = make_inputs(B, H, T, T, D, V, torch.float32, device)
    check_bwd(q, k, v, emb, depth.to(device), boundary.to(device), None, depth_index(S, V, binary), 0.2, binary, 1e-5)


def test_bwd_compact_formula(device):
    B, H, T, D, V = 2, 1, 50, 16, 6
    depth, boundary, S = formula_tape(B, T, seed=2)
    q, k, v, emb = make_inputs(B, H, T, T, D, V, torch.float32, device)
    check_bwd(q, k, v, emb, depth.to(device), boundary.to(device), None, depth_index(S, V, False), 0.25, False, 1e-5)


# ---------------------------------------------------------------------------------------------
# Every GPU tile configuration, at a length with many tiles per program
# ---------------------------------------------------------------------------------------------


def _tile_configs():
    import triton

    out = [("fwd", triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)) for bm, bn, w, st in kernels.FWD_TILES]
    out += [("dkdv", triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)) for bm, bn, w, st in kernels.DKDV_TILES]
    out += [("dq", triton.Config({"BN": bn}, num_warps=w, num_stages=2)) for bn, w in kernels.DQ_TILES]
    return out


_KERNEL_OF = {"fwd": "pushdown_attention_fwd_kernel", "dkdv": "pushdown_attention_bwd_dkdv_kernel", "dq": "pushdown_attention_bwd_dq_kernel"}


@pytest.mark.parametrize("which,config", _tile_configs(), ids=lambda c: c if isinstance(c, str) else "-".join(f"{k}{v}" for k, v in c.kwargs.items()) + f"-w{c.num_warps}")
def test_every_tile_config(which, config, device, monkeypatch):
    """Each autotune configuration on its own (the autotuner picks per shape and machine, so a
    wrong one could hide behind the others): bf16 at T = 512, D = 64 on a GPU (the shape whose
    autotuned dq pass was wrong on an H200; every tile size sees both row-uniform and general full
    tiles there), fp32 at T = 200 under the interpreter. The dq pass uses its GPU row-block size
    (64) in both."""
    kernel = getattr(kernels, _KERNEL_OF[which])
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernels, "_DQ_BM", 64)
    gpu = device == "cuda"
    T, D, V, dtype = (512, 64, 50, torch.bfloat16) if gpu else (200, 16, 50, torch.float32)
    depth, boundary, S = random_tape([T, T - 77], T, seed=11)
    if gpu:  # the tape has row-uniform and general full tiles at this config's tile size
        share = StackTape(depth, boundary).row_uniform_fraction(config.kwargs.get("BM", 64), config.kwargs["BN"])
        assert 0 < share < 1, share
    q, k, v, emb = make_inputs(2, 2, T, T, D, V, dtype, device, shared_emb=True)
    idx = depth_index(S, V, False)
    scale = D**-0.5
    out, lse = kernels.pushdown_attention_fwd(q, k, v, emb, depth.to(device), boundary.to(device), None, scale, False)
    do = torch.randn_like(out)
    grads = kernels.pushdown_attention_bwd(do, q, k, v, emb, depth.to(device), boundary.to(device), None, out, lse, scale, False)
    ref_out, _, ref_grads = run_ref(q, k, v, emb, idx, scale, do)
    if dtype == torch.float32:
        for name, got, ref in zip(("out", "dq", "dk", "dv", "demb"), (out, *grads), (ref_out, *ref_grads)):
            assert_rms_close(got, ref, 1e-5, name)
        return
    lp = [t.detach().clone().requires_grad_(True) for t in (q, k, v, emb.to(dtype))]
    lp_out, _ = reference(*lp, idx.to(device), scale)
    lp_out.backward(do)
    for name, got, ref, pt in zip(("out", "dq", "dk", "dv", "demb"), (out, *grads), (ref_out, *ref_grads), (lp_out, *[t.grad for t in lp])):
        try:
            lowp_error_budget(got, ref, pt, floor=1e-3)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
        # PyTorch's own all-bf16 dE can be off by ~10% (sums with cancellation), so the budget
        # alone would let a broken histogram through: bf16 kernels reach ~3e-3 here.
        assert_rms_close(got, ref, 2e-2, name)


@pytest.mark.parametrize("mode", ["dots", "loop"])
@pytest.mark.parametrize("V", [2, 5, 50])
def test_histogram_forms(mode, V, device, monkeypatch):
    """The dq pass's depth histogram of full compact tiles, as tensor-core dots (default) or as the
    per-value loop (FASTMODELS_PUSHDOWN_HIST): both match the reference, with small V so that the
    clamp bucket V - 1 collects many entries, on a length with many full tiles."""
    monkeypatch.setenv("FASTMODELS_PUSHDOWN_HIST", mode)
    T = 160 if device == "cpu" else 700
    depth, boundary, S = random_tape([T, T - 50], T, seed=5)
    q, k, v, emb = make_inputs(2, 2, T, T, 16, V, torch.float32, device, shared_emb=True)
    check_bwd(q, k, v, emb, depth.to(device), boundary.to(device), None, depth_index(S, V, False), 0.25, False, 1e-5)


def test_histogram_mode_bad_value(device, monkeypatch):
    monkeypatch.setenv("FASTMODELS_PUSHDOWN_HIST", "magic")
    depth, boundary, S = random_tape([8], 8, seed=1)
    q, k, v, emb = make_inputs(1, 1, 8, 8, 16, 3, torch.float32, device)
    out, lse = kernels.pushdown_attention_fwd(q, k, v, emb, depth.to(device), boundary.to(device), None, 0.25, False)
    with pytest.raises(ValueError, match="FASTMODELS_PUSHDOWN_HIST"):
        kernels.pushdown_attention_bwd(torch.randn_like(out), q, k, v, emb, depth.to(device), boundary.to(device), None, out, lse, 0.25, False)


@pytest.mark.parametrize("mode", ["1", "0"])
@pytest.mark.parametrize("V,binary", [(50, False), (3, False), (2, True)])
def test_uniform_tiles(mode, V, binary, device, monkeypatch):
    """Full compact tiles whose S rows are all equal take a fast path in all three passes (the
    depth term as a dot with the gathered rows E[idx_j]; FASTMODELS_PUSHDOWN_UNIFORM=0 turns it
    off). On a tape with both kinds of full tile, forward and every gradient match the reference
    either way (small V: the clamp bucket collects many keys; shared and per-head tables)."""
    if device == "cuda" and mode == "0":
        pytest.skip("on a GPU every other compact-tape test runs the general path next to the fast one")
    monkeypatch.setenv("FASTMODELS_PUSHDOWN_UNIFORM", mode)
    T, D = (160, 16) if device == "cpu" else (700, 64)
    lengths = [T, T - 50]
    depth, boundary, S = random_tape(lengths, T, seed=5)
    tile = 16 if device == "cpu" else 64
    share = StackTape(depth, boundary).row_uniform_fraction(tile, tile)  # tested in test_pushdown_tape.py
    assert 0 < share < 1, share
    q, k, v, emb = make_inputs(2, 2, T, T, D, V, torch.float32, device, shared_emb=V != 3)  # V=3: per-head table
    idx = depth_index(S, V, binary)
    depth, boundary = depth.to(device), boundary.to(device)
    out, lse = kernels.pushdown_attention_fwd(q, k, v, emb, depth, boundary, None, 0.25, binary)
    ref_out, ref_lse = run_ref(q, k, v, emb, idx, 0.25)
    assert_rms_close(out, ref_out, 1e-5, "out")
    assert_rms_close(lse, ref_lse, 1e-5, "lse")
    check_bwd(q, k, v, emb, depth, boundary, None, idx, 0.25, binary, 1e-5)


def test_uniform_mode_bad_value(device, monkeypatch):
    monkeypatch.setenv("FASTMODELS_PUSHDOWN_UNIFORM", "yes")
    depth, boundary, S = random_tape([8], 8, seed=1)
    q, k, v, emb = make_inputs(1, 1, 8, 8, 16, 3, torch.float32, device)
    with pytest.raises(ValueError, match="FASTMODELS_PUSHDOWN_UNIFORM"):
        kernels.pushdown_attention_fwd(q, k, v, emb, depth.to(device), boundary.to(device), None, 0.25, False)


# ---------------------------------------------------------------------------------------------
# Low precision: error vs float64 within 2x of PyTorch's own error in the same dtype
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("compact", [True, False], ids=["compact", "dense"])
def test_lowp(dtype, compact, device):
    B, H, T, D, V = 2, 2, 33, 60, 9
    depth, boundary, S = random_tape([33, 21], T, seed=7)
    q, k, v, emb = make_inputs(B, H, T, T, D, V, dtype, device)
    tape = (depth.to(device), boundary.to(device), None) if compact else (None, None, S.to(device))
    idx = depth_index(S, V, False)
    scale = D**-0.5
    out, lse = kernels.pushdown_attention_fwd(q, k, v, emb, *tape, scale, False)
    do = torch.randn_like(out)
    grads = kernels.pushdown_attention_bwd(do, q, k, v, emb, *tape, out, lse, scale, False)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads[:3])
    ref_out, _, ref_grads = run_ref(q, k, v, emb, idx, scale, do)
    # PyTorch in the same low precision (on CPU: float32 math on rounded inputs would be too kind,
    # so run the reference itself in the low-precision dtype)
    lp = [t.detach().clone().requires_grad_(True) for t in (q, k, v, emb.to(dtype))]
    lp_out, _ = reference(*lp, idx.to(device), scale)
    lp_out.backward(do)
    lowp_error_budget(out, ref_out, lp_out, floor=1e-3)
    for name, got, ref, pt in zip(("dq", "dk", "dv", "demb"), grads, ref_grads, [t.grad for t in lp]):
        try:
            lowp_error_budget(got, ref, pt, floor=1e-3)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_bad_layout(device):
    q, k, v, emb = make_inputs(1, 1, 8, 4, 16, 3, torch.float32, device)
    with pytest.raises(ValueError, match="Tq"):
        kernels.pushdown_attention_fwd(q, k, v, emb, None, None, torch.zeros(1, 8, 4, dtype=torch.int32, device=device), 1.0, False)
    q, k, v, emb = make_inputs(1, 1, 4, 8, 16, 3, torch.float32, device)
    z = torch.zeros(1, 8, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="compact"):
        kernels.pushdown_attention_fwd(q, k, v, emb, z, z, None, 1.0, False)


def test_emb_dtype_and_strides(device):
    """A bf16 table, and a non-contiguous [H, V, D] view (transposed storage), with fp32 q/k/v."""
    B, H, T, D, V = 2, 2, 9, 16, 5
    q, k, v, _ = make_inputs(B, H, T, T, D, V, torch.float32, device)
    emb = torch.randn(V, H, D, device=device).to(torch.bfloat16).transpose(0, 1)
    depth, boundary, S = random_tape([9, 6], T, seed=3)
    check_bwd(q, k, v, emb, depth.to(device), boundary.to(device), None, depth_index(S, V, False), 0.5, False, 1e-5)


@pytest.mark.parametrize("Tq,Tk", [(0, 0), (0, 5)])
def test_empty(Tq, Tk, device):
    q = torch.randn(1, 2, Tq, 16, device=device)
    k = torch.randn(1, 2, Tk, 16, device=device)
    v = torch.randn(1, 2, Tk, 16, device=device)
    emb = torch.randn(2, 3, 16, device=device)
    S = torch.zeros(1, Tq, Tk, dtype=torch.int32, device=device)
    out, lse = kernels.pushdown_attention_fwd(q, k, v, emb, None, None, S, 1.0, False)
    assert out.shape == q.shape and lse.shape == (1, 2, Tq)
    dq, dk, dv, demb = kernels.pushdown_attention_bwd(torch.randn_like(out), q, k, v, emb, None, None, S, out, lse, 1.0, False)
    assert dq.shape == q.shape and demb.shape == emb.shape
    assert (dk == 0).all() and (dv == 0).all() and (demb == 0).all()


def test_fp32_dot_precision_follows_torch_float32_matmul_setting():
    """fp32 inputs with D <= 64: 3xTF32 tensor-core dots under torch's default "highest"
    (fp32-level error; the "ieee" FMA dots spilled tens of KB per thread on sm_90), one TF32
    product once torch allows it; D > 64 keeps "ieee" (the fp32 tensor-core tiles overflow sm_90's
    shared memory there). The launch parameters carry the choice."""
    old = torch.get_float32_matmul_precision()
    tape = (torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 4, dtype=torch.int32), None)

    def prec(D, dtype=torch.float32):
        q = torch.zeros(1, 1, 4, D, dtype=dtype)
        return kernels._common(q, q, torch.zeros(1, 3, D, dtype=dtype), *tape, False)[-1]["PREC"]

    try:
        for setting, want in (("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert prec(16) == prec(64) == want
            assert prec(65) == prec(128) == "ieee"
            assert prec(64, torch.bfloat16) == "tf32"  # bf16 operands: native bf16 dots either way
    finally:
        torch.set_float32_matmul_precision(old)


def test_dq_probe_is_exact_where_the_kernels_are(device, tmp_path, monkeypatch):
    """bench/pushdown_dq_probe.py (the next GPU run's diagnostic of the dq fault) runs and, where
    the kernels are right (the interpreter), reports rounding-level errors for every case; the
    reports cover every case."""
    from fastmodels.bench import pushdown_dq_probe

    T, D = (24, 16) if device == "cpu" else (512, 64)
    rows = pushdown_dq_probe.probe(device, T=T, D=D)
    assert len(rows) == 2 * 2 * 7
    for r in rows:
        tol = 2e-2 if r["dtype"] == "bfloat16" else 1e-5
        for key, e in r["errors"].items():
            assert e <= tol, (r["case"], r["dtype"], r["uniform"], key, e)

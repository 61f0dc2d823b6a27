"""randomized_svd & co. against torch.linalg.svd in float64: the issue's accuracy contract
(LLM-like spectra, aspects 1:1 and 1:2.7, k/min in {0.01, 0.1, 0.4}), edge cases, batching,
lists, seeds, torch.svd_lowrank semantics, low_rank, singular-value gradients, intruder
dimensions, bad inputs. Triton/CUDA backends at tiny shapes at the end."""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
from helpers import DEVICE, op_backends, pick

from fastmodels.ops import intruder_dimensions, low_rank, randomized_svd, singular_value_grads
from fastmodels.ops.rsvd import default_oversample_niter

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Test matrices (built in float64 with a known spectrum, cached per shape)
# ---------------------------------------------------------------------------------------------


def _haar(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, dtype=F64, generator=g))
    return q * torch.sign(torch.diagonal(r))


@lru_cache(maxsize=None)
def spectrum_matrix(kind: str, m: int, n: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    """[b, m, n] float64: "power" sigma_i = i^-0.3; "mp" Marchenko-Pastur bulk + 5 spikes;
    "deficient" rank 3; "kappa" sigma geometric from 1 to 1e-10."""
    g = torch.Generator().manual_seed(seed * 7919 + m * 31 + n)
    s = min(m, n)
    out = []
    for _ in range(b):
        U, V = _haar(m, s, g), _haar(n, s, g)
        if kind == "power":
            sig = torch.arange(1, s + 1, dtype=F64) ** -0.3
        elif kind == "kappa":
            sig = torch.logspace(0, -10, s, dtype=F64)
        elif kind == "deficient":
            sig = torch.zeros(s, dtype=F64)
            sig[:3] = torch.tensor([3.0, 2.0, 1.0], dtype=F64)
        elif kind == "mp":
            bulk = torch.randn(m, n, dtype=F64, generator=g) / math.sqrt(max(m, n))
            spikes = (U[:, :5] * torch.tensor([8.0, 6.0, 5.0, 4.0, 3.0], dtype=F64)) @ V[:, :5].T
            out.append(bulk + spikes)
            continue
        else:
            raise ValueError(kind)
        out.append((U * sig) @ V.T)
    return torch.stack(out)


def residual_ratio(A: torch.Tensor, U, S, V, k: int) -> torch.Tensor:
    """||A - U S V^T||_F / ||A - A_k||_F per matrix (A_k from torch.linalg.svd in float64)."""
    A = A.to(F64).cpu()
    sv = torch.linalg.svdvals(A)
    opt = sv[..., k:].square().sum(-1).sqrt()
    rec = (U.to(F64).cpu() * S.to(F64).cpu()[..., None, :]) @ V.to(F64).cpu().mT
    return torch.linalg.matrix_norm(A - rec) / opt


def orth_defect(U: torch.Tensor) -> float:
    U = U.to(F64).cpu()
    eye = torch.eye(U.shape[-1], dtype=F64)
    return (U.mT @ U - eye).abs().max().item()


def sin_max_angle(U: torch.Tensor, W: torch.Tensor) -> float:
    """Sine of the largest principal angle between the column spaces of U and W (orthonormal)."""
    c = torch.linalg.svdvals(U.to(F64).cpu().mT @ W.to(F64).cpu())
    return math.sqrt(max(0.0, 1.0 - c.min().item() ** 2))


def check_svd_shapes(res, A_shape, k: int, dtype) -> None:
    *batch, m, n = A_shape
    assert res.U.shape == (*batch, m, k) and res.S.shape == (*batch, k) and res.V.shape == (*batch, n, k)
    for name in ("U", "S", "V"):
        t = getattr(res, name)
        assert t.dtype == dtype, f"{name} dtype {t.dtype}, expected {dtype}"
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"
    assert (res.S[..., :-1] >= res.S[..., 1:]).all(), "S not descending"
    assert (res.S >= 0).all()


ASPECTS = [(96, 96), (96, 260), (260, 96)]
FRACTIONS = [0.01, 0.1, 0.4]


def rank_of(frac: float, m: int, n: int) -> int:
    return max(1, round(frac * min(m, n)))


# ---------------------------------------------------------------------------------------------
# Accuracy contract (reference backend)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tf32_gemms(monkeypatch):
    """torch's GEMM entry points with every fp32 operand rounded to TF32 first, as the GPU's fp32
    GEMMs run after ``torch.backends.cuda.matmul.allow_tf32 = True``; yields the list of
    intercepted fp32 GEMMs (a fixture that intercepts nothing checks nothing)."""
    from fastmodels.bench.tf32x3_emulation import tf32

    seen = []

    def rounding(fn):
        def gemm(*args, **kwargs):
            if any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args[:2]):
                seen.append(fn.__name__)
                args = tuple(tf32(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a for a in args)
            return fn(*args, **kwargs)

        return gemm

    for owner, name in ((torch, "matmul"), (torch, "bmm"), (torch, "mm"), (torch.Tensor, "__matmul__"),
                        (torch.Tensor, "matmul"), (torch.Tensor, "bmm"), (torch.Tensor, "mm")):
        monkeypatch.setattr(owner, name, rounding(getattr(owner, name)))
    return seen


@pytest.mark.parametrize("gemms", ["ieee", "tf32"])
@pytest.mark.parametrize("kind", ["power", "mp"])
@pytest.mark.parametrize("shape", ASPECTS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("frac", FRACTIONS)
def test_accurate_contract_fp32(kind, shape, frac, gemms, device, request):
    """The contract for fp32 input, also with TF32 GEMMs (emulated on the CPU: users who turn TF32
    on for training get it in their analysis calls too)."""
    m, n = shape
    k = rank_of(frac, m, n)
    A = spectrum_matrix(kind, m, n).to(device, torch.float32)
    rounded = request.getfixturevalue("tf32_gemms") if gemms == "tf32" else None
    res = randomized_svd(A, k, seed=3)
    if rounded is not None and k < 0.25 * min(m, n):  # larger ranks take the exact (float64 Gram) route
        assert rounded, "no fp32 GEMM was intercepted"
    check_svd_shapes(res, A.shape, k, torch.float32)
    ratio = residual_ratio(A, *res, k)
    assert ratio.max().item() <= 1.01, f"residual {ratio.tolist()} x optimal"
    assert orth_defect(res.U) <= 1e-5
    assert orth_defect(res.V) <= 1e-5
    # Ritz values never exceed the true singular values (in exact arithmetic; TF32 GEMMs perturb
    # them by up to TF32's unit roundoff 2^-11: 1.3e-4 at most in these cases); the leading one is close.
    sv = torch.linalg.svdvals(A.to(F64).cpu())[..., :k]
    over = (res.S.to(F64).cpu() - sv) / sv
    assert (over <= (1e-5 if gemms == "ieee" else 2**-11) + 1e-6 / sv).all(), f"S above the true values by {over.max().item():.1e}"
    assert (res.S[..., 0].to(F64).cpu() >= 0.995 * sv[..., 0]).all()


@pytest.mark.parametrize("kind", ["power", "mp"])
@pytest.mark.parametrize("frac", [0.01, 0.1])
def test_accurate_contract_fp64(kind, frac, device):
    m, n = 96, 260
    k = rank_of(frac, m, n)
    A = spectrum_matrix(kind, m, n).to(device)
    res = randomized_svd(A, k, seed=5)
    check_svd_shapes(res, A.shape, k, F64)
    assert residual_ratio(A, *res, k).max().item() <= 1.01
    assert orth_defect(res.U) <= 1e-12 and orth_defect(res.V) <= 1e-12


@pytest.mark.parametrize("shape", [(96, 260), (260, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_leading_subspace_principal_angles(shape, device):
    # Five spikes (8..3) above a Marchenko-Pastur bulk (edge ~1.6): a gap at k = 5.
    m, n = shape
    A = spectrum_matrix("mp", m, n).to(device, torch.float32)
    U0, _, V0h = torch.linalg.svd(A.to(F64).cpu())
    res = randomized_svd(A, 5, seed=11)
    # Subspace error ~ (sigma_{l+1} / sigma_k)^(2q+1) with q = 3, l = k + 10, bulk
    # sigma_{l+1} ~ 1.5: (1.5/3)^7 = 8e-3. (torch_lowrank, l = k, misses the 5th spike.)
    tol = 1e-2
    for i in range(A.shape[0]):
        assert sin_max_angle(res.U[i], U0[i, :, :5]) <= tol
        assert sin_max_angle(res.V[i], V0h[i, :5].mT) <= tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype, device):
    m, n, k = 96, 260, 10
    A = spectrum_matrix("power", m, n).to(device, dtype)
    res = randomized_svd(A, k, seed=1)
    check_svd_shapes(res, A.shape, k, torch.float32)
    # Against the exact truncation of the low-precision matrix itself.
    assert residual_ratio(A, *res, k).max().item() <= 1.01
    assert orth_defect(res.U) <= 1e-5 and orth_defect(res.V) <= 1e-5


def test_exact_route_matches_full_svd(device):
    m, n, k = 96, 260, 60  # k > 0.25 min(m, n)
    A = spectrum_matrix("power", m, n).to(device)
    res = randomized_svd(A, k)
    U0, S0, V0h = torch.linalg.svd(A.cpu())
    torch.testing.assert_close(res.S.cpu(), S0[..., :k], rtol=1e-10, atol=1e-12)
    assert residual_ratio(A, *res, k).max().item() <= 1 + 1e-10
    # The exact route is deterministic: no dependence on the seed.
    res2 = randomized_svd(A, k, seed=123)
    torch.testing.assert_close(res2.U, res.U, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Edge cases: no NaN, no error
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 10, 40])
def test_rank_deficient(k, device):
    A = spectrum_matrix("deficient", 96, 260).to(device, torch.float32)
    res = randomized_svd(A, k, seed=2)
    check_svd_shapes(res, A.shape, k, torch.float32)
    assert orth_defect(res.U) <= 1e-5 and orth_defect(res.V) <= 1e-5
    rec = (res.U * res.S[..., None, :]) @ res.V.mT
    if k >= 3:
        assert torch.linalg.matrix_norm(rec.cpu().double() - A.cpu().double()).max() <= 1e-5
    torch.testing.assert_close(res.S[..., :min(k, 3)].cpu().double(), torch.tensor([3.0, 2.0, 1.0], dtype=F64)[:min(k, 3)].expand(2, -1), rtol=1e-5, atol=1e-5)
    assert (res.S[..., 3:] <= 1e-5).all()


@pytest.mark.parametrize("method", ["accurate", "torch_lowrank"])
@pytest.mark.parametrize("k", [1, 5, 30])
def test_all_zero(k, method, device):
    A = torch.zeros(3, 40, 70, device=device)
    res = randomized_svd(A, k, method=method, seed=0)
    check_svd_shapes(res, A.shape, k, torch.float32)
    assert (res.S == 0).all()
    assert orth_defect(res.U) <= 1e-5 and orth_defect(res.V) <= 1e-5


@pytest.mark.parametrize("shape", [(1, 50), (50, 1), (1, 1)])
def test_single_row_or_column(shape, device):
    A = torch.randn(2, *shape, device=device)
    res = randomized_svd(A, 1, seed=0)
    check_svd_shapes(res, A.shape, 1, torch.float32)
    torch.testing.assert_close(res.S[:, 0], torch.linalg.vector_norm(A, dim=(-2, -1)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((res.U * res.S[..., None, :]) @ res.V.mT, A, rtol=1e-5, atol=1e-6)
    assert (torch.abs(res.U).amax(dim=-2) == res.U.amax(dim=-2)).all()  # sign convention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["accurate", "torch_lowrank"])
@pytest.mark.parametrize("k", [3, 10, 40, 90])  # 90 of 96: the exact route's whole-basis case
def test_ill_conditioned(dtype, method, k, device):
    A = spectrum_matrix("kappa", 96, 260).to(device, dtype)
    res = randomized_svd(A, k, method=method, seed=4)
    check_svd_shapes(res, A.shape, k, dtype)
    # the contract's 1e-5 in fp32; a float64 computation is held to float64 (it measures ~1e-15,
    # so a path that silently dropped to fp32 would fail)
    tol, floor = (1e-5, 1e-5) if dtype == torch.float32 else (1e-12, 1e-12)
    assert orth_defect(res.U) <= tol and orth_defect(res.V) <= tol
    sv = torch.linalg.svdvals(A.to(F64).cpu())
    rec = (res.U.to(F64) * res.S.to(F64)[..., None, :]) @ res.V.to(F64).mT
    err = torch.linalg.matrix_norm(rec.cpu() - A.to(F64).cpu())
    opt = sv[..., k:].square().sum(-1).sqrt()
    if method == "accurate":
        # The leading singular values are resolved; the residual is near-optimal down to the
        # working precision's floor.
        torch.testing.assert_close(res.S[..., :3].to(F64).cpu(), sv[..., :3], rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=floor / 10)
        assert (err <= 1.01 * opt + floor).all()
    else:  # no oversampling, 2 passes on a slowly decaying spectrum: only a sane residual
        assert (err <= 3 * opt + floor).all()


def test_empty_batch(device):
    res = randomized_svd(torch.zeros(0, 8, 12, device=device), 3)
    assert res.U.shape == (0, 8, 3) and res.S.shape == (0, 3) and res.V.shape == (0, 12, 3)


# ---------------------------------------------------------------------------------------------
# Determinism, batching, lists
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_result_and_sign_convention(device):
    A = spectrum_matrix("power", 96, 260).to(device, torch.float32)
    r1 = randomized_svd(A, 10, seed=7)
    r2 = randomized_svd(A, 10, seed=7)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)
    r3 = randomized_svd(A, 10, seed=8)
    assert not torch.equal(r1.U, r3.U)  # a different sketch
    # Global-RNG default seed: reproducible under torch.manual_seed.
    torch.manual_seed(1)
    r4 = randomized_svd(A, 10)
    torch.manual_seed(1)
    r5 = randomized_svd(A, 10)
    assert torch.equal(r4.U, r5.U)
    # Largest-magnitude entry of every u_i is positive.
    idx = r1.U.abs().argmax(dim=-2, keepdim=True)
    assert (torch.gather(r1.U, -2, idx) > 0).all()


@pytest.mark.parametrize("method", ["accurate", "torch_lowrank"])
def test_batched_equals_looped(method, device):
    A = spectrum_matrix("mp", 96, 260, b=4).to(device, torch.float32).reshape(2, 2, 96, 260)
    k = 5
    res = randomized_svd(A, k, method=method, seed=9)
    assert res.U.shape == (2, 2, 96, k)
    # Matrix i of a batch gets the sketch of (seed, i): index 0 matches a lone call exactly...
    lone = randomized_svd(A[0, 0], k, method=method, seed=9)
    for a, b in zip(res, lone):
        torch.testing.assert_close(a[0, 0], b, rtol=1e-5, atol=1e-6)
    # ...and every matrix gets the same rank-k approximation as a lone call (gap at k = 5).
    tol = 1e-2 if method == "accurate" else 2e-1  # see the principal-angle test
    for i in range(2):
        for j in range(2):
            one = randomized_svd(A[i, j], k, method=method, seed=9)
            rec_b = (res.U[i, j] * res.S[i, j]) @ res.V[i, j].mT
            rec_1 = (one.U * one.S) @ one.V.mT
            assert torch.linalg.matrix_norm(rec_b - rec_1) <= tol * torch.linalg.matrix_norm(rec_1)
            torch.testing.assert_close(res.S[i, j], one.S, rtol=tol, atol=0)


def test_list_equals_separate_calls(device):
    base = spectrum_matrix("mp", 96, 260, b=2).to(device, torch.float32)
    mats = [base[0], spectrum_matrix("mp", 40, 30, b=1)[0].to(device, torch.float32), base[1], base[0].to(torch.bfloat16), spectrum_matrix("mp", 30, 40, b=1)[0].to(device)]
    k = 5
    out = randomized_svd(mats, k, seed=21)
    assert isinstance(out, list) and len(out) == len(mats)
    for M, res in zip(mats, out):
        dt = F64 if M.dtype == F64 else torch.float32
        check_svd_shapes(res, M.shape, k, dt)
        one = randomized_svd(M, k, seed=21)
        rec_l = (res.U * res.S) @ res.V.mT
        rec_1 = (one.U * one.S) @ one.V.mT
        assert torch.linalg.matrix_norm((rec_l - rec_1).double()) <= 1e-2 * torch.linalg.matrix_norm(rec_1.double())
    # The first matrix of each shape bucket gets the sketch of a lone call: identical results.
    for i in (0, 1, 3, 4):
        one = randomized_svd(mats[i], k, seed=21)
        for a, b in zip(out[i], one):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Same-shape items equal the stacked batched call.
    stacked = randomized_svd(torch.stack([mats[0], mats[2]]), k, seed=21)
    torch.testing.assert_close(out[2].U, stacked.U[1], rtol=1e-5, atol=1e-6)
    assert randomized_svd([], 3) == []
    # One rank per matrix (LASER's rho of each matrix's max rank): buckets split by rank, so here
    # (same-shape items 0 and 2 at different ranks) every matrix is the first of its bucket and
    # equals a lone call at its rank.
    ranks = [7, 3, 4, 2, 6]
    out = randomized_svd(mats, ranks, seed=21)
    for M, res, k in zip(mats, out, ranks):
        check_svd_shapes(res, M.shape, k, F64 if M.dtype == F64 else torch.float32)
        for a, b in zip(res, randomized_svd(M, k, seed=21)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"rank: expected an int or one int per matrix \(5\)"):
        randomized_svd(mats, [3, 3])
    with pytest.raises(ValueError, match=r"rank\[1\]: expected an int <= min\(m, n\) = 30"):
        randomized_svd(mats, [3, 31, 3, 3, 3])


@pytest.mark.parametrize("cond", [1e2, 1e3, 1e4, 1e6, 1e8])
def test_fp32_orthonormalization_checks_every_basis(cond):
    """The torch_lowrank mode's fp32 CPU path orthonormalizes with an fp32 Gram, whose Cholesky
    can succeed with garbage once cond(Y)^2 passes fp32's range (at cond 1e4 a single pass leaves
    Q^T Q - I at ~2): every basis is checked, so a basis between power passes is well
    conditioned (defect <= 0.5), a final one orthonormal (1e-5), and both span Y."""
    from fastmodels.ops.rsvd import _orth

    g = torch.Generator().manual_seed(int(math.log10(cond)))
    Ys = []
    for _ in range(4):
        U = torch.linalg.qr(torch.randn(300, 20, generator=g, dtype=F64)).Q
        V = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=F64)).Q
        Ys.append((U * torch.logspace(0, -math.log10(cond), 20, dtype=F64)) @ V.T)
    Y = torch.stack(Ys).float()
    for passes, tol in ((1, 0.5), (2, 1e-5)):
        Q = _orth(Y, passes=passes, dtype=torch.float32)
        assert Q.dtype == torch.float32
        assert orth_defect(Q) <= tol, passes
        # span: Y's leading directions (those above fp32's resolution) lie in range(Q)
        Qo = torch.linalg.qr(Q.double()).Q
        resid = torch.linalg.matrix_norm(Y.double() - Qo @ (Qo.mT @ Y.double())) / torch.linalg.matrix_norm(Y.double())
        assert (resid <= 1e-4).all(), (passes, resid)


@pytest.mark.parametrize("m, n, k", [(96, 260, 10), (260, 96, 10), (90, 200, 60), (200, 90, 60)])
def test_torch_lowrank_matches_torch_statistically(m, n, k):
    # Same algorithm as torch.svd_lowrank(A, q=k, niter=2): the mean excess residual over seeds
    # agrees with torch's, and is well above the accurate mode's. k = 60 of 90 takes the CPU
    # path for a basis of more than half the short side (Householder QR, fp32 SVD of B^T).
    A = spectrum_matrix("power", m, n, b=1)[0].to(torch.float32)
    ours, theirs = [], []
    for seed in range(12):
        r = randomized_svd(A, k, method="torch_lowrank", seed=seed)
        ours.append(residual_ratio(A, *r, k).item() - 1)
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(A, q=k, niter=2)
        theirs.append(residual_ratio(A, U, S, V, k).item() - 1)
    mo, mt = sum(ours) / len(ours), sum(theirs) / len(theirs)
    assert abs(mo - mt) <= 0.25 * mt, (mo, mt)
    acc = residual_ratio(A, *randomized_svd(A, k, seed=0), k).item() - 1
    assert acc < 0.5 * mt
    # n_iter and oversample are honoured: more iterations -> smaller residual on average.
    more = [residual_ratio(A, *randomized_svd(A, k, method="torch_lowrank", n_iter=6, seed=s), k).item() - 1 for s in range(4)]
    assert sum(more) / 4 < mo


def test_torch_lowrank_wide_basis_path_on_degenerate_inputs():
    """The CPU torch_lowrank path for l > s / 2 (Householder QR, fp32 SVD of B^T): orthonormal
    factors, sorted non-negative S, exact reconstruction of a matrix of rank < k, and zeros for a
    zero matrix (torch's QR completes any basis)."""
    g = torch.Generator().manual_seed(5)
    low = torch.randn(70, 4, generator=g) @ torch.randn(4, 40, generator=g)  # rank 4
    full = torch.randn(70, 40, generator=g)
    A = torch.stack([low, torch.zeros(70, 40), full])
    for X in (A, A.mT):
        U, S, V = randomized_svd(X, 30, method="torch_lowrank", seed=3)
        assert U.dtype == torch.float32 and U.shape == (3, X.shape[1], 30) and V.shape == (3, X.shape[2], 30)
        assert orth_defect(U) <= 1e-5 and orth_defect(V) <= 1e-5
        assert (S >= 0).all() and (S[:, :-1] >= S[:, 1:]).all()
        R = (U * S[:, None]) @ V.mT
        torch.testing.assert_close(R[0], X[0], rtol=0, atol=1e-4)  # rank 4 < k: exact
        assert S[1].abs().max() == 0 and R[1].abs().max() == 0
        assert residual_ratio(X[2], U[2], S[2], V[2], 30) < 1.2


# ---------------------------------------------------------------------------------------------
# low_rank, singular_value_grads, intruder_dimensions
# ---------------------------------------------------------------------------------------------


def test_low_rank_many_ranks_one_factorization(device):
    A = spectrum_matrix("mp", 96, 260).to(device, torch.bfloat16)
    ranks = [1, 5, 20]
    outs = low_rank(A, ranks, seed=0)
    svd = randomized_svd(A, 20, seed=0)
    assert len(outs) == 3
    for r, W in zip(ranks, outs):
        assert W.dtype == torch.bfloat16 and W.shape == A.shape
        ref = (svd.U[..., :r] * svd.S[..., None, :r]) @ svd.V[..., :r].mT
        torch.testing.assert_close(W.float(), ref.to(torch.bfloat16).float(), rtol=0, atol=0)
    single = low_rank(A, 5, svd=svd)
    assert torch.equal(single, outs[1])
    # rank 5 sits at the spectral gap: close to the exact truncation.
    U0, S0, V0h = torch.linalg.svd(A.to(F64).cpu())
    A5 = (U0[..., :5] * S0[..., None, :5]) @ V0h[..., :5, :]
    assert (torch.linalg.matrix_norm(single.cpu().double() - A5) <= 1e-2 * torch.linalg.matrix_norm(A5)).all()
    with pytest.raises(ValueError, match="svd"):
        low_rank(A, [30], svd=svd)
    with pytest.raises(ValueError, match="ranks"):
        low_rank(A, [])
    # a factorization of another matrix, or not a factorization at all
    with pytest.raises(ValueError, match=r"svd\.U: expected shape"):
        low_rank(A, 5, svd=randomized_svd(A[..., :-1, :], 20, seed=0))
    with pytest.raises(ValueError, match=r"svd\.U: expected shape"):
        low_rank(A, 5, svd=randomized_svd(A[:1], 20, seed=0))
    with pytest.raises(TypeError, match="svd: expected an SVDResult"):
        low_rank(A, 5, svd=(1, 2, 3))


def test_singular_value_grads_match_autograd(device):
    torch.manual_seed(0)
    W = torch.randn(3, 20, 33, dtype=F64, device=device)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    V = Vh.mT
    T = torch.randn(3, 20, 33, dtype=F64, device=device)

    def loss(M):
        return (torch.tanh(M) * T).sum()

    Wr = W.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(loss(Wr), Wr)
    Sr = S.clone().requires_grad_(True)
    (dS,) = torch.autograd.grad(loss((U * Sr[..., None, :]) @ V.mT), Sr)
    got = singular_value_grads(U[..., :7], S[..., :7], V[..., :7], G)
    assert got.shape == (3, 7) and got.dtype == F64
    torch.testing.assert_close(got, dS[..., :7], rtol=1e-10, atol=1e-12)
    # float32 factors with a bf16 gradient: float32 result, close to the float64 one.
    g32 = singular_value_grads(U.float(), S.float(), V.float(), G.to(torch.bfloat16))
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), dS, rtol=0, atol=5e-2 * dS.abs().max().item())
    with pytest.raises(ValueError, match="G: expected shape"):
        singular_value_grads(U, S, V, G[..., :5])


def _intruder_setup(device, m=64, n=96):
    g = torch.Generator().manual_seed(5)
    Ub, Vb = _haar(m, m, g), _haar(n, m, g)
    sig = 0.8 ** torch.arange(m, dtype=F64)  # separated singular values
    W = ((Ub * sig) @ Vb.T).to(device)
    b = torch.randn(m, 2, dtype=F64, generator=g)
    a = torch.randn(2, n, dtype=F64, generator=g)
    return W, b.to(device), a.to(device)


def _intruders_exact(W_base, W_tuned, k, eps):
    Xb = torch.linalg.svd(W_base, full_matrices=False).U
    Y = torch.linalg.svd(W_tuned, full_matrices=False).U[:, :k]
    max_cos = (Xb.mT @ Y).abs().amax(dim=0)
    return max_cos


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_intruder_dimensions_lora_and_dense(dtype, device):
    W, B, A = _intruder_setup(device)
    scale = 2.0  # B A has singular values ~ 2 * 10 >> sigma_1(W) = 1: two intruding directions
    W_t = W + scale * B @ A
    exact = _intruders_exact(W, W_t, 10, 0.5)
    dense = intruder_dimensions(W.to(dtype), W_t.to(dtype), k=10)
    lora = intruder_dimensions(W.to(dtype), (W.to(dtype), B.to(dtype), A.to(dtype), scale), k=10)
    for res in (dense, lora):
        assert res.max_cos.shape == (10,) and res.max_cos.dtype == torch.float32
        torch.testing.assert_close(res.max_cos.double(), exact.cpu() if device == "cpu" else exact, rtol=0, atol=2e-3)
        assert res.count == int((exact < 0.5).sum()) and res.count >= 1
        assert torch.equal(res.indices.cpu(), (exact < 0.5).nonzero().squeeze(1).cpu())
    # Reusing the base SVD gives the same answer.
    base = torch.linalg.svd(W.to(dtype), full_matrices=False)
    again = intruder_dimensions(W.to(dtype), W_t.to(dtype), k=10, base_svd=base)
    torch.testing.assert_close(again.max_cos, dense.max_cos, rtol=0, atol=1e-5)
    # A tiny, full-rank perturbation (full fine-tuning-like) creates no intruder.
    noise = 1e-4 * torch.randn(W.shape, dtype=F64, generator=torch.Generator().manual_seed(1)).to(device)
    assert intruder_dimensions(W.to(dtype), (W + noise).to(dtype)).count == 0


@pytest.mark.parametrize("shape", [(96, 260), (260, 96)])
def test_intruder_dimensions_flat_spectrum(shape):
    """LLM-like flat spectrum (sigma_i = i^-0.3) plus a small full-rank update, as in full
    fine-tuning: neighbouring singular values are close, so only exact top-k vectors give the
    per-vector max |cos| of the definition (a randomized SVD's vectors mix within near-degenerate
    pairs and report false intruders). Dense and LoRA forms, wide and tall."""
    m, n = shape
    W = spectrum_matrix("power", m, n, b=1, seed=3)[0]
    g = torch.Generator().manual_seed(4)
    B, A = torch.randn(m, 4, dtype=F64, generator=g), torch.randn(4, n, dtype=F64, generator=g)
    for W_t, tuned in ((W + 0.01 * torch.randn(m, n, dtype=F64, generator=g), None), (W + 0.05 * B @ A, (W, B, A, 0.05))):
        exact = _intruders_exact(W, W_t, 10, 0.5)
        res = intruder_dimensions(W, W_t if tuned is None else tuned, k=10)
        torch.testing.assert_close(res.max_cos.double(), exact, rtol=0, atol=1e-5)
        assert res.count == int((exact < 0.5).sum())


def test_intruder_bad_inputs():
    W, B, A = _intruder_setup("cpu")
    with pytest.raises(ValueError, match=r"base_svd: expected all min\(m, n\) = 64 left singular vectors"):
        intruder_dimensions(W, W, k=10, base_svd=randomized_svd(W, 5, seed=0))
    nan = W.clone()
    nan[3, 4] = float("nan")
    with pytest.raises(ValueError, match="W_tuned: expected finite"):
        intruder_dimensions(W, nan)
    with pytest.raises(ValueError, match="W_base: expected finite"):
        intruder_dimensions(nan, W)
    with pytest.raises(ValueError, match=r"W_tuned\[1\] \(B\): expected finite"):
        intruder_dimensions(W, (W, B * float("inf"), A, 1.0))
    with pytest.raises(ValueError, match="LoRA tuple"):
        intruder_dimensions(W, (W, B, A))
    with pytest.raises(ValueError, match=r"W_tuned\[2\] \(A\)"):
        intruder_dimensions(W, (W, B, A[:, :5], 1.0))
    with pytest.raises(ValueError, match="W_tuned: expected shape"):
        intruder_dimensions(W, W[:5])
    with pytest.raises(ValueError, match="eps"):
        intruder_dimensions(W, W, eps=2.0)
    with pytest.raises(ValueError, match="k:"):
        intruder_dimensions(W, W, k=0)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def test_cuda_small_svd_route_keeps_factors_orthonormal(monkeypatch):
    """The cuda backend's small SVD (the Jacobi kernel, here its PyTorch port) returns zero vectors
    for zero singular values; randomized_svd completes them, so U and V stay orthonormal on
    rank-deficient and all-zero inputs."""
    from fastmodels.ops import _jacobi
    from fastmodels.ops.rsvd import _small_svd

    port = _jacobi.jacobi_svd
    monkeypatch.setattr(_jacobi, "jacobi_svd", lambda B, backend="reference", **kw: port(B, "reference", **kw))
    R = torch.zeros(3, 6, 6, dtype=F64)
    R[1, :2, :2] = torch.tensor([[2.0, 1.0], [0.0, 1.0]], dtype=F64)  # rank 2
    R[2] = torch.linalg.qr(torch.randn(6, 6, dtype=F64, generator=torch.Generator().manual_seed(0))).Q  # full rank
    assert (port(R.float(), "reference")[0].abs().amax(dim=1) == 0).any()  # the kernel's zero vectors
    Ur, S, Vr = _small_svd(R, "cuda")
    eye = torch.eye(6, dtype=F64)
    for X in (Ur, Vr):
        torch.testing.assert_close(X.mT @ X, eye.expand(3, 6, 6), rtol=0, atol=1e-6)
    torch.testing.assert_close(Ur @ torch.diag_embed(S) @ Vr.mT, R, rtol=0, atol=1e-6)


def test_checked_small_svd_recomputes_only_the_bad_matrices():
    """The CUDA small SVD's fast route (gesvda, from the Gram) is checked per matrix: factors that
    are not orthonormal, do not reproduce R, or are not finite are recomputed with the default
    driver; accurate ones are kept as they are. Here a stand-in fast SVD spoils matrices 1 and 3."""
    from fastmodels.ops.rsvd import _svd_checked

    g = torch.Generator().manual_seed(4)
    R = torch.linalg.qr(torch.randn(5, 12, 7, dtype=F64, generator=g)).R
    R[2] = 0  # an all-zero factor: any orthonormal U, V with S = 0 is accepted
    exact = torch.linalg.svd(R)

    def fast(X):
        U, S, Vh = (t.clone() for t in torch.linalg.svd(X))
        U[0] *= 1 + 1e-13  # within the tolerance: kept
        U[1, :, 6] *= 1 + 1e-6  # a column 1e-6 off unit length (as a tiny singular value's vector)
        S[3, 0] = float("nan")
        return U, S, Vh

    U, S, Vh = _svd_checked(R, fast)
    for i in (1, 3):  # recomputed: the default driver's factors (to rounding: batched vs not)
        for got, want in zip((U, S, Vh), exact):
            torch.testing.assert_close(got[i], want[i], rtol=0, atol=1e-12)
    assert torch.equal(U[0], exact[0][0] * (1 + 1e-13))  # the fast factors themselves
    eye = torch.eye(7, dtype=F64)
    torch.testing.assert_close(U.mT @ U, eye.expand(5, 7, 7), rtol=0, atol=1e-12)
    torch.testing.assert_close((U * S[..., None, :]) @ Vh, R, rtol=0, atol=1e-12)


def test_small_svd_route_knob(monkeypatch):
    from fastmodels.ops.rsvd import _small_svd, _small_svd_route

    R = torch.linalg.qr(torch.randn(2, 9, 6, dtype=F64, generator=torch.Generator().manual_seed(1))).R
    for mode in ("gesvda", "default"):  # on the CPU both run LAPACK's SVD
        monkeypatch.setenv("FASTMODELS_RSVD_SMALL_SVD", mode)
        Ur, S, Vr = _small_svd(R, "reference")
        torch.testing.assert_close((Ur * S[..., None, :]) @ Vr.mT, R, rtol=0, atol=1e-12)
    monkeypatch.setenv("FASTMODELS_RSVD_SMALL_SVD", "exact")
    with pytest.raises(ValueError, match="FASTMODELS_RSVD_SMALL_SVD: expected one of"):
        _small_svd_route()  # read by every CUDA small SVD


def test_bad_inputs():
    A = torch.randn(10, 20)
    with pytest.raises(ValueError, match="rank: expected an int >= 1"):
        randomized_svd(A, 0)
    with pytest.raises(ValueError, match=r"rank: expected an int <= min\(m, n\) = 10"):
        randomized_svd(A, 11)
    with pytest.raises(TypeError, match="rank: expected an int"):
        randomized_svd(A, 2.5)
    with pytest.raises(TypeError, match="A: expected dtype"):
        randomized_svd(torch.ones(10, 20, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"A: expected a matrix .* got shape \[20\]"):
        randomized_svd(torch.randn(20), 1)
    with pytest.raises(TypeError, match="A: expected a torch.Tensor"):
        randomized_svd(A.numpy(), 2)
    with pytest.raises(ValueError, match="method"):
        randomized_svd(A, 2, method="fast")
    with pytest.raises(ValueError, match="oversample"):
        randomized_svd(A, 2, oversample=-1)
    with pytest.raises(ValueError, match="n_iter"):
        randomized_svd(A, 2, n_iter=-1)
    with pytest.raises(ValueError, match="seed"):
        randomized_svd(A, 2, seed=-3)
    with pytest.raises(ValueError, match=r"A\[1\]: expected 2 dimensions"):
        randomized_svd([A, torch.randn(2, 10, 20)], 2)
    with pytest.raises(ValueError, match=r"rank: .* for A\[1\]"):
        randomized_svd([A, torch.randn(3, 20)], 5)
    with pytest.raises(ValueError, match="backend"):
        randomized_svd(A, 2, backend="magic")
    # An empty list factors nothing, but its arguments are checked all the same, and a list's
    # oversample and n_iter before any matrix is factored.
    for kw, match in (({"rank": 0}, "rank: expected an int >= 1"), ({"rank": 2, "seed": -1}, "seed"),
                      ({"rank": 2, "backend": "magic"}, "backend"), ({"rank": 2, "n_iter": -1}, "n_iter"),
                      ({"rank": 2, "oversample": 1.5}, "oversample"), ({"rank": 2, "method": "fast"}, "method")):
        for mats in ([], [A, A[:5]]):
            with pytest.raises((ValueError, TypeError), match=match):
                randomized_svd(mats, **kw)
    assert randomized_svd([], [], seed=3, backend="reference") == []
    bad = torch.randn(3, 10, 20)
    bad[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"A: expected finite values, found NaN or inf \(matrix 1 of the batch\)"):
        randomized_svd(bad, 2)
    with pytest.raises(ValueError, match=r"A\[1\]: expected finite values"):
        randomized_svd([A, A * float("nan")], 2)
    with pytest.raises(ValueError, match="A: expected finite values"):
        randomized_svd(A * float("nan"), 2, method="torch_lowrank")
    from fastmodels.ops.rsvd import _check_finite_batch  # its fast pass reduces each matrix

    _check_finite_batch(torch.full((2, 3, 3), 3e38), "A")  # finite entries whose sum overflows: fine


def _check_power_of_two_scaled(dtype, e: int, method: str, backend: str, rank: int = 3) -> None:
    """randomized_svd of X * 2**e equals that of X (U, V) with S scaled by 2**e."""
    device = "cuda" if backend == "cuda" else DEVICE
    X0 = spectrum_matrix("mp", 40, 70).to(dtype)
    X = (X0.double() * 2.0**e).to(dtype)  # exact: a power of two, within the dtype's range
    assert torch.equal(X.double() * 2.0**-e, X0.double())
    base = randomized_svd(X0.to(device), rank, method=method, seed=2, backend=backend)
    res = randomized_svd(X.to(device), rank, method=method, seed=2, backend=backend)
    check_svd_shapes(res, X.shape, rank, base.S.dtype)
    torch.testing.assert_close(res.S.double() * 2.0**-e, base.S.double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(res.U, base.U, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.V, base.V, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["accurate", "torch_lowrank"])
@pytest.mark.parametrize("dtype,e", [(torch.float32, 70), (torch.float32, 120), (torch.float32, -85), (torch.bfloat16, 70),
                                     (torch.bfloat16, -85), (torch.float16, 15), (torch.float64, 600), (torch.float64, -600)],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("rank", [3, 12], ids=["randomized", "exact_route"])
def test_extreme_scales_match_the_scaled_factorization(dtype, e, method, rank):
    """Finite matrices far from unit scale: the power passes form sigma_1^2-sized values, which
    overflowed fp32 from entries ~1e19 (a LinAlgError from deep inside linalg.svd) and underflowed
    below ~1e-23 (a zero sketch: singular values 30% off, silently). They are factored scaled by
    a power of two, so the factors equal those of the unit-scale matrix (rank 12 of 40 x 70 takes
    the exact route's Gram basis in accurate mode)."""
    _check_power_of_two_scaled(dtype, e, method, "reference", rank)


def test_rescaling_keeps_a_wide_dynamic_range():
    """Only the routes that need it rescale, each in its own work precision: the CPU's float64
    LAPACK route (rank = the short side) keeps 2^100 and 2^-100 exactly, and fp16 input on the
    fp32 torch route keeps 2^-20 next to 60000 (scaled in fp16 it fell into the subnormals: 0)."""
    A = torch.diag(torch.tensor([2.0**100, 2.0**-100]))
    assert randomized_svd(A, 2, seed=0, backend="reference").S.tolist() == [2.0**100, 2.0**-100]
    D = torch.zeros(64, 64, dtype=torch.float16)
    D[0, 0], D[1, 1], D[2, 2] = 60000.0, 1e-4, 2.0**-20
    S = randomized_svd(D, 3, seed=0, backend="reference").S
    torch.testing.assert_close(S.double(), torch.tensor([60000.0, float(D[1, 1]), 2.0**-20], dtype=F64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", op_backends("randomized_svd"))
@pytest.mark.parametrize("dtype,e", [(torch.float32, 70), (torch.float16, 15)], ids=["fp32", "fp16"])
def test_extreme_scales_kernel_backends(dtype, e, backend):
    """The kernel backends round W = A^T Q to A's dtype: fp16 entries up to 55000 (legal) made
    it overflow past 65504 (NaN, then a LinAlgError) where the reference succeeded."""
    _check_power_of_two_scaled(dtype, e, "accurate", backend)


@pytest.mark.parametrize("backend", op_backends("randomized_svd", include_reference=True))
def test_fp16_rescale_keeps_the_small_entries(backend):
    """An fp16 matrix past the kernel backends' safe range (they round A^T Q to fp16) is scaled down
    only to just under it: scaled to max |A| < 1, its 0.01-sized entries would fall into fp16's
    subnormals (2^-24 below 1) and the singular values they carry would lose three digits (measured
    1.3e-3). The reference backend works in fp32 and needs no scaling here."""
    device = "cuda" if backend == "cuda" else DEVICE
    g = torch.Generator().manual_seed(0)
    A = 0.01 * (torch.randn(40, 2, generator=g, dtype=F64) @ torch.randn(2, 70, generator=g, dtype=F64))
    A[0, 0] = 3e4
    A = A.half()
    exact = torch.linalg.svdvals(A.double())[:3]
    S = randomized_svd(A.to(device), 3, seed=0, backend=backend).S.cpu().double()
    torch.testing.assert_close(S, exact, rtol=1e-5, atol=0)


def test_singular_values_beyond_the_result_range_are_refused():
    with pytest.raises(ValueError, match=r"A: its largest singular value exceeds the range of the float32 result"):
        randomized_svd(torch.full((40, 70), 3e38), 3, seed=0)
    with pytest.raises(ValueError, match=r"\(matrix 1 of the batch\) exceeds the range of the float32 result"):
        randomized_svd(torch.stack([torch.ones(40, 70), torch.full((40, 70), 3e38)]).bfloat16(), 3, method="torch_lowrank", seed=0)


def test_factor_arguments_on_another_device_are_refused():
    """singular_value_grads, low_rank(svd=) and intruder_dimensions(base_svd=) name the argument
    on the wrong device (meta here: a CPU-only check) instead of failing inside a matmul or,
    for V, returning garbage."""
    A = torch.randn(12, 20)
    U, S, V = randomized_svd(A, 3, seed=0, backend="reference")
    G = torch.randn(12, 20)
    for args, name in (((U, S, V, G.to("meta")), "G"), ((U, S, V.to("meta"), G), "V"), ((U, S.to("meta"), V, G), "S")):
        with pytest.raises(ValueError, match=rf"{name}: expected a tensor on cpu \(the device of U\), got one on meta"):
            singular_value_grads(*args)
    W = spectrum_matrix("power", 16, 24, b=1)[0]
    Xb = torch.linalg.svd(W, full_matrices=False).U
    with pytest.raises(ValueError, match=r"base_svd: expected a tensor on cpu \(the device of W_base\), got one on meta"):
        intruder_dimensions(W, W, k=4, base_svd=Xb.to("meta"))


def test_low_rank_svd_of_mixed_dtypes():
    """svd= factors of different dtypes (e.g. float32 U, float64 S, fp16 V) were a dtype-mismatch
    RuntimeError from the matmul: they are combined in one working dtype."""
    A = spectrum_matrix("mp", 40, 70, b=1)[0].float()
    U, S, V = randomized_svd(A, 5, seed=0, backend="reference")
    want = low_rank(A, [2, 5], svd=(U, S, V))
    got = low_rank(A, [2, 5], svd=(U, S.double(), V.half()))
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=5e-3 * w.abs().max().item())


def test_intruder_base_svd_edge_cases():
    """base_svd: an empty tuple and NaN are clear errors; a full SVD (full_matrices=True) of a tall
    W_base, whose columns past n span W_base^T's null space, gives the default answer."""
    m, n = 96, 40
    W = spectrum_matrix("power", m, n, b=1, seed=3)[0]
    g = torch.Generator().manual_seed(4)
    B, A = torch.randn(m, 2, dtype=F64, generator=g), torch.randn(2, n, dtype=F64, generator=g)
    tuned = (W, B, A, 0.5)
    default = intruder_dimensions(W, tuned, k=6)
    assert default.count >= 1  # the LoRA directions leave W_base's column space
    full = intruder_dimensions(W, tuned, k=6, base_svd=torch.linalg.svd(W))  # U is [96, 96]
    torch.testing.assert_close(full.max_cos, default.max_cos, rtol=0, atol=1e-6)
    assert full.count == default.count
    with pytest.raises(ValueError, match="base_svd: expected a tensor .* got an empty sequence"):
        intruder_dimensions(W, W, k=4, base_svd=())
    with pytest.raises(ValueError, match="base_svd: expected finite values"):
        intruder_dimensions(W, W, k=4, base_svd=torch.full((m, n), float("nan"), dtype=F64))


# ---------------------------------------------------------------------------------------------
# Triton and CUDA backends (tiny shapes under the interpreter; full ones on a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", op_backends("randomized_svd"))
@pytest.mark.parametrize("shape", [pick((40, 70), (512, 1380)), pick((70, 40), (1380, 512))], ids=["wide", "tall"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_accurate(backend, shape, dtype):
    device = "cuda" if backend == "cuda" else DEVICE
    m, n = shape
    k = max(1, min(m, n) // 10)
    A = spectrum_matrix("mp", m, n).to(device, dtype)
    res = randomized_svd(A, k, seed=3, backend=backend)
    check_svd_shapes(res, A.shape, k, torch.float32)
    assert residual_ratio(A, *res, k).max().item() <= 1.01
    assert orth_defect(res.U) <= 1e-5 and orth_defect(res.V) <= 1e-5
    again = randomized_svd(A, k, seed=3, backend=backend)
    assert torch.equal(again.U, res.U)


@pytest.mark.parametrize("backend", op_backends("randomized_svd"))
@pytest.mark.parametrize("shape", [pick((40, 70), (512, 1380)), pick((70, 40), (1380, 512))], ids=["wide", "tall"])
def test_backend_torch_lowrank_and_edges(backend, shape):
    device = "cuda" if backend == "cuda" else DEVICE
    m, n = shape
    A = spectrum_matrix("mp", m, n).to(device, torch.float32)
    res = randomized_svd(A, 5, method="torch_lowrank", seed=1, backend=backend)
    check_svd_shapes(res, A.shape, 5, torch.float32)
    assert residual_ratio(A, *res, 5).max().item() <= 1.1  # torch's own quality: ~1.02
    assert orth_defect(res.U) <= 1e-5 and orth_defect(res.V) <= 1e-5
    z = randomized_svd(torch.zeros(2, m, n, device=device), 3, seed=0, backend=backend)
    check_svd_shapes(z, (2, m, n), 3, torch.float32)
    assert (z.S == 0).all() and orth_defect(z.U) <= 1e-5


@pytest.mark.no_poison
def test_custom_op_opcheck_and_compile():
    from fastmodels.ops.rsvd import _rsvd_op

    A = torch.randn(2, 40, 70)
    torch.library.opcheck(_rsvd_op, (A, 5, 3, 2, "accurate", 7, "reference"), test_utils=("test_schema", "test_faketensor"))

    def f(x):
        U, S, V = randomized_svd(x, 5, seed=7, backend="reference")
        return (U * S[..., None, :]) @ V.mT

    eager = f(A)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(A)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.triton
@pytest.mark.parametrize("passes", ["auto", "fused", "atomic", "cublas"])
@pytest.mark.parametrize("method", ["accurate", "torch_lowrank"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_passes_modes(passes, method, dtype, monkeypatch):
    """FASTMODELS_RSVD_PASSES picks how the triton backend runs its passes over A; every mode
    meets the accuracy contract and sees the same Omega (same seed: nearly the same factors)."""
    monkeypatch.setenv("FASTMODELS_RSVD_PASSES", passes)
    m, n = pick((40, 70), (512, 1380))
    k = max(1, min(m, n) // 10)
    A = spectrum_matrix("mp", m, n).to(DEVICE, dtype)
    res = randomized_svd(A, k, method=method, seed=5, backend="triton")
    check_svd_shapes(res, A.shape, k, torch.float32)
    assert residual_ratio(A, *res, k).max().item() <= (1.01 if method == "accurate" else 1.1)
    assert orth_defect(res.U) <= 1e-5 and orth_defect(res.V) <= 1e-5
    monkeypatch.setenv("FASTMODELS_RSVD_PASSES", "fused")
    ref = randomized_svd(A, k, method=method, seed=5, backend="triton")
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # bf16 operands: W and Z rounded differently
    assert torch.allclose(res.S, ref.S, rtol=tol, atol=0)


@pytest.mark.triton
def test_passes_mode_bad_value(monkeypatch):
    monkeypatch.setenv("FASTMODELS_RSVD_PASSES", "magic")
    with pytest.raises(ValueError, match="FASTMODELS_RSVD_PASSES"):
        randomized_svd(torch.randn(20, 30).to(DEVICE), 2, backend="triton")


# ------------------------------------------------------------------------------------------------
# The documented defaults and routes: the (oversample, n_iter) rule, the exact-route threshold, one
# sketch per batch index, the fp32 final basis's check
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank,short,expect", [
    (1, 96, (10, 3)), (5, 96, (10, 3)), (30, 96, (15, 3)), (41, 96, (20, 3)), (60, 200, (30, 3)),
    (90, 96, (6, 3)), (96, 96, (0, 3)), (3, 8, (5, 3)),
])
def test_default_oversample_niter_rule(rank, short, expect):
    """p = min(max(10, rank // 2), short - rank) and 3 power passes (accurate); (0, 2) torch_lowrank."""
    assert default_oversample_niter(rank, short) == expect
    assert default_oversample_niter(rank, short, "accurate") == expect
    assert default_oversample_niter(rank, short, "torch_lowrank") == (0, 2)


@pytest.mark.parametrize("method", ["accurate", "torch_lowrank"])
def test_randomized_svd_uses_the_default_rule(method):
    A = spectrum_matrix("power", 96, 260).float()
    for k in (5, 20):
        p, q = default_oversample_niter(k, 96, method)
        a = randomized_svd(A, k, method=method, seed=3)
        b = randomized_svd(A, k, method=method, seed=3, oversample=p, n_iter=q)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_exact_route_threshold_is_a_quarter_of_the_short_side():
    """k = 25 > 0.25 * 96 takes the exact route (float64-exact S, no dependence on the seed);
    k = 24 = 0.25 * 96 is still randomized (the seed changes the result)."""
    A = spectrum_matrix("power", 96, 260)
    S0 = torch.linalg.svdvals(A)
    k = 25
    r1, r2 = randomized_svd(A, k, seed=1), randomized_svd(A, k, seed=2)
    torch.testing.assert_close(r1.S, S0[..., :k], rtol=1e-10, atol=1e-12)
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)
    k = 24
    r1, r2 = randomized_svd(A, k, seed=1), randomized_svd(A, k, seed=2)
    assert not torch.equal(r1.U, r2.U)


def test_each_matrix_of_a_batch_gets_its_own_sketch():
    """Matrix i of a batch is sketched from (seed, i): the same matrix at two batch positions is
    factorized with two different sketches (visible with no power pass and no oversampling on a
    flat spectrum), and what matrix i gets does not depend on the other matrices of the batch."""
    A = spectrum_matrix("power", 60, 80, b=3, seed=5).float()
    kw = dict(method="torch_lowrank", oversample=0, n_iter=0, seed=11)
    k = 4
    same = randomized_svd(torch.stack([A[0], A[0]]), k, **kw)
    assert (same.S[0] - same.S[1]).abs().max() > 1e-3 * same.S[0].max()
    lone = randomized_svd(A[0], k, **kw)
    for x, y in zip(lone, same):
        torch.testing.assert_close(y[0], x, rtol=1e-5, atol=1e-6)
    # position 1 is keyed by (seed, 1) only
    a = randomized_svd(torch.stack([A[1], A[0]]), k, **kw)
    b = randomized_svd(torch.stack([A[2], A[0]]), k, **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x[1], y[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.S[1], same.S[1], rtol=1e-5, atol=1e-6)


def test_fp32_final_basis_must_be_orthonormal_to_1e5():
    """fp32 CholeskyQR2 on nearly rank-deficient blocks (19 unit singular values and one tiny one):
    for some the fp32 Cholesky succeeds twice yet leaves Q^T Q - I above 1e-5. The final basis of
    _orth must still be orthonormal to 1e-5 (those fall back to Householder QR) and span Y."""
    from fastmodels.ops.rsvd import _cholqr_pass, _orth

    g = torch.Generator().manual_seed(0)
    Ys = []
    for lc in (4.0, 4.5, 5.0, 5.5, 6.0, 7.0, 8.0, 9.0):
        for _ in range(16):
            U = torch.linalg.qr(torch.randn(300, 20, generator=g, dtype=F64)).Q
            V = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=F64)).Q
            sig = torch.ones(20, dtype=F64)
            sig[-1] = 10**-lc
            Ys.append((U * sig) @ V.T)
    Y = torch.stack(Ys).float()
    # the inputs do exercise the check: plain CholeskyQR2 accepts some bases it should not
    Q1, _, ok1 = _cholqr_pass(Y)
    Q2, _, ok2 = _cholqr_pass(Q1)
    eye = torch.eye(20)
    plain = (Q2.mT @ Q2 - eye).abs().amax(dim=(-2, -1))
    assert bool(((ok1 & ok2) & (plain > 1e-5)).any())
    Q = _orth(Y, passes=2, dtype=torch.float32)
    defect = (Q.mT @ Q - eye).abs().amax(dim=(-2, -1))  # measured in fp32, as the contract's 1e-5 is
    assert (defect <= 1e-5).all(), defect.max()
    # span: the 19 well-resolved directions of Y lie in range(Q)
    resid = torch.linalg.matrix_norm(Y.double() - Q.double() @ (Q.double().mT @ Y.double())) / torch.linalg.matrix_norm(Y.double())
    assert (resid <= 1e-4).all(), resid.max()

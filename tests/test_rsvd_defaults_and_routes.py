"""randomized_svd: the documented default (oversample, n_iter) rule, the exact-route threshold at
exactly 25% of min(m, n), the per-matrix sketch of a batch, and the fp32 CholeskyQR2 final check."""

from __future__ import annotations

import pytest
import torch

from fastmodels.ops import randomized_svd
from fastmodels.ops.rsvd import default_oversample_niter

F64 = torch.float64


def power_matrix(m: int, n: int, b: int = 2, seed: int = 0) -> torch.Tensor:
    """[b, m, n] float64 with sigma_i = i^-0.3 (a slowly decaying, LLM-like spectrum)."""
    g = torch.Generator().manual_seed(seed)
    s = min(m, n)
    out = []
    for _ in range(b):
        U = torch.linalg.qr(torch.randn(m, s, dtype=F64, generator=g)).Q
        V = torch.linalg.qr(torch.randn(n, s, dtype=F64, generator=g)).Q
        out.append((U * torch.arange(1, s + 1, dtype=F64) ** -0.3) @ V.T)
    return torch.stack(out)


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
    A = power_matrix(96, 260).float()
    for k in (5, 20):
        p, q = default_oversample_niter(k, 96, method)
        a = randomized_svd(A, k, method=method, seed=3)
        b = randomized_svd(A, k, method=method, seed=3, oversample=p, n_iter=q)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_exact_route_threshold_is_a_quarter_of_the_short_side():
    """k = 25 > 0.25 * 96 takes the exact route (float64-exact S, no dependence on the seed);
    k = 24 = 0.25 * 96 is still randomized (the seed changes the result)."""
    A = power_matrix(96, 260)
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
    A = power_matrix(60, 80, b=3, seed=5).float()
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

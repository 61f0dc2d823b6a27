"""NextLat forward kernels: V splits that are not whole BV tiles, and logit ranges wide enough
that the online log-sum-exp must keep its running maximum (kernels/nextlat.py)."""

import pytest
import torch

from fastmodels.testing import assert_close

pytestmark = pytest.mark.triton

IGNORE = -100


def _kernels():
    from fastmodels.kernels import nextlat

    return nextlat


def _ref_fwd(h, W, b, y, p, t):
    h, W, b, p = (x.double() for x in (h, W, b, p))
    z = h @ W.T + b
    lse = torch.logsumexp(z, -1)
    valid = y != IGNORE
    zy = z.gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
    ce = torch.where(valid, lse - zy, torch.zeros_like(lse))
    zq = p @ W.T + b
    lse_q = torch.logsumexp(zq, -1)
    zt, lse_t = z[t], lse[t]
    kl = (torch.exp(zt - lse_t[:, None]) * (zt - zq)).sum(-1) - lse_t + lse_q
    return ce, lse, kl, lse_q


def _inputs(device, N, D, V, M):
    h = torch.randn(N, D, device=device)
    W = torch.randn(V, D, device=device) * (2.0 / D**0.5)
    b = torch.randn(V, device=device)
    y = torch.randint(0, V, (N,), device=device)
    y[::4] = IGNORE
    t = torch.randint(0, N, (M,), device=device)
    p = h[t] + 0.5 * torch.randn(M, D, device=device)
    return h, W, b, y, p, t


def _check(out, ref):
    for name, o, r in zip(("ce_rows", "lse", "kl_rows", "lse_pred"), out, ref):
        assert torch.isfinite(o).all(), name
        assert_close(o, r, dtype=torch.float32, name=name)


def test_forward_v_split_not_a_multiple_of_the_tile(device, monkeypatch):
    # On a GPU the V splits are whole 128-column chunks while a config may use BV = 256 (the KL
    # pass's first tile), so a tile can cross the end of its split: the kernels must mask columns
    # at the split end (v_end), not only at V. Here splits of 48 columns, BV = 32 under the
    # interpreter and 64-256 on a GPU.
    k = _kernels()
    monkeypatch.setattr(k, "_v_chunk", lambda rows, V, dev: (48, -(-V // 48)))
    h, W, b, y, p, t = _inputs(device, 13, 40, 100, 7)
    _check(k.lce_kl_fwd(h, W, b, y, p, t, IGNORE), _ref_fwd(h, W, b, y, p, t))


def test_forward_wide_logit_range(device):
    # Logits near +60 in the first V tile and near -60 after it (a confident row, spread > 88):
    # the running max of the online LSE must stay the row max, or exp(old max - new max) overflows.
    k = _kernels()
    N, D, V, M = 5, 16, 100, 3
    h, W, b, y, p, t = _inputs(device, N, D, V, M)
    W = W * 0.1
    b = torch.where(torch.arange(V, device=device) < 20, 60.0, -60.0) + torch.randn(V, device=device)
    y[1] = 50  # a target in a far, low tile
    _check(k.lce_kl_fwd(h, W, b, y, p, t, IGNORE), _ref_fwd(h, W, b, y, p, t))

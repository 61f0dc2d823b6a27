"""Direct tests of the NextLat Triton launchers (kernels/nextlat.py: lce_kl_fwd / lce_kl_bwd)
against a float64 PyTorch transcription of their contract, written here so the kernels are
checked independently of fastmodels.ops.nextlat."""

import pytest
import torch

from fastmodels.testing import assert_close, lowp_error_budget
from helpers import pick

pytestmark = pytest.mark.triton

IGNORE = -100


def _kernels():
    from fastmodels.kernels import nextlat

    return nextlat


def _ref_rows(hidden, weight, bias, targets, pred, teacher_index, ignore_index):
    """(ce_rows, lse, kl_rows, lse_pred) of the launcher contract, differentiable: the CE part
    w.r.t. hidden/weight/bias, the KL part w.r.t. pred only (head and teacher detached)."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    lse = torch.logsumexp(z, dim=-1)
    valid = targets != ignore_index
    z_y = z.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
    ce_rows = torch.where(valid, lse - z_y, torch.zeros_like(lse))
    if pred is None or pred.shape[0] == 0:
        empty = lse.new_zeros(0)
        return ce_rows, lse, empty, empty
    zq = pred @ weight.detach().T
    if bias is not None:
        zq = zq + bias.detach()
    zq = zq.to(z.dtype)
    lse_pred = torch.logsumexp(zq, dim=-1)
    zt = z.detach()[teacher_index]
    lse_t = lse.detach()[teacher_index]
    p_t = torch.exp(zt - lse_t[:, None])
    kl_rows = (p_t * (zt - zq)).sum(-1) - lse_t + lse_pred
    return ce_rows, lse, kl_rows, lse_pred


def _ref_grads(g, w, hidden, weight, bias, targets, pred, teacher_index, ignore_index, dtype=torch.float64):
    """Autograd of sum_s g_s ce_s + sum_m w_m kl_m with inputs cast to ``dtype`` (float64: the oracle;
    fp16/bf16: PyTorch doing the same math in low precision)."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, bias, pred)]
    h, W, b, p = leaves
    ce, _, kl, _ = _ref_rows(h, W, b, targets, p, teacher_index, ignore_index)
    g = torch.where(targets != ignore_index, g.to(ce.dtype), 0.0)  # ignored rows: g treated as 0
    loss = (g * ce).sum()
    if p is not None and p.shape[0] > 0:
        loss = loss + (w.to(kl.dtype) * kl).sum()
    loss.backward()
    grads = [t.grad if t is not None else None for t in leaves]
    for i, t in enumerate(leaves):  # leaves that got no gradient (e.g. all rows ignored)
        if t is not None and grads[i] is None:
            grads[i] = torch.zeros_like(t)
    return grads


def _inputs(device, N, D, V, M, bias, dtype=torch.float32, ignore_index=IGNORE, n_ignored=None):
    hidden = torch.randn(N, D, device=device)
    weight = torch.randn(V, D, device=device) * (2.0 / D**0.5)
    b = torch.randn(V, device=device) if bias else None
    targets = torch.randint(0, V, (N,), device=device)
    n_ignored = N // 3 if n_ignored is None else n_ignored
    targets[torch.randperm(N, device=device)[:n_ignored]] = ignore_index
    if M > 0:
        # predicted rows near their teachers (as after training) plus noise; repeated teachers
        teacher_index = torch.randint(0, N, (M,), device=device)
        teacher_index[M // 2:] = teacher_index[0]
        pred = hidden[teacher_index] + 0.5 * torch.randn(M, D, device=device)
    else:
        teacher_index = torch.zeros(0, dtype=torch.long, device=device)
        pred = torch.zeros(0, D, device=device) if N % 2 else None
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets, cast(pred), teacher_index


# (N, D, V, M, bias): N = 1 / odd, D and V not multiples of any block, M = 0 (pred None or [0, D]).
SHAPES = [
    (1, 16, 37, 0, False),
    (1, 40, 100, 3, True),
    (5, 40, 100, 3, False),
    (13, 16, 37, 7, True),
    (13, 40, 100, 7, False),
]
SHAPES = pick(SHAPES, SHAPES + [(300, 200, 5003, 77, True), (1000, 768, 50257, 1000, False)])
SHAPE_IDS = [f"N{n}-D{d}-V{v}-M{m}-{'bias' if b else 'nobias'}" for n, d, v, m, b in SHAPES]


def _check_fwd(out, ref, dtype=torch.float32):
    for name, o, r in zip(("ce_rows", "lse", "kl_rows", "lse_pred"), out, ref):
        assert o.dtype == torch.float32, name
        assert_close(o, r, dtype=dtype, name=name)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_fp32(device, shape):
    N, D, V, M, bias = shape
    h, W, b, y, p, t = _inputs(device, N, D, V, M, bias)
    out = _kernels().lce_kl_fwd(h, W, b, y, p, t, IGNORE)
    ref = _ref_rows(*(x.double() if x is not None and x.is_floating_point() else x for x in (h, W, b)), y,
                    None if p is None else p.double(), t, IGNORE)
    _check_fwd(out, ref)
    assert out[2].shape == (M,) and out[3].shape == (M,)


def test_forward_custom_ignore_index(device):
    # ignore_index may be a valid vocabulary id: those rows still give their LSE (KL teachers).
    N, D, V, M = 13, 40, 100, 7
    h, W, b, y, p, t = _inputs(device, N, D, V, M, True, ignore_index=5)
    out = _kernels().lce_kl_fwd(h, W, b, y, p, t, 5)
    ref = _ref_rows(h.double(), W.double(), b.double(), y, p.double(), t, 5)
    _check_fwd(out, ref)
    assert (out[0][y == 5] == 0).all()


def test_forward_v_split_ending_inside_a_tile(device, monkeypatch):
    """On a GPU the V splits are whole 128-column chunks while a config may use BV = 256 (the KL
    pass's first tile), so a tile can cross the end of its split: the kernels must mask columns
    (and the target column) at the split end, not only at V. Here splits of 48 columns, BV = 32
    under the interpreter and 64-256 on a GPU."""
    k = _kernels()
    monkeypatch.setattr(k, "_v_chunk", lambda rows, V, dev: (48, -(-V // 48)))
    h, W, b, y, p, t = _inputs(device, 13, 40, 100, 7, True)
    _check_fwd(k.lce_kl_fwd(h, W, b, y, p, t, IGNORE), _ref_rows(*(x.double() for x in (h, W, b)), y, p.double(), t, IGNORE))


def test_forward_wide_logit_range(device):
    """Logits near +60 in the first V tile and near -60 after it (a spread beyond 88): the online
    LSE's running max must stay the row's max, or exp(old max - new max) overflows."""
    k = _kernels()
    h, W, b, y, p, t = _inputs(device, 5, 16, 100, 3, True)
    W = W * 0.1
    b = torch.where(torch.arange(100, device=device) < 20, 60.0, -60.0) + torch.randn(100, device=device)
    y[1] = 50  # a target in a far, low tile
    _check_fwd(k.lce_kl_fwd(h, W, b, y, p, t, IGNORE), _ref_rows(*(x.double() for x in (h, W, b)), y, p.double(), t, IGNORE))


def _run_bwd(device, shape, deterministic, dtype=torch.float32, n_ignored=None):
    N, D, V, M, bias = shape
    h, W, b, y, p, t = _inputs(device, N, D, V, M, bias, dtype=dtype, n_ignored=n_ignored)
    k = _kernels()
    _, lse, _, lse_pred = k.lce_kl_fwd(h, W, b, y, p, t, IGNORE)
    g = torch.randn(N, device=device)
    g[y == IGNORE] = float("nan")  # must be treated as 0
    w = torch.rand(M, device=device) + 0.5
    if M > 1:
        w[1] = 0.0  # a masked KL row
    out = k.lce_kl_bwd(g, w, h, W, b, y, p, t, lse, lse_pred, IGNORE, deterministic)
    return out, (g, w, h, W, b, y, p, t)


def _names(bias):
    return ("dhidden", "dweight", "dbias" if bias else None, "dpred")


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_backward_fp32(device, shape, deterministic):
    N, D, V, M, bias = shape
    out, (g, w, h, W, b, y, p, t) = _run_bwd(device, shape, deterministic)
    ref = _ref_grads(g, w, h, W, b, y, p, t, IGNORE)
    if p is None:
        ref[3] = torch.zeros(0, D, dtype=torch.float64, device=device)
    for name, o, r, x in zip(_names(bias), out, ref, (h, W, b, p if p is not None else h)):
        if name is None:
            assert o is None
            continue
        assert o.dtype == x.dtype, name
        assert_close(o, r, dtype=torch.float32, name=name)


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_backward_all_rows_ignored(device, deterministic):
    shape = (5, 40, 100, 3, True)
    (dh, dW, db, dp), (g, w, h, W, b, y, p, t) = _run_bwd(device, shape, deterministic, n_ignored=5)
    assert (y == IGNORE).all()
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dW) == 0 and torch.count_nonzero(db) == 0
    ref = _ref_grads(g, w, h, W, b, y, p, t, IGNORE)
    assert_close(dp, ref[3], dtype=torch.float32, name="dpred")
    assert torch.count_nonzero(dp) > 0


def test_deterministic_is_bitwise_repeatable(device):
    shape = pick((13, 40, 100, 7, True), (1000, 768, 50257, 1000, True))
    out1, _ = _run_bwd(device, shape, True)
    torch.manual_seed(0)
    out2, _ = _run_bwd(device, shape, True)
    for a, b in zip(out1, out2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision(device, dtype, deterministic):
    shape = pick((13, 40, 100, 7, True), (300, 200, 5003, 77, True))
    N, D, V, M, bias = shape
    out, (g, w, h, W, b, y, p, t) = _run_bwd(device, shape, deterministic, dtype=dtype)
    ref64 = _ref_grads(g, w, h, W, b, y, p, t, IGNORE)
    lowp = _ref_grads(g, w, h, W, b, y, p, t, IGNORE, dtype=dtype)
    for name, o, r, l, x in zip(_names(bias), out, ref64, lowp, (h, W, b, p)):
        assert o.dtype == dtype, name
        try:
            lowp_error_budget(o, r, l)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None

    fwd = _kernels().lce_kl_fwd(h, W, b, y, p, t, IGNORE)
    ref = _ref_rows(h.double(), W.double(), b.double(), y, p.double(), t, IGNORE)
    with torch.no_grad():
        lp = _ref_rows(h, W, b, y, p, t, IGNORE)
    for name, o, r, l in zip(("ce_rows", "lse", "kl_rows", "lse_pred"), fwd, ref, lp):
        assert o.dtype == torch.float32, name
        try:
            lowp_error_budget(o, r, l)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "atomic"])
def test_backward_zero_factor_blocks(device, deterministic):
    # Whole row blocks of ignored CE rows / zero-weight KL rows are skipped by the kernels: the
    # neighbouring blocks must still get every gradient.
    N, D, V, M = pick((37, 40, 100, 35), (400, 200, 5003, 390))
    h, W, b, y, p, t = _inputs(device, N, D, V, M, True, n_ignored=0)
    y[: N // 2] = IGNORE
    k = _kernels()
    _, lse, _, lse_pred = k.lce_kl_fwd(h, W, b, y, p, t, IGNORE)
    g = torch.randn(N, device=device)
    w = torch.rand(M, device=device) + 0.5
    w[: M // 2] = 0.0
    out = k.lce_kl_bwd(g, w, h, W, b, y, p, t, lse, lse_pred, IGNORE, deterministic)
    ref = _ref_grads(g, w, h, W, b, y, p, t, IGNORE)
    for name, o, r in zip(_names(True), out, ref):
        assert_close(o, r, dtype=torch.float32, name=name)
    assert torch.count_nonzero(out[3][: M // 2]) == 0

"""linear_cross_entropy_kl: every backend's values and gradients vs the float64 reference."""

import pytest
import torch

import fastmodels.ops.nextlat as nl
from fastmodels.ops import linear_cross_entropy_kl
from helpers import assert_close, backend_device, op_backends

OP = "linear_cross_entropy_kl"
BACKENDS = op_backends(OP)


@pytest.fixture(autouse=True)
def _small_cpu_chunks(monkeypatch):
    # 3-row chunks of the cpu backend at V=53, so every test crosses chunk boundaries.
    monkeypatch.setattr(nl, "_CPU_WORKSPACE_BYTES", 4 * 53 * 3)


def make(N=13, D=20, V=53, M=9, *, dtype=torch.float32, device="cpu", bias=True, ignore_every=4, zero_w_every=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5 * 2
    b = torch.randn(V, generator=g) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    pred = hidden[torch.randint(0, N, (M,), generator=g)] + 0.5 * torch.randn(M, D, generator=g)
    teacher_index = torch.randint(0, N, (M,), generator=g)
    if M >= 3:
        teacher_index[1] = teacher_index[0]  # repeated teachers
        teacher_index[2] = teacher_index[0]
    kl_weight = torch.rand(M, generator=g) + 0.1
    if zero_w_every and M:
        kl_weight[::zero_w_every] = 0
    t = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return dict(hidden=t(hidden), weight=t(weight), bias=t(b), targets=targets.to(device), pred_hidden=t(pred),
                teacher_index=teacher_index.to(device), kl_weight=kl_weight.to(device, torch.float64 if dtype == torch.float64 else torch.float32))


def run(inputs, backend, grads=("hidden", "weight", "bias", "pred_hidden"), upstream=(1.3, 0.7), to=None, reduction="mean"):
    """(ce, kl, {name: grad}) with the given inputs requiring grad. With reduction="none" the
    upstream gradient of every row is a different (seeded) number times ``upstream``."""
    args = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().clone()
            if to is not None and v.is_floating_point() and k != "kl_weight":
                v = v.to(to)
            if k in grads:
                v.requires_grad_(True)
        args[k] = v
    ce, kl = linear_cross_entropy_kl(
        args["hidden"], args["weight"], args["targets"], args.get("pred_hidden"), args.get("teacher_index"),
        bias=args.get("bias"), kl_weight=args.get("kl_weight"), reduction=reduction, backend=backend,
    )
    wanted = [k for k in grads if isinstance(args.get(k), torch.Tensor)]
    if reduction == "none":
        g = torch.Generator().manual_seed(7)
        u_ce = torch.randn(ce.shape, generator=g, dtype=torch.float64).to(ce)
        u_kl = torch.randn(kl.shape, generator=g, dtype=torch.float64).to(kl)
        loss = upstream[0] * (u_ce * ce).sum() + upstream[1] * (u_kl * kl).sum()
    else:
        loss = upstream[0] * ce + upstream[1] * kl
    out = torch.autograd.grad(loss, [args[k] for k in wanted], allow_unused=True) if wanted and loss.requires_grad else [None] * len(wanted)
    return ce, kl, dict(zip(wanted, out))


def compare(inputs, backend, dtype, grads=("hidden", "weight", "bias", "pred_hidden"), reduction="mean"):
    ce, kl, g = run(inputs, backend, grads, reduction=reduction)
    rce, rkl, rg = run(inputs, "reference", grads, to=torch.float64, reduction=reduction)
    assert ce.shape == rce.shape and kl.shape == rkl.shape
    tol = dict(dtype=dtype) if dtype != torch.float32 else dict(atol=2e-5, rtol=2e-4)
    assert_close(ce.double(), rce, name="ce", **tol)
    assert_close(kl.double(), rkl, name="kl", **tol)
    for k in rg:
        if rg[k] is None:
            assert g[k] is None or not g[k].abs().any(), k
            continue
        assert g[k] is not None and g[k].dtype == inputs[k].dtype, k
        assert_close(g[k].double(), rg[k], name=f"grad {k}", **tol)
    return ce, kl, g


CASES = {
    "basic": {},
    "no_bias": dict(bias=False),
    "m0": dict(M=0),
    "n1": dict(N=1, M=3, ignore_every=0),
    "odd_v": dict(V=61, D=7, N=7),
    "no_zero_weights": dict(zero_w_every=0, ignore_every=0),
}


def _dtypes(backend):
    return [torch.float32] if backend == "triton" else [torch.float64, torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case):
    for dtype in _dtypes(backend):
        kw = dict(CASES[case])
        inputs = make(dtype=dtype, device=backend_device(backend), **kw)
        compare(inputs, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_sizes(backend, monkeypatch):
    if backend != "cpu":
        pytest.skip("chunking is the cpu backend's")
    inputs = make(N=11, M=23, dtype=torch.float64)  # more predicted rows than a chunk per teacher
    inputs["teacher_index"][:12] = 4
    for rows in (1, 2, 5, 11, 64):
        monkeypatch.setattr(nl, "_CPU_WORKSPACE_BYTES", 4 * 53 * rows)
        compare(inputs, backend, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_only(backend):
    inputs = make(device=backend_device(backend))
    for k in ("pred_hidden", "teacher_index", "kl_weight"):
        inputs[k] = None
    ce, kl, _ = compare(inputs, backend, torch.float32)
    assert kl.item() == 0.0
    expect = torch.nn.functional.cross_entropy(inputs["hidden"].double() @ inputs["weight"].double().T + inputs["bias"].double(), inputs["targets"])
    assert_close(ce.double(), expect, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_all_zero_weights(backend):
    inputs = make(device=backend_device(backend))
    inputs["targets"][:] = -100
    inputs["kl_weight"][:] = 0
    ce, kl, g = run(inputs, backend)
    assert ce.item() == 0.0 and kl.item() == 0.0
    for k, v in g.items():
        assert v is not None and torch.isfinite(v).all() and not v.abs().any(), k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads", [("hidden",), ("weight",), ("bias",), ("pred_hidden",), ("hidden", "pred_hidden"), ()])
def test_partial_requires_grad(backend, grads):
    inputs = make(device=backend_device(backend))
    compare(inputs, backend, torch.float32, grads=grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_mode(backend):
    inputs = make(device=backend_device(backend))
    with torch.no_grad():
        ce, kl, _ = run(inputs, backend, grads=())
    rce, rkl, _ = run(inputs, "reference", grads=(), to=torch.float64)
    assert_close(ce.double(), rce, atol=2e-5, rtol=2e-4)
    assert_close(kl.double(), rkl, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    """Low-precision inputs, fp32 logits: values within fp32 accuracy of the fp64 reference on the
    same (rounded) inputs; gradients within one rounding of their dtype."""
    inputs = make(device=backend_device(backend), dtype=dtype)
    ce, kl, g = run(inputs, backend)
    assert ce.dtype == torch.float32 and kl.dtype == torch.float32
    rce, rkl, rg = run(inputs, "reference", to=torch.float64)
    assert_close(ce.double(), rce, atol=2e-5, rtol=2e-4, name="ce")
    assert_close(kl.double(), rkl, atol=2e-5, rtol=2e-4, name="kl")
    for k in rg:
        assert g[k].dtype == dtype
        assert_close(g[k], rg[k], dtype=dtype, name=f"grad {k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("case", ["basic", "no_bias", "m0", "n1", "odd_v"])
def test_reduction_matches_reference(backend, reduction, case):
    for dtype in _dtypes(backend):
        inputs = make(dtype=dtype, device=backend_device(backend), **CASES[case])
        compare(inputs, backend, dtype, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads", [("hidden",), ("weight",), ("bias",), ("pred_hidden",), ()])
def test_reduction_none_partial_requires_grad(backend, grads):
    compare(make(device=backend_device(backend)), backend, torch.float32, grads=grads, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_agree(backend):
    """"none" rows: 0 on ignored and zero-weight rows, and they sum to "sum"; "sum" is "mean" times
    the row count (CE) and the weight total (KL); with "sum", micro-batches add up to the whole."""
    x = make(dtype=torch.float64 if backend != "triton" else torch.float32, device=backend_device(backend))
    tol = dict(atol=1e-5, rtol=1e-5)
    ce_m, kl_m, _ = run(x, backend, reduction="mean")
    ce_s, kl_s, _ = run(x, backend, reduction="sum")
    ce_n, kl_n, _ = run(x, backend, reduction="none")
    valid = x["targets"] != -100
    assert not ce_n[~valid].any() and (ce_n[valid] > 0).all()
    assert not kl_n[x["kl_weight"] == 0].any()
    assert_close(ce_n.sum(), ce_s, **tol)
    assert_close(kl_n.sum(), kl_s, **tol)
    assert_close(ce_s, ce_m * valid.sum(), **tol)
    assert_close(kl_s, kl_m * x["kl_weight"].sum(), **tol)

    # Gradient accumulation: two micro-batches with different kept-row counts, summed then divided
    # by the total count, give the whole batch's mean and its hidden gradient.
    parts = [dict(x), dict(x)]
    halves = [torch.arange(0, 5), torch.arange(5, x["hidden"].shape[0])]
    total_ce, grads = 0.0, []
    for part, rows in zip(parts, halves):
        part["hidden"] = x["hidden"][rows].clone().requires_grad_()
        part["targets"] = x["targets"][rows]
        ce, _ = linear_cross_entropy_kl(part["hidden"], x["weight"], part["targets"], bias=x["bias"], reduction="sum", backend=backend)
        (grad,) = torch.autograd.grad(ce / valid.sum(), part["hidden"])
        total_ce, grads = total_ce + ce / valid.sum(), grads + [grad]
    h = x["hidden"].clone().requires_grad_()
    ce, _ = linear_cross_entropy_kl(h, x["weight"], x["targets"], bias=x["bias"], backend=backend)
    (grad,) = torch.autograd.grad(ce, h)
    assert_close(total_ce, ce, **tol)
    assert_close(torch.cat(grads), grad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_no_grad_and_all_ignored(backend):
    x = make(device=backend_device(backend))
    x["targets"][:] = -100
    x["kl_weight"][:] = 0
    ce, kl, g = run(x, backend, reduction="none")
    assert ce.shape == x["targets"].shape and kl.shape == x["teacher_index"].shape
    assert not ce.any() and not kl.any()
    for k, v in g.items():
        assert v is not None and torch.isfinite(v).all() and not v.abs().any(), k
    y = make(device=backend_device(backend))
    with torch.no_grad():
        ce, kl, _ = run(y, backend, grads=(), reduction="none")
    rce, rkl, _ = run(y, "reference", grads=(), to=torch.float64, reduction="none")
    assert_close(ce.double(), rce, atol=2e-5, rtol=2e-4)
    assert_close(kl.double(), rkl, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_kl_accuracy_large_vocab(backend):
    """fp32 per-row KLs of close distributions at V = 8192 within 5e-5 (RMS-relative) of float64:
    the KL (~0.04) is a small difference of O(log V) terms, so it must be formed per element
    (a chunked version that subtracted sum p log q from sum p log p measured 3.1e-4 here)."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 16, 64, 8192
    h = torch.randn(N, D, generator=g)
    W = torch.randn(V, D, generator=g) / D**0.5
    y = torch.randint(0, V, (N,), generator=g)
    teacher = (torch.arange(N) + 1) % N
    pred = h[teacher] + 0.3 * torch.randn(N, D, generator=g)
    dev = backend_device(backend)

    def kl_rows(backend, dtype):
        return linear_cross_entropy_kl(h.to(dev, dtype), W.to(dev, dtype), y.to(dev), pred.to(dev, dtype), teacher.to(dev),
                                       reduction="none", backend=backend)[1].double().cpu()

    exact = kl_rows("reference", torch.float64)
    err = (kl_rows(backend, torch.float32) - exact).norm() / exact.norm()
    assert err < 5e-5, f"per-row KL RMS-relative error {err:.2e}"


def test_bad_reduction():
    x = make(N=5, M=2)
    with pytest.raises(ValueError, match="reduction: expected 'mean', 'sum' or 'none', got 'avg'"):
        linear_cross_entropy_kl(x["hidden"], x["weight"], x["targets"], reduction="avg")


def test_reference_matches_textbook_formulas():
    """The reference against the spec's closed forms (KL value and the pred gradient w W^T (q - p))."""
    inputs = make(dtype=torch.float64, bias=False)
    ce, kl, g = run(inputs, "reference", upstream=(0.0, 1.0))
    W, h, p = inputs["weight"], inputs["hidden"], inputs["pred_hidden"]
    zt, zs = h[inputs["teacher_index"]] @ W.T, p @ W.T
    P, Q = zt.softmax(-1), zs.softmax(-1)
    w = inputs["kl_weight"] / inputs["kl_weight"].sum()
    kl_rows = (P * (zt - zs)).sum(-1) - zt.logsumexp(-1) + zs.logsumexp(-1)
    assert_close(kl, (w * kl_rows).sum())
    assert_close(g["pred_hidden"], w[:, None] * ((Q - P) @ W))
    assert not g["hidden"].abs().any() and not g["weight"].abs().any()


def test_bad_inputs():
    x = make()
    h, W, y, p, t = x["hidden"], x["weight"], x["targets"], x["pred_hidden"], x["teacher_index"]
    f = linear_cross_entropy_kl
    with pytest.raises(ValueError, match="weight"):
        f(h, W[:, :5], y)
    with pytest.raises(ValueError, match="targets"):
        f(h, W, y[:-1])
    with pytest.raises(TypeError, match="targets"):
        f(h, W, y.float())
    with pytest.raises(TypeError, match="weight"):
        f(h, W.double(), y)
    with pytest.raises(TypeError, match="hidden"):
        f(h.int(), W, y)
    with pytest.raises(ValueError, match="targets"):
        f(h, W, torch.full_like(y, 53))
    with pytest.raises(ValueError, match="targets"):
        f(h, W, torch.full_like(y, -1))
    with pytest.raises(ValueError, match="teacher_index"):
        f(h, W, y, p, torch.full_like(t, 13))
    with pytest.raises(ValueError, match="teacher_index"):
        f(h, W, y, p, torch.full_like(t, -1))
    with pytest.raises(ValueError, match="teacher_index"):
        f(h, W, y, p, t[:-1])
    with pytest.raises(ValueError, match="pred_hidden"):
        f(h, W, y, p[:, :3], t)
    with pytest.raises(ValueError, match="pred_hidden and teacher_index"):
        f(h, W, y, p)
    with pytest.raises(ValueError, match="bias"):
        f(h, W, y, bias=torch.zeros(7))
    with pytest.raises(ValueError, match="kl_weight"):
        f(h, W, y, p, t, kl_weight=-torch.ones(len(t)))
    with pytest.raises(ValueError, match="kl_weight"):
        f(h, W, y, p, t, kl_weight=torch.ones(3))
    with pytest.raises(ValueError, match="backend"):
        f(h, W, y, backend="nope")
    with pytest.raises(TypeError, match="ignore_index"):
        f(h, W, y, ignore_index=1.5)
    with pytest.raises(ValueError, match="ignore_index"):  # was an OverflowError from the comparison
        f(h, W, y, ignore_index=2**70)


def test_value_checks_sync_once():
    """The eager value checks (targets, teacher_index, kl_weight) cost one host sync when the
    inputs are valid (a training step pays it every call), and still name the bad argument."""
    from torch.overrides import TorchFunctionMode

    class CountSyncs(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.n += getattr(func, "__name__", "") in ("__bool__", "__int__", "__index__", "item", "tolist")
            return func(*args, **(kwargs or {}))

    x = make()
    h, W, y, p, t = x["hidden"], x["weight"], x["targets"], x["pred_hidden"], x["teacher_index"]
    with CountSyncs() as c:
        linear_cross_entropy_kl(h, W, y, p, t, kl_weight=torch.rand(len(t)), backend="cpu")
    assert c.n == 1
    with pytest.raises(ValueError, match="kl_weight: expected finite"):
        linear_cross_entropy_kl(h, W, y, p, t, kl_weight=torch.full((len(t),), float("nan")), backend="cpu")


def test_custom_ignore_index():
    x = make(ignore_every=0, dtype=torch.float64)
    x["targets"][::2] = 7
    ref = torch.nn.functional.cross_entropy(x["hidden"] @ x["weight"].T + x["bias"], x["targets"], ignore_index=7)
    for backend in ("reference", "cpu"):
        ce, _ = linear_cross_entropy_kl(x["hidden"], x["weight"], x["targets"], bias=x["bias"], ignore_index=7, backend=backend)
        assert_close(ce, ref)


@pytest.mark.no_poison
def test_opcheck_chunked():
    x = make(N=7, M=5)
    args = (x["hidden"].requires_grad_(), x["weight"].requires_grad_(), x["bias"].requires_grad_(), x["targets"],
            x["pred_hidden"].requires_grad_(), x["teacher_index"], x["kl_weight"], -100, "mean", True, True, True, False)
    torch.library.opcheck(torch.ops.fastmodels.lce_kl_chunked.default, args)
    args2 = (x["hidden"], x["weight"], None, x["targets"], x["pred_hidden"], x["teacher_index"], x["kl_weight"], -100, "sum", False, True, False, True)
    torch.library.opcheck(torch.ops.fastmodels.lce_kl_chunked.default, args2)
    rows = (x["hidden"], x["weight"], x["bias"], x["targets"], x["pred_hidden"], x["teacher_index"], x["kl_weight"], -100, False)
    torch.library.opcheck(torch.ops.fastmodels.lce_kl_chunked_rows.default, rows)
    g = torch.Generator().manual_seed(3)
    g_rows = (torch.randn(7, generator=g), torch.randn(5, generator=g))
    plain = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in rows[:6])
    torch.library.opcheck(torch.ops.fastmodels.lce_kl_chunked_rows_backward.default, (*g_rows, *plain, -100, True, True, True))
    torch.library.opcheck(torch.ops.fastmodels.lce_kl_chunked_rows_backward.default, (*g_rows, *plain, -100, False, True, False))


@pytest.mark.no_poison
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_rows(backend):
    if backend != "triton":
        pytest.skip("the rows op is the triton backend's")
    x = make(N=7, M=5, device=backend_device(backend))
    args = (x["hidden"].requires_grad_(), x["weight"].requires_grad_(), x["bias"].requires_grad_(), x["targets"],
            x["pred_hidden"].requires_grad_(), x["teacher_index"], x["kl_weight"], -100, False, True)
    torch.library.opcheck(torch.ops.fastmodels.lce_kl_rows.default, args)


@pytest.mark.no_poison
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile(backend, reduction):
    x = make(device=backend_device(backend))
    u = torch.linspace(0.5, 1.5, x["hidden"].shape[0], device=x["hidden"].device)

    def loss(h, W, b, p):
        ce, kl = linear_cross_entropy_kl(h, W, x["targets"], p, x["teacher_index"], bias=b, kl_weight=x["kl_weight"],
                                         reduction=reduction, backend=backend)
        return 1.3 * (u * ce).sum() + 0.7 * kl.sum() if reduction == "none" else 1.3 * ce + 0.7 * kl

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [x[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias", "pred_hidden")]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves)
    leaves2 = [v.detach().clone().requires_grad_() for v in leaves]
    out2 = loss(*leaves2)
    grads2 = torch.autograd.grad(out2, leaves2)
    assert_close(out, out2)
    for a, b in zip(grads, grads2):
        assert_close(a, b)


@pytest.mark.no_poison
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_bad_indices_raise(backend, reduction):
    """Under torch.compile the host-side range checks are skipped; the fused ops run them instead, so
    an out-of-range teacher index or target is still an error, not a dropped row or a wild read,
    and so is a negative KL weight."""
    if backend == "reference":
        pytest.skip("the reference backend indexes with PyTorch, which checks its own indices")
    x = make(device=backend_device(backend))

    def loss(targets, teacher_index, kl_weight=None):
        return linear_cross_entropy_kl(x["hidden"], x["weight"], targets, x["pred_hidden"], teacher_index, kl_weight=kl_weight,
                                       reduction=reduction, backend=backend)

    bad_w = x["kl_weight"].clone()
    bad_w[1] = -1.0
    with pytest.raises(ValueError, match="kl_weight"):
        torch.compile(loss, fullgraph=True, backend="aot_eager")(x["targets"], x["teacher_index"], bad_w)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    bad_teacher = x["teacher_index"].clone()
    bad_teacher[-1] = -1
    with pytest.raises(ValueError, match="teacher_index"):
        compiled(x["targets"], bad_teacher)
    bad_targets = x["targets"].clone()
    bad_targets[0] = x["weight"].shape[0]
    with pytest.raises(ValueError, match="targets"):
        compiled(bad_targets, x["teacher_index"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_weight_gets_no_gradient(backend):
    x = make(device=backend_device(backend))
    w = x["kl_weight"].detach().clone().requires_grad_()
    h = x["pred_hidden"].detach().clone().requires_grad_()
    _, kl = linear_cross_entropy_kl(x["hidden"], x["weight"], x["targets"], h, x["teacher_index"], kl_weight=w, backend=backend)
    gw, gh = torch.autograd.grad(kl, (w, h), allow_unused=True)
    assert gw is None and gh is not None and gh.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_operands_not_logits(backend):
    """Under torch.autocast(bfloat16) the op runs as on bf16 operands (as F.linear would), with
    fp32 logits inside (no autocast inside the op), and the gradients reach the fp32 leaves."""
    dev = backend_device(backend)
    x = make(device=dev)
    leaves = [x[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias", "pred_hidden")]
    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        ce, kl = linear_cross_entropy_kl(leaves[0], leaves[1], x["targets"], leaves[3], x["teacher_index"], bias=leaves[2],
                                         kl_weight=x["kl_weight"], backend=backend)
    got = torch.autograd.grad(1.3 * ce + 0.7 * kl, leaves)
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in leaves]
    ce2, kl2 = linear_cross_entropy_kl(low[0], low[1], x["targets"], low[3], x["teacher_index"], bias=low[2],
                                       kl_weight=x["kl_weight"], backend=backend)
    want = torch.autograd.grad(1.3 * ce2 + 0.7 * kl2, low)
    assert ce.dtype == torch.float32 and kl.dtype == torch.float32
    assert torch.equal(ce, ce2) and torch.equal(kl, kl2)
    for g, w, leaf in zip(got, want, leaves):
        assert g.dtype == leaf.dtype
        assert torch.equal(g, w.float())


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_backends_refuse_double_backward(backend, reduction):
    """The fused backends' gradients have no second derivative: differentiating them again must
    be an error that names the op and the way out, not zeros (the cpu backend's backward rescales
    gradients saved in the forward) nor torch's message about an internal op."""
    dev = backend_device(backend)
    x = make(device=dev)
    h = x["hidden"].detach().clone().requires_grad_()
    p = x["pred_hidden"].detach().clone().requires_grad_()
    ce, kl = linear_cross_entropy_kl(h, x["weight"], x["targets"], p, x["teacher_index"], reduction=reduction,
                                     backend=backend)
    # squared: the upstream gradients carry a graph, so without the guard the gradients would be
    # differentiable through them and miss the Hessian of the loss (a silently wrong result)
    gh, gp = torch.autograd.grad((ce**2).sum() + (kl**2).sum(), (h, p), create_graph=True)
    for g, leaf in ((gh, h), (gp, p)):
        with pytest.raises(RuntimeError, match=rf"{OP}: the {backend} backend's gradients cannot be differentiated again"):
            torch.autograd.grad((g**2).sum(), leaf, retain_graph=True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cpu_backend_refuses_gradient_penalty(reduction):
    """A constant upstream gradient (``ce`` itself, as in a gradient penalty) must not let the
    saved first-order gradients through as constants: the penalty term would silently get no
    second derivative (total.backward() gave only the first-order part)."""
    x = make(dtype=torch.float64)
    h = x["hidden"].detach().clone().requires_grad_()
    p = x["pred_hidden"].detach().clone().requires_grad_()
    loss = {b: linear_cross_entropy_kl(h, x["weight"], x["targets"], p, x["teacher_index"], reduction=reduction, backend=b)
            for b in ("cpu", "reference")}
    ce, kl = loss["cpu"]
    gh, gp = torch.autograd.grad(ce + kl, (h, p), create_graph=True)
    for g, r in zip((gh, gp), torch.autograd.grad(sum(loss["reference"]), (h, p))):  # first order: still exact
        assert_close(g, r)
    for penalty in ((gh**2).sum(), (gp**2).sum()):
        with pytest.raises(RuntimeError, match="cannot be differentiated again"):
            (ce + kl + penalty).backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="cannot be differentiated again"):
            torch.autograd.grad(ce + kl + penalty, (h, p), retain_graph=True)
    gh.mul_(2)  # the gradients are plain tensors: in-place use still works
    # A second derivative that only goes through the upstream gradient (here d/dw of a penalty
    # on the gradient of w * loss) needs no second derivative of the op: it is exact.
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    got = {}
    for b in ("cpu", "reference"):
        ce, kl = linear_cross_entropy_kl(h, x["weight"], x["targets"], p, x["teacher_index"], reduction=reduction, backend=b)
        g = torch.autograd.grad(w * (ce + kl), (h, p), create_graph=True)
        got[b] = torch.autograd.grad(sum((t**2).sum() for t in g) + w**2, w)[0]
    assert_close(got["cpu"], got["reference"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    dev = backend_device(backend)
    h = torch.randn(0, 20, device=dev, requires_grad=True)
    W = torch.randn(53, 20, device=dev, requires_grad=True)
    ce, kl = linear_cross_entropy_kl(h, W, torch.zeros(0, dtype=torch.int64, device=dev), backend=backend)
    assert ce.item() == 0.0 and kl.item() == 0.0
    gh, gw = torch.autograd.grad(ce + kl, (h, W))
    assert gh.shape == (0, 20) and not gw.abs().any() and torch.isfinite(gw).all()
    # with a bias and (necessarily empty) predicted rows, every input gets a zero gradient
    b = torch.randn(53, device=dev, requires_grad=True)
    p = torch.randn(0, 20, device=dev, requires_grad=True)
    t = torch.zeros(0, dtype=torch.int64, device=dev)
    for reduction in ("mean", "sum", "none"):
        ce, kl = linear_cross_entropy_kl(h, W, t, p, t, bias=b, reduction=reduction, backend=backend)
        grads = torch.autograd.grad(ce.sum() + kl.sum(), (h, W, b, p))
        assert all(g is not None and not g.abs().any() for g in grads), reduction


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_flag(backend):
    """deterministic=True: same values as the reference, bit-identical gradients across calls."""
    x = make(device=backend_device(backend))
    runs = []
    for _ in range(2):
        leaves = [x[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias", "pred_hidden")]
        ce, kl = linear_cross_entropy_kl(leaves[0], leaves[1], x["targets"], leaves[3], x["teacher_index"], bias=leaves[2],
                                         kl_weight=x["kl_weight"], backend=backend, deterministic=True)
        runs.append((ce, kl) + torch.autograd.grad(1.3 * ce + 0.7 * kl, leaves))
    rce, rkl, rg = run(x, "reference", to=torch.float64)
    assert_close(runs[0][0].double(), rce, atol=2e-5, rtol=2e-4)
    assert_close(runs[0][1].double(), rkl, atol=2e-5, rtol=2e-4)
    for name, a, r in zip(("hidden", "weight", "bias", "pred_hidden"), runs[0][2:], (rg[k] for k in ("hidden", "weight", "bias", "pred_hidden"))):
        assert_close(a.double(), r, atol=2e-5, rtol=2e-4, name=name)
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("torch_flag", [False, True])
def test_deterministic_default_follows_torch(monkeypatch, deterministic_algorithms, torch_flag):
    """deterministic=None (the default) takes torch.are_deterministic_algorithms_enabled(); an
    explicit value wins. Checked on what the triton path is handed (a spy: no kernel runs)."""
    seen = []
    monkeypatch.setattr(nl, "_triton_losses", lambda *args: seen.append(args[9]) or (torch.zeros(()), torch.zeros(())))
    monkeypatch.setattr(nl, "_resolve_backend", lambda backend, device_type: backend)  # triton on any device
    x = make()
    deterministic_algorithms(torch_flag)
    for explicit in (None, False, True):
        linear_cross_entropy_kl(x["hidden"], x["weight"], x["targets"], backend="triton", deterministic=explicit)
    assert seen == [torch_flag, False, True]


def test_bad_deterministic():
    x = make()
    with pytest.raises(TypeError, match=r"deterministic \(a bool, or None for torch's flag\): expected a bool, got int"):
        linear_cross_entropy_kl(x["hidden"], x["weight"], x["targets"], deterministic=1)

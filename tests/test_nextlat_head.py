"""NextLatHead vs a direct, position-by-position transcription of the spec's objective."""

import pytest
import torch
import torch.nn.functional as F

from fastmodels.nextlat import NextLatHead
from helpers import assert_close, backend_device, op_backends

BACKENDS = op_backends("linear_cross_entropy_kl", include_reference=True)
B, T, D, V, E, H = 2, 7, 12, 29, 10, 16


def spec_objective(head, hidden, ids, emb_w, W, b, loss_mask, doc, d, lh, lk):
    """The spec's L, one position and one horizon at a time, with full logits."""
    logits = lambda x, Wm, bm: x @ Wm.T + (0 if bm is None else bm)  # noqa: E731
    ce_ok = lambda bb, t: t + 1 < T and bool(doc[bb, t] == doc[bb, t + 1]) and bool(loss_mask[bb, t + 1])  # noqa: E731
    ce_terms = [F.cross_entropy(logits(hidden[bb, t], W, b)[None], ids[bb, t + 1][None])
                for bb in range(B) for t in range(T) if ce_ok(bb, t)]
    lat, kl = [[] for _ in range(d)], [[] for _ in range(d)]
    Wd, bd = W.detach(), None if b is None else b.detach()
    for bb in range(B):
        for t in range(T):
            h = hidden[bb, t]
            for i in range(1, d + 1):
                if t + i >= T or doc[bb, t + i] != doc[bb, t]:
                    break
                h = h + head.mlp(head.norm(torch.cat([h, emb_w[ids[bb, t + i]]])))
                target = hidden[bb, t + i].detach()
                lat[i - 1].append(F.smooth_l1_loss(h, target, beta=1.0))
                if ce_ok(bb, t + i):
                    logp = torch.log_softmax(logits(target, Wd, bd), -1)
                    logq = torch.log_softmax(logits(h, Wd, bd), -1)
                    kl[i - 1].append((logp.exp() * (logp - logq)).sum())
    mean = lambda xs: torch.stack(xs).mean() if xs else hidden.new_zeros(())  # noqa: E731
    ce = mean(ce_terms)
    latent = sum(mean(x) for x in lat) / d
    klv = sum(mean(x) for x in kl) / d
    return ce + lh * latent + lk * klv, ce, latent, klv


def setup(dtype, device, tied, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.Embedding(V, D if tied else E).to(dtype)
    head_lin = torch.nn.Linear(D, V, bias=bias).to(dtype)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(emb.weight.shape, generator=g))
        head_lin.weight.copy_(torch.randn(V, D, generator=g) / D**0.5)
        if bias:
            head_lin.bias.copy_(torch.randn(V, generator=g) * 0.1)
    if tied:
        head_lin.weight = emb.weight
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    loss_mask = torch.rand(B, T, generator=g) > 0.25
    doc = torch.tensor([[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 2]])
    mv = lambda m: m.to(device)  # noqa: E731
    return mv(emb), mv(head_lin), hidden.detach().to(device).requires_grad_(), mv(ids), mv(loss_mask), mv(doc)


def grads_of(out, params):
    gs = torch.autograd.grad(out, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("horizon", [1, 2, 4])
@pytest.mark.parametrize("tied,bias", [(False, True), (True, False)])
def test_head_matches_spec(backend, horizon, tied, bias):
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = backend_device(backend)
    torch.manual_seed(0)
    head = NextLatHead(D, None if tied else E, horizon=horizon, mlp_hidden=H, lambda_h=0.7, lambda_kl=1.3, backend=backend).to(dtype).to(device)
    emb, lin, hidden, ids, mask, doc = setup(dtype, device, tied, bias)
    out = head(hidden, ids, emb, lin, loss_mask=mask, doc_ids=doc)
    params = [hidden, emb.weight] + ([] if tied else [lin.weight]) + ([lin.bias] if bias else []) + list(head.parameters())
    g = grads_of(out.total, params)
    ref = spec_objective(head, hidden, ids, emb.weight, lin.weight, lin.bias, mask, doc, horizon, 0.7, 1.3)
    rg = grads_of(ref[0], params)
    tol = dict(atol=1e-9, rtol=1e-7) if dtype == torch.float64 else dict(atol=5e-5, rtol=5e-4)
    for name, a, r in zip(("total", "ce", "latent", "kl"), out, ref):
        assert_close(a, r, name=name, **tol)
    assert out.kl.item() > 0 and out.latent.item() > 0
    for i, (a, r) in enumerate(zip(g, rg)):
        assert_close(a, r, name=f"grad {i}", **tol)


def test_lambda_kl_zero_skips_the_kl_rows(monkeypatch):
    """lambda_kl = 0 (the GPT baseline, ablations): the fused loss gets no KL rows (their student
    logits are its main cost), kl is reported as 0, and total and every gradient equal the spec's
    objective with lambda_kl = 0. Also: the head passes its deterministic flag to the fused loss."""
    import fastmodels.nextlat as nl

    seen = []
    real = nl.linear_cross_entropy_kl
    monkeypatch.setattr(nl, "linear_cross_entropy_kl", lambda *a, **k: seen.append((a[3], k["deterministic"])) or real(*a, **k))
    torch.manual_seed(0)
    head = NextLatHead(D, E, horizon=2, mlp_hidden=H, lambda_h=0.7, lambda_kl=0.0, deterministic=True).double()
    emb, lin, hidden, ids, mask, doc = setup(torch.float64, "cpu", False, True)
    out = head(hidden, ids, emb, lin, loss_mask=mask, doc_ids=doc)
    assert seen == [(None, True)] and out.kl.item() == 0.0  # and the deterministic flag is passed on
    ref = spec_objective(head, hidden, ids, emb.weight, lin.weight, lin.bias, mask, doc, 2, 0.7, 0.0)
    params = [hidden, emb.weight, lin.weight, lin.bias] + list(head.parameters())
    for name, a, r in zip(("total", "ce", "latent"), out, ref):
        assert_close(a, r, name=name, atol=1e-9, rtol=1e-7)
    for i, (a, r) in enumerate(zip(grads_of(out.total, params), grads_of(ref[0], params))):
        assert_close(a, r, name=f"grad {i}", atol=1e-9, rtol=1e-7)


def test_doc_start_equals_doc_ids_and_no_mask():
    head = NextLatHead(D, E, horizon=2, mlp_hidden=H).double()
    emb, lin, hidden, ids, mask, doc = setup(torch.float64, "cpu", False, True)
    start = torch.zeros(B, T, dtype=torch.bool)
    start[:, 0] = True
    start[1, 3] = start[1, 6] = True
    a = head(hidden, ids, emb, lin, loss_mask=mask, doc_ids=doc)
    b = head(hidden, ids, emb, lin, loss_mask=mask, doc_start=start)
    for x, y in zip(a, b):
        assert_close(x, y)
    full = head(hidden, ids, emb, lin)
    ref = spec_objective(head, hidden, ids, emb.weight, lin.weight, lin.bias, torch.ones(B, T), torch.zeros(B, T), 2, 1.0, 1.0)
    for x, y in zip(full, ref):
        assert_close(x, y, atol=1e-9, rtol=1e-7)


def test_reused_document_labels_are_runs():
    """A document is a run of equal doc_ids: a label used again later is a new document, so no
    rollout passes through the document between."""
    head = NextLatHead(D, E, horizon=4, mlp_hidden=H).double()
    emb, lin, hidden, ids, mask, _ = setup(torch.float64, "cpu", False, True)
    reused = torch.tensor([[0, 0, 1, 1, 0, 0, 0], [3, 3, 3, 5, 5, 3, 3]])
    runs = torch.tensor([[0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 2, 2]])
    a = head(hidden, ids, emb, lin, loss_mask=mask, doc_ids=reused)
    b = head(hidden, ids, emb, lin, loss_mask=mask, doc_ids=runs)
    ref = spec_objective(head, hidden, ids, emb.weight, lin.weight, lin.bias, mask, runs, 4, 1.0, 1.0)
    for x, y, r in zip(a, b, ref):
        assert_close(x, y)
        assert_close(x, r, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("pad_value", ["random", "nan"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_takes_part_in_no_term(side, pad_value):
    """attention_mask: a padded sequence gives exactly the loss of the unpadded one (SmoothL1
    included, which loss_mask leaves on), and the hidden states at padding get no gradient, even
    when they are NaN (what an LM can leave in a fully masked attention row)."""
    head = NextLatHead(D, E, horizon=2, mlp_hidden=H).double()
    emb, lin, hidden, ids, _, _ = setup(torch.float64, "cpu", False, True)
    n, p = 5, 2
    real_h, real_ids = hidden[:1, :n].detach(), ids[:1, :n]
    alone = head(real_h, real_ids, emb, lin)
    pad_h = 5 * torch.randn(1, p, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if pad_value == "nan":
        pad_h[0, 0, 1:] = float("nan")
        pad_h[0, -1] = float("inf")
    pad_ids = torch.zeros(1, p, dtype=ids.dtype)
    cat = (lambda real, pad: torch.cat([real, pad], 1)) if side == "right" else (lambda real, pad: torch.cat([pad, real], 1))
    h = cat(real_h, pad_h).requires_grad_()
    attention_mask = cat(torch.ones(1, n), torch.zeros(1, p)).long()
    out = head(h, cat(real_ids, pad_ids), emb, lin, attention_mask=attention_mask)
    for x, y in zip(out, alone):
        assert_close(x, y)
    (g,) = torch.autograd.grad(out.total, h)
    assert not g[attention_mask == 0].any() and g[attention_mask == 1].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bfloat16(backend):
    """Mixed precision: an fp32 head and LM under torch.autocast(bfloat16) train (forward and
    backward run, gradients are fp32 and close to the fp32 ones)."""
    device = backend_device(backend)
    head = NextLatHead(D, E, horizon=2, mlp_hidden=H, backend=backend).to(device)
    emb, lin, hidden, ids, mask, doc = setup(torch.float32, device, False, True)
    params = [hidden, emb.weight, lin.weight] + list(head.parameters())
    ref = head(hidden, ids, emb, lin, loss_mask=mask, doc_ids=doc)
    g_ref = grads_of(ref.total, params)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = head(hidden, ids, emb, lin, loss_mask=mask, doc_ids=doc)
    g = grads_of(out.total, params)
    assert_close(out.total.float(), ref.total, atol=0.0, rtol=3e-2)
    for a, r in zip(g, g_ref):
        assert a.dtype == torch.float32
        assert (a - r).norm() <= 0.1 * r.norm() + 1e-6


def test_horizon_longer_than_sequence():
    head = NextLatHead(D, E, horizon=8, mlp_hidden=H).double()
    emb, lin, hidden, ids, mask, doc = setup(torch.float64, "cpu", False, True)
    out = head(hidden, ids, emb, lin, loss_mask=mask, doc_ids=doc)
    ref = spec_objective(head, hidden, ids, emb.weight, lin.weight, lin.bias, mask, doc, 8, 1.0, 1.0)
    for x, y in zip(out, ref):
        assert_close(x, y, atol=1e-9, rtol=1e-7)


def test_weight_tensors_and_single_token():
    head = NextLatHead(D, E, horizon=2, mlp_hidden=H).double()
    emb, lin, hidden, ids, mask, doc = setup(torch.float64, "cpu", False, False)
    a = head(hidden, ids, emb.weight, lin.weight)
    b = head(hidden, ids, emb, lin)
    for x, y in zip(a, b):
        assert_close(x, y)
    one = head(hidden[:, :1], ids[:, :1], emb, lin)
    assert all(v.item() == 0 for v in one)
    # empty sequences (T = 0) with masks: zeros, like without them (was an IndexError)
    z = torch.zeros(B, 0, dtype=torch.long)
    for masks in (dict(attention_mask=z), dict(doc_ids=z), dict(doc_start=z.bool(), loss_mask=z.bool())):
        empty = head(hidden[:, :0], ids[:, :0], emb, lin, **masks)
        assert all(v.item() == 0 for v in empty), masks


def test_bad_inputs():
    head = NextLatHead(D, E, horizon=1, mlp_hidden=H).double()
    emb, lin, hidden, ids, mask, doc = setup(torch.float64, "cpu", False, True)
    with pytest.raises(ValueError, match="hidden"):
        head(hidden[0], ids, emb, lin)
    with pytest.raises(ValueError, match="input_ids"):
        head(hidden, ids[:, :-1], emb, lin)
    with pytest.raises(ValueError, match="loss_mask"):
        head(hidden, ids, emb, lin, loss_mask=mask[:1])
    with pytest.raises(ValueError, match="doc_ids"):
        head(hidden, ids, emb, lin, doc_ids=doc[:, :3])
    with pytest.raises(ValueError, match="attention_mask"):
        head(hidden, ids, emb, lin, attention_mask=mask[:, :2])
    with pytest.raises(ValueError, match="embedding"):
        head(hidden, ids, torch.nn.Embedding(V, E + 1).double(), lin)
    bad_ids = ids.clone()
    bad_ids[1, 3] = V
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 29\)"):
        head(hidden, bad_ids, emb, lin)
    with pytest.raises(TypeError, match="hidden: expected torch.float64"):
        head(hidden.float(), ids, emb, lin)
    with pytest.raises(TypeError, match="lm_head"):
        head(hidden, ids, emb, "head")
    with pytest.raises(ValueError, match="horizon"):
        NextLatHead(D, horizon=0)
    with pytest.raises(ValueError, match="lambda_kl"):
        NextLatHead(D, lambda_kl=-1.0)
    with pytest.raises(TypeError, match=r"deterministic \(a bool, or None for torch's flag\): expected a bool, got int"):
        NextLatHead(D, deterministic=1)


def test_bad_input_types():
    """Non-tensors, wrong id dtypes and wrongly typed constructor arguments are TypeErrors naming
    the argument (not an AttributeError, or a RuntimeError from inside the embedding lookup), and
    a non-finite loss weight is refused."""
    head = NextLatHead(D, E, horizon=1, mlp_hidden=H).double()
    emb, lin, hidden, ids, mask, doc = setup(torch.float64, "cpu", False, True)
    with pytest.raises(TypeError, match="hidden: expected a torch.Tensor"):
        head(hidden.tolist(), ids, emb, lin)
    with pytest.raises(TypeError, match="input_ids: expected a torch.Tensor"):
        head(hidden, ids.tolist(), emb, lin)
    for bad in (ids.float(), ids.to(torch.int16), ids.bool()):
        with pytest.raises(TypeError, match="input_ids: expected dtype"):
            head(hidden, bad, emb, lin)
    for name in ("loss_mask", "doc_ids", "doc_start", "attention_mask"):
        with pytest.raises(TypeError, match=f"{name}: expected a torch.Tensor"):
            head(hidden, ids, emb, lin, **{name: mask.tolist()})
    with pytest.raises(ValueError, match=r"embedding: expected a \[V, E\] weight tensor"):
        head(hidden, ids, emb.weight[0], lin)
    for kw in (dict(d_model=float(D)), dict(horizon=2.0), dict(mlp_hidden="16"), dict(lambda_h="1")):
        with pytest.raises(TypeError, match=next(iter(kw))):
            NextLatHead(**{"d_model": D, **kw})
    for kw in (dict(lambda_h=float("inf")), dict(lambda_kl=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(kw))):
            NextLatHead(D, **kw)


def test_rollout_checks_its_inputs():
    """rollout() validates hidden [B, T, D] and emb [B, T, E] like forward (it is public, for
    evaluation) instead of failing inside torch.cat or the LayerNorm."""
    head = NextLatHead(D, E, horizon=2, mlp_hidden=H).double()
    emb, lin, hidden, ids, mask, doc = setup(torch.float64, "cpu", False, True)
    e = emb(ids)
    assert [tuple(p.shape) for p in head.rollout(hidden, e)] == [(B, T - 1, D), (B, T - 2, D)]
    for bad in (e[:, :3], e[:1], e[..., :-1], ids):
        with pytest.raises(ValueError, match="emb: expected shape"):
            head.rollout(hidden, bad)
    with pytest.raises(TypeError, match="emb: expected a torch.Tensor"):
        head.rollout(hidden, None)
    with pytest.raises(ValueError, match="hidden: expected shape"):
        head.rollout(hidden[0], e[0])
    with pytest.raises(TypeError, match="hidden: expected torch.float64"):
        head.rollout(hidden.float(), e)


@pytest.mark.no_poison
def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    head = NextLatHead(D, E, horizon=2, mlp_hidden=H, lambda_kl=0.5)
    emb, lin, hidden, ids, mask, doc = setup(torch.float32, "cpu", False, True)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    out = compiled(hidden, ids, emb, lin, loss_mask=mask, doc_ids=doc)
    params = [hidden, emb.weight, lin.weight, lin.bias] + list(head.parameters())
    g = grads_of(out.total, params)
    eager = head(hidden, ids, emb, lin, loss_mask=mask, doc_ids=doc)
    ge = grads_of(eager.total, params)
    for x, y in zip(out, eager):
        assert_close(x, y)
    for x, y in zip(g, ge):
        assert_close(x, y)
    # variable lengths under dynamic shapes: later lengths reuse the first graph
    dyn = torch.compile(head, fullgraph=True, backend="aot_eager", dynamic=True)
    for i, t in enumerate((T, T - 2, T - 3)):
        args = [a[:, :t].clone() for a in (hidden, ids)] + [emb, lin]  # not views: their bases would be guarded
        masks = dict(loss_mask=mask[:, :t].clone(), doc_ids=doc[:, :t].clone())
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            out = dyn(*args, **masks)
        for x, y in zip(out, head(*args, **masks)):
            assert_close(x, y)

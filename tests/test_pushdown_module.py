"""PushdownAttention module, incremental decoding with a KV cache, torch.compile, GPT-2 helper."""

import random

import pytest
import torch
from helpers import assert_rms_close, backend_device, op_backends

import fastmodels
from fastmodels.ops import pushdown_attention
from fastmodels.ops.pushdown import pushdown_attention_reference
from fastmodels.pushdown import PushdownAttention, StackTape, StackTapeBuilder, pushdownify_gpt2, set_stack_tape


def random_tree(rng, n):
    if n == 1:
        return "w"
    k = rng.randint(2, min(3, n))
    cuts = sorted(rng.sample(range(1, n), k - 1))
    return [random_tree(rng, b - a) for a, b in zip([0] + cuts, cuts + [n])]


def tree_attachments(tree_spans_list, n):
    from fastmodels.pushdown.tape import attachments_from_spans

    return attachments_from_spans(n, tree_spans_list)


def test_module_matches_reference_math():
    torch.manual_seed(0)
    m = PushdownAttention(48, 3, max_depth=7, per_head_table=True).double()
    x = torch.randn(2, 19, 48, dtype=torch.float64)
    tape = StackTape.from_trees([random_tree(random.Random(1), 19), random_tree(random.Random(2), 11)], pad_to=19)
    y = m(x, tape)
    q, k, v = m.qkv(x).view(2, 19, 3, 3, 16).permute(2, 0, 3, 1, 4)
    o = pushdown_attention_reference(q, k, v, m.depth_emb, tape.dense(), scale=16**-0.5)
    assert_rms_close(y, m.proj(o.transpose(1, 2).reshape(2, 19, 48)), 1e-12)
    assert fastmodels.PushdownAttention is PushdownAttention
    # gradients reach every parameter, the depth table included
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_incremental_decoding_matches_full_forward():
    """Token by token with a KV cache and the builder's depth row == the full forward."""
    from fastmodels.pushdown.tape import tree_spans

    rng = random.Random(3)
    T = 17
    trees = [random_tree(rng, T) for _ in range(2)]
    atts = [tree_attachments(tree_spans(t)[1], T) for t in trees]
    m = PushdownAttention(32, 2, max_depth=5).double().eval()
    x = torch.randn(2, T, 32, dtype=torch.float64)
    full = m(x, StackTape.from_trees(trees))
    builder, cache, steps = StackTapeBuilder(2), {}, []
    for t in range(T):
        row = builder.push([a[t] for a in atts])
        steps.append(m(x[:, t : t + 1], row[:, None, :], cache=cache))
    assert cache["k"].shape == (2, 2, T, 16)
    assert_rms_close(torch.cat(steps, dim=1), full, 1e-12)
    assert torch.equal(builder.tape().depth, StackTape.from_trees(trees).depth)

    # a beam reorder halfway (the builders and the cache reordered together, a parent kept twice),
    # decoding without the per-step value check
    parents, half = [1, 1, 0], T // 2
    builder, cache, steps = StackTapeBuilder(2), {}, []
    for t in range(T):
        if t == half:
            builder = builder.select(parents)
            cache = {name: kv[parents] for name, kv in cache.items()}
            x_t, atts_t = x[parents], [atts[p] for p in parents]
        xs, att = (x, atts) if t < half else (x_t, atts_t)
        row = builder.push([a[t] for a in att])
        steps.append(m(xs[:, t : t + 1], row[:, None, :], cache=cache, check_values=False))
    assert_rms_close(torch.cat(steps[half:], dim=1), full[parents, half:], 1e-12)


def _decode_setup(T, seed):
    from fastmodels.pushdown.tape import tree_spans

    rng = random.Random(seed)
    trees = [random_tree(rng, T) for _ in range(2)]
    atts = [tree_attachments(tree_spans(t)[1], T) for t in trees]
    torch.manual_seed(seed)
    m = PushdownAttention(32, 2, max_depth=5).double().eval()
    x = torch.randn(2, T, 32, dtype=torch.float64)
    return m, x, trees, atts


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_decoding_cache_appends_in_place(mode):
    """Without autograd the cache appends into capacity buffers: token by token past a growth
    (T = 70 > 64 positions), then a 3-token chunk (the blocked path on strided views), equals the
    full forward; one buffer serves every step between growths; a view handed out earlier keeps
    its contents."""
    from fastmodels.pushdown._cache import _MIN_CAPACITY

    T = 70
    assert _MIN_CAPACITY < T - 3
    m, x, trees, atts = _decode_setup(T, 4)
    tape = StackTape.from_trees(trees)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        full = m(x, tape)
        builder, cache, steps, held = StackTapeBuilder(2), {}, [], []
        for t in range(T - 3):
            row = builder.push([a[t] for a in atts])
            steps.append(m(x[:, t : t + 1], row[:, None, :], cache=cache, check_values=False))
            held.append(cache["k"])  # kept alive: distinct storages have distinct addresses
            if t == 10:
                early, early_copy = cache["k"], cache["k"].clone()
        steps.append(m(x[:, T - 3 :], tape.dense()[:, T - 3 :], cache=cache))
        assert cache["k"].shape == (2, 2, T, 16) and cache["v"].shape == (2, 2, T, 16)
        assert_rms_close(torch.cat(steps, dim=1), full, 1e-12)
        # in place: the cache is a view of a buffer, the same one until it grows past its capacity
        store = [h.untyped_storage().data_ptr() for h in held]
        assert len(set(store)) == 2 and store[0] == store[_MIN_CAPACITY - 1] and store[_MIN_CAPACITY] == store[-1]
        assert torch.equal(early, early_copy)


@pytest.mark.parametrize("backend", op_backends("pushdown_attention", include_reference=True))
def test_decoding_cache_views_on_every_backend(backend):
    """Every backend decodes from the cache's views of its capacity buffer (the triton backend
    copies them, the others read them in place) as the full forward computes."""
    T = 9
    m, x, trees, _ = _decode_setup(T, 7)
    dtype = torch.float32 if backend == "triton" else torch.float64
    dev = backend_device(backend)
    m = m.to(device=dev, dtype=dtype)
    m.backend = backend
    x, dense = x.to(device=dev, dtype=dtype), StackTape.from_trees(trees).dense().to(dev)
    with torch.no_grad():
        full = m(x, dense)
        cache = {}
        steps = [m(x[:, t : t + 1], dense[:, t : t + 1, : t + 1], cache=cache) for t in range(T)]
    assert not cache["k"].is_contiguous()  # a prefix of the capacity buffer
    assert_rms_close(torch.cat(steps, 1), full, 1e-12 if dtype == torch.float64 else 2e-5)


def test_decoding_cache_branches_cuts_and_reorders():
    """A dict copied to branch a decode, a cache cut back to a prefix and reorder_cache (a parent
    kept twice) each decode as a fresh computation would: writes never reach another branch's
    positions."""
    T, branch = 30, 12
    m, x, trees, atts = _decode_setup(T, 5)
    dense = StackTape.from_trees(trees).dense()
    x2 = torch.randn(2, 1, 32, dtype=torch.float64)
    with torch.no_grad():
        full = m(x, dense)
        other = m(torch.cat([x[:, :branch], x2], 1), dense[:, : branch + 1, : branch + 1])[:, -1]  # x2 at position branch
        cache = {}
        for t in range(branch):
            m(x[:, t : t + 1], dense[:, t : t + 1, : t + 1], cache=cache)
        side = dict(cache)  # shares the buffer
        got_side = m(x2, dense[:, branch : branch + 1, : branch + 1], cache=side)[:, 0]
        side_k = side["k"].clone()
        steps = [m(x[:, t : t + 1], dense[:, t : t + 1, : t + 1], cache=cache) for t in range(branch, T)]
        assert_rms_close(torch.cat(steps, 1), full[:, branch:], 1e-12)
        assert_rms_close(got_side, other, 1e-12)
        assert torch.equal(side["k"], side_k)  # the main line's appends did not overwrite it

        # cut back to 20 positions and decode position 20 again
        before_cut, before_copy = cache["k"], cache["k"].clone()
        cache["k"], cache["v"] = cache["k"][:, :, :20], cache["v"][:, :, :20]
        again = m(x[:, 20:21], dense[:, 20:21, :21], cache=cache)
        assert_rms_close(again, full[:, 20:21], 1e-12)
        assert cache["k"].shape[2] == 21 and torch.equal(side["k"], side_k)
        assert torch.equal(before_cut, before_copy)  # position 20 was written into a new buffer

        # beam reorder halfway, with the builder; a parent kept twice
        parents, half = [1, 1, 0], T // 2
        builder, cache, steps = StackTapeBuilder(2), {}, []
        for t in range(T):
            if t == half:
                builder = builder.select(parents)
                PushdownAttention.reorder_cache(cache, torch.tensor(parents))
                assert cache["k"].shape == (3, 2, half, 16)
            xs, att = (x, atts) if t < half else (x[parents], [atts[p] for p in parents])
            row = builder.push([a[t] for a in att])
            steps.append(m(xs[:, t : t + 1], row[:, None, :], cache=cache, check_values=False))
        assert_rms_close(torch.cat(steps[half:], dim=1), full[parents, half:], 1e-12)
        assert cache["k"].untyped_storage().nbytes() > cache["k"].nbytes  # still a view of a capacity buffer


def test_cache_views_saved_for_backward_survive_later_appends():
    """A cache view passed to a differentiable call (a loss over a sampled decode) still
    backpropagates after later no-grad appends into the same buffer, with the gradients of the
    values it held: appends only write positions no view covers, and leave the version alone."""
    m, x, _, _ = _decode_setup(8, 8)
    dense = torch.zeros(2, 8, 8, dtype=torch.int64)
    cache = {}
    with torch.no_grad():
        for t in range(3):
            m(x[:, t : t + 1], dense[:, t : t + 1, : t + 1], cache=cache)
    k, v = cache["k"], cache["v"]
    q = torch.randn(2, 2, 1, 16, dtype=torch.float64, requires_grad=True)
    y = pushdown_attention(q, k, v, m.depth_emb, dense[:, 2:3, :3])
    want = torch.autograd.grad(pushdown_attention(q, k.clone(), v.clone(), m.depth_emb, dense[:, 2:3, :3]).square().sum(), (q, m.depth_emb))
    with torch.no_grad():
        for t in range(3, 8):
            m(x[:, t : t + 1], dense[:, t : t + 1, : t + 1], cache=cache)
    assert k.untyped_storage().data_ptr() == cache["k"].untyped_storage().data_ptr()  # the same buffer, appended to
    got = torch.autograd.grad(y.square().sum(), (q, m.depth_emb))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_module_tape_on_another_device_names_the_module_input():
    m = PushdownAttention(32, 4, backend="reference")
    x = torch.randn(2, 4, 32)
    dense = StackTape.from_trees(["((a b) (c d))", "(a (b (c d)))"]).dense()
    with pytest.raises(ValueError, match=r"tape: expected a tensor on cpu \(the device of x\), got one on meta"):
        m(x, dense.to("meta"))


def test_reorder_cache_with_autograd_and_bad_parents():
    """With autograd the cache concatenates, and reorder_cache indexes it; bad parents are named."""
    m, x, _, _ = _decode_setup(6, 6)
    dense = torch.zeros(2, 6, 6, dtype=torch.int64)
    cache = {}
    m(x[:, :3], dense[:, :3, :3], cache=cache)
    m(x[:, 3:4], dense[:, 3:4, :4], cache=cache)
    assert cache["k"].is_contiguous() and cache["k"].requires_grad  # concatenated
    want = cache["k"][[1, 0, 0]]
    PushdownAttention.reorder_cache(cache, [1, 0, 0])
    assert torch.equal(cache["k"], want) and cache["v"].shape[0] == 3
    for bad, match in (([3], r"parents: expected indices in \[0, 3\)"), ([-1], "parents: expected indices"),
                       ([[0, 1]], "parents: expected a 1-D sequence"), ([0.5], "parents: expected a 1-D sequence"),
                       ([], "parents: expected at least one"), (torch.tensor([], dtype=torch.long), "parents: expected at least one")):
        with pytest.raises(ValueError, match=match):
            PushdownAttention.reorder_cache(cache, bad)
    with pytest.raises(ValueError, match="cache: expected a dict filled by an earlier forward"):
        PushdownAttention.reorder_cache({}, [0])


@pytest.mark.no_poison
def test_torch_compile_fullgraph_module():
    torch.manual_seed(0)
    m = PushdownAttention(32, 2, max_depth=6, bias=False)
    x = torch.randn(2, 13, 32)
    tape = StackTape.from_trees([random_tree(random.Random(4), 13), random_tree(random.Random(5), 13)])
    dense = tape.dense()
    eager = m(x, tape)
    eager.sum().backward()
    g_eager = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for t in (tape, dense):
        out = compiled(x, t)
        assert_rms_close(out, eager, 2e-6)
    out.sum().backward()
    for g, p in zip(g_eager, m.parameters()):
        assert_rms_close(p.grad, g, 2e-5)


@pytest.mark.no_poison
def test_torch_compile_serves_every_length_from_one_graph():
    """Training on variable lengths: compiled with dynamic shapes, the module (its op's fake kernel
    included) must not specialize on T, so later lengths reuse the first graph, values and
    gradients still equal eager."""
    torch.manual_seed(0)
    m = PushdownAttention(32, 2, max_depth=6, backend="cpu")
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=True)
    for i, T in enumerate((9, 13, 20)):
        x = torch.randn(2, T, 32, requires_grad=True)
        tape = StackTape.from_trees([random_tree(random.Random(T), T), random_tree(random.Random(T + 1), T)])
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            out = compiled(x, tape)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        eager = m(x, tape)
        assert_rms_close(out, eager, 2e-6)
        assert_rms_close(g, torch.autograd.grad(eager.square().sum(), x)[0], 2e-5)


def test_module_errors():
    with pytest.raises(ValueError, match="d_model"):
        PushdownAttention(30, 4)
    with pytest.raises(ValueError, match="max_depth"):
        PushdownAttention(32, 4, max_depth=1, binary=True)
    assert PushdownAttention(32, 4, binary=True).depth_emb.shape == (2, 8)
    m = PushdownAttention(32, 4)
    tape = StackTape.from_trees(["((a b) c)"])
    with pytest.raises(ValueError, match=r"x: expected a tensor \[B, T, 32\]"):
        m(torch.randn(1, 3, 31), tape)
    with pytest.raises(ValueError, match="x: expected"):
        m(torch.randn(3, 32), tape)




def _tiny_gpt2(**options):
    tf = pytest.importorskip("transformers")
    cfg = tf.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=3, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        **options)
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("options", [
    {"scale_attn_by_inverse_layer_idx": True},
    {"scale_attn_weights": False},
    {"scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True},
], ids=["inverse-layer-idx", "unscaled", "both"])
def test_pushdownify_gpt2_keeps_attention_scaling(options):
    """pushdownify_gpt2 keeps GPT-2's attention scaling options: a converted model with zero depth
    tables equals the pretrained one also with scale_attn_by_inverse_layer_idx=True (scale / (i + 1)
    in layer i) and with scale_attn_weights=False (no 1/sqrt(D))."""
    model = _tiny_gpt2(attn_implementation="eager", **options)
    with torch.no_grad():  # larger q/k weights: the scale then changes the logits clearly
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(4.0)
    ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        base = model(ids, use_cache=False).logits
        pushdownify_gpt2(model, backend="reference")
        tape = StackTape.from_trees(["((a (b c)) ((d e) (f (g (h i)))) (j k))", "(a (b (c (d (e (f (g (h (i (j k))))))))))"])
        set_stack_tape(model, tape)
        out = model(ids, use_cache=False).logits
    assert_rms_close(out, base, 1e-5)  # zero depth tables: the pretrained model, scaling included


def test_pushdownify_gpt2_starts_equal_and_trains_depth_table():
    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        base = model(ids, use_cache=False).logits
    pushdownify_gpt2(model, layers=[0, 2])
    tape = StackTape.from_trees([random_tree(random.Random(6), 11), random_tree(random.Random(7), 11)])
    set_stack_tape(model, tape)
    out = model(ids, use_cache=False).logits
    assert_rms_close(out, base, 1e-5)  # zero depth tables: the pretrained model is unchanged
    layer = model.transformer.h[0].attn
    assert "transformer.h.0.attn.c_attn.weight" in dict(model.named_parameters())  # keys kept
    torch.nn.init.normal_(layer.depth_emb, std=0.5)
    out2 = model(ids, use_cache=False).logits
    assert (out2 - base).abs().max() > 1e-3
    out2.logsumexp(-1).sum().backward()
    assert layer.depth_emb.grad is not None and layer.depth_emb.grad.abs().sum() > 0
    assert type(model.transformer.h[1].attn).__name__ == "GPT2Attention"
    with pytest.raises(ValueError, match="layers"):
        pushdownify_gpt2(model, layers=[5])
    # a dense tape is checked once in set_stack_tape, not per layer; unchecked negatives read as 0
    dense = tape.dense()
    with torch.no_grad():
        set_stack_tape(model, dense)
        want = model(ids, use_cache=False).logits
        neg = torch.where(dense == 0, -3, dense)
        with pytest.raises(ValueError, match="tape: expected non-negative depths"):
            set_stack_tape(model, neg)
        set_stack_tape(model, neg, check_values=False)
        assert_rms_close(model(ids, use_cache=False).logits, want, 1e-6)


def test_module_constructor_and_cache_errors():
    """Bad constructor arguments and KV caches are named, not a ZeroDivisionError or a torch.cat error."""
    with pytest.raises(ValueError, match="n_heads: expected an int >= 1"):
        PushdownAttention(32, 0)
    with pytest.raises(ValueError, match="n_heads: expected an int >= 1"):
        PushdownAttention(32, -4)
    with pytest.raises(ValueError, match="d_model: expected an int >= 1"):
        PushdownAttention(0, 4)
    with pytest.raises(TypeError, match="max_depth: expected an int"):
        PushdownAttention(32, 4, max_depth=2.5)
    with pytest.raises(TypeError, match="binary: expected a bool"):
        PushdownAttention(32, 4, binary="no")
    m = PushdownAttention(32, 4, backend="reference")
    x = torch.randn(2, 4, 32)
    dense = StackTape.from_trees(["((a b) (c d))", "(a (b (c d)))"]).dense()
    with pytest.raises(TypeError, match="cache: expected a dict"):
        m(x, dense, cache=[])
    cache = {}
    m(x[:1, :3], dense[:1, :3, :3], cache)  # a cache of batch 1
    with pytest.raises(ValueError, match=r"cache\['k'\]: expected shape \[2, 4, T_past, 8\]"):
        m(x[:, 3:], dense[:, 3:], cache)
    with pytest.raises(TypeError, match=r"cache\['v'\]: expected a torch.Tensor"):
        m(x[:1, 3:], dense[:1, 3:], {"k": cache["k"]})


def test_pushdownify_gpt2_refuses_bad_arguments_before_converting():
    model = _tiny_gpt2()
    with pytest.raises(ValueError, match="layers: index 5 is out of range"):
        pushdownify_gpt2(model, layers=[0, 5])
    with pytest.raises(TypeError, match="layers"):
        pushdownify_gpt2(model, layers=[1.0])
    with pytest.raises(ValueError, match="max_depth: expected an int >= 1"):
        pushdownify_gpt2(model, max_depth=0)
    assert all(type(b.attn).__name__ == "GPT2Attention" for b in model.transformer.h)  # none converted
    pushdownify_gpt2(model, layers=torch.tensor([1]))  # index tensors work, as for a ModuleList
    assert [type(b.attn).__name__ for b in model.transformer.h][:2] == ["GPT2Attention", "GPT2PushdownAttention"]

"""The attachment head (spec section 4): the factored score op's reference vs a per-pair loop,
AttachmentHead vs the authors' per-pair MLP over [k'_j ; E'[S]], gold targets and stack masks vs a
replay through StackTapeBuilder, decoding against the full forward, bad input, torch.compile."""

import random
import re

import pytest
import torch
import torch.nn.functional as F

from fastmodels.ops import attachment_scores
from fastmodels.pushdown import AttachmentHead, StackTape, StackTapeBuilder
from fastmodels.pushdown.tape import attachments_from_spans

from helpers import op_backend_unavailable_reason

nltk = pytest.importorskip("nltk")

from test_pushdown_tape import oracle_spans, random_tree  # noqa: E402


def random_tapes(rng: random.Random, lengths):
    """A padded StackTape of random n-ary trees with unary chains, and their (n, spans)."""
    sentences = []
    for n in lengths:
        spans = oracle_spans(random_tree(rng, n)) if n else []
        sentences.append((n, spans))
    return StackTape.from_spans(sentences), sentences


# ---------------------------------------------------------------------------------------------
# The op's reference vs a loop over pairs
# ---------------------------------------------------------------------------------------------


def loop_scores(q, keys, feat, S, binary):
    B, Tq, _ = q.shape
    Tk, V = keys.shape[1], feat.shape[0]
    out = torch.full((B, Tq, Tk), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for i in range(Tq):
            t = Tk - Tq + i
            for j in range(t + 1):
                s = int(S[b, i, j])
                v = int(s > 0) if binary else min(max(s, 0), V - 1)
                out[b, i, j] = (q[b, i] * torch.relu(keys[b, j] + feat[v])).sum()
    return out


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("Tq", [9, 3, 1])
def test_reference_vs_pair_loop(binary, Tq):
    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    tape, _ = random_tapes(rng, [9, 6])
    V, W = 3, 5
    q = torch.randn(2, Tq, W, generator=g, dtype=torch.float64)
    keys = torch.randn(2, 9, W, generator=g, dtype=torch.float64)
    feat = torch.randn(V, W, generator=g, dtype=torch.float64)
    want = loop_scores(q, keys, feat, tape.dense(rows=Tq), binary)
    for t in (tape, tape.dense(rows=Tq).to(torch.int16)):
        got = attachment_scores(q, keys, feat, t, binary=binary, backend="reference")
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_low_precision_inputs_give_float32_scores():
    g = torch.Generator().manual_seed(2)
    tape = StackTape.from_trees(["((a b) (c d))"])
    q, keys, feat = (torch.randn(*s, generator=g).to(torch.bfloat16) for s in ((1, 4, 8), (1, 4, 8), (3, 8)))
    got = attachment_scores(q, keys, feat, tape, backend="reference")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loop_scores(q.double(), keys.double(), feat.double(), tape.dense(), False).float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# AttachmentHead vs the authors' per-pair MLP
# ---------------------------------------------------------------------------------------------


def authors_form(head: AttachmentHead, hidden, next_embed, S):
    """q~ . MLP([k'_j ; E'[S(t, j)]]) with the MLP applied to the concatenation of every pair
    ([B, T, T, d_model + V] inputs), k'_j = h_j and E' = one-hot rows: W1 = [W_k | depth_feat^T]."""
    B, T, _ = hidden.shape
    V = head.depth_feat.shape[0]
    x = torch.cat([hidden, next_embed], -1)
    qt = head.query(x)
    idx = (S > 0).long() if head.binary else S.long().clamp(0, V - 1)
    pair = torch.cat([hidden[:, None].expand(B, T, T, -1), F.one_hot(idx, V).to(hidden.dtype)], -1)
    W1 = torch.cat([head.key.weight, head.depth_feat.t()], 1)
    mlp = F.linear(torch.relu(F.linear(pair, W1, head.key.bias)), head.out.weight, head.out.bias)
    reduce = torch.einsum("btw,btjw->btj", qt, mlp)
    t = torch.arange(T)
    reduce = reduce.masked_fill(t[None, :] > t[:, None], float("-inf"))
    shift = (qt * head.shift(x)).sum(-1, keepdim=True)
    return torch.cat([reduce, shift], -1)


@pytest.mark.parametrize("binary", [False, True])
def test_head_equals_the_authors_per_pair_mlp(binary):
    torch.manual_seed(3)
    tape, _ = random_tapes(random.Random(3), [11, 7, 1])
    head = AttachmentHead(12, width=10, hidden=9, max_depth=4, binary=binary, d_embed=6, backend="reference").double()
    hidden, nxt = torch.randn(3, 11, 12, dtype=torch.float64), torch.randn(3, 11, 6, dtype=torch.float64)
    got = head(hidden, nxt, tape)
    want = authors_form(head, hidden, nxt, tape.dense())
    assert got.shape == (3, 11, 12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    targets = tape.attachment_targets()
    g_got = torch.autograd.grad(head.loss(got, targets), list(head.parameters()))
    g_want = torch.autograd.grad(head.loss(want, targets), list(head.parameters()))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_relative_position_term():
    """relative_positions=True adds q~_t . W_r r(t + 1 - j) to key j and q~_t . W_r r(0) to the
    shift (r: sinusoidal encoding of a distance), written here as a loop over pairs; queries
    that are the last Tq of Tk positions (a decoding step) get their own distances; W_r trains."""
    from fastmodels.pushdown._positions import sinusoidal

    torch.manual_seed(5)
    tape, _ = random_tapes(random.Random(5), [9, 6])
    head = AttachmentHead(12, width=10, max_depth=4, d_embed=6, relative_positions=True, backend="reference").double()
    plain = AttachmentHead(12, width=10, max_depth=4, d_embed=6, backend="reference").double()
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("rel.")})
    hidden, nxt = torch.randn(2, 9, 12, dtype=torch.float64), torch.randn(2, 9, 6, dtype=torch.float64)
    got, base = head(hidden, nxt, tape), plain(hidden, nxt, tape)
    qt = head.query(torch.cat([hidden, nxt], -1))
    R = head.rel(sinusoidal(0, 10, 10, dtype=torch.float64))  # distances 0..9
    want = base.clone()
    for t in range(9):
        for j in range(t + 1):
            want[:, t, j] += qt[:, t] @ R[t + 1 - j]
        want[:, t, 9] += qt[:, t] @ R[0]
    causal = torch.ones(9, 10, dtype=torch.bool).tril(0)
    causal[:, 9] = True
    torch.testing.assert_close(got[:, causal], want[:, causal], rtol=1e-10, atol=1e-10)
    # a decoding step: the last 2 queries against all 9 keys, as in the full forward
    step = head(hidden[:, 7:], nxt[:, 7:], tape.dense()[:, 7:], context=hidden)
    torch.testing.assert_close(step[:, :, :8], got[:, 7:, :8], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(step[:, :, 9], got[:, 7:, 9], rtol=1e-10, atol=1e-10)
    (g,) = torch.autograd.grad(head.loss(got, tape.attachment_targets()), [head.rel.weight])
    assert g.abs().sum() > 0
    with pytest.raises(TypeError, match="relative_positions"):
        AttachmentHead(12, relative_positions=1)


def test_loss_masks_ignored_targets_and_is_zero_when_all_ignored():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    targets = torch.tensor([[0, 3, -100], [-100, -100, 1]])
    keep = targets != -100
    want = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(AttachmentHead.loss(logits, targets), want)
    none = AttachmentHead.loss(logits, torch.full((2, 3), -100))
    assert none.item() == 0.0
    (grad,) = torch.autograd.grad(none, logits)
    assert torch.equal(grad, torch.zeros_like(grad))


# ---------------------------------------------------------------------------------------------
# Targets and stack masks vs a replay through StackTapeBuilder
# ---------------------------------------------------------------------------------------------


def test_targets_and_masks_replay_to_the_gold_tape():
    rng = random.Random(4)
    for _ in range(40):
        lengths = [rng.randint(1, 14) for _ in range(3)]
        tape, sentences = random_tapes(rng, lengths)
        T = tape.seq_len
        targets, mask = tape.attachment_targets(), tape.attachment_mask()
        for b, (n, spans) in enumerate(sentences):
            gold = attachments_from_spans(n, spans)
            builder = StackTapeBuilder(1)
            builder.push(None)
            for t in range(n - 1):
                assert torch.equal(mask[b, t, : t + 1], builder.attach_mask[0]), (b, t)
                assert not mask[b, t, t + 1:].any()
                target = int(targets[b, t])
                assert (target == T) == (gold[t + 1] is None)  # shift exactly where the tree shifts
                if target != T:
                    assert mask[b, t, target]  # a target is always a legal reduce
                builder.push(None if target == T else target)
            assert int(targets[b, n - 1]) == -100 and (targets[b, n:] == -100).all()
            assert not mask[b, n:].any()
            assert torch.equal(builder.tape().dense()[0], tape.dense()[b, :n, :n])


def test_dyck_targets_reduce_close_brackets_with_their_open_bracket():
    tape = StackTape.from_brackets(["(()[])", "(("])
    T = tape.seq_len
    # "(()[])": token 2 ")" closes "(" at 1, token 4 "]" closes "[" at 3 (the top constituents
    # end at the open bracket itself), token 5 ")" pops "(" ... "]": 3 constituents, lowest ends at 0
    assert tape.attachment_targets()[0].tolist() == [T, 1, T, 3, 0, -100]
    assert tape.attachment_targets()[1].tolist() == [T, -100, -100, -100, -100, -100]


def test_builder_attach_mask_before_and_after_reduces():
    b = StackTapeBuilder(2)
    b.push([None, None])
    b.push([None, 0])
    b.push([None, None])
    assert b.attach_mask.tolist() == [[True, True, True], [False, True, True]]
    assert StackTapeBuilder(1).attach_mask.shape == (1, 0)


# ---------------------------------------------------------------------------------------------
# Decoding, bad input, torch.compile
# ---------------------------------------------------------------------------------------------


def _cpu_backend_or_reference():
    return "reference" if op_backend_unavailable_reason("attachment_scores", "cpu", "cpu") else "cpu"


def test_decoding_one_token_at_a_time_equals_the_full_forward():
    torch.manual_seed(5)
    tape, _ = random_tapes(random.Random(5), [10])
    head = AttachmentHead(8, width=6, max_depth=5, backend=_cpu_backend_or_reference())
    hidden, nxt = torch.randn(1, 10, 8), torch.randn(1, 10, 8)
    full = head(hidden, nxt, tape, mask=tape.attachment_mask())
    keys = head.key_features(hidden)
    targets = tape.attachment_targets()
    builder = StackTapeBuilder(1)
    row = builder.push(None)
    for t in range(10):
        step = head(hidden[:, t:t + 1], nxt[:, t:t + 1], row[:, None, :], keys=keys[:, : t + 1],
                    mask=builder.attach_mask[:, None, :], check_values=False)
        want = torch.cat([full[:, t:t + 1, : t + 1], full[:, t:t + 1, -1:]], -1)
        torch.testing.assert_close(step, want, rtol=1e-5, atol=1e-5)
        if t < 9:
            target = int(targets[0, t])
            row = builder.push(None if target == 10 else target)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_decoding_with_a_key_cache(grad):
    """``cache=`` appends each step's keys (in place without autograd, past a buffer growth at
    70 tokens; concatenated with autograd) and equals the full forward; reorder_cache follows a
    beam reorder (a parent kept twice) as reordering the inputs does."""
    from fastmodels.pushdown._cache import _MIN_CAPACITY

    T = 70
    assert _MIN_CAPACITY < T
    torch.manual_seed(6)
    tape, _ = random_tapes(random.Random(6), [T, T])
    head = AttachmentHead(8, width=6, max_depth=5, backend=_cpu_backend_or_reference())
    hidden, nxt = torch.randn(2, T, 8), torch.randn(2, T, 8)
    dense = tape.dense()
    with torch.set_grad_enabled(grad):
        full = head(hidden, nxt, dense)
        cache, steps, held = {}, [], []
        for t in range(T):
            steps.append(head(hidden[:, t:t + 1], nxt[:, t:t + 1], dense[:, t:t + 1, : t + 1], cache=cache))
            held.append(cache["keys"])  # kept alive: distinct storages have distinct addresses
            if t == 10:
                early, early_copy = cache["keys"], cache["keys"].detach().clone()
        for t, step in enumerate(steps):  # [B, 1, t + 2]: reduce with keys 0..t, then shift
            torch.testing.assert_close(step, torch.cat([full[:, t:t + 1, : t + 1], full[:, t:t + 1, -1:]], -1))
        assert cache["keys"].shape == (2, T, head.key.out_features) and torch.equal(early, early_copy)
        store = {h.untyped_storage().data_ptr() for h in held}
        assert len(store) == (2 if not grad else T)  # one buffer until it grows; a new tensor per step with autograd
        # a beam reorder halfway
        parents, half = [1, 1, 0], T // 2
        cache, steps = {}, []
        for t in range(T):
            if t == half:
                AttachmentHead.reorder_cache(cache, parents)
            sel = slice(None) if t < half else parents
            steps.append(head(hidden[sel, t:t + 1], nxt[sel, t:t + 1], dense[sel, t:t + 1, : t + 1], cache=cache))
        for t in range(half, T):
            torch.testing.assert_close(steps[t], torch.cat([full[parents, t:t + 1, : t + 1], full[parents, t:t + 1, -1:]], -1))
    with pytest.raises(ValueError, match="cache: give a cache, keys or context, not two of them"):
        head(hidden[:, :1], nxt[:, :1], dense[:, :1, :1], keys=cache["keys"][:2, :1], cache={})
    with pytest.raises(ValueError, match=r"cache\['keys'\]: expected shape"):
        head(hidden[:, :1], nxt[:, :1], dense[:, :1, :T + 1], cache=cache)  # batch 2, the cache has 3
    with pytest.raises(ValueError, match="parents: expected indices in"):
        AttachmentHead.reorder_cache(cache, [3])
    # a no-grad append leaves a cache view saved for backward usable (the old values' gradients)
    cache = {}
    with torch.no_grad():
        for t in range(3):
            head(hidden[:, t:t + 1], nxt[:, t:t + 1], dense[:, t:t + 1, : t + 1], cache=cache)
    logits = head(hidden[:, 2:3], nxt[:, 2:3], dense[:, 2:3, :3], keys=cache["keys"])
    want = torch.autograd.grad(head(hidden[:, 2:3], nxt[:, 2:3], dense[:, 2:3, :3], keys=cache["keys"].clone())
                               .logsumexp(-1).sum(), head.depth_feat)
    with torch.no_grad():
        head(hidden[:, 3:4], nxt[:, 3:4], dense[:, 3:4, :4], cache=cache)
    assert torch.equal(torch.autograd.grad(logits.logsumexp(-1).sum(), head.depth_feat)[0], want[0])
    with pytest.raises(ValueError, match=r"tape: expected a tensor on cpu \(the device of hidden\), got one on meta"):
        head(hidden[:, :1], nxt[:, :1], dense[:, :1, :1].to("meta"))


def test_bad_input_errors():
    q, keys, feat = torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.randn(5, 3)
    tape = StackTape.from_trees(["((a b) (c d))", "(a (b (c d)))"])
    with pytest.raises(ValueError, match="keys"):
        attachment_scores(q, keys[:, :, :2], feat, tape)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        attachment_scores(q, keys[:, :3], feat, tape)
    with pytest.raises(TypeError, match="depth_feat"):
        attachment_scores(q, keys, feat.double(), tape)
    with pytest.raises(ValueError, match="depth_feat"):
        attachment_scores(q, keys, feat[:1], tape, binary=True)
    with pytest.raises(ValueError, match="StackTape of batch size 2 and length 4"):
        attachment_scores(q, keys, feat, StackTape.from_trees(["(a b)"]))
    with pytest.raises(TypeError, match="tape"):
        attachment_scores(q, keys, feat, tape.dense().float())
    with pytest.raises(ValueError, match="non-negative"):
        attachment_scores(q, keys, feat, tape.dense() - 1)
    with pytest.raises(TypeError, match="tape"):
        attachment_scores(q, keys, feat, [[0]])
    head = AttachmentHead(4)
    with pytest.raises(ValueError, match="next_embed"):
        head(torch.randn(2, 4, 4), torch.randn(2, 3, 4), tape)
    with pytest.raises(ValueError, match=r"mask: expected a bool tensor \[2, 4, 4\] \(\[B, Tq, Tk\]\), got float32 \[2, 4, 4\]"):
        head(torch.randn(2, 4, 4), torch.randn(2, 4, 4), tape, mask=torch.ones(2, 4, 4))
    with pytest.raises(TypeError, match="max_depth"):
        AttachmentHead(4, max_depth=3.5)
    with pytest.raises(ValueError, match=r"keys: expected a tensor \[B=2, Tk, 4\]"):
        head(torch.randn(2, 4, 4), torch.randn(2, 4, 4), tape, keys=torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="context: give context or keys"):
        head(torch.randn(2, 4, 4), torch.randn(2, 4, 4), tape, keys=torch.randn(2, 4, 4), context=torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="max_depth"):
        AttachmentHead(4, binary=True, max_depth=1)


def test_empty_shapes():
    q, keys, feat = torch.randn(2, 0, 3, requires_grad=True), torch.randn(2, 4, 3), torch.randn(5, 3)
    out = attachment_scores(q, keys, feat, torch.zeros(2, 0, 4, dtype=torch.int64))
    assert out.shape == (2, 0, 4)
    out = attachment_scores(torch.randn(1, 2, 0), torch.randn(1, 2, 0), torch.randn(5, 0), torch.zeros(1, 2, 2, dtype=torch.int64))
    assert out.tolist() == [[[0.0, float("-inf")], [0.0, 0.0]]]


def test_torch_compile_fullgraph_over_the_head():
    backend = _cpu_backend_or_reference()
    torch.manual_seed(6)
    tape, _ = random_tapes(random.Random(6), [7, 5])
    head = AttachmentHead(8, width=6, max_depth=4, backend=backend)
    hidden, nxt = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    targets = tape.attachment_targets()

    def step(h, x):
        return head.loss(head(h, x, tape), targets)

    want = step(hidden, nxt)
    g_want = torch.autograd.grad(want, list(head.parameters()))
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(hidden, nxt)
    g_got = torch.autograd.grad(got, list(head.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # variable lengths under dynamic shapes: later lengths reuse the first graph
    def batch_step(h, x, tape, targets):
        return head.loss(head(h, x, tape), targets)

    dyn = torch.compile(batch_step, fullgraph=True, backend="aot_eager", dynamic=True)
    for i, lengths in enumerate(([9, 6], [13, 13], [11, 4])):
        tape, _ = random_tapes(random.Random(i), lengths)
        args = (torch.randn(2, tape.seq_len, 8), torch.randn(2, tape.seq_len, 8), tape, tape.attachment_targets())
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            got = dyn(*args)
        torch.testing.assert_close(got, batch_step(*args), rtol=1e-5, atol=1e-6)


def _doc_beam_step() -> str:
    """The beam-search step of docs/pushdown.md, verbatim (so the docs run as tested)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "pushdown.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if "cand.flatten().topk" in b]
    assert len(blocks) == 1
    return blocks[0]


def beam_step(head, builder, scores, h_t, e_next, keys, k):
    """One word-synchronous beam step, the docs' code: one top-k over every (beam, attachment)
    candidate, then one select + one push for the survivors."""
    ns = {"torch": torch, "head": head, "builder": builder, "beam_scores": scores, "h_t": h_t, "e_next": e_next,
          "key_cache": keys, "beam_size": k}
    exec(_doc_beam_step(), ns)
    return ns["builder"], ns["beam_scores"], ns["parents"], ns["choice"]


def test_beam_step_recipe():
    torch.manual_seed(7)
    head = AttachmentHead(8, width=6, max_depth=5, backend=_cpu_backend_or_reference())
    builder = StackTapeBuilder(3)
    for atts in ([None] * 3, [None, 0, None], [None, None, 1], [2, None, None]):
        builder.push(atts)
    t = builder.length - 1
    h_t, e_next, keys = torch.randn(3, 1, 8), torch.randn(3, 1, 8), torch.randn(3, t + 1, head.key.out_features)
    scores = torch.tensor([-1.0, -2.0, -0.5])
    new, new_scores, parents, choice = beam_step(head, builder, scores, h_t, e_next, keys, k=5)
    logits = head(h_t, e_next, builder.row[:, None, :], keys=keys, mask=builder.attach_mask[:, None, :])[:, 0]
    for n, (p, c) in enumerate(zip(parents.tolist(), choice.tolist())):
        assert c == t + 1 or builder.attach_mask[p, c]  # only legal attachments survive
        torch.testing.assert_close(new_scores[n], scores[p] + logits[p].log_softmax(-1)[c])
        alone = builder.select([p])
        alone.push([None if c == t + 1 else c])
        assert torch.equal(new.row[n], alone.row[0]) and new.stacks[n] == alone.stacks[0]
    assert new_scores.tolist() == sorted(new_scores.tolist(), reverse=True)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck(backend):
    from fastmodels._dispatch import triton_interpreter_enabled
    from fastmodels.ops.attachment import _fwd_op

    if backend == "triton" and not triton_interpreter_enabled():
        pytest.skip("needs the Triton interpreter (or a GPU test run)")
    if backend == "cpu" and op_backend_unavailable_reason("attachment_scores", "cpu", "cpu"):
        pytest.skip("cpu backend unavailable")
    g = torch.Generator().manual_seed(8)
    tape = StackTape.from_trees(["((a b) (c (d e)))", "(a (b c))"])
    q, keys = (torch.randn(2, 5, 4, generator=g, requires_grad=True) for _ in range(2))
    feat = torch.randn(3, 4, generator=g, requires_grad=True)
    torch.library.opcheck(_fwd_op, (q, keys, feat, tape.depth, tape.boundary, None, False, backend))
    torch.library.opcheck(_fwd_op, (q[:, -2:], keys, feat, None, None, tape.dense(rows=2).to(torch.int32), True, backend))


def test_inference_calls_build_no_autograd_node():
    backend = _cpu_backend_or_reference()
    g = torch.Generator().manual_seed(9)
    tape = StackTape.from_trees(["((a b) (c (d e)))"])
    q = torch.randn(1, 5, 4, generator=g, requires_grad=True)
    keys, feat = torch.randn(1, 5, 4, generator=g), torch.randn(3, 4, generator=g)
    want = attachment_scores(q, keys, feat, tape, backend=backend)
    assert want.grad_fn is not None
    with torch.no_grad():
        got = attachment_scores(q, keys, feat, tape, backend=backend)
    assert got.grad_fn is None
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)


def test_beam_step_with_fewer_legal_candidates_than_beams():
    torch.manual_seed(10)
    head = AttachmentHead(8, width=6, max_depth=5, backend=_cpu_backend_or_reference())
    builder = StackTapeBuilder(1)
    builder.push(None)  # t = 0: reduce with token 0, or shift: 2 candidates
    new, scores, parents, choice = beam_step(head, builder, torch.zeros(1), torch.randn(1, 1, 8), torch.randn(1, 1, 8),
                                             torch.randn(1, 1, head.key.out_features), k=4)
    assert sorted(choice.tolist()) == [0, 1] and new.batch_size == 2 and torch.isfinite(scores).all()
    builder = StackTapeBuilder(2)
    builder.push([None, None])
    builder.push([None, 0])  # beam 0: two constituents, beam 1: one; 5 legal of 6 candidates
    new, scores, parents, choice = beam_step(head, builder, torch.zeros(2), torch.randn(2, 1, 8), torch.randn(2, 1, 8),
                                             torch.randn(2, 2, head.key.out_features), k=6)
    assert new.batch_size == 5 and torch.isfinite(scores).all()
    assert (1, 0) not in list(zip(parents.tolist(), choice.tolist()))  # token 0 is inside beam 1's constituent


def test_head_under_cpu_autocast_bfloat16():
    torch.manual_seed(11)
    tape, _ = random_tapes(random.Random(11), [9, 5])
    head = AttachmentHead(8, width=6, max_depth=4, backend=_cpu_backend_or_reference())
    hidden, nxt = torch.randn(2, 9, 8, requires_grad=True), torch.randn(2, 9, 8)
    want = head(hidden, nxt, tape, mask=tape.attachment_mask())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(hidden, nxt, tape, mask=tape.attachment_mask())
        loss = head.loss(got, tape.attachment_targets())
    assert got.dtype == torch.float32
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got))
    assert (got[fin] - want[fin]).abs().max() < 0.1 * want[fin].abs().max()  # bf16 operands
    grads = torch.autograd.grad(loss, [hidden, head.depth_feat])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_inconsistent_compact_tape_is_an_error_for_targets():
    tape = StackTape(torch.tensor([[0, 2]]), torch.tensor([[0, 0]]))  # token 1 closes 2 nodes, 1 on the stack
    with pytest.raises(ValueError, match="inconsistent"):
        tape.attachment_targets()


def test_head_context_of_the_wrong_width_is_named():
    with pytest.raises(ValueError, match="d_model: expected a positive int, got True"):
        AttachmentHead(True)
    head = AttachmentHead(16, width=8, max_depth=5)
    tape = StackTape.from_trees(["((a b) c)"])
    h, e = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match=r"context: expected a tensor \[B=1, Tk, 16\]"):
        head(h, e, tape, context=torch.randn(1, 3, 5))

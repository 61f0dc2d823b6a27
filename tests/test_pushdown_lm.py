"""PushdownLM: the syntactic LM of the reproductions (trunk, loss, cached decoding, beam search)."""

import pytest
import torch
from helpers import assert_rms_close

from fastmodels.pushdown import StackTape, StackTapeBuilder
from fastmodels.pushdown.lm import PushdownLM


def make_lm(pushdown, vocab=7, **kw):
    torch.manual_seed(0)
    lm = PushdownLM(vocab, d_model=24, n_layers=2, n_heads=3, pushdown=pushdown, max_depth=5, **kw).double().eval()
    # a random, not near-uniform, model: the beam-search tests need distinct scores
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return lm


def all_attachment_sequences(n):
    """Every legal attachment sequence of n tokens (token 0 shifts), with its builder."""
    out = []

    def rec(builder, atts):
        if builder.length == n:
            out.append((list(atts), builder))
            return
        options = [None] + [s - 1 for s in builder.stacks[0][1:]] + [builder.length - 1]  # shift, or a constituent's last token
        for a in options:
            b = builder.clone()
            b.push(a)
            rec(b, atts + [a])

    b = StackTapeBuilder(1)
    b.push(None)
    rec(b, [None])
    return out


def joint_log_prob(lm, tokens, tape):
    """log p(tokens[1:], attachments) by teacher forcing on the whole tape (no cache)."""
    toks = torch.tensor([tokens])
    hidden = lm(toks, tape)
    lp_w = torch.log_softmax(lm.logits(hidden[0, :-1]), -1).gather(-1, toks[0, 1:, None]).sum()
    att = lm.attachment_logits(hidden, torch.cat([toks[:, 1:], toks[:, :1]], 1), tape, mask=tape.attachment_mask())
    targets = tape.attachment_targets()[0, :-1]
    lp_a = torch.log_softmax(att[0, :-1], -1).gather(-1, targets[:, None]).sum()
    return float(lp_w + lp_a), torch.log_softmax(lm.logits(hidden[0, -1]), -1)


@pytest.mark.parametrize("pushdown", [True, False])
@pytest.mark.parametrize("binary", [False, True])
def test_cached_decoding_matches_full_forward(pushdown, binary):
    """Token by token with the cache and the builder's rows == the forward on the whole tape;
    the attachment head's cached logits too."""
    lm = make_lm(pushdown, binary=binary)
    tape = StackTape.from_trees(["((a (b c)) (d (e f g)))", "(a ((b c) d))"], pad_to=7)
    # token 0 shifts; target T (the shift column) or -100 (the last token, padding): shift
    atts = [[None] + [a if 0 <= a < 7 else None for a in row[:-1].tolist()] for row in tape.attachment_targets()]
    tokens = torch.randint(0, 7, (2, 7))
    with torch.no_grad():
        full = lm(tokens, tape)
        full_att = lm.attachment_logits(full, torch.cat([tokens[:, 1:], tokens[:, :1]], 1), tape)
        cache, builder, steps, step_att = {"head": {}}, StackTapeBuilder(2), [], []
        for t in range(7):
            row = builder.push([a[t] for a in atts])[:, None, :]
            h = lm(tokens[:, t : t + 1], row, cache)
            steps.append(h)
            step_att.append(lm.attachment_logits(h, tokens[:, (t + 1) % 7][:, None], row, cache=cache["head"]))
    assert cache["length"] == 7
    assert_rms_close(torch.cat(steps, 1)[0], full[0], 1e-12)  # sentence 0 is 7 tokens long
    assert_rms_close(torch.cat(steps, 1)[1, :4], full[1, :4], 1e-12)  # sentence 1: 4 real tokens
    for t in range(6):
        got, want = step_att[t][0, 0], full_att[0, t]
        assert_rms_close(got[: t + 1], want[: t + 1], 1e-12)  # reduce columns 0..t
        assert_rms_close(got[-1:], want[-1:], 1e-12)  # shift


def test_loss_is_the_token_weighted_mean_of_sentences():
    """Padding is ignored: a padded batch's losses are the per-token means over its sentences."""
    lm = make_lm(True)
    trees = ["((a b) (c (d e)))", "(a (b c))"]
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 5, 4, 0, 0]])
    both = lm.loss(tokens, StackTape.from_trees(trees))
    one = [lm.loss(tokens[i : i + 1, :n], StackTape.from_trees([trees[i]])) for i, n in ((0, 5), (1, 3))]
    # next-token targets: 4 and 2; attachment targets: 4 and 2 as well (not the last token)
    for key in ("lm", "attach"):
        assert_rms_close(both[key], (4 * one[0][key] + 2 * one[1][key]) / 6, 1e-12)
    assert_rms_close(both["loss"], both["lm"] + both["attach"], 1e-14)
    both["loss"].backward()
    depth_tables = [b.attn.depth_emb for b in lm.blocks] + [lm.attach.depth_feat]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in depth_tables)


@pytest.mark.parametrize("pushdown", [True, False])
def test_beam_parse_scores_are_the_joint_log_probability(pushdown):
    """The best beam's score is log p(words, attachments) of its tape under teacher forcing, and
    its next-token distribution is the forward's on that tape."""
    lm = make_lm(pushdown)
    tokens = [6, 1, 4, 2, 3, 1, 5, 0, 2]
    res = lm.beam_parse(tokens, beam=5)
    assert res.tape.seq_len == len(tokens) and len(res.attachments) == len(tokens)
    with torch.no_grad():
        joint, next_lp = joint_log_prob(lm, tokens, res.tape)
    assert abs(res.log_prob - joint) < 1e-9
    assert_rms_close(res.next_log_probs.double(), next_lp, 1e-6)  # returned in float32
    # the attachments replay into the same tape
    b = StackTapeBuilder(1)
    for a in res.attachments:
        b.push(a)
    assert torch.equal(b.tape().dense(), res.tape.dense())
    assert res.beams.shape == (5,) and float(res.beams.max()) == pytest.approx(res.log_prob, abs=1e-5)


def test_beam_parse_with_a_wide_beam_is_exhaustive():
    """With a beam at least the number of attachment sequences, the search returns the
    sequence of maximal joint probability among all of them (enumerated here), and a beam of 1
    is the greedy decode."""
    lm = make_lm(True)
    tokens = [6, 3, 1, 4, 2, 5]
    seqs = all_attachment_sequences(len(tokens))
    assert len(seqs) == 132  # Catalan(6): one per binary forest over the 6 tokens
    with torch.no_grad():
        scored = [(joint_log_prob(lm, tokens, b.tape())[0], atts) for atts, b in seqs]
    best_score, best = max(scored, key=lambda s: s[0])
    res = lm.beam_parse(tokens, beam=len(seqs))
    assert abs(res.log_prob - best_score) < 1e-9
    assert torch.equal(res.tape.dense(), [b for a, b in seqs if a == best][0].tape().dense())
    assert sorted(res.beams.tolist(), reverse=True) == pytest.approx(sorted((s for s, _ in scored), reverse=True), abs=1e-5)
    greedy = lm.beam_parse(tokens, beam=1)
    assert greedy.log_prob <= res.log_prob + 1e-12
    # greedy: each step's best extension of the single beam
    b, atts = StackTapeBuilder(1), [None]
    b.push(None)
    for t in range(1, len(tokens)):
        opts = [None] + [s - 1 for s in b.stacks[0][1:]] + [b.length - 1]
        best_a = max(opts, key=lambda a: _prefix_score(lm, tokens[: t + 1], b, a))
        b.push(best_a)
        atts.append(best_a)
    assert greedy.attachments == atts


def _prefix_score(lm, tokens, builder, a):
    c = builder.clone()
    c.push(a)
    with torch.no_grad():
        return joint_log_prob(lm, tokens, c.tape())[0]


def test_bad_inputs():
    lm = make_lm(True)
    tape = StackTape.from_trees(["(a b)"])
    with pytest.raises(ValueError, match="tokens: expected an int64 or int32 tensor"):
        lm(torch.zeros(1, 2), tape)
    with pytest.raises(ValueError, match=r"tape: expected batch 1 and length 3"):
        lm.loss(torch.zeros(1, 3, dtype=torch.int64), tape)
    with pytest.raises(TypeError, match="tape: expected the gold StackTape"):
        lm.loss(torch.zeros(1, 2, dtype=torch.int64), tape.dense())
    with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, 7\)"):
        lm.beam_parse([6, 7])
    with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, 7\), got min -1"):
        lm(torch.tensor([[1, -1]]), tape)
    with pytest.raises(ValueError, match="tape: expected non-negative depths, got a minimum of -2"):
        lm(torch.tensor([[1, 2]]), torch.tensor([[[0, 0], [-2, 0]]]))
    with pytest.raises(ValueError, match="tokens: expected a non-empty"):
        lm.beam_parse([])
    with pytest.raises(ValueError, match="beam: expected"):
        lm.beam_parse([1, 2], beam=0)
    with pytest.raises(ValueError, match="d_model: expected a multiple of n_heads=5"):
        PushdownLM(7, d_model=24, n_heads=5)
    with pytest.raises(TypeError, match="cache: expected a dict"):
        lm(torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1, 1, dtype=torch.int64), cache=[])

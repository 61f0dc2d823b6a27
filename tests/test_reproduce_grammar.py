"""The Pushdown-on-a-grammar reproduction: its grammar, test suites, parse scoring, a quick run."""

import dataclasses
import json
import random

import pytest
import torch

from fastmodels.pushdown import StackTape, StackTapeBuilder
from fastmodels.pushdown.lm import BeamParse
from fastmodels.pushdown.tape import attachments_from_spans
from fastmodels.reproduce import pushdown_grammar as gr
from fastmodels.reproduce import reproductions

SG = {w: 0 for group in (gr.NOUNS, gr.INTRANSITIVE, gr.TRANSITIVE) for w, _ in group}
PL = {w: 1 for group in (gr.NOUNS, gr.INTRANSITIVE, gr.TRANSITIVE) for _, w in group}
NUMBER = {**SG, **PL}
TRANSITIVE_FORMS = {w for pair in gr.TRANSITIVE for w in pair}


def check_np(tree, depth, stats):
    """Number of a noun phrase, checking its inside; records its embedding depth."""
    stats["depth"] = max(stats["depth"], depth)
    if isinstance(tree[0], str):  # [det, noun]
        det, noun = tree
        assert det in gr.DETERMINERS[NUMBER[noun]]
        return NUMBER[noun]
    head, mod = tree
    n = check_np(head, depth, stats)
    if mod[0] in gr.PREPOSITIONS:
        stats["pp"] += 1
        check_np(mod[1], depth + 1, stats)
    else:  # a relative clause: ["that", VP(n)] (subject) or ["that", [NP(m), V_trans(m)]] (object)
        assert mod[0] == "that"
        body = mod[1]
        if isinstance(body, str) or isinstance(body[0], str):
            stats["src"] += 1
            assert check_vp(body, depth + 1, stats) == n
        else:
            stats["orc"] += 1
            assert body[1] in TRANSITIVE_FORMS and check_np(body[0], depth + 1, stats) == NUMBER[body[1]]
    return n


def check_vp(tree, depth, stats):
    if isinstance(tree, str):
        return NUMBER[tree]
    verb, obj = tree
    check_np(obj, depth, stats)
    return NUMBER[verb]


def test_grammar_sentences_agree_and_embed():
    cfg = gr.QUICK
    g = gr.Grammar(cfg, random.Random(0))
    stats = {"depth": 0, "pp": 0, "src": 0, "orc": 0}
    lengths = []
    for _ in range(2000):
        np_, vp = g.sentence()
        assert check_np(np_, 0, stats) == check_vp(vp, 0, stats)  # subject-verb agreement
        lengths.append(len(gr.leaves([np_, vp])))
    assert stats["depth"] == cfg.max_embed  # embeds up to max_embed, never deeper
    assert min(stats["pp"], stats["src"], stats["orc"]) > 100  # every construction occurs
    assert max(lengths) <= cfg.max_len


def test_encode_gives_the_gold_tape():
    """Tokens are <s> words </s>; the spans are the tree's, past <s>; a builder replaying the
    tape's attachment targets rebuilds it, so a parser that predicts them scores F1 = 1."""
    vocab = gr.vocabulary()
    index = {w: i for i, w in enumerate(vocab)}
    assert len(vocab) == len(set(vocab)) and vocab[0] == "<pad>"
    tree = [[["the", "cat"], ["that", [["some", "dogs"], "chase"]]], "runs"]
    ids, spans = gr.encode(tree, index)
    assert [vocab[i] for i in ids] == ["<s>", "the", "cat", "that", "some", "dogs", "chase", "runs", "</s>"]
    # (((the cat) (that ((some dogs) chase))) runs), shifted by one
    assert sorted(spans) == sorted([(1, 2), (4, 5), (4, 6), (3, 6), (1, 6), (1, 7)])
    tape = StackTape.from_spans([(len(ids), spans)])
    b = StackTapeBuilder(1)
    b.push(None)
    T = len(ids)
    for a in tape.attachment_targets()[0, :-1].tolist():
        b.push(None if a == T else a)
    assert torch.equal(b.tape().dense(), tape.dense())

    class Oracle:  # a model whose beam search returns the gold attachments
        def beam_parse(self, ids, beam):
            return BeamParse(attachments_from_spans(len(ids), spans), None, 0.0, None, None)

    assert gr.parse_f1(Oracle(), [(ids, spans)], beam=1) == 1.0


def test_f1_and_right_branching():
    assert gr.f1({(1, 2), (1, 3)}, {(1, 2), (2, 3)}) == 0.5
    assert gr.f1(set(), set()) == 1.0 and gr.f1({(1, 2)}, set()) == 0.0
    ids = [0] * 6  # <s> w1 w2 w3 w4 </s>
    right = [(3, 4), (2, 4), (1, 4)]
    left = [(1, 2), (1, 3), (1, 4)]
    assert gr.right_branching_f1([(ids, right)]) == 1.0
    assert gr.right_branching_f1([(ids, left)]) == pytest.approx(1 / 3)


def test_agreement_suites():
    cfg = dataclasses.replace(gr.QUICK, n_pairs=30)
    suites = gr.agreement_suites(cfg, random.Random(0))
    assert set(suites) == {"prepositional_phrase", "subject_relative", "object_relative", "center_embedding",
                           f"center_embedding_depth_{cfg.max_embed + 1}"}
    relatives = {"prepositional_phrase": 0, "subject_relative": 1, "object_relative": 1, "center_embedding": 2,
                 f"center_embedding_depth_{cfg.max_embed + 1}": cfg.max_embed + 1}
    for name, pairs in suites.items():
        assert len(pairs) == 30
        for good, bad in pairs:
            assert good[:-1] == bad[:-1] and good[-1] != bad[-1]
            nouns = [w for w in good if w in NUMBER and any(w in p for p in gr.NOUNS)]
            subject, attractor = NUMBER[nouns[0]], NUMBER[nouns[1]]
            assert NUMBER[good[-1]] == subject and NUMBER[bad[-1]] == 1 - subject and attractor != subject
            assert good[-1] in {w for p in gr.INTRANSITIVE for w in p}
            assert good.count("that") == relatives[name]
            # every verb inside the relatives agrees with its own subject (innermost first)
            if name.startswith("center") or name == "object_relative":
                inner = [w for w in good[:-1] if w in {v for p in gr.TRANSITIVE for v in p}]
                assert [NUMBER[v] for v in inner] == [NUMBER[n] for n in reversed(nouns[1:])]


def test_quick_reproduction_runs_and_parses(tmp_path):
    """The registered quick run trains both LMs, scores every suite and parses the held-out
    sentences; after its few hundred steps the Pushdown LM's beam-search parses beat the
    right-branching baseline."""
    out = reproductions()["pushdown-grammar"].run(True, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert out["headline"] == summary["headline"]
    for name in ("base", "pushdown"):
        m = summary["models"][name]
        assert m["final"]["lm"] < m["history"][0]["lm"]
        assert set(m["agreement"]) == set(summary["data"]["suites"])
        assert all(0.0 <= s["accuracy"] <= 1.0 for s in m["agreement"].values())
    assert summary["headline"]["parse_f1"]["pushdown"] > summary["headline"]["right_branching_f1"] + 0.2

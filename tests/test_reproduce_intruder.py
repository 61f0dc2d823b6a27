"""The intruder-dimensions reproduction: LoRA adapters, fine-tuning, the per-matrix analysis and
the run, on a tiny random Llama."""

import json
import math

import pytest
import torch

from fastmodels.ops import intruder_dimensions
from fastmodels.reproduce import intruder as it
from fastmodels.reproduce import reproductions

pytest.importorskip("transformers")
from test_reproduce_laser import CharTokenizer, tiny_llama, toy_examples  # noqa: E402


def test_lora_linear():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    lora = it.LoRALinear(base, 3, alpha=6.0)
    x = torch.randn(5, 12)
    assert torch.equal(lora(x), base(x))  # B = 0 at the start
    assert lora.scale == 2.0 and it.LoRALinear(base, 4, 8.0, rank_stabilized=True).scale == 4.0
    with torch.no_grad():
        lora.B.normal_()
    merged = base.weight + lora.scale * lora.B @ lora.A
    torch.testing.assert_close(lora(x), x @ merged.mT + base.bias)
    W, B, A, scale = lora.adapter()
    assert W is not None and torch.equal(B, lora.B) and torch.equal(A, lora.A) and scale == 2.0
    assert not base.weight.requires_grad and lora.A.requires_grad and lora.B.requires_grad
    with pytest.raises(ValueError, match=r"r: expected 1\.\.7"):
        it.LoRALinear(base, 8, 16.0)


def test_parse_method():
    assert it.parse_method("full") == ("full", 0, False)
    assert it.parse_method("lora8") == ("lora", 8, False)
    assert it.parse_method("rslora64") == ("lora", 64, True)
    for bad in ("lora", "lora0", "rs8", "Full", "lora-4"):
        with pytest.raises(ValueError, match="methods: expected"):
            it.parse_method(bad)


def test_add_lora_starts_as_the_base_model():
    model = tiny_llama(seed=1)
    ids = torch.randint(1, 96, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    adapters = it.add_lora(model, ["self_attn.q_proj", "mlp.down_proj"], r=2, alpha=4.0)
    assert sorted(adapters) == [(i, t) for i in range(3) for t in ("mlp.down_proj", "self_attn.q_proj")]
    assert isinstance(model.model.layers[1].mlp.down_proj, it.LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.{t}.{ab}" for i in range(3) for t in ("mlp.down_proj", "self_attn.q_proj") for ab in "AB"}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("method, lr", [("full", 3e-3), ("lora4", 3e-2)])
def test_fine_tuning_fits_the_training_facts(method, lr):
    model = tiny_llama(seed=2)
    with torch.no_grad():  # the frozen tied head of a fresh tiny model cannot be confident (logits ~0.1)
        model.get_input_embeddings().weight.mul_(25.0)
    examples = toy_examples(6, seed=5)
    before = it.evaluate(model, examples)["loss"]
    if method == "full":
        model.requires_grad_(True)
        params = list(model.parameters())
    else:
        params = [p for a in it.add_lora(model, it.ALL_LINEAR.split(","), 4, 8.0).values() for p in (a.A, a.B)]
    res = it.fine_tune(model, examples, params, steps=60, batch_size=6, lr=lr, warmup=2, seed=0)
    after = it.evaluate(model, examples)["loss"]
    assert after < 0.1 * before, (before, after)
    assert res["history"][-1]["step"] == 59 and not model.training


def test_count_intruders_of_an_adapter_equals_the_merged_matrix():
    model = tiny_llama(seed=3)
    targets = ["mlp.up_proj", "self_attn.o_proj"]
    base = it.base_left_vectors(model, targets)
    adapters = it.add_lora(model, targets, r=3, alpha=6.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in adapters.values():  # a large update: intruders likely in some matrices
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.5)
    got = it.count_intruders(base, {key: a.adapter() for key, a in adapters.items()}, k=4, eps=0.5)
    merged = {}
    for key, a in adapters.items():
        W, B, A, s = a.adapter()
        merged[key] = intruder_dimensions(base[key][0], W + s * B @ A, k=4, eps=0.5).count
    assert {k: v["count"] for k, v in got["per_matrix"].items()} == {f"{i}.{t}": c for (i, t), c in merged.items()}
    assert got["total"] == sum(merged.values()) > 0
    assert got["matrices"] == 6 and got["by_target"] == {t: sum(c for (i, tt), c in merged.items() if tt == t) for t in targets}
    assert got["matrices_with_intruders"] == sum(c > 0 for c in merged.values())
    same = it.count_intruders(base, {key: base[key][0] for key in base}, k=4, eps=0.5)
    assert same["total"] == 0 and all(v["min_max_cos"] > 0.999 for v in same["per_matrix"].values())


def test_run_leaves_the_model_and_reports_every_method(tmp_path):
    pytest.importorskip("countryinfo")
    model = tiny_llama(seed=4)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = it.IntruderConfig(methods="full,lora2,rslora2", targets="mlp.up_proj", steps=3, batch_size=4, max_facts=30, k=3,
                            device="cpu")
    summary = it.run_config(cfg, tmp_path, model=model, tokenizer=CharTokenizer(), log=lambda r: None)
    assert all(torch.equal(v, pristine[k]) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "summary.json").read_text())["headline"] == summary["headline"]
    assert summary["data"] == {"facts": 30, "train": 21, "held_out": 9}
    assert set(summary["methods"]) == {"full", "lora2", "rslora2"}
    assert summary["methods"]["full"]["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert summary["methods"]["lora2"]["trainable_parameters"] == 3 * 2 * (32 + 48)
    for m in summary["methods"].values():
        assert m["intruders"]["matrices"] == 3 and 0 <= m["intruders"]["total"] <= 9
        assert m["intruders"]["total"] == sum(v["count"] for v in m["intruders"]["per_matrix"].values())
        assert 0 <= m["train"]["acc"] <= 1 and math.isfinite(m["held_out"]["loss"])
    assert summary["headline"]["base"]["train_acc"] == summary["base"]["train"]["acc"]


def test_bad_inputs(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="methods: expected"):
        it.run_config(it.IntruderConfig(methods="full,qlora4"), tmp_path, model=model, tokenizer=CharTokenizer())
    with pytest.raises(ValueError, match="methods/targets: expected non-empty"):
        it.run_config(it.IntruderConfig(targets=" "), tmp_path, model=model, tokenizer=CharTokenizer())
    with pytest.raises(ValueError, match="tokenizer: expected"):
        it.run_config(it.QUICK, tmp_path, model=model)
    with pytest.raises(ValueError, match="targets: no module 'mlp.fc_in'"):
        it.add_lora(model, ["mlp.fc_in"], 2, 4.0)
    assert "intruder-dimensions" in reproductions()

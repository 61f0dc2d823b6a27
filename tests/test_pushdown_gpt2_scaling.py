"""pushdownify_gpt2 keeps GPT-2's attention scaling options: a converted model with zero depth
tables equals the pretrained one also with scale_attn_by_inverse_layer_idx=True (scale / (i + 1)
in layer i) and with scale_attn_weights=False (no 1/sqrt(D))."""

import pytest
import torch
from helpers import assert_rms_close

from fastmodels.pushdown import StackTape, pushdownify_gpt2, set_stack_tape


@pytest.mark.parametrize("options", [
    {"scale_attn_by_inverse_layer_idx": True},
    {"scale_attn_weights": False},
    {"scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True},
], ids=["inverse-layer-idx", "unscaled", "both"])
def test_pushdownify_gpt2_keeps_attention_scaling(options):
    tf = pytest.importorskip("transformers")
    cfg = tf.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=3, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, attn_implementation="eager", **options)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(cfg).eval()
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

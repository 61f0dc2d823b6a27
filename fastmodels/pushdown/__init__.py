"""Pushdown Layers (Murty et al., EMNLP 2023): stack tapes and pushdown attention modules."""

from fastmodels.pushdown.attachment import AttachmentHead
from fastmodels.pushdown.lm import BeamParse, PushdownLM
from fastmodels.pushdown.module import PushdownAttention, pushdownify_gpt2, set_stack_tape
from fastmodels.pushdown.tape import StackTape, StackTapeBuilder, dense_from_compact, tree_spans

__all__ = ["AttachmentHead", "BeamParse", "PushdownLM", "PushdownAttention", "StackTape", "StackTapeBuilder", "dense_from_compact", "pushdownify_gpt2", "set_stack_tape", "tree_spans"]

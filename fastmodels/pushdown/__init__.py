"""Pushdown Layers (Murty et al., EMNLP 2023): stack tapes and pushdown attention modules."""

from fastmodels.pushdown.tape import StackTape, StackTapeBuilder, dense_from_compact, tree_spans

__all__ = ["StackTape", "StackTapeBuilder", "dense_from_compact", "tree_spans"]

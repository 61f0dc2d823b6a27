"""StackTapeBuilder past its initial 16-token row buffer (the buffer doubles at tokens 16, 32, ...):
every depth row it returns equals the dense tape row of the finished tape, and StackTape refuses
lengths beyond its T columns."""

import random

import pytest
import torch

from fastmodels.pushdown import StackTape, StackTapeBuilder
from fastmodels.pushdown.tape import attachments_from_spans, tree_spans


def _random_binary_tree(rng: random.Random, n: int):
    if n == 1:
        return "w"
    cut = rng.randint(1, n - 1)
    return [_random_binary_tree(rng, cut), _random_binary_tree(rng, n - cut)]


@pytest.mark.parametrize("n", [16, 17, 33, 70])
def test_builder_rows_past_the_row_buffer_growth(n):
    rng = random.Random(n)
    trees = [_random_binary_tree(rng, n) for _ in range(2)]
    atts = [attachments_from_spans(*tree_spans(t)) for t in trees]
    want = StackTape.from_trees(trees).dense()  # [B, n, n]
    builder = StackTapeBuilder(2)
    for t in range(n):
        row = builder.push([a[t] for a in atts])
        assert torch.equal(row, want[:, t, : t + 1]), f"row {t}"
    # the beam-search copy keeps the grown buffer too
    copy = builder.select([1, 0])
    assert torch.equal(copy.row, want[[1, 0], n - 1])
    tape = builder.tape()
    assert torch.equal(tape.dense(), want)


def test_lengths_beyond_the_tape_are_refused():
    tape = StackTape.from_trees(["((a b) c)"])
    with pytest.raises(ValueError, match="lengths"):
        StackTape(tape.depth, tape.boundary, torch.tensor([4]))  # T + 1
    with pytest.raises(ValueError, match="lengths"):
        StackTape(tape.depth, tape.boundary, torch.tensor([-1]))
    assert StackTape(tape.depth, tape.boundary, torch.tensor([3])).lengths.tolist() == [3]

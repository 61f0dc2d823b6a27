"""StackTape vs an independent oracle: nltk's own binarization + brute-force span counting, and an
explicit shift-reduce simulation for the incremental builder."""

import pickle
import random

import pytest
import torch

nltk = pytest.importorskip("nltk")

from fastmodels.pushdown import StackTape, StackTapeBuilder, dense_from_compact  # noqa: E402


def random_tree(rng: random.Random, n_words: int, labels="SNVPA"):
    """A random labeled nltk.Tree over n_words leaves: n-ary nodes (2..5 children), preterminals
    and unary chains of random length."""
    counter = iter(range(10**9))

    def build(n):
        if n == 1:
            node = nltk.Tree("W", [f"w{next(counter)}"])
        else:
            k = rng.randint(2, min(5, n))
            cuts = sorted(rng.sample(range(1, n), k - 1))
            sizes = [b - a for a, b in zip([0] + cuts, cuts + [n])]
            node = nltk.Tree(rng.choice(labels), [build(s) for s in sizes])
        for _ in range(rng.choice([0, 0, 0, 1, 2])):  # unary chain above the node
            node = nltk.Tree(rng.choice(labels), [node])
        return node

    return build(n_words)


def oracle_spans(tree) -> list[tuple[int, int]]:
    """Binary-node spans after nltk's own right-factored CNF and unary collapse."""
    t = tree.copy(deep=True)
    t.collapse_unary(collapsePOS=False, collapseRoot=True)
    t.chomsky_normal_form(factor="right")
    spans = []
    for pos in t.treepositions():
        node = t[pos]
        if isinstance(node, nltk.Tree) and len(node) == 2:
            # leaf indices of this subtree
            leaf_pos = [pos + p for p in node.treepositions("leaves")]
            all_leaves = t.treepositions("leaves")
            idx = [all_leaves.index(p) for p in leaf_pos]
            spans.append((min(idx), max(idx)))
        elif isinstance(node, nltk.Tree):
            assert len(node) == 1, "CNF left an n-ary node"
    return spans


def brute_dense(n: int, spans, T: int) -> torch.Tensor:
    """S(t, j) = #{[a, b] : a <= j <= b <= t} by direct counting, padded to T."""
    S = torch.zeros(T, T, dtype=torch.int64)
    if spans:
        sp = torch.tensor(spans)
        a, b = sp[:, 0, None, None], sp[:, 1, None, None]
        t = torch.arange(n)[None, :, None]
        j = torch.arange(n)[None, None, :]
        S[:n, :n] = ((a <= j) & (j <= b) & (b <= t)).sum(0)
    # padded query rows equal the last real row (every node closed); padded keys are 0
    if n:
        S[n:, :n] = S[n - 1, :n]
    return S


def shift_reduce(tree_spans_set: set, n: int):
    """Independent simulation: push each token, reduce the top two stack items while their union
    is a node of the tree. Yields (attachment, row after the token)."""
    stack: list[tuple[int, int]] = []
    closed: list[tuple[int, int]] = []
    for k in range(n):
        stack.append((k, k))
        first_start = None
        while len(stack) >= 2 and (stack[-2][0], stack[-1][1]) in tree_spans_set:
            right = stack.pop()
            left = stack.pop()
            stack.append((left[0], right[1]))
            closed.append((left[0], right[1]))
            first_start = left[0]
        row = [sum(1 for a, b in closed if a <= j <= b) for j in range(k + 1)]
        yield first_start, row


def test_paper_example():
    tape = StackTape.from_trees(["((The dog) (is happy))"])
    # after "The dog is" with [The dog] closed the row is [1, 1, 0]
    assert tape.dense()[0, 2, :3].tolist() == [1, 1, 0]
    assert tape.depth.tolist() == [[2, 2, 2, 2]]
    assert tape.dense()[0, 3].tolist() == [2, 2, 2, 2]


def test_random_trees_vs_nltk_cnf_and_brute_force():
    rng = random.Random(0)
    trees = [random_tree(rng, rng.randint(1, 24)) for _ in range(2000)]
    for start in range(0, len(trees), 250):
        batch = trees[start : start + 250]
        tape = StackTape.from_trees(batch)
        dense = tape.dense()
        T = tape.seq_len
        for i, tree in enumerate(batch):
            n = len(tree.leaves())
            assert tape.lengths[i].item() == n
            want = brute_dense(n, oracle_spans(tree), T)
            assert torch.equal(dense[i], want), f"tree {start + i}: {tree}"


def test_bracket_strings_and_labeled_strings_agree():
    rng = random.Random(1)
    for _ in range(200):
        tree = random_tree(rng, rng.randint(1, 12))
        unlabeled = tree_to_unlabeled(tree)
        a = StackTape.from_trees([tree])
        b = StackTape.from_trees([unlabeled])
        c = StackTape.from_trees([str(tree)], labeled=True)
        for other in (b, c):
            assert torch.equal(a.depth, other.depth) and torch.equal(a.boundary, other.boundary)


def tree_to_unlabeled(tree) -> str:
    if not isinstance(tree, nltk.Tree):
        return tree
    return "(" + " ".join(tree_to_unlabeled(ch) for ch in tree) + ")"


def test_incremental_builder_matches_shift_reduce_and_from_trees():
    rng = random.Random(2)
    for i in range(310):
        B = rng.randint(1, 3)
        n = rng.randint(1, 15) if i < 300 else rng.randint(16, 70)  # the last ones grow the row buffer
        trees = [random_tree(rng, n) for _ in range(B)]
        sims = [shift_reduce(set(oracle_spans(t)), n) for t in trees]
        builder = StackTapeBuilder(B)
        solos = [StackTapeBuilder(1) for _ in range(B)]  # a batch is its sentences side by side
        for k in range(n):
            steps = [next(s) for s in sims]
            row = builder.push([a for a, _ in steps])
            assert row.shape == (B, k + 1)
            for b, (_, want_row) in enumerate(steps):
                assert row[b].tolist() == want_row
            mask = builder.attach_mask
            for b, (solo, (a, _)) in enumerate(zip(solos, steps)):
                solo.push(a)
                assert torch.equal(mask[b], solo.attach_mask[0])
        assert torch.equal(builder.select(list(range(B))[::-1]).row, builder.row.flip(0))  # copies keep it
        final = builder.tape()
        ref = StackTape.from_trees(trees)
        assert torch.equal(final.depth, ref.depth) and torch.equal(final.boundary, ref.boundary)
        assert torch.equal(final.dense(), ref.dense())


def test_builder_attach_anywhere_inside_constituent():
    # "((a b) c)": c attaches to the constituent [a b]; naming a or b gives the same result
    for j in (0, 1):
        bld = StackTapeBuilder()
        bld.push(None)
        bld.push(0)
        row = bld.push(j)
        assert row.tolist() == [[2, 2, 1]]
    with pytest.raises(ValueError, match="attach"):
        StackTapeBuilder().push(0)


def test_builder_inputs():
    """Attachments as tensors or NumPy values (what a parser's argmax gives), and clear errors."""
    import numpy as np

    rows = []
    for to in (lambda v: v, torch.tensor, np.int64):
        bld = StackTapeBuilder()
        bld.push(None)
        bld.push(to(0))
        rows.append(bld.push(to(1)).tolist())
    assert rows[0] == rows[1] == rows[2] == [[2, 2, 1]]
    two = StackTapeBuilder(2)
    two.push(torch.tensor([-1, -1]))
    assert two.push(np.array([0, -1])).tolist() == [[1, 1], [0, 0]]
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
        StackTapeBuilder(-1)
    with pytest.raises(ValueError, match="attach: expected a sequence of 2 entries"):
        two.push(0)
    with pytest.raises(TypeError, match=r"attach\[1\]: expected None or an int"):
        two.push([0, 0.5])
    with pytest.raises(TypeError, match="attach: expected None, an int or a sequence"):
        StackTapeBuilder().push(object())
    # lists of NumPy integers or 0-d tensors (what iterating over an argmax gives)
    for entries in ([np.int64(-1), None], list(torch.tensor([-1, -1]))):
        assert StackTapeBuilder(2).push(entries).tolist() == [[0], [0]]
    with pytest.raises(TypeError, match=r"attach\[0\]: expected None or an int"):
        StackTapeBuilder(2).push([torch.tensor([0, 1]), None])


def test_builder_select_and_clone_for_beam_search():
    """Beam reorders: select(parents) gives builders equal to building each parent's history
    again, shares nothing with the source, and clone() is an independent copy."""
    import numpy as np

    rng = random.Random(5)
    for _ in range(100):
        n = rng.randint(2, 12)
        trees = [random_tree(rng, n) for _ in range(3)]
        atts = [[a for a, _ in shift_reduce(set(oracle_spans(t)), n)] for t in trees]
        cut = rng.randint(1, n - 1)
        bld = StackTapeBuilder(3)
        for k in range(cut):
            bld.push([a[k] for a in atts])
        parents = [rng.randrange(3) for _ in range(rng.randint(1, 5))]
        for index in (parents, torch.tensor(parents), np.array(parents)):
            beams = bld.select(index)
            assert beams.batch_size == len(parents) and beams.length == cut
            for k in range(cut, n):  # continue each beam with its parent's remaining attachments
                beams.push([atts[p][k] for p in parents])
            want = StackTape.from_trees([trees[p] for p in parents])
            got = beams.tape()
            assert torch.equal(got.depth, want.depth) and torch.equal(got.boundary, want.boundary)
        # the source builder did not move, and can still finish its own sentences
        assert bld.length == cut
        twin = bld.clone()
        before = (twin.row, [list(st) for st in twin.stacks], [list(sp) for sp in twin.spans])
        for k in range(cut, n):
            bld.push([a[k] for a in atts])
        assert torch.equal(bld.tape().dense(), StackTape.from_trees(trees).dense())
        # the copy shares no state: pushing to the source left it as it was
        assert twin.length == cut and torch.equal(twin.row, before[0])
        assert twin.stacks == before[1] and twin.spans == before[2]
    # Beam expansion as docs/pushdown.md shows it: every beam by each of its candidate attachments
    # (shift, or reduce back to one of its stack constituents) in one select + push; each row equals
    # that attachment pushed on a copy of its beam alone.
    parents, atts = [], []
    for b, stack in enumerate(bld.stacks):
        for a in [None] + stack:
            parents.append(b)
            atts.append(a)
    rows = bld.select(parents).push(atts)
    assert rows.shape == (len(parents), bld.length + 1)
    for r, (b, a) in enumerate(zip(parents, atts)):
        assert torch.equal(rows[r], bld.select([b]).push([a])[0])
    with pytest.raises(ValueError, match=r"index\[1\]: expected a sentence index in \[0, 3\)"):
        bld.select([0, 3])
    with pytest.raises(TypeError, match="index: expected a sequence"):
        bld.select(1)
    with pytest.raises(ValueError, match="index"):
        bld.select([])


def random_dyck(rng: random.Random, n_pairs: int, types="([{<") -> str:
    out, stack = [], []
    opened = 0
    while opened < n_pairs or stack:
        if opened < n_pairs and (not stack or rng.random() < 0.5):
            t = rng.choice(types)
            out.append(t)
            stack.append(t)
            opened += 1
        else:
            out.append({"(": ")", "[": "]", "{": "}", "<": ">"}[stack.pop()])
    return "".join(out)


def dyck_tree(s: str):
    """The Dyck string as an nltk tree: each matched pair is a node (open, inner pairs..., close)."""
    stack = [nltk.Tree("R", [])]
    for ch in s:
        if ch in "([{<":
            stack.append(nltk.Tree("P", [ch]))
        else:
            node = stack.pop()
            node.append(ch)
            stack[-1].append(node)
    return stack[0]


def test_dyck_tapes_vs_tree_oracle():
    rng = random.Random(3)
    strings = [random_dyck(rng, rng.randint(1, 15)) for _ in range(500)]
    tape = StackTape.from_brackets(strings)
    dense = tape.dense()
    for i, s in enumerate(strings):
        root = dyck_tree(s)
        # top-level pairs are separate constituents (no root node joining them)
        spans = []
        offset = 0
        for child in root:
            sub = child.copy(deep=True)
            spans += [(a + offset, b + offset) for a, b in oracle_spans(sub)]
            offset += len(sub.leaves())
        assert torch.equal(dense[i], brute_dense(len(s), spans, tape.seq_len)), s
    # binary Dyck index: j is inside a closed constituent
    assert (StackTape.from_brackets(["(())"]).dense()[0] > 0).long().tolist() == [
        [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]]


def test_dyck_prefix_and_errors():
    tape = StackTape.from_brackets(["(()", "(["])
    assert tape.dense()[0, 2].tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="unmatched"):
        StackTape.from_brackets(["())"])
    with pytest.raises(ValueError, match="unmatched"):
        StackTape.from_brackets(["(]"])
    with pytest.raises(ValueError, match="not a bracket"):
        StackTape.from_brackets(["(x)"])
    custom = StackTape.from_brackets([["a1", "a2", "b2", "b1"]], pairs={"a1": "b1", "a2": "b2"})
    # nodes [1, 2], [1, 3], [0, 3] (b1 reduces with [a2 b2] and then a1)
    assert custom.dense()[0, 3].tolist() == [1, 3, 3, 2]


@pytest.mark.parametrize("T", [1, 2, 7, 30])
def test_dense_rows_vs_brute_force(T):
    """dense(rows) (the last rows query positions; one row per decoding step) vs direct counting on
    random valid compact tapes, for every rows in 1..T."""
    g = torch.Generator().manual_seed(T)
    depth = torch.randint(0, 6, (3, T), generator=g)
    boundary = torch.minimum(torch.randint(0, 6, (3, T), generator=g), depth)
    want = torch.zeros(3, T, T, dtype=torch.int64)
    for b in range(3):
        for t in range(T):
            for j in range(t + 1):
                want[b, t, j] = depth[b, j] - boundary[b, j : t + 1].min()
    for rows in range(1, T + 1):
        assert torch.equal(dense_from_compact(depth, boundary, rows), want[:, T - rows :]), rows
    assert torch.equal(StackTape(depth, boundary).dense(), want)
    for bad in (T + 1, -1):
        with pytest.raises(ValueError, match="rows: expected an int"):
            dense_from_compact(depth, boundary, bad)


def test_padding_lengths_device_and_validation():
    tape = StackTape.from_trees(["(a b)", "x", "((a b) (c d))"])
    assert tape.lengths.tolist() == [2, 1, 4]
    assert tape.depth.dtype == torch.int32 and tape.boundary.dtype == torch.int32
    dense = tape.dense()
    assert dense.shape == (3, 4, 4) and dense.dtype == torch.int64
    assert (dense[0, :, 2:] == 0).all() and (dense[1, :, 1:] == 0).all()
    assert tape.to("cpu").depth.device.type == "cpu"
    assert StackTape.from_trees(["(a b)"], pad_to=5).seq_len == 5
    with pytest.raises(ValueError, match="pad_to"):
        StackTape.from_trees(["(a b c)"], pad_to=2)
    with pytest.raises(TypeError, match="depth"):
        StackTape(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-negative"):
        StackTape(torch.tensor([[0, -1]]), torch.zeros(1, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="boundary"):
        StackTape(torch.zeros(1, 3, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32))
    # the spec's "c_{T-1} = +inf" as a large last boundary would make S negative: refused
    good = StackTape.from_trees(["((a b) c)"])
    open_end = good.boundary.clone()
    open_end[0, -1] = 1000
    with pytest.raises(ValueError, match=r"boundary\[b, k\] <= depth\[b, k\].*at \[0, 2\]"):
        StackTape(good.depth, open_end)
    with pytest.raises(ValueError, match="unbalanced"):
        StackTape.from_trees(["((a b)"])
    assert StackTape.from_trees(nltk.Tree.fromstring("(S (NP a b) c)")).batch_size == 1


def _row_uniform_brute(tape: StackTape, bq: int, bk: int) -> tuple[int, int]:
    """(row-uniform, full) tiles by brute force: a full tile (every key before the block's first
    row m0) is counted when R_t = min c over (tile end, t] is equal on the block's first and last
    row, over a non-empty range (the kernels leave out a tile that ends on row m0 itself). Each
    counted tile is also checked to have equal rows of S(t, j) = D_j - min_{j<=k<=t} c_k (the
    compact formula, on padding rows too, as the kernels compute it)."""
    B, T = tape.depth.shape
    uni = total = 0
    for b in range(B):
        c, d = tape.boundary[b].tolist(), tape.depth[b].tolist()
        for m0 in range(0, T, bq):
            last = min(m0 + bq, T) - 1
            for n0 in range(0, (m0 + 1) // bk * bk, bk):
                n_end = n0 + bk - 1
                total += 1
                if n_end == m0 or min(c[n_end + 1 : m0 + 1]) != min(c[n_end + 1 : last + 1]):
                    continue
                uni += 1
                rows = {tuple(d[j] - min(c[j : t + 1]) for j in range(n0, n_end + 1)) for t in range(m0, last + 1)}
                assert len(rows) == 1, (b, m0, n0)
    return uni, total


@pytest.mark.parametrize("bq,bk", [(16, 16), (16, 8), (8, 16), (1, 4)])
def test_row_uniform_fraction_vs_brute_force(bq, bk):
    """StackTape.row_uniform_fraction (the kernels' vectorized rule: the tiles ending before the
    last boundary <= the block's minimum) counts exactly the tiles whose R_t is equal on the
    block's first and last row, and those tiles have equal S rows; random trees, a padded batch,
    Dyck strings."""
    rng = random.Random(7)
    tapes = [StackTape.from_trees([random_tree(rng, n) for n in (90, 61, 5)]),
             StackTape.from_brackets([random_dyck(rng, 20) for _ in range(3)])]
    for tape in tapes:
        uni, total = _row_uniform_brute(tape, bq, bk)
        assert 0 < uni < total
        assert tape.row_uniform_fraction(bq, bk) == pytest.approx(uni / total)


def test_row_uniform_fraction_edges():
    assert StackTape.from_trees(["(a b)"]).row_uniform_fraction() == 0.0  # no full tile
    with pytest.raises(ValueError, match="block_q"):
        StackTape.from_trees(["(a b)"]).row_uniform_fraction(block_q=0)


def test_lengths_beyond_the_tape_are_refused():
    tape = StackTape.from_trees(["((a b) c)"])
    with pytest.raises(ValueError, match="lengths"):
        StackTape(tape.depth, tape.boundary, torch.tensor([4]))  # T + 1
    with pytest.raises(ValueError, match="lengths"):
        StackTape(tape.depth, tape.boundary, torch.tensor([-1]))
    assert StackTape(tape.depth, tape.boundary, torch.tensor([3])).lengths.tolist() == [3]


def test_dense_from_compact_checks_its_tensors():
    """Mismatched depth/boundary shapes would broadcast into a wrong tape: refused, as are floats."""
    tape = StackTape.from_trees(["((a b) (c d))", "(a (b (c d)))"])
    d, c = tape.depth, tape.boundary
    for bad_c in (c[:1], c[:, :1], torch.cat([c, c], 1)):
        with pytest.raises(ValueError, match="boundary: expected shape"):
            dense_from_compact(d, bad_c)
    with pytest.raises(TypeError, match="depth: expected dtype"):
        dense_from_compact(d.float(), c)
    with pytest.raises(TypeError, match="depth: expected a torch.Tensor"):
        dense_from_compact(d.tolist(), c)
    assert torch.equal(dense_from_compact(d.long(), c.to(torch.int16), 2), tape.dense()[:, 2:])


def test_stack_tape_values_and_lengths_must_fit():
    """int64 values beyond int32 would wrap when stored; float lengths would be truncated. The
    checked tensors cannot be swapped afterwards: the kernels read them as contiguous int32."""
    with pytest.raises(ValueError, match=r"depth: expected values <= 2147483647"):
        StackTape(torch.tensor([[2**32, 2**32]]), torch.tensor([[2**32, 0]]))
    tape = StackTape.from_trees(["((a b) c)"])
    with pytest.raises(TypeError, match="lengths: expected integer lengths"):
        StackTape(tape.depth, tape.boundary, torch.tensor([2.7]))
    with pytest.raises(TypeError, match="lengths: expected a sequence"):
        StackTape(tape.depth, tape.boundary, "3")
    assert StackTape(tape.depth, tape.boundary, [2]).lengths.tolist() == [2]
    for name in ("depth", "boundary", "lengths"):
        with pytest.raises(AttributeError):
            setattr(tape, name, getattr(tape, name).long())
    # a tape pickled when they were plain attributes still loads
    old = object.__new__(StackTape)
    old.__dict__.update(depth=tape.depth, boundary=tape.boundary, lengths=tape.lengths)
    assert torch.equal(pickle.loads(pickle.dumps(old)).dense(), tape.dense())
    empty = torch.zeros(0, 3, dtype=torch.int32)
    assert StackTape(empty, empty, []).lengths.shape == (0,)


def test_constructor_arguments_are_named_in_errors():
    with pytest.raises(TypeError, match="trees: expected a list of trees"):
        StackTape.from_trees(None)
    # any iterable of trees or strings (a generator, a dataset column) still works
    assert torch.equal(StackTape.from_trees(t for t in ["(a b)", "((a b) c)"]).dense(), StackTape.from_trees(["(a b)", "((a b) c)"]).dense())
    assert StackTape.from_brackets(s for s in ["()", "(())"]).lengths.tolist() == [2, 4]
    assert StackTape.from_brackets([("<", "<", ">", ">")], pairs=[("<", ">")]).lengths.tolist() == [4]
    with pytest.raises(TypeError, match="tree: expected an nltk.Tree"):
        StackTape.from_trees([None])
    with pytest.raises(ValueError, match="pad_to: expected an int >= 0"):
        StackTape.from_trees([], pad_to=-1)
    with pytest.raises(TypeError, match="pad_to: expected an int"):
        StackTape.from_trees(["(a b)"], pad_to=3.7)
    assert StackTape.from_trees(["(a b)"], pad_to=torch.tensor(4)).seq_len == 4
    with pytest.raises(TypeError, match="strings: expected a str"):
        StackTape.from_brackets(None)
    with pytest.raises(TypeError, match="pairs: expected a dict"):
        StackTape.from_brackets(["()"], pairs=5)
    with pytest.raises(ValueError, match="pairs: a token cannot both open and close"):
        StackTape.from_brackets(["||"], pairs={"|": "|"})  # every "|" would open: a silent flat tape


def test_refused_push_changes_no_sentence():
    """A push refused for one sentence must leave the others as they were (beam-search code may
    catch the error and go on)."""
    bld = StackTapeBuilder(2)
    bld.push([None, None])
    bld.push([None, None])
    with pytest.raises(ValueError, match=r"attach\[1\]: token 7 is not on the stack"):
        bld.push([0, 7])
    assert bld.length == 2 and bld.stacks == [[0, 1], [0, 1]] and bld.spans == [[], []]
    bld.push([0, None])
    fresh = StackTapeBuilder(2)
    for attach in ([None, None], [None, None], [0, None]):
        fresh.push(attach)
    assert torch.equal(bld.tape().dense(), fresh.tape().dense())

"""The Pushdown-on-Dyck reproduction: its data generator, tapes, test sets, and a quick run."""

import dataclasses
import json
import random

import pytest
import torch

from fastmodels.pushdown import StackTape, StackTapeBuilder
from fastmodels.reproduce import pushdown_dyck as dy
from fastmodels.reproduce import reproductions


def depths(s, k):
    d, out = 0, []
    for b in s:
        d += 1 if b < k else -1
        out.append(d)
    return out


def test_generator_follows_the_authors_process():
    rng = random.Random(0)
    k, m = 5, 4
    strings = [dy.sample_dyck(rng, k, m, min_len=6, max_len=60) for _ in range(4000)]
    pushes = pops = at_top = at_top_pop = 0
    for s in strings:
        dy.matching_opens(s, k)  # raises on an unmatched close
        d = depths(s, k)
        assert 6 <= len(s) <= 60 and d[-1] == 0 and max(d) <= m and min(d) >= 0
        for before, b in zip([0] + d[:-1], s):
            if before == m:
                at_top += 1
                at_top_pop += b >= k
            elif before > 0:
                pushes += b < k
                pops += b >= k
    assert at_top > 0 and at_top_pop == at_top  # at depth m it always closes
    assert abs(pushes / (pushes + pops) - 0.5) < 0.02  # otherwise open or close, 1/2 each
    opened = [b for s in strings for b in s if b < k]
    assert max(opened.count(b) for b in range(k)) / min(opened.count(b) for b in range(k)) < 1.1  # uniform types
    # at depth 0 the string ends with probability 1/2: excursions per string ~ geometric
    returns = [depths(s, k).count(0) for s in strings]
    assert max(returns) > 3 and min(returns) >= 1


@pytest.mark.parametrize("seed", range(3))
def test_tapes_match_the_builder_and_from_brackets(seed):
    """The reproduction's Dyck spans give the tape of StackTape.from_brackets (shifted past BOS)
    and of a StackTapeBuilder replaying 'reduce back to the matching open'; the attachment
    targets are exactly: open -> shift, close -> its open bracket."""
    rng = random.Random(seed)
    k = 3
    pairs = {str(i): chr(ord("a") + i) for i in range(k)}
    for _ in range(50):
        s = dy.sample_dyck(rng, k, 5, min_len=1, max_len=30)
        cut = rng.randint(1, len(s))  # prefixes too
        s = s[:cut]
        tokens, spans = dy.encode(s, k, eos=False)
        tape = StackTape.from_spans([(len(tokens), spans)])
        sym = [str(b) if b < k else pairs[str(b - k)] for b in s]
        ref = StackTape.from_brackets([sym], pairs=pairs).dense()[0]
        dense = tape.dense()[0]
        assert torch.equal(dense[1:, 1:], ref) and dense[:, 0].abs().sum() == 0  # BOS is never reduced
        b = StackTapeBuilder(1)
        b.push(None)  # BOS
        for o in dy.matching_opens(s, k):
            b.push(None if o is None else o + 1)
        assert torch.equal(b.tape().dense()[0], dense)
        targets = tape.attachment_targets()[0]
        T = len(tokens)
        want = [T if o is None else o + 1 for o in dy.matching_opens(s, k)] + [-100]
        assert targets.tolist() == want


def test_depth_and_long_range_sets():
    cfg = dataclasses.replace(dy.QUICK, bracket_types=6, depth_lo=5, depth_hi=9, depth_types=3, n_depth_eval=20,
                              long_min_dep=25, long_max_depth=8, long_max_len=70, n_long_eval=10)
    rng = random.Random(1)
    k = cfg.bracket_types
    fillers = [dy.sample_dyck(rng, k, 3, 4, 12) for _ in range(10)]
    for prefix, target in dy.depth_generalization_set(cfg, rng, fillers):
        opens = [o for o in dy.matching_opens(prefix + [target], k)]
        o = opens[-1]
        assert o is not None and prefix[o] == target - k < cfg.depth_types  # the target closes a nesting opener
        assert depths(prefix, k)[-1] == 1  # only the outermost bracket is open
        assert max(depths(prefix, k)) >= cfg.depth_lo
    for prefix, target in dy.long_range_set(cfg, rng):
        o = dy.matching_opens(prefix + [target], k)[-1]
        assert o is not None and len(prefix) - o >= cfg.long_min_dep and len(prefix) <= cfg.long_max_len


def test_iid_prefixes_end_before_every_close():
    k = 2
    s = [0, 1, 3, 2, 0, 2]  # ( [ ] ) ( )
    prefixes, targets = dy.iid_prefixes([s], k)
    assert targets == [3, 2, 2] and [len(p) for p in prefixes] == [2, 3, 5]


def test_quick_reproduction_runs_and_learns(tmp_path):
    """The registered quick run trains both LMs and writes its summary; after its few hundred
    steps both predict in-distribution closing brackets far above chance (1/k), and the
    Pushdown LM's beam search recovers the gold tape's accuracy."""
    rep = reproductions()["pushdown-dyck"]
    out = rep.run(True, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert out["headline"] == summary["headline"]
    k = summary["config"]["bracket_types"]
    models = summary["models"]
    for name in ("base", "pushdown"):
        acc = models[name]["accuracy"]
        assert set(acc) == {"depth_generalization", "long_range", "in_distribution"}
        assert models[name]["final"]["lm"] < models[name]["history"][0]["lm"]
    assert models["base"]["accuracy"]["in_distribution"]["no_tape"] > 2 / k
    pd = models["pushdown"]["accuracy"]["in_distribution"]
    assert pd["gold_tape"] > 2 / k and pd["beam_tape"] >= pd["gold_tape"] - 0.1


def test_command_line_config_and_device():
    from fastmodels.reproduce._lm import config_from_argv, resolve_device

    cfg, out = config_from_argv(dy.PRESETS, ["--preset", "cpu", "--steps", "7", "--attach-rel-pos", "false", "--out", "x"], "p", "d", "runs/y")
    assert cfg == dataclasses.replace(dy.CPU, steps=7, attach_rel_pos=False) and str(out) == "x"
    with pytest.raises(SystemExit):  # argparse: "expected true/false (or 1/0)"
        config_from_argv(dy.PRESETS, ["--attach-rel-pos", "maybe"], "p", "d", "runs/y")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device: expected 'auto', 'cpu' or 'cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            resolve_device("cuda")

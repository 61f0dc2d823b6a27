"""Pushdown Layers on an English-like grammar (Murty et al., EMNLP 2023, sections 4.2-4.3, on
generated data): a Pushdown LM and the base LM trained on sentences of a probabilistic grammar
with gold trees, then tested on

* syntactic generalization: subject-verb number agreement across attractors (prepositional
  phrases, subject and object relative clauses, center embedding one level deeper than training),
  as minimal pairs (BLiMP / SyntaxGym style): a model is right when the grammatical sentence is
  more probable. The Pushdown LM's sentence probability is the beam-search marginal
  sum over the final beams of p(words, tape), as in the paper; the base LM's is exact.
* unlabeled parsing F1 of the Pushdown LM's beam-search tapes against the gold trees (the paper's
  PTB experiment, here on held-out generated sentences), and of the base LM's attachment head.

BLLIP-LG, BLiMP, SyntaxGym and the PTB are not available offline; the grammar has what the paper's
test suites probe: number agreement across relative clauses and prepositional phrases, and center
embedding (object relatives inside object relatives).

    python -m fastmodels.reproduce.pushdown_grammar --out runs/grammar [--preset quick|cpu|paper] [--steps N ...]
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastmodels.pushdown.lm import PushdownLM
from fastmodels.pushdown.tape import StackTapeBuilder, tree_spans
from fastmodels.reproduce import register
from fastmodels.reproduce._lm import cli_main, registry_run, resolve_device, run_environment, token_batches, train_lm

NOUNS = [("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("man", "men"), ("woman", "women"), ("teacher", "teachers"),
         ("lawyer", "lawyers"), ("farmer", "farmers"), ("child", "children"), ("doctor", "doctors"), ("pilot", "pilots"),
         ("senator", "senators")]
INTRANSITIVE = [("runs", "run"), ("sleeps", "sleep"), ("smiles", "smile"), ("laughs", "laugh"), ("waits", "wait"),
                ("falls", "fall")]
TRANSITIVE = [("sees", "see"), ("likes", "like"), ("chases", "chase"), ("helps", "help"), ("knows", "know"),
              ("admires", "admire")]
PREPOSITIONS = ["near", "behind", "with", "under", "beside"]
DETERMINERS = (["the", "a", "this", "every"], ["the", "some", "these", "many"])  # singular, plural
FUNCTION = ["that"]  # the relativizer
SPECIAL = ["<pad>", "<s>", "</s>"]


def vocabulary() -> list[str]:
    words = SPECIAL + FUNCTION + PREPOSITIONS
    for group in (NOUNS, INTRANSITIVE, TRANSITIVE):
        for sg, pl in group:
            words += [sg, pl]
    words += sorted(set(DETERMINERS[0] + DETERMINERS[1]))
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class GrammarConfig:
    max_embed: int = 2  # nested PPs / relative clauses in training sentences
    p_pp: float = 0.25  # probability that a noun phrase takes a PP (while under max_embed)
    p_rc: float = 0.25  # ... a relative clause (half subject, half object relatives)
    p_transitive: float = 0.5
    max_len: int = 40
    n_train: int = 50_000
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    steps: int = 20_000
    batch_tokens: int = 8192
    lr: float = 5e-4
    warmup: int = 500
    max_depth: int = 50
    beam: int = 20
    n_pairs: int = 100  # minimal pairs per test suite
    n_parse: int = 200  # held-out sentences parsed
    attach_rel_pos: bool = True  # the attachment head's relative-position term (the authors' head has it)
    seed: int = 0
    threads: int = 0
    device: str = "auto"  # "auto": CUDA when visible, else the CPU


PAPER = GrammarConfig()
CPU = dataclasses.replace(PAPER, n_train=20_000, d_model=128, n_layers=4, steps=3000, batch_tokens=2048, warmup=200, beam=10,
                          n_pairs=60, n_parse=100)
QUICK = dataclasses.replace(PAPER, n_train=3000, d_model=48, n_layers=2, n_heads=2, steps=400, batch_tokens=1024, lr=2e-3,
                            warmup=40, beam=4, n_pairs=12, n_parse=12)
PRESETS = {"quick": QUICK, "cpu": CPU, "paper": PAPER}


# -- the grammar ---------------------------------------------------------------------------------
# Trees are nested lists with word leaves; a noun phrase with a modifier is [[det, noun], modifier],
# so its head noun phrase is a constituent of its own.

class Grammar:
    def __init__(self, cfg: GrammarConfig, rng: random.Random):
        self.cfg, self.rng = cfg, rng

    def num(self) -> int:
        return self.rng.randrange(2)  # 0 singular, 1 plural

    def noun_phrase(self, n: int, depth: int):
        r = self.rng
        base = [r.choice(DETERMINERS[n]), r.choice(NOUNS)[n]]
        if depth < self.cfg.max_embed:
            u = r.random()
            if u < self.cfg.p_pp:
                return [base, [r.choice(PREPOSITIONS), self.noun_phrase(self.num(), depth + 1)]]
            if u < self.cfg.p_pp + self.cfg.p_rc:
                return [base, self.relative_clause(n, depth + 1)]
        return base

    def relative_clause(self, n: int, depth: int):
        if self.rng.random() < 0.5:  # subject relative: that V(n) ...
            return ["that", self.verb_phrase(n, depth)]
        m = self.num()  # object relative: that NP(m) V_trans(m)
        return ["that", [self.noun_phrase(m, depth), self.rng.choice(TRANSITIVE)[m]]]

    def verb_phrase(self, n: int, depth: int):
        if self.rng.random() < self.cfg.p_transitive:
            return [self.rng.choice(TRANSITIVE)[n], self.noun_phrase(self.num(), depth)]
        return self.rng.choice(INTRANSITIVE)[n]

    def sentence(self):
        while True:
            n = self.num()
            tree = [self.noun_phrase(n, 0), self.verb_phrase(n, 0)]
            if len(leaves(tree)) <= self.cfg.max_len:
                return tree


def leaves(tree) -> list[str]:
    return [tree] if isinstance(tree, str) else [w for c in tree for w in leaves(c)]


def encode(tree, index: dict) -> tuple[list[int], list[tuple[int, int]]]:
    """[<s>] + words + [</s>] and the tree's binary spans shifted past <s> (<s>, </s> shift)."""
    words = leaves(tree)
    _, spans = tree_spans(tree)
    return [index["<s>"]] + [index[w] for w in words] + [index["</s>"]], [(a + 1, b + 1) for a, b in spans]


# -- test suites ---------------------------------------------------------------------------------

def agreement_suites(cfg: GrammarConfig, rng: random.Random) -> dict[str, list[tuple[list[str], list[str]]]]:
    """Minimal pairs (grammatical, ungrammatical) whose main verb agrees with a subject separated
    from it by an attractor of the other number; the ungrammatical one flips the verb's number."""
    def det_noun(n):
        return [rng.choice(DETERMINERS[n]), rng.choice(NOUNS)[n]]

    def pair(build):
        n = rng.randrange(2)
        words = build(n, 1 - n)
        verb = rng.choice(INTRANSITIVE)
        return words + [verb[n]], words + [verb[1 - n]]

    suites = {
        # the N_n near the N_m V
        "prepositional_phrase": lambda n, m: det_noun(n) + [rng.choice(PREPOSITIONS)] + det_noun(m),
        # the N_n that V_trans(n) the N_m V
        "subject_relative": lambda n, m: det_noun(n) + ["that", rng.choice(TRANSITIVE)[n]] + det_noun(m),
        # the N_n that the N_m V_trans(m) V
        "object_relative": lambda n, m: det_noun(n) + ["that"] + det_noun(m) + [rng.choice(TRANSITIVE)[m]],
        # the N_n that the N_m that the N_p V(p) V(m) V: an object relative inside an object relative
        "center_embedding": lambda n, m: (lambda p: det_noun(n) + ["that"] + det_noun(m) + ["that"] + det_noun(p)
                                          + [rng.choice(TRANSITIVE)[p], rng.choice(TRANSITIVE)[m]])(rng.randrange(2)),
    }

    def deeper(n, m):  # max_embed + 1 nested object relatives: one level deeper than training
        nums = [n, m] + [rng.randrange(2) for _ in range(cfg.max_embed)]
        words = []
        for i, x in enumerate(nums):
            words += det_noun(x) + (["that"] if i < len(nums) - 1 else [])
        for x in reversed(nums[1:]):
            words.append(rng.choice(TRANSITIVE)[x])
        return words

    suites[f"center_embedding_depth_{cfg.max_embed + 1}"] = deeper
    return {name: [pair(build) for _ in range(cfg.n_pairs)] for name, build in suites.items()}


# -- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def sentence_log_prob(model: PushdownLM, ids: list[int], *, beam: int | None) -> float:
    """log p(sentence) including </s>: the base LM's exactly (its attention ignores the tape),
    the Pushdown LM's as the beam marginal log sum_beams p(words, tape)."""
    if beam is None:
        device = next(model.parameters()).device
        x = torch.tensor([ids], device=device)
        logits = model.logits(model(x, torch.zeros(1, len(ids), len(ids), dtype=torch.int64, device=device)))
        return float(torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, x[0, 1:, None]).sum())
    # beam_parse scores log p(w_1.., attachments) of every final beam; the attachment of </s> is
    # part of it, summed over by the marginal
    return float(torch.logsumexp(model.beam_parse(ids, beam=beam).beams.double(), 0))


def f1(pred: set, gold: set) -> float:
    if not pred and not gold:
        return 1.0
    tp = len(pred & gold)
    return 0.0 if tp == 0 else 2 * tp / (len(pred) + len(gold))


def parse_f1(model: PushdownLM, examples: list[tuple[list[int], list[tuple[int, int]]]], beam: int) -> float:
    """Mean sentence-level unlabeled F1 of the best beam's spans (over the words; <s> and </s>
    excluded) against the gold binary spans."""
    scores = []
    for ids, gold in examples:
        n = len(ids) - 2
        res = model.beam_parse(ids, beam=beam)
        b = StackTapeBuilder(1)
        for a in res.attachments:
            b.push(a)
        pred = {(x, y) for x, y in b.spans[0] if 1 <= x and y <= n}
        scores.append(f1(pred, set(gold)))
    return sum(scores) / len(scores)


def right_branching_f1(examples) -> float:
    """The right-branching baseline: spans [i, n] for every word i < n."""
    return sum(f1({(i, len(ids) - 2) for i in range(1, len(ids) - 2)}, set(gold)) for ids, gold in examples) / len(examples)


def run_config(cfg: GrammarConfig, out_dir: Path, *, log=print) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    vocab = vocabulary()
    index = {w: i for i, w in enumerate(vocab)}
    rng = random.Random(cfg.seed)
    grammar = Grammar(cfg, rng)
    train_trees = [grammar.sentence() for _ in range(cfg.n_train)]
    seen = {tuple(leaves(t)) for t in train_trees}
    held_out = []
    while len(held_out) < cfg.n_parse:
        t = grammar.sentence()
        if tuple(leaves(t)) not in seen and len(leaves(t)) >= 4:
            held_out.append(encode(t, index))
    suites = agreement_suites(cfg, random.Random(cfg.seed + 1))
    lengths = [len(leaves(t)) for t in train_trees]
    device = resolve_device(cfg.device)
    summary: dict = {"config": dataclasses.asdict(cfg), "environment": run_environment(device),
                     "data": {"vocab": len(vocab), "train_sentences": len(train_trees), "mean_train_len": round(sum(lengths) / len(lengths), 1),
                              "max_train_len": max(lengths), "parse_sentences": len(held_out),
                              "right_branching_f1": round(right_branching_f1(held_out), 4),
                              "suites": {k: len(v) for k, v in suites.items()},
                              "example_pairs": {k: [" ".join(v[0][0]), " ".join(v[0][1])] for k, v in suites.items()}},
                     "models": {}}
    train_examples = [encode(t, index) for t in train_trees]
    for name, pushdown in (("base", False), ("pushdown", True)):
        torch.manual_seed(cfg.seed)
        model = PushdownLM(len(vocab), cfg.d_model, cfg.n_layers, cfg.n_heads, pushdown=pushdown, max_depth=cfg.max_depth,
                           relative_positions=cfg.attach_rel_pos).to(device)
        log({"model": name, "parameters": sum(p.numel() for p in model.parameters())})
        data = token_batches(train_examples, cfg.batch_tokens, random.Random(cfg.seed))
        res = train_lm(model, data, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, log=lambda r, n=name: log({"model": n, **r}))
        beam = cfg.beam if pushdown else None
        res["agreement"] = {}
        for suite, pairs in suites.items():
            t0 = time.perf_counter()
            right = 0
            for good, bad in pairs:
                lp = [sentence_log_prob(model, [index["<s>"]] + [index[w] for w in s] + [index["</s>"]], beam=beam) for s in (good, bad)]
                right += lp[0] > lp[1]
            res["agreement"][suite] = {"accuracy": round(right / len(pairs), 4), "eval_s": round(time.perf_counter() - t0, 1)}
            log({"model": name, suite: res["agreement"][suite]})
        t0 = time.perf_counter()
        res["parse_f1"] = {"f1": round(parse_f1(model, held_out, cfg.beam), 4), "eval_s": round(time.perf_counter() - t0, 1)}
        log({"model": name, "parse_f1": res["parse_f1"]})
        summary["models"][name] = res
        torch.save(model.state_dict(), out_dir / f"{name}.pt")
    summary["headline"] = {
        "agreement": {s: {m: summary["models"][m]["agreement"][s]["accuracy"] for m in ("base", "pushdown")} for s in suites},
        "parse_f1": {m: summary["models"][m]["parse_f1"]["f1"] for m in ("base", "pushdown")},
        "right_branching_f1": summary["data"]["right_branching_f1"],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


run = registry_run(run_config, PRESETS)
register("pushdown-grammar", "Pushdown Layers (arXiv:2310.19089), sections 4.2-4.3 on a generated grammar",
         "Pushdown LM vs base LM on an English-like grammar: agreement minimal pairs across attractors, and parsing F1 by beam search")(run)


def main(argv: list[str] | None = None) -> int:
    return cli_main(run_config, PRESETS, argv, "pushdown_grammar", __doc__, "runs/pushdown-grammar")


if __name__ == "__main__":
    sys.exit(main())

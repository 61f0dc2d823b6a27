"""A small GPT for the NextLat reproductions: the paper's next-token baseline and the trunk that
NextLat trains (the same architecture; only the loss differs)."""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator

import torch
from torch import nn

from fastmodels._validation import check_int
from fastmodels.nextlat import NextLatHead
from fastmodels.ops.nextlat import linear_cross_entropy_kl
from fastmodels.pushdown.lm import CausalSelfAttention


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """GPT-2-style causal LM: token + learned position embeddings, pre-LayerNorm blocks, a final
    LayerNorm and an untied, bias-free LM head (as in the NextLat code). ``forward`` returns the
    post-final-norm hidden states [B, T, d_model], the h_t that NextLat's losses read; right
    padding never changes the states of the real tokens before it (causal attention)."""

    def __init__(self, vocab_size: int, d_model: int = 128, n_layers: int = 4, n_heads: int = 4, max_len: int = 256):
        super().__init__()
        vocab_size, d_model = check_int(vocab_size, "vocab_size", low=1), check_int(d_model, "d_model", low=1)
        n_layers, n_heads = check_int(n_layers, "n_layers", low=1), check_int(n_heads, "n_heads", low=1)
        if d_model % n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={n_heads}, got {d_model}")
        self.max_len = check_int(max_len, "max_len", low=1)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(self.max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        for emb in (self.embed, self.pos):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens: expected an int64 or int32 tensor [B, T], got {getattr(tokens, 'shape', type(tokens).__name__)}")
        T = tokens.shape[1]
        if T > self.max_len:
            raise ValueError(f"tokens: expected at most max_len={self.max_len} positions, got {T}")
        x = self.embed(tokens) + self.pos.weight[:T]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def train(params: list[nn.Parameter], loss_fn: Callable[[int], dict], *, steps: int, lr: float, warmup: int,
          log=lambda row: None) -> dict:
    """AdamW (weight decay 0.1, betas 0.9/0.95), linear warm-up then cosine decay to lr / 10,
    gradients clipped at norm 1. ``loss_fn(step)`` returns {"loss": ..., other scalars}; the log
    keeps 20 rows of them. Returns {"train_s", "final", "history"}."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    t0, hist = time.perf_counter(), []
    for step in range(steps):
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            row = {"step": step, **{k: round(float(v.detach()), 4) for k, v in loss.items()}, "s": round(time.perf_counter() - t0, 1)}
            hist.append(row)
            log(row)
    return {"train_s": round(time.perf_counter() - t0, 1), "final": hist[-1], "history": hist}


def next_token_ce(model: TinyGPT, tokens: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """The GPT baseline's loss: mean cross-entropy of the tokens marked in ``target_mask [B, T]``
    (position 0 cannot be one), by the fused op (no logits tensor)."""
    hidden = model(tokens)
    targets = tokens[:, 1:].masked_fill(~target_mask[:, 1:], -100)
    ce, _ = linear_cross_entropy_kl(hidden[:, :-1].reshape(-1, hidden.shape[-1]), model.lm_head.weight, targets.reshape(-1))
    return ce


def fit(model: TinyGPT, head: NextLatHead | None, tokens: torch.Tensor, target_mask: torch.Tensor, attention_mask: torch.Tensor,
        *, steps: int, batch_size: int, lr: float, warmup: int, seed: int, log=lambda row: None) -> dict:
    """Trains ``model`` on the right-padded sequences ``tokens [n, T]``: next-token cross-entropy
    of the tokens marked in ``target_mask [n, T]`` (``head`` None: the GPT baseline), or the whole
    NextLat loss of ``head`` with ``target_mask`` as its loss mask (the latent term also covers
    the prompt, as the paper). Batches are drawn by ``seed``, so two calls see the same data."""
    device = next(model.parameters()).device
    it = batches(tokens.shape[0], batch_size, torch.Generator().manual_seed(seed))
    lengths = attention_mask.sum(1)

    def loss_fn(step: int) -> dict:
        idx = next(it)
        T = int(lengths[idx].max())
        batch, mask, am = (x[idx, :T].to(device) for x in (tokens, target_mask, attention_mask))
        if head is None:
            ce = next_token_ce(model, batch, mask)
            return {"loss": ce, "ce": ce.detach()}
        out = head(model(batch), batch, model.embed, model.lm_head, loss_mask=mask, attention_mask=am)
        return {"loss": out.total, "ce": out.ce.detach(), "latent": out.latent.detach(), "kl": out.kl.detach()}

    model.train()
    params = list(model.parameters()) + ([] if head is None else list(head.parameters()))
    result = train(params, loss_fn, steps=steps, lr=lr, warmup=warmup, log=log)
    model.eval()
    return result


def gpt_and_nextlat(cfg, vocab_size: int, max_len: int, tokens: torch.Tensor, target_mask: torch.Tensor,
                    attention_mask: torch.Tensor, device: torch.device, log=lambda row: None) -> Iterator[tuple[str, TinyGPT, dict]]:
    """Trains the paper's two models in turn and yields ``(name, trained model, fit's log)`` for
    "gpt" (next-token prediction) and "nextlat" (``NextLatHead``): the same architecture, the same
    initialization and the same batches. ``cfg`` has the fields d_model, n_layers, n_heads,
    horizon, mlp_hidden (0: 4 * d_model), lambda_h, lambda_kl, steps, batch_size, lr, warmup and
    seed."""
    for name in ("gpt", "nextlat"):
        torch.manual_seed(cfg.seed)
        model = TinyGPT(vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, max_len=max_len).to(device)
        head = None if name == "gpt" else NextLatHead(cfg.d_model, horizon=cfg.horizon, mlp_hidden=cfg.mlp_hidden or None,
                                                      lambda_h=cfg.lambda_h, lambda_kl=cfg.lambda_kl).to(device)
        res = fit(model, head, tokens, target_mask, attention_mask, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                  warmup=cfg.warmup, seed=cfg.seed, log=lambda row, name=name: log({"model": name, **row}))
        res["parameters"] = sum(p.numel() for p in model.parameters())
        if head is not None:
            res["head_parameters"] = sum(p.numel() for p in head.parameters())  # used in training only
        yield name, model, res


def effective_rank(states: torch.Tensor) -> float:
    """exp(entropy of the normalized singular values) of a [n, D] matrix of hidden states (Roy and
    Vetterli's effective rank, the NextLat paper's compression measure): 1 for a rank-one matrix,
    min(n, D) when all singular values are equal."""
    if states.dim() != 2 or states.shape[0] == 0:
        raise ValueError(f"states: expected a non-empty [n, D] matrix, got shape {list(states.shape)}")
    s = torch.linalg.svdvals(states.double())
    if s.sum() == 0:
        raise ValueError("states: the matrix is zero; its effective rank is undefined")
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled index batches over range(n) (epochs without replacement)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[i : i + batch_size]

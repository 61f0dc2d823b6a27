"""A synchronous syntactic LM with Pushdown Layers (Murty et al., EMNLP 2023, section 3): a causal
Transformer whose self-attention layers read the stack tape, plus the attachment head that
predicts the tape. At every step it predicts the next token, then how that token attaches.

    p(w, tape) = prod_t p(w_{t+1} | w_{<=t}, tape_{<=t}) * p(a_{t+1} | w_{<=t+1}, tape_{<=t})

``pushdown=False`` builds the paper's base LM: the same Transformer with plain causal attention
(the tape then feeds the attachment head only, which the paper's base LM is also trained with).
Training reads gold tapes (:meth:`PushdownLM.loss`); inference infers them with a word-synchronous
beam search over attachments (:meth:`PushdownLM.beam_parse`) on KV caches, the depth rows of a
:class:`StackTapeBuilder`, and one top-k over every (beam, attachment) candidate per step.

Positions: sinusoidal embeddings added to the token embeddings (the authors use Transformer-XL
relative positions, which the op leaves to the caller; spec section 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastmodels._validation import check_bool, check_int
from fastmodels.ops.pushdown import check_dense_tape
from fastmodels.pushdown import _cache
from fastmodels.pushdown._positions import sinusoidal
from fastmodels.pushdown.attachment import AttachmentHead
from fastmodels.pushdown.module import PushdownAttention
from fastmodels.pushdown.tape import StackTape, StackTapeBuilder

__all__ = ["BeamParse", "PushdownLM"]


class CausalSelfAttention(nn.Module):
    """Plain causal self-attention with the interface of :class:`PushdownAttention` (the tape is
    ignored): the base LM's layer."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, *, device=None, dtype=None):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, device=device, dtype=dtype)
        self.proj = nn.Linear(d_model, d_model, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, tape=None, cache: dict | None = None, **_) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = _cache.append(cache, ("k", "v"), (k, v), dim=2)
        Tk = k.shape[2]
        if T == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the last T of Tk positions (a decoding step after a prefix)
            mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(Tk - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))

    @staticmethod
    def reorder_cache(cache: dict, parents) -> None:
        _cache.reorder(cache, ("k", "v"), parents, dim=2)


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, pushdown: bool, max_depth: int, binary: bool,
                 dropout: float, backend: str | None, factory: dict):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, **factory)
        self.ln2 = nn.LayerNorm(d_model, **factory)
        if pushdown:
            self.attn = PushdownAttention(d_model, n_heads, max_depth, binary, dropout, backend=backend, **factory)
        else:
            self.attn = CausalSelfAttention(d_model, n_heads, dropout, **factory)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff, **factory), nn.GELU(), nn.Linear(d_ff, d_model, **factory),
                                 nn.Dropout(dropout))

    def forward(self, x, tape, cache):
        x = x + self.attn(self.ln1(x), tape, cache, check_values=False)
        return x + self.mlp(self.ln2(x))


@dataclass
class BeamParse:
    """The best beam of :meth:`PushdownLM.beam_parse` on one prefix.

    attachments: how each token attaches (index 0 is the first token: always a shift, None; else
        None for a shift or the last token of the lowest constituent it reduces with, as in
        ``StackTape.attachment_targets``).
    tape: its StackTape (batch 1); log_prob: log p(tokens[1:], attachments) under the model;
    next_log_probs: [vocab] log p(next token | prefix, tape); beams: the final beams' scores.
    """

    attachments: list
    tape: StackTape
    log_prob: float
    next_log_probs: torch.Tensor
    beams: torch.Tensor


class PushdownLM(nn.Module):
    """A pre-LayerNorm causal Transformer LM with Pushdown Layers and an attachment head.

    Args:
        vocab_size: tokens (the caller's vocabulary, beginning-of-sentence token included).
        d_model, n_layers, n_heads, d_ff (default 4 d_model): the Transformer.
        pushdown: Pushdown Layers (True) or plain causal attention (the paper's base LM, False).
        max_depth, binary: the depth tables of the pushdown layers and of the attachment head
            (binary: the Dyck 0/1 tape).
        dropout: residual and MLP dropout.
        relative_positions: the attachment head's relative-position term (the authors' head has
            it; it tells the head how far back each stack constituent ends).
        backend: forwarded to the pushdown ops.
    """

    def __init__(self, vocab_size: int, d_model: int = 128, n_layers: int = 6, n_heads: int = 4, d_ff: int | None = None, *,
                 pushdown: bool = True, max_depth: int = 50, binary: bool = False, dropout: float = 0.0,
                 relative_positions: bool = True, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        vocab_size = check_int(vocab_size, "vocab_size", low=1)
        d_model = check_int(d_model, "d_model", low=1)
        n_layers = check_int(n_layers, "n_layers", low=1)
        n_heads = check_int(n_heads, "n_heads", low=1)
        if d_model % n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={n_heads}, got {d_model}")
        d_ff = 4 * d_model if d_ff is None else check_int(d_ff, "d_ff", low=1)
        check_bool(pushdown, "pushdown")
        check_bool(binary, "binary")
        factory = {"device": device, "dtype": dtype}
        self.vocab_size, self.d_model, self.pushdown, self.binary = vocab_size, d_model, pushdown, binary
        self.embed = nn.Embedding(vocab_size, d_model, **factory)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_ff, pushdown, max_depth, binary, dropout, backend, factory)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model, **factory)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False, **factory)
        self.attach = AttachmentHead(d_model, max_depth=max_depth, binary=binary, dropout=dropout,
                                     relative_positions=relative_positions, backend=backend, **factory)
        nn.init.normal_(self.embed.weight, std=0.02)

    # -- the trunk ------------------------------------------------------------------------------

    def _check_tokens(self, tokens) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            got = f"{str(tokens.dtype).replace('torch.', '')} {list(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens: expected an int64 or int32 tensor [B, T], got {got}")
        return tokens

    def forward(self, tokens: torch.Tensor, tape, cache: dict | None = None, *, check_values: bool = True) -> torch.Tensor:
        """Final hidden states [B, T, d_model] (after the last LayerNorm) of ``tokens`` [B, T].

        ``tape``: a StackTape of the same batch and length, or a dense [B, T, T_total] tape. With
        ``cache`` (a dict, empty on the first call) the tokens continue the cached ones (a
        decoding step; the tape must then be dense, one row per new token). ``check_values``:
        token ids in range and no negative depth in a dense tape, checked once for all layers
        (one host sync; a decoding loop whose inputs are known good turns it off)."""
        tokens = self._check_tokens(tokens)
        check_bool(check_values, "check_values")
        if check_values:
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
                raise ValueError(f"tokens: expected ids in [0, {self.vocab_size}), got min {int(tokens.min())}, max {int(tokens.max())}")
            if isinstance(tape, torch.Tensor):
                check_dense_tape(tape)
        B, T = tokens.shape
        start = 0
        if cache is not None:
            if not isinstance(cache, dict):
                raise TypeError(f"cache: expected a dict (empty on the first call), got {type(cache).__name__}")
            start = cache.get("length", 0)
            cache.setdefault("layers", [{} for _ in self.blocks])
            cache["length"] = start + T
        x = self.embed(tokens) + sinusoidal(start, T, self.d_model, device=tokens.device, dtype=self.embed.weight.dtype)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, tape, None if cache is None else cache["layers"][i])
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [..., vocab] (float32 or wider) of hidden states."""
        out = self.lm_head(hidden)
        return out if out.dtype == torch.float64 else out.float()

    def attachment_logits(self, hidden: torch.Tensor, next_tokens: torch.Tensor, tape, *, mask=None, cache: dict | None = None):
        """[B, Tq, Tk + 1] attachment logits of tokens ``next_tokens`` [B, Tq] following the
        positions of ``hidden`` [B, Tq, d_model] (columns: reduce with key j, then shift)."""
        return self.attach(hidden, self.embed(next_tokens), tape, mask=mask, cache=cache, check_values=False)

    def loss(self, tokens: torch.Tensor, tape: StackTape, *, attach_weight: float = 1.0) -> dict:
        """Mean next-token and attachment cross-entropies on gold tapes (the training loss).

        ``tokens`` [B, T] right-padded (anything past ``tape.lengths``); ``tape`` the gold
        StackTape. Returns {"loss": lm + attach_weight * attach, "lm": ..., "attach": ...}."""
        tokens = self._check_tokens(tokens)
        if not isinstance(tape, StackTape):
            raise TypeError(f"tape: expected the gold StackTape of the batch, got {type(tape).__name__}")
        B, T = tokens.shape
        if (tape.batch_size, tape.seq_len) != (B, T):
            raise ValueError(f"tape: expected batch {B} and length {T} (from tokens), got {tape.batch_size} and {tape.seq_len}")
        hidden = self(tokens, tape)
        pos = torch.arange(T, device=tokens.device)
        real_next = pos[None, :-1] + 1 < tape.lengths.to(tokens.device)[:, None]  # [B, T - 1]
        targets = tokens[:, 1:].masked_fill(~real_next, -100)
        lm = F.cross_entropy(self.logits(hidden[:, :-1]).flatten(0, 1), targets.flatten(), ignore_index=-100)
        nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # position T - 1 has no next token (ignored)
        logits = self.attachment_logits(hidden, nxt, tape, mask=tape.attachment_mask())
        att = F.cross_entropy(logits.flatten(0, 1), tape.attachment_targets().flatten(), ignore_index=-100)
        return {"loss": lm + attach_weight * att, "lm": lm, "attach": att}

    def reorder_cache(self, cache: dict, parents) -> None:
        """Beam search: keep the cached sentences ``parents`` (repeats allowed) in every layer and
        the attachment head."""
        for block, layer in zip(self.blocks, cache["layers"]):
            block.attn.reorder_cache(layer, parents)
        if "head" in cache:
            AttachmentHead.reorder_cache(cache["head"], parents)

    # -- inference ------------------------------------------------------------------------------

    @torch.no_grad()
    def beam_parse(self, tokens: Sequence[int], beam: int = 50) -> BeamParse:
        """Word-synchronous beam search over the attachments of a given prefix ``tokens`` (its
        first token is the beginning of sentence): after each token, every beam is extended by
        every legal attachment of the next token, scored by log p(next token) + log p(attachment),
        and the ``beam`` best of all candidates are kept. One forward step per token for all
        beams, on KV caches; no tape is needed (it is what the search infers)."""
        beam = check_int(beam, "beam", low=1)
        toks = torch.as_tensor(list(tokens), dtype=torch.int64)
        if toks.dim() != 1 or toks.numel() == 0:
            raise ValueError(f"tokens: expected a non-empty sequence of token ids, got shape {list(toks.shape)}")
        if int(toks.min()) < 0 or int(toks.max()) >= self.vocab_size:
            raise ValueError(f"tokens: expected ids in [0, {self.vocab_size}), got min {int(toks.min())}, max {int(toks.max())}")
        device = self.embed.weight.device
        toks = toks.to(device)
        n = toks.numel()
        builder = StackTapeBuilder(1)
        row = builder.push(None)
        cache: dict = {"head": {}}
        scores = torch.zeros(1, dtype=torch.float64, device=device)
        attachments: list[list] = [[None]]
        for t in range(n):
            k = builder.batch_size
            hidden = self(toks[t].expand(k)[:, None], row.to(device)[:, None, :], cache, check_values=False)  # [k, 1, d]
            log_p = torch.log_softmax(self.logits(hidden[:, 0]).double(), dim=-1)
            if t == n - 1:
                break
            nxt = toks[t + 1].expand(k)[:, None]
            mask = builder.attach_mask.to(device)[:, None, :]
            att = self.attachment_logits(hidden, nxt, row.to(device)[:, None, :], mask=mask, cache=cache["head"])
            cand = scores[:, None] + log_p[:, toks[t + 1]][:, None] + torch.log_softmax(att[:, 0].double(), dim=-1)
            flat = cand.flatten()
            keep = min(beam, int(torch.isfinite(flat).sum()))
            best, idx = flat.topk(keep)
            width = t + 2  # reduce with keys 0..t, shift
            parents, choice = (idx // width).tolist(), (idx % width).tolist()
            atts = [None if c == t + 1 else c for c in choice]
            builder = builder.select(parents)
            row = builder.push(atts)
            self.reorder_cache(cache, parents)
            attachments = [attachments[p] + [a] for p, a in zip(parents, atts)]
            scores = best
        top = int(scores.argmax())
        tape = builder.select([top]).tape(device=device)
        return BeamParse(attachments[top], tape, float(scores[top]), log_p[top].float(), scores.float())

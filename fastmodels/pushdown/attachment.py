"""The attachment head of a Pushdown LM (spec section 4): after token t, where does token t + 1
attach -- shift (a new constituent) or reduce with a stack constituent, named by its last token j.

The authors score key j with a 2-layer ReLU MLP over [k'_j ; E'[S(t, j)]] evaluated on every
(t, j) pair, which costs more than the whole trunk. Its first layer is linear in the
concatenation, so W1 [k'_j ; e_d] + b1 = keys_j + depth_feat_d, and its second layer folds into the
query; :func:`fastmodels.ops.attachment_scores` then computes every pair's score in ~3 W FLOPs
without a [B, T, T, W] tensor. The same function class, parameterized directly:

    reduce(t, j) = q~_t . (W2 relu(keys_j + depth_feat[S(t, j)]) + b2)
    shift(t)     = q~_t . s_t
    q~_t = MLP_q([h_t ; e_{t+1}]),  s_t = MLP_s([h_t ; e_{t+1}]),  keys_j = W_k h_j + b1

with e_{t+1} the embedding of the next token (a synchronous LM predicts the token, then its
attachment). ``relative_positions=True`` adds the authors' relative-position term: key j gets
q~_t . W_r r(t + 1 - j) and the shift q~_t . W_r r(0), with r the sinusoidal encoding of a
distance (the next token sits at distance 0; Transformer-XL style, as their head does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmodels._validation import check_bool, check_tensor
from fastmodels.ops.attachment import attachment_scores
from fastmodels.ops.pushdown import check_tape_device
from fastmodels.pushdown import _cache
from fastmodels.pushdown._positions import sinusoidal

__all__ = ["AttachmentHead"]


def _mlp(d_in: int, width: int, dropout: float, factory: dict) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width, **factory), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width, **factory))


class AttachmentHead(nn.Module):
    """Attachment logits over [keys 0 .. Tk - 1 (reduce) ; shift], trained with cross-entropy on
    ``StackTape.attachment_targets()`` (the shift class is the last column, index Tk).

    ``forward(hidden, next_embed, tape)``: hidden [B, Tq, d_model] (the last layer's output at the
    query positions), next_embed [B, Tq, d_embed] (embeddings of tokens t + 1), tape a StackTape
    or a dense [B, Tq, Tk] tape (the same rows the pushdown layers use). Keys come from
    ``context`` [B, Tk, d_model] (default: ``hidden``), from precomputed ``keys``
    (``key_features`` of the context), or, when decoding, from ``cache``: a dict to which each
    call appends the keys of its own ``hidden`` (as ``PushdownAttention``'s cache does: in place
    without autograd; :meth:`reorder_cache` for beam search). ``mask`` [B, Tq, Tk] bool (e.g.
    ``StackTape.attachment_mask()`` or ``StackTapeBuilder.attach_mask[:, None]``) sets the
    reduce logits of keys that end no stack constituent to -inf. Returns [B, Tq, Tk + 1] logits
    in float32 (float64 for float64 parameters).

    Args:
        d_model: width of the hidden states; d_embed: width of the token embeddings (default
            d_model).
        width: width of q~ and of the MLPs (default d_model); hidden: the per-pair MLP's hidden
            width (default width).
        max_depth: rows of the depth table (depths clamped to max_depth - 1); binary: index it
            by S > 0 (Dyck), 2 rows.
        dropout: in the query and shift MLPs (the per-pair MLP runs fused, without dropout).
        relative_positions: add the relative-position term (above); queries are the last Tq of
            the Tk key positions, as in ``pushdown_attention``.
        backend: forwarded to ``fastmodels.ops.attachment_scores``.
    """

    def __init__(self, d_model: int, width: int | None = None, hidden: int | None = None, max_depth: int = 50,
                 binary: bool = False, *, d_embed: int | None = None, dropout: float = 0.0, relative_positions: bool = False,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        width = d_model if width is None else width
        hidden = width if hidden is None else hidden
        d_embed = d_model if d_embed is None else d_embed
        for name, value in (("d_model", d_model), ("width", width), ("hidden", hidden), ("d_embed", d_embed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if isinstance(max_depth, bool) or not isinstance(max_depth, int):
            raise TypeError(f"max_depth: expected an int, got {max_depth!r}")
        if max_depth < (2 if binary else 1):
            raise ValueError(f"max_depth: expected >= {2 if binary else 1}, got {max_depth}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_embed, self.binary, self.backend = d_model, d_embed, binary, backend
        self.query = _mlp(d_model + d_embed, width, dropout, factory)
        self.shift = _mlp(d_model + d_embed, width, dropout, factory)
        self.key = nn.Linear(d_model, hidden, **factory)  # W1's key half, with b1
        self.depth_feat = nn.Parameter(torch.empty(2 if binary else max_depth, hidden, **factory))  # W1's depth half
        self.out = nn.Linear(hidden, width, **factory)  # W2, b2
        nn.init.normal_(self.depth_feat, std=hidden ** -0.5)
        check_bool(relative_positions, "relative_positions")
        self.rel = nn.Linear(width, width, bias=False, **factory) if relative_positions else None  # W_r

    def key_features(self, context: torch.Tensor) -> torch.Tensor:
        """keys_j = W_k h_j + b1 for hidden states [B, T, d_model]: what a decoder caches."""
        return self.key(context)

    def forward(self, hidden: torch.Tensor, next_embed: torch.Tensor, tape, *, context: torch.Tensor | None = None,
                keys: torch.Tensor | None = None, mask: torch.Tensor | None = None, cache: dict | None = None,
                check_values: bool = True) -> torch.Tensor:
        for name, x, width in (("hidden", hidden, self.d_model), ("next_embed", next_embed, self.d_embed)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != width:
                shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name}: expected a tensor [B, Tq, {width}], got {shape}")
        if next_embed.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"next_embed: expected [B, Tq] = {list(hidden.shape[:2])} (from hidden), got {list(next_embed.shape[:2])}")
        check_tape_device(tape, hidden.device, "hidden")
        if context is not None and (not isinstance(context, torch.Tensor) or context.dim() != 3
                                    or context.shape[0] != hidden.shape[0] or context.shape[-1] != self.d_model):
            shape = list(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context: expected a tensor [B={hidden.shape[0]}, Tk, {self.d_model}] (d_model), got {shape}")
        if cache is not None:
            if not isinstance(cache, dict):
                raise TypeError(f"cache: expected a dict (empty on the first call), got {type(cache).__name__}")
            if keys is not None or context is not None:
                raise ValueError("cache: give a cache, keys or context, not two of them")
            new = self.key_features(hidden)
            if "keys" in cache:  # [B, T_past, width], as an earlier call stored it
                check_tensor(cache["keys"], "cache['keys']", shape=(hidden.shape[0], None, self.key.out_features),
                             dtypes=(new.dtype,), device=new.device, dtype_of="the new keys", device_of="the new keys")
            (keys,) = _cache.append(cache, ("keys",), (new,), dim=1)
        elif keys is None:
            keys = self.key_features(hidden if context is None else context)
        elif context is not None:
            raise ValueError("context: give context or keys, not both")
        if not isinstance(keys, torch.Tensor) or keys.dim() != 3 or keys.shape[0] != hidden.shape[0] or keys.shape[-1] != self.key.out_features:
            shape = list(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"keys: expected a tensor [B={hidden.shape[0]}, Tk, {self.key.out_features}] (key_features of the context), got {shape}")
        if mask is not None:
            want = [hidden.shape[0], hidden.shape[1], keys.shape[1]]
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or list(mask.shape) != want:
                got = f"{str(mask.dtype).replace('torch.', '')} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"mask: expected a bool tensor {want} ([B, Tq, Tk]), got {got}")
        x = torch.cat([hidden, next_embed.to(hidden.dtype)], dim=-1)
        qt = self.query(x)  # q~ [B, Tq, width]
        # one dtype for the op: the keys' (under torch.autocast the matmuls give bf16/fp16 while
        # the depth table stays a float32 parameter); the scores are float32 either way
        dt = keys.dtype
        reduce = attachment_scores((qt @ self.out.weight).to(dt), keys, self.depth_feat.to(dt), tape, binary=self.binary,
                                   backend=self.backend, check_values=check_values)
        reduce = reduce + (qt @ self.out.bias).to(reduce.dtype)[..., None]
        if mask is not None:
            reduce = reduce.masked_fill(~mask, float("-inf"))
        shift = (qt * self.shift(x)).sum(-1, keepdim=True).to(reduce.dtype)
        if self.rel is not None:
            B, Tq, Tk = reduce.shape
            # q~_t . W_r r(d) for every distance d = 0..Tk, then each pair's distance t + 1 - j
            table = (qt @ self.rel(sinusoidal(0, Tk + 1, self.rel.in_features, device=qt.device, dtype=qt.dtype)).T).to(reduce.dtype)
            t = torch.arange(Tk - Tq, Tk, device=qt.device)
            dist = (t[:, None] + 1 - torch.arange(Tk, device=qt.device)[None, :]).clamp(min=0)  # j > t: masked by callers
            reduce = reduce + table.gather(-1, dist.expand(B, Tq, Tk))
            shift = shift + table[..., :1]
        return torch.cat([reduce, shift], dim=-1)

    @staticmethod
    def reorder_cache(cache: dict, parents) -> None:
        """Beam search: keep the cached sentences ``parents`` (indices into the batch, repeats
        allowed), as :meth:`PushdownAttention.reorder_cache` does for the attention layers."""
        _cache.reorder(cache, ("keys",), parents, dim=1)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of [B, Tq, Tk + 1] logits against [B, Tq] targets (from
        ``StackTape.attachment_targets``); 0 when every target is ignored."""
        total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="sum")
        return total / (targets != ignore_index).sum().clamp(min=1)

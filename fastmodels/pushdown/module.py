"""Pushdown attention modules: a drop-in causal self-attention layer and a GPT-2 converter."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from fastmodels._validation import check_bool, check_int, check_tensor
from fastmodels.ops.pushdown import check_dense_tape, check_tape_device, pushdown_attention
from fastmodels.pushdown import _cache
from fastmodels.pushdown.tape import StackTape

__all__ = ["PushdownAttention", "pushdownify_gpt2", "set_stack_tape"]


class PushdownAttention(nn.Module):
    """Causal multi-head self-attention with a stack-depth term (Pushdown Layers).

    ``forward(x, tape)``: x [B, T, d_model]; tape a :class:`StackTape` (batch B, length T) or a
    dense integer tensor [B, T, T]. Returns [B, T, d_model].

    Decoding with a KV cache: pass a dict as ``cache``; keys and values of earlier calls are kept
    in it (``cache['k']``, ``cache['v']``: [B, H, T_total, head_dim]) and the new tokens attend to
    them. The tape must then cover the new queries only: a dense [B, T_new, T_total] tensor (e.g.
    ``StackTapeBuilder.push(...)[:, None, :]`` for one token) or a StackTape of the whole length.
    ``check_values=False`` skips the dense tape's non-negativity check, the one host sync of a
    decoding step. Without autograd (``torch.no_grad()`` / ``torch.inference_mode()``) the cache
    appends in place into buffers with spare capacity; with autograd it concatenates. For beam
    search, :meth:`reorder_cache` keeps chosen sentences (indexing ``cache['k']`` / ``['v']``
    yourself also works, at the cost of one more copy on the next step).

    Args:
        d_model, n_heads: width and heads (d_model divisible by n_heads).
        max_depth: rows V of the depth table (depths are clamped to V - 1; the authors use 50).
        binary: Dyck 0/1 tape (index S > 0); the table then has 2 rows.
        dropout: dropout on the output projection (attention-probability dropout is not
            implemented by the fused kernels).
        bias: biases in the projections.
        per_head_table: one depth table per head ([H, V, D]) instead of one shared ([V, D]).
        backend: forwarded to ``fastmodels.ops.pushdown_attention``.
    """

    def __init__(self, d_model: int, n_heads: int, max_depth: int = 50, binary: bool = False, dropout: float = 0.0, bias: bool = True, *, per_head_table: bool = False, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        n_heads = check_int(n_heads, "n_heads", low=1)
        d_model = check_int(d_model, "d_model", low=1)
        if d_model % n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={n_heads}, got {d_model}")
        check_bool(binary, "binary")
        max_depth = check_int(max_depth, "max_depth", low=2 if binary else 1)
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.binary, self.backend = binary, backend
        rows = 2 if binary else max_depth
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias, **factory)
        self.proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        shape = (n_heads, rows, self.head_dim) if per_head_table else (rows, self.head_dim)
        self.depth_emb = nn.Parameter(torch.empty(shape, **factory))
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.depth_emb, std=0.02)

    def forward(self, x: torch.Tensor, tape, cache: dict | None = None, *, check_values: bool = True) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a tensor [B, T, {self.d_model}] (d_model), got {shape}")
        B, T, C = x.shape
        check_tape_device(tape, x.device, "x")
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            if not isinstance(cache, dict):
                raise TypeError(f"cache: expected a dict (empty on the first call), got {type(cache).__name__}")
            if "k" in cache or "v" in cache:
                dims = {}
                for name in ("k", "v"):  # [B, H, T_past, head_dim], as an earlier call stored them
                    check_tensor(cache.get(name), f"cache[{name!r}]", shape=(B, self.n_heads, "T_past", self.head_dim), dims=dims,
                                 dtypes=(k.dtype,), device=k.device, dtype_of="the new keys and values",
                                 device_of="the new keys and values")
            k, v = _cache.append(cache, ("k", "v"), (k, v), dim=2)
        y = pushdown_attention(q, k, v, self.depth_emb, tape, binary=self.binary, backend=self.backend, check_values=check_values)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))

    @staticmethod
    def reorder_cache(cache: dict, parents) -> None:
        """Beam search: keep the cached sentences ``parents`` (indices into the batch, repeats
        allowed; the new batch has len(parents) rows). Updates ``cache`` with one copy of the keys
        and values; the tensors it held before are left as they were. Reorder the tape builder
        with the same indices (``builder.select(parents)``)."""
        _cache.reorder(cache, ("k", "v"), parents, dim=2)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, depth_rows={self.depth_emb.shape[-2]}, binary={self.binary}"


class GPT2PushdownAttention(nn.Module):
    """Replaces a Hugging Face ``GPT2Attention``: the same c_attn / c_proj modules (so the
    state-dict keys and pretrained weights are kept) plus a depth table. The stack tape is set
    with :func:`set_stack_tape` before calling the model.

    Attention masks are ignored: right padding needs no mask (causal queries of real tokens never
    see padding); left padding is not supported. A Hugging Face cache object (``.update``) is
    honoured; the tape must then give a dense row per new query.
    """

    def __init__(self, attn: nn.Module, max_depth: int, binary: bool, per_head_table: bool, backend: str | None):
        super().__init__()
        if getattr(attn, "is_cross_attention", False):
            raise ValueError("attn: cross-attention layers cannot become pushdown layers")
        self.c_attn, self.c_proj, self.resid_dropout = attn.c_attn, attn.c_proj, attn.resid_dropout
        self.embed_dim, self.num_heads, self.head_dim = attn.embed_dim, attn.num_heads, attn.head_dim
        self.layer_idx = getattr(attn, "layer_idx", None)
        cfg = attn.config
        scale = self.head_dim**-0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) and self.layer_idx is not None:
            scale /= float(self.layer_idx + 1)
        self.scale, self.binary, self.backend = scale, binary, backend
        w = attn.c_attn.weight
        rows = 2 if binary else max_depth
        shape = (self.num_heads, rows, self.head_dim) if per_head_table else (rows, self.head_dim)
        # zero table: the converted model starts as exactly the pretrained one
        self.depth_emb = nn.Parameter(torch.zeros(shape, device=w.device, dtype=w.dtype))
        self.tape = None

    def forward(self, hidden_states, *args, **kwargs):
        if self.tape is None:
            raise RuntimeError("no stack tape set: call fastmodels.pushdown.set_stack_tape(model, tape) before the forward")
        B, T, _ = hidden_states.shape
        check_tape_device(self.tape, hidden_states.device, "the model's hidden states")
        q, k, v = self.c_attn(hidden_states).split(self.embed_dim, dim=2)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("layer_past")))
        if cache is not None and hasattr(cache, "update") and self.layer_idx is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # set_stack_tape checked the tape once for every layer
        y = pushdown_attention(q, k, v, self.depth_emb, self.tape, scale=self.scale, binary=self.binary, backend=self.backend,
                               check_values=False)
        y = self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, self.embed_dim)))
        return y, None


def pushdownify_gpt2(model: nn.Module, layers: Iterable[int] | None = None, *, max_depth: int = 50, binary: bool = False, per_head_table: bool = False, backend: str | None = None) -> nn.Module:
    """Replace the self-attention of the chosen GPT-2 blocks (default: all) with pushdown
    attention, in place (the paper's Pushdown-GPT2). Works on ``GPT2LMHeadModel`` / ``GPT2Model``.
    The depth tables start at zero, so the model is unchanged (in eval mode) until they are
    trained. Set the tape with :func:`set_stack_tape` before each forward. Returns ``model``.

    GPT-2's attention-probability dropout (``attn_pdrop``) is not applied; residual dropout is.
    The depth tables are new ``...attn.depth_emb`` parameters: convert after ``from_pretrained``
    and reload a trained model's ``state_dict`` into a converted model."""
    transformer = getattr(model, "transformer", model)
    blocks = getattr(transformer, "h", None)
    if blocks is None:
        raise TypeError(f"model: expected a Hugging Face GPT-2 model (with .transformer.h or .h), got {type(model).__name__}")
    check_bool(binary, "binary")
    check_int(max_depth, "max_depth", low=1)  # a binary table has 2 rows whatever max_depth is
    chosen = range(len(blocks)) if layers is None else list(layers.tolist() if hasattr(layers, "tolist") else layers)
    chosen = [check_int(i, "layers (an index)") for i in chosen]  # all indices first: a refused call converts no block
    for i in chosen:
        if not -len(blocks) <= i < len(blocks):
            raise ValueError(f"layers: index {i} is out of range for {len(blocks)} blocks")
    for i in chosen:
        block = blocks[i]
        if not isinstance(block.attn, GPT2PushdownAttention):
            block.attn = GPT2PushdownAttention(block.attn, max_depth, binary, per_head_table, backend)
    return model


def set_stack_tape(model: nn.Module, tape: StackTape | torch.Tensor | None, *, check_values: bool = True) -> None:
    """Set the tape every converted GPT-2 attention layer of ``model`` uses in its next forward.

    A dense tape is checked for negative depths here, once for all layers (one host sync;
    ``check_values=False`` skips it, e.g. in a decoding loop, and negative depths then read as 0)."""
    check_bool(check_values, "check_values")
    if check_values and isinstance(tape, torch.Tensor):
        check_dense_tape(tape)
    found = False
    for m in model.modules():
        if isinstance(m, GPT2PushdownAttention):
            m.tape = tape
            found = True
    if not found:
        raise ValueError("model: no pushdown attention layer found (call pushdownify_gpt2 first)")


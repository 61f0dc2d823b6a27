"""Decoding caches of the pushdown modules: a dict of tensors that grow along one dimension by one
step's positions at a time (``PushdownAttention``: keys and values [B, H, T, head_dim] along T;
``AttachmentHead``: keys [B, T, width] along T).

Without autograd (``torch.no_grad`` / ``inference_mode``, where decoding runs) the tensors live in
buffers with spare capacity that grow by half when full, and the dict holds views of their filled
prefix: a step copies only its new positions, instead of concatenating all T of them (whole
decodes through ``PushdownAttention`` were faster in every run on the development CPU; measured in
docs/pushdown.md). With autograd, and under torch.compile, the dict's tensors are concatenated:
the new keys and values then stay in the autograd graph.

Views handed out earlier never change: appends write only past the longest view handed out
(``filled``), so a dict copied to branch a decode, or a cache cut back to a prefix, gets a buffer of
its own on its next append. Because of that, appends write through ``.data``, which leaves the
views' shared version counter alone: a view that a differentiable call saved for backward (a
policy-gradient loss over a sampled decode) still backpropagates after later no-grad appends, as
with concatenation. The dict holds plain tensors (users may copy, index or save it; a saved or
deep-copied view carries its whole buffer, capacity included); its buffer is found from the first
view through a weak map.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fastmodels._validation import INT_DTYPES

_MIN_CAPACITY = 64
_CAPACITY_CACHE = True  # False: every step concatenates (the behaviour before; benchmarks compare)


class _Buffer:
    """The tensors of one cache (same leading sizes, grown along ``dim``; their size there is the
    capacity), of which the first ``filled`` positions are covered by views handed out so far."""

    __slots__ = ("parts", "dim", "filled")

    def __init__(self, parts: tuple[torch.Tensor, ...], dim: int, filled: int):
        self.parts, self.dim, self.filled = parts, dim, filled

    def views(self) -> tuple[torch.Tensor, ...]:
        views = tuple(p.narrow(self.dim, 0, self.filled) for p in self.parts)
        _BUFFERS[views[0]] = self
        return views


_BUFFERS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # first view -> its _Buffer


def _live_buffer(past: tuple[torch.Tensor, ...], dim: int) -> _Buffer | None:
    """The buffer behind ``past`` if these are still the views it handed out last (a reorder or
    slice by the user gives other tensors), else None."""
    buf = _BUFFERS.get(past[0])
    if buf is None or buf.dim != dim or buf.filled != past[0].shape[dim] or len(buf.parts) != len(past):
        return None
    for view, whole in zip(past, buf.parts):
        if view.data_ptr() != whole.data_ptr() or view.stride() != whole.stride() or view.shape[:dim] != whole.shape[:dim]:
            return None
    return buf


def append(cache: dict, names: tuple[str, ...], new: tuple[torch.Tensor, ...], dim: int) -> tuple[torch.Tensor, ...]:
    """Append ``new`` (one tensor per name) to ``cache[name]`` along ``dim``; returns the whole
    cached tensors, which the cache then holds. The caller has checked shapes, dtypes, devices."""
    past = tuple(cache[n] for n in names) if names[0] in cache else None
    if not _CAPACITY_CACHE or torch.is_grad_enabled() or torch.compiler.is_compiling():
        out = new if past is None else tuple(torch.cat([p, x], dim=dim) for p, x in zip(past, new))
        cache.update(zip(names, out))
        return out
    start = 0 if past is None else past[0].shape[dim]
    n = start + new[0].shape[dim]
    buf = None if past is None else _live_buffer(past, dim)
    if buf is not None:
        inference_outside = buf.parts[0].is_inference() and not torch.is_inference_mode_enabled()
        if n > buf.parts[0].shape[dim] or inference_outside:
            buf = None
    if buf is None:  # a new buffer: the past copied once
        cap = max(_MIN_CAPACITY, n + n // 2)
        parts = []
        for i, x in enumerate(new):
            shape = list(x.shape)
            shape[dim] = cap
            part = x.new_empty(shape)
            if start:
                part.narrow(dim, 0, start).copy_(past[i])
            parts.append(part)
        buf = _Buffer(tuple(parts), dim, start)
    for part, x in zip(buf.parts, new):
        # positions no view covers: through .data, so views saved for backward keep their version
        part.data.narrow(dim, start, n - start).copy_(x)
    buf.filled = n
    out = buf.views()
    cache.update(zip(names, out))
    return out


def reorder(cache: dict, names: tuple[str, ...], parents, dim: int) -> None:
    """Keep the batch rows ``parents`` (repeats allowed) of every cached tensor: beam search."""
    if not isinstance(cache, dict) or any(n not in cache for n in names):
        keys = " and ".join(repr(n) for n in names)
        raise ValueError(f"cache: expected a dict filled by an earlier forward (with {keys})")
    past = tuple(cache[n] for n in names)
    idx = torch.as_tensor(parents, device=past[0].device)
    if idx.numel() == 0:  # before the dtype check: as_tensor([]) is float32
        raise ValueError(f"parents: expected at least one batch index, got an empty {type(parents).__name__}")
    if idx.dim() != 1 or idx.dtype not in INT_DTYPES or idx.dtype == torch.uint8:
        raise ValueError(f"parents: expected a 1-D sequence of integer batch indices, got shape {list(idx.shape)}, "
                         f"dtype {str(idx.dtype).replace('torch.', '')}")
    B = past[0].shape[0]
    if not bool(((idx >= 0) & (idx < B)).all()):
        raise ValueError(f"parents: expected indices in [0, {B}) (the cache's batch), got {idx.tolist()}")
    idx = idx.long()
    buf = _live_buffer(past, dim)
    if buf is None:
        cache.update(zip(names, (p[idx] for p in past)))
    else:  # each whole capacity buffer in one contiguous gather; the prefix stays a view of it
        cache.update(zip(names, _Buffer(tuple(p.index_select(0, idx) for p in buf.parts), dim, buf.filled).views()))

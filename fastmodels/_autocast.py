"""How the ops behave inside ``torch.autocast`` regions.

autocast changes the dtype that torch's own matmuls return. Inside an op that would hand the C++
kernels bf16 buffers where they read fp32 ones, make the reference backend compute in another
precision than the fused backends, and break the randomized SVD's accuracy contract. So the ops
never let autocast act on their insides; each states its policy instead:

* attention-like ops (``pushdown_attention``, ``attachment_scores``) act as torch's
  ``scaled_dot_product_attention`` does under autocast: their fp32/fp16/bf16 tensor inputs are
  cast to autocast's dtype (float64 stays float64), and the op runs on those
  (:func:`autocast_dtype` and :func:`cast_to`);
* ``linear_cross_entropy_kl`` casts its matmul operands the same way, with fp32 logits inside;
* ops that choose their own precision (the randomized SVD family, ``electric_image``) take their
  inputs as given, like ``torch.linalg``'s ops;

and every implementation that calls torch matmuls runs under :func:`autocast_off`. That also
covers backward passes: the autograd engine runs a custom Function's backward with the caller's
autocast state, so a ``loss.backward()`` inside an autocast region would otherwise compute part of
an fp32 op's gradients in bf16.
"""

from __future__ import annotations

import functools

import torch

_CAST = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(x) -> torch.dtype | None:
    """autocast's lower-precision dtype when autocast is on for the device of tensor ``x``, else
    None (also for a non-tensor ``x``: the op's own validation then names it)."""
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def cast_to(x, dtype: torch.dtype):
    """``x`` in ``dtype`` when it is an fp32/fp16/bf16 tensor, else ``x`` unchanged (float64,
    integer tensors, None, non-tensors), as autocast casts the inputs of a lower-precision op."""
    if isinstance(x, torch.Tensor) and x.dtype in _CAST and x.dtype != dtype:
        return x.to(dtype)
    return x


def autocast_off(fn):
    """Run ``fn`` with autocast disabled on the CPU and CUDA (a no-op outside autocast)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        cpu, cuda = torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")
        if not (cpu or cuda):
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper

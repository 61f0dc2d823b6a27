"""Public ops. Each op module registers itself with the backend dispatcher on import.

Conventions every op follows (see fastmodels/_dispatch.py and fastmodels/_validation.py):
- a pure-PyTorch reference (the math as written, float64-capable);
- kernels in fastmodels.kernels (Triton) and csrc/ (C++, CUDA C++) that never import this package;
- an autograd path registered as torch.library.custom_op with register_fake, so that
  torch.compile(fullgraph=True) traces through it;
- a public function that validates its arguments and takes ``backend=None``.
"""
from fastmodels.ops.attachment import attachment_scores
from fastmodels.ops.efield import electric_image, electric_image_reference
from fastmodels.ops.nextlat import linear_cross_entropy_kl
from fastmodels.ops.pushdown import pushdown_attention
from fastmodels.ops.rsvd import (
    IntruderDimensions,
    SVDResult,
    intruder_dimensions,
    low_rank,
    randomized_svd,
    singular_value_grads,
)

__all__ = [
    "IntruderDimensions",
    "SVDResult",
    "attachment_scores",
    "electric_image",
    "electric_image_reference",
    "intruder_dimensions",
    "linear_cross_entropy_kl",
    "low_rank",
    "pushdown_attention",
    "randomized_svd",
    "singular_value_grads",
]

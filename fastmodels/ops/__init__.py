"""Public ops. Each op module registers itself with the backend dispatcher on import.

Conventions every op follows (see fastmodels/_dispatch.py and fastmodels/_validation.py):
- a pure-PyTorch reference (the math as written, float64-capable);
- kernels in fastmodels.kernels (Triton) and csrc/ (C++, CUDA C++) that never import this package;
- an autograd path registered as torch.library.custom_op with register_fake, so that
  torch.compile(fullgraph=True) traces through it;
- a public function that validates its arguments and takes ``backend=None``.
"""
from fastmodels.ops.rsvd import SVDResult, IntruderDimensions, randomized_svd, low_rank, singular_value_grads, intruder_dimensions  # noqa: F401

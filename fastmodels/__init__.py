"""fastmodels: Triton and CUDA C++ kernels, with pure-PyTorch references and CPU fallbacks, for
four recent papers' computations, plus drop-in modules and the papers' reproductions.

``import fastmodels`` works with no GPU and without triton; then only the reference (and, if
built, the C++ cpu) backends are available. ``fastmodels.backends()`` reports what runs here.
"""

from fastmodels import ops
from fastmodels._dispatch import BACKENDS, backends, select_backend
from fastmodels.pushdown import PushdownAttention

__version__ = "0.1.0"

__all__ = ["BACKENDS", "backends", "ops", "select_backend", "PushdownAttention", "__version__"]

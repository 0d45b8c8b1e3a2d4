"""mimfast.kernels: Triton kernels, their launchers and ``torch.library`` ops (namespace ``mimfast::``).

Depends on torch and triton only. Each op lives in one file with four parts: ``@triton.jit`` kernels, a validating
launcher, the op binding whose CPU kernel is the plain-PyTorch reference, and ``<op>_ref``.
"""

from ._common import HAS_TRITON, interpret_mode, use_triton
from .gumbel_softmax import gumbel_noise_ref, gumbel_softmax, gumbel_softmax_ref
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .vq_search import vq_search, vq_search_ref

__all__ = [
    "HAS_TRITON",
    "gumbel_noise_ref",
    "gumbel_softmax",
    "gumbel_softmax_ref",
    "interpret_mode",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "use_triton",
    "vq_search",
    "vq_search_ref",
]

"""mimfast: fast kernels and systems for masked image modeling pretraining and VQ image tokenizers.

Public API::

    quantized, indices, loss = mimfast.quantize(x, codebook)        # drop-in functional
    vq = mimfast.VectorQuantizer(dim=256, codebook_size=8192)      # EMA / learnable codebook module
    indices, distances, counts = mimfast.vq_search(x, codebook)    # fused nearest-code search
"""

from .layers import VectorQuantizer
from .ops import QuantizeInfo, quantize, quantize_with_info, usage_stats, vq_search

__version__ = "0.1.0"

__all__ = [
    "QuantizeInfo",
    "VectorQuantizer",
    "__version__",
    "quantize",
    "quantize_with_info",
    "usage_stats",
    "vq_search",
]

"""mimfast.ops: the public functional API over mimfast.kernels."""

from .cross_entropy import linear_cross_entropy
from .gumbel import GUMBEL_NAN_POLICIES, draw_philox, gumbel_quantize, gumbel_softmax
from .masking import (
    MageMask,
    RandomMask,
    beit_block_masking,
    block_masking,
    cae_block_masking,
    mage_masking,
    random_masking,
)
from .quantize import NAN_POLICIES, QuantizeInfo, quantize, quantize_with_info, usage_stats, vq_search
from .tokens import gather_tokens, inverse_index, restore_tokens

__all__ = [
    "GUMBEL_NAN_POLICIES",
    "NAN_POLICIES",
    "MageMask",
    "QuantizeInfo",
    "RandomMask",
    "beit_block_masking",
    "block_masking",
    "cae_block_masking",
    "draw_philox",
    "gather_tokens",
    "gumbel_quantize",
    "gumbel_softmax",
    "inverse_index",
    "linear_cross_entropy",
    "mage_masking",
    "quantize",
    "quantize_with_info",
    "random_masking",
    "restore_tokens",
    "usage_stats",
    "vq_search",
]

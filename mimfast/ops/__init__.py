"""mimfast.ops: the public functional API over mimfast.kernels."""

from .quantize import NAN_POLICIES, QuantizeInfo, quantize, quantize_with_info, usage_stats, vq_search

__all__ = ["NAN_POLICIES", "QuantizeInfo", "quantize", "quantize_with_info", "usage_stats", "vq_search"]

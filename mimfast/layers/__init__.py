"""mimfast.layers: modules built on mimfast.ops (quantizers; ViT blocks and attention backends follow)."""

from .quantizer import VectorQuantizer

__all__ = ["VectorQuantizer"]

"""mimfast.layers: modules built on mimfast.ops: ViT blocks, the attention backend switch, quantizers."""

from .attention import attention, attention_backend, available_backends, set_default_backend
from .discriminator import NLayerDiscriminator
from .gumbel_quantizer import GumbelQuantizer
from .quantizer import VectorQuantizer
from .regularized_quantizer import RegularizedQuantizer
from .vit import (
    Attention,
    Block,
    DropPath,
    LayerScale,
    Mlp,
    PatchEmbed,
    RelativePositionBias,
    get_2d_sincos_pos_embed,
)

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "GumbelQuantizer",
    "LayerScale",
    "Mlp",
    "NLayerDiscriminator",
    "PatchEmbed",
    "RegularizedQuantizer",
    "RelativePositionBias",
    "VectorQuantizer",
    "attention",
    "attention_backend",
    "available_backends",
    "get_2d_sincos_pos_embed",
    "set_default_backend",
]

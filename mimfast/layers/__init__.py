"""mimfast.layers: modules built on mimfast.ops: ViT blocks, the attention backend switch, quantizers."""

from .attention import attention, attention_backend, available_backends, set_default_backend
from .discriminator import NLayerDiscriminator
from .quantizer import VectorQuantizer
from .vit import Attention, Block, DropPath, LayerScale, Mlp, PatchEmbed, get_2d_sincos_pos_embed

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "NLayerDiscriminator",
    "PatchEmbed",
    "VectorQuantizer",
    "attention",
    "attention_backend",
    "available_backends",
    "get_2d_sincos_pos_embed",
    "set_default_backend",
]

"""mimfast.models: MIM models built on mimfast.layers / mimfast.ops, and the name registry."""

from . import vit_classifier  # noqa: F401  (registers the ViT classifiers; mimfast.models.vit_classifier)
from .beit import BEiT, BEiTConfig
from .cae import CAE, CAEConfig
from .mae import MAEConfig, MaskedAutoencoderViT
from .mage import MAGE, MAGEConfig
from .mage_vqgan import MAGEVQGAN, MAGEVQGANConfig
from .registry import create_model, list_models, register_model
from .vqgan import VQGAN, VQGANConfig

__all__ = [
    "BEiT",
    "CAE",
    "BEiTConfig",
    "VQGAN",
    "CAEConfig",
    "MAGE",
    "MAGEVQGAN",
    "MAGEConfig",
    "MAGEVQGANConfig",
    "MAEConfig",
    "MaskedAutoencoderViT",
    "VQGANConfig",
    "create_model",
    "list_models",
    "register_model",
]

"""mimfast.losses: training objectives for VQ tokenizers.

- :func:`patch_nce_loss`: PatchNCE (CUT) between a reconstruction's and its image's feature maps.
- :func:`probabilistic_contrastive_loss`: Regularized VQ's PCL (PatchNCE with the quantizer's position weights).
- :class:`VQGANLoss`: L1 + perceptual / contrastive on a user-supplied feature extractor + codebook loss + PatchGAN
  (hinge, ``disc_start``, VQGAN's adaptive weight), split into a generator and a discriminator loss that can be
  summed and backpropagated once.
"""

from .contrastive import patch_nce_loss, pcl_position_weights, probabilistic_contrastive_loss
from .vqgan import VQGANLoss, adopt_weight, hinge_d_loss, perceptual_distance, vanilla_d_loss

__all__ = [
    "VQGANLoss",
    "adopt_weight",
    "hinge_d_loss",
    "patch_nce_loss",
    "pcl_position_weights",
    "perceptual_distance",
    "probabilistic_contrastive_loss",
    "vanilla_d_loss",
]

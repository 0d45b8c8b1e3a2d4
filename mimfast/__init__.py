"""mimfast: fast kernels and systems for masked image modeling pretraining and VQ image tokenizers.

Public API::

    quantized, indices, loss = mimfast.quantize(x, codebook)        # drop-in functional
    vq = mimfast.VectorQuantizer(dim=256, codebook_size=8192)      # EMA / learnable codebook module
    y = mimfast.gumbel_softmax(logits, tau=1.0, hard=True)        # drop-in F.gumbel_softmax, one fused kernel
    rq = mimfast.RegularizedQuantizer(256, 8192)                   # Regularized VQ (also mimfast.GumbelQuantizer)
    indices, distances, counts = mimfast.vq_search(x, codebook)    # fused nearest-code search

    m = mimfast.random_masking(B, L, 0.75)                         # MAE masking on the device, no host sync
    x = mimfast.gather_tokens(tokens, m.ids_keep, pos=pos)         # visible tokens (+ pos, + cls) in one pass
    y = mimfast.restore_tokens(x, m.ids_restore, mask_token)       # decoder order, mask tokens filled
    mae = mimfast.create_model("mae_vit_base_patch16_dec512d8b")   # loss, pred, mask = mae(images)
    crit = mimfast.VQGANLoss(feature_extractor=net)                # tokenizer losses (mimfast.losses)
    loss = mimfast.linear_cross_entropy(h, head.weight, targets)    # fused head + CE, no M x V logits
"""

from . import losses
from .layers import GumbelQuantizer, RegularizedQuantizer, VectorQuantizer
from .losses import VQGANLoss, patch_nce_loss, probabilistic_contrastive_loss
from .models import create_model, list_models
from .ops import (
    QuantizeInfo,
    beit_block_masking,
    block_masking,
    cae_block_masking,
    gather_tokens,
    gumbel_quantize,
    gumbel_softmax,
    linear_cross_entropy,
    mage_masking,
    quantize,
    quantize_with_info,
    random_masking,
    restore_tokens,
    usage_stats,
    vq_search,
)

__version__ = "0.1.0"

__all__ = [
    "GumbelQuantizer",
    "QuantizeInfo",
    "RegularizedQuantizer",
    "VQGANLoss",
    "VectorQuantizer",
    "__version__",
    "beit_block_masking",
    "block_masking",
    "cae_block_masking",
    "create_model",
    "gather_tokens",
    "gumbel_quantize",
    "gumbel_softmax",
    "linear_cross_entropy",
    "list_models",
    "losses",
    "mage_masking",
    "patch_nce_loss",
    "probabilistic_contrastive_loss",
    "quantize",
    "quantize_with_info",
    "random_masking",
    "restore_tokens",
    "usage_stats",
    "vq_search",
]

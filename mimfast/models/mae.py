"""Masked autoencoder (He et al. 2021) with the encoder on visible tokens only.

Semantics follow the official MAE code exactly (SPEC.md): patchify 16x16x3 (channel last inside a patch), fixed 2-D
sin-cos position embeddings with a zero class-token row, per-sample random masking by ``argsort`` of uniform noise
(small noise = keep), encoder on [cls ; visible], a narrower decoder on [cls ; visible + mask tokens in image order]
with its own sin-cos positions, and the (norm-pix) MSE averaged over the removed patches only.

Two paths over the same parameters, selected by ``fused`` (default True):

* fused: one ``mimfast::gather_tokens`` launch (gather + position embedding + class-token prefix) in place of
  add/gather/cat, one ``mimfast::restore_tokens`` launch (unshuffle + mask tokens + decoder positions) in place of
  repeat/cat/gather/cat/add, int32 indices, and attention through :mod:`mimfast.layers.attention`'s default backend
  (FlashAttention / SDPA).
* eager twin (``fused=False``): the official model's code path, op for op (int64 index expanded to the activations'
  shape, ``torch.gather``, ``cat``, explicit softmax attention). It is the oracle for the fused path.

Parameter names are the official ones, so an official MAE checkpoint loads directly
(:meth:`MaskedAutoencoderViT.load_official_state_dict`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..layers.attention import attention_backend
from ..layers.vit import Block, PatchEmbed, get_2d_sincos_pos_embed, init_patch_embed_weights, init_vit_weights
from ..ops.masking import random_masking
from ..ops.tokens import gather_tokens, restore_tokens
from .registry import register_model

__all__ = ["MAEConfig", "MaskedAutoencoderViT"]


@dataclass
class MAEConfig:
    """Architecture of a masked autoencoder (defaults: ViT-B/16 encoder, 512-d 8-block decoder)."""

    img_size: int = 224
    """Input resolution (square), a multiple of ``patch_size``."""
    patch_size: int = 16
    """Patch side p; a patch is p*p*in_chans values."""
    in_chans: int = 3
    """Image channels."""
    embed_dim: int = 768
    """Encoder width D."""
    depth: int = 12
    """Encoder blocks."""
    num_heads: int = 12
    """Encoder attention heads (divides embed_dim)."""
    decoder_embed_dim: int = 512
    """Decoder width."""
    decoder_depth: int = 8
    """Decoder blocks."""
    decoder_num_heads: int = 16
    """Decoder attention heads (divides decoder_embed_dim)."""
    mlp_ratio: float = 4.0
    """MLP hidden width / block width."""
    norm_pix_loss: bool = True
    """Normalise each target patch by its mean and unbiased variance (MAE's recommended setting; the official class
    defaults to False, its pretraining recipe turns it on)."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon of every norm."""

    def __post_init__(self):
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
                     "decoder_depth", "decoder_num_heads"):  # fmt: skip
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"MAEConfig.{name}: expected an int >= 1, got {v!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"MAEConfig.img_size: expected a multiple of patch_size={self.patch_size}, got {self.img_size}"
            )
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if getattr(self, dim) % getattr(self, heads) or getattr(self, dim) % 4:
                raise ValueError(
                    f"MAEConfig.{dim}: expected a multiple of {heads}={getattr(self, heads)} and of 4 "
                    f"(2-D sin-cos embedding), got {getattr(self, dim)}"
                )
        if not self.mlp_ratio > 0:
            raise ValueError(f"MAEConfig.mlp_ratio: expected > 0, got {self.mlp_ratio!r}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder that sees the visible patches only.

    ``forward(imgs (B, C, H, W), mask_ratio=0.75, noise=None) -> (loss (), pred (B, L, p*p*C), mask (B, L))``,
    mask = 1 for removed patches, as the official model returns.

    Args:
        config: an :class:`MAEConfig` (or its fields as keyword arguments).
        fused: run the fused kernels and the default attention backend (True) or the official code path (False).
    """

    task = "mae"
    """The training task (``mimfast.train.tasks``) that knows how to train and evaluate this model."""

    def __init__(self, config: MAEConfig | None = None, *, fused: bool = True, **kwargs):
        super().__init__()
        if config is None:
            config = MAEConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = c = config
        self.fused = fused
        ln = lambda d: nn.LayerNorm(d, eps=c.layer_norm_eps)  # noqa: E731
        num_patches = c.num_patches

        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, c.embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=True, norm_layer=ln) for _ in range(c.depth)
        )
        self.norm = ln(c.embed_dim)

        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, c.decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio, qkv_bias=True, norm_layer=ln)
            for _ in range(c.decoder_depth)
        )
        self.decoder_norm = ln(c.decoder_embed_dim)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_size**2 * c.in_chans, bias=True)
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------------ weights
    def initialize_weights(self) -> None:
        """MAE's initialisation: fixed sin-cos positions, xavier patch embedding, N(0, 0.02) tokens, xavier Linear."""
        c = self.config
        if self.pos_embed.device.type == "meta":
            return
        with torch.no_grad():
            self.pos_embed.copy_(get_2d_sincos_pos_embed(c.embed_dim, c.grid_size, cls_token=True).unsqueeze(0))
            self.decoder_pos_embed.copy_(
                get_2d_sincos_pos_embed(c.decoder_embed_dim, c.grid_size, cls_token=True).unsqueeze(0)
            )
        init_patch_embed_weights(self.patch_embed)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if m is not self.patch_embed.proj:
                init_vit_weights(m)

    def load_official_state_dict(self, state_dict: dict, *, strict: bool = True) -> list[str]:
        """Load an official MAE checkpoint (its ``torch.load`` result, or that dict's ``["model"]``).

        The parameter names are the official ones (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
        ``blocks.N.attn.qkv``, ``mask_token``, ``decoder_embed``, ``decoder_blocks.N...``, ``decoder_pred``), so
        the key map is the identity after unwrapping ``{"model": ...}`` and a DDP ``module.`` prefix. The released
        fine-tuning checkpoints hold the encoder only: then the decoder keeps its initialisation, a warning says so,
        and the missing decoder keys are returned. Any other missing or unexpected key, or a shape mismatch, raises.
        """
        sd = state_dict.get("model", state_dict) if isinstance(state_dict, dict) else state_dict
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict: expected a dict of tensors (or {{'model': ...}}), got {type(sd).__name__}")
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        own = self.state_dict()
        unexpected = sorted(set(sd) - set(own))
        missing = sorted(set(own) - set(sd))
        decoder = ("decoder_", "mask_token")
        encoder_only = missing and all(k.startswith(decoder) for k in missing)
        if unexpected or (missing and (strict and not encoder_only)):
            raise KeyError(f"state_dict: unexpected keys {unexpected[:8]}, missing keys {missing[:8]}")
        for k, v in sd.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(
                    f"state_dict[{k!r}]: expected shape {tuple(own[k].shape)}, got {tuple(v.shape)} "
                    "(a different image size or architecture?)"
                )
        self.load_state_dict(sd, strict=False)
        if missing:
            warnings.warn(
                f"MAE checkpoint has no decoder ({len(missing)} keys, e.g. {missing[0]}); the decoder keeps its "
                "initialisation",
                stacklevel=2,
            )
        return missing

    # ------------------------------------------------------------------------------------------- pixel views
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), channel last inside a patch (MAE's layout)."""
        p, c = self.config.patch_size, self.config.in_chans
        b, _, hh, ww = imgs.shape
        h, w = hh // p, ww // p
        x = imgs.reshape(b, c, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        p, c = self.config.patch_size, self.config.in_chans
        h = w = int(math.isqrt(x.shape[1]))
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    # ------------------------------------------------------------------------------------------------ forward
    def _check_images(self, imgs: torch.Tensor) -> None:
        c = self.config
        want = (c.in_chans, c.img_size, c.img_size)
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4 or tuple(imgs.shape[1:]) != want:
            got = tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__
            raise ValueError(f"imgs: expected shape (B, {', '.join(map(str, want))}), got {got}")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs: expected a floating-point tensor (normalised pixels), got {imgs.dtype}")

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """imgs (B, C, H, W) -> (latent (B, 1 + Lk, D), mask (B, L), ids_restore (B, L))."""
        self._check_images(imgs)
        if not (isinstance(mask_ratio, (int, float)) and 0.0 <= mask_ratio < 1.0):
            raise ValueError(f"mask_ratio: expected a float in [0, 1), got {mask_ratio!r}")
        bsz, seq = imgs.shape[0], self.config.num_patches
        if noise is None:
            noise = torch.rand(bsz, seq, device=imgs.device)
        elif tuple(noise.shape) != (bsz, seq):
            raise ValueError(f"noise: expected shape ({bsz}, {seq}), got {tuple(noise.shape)}")
        x = self.patch_embed(imgs)
        if self.fused:
            m = random_masking(bsz, seq, mask_ratio, noise=noise, index_dtype=torch.int32)
            prefix = (self.cls_token + self.pos_embed[:, :1]).reshape(1, -1)
            x = gather_tokens(
                x, m.ids_keep, pos=self.pos_embed[0, 1:], prefix=prefix, ids_restore=m.ids_restore, validate=False
            )
            mask, ids_restore = m.mask, m.ids_restore
        else:
            x = x + self.pos_embed[:, 1:, :]
            x, mask, ids_restore = self._official_random_masking(x, mask_ratio, noise)
            cls_token = self.cls_token + self.pos_embed[:, :1, :]
            x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        with attention_backend(None if self.fused else "eager"):
            for blk in self.blocks:
                x = blk(x)
        return self.norm(x), mask, ids_restore

    @staticmethod
    def _official_random_masking(x, mask_ratio, noise):
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + Lk, D), ids_restore (B, L) -> pred (B, L, p*p*C)."""
        x = self.decoder_embed(latent)
        if self.fused:
            x = restore_tokens(
                x, ids_restore, self.mask_token.reshape(-1), pos=self.decoder_pos_embed[0], num_prefix=1,
                validate=False,
            )  # fmt: skip
        else:
            ids = ids_restore.long()
            mask_tokens = self.mask_token.repeat(x.shape[0], ids.shape[1] + 1 - x.shape[1], 1)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
            x_ = torch.gather(x_, dim=1, index=ids.unsqueeze(-1).repeat(1, 1, x.shape[2]))
            x = torch.cat([x[:, :1, :], x_], dim=1)
            x = x + self.decoder_pos_embed
        with attention_backend(None if self.fused else "eager"):
            for blk in self.decoder_blocks:
                x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE against the (normalised) pixels, averaged over removed patches (mask == 1)."""
        target = self.patchify(imgs)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """imgs (B, C, H, W) -> (loss, pred (B, L, p*p*C), mask (B, L) with 1 = removed)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # ------------------------------------------------------------------------------------------------ metrics
    def flops_per_image(self, mask_ratio: float = 0.75, *, training: bool = True) -> float:
        """Matmul FLOPs for one image (2 per multiply-add; backward = 2x forward when ``training``).

        Counts the patch embedding, every Linear, and the two attention matmuls of each block, at the token counts
        the model actually runs (1 + Lk encoder tokens, 1 + L decoder tokens). ViT-B/16 at 0.75: about 59 GFLOP.
        """
        c = self.config
        seq = c.num_patches
        n_enc, n_dec = 1 + int(seq * (1 - mask_ratio)), 1 + seq

        def blocks(n, d, depth):
            linear = 2 * n * d * d * (4 + 2 * c.mlp_ratio)  # qkv (3 d^2) + proj (d^2) + MLP (2 r d^2)
            attn = 2 * 2 * n * n * d  # q k^T and p v
            return depth * (linear + attn)

        fwd = 2 * seq * (c.patch_size**2 * c.in_chans) * c.embed_dim
        fwd += blocks(n_enc, c.embed_dim, c.depth)
        fwd += 2 * n_enc * c.embed_dim * c.decoder_embed_dim
        fwd += blocks(n_dec, c.decoder_embed_dim, c.decoder_depth)
        fwd += 2 * n_dec * c.decoder_embed_dim * c.patch_size**2 * c.in_chans
        return float(fwd * (3 if training else 1))


# ----------------------------------------------------------------------------------------------------- registry
@register_model
def mae_vit_base_patch16_dec512d8b(**kwargs) -> MaskedAutoencoderViT:
    """MAE ViT-B/16 (768-d, 12 blocks, 12 heads) with the 512-d, 8-block decoder."""
    cfg = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return MaskedAutoencoderViT(**{**cfg, **kwargs})


@register_model
def mae_vit_large_patch16_dec512d8b(**kwargs) -> MaskedAutoencoderViT:
    """MAE ViT-L/16 (1024-d, 24 blocks, 16 heads) with the 512-d, 8-block decoder."""
    cfg = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return MaskedAutoencoderViT(**{**cfg, **kwargs})


@register_model
def mae_vit_huge_patch14_dec512d8b(**kwargs) -> MaskedAutoencoderViT:
    """MAE ViT-H/14 (1280-d, 32 blocks, 16 heads) with the 512-d, 8-block decoder."""
    cfg = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)
    return MaskedAutoencoderViT(**{**cfg, **kwargs})


@register_model
def mae_vit_tiny_patch4_dec64d2b_debug(**kwargs) -> MaskedAutoencoderViT:
    """A tiny MAE for tests and CPU runs: 32 px images, 4 px patches (64 tokens), 96-d x 4 encoder, 64-d x 2
    decoder."""
    cfg = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, decoder_embed_dim=64, decoder_depth=2,
               decoder_num_heads=4)  # fmt: skip
    return MaskedAutoencoderViT(**{**cfg, **kwargs})

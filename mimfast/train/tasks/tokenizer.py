"""The tokenizer task: VQGAN-style training of a :class:`~mimfast.models.VQGAN` (any of its quantizers).

The objective is :class:`mimfast.losses.VQGANLoss` (L1, an optional perceptual / contrastive term, the quantizer's
loss, an optional PatchGAN with VQGAN's adaptive weight), kept in ``model.loss`` as taming-transformers does, so
the discriminator is checkpointed with the tokenizer and a resume is exact. Two optimizers: ``model`` (the tokenizer)
and ``disc`` (the discriminator); the loop backpropagates the sum of their losses once, which is correct because
each loss only reaches its own parameters (:meth:`VQGANLoss.generator_loss` uses detached discriminator weights).

Feature extractor of the perceptual / contrastive terms (``model.loss.perceptual``): ``"none"``; ``"self"``, the
tokenizer's own encoder levels with *detached* weights (no download, and what a contrastive loss between an image
and its reconstruction needs; our choice where Regularized VQ's paper names no network); or ``"pkg.module:factory"``,
a callable returning an ``nn.Module`` that maps images to feature maps (e.g. a VGG with weights you have locally).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...losses import VQGANLoss
from ..distributed import unwrap
from . import OptimizerSpec, Task, register_task

__all__ = ["TokenizerLoss", "TokenizerTask"]

_EXTRACTORS = ("none", "self")
_CONTRASTIVE = ("none", "patchnce", "pcl")


@dataclass
class TokenizerLoss:
    """``model.loss.*`` options of the tokenizer task (defaults: taming's ImageNet VQGAN recipe where it has one)."""

    rec_weight: float = 1.0
    """Weight of the pixel L1 term."""
    codebook_weight: float = 1.0
    """Weight of the quantizer's loss (commitment / codebook terms)."""
    perceptual: str = "none"
    """Feature extractor of the perceptual and contrastive terms: ``none``, ``self`` or ``pkg.module:factory``."""
    perceptual_weight: float = 1.0
    """Weight of the perceptual distance (0 disables it while keeping a contrastive term)."""
    contrastive: str = "none"
    """``none``, ``patchnce`` or ``pcl`` (Regularized VQ's probabilistic contrastive loss; needs the regularized
    quantizer's w_i) on the extractor's features."""
    contrastive_weight: float = 0.1
    """Weight of the contrastive term."""
    disc: bool = True
    """Train a PatchGAN discriminator (hinge loss) with VQGAN's adaptive weight."""
    disc_start: int = 0
    """Optimizer step from which the adversarial terms count (taming ImageNet: 250001)."""
    disc_weight: float = 0.8
    """Multiplier of the adaptive weight (taming ImageNet: 0.8)."""
    disc_ndf: int = 64
    """PatchGAN base width."""
    disc_layers: int = 3
    """PatchGAN stride-2 layers."""
    disc_norm: str = "group"
    """PatchGAN normalisation: ``group`` (the default here: correct under DDP), ``batch`` (taming's) or ``none``."""
    disc_lr_scale: float = 1.0
    """The discriminator's lr relative to the tokenizer's."""
    tau_start: float = 0.9
    """Gumbel temperature at step 0 (quantizers with a ``tau``; taming's Gumbel VQGAN: 0.9)."""
    tau_min: float = 1e-6
    """Temperature after ``tau_decay_steps`` (cosine decay from ``tau_start``; taming: 1e-6)."""
    tau_decay_steps: int = 1000001
    """Steps of the cosine temperature decay (taming: 1000001)."""

    def __post_init__(self):
        for name in ("rec_weight", "codebook_weight", "perceptual_weight", "contrastive_weight", "disc_weight",
                     "disc_lr_scale"):  # fmt: skip
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                raise ValueError(f"model.loss.{name}: expected a finite number >= 0, got {v!r}")
        if not isinstance(self.perceptual, str) or not (self.perceptual in _EXTRACTORS or ":" in self.perceptual):
            raise ValueError(f"model.loss.perceptual: expected none, self or pkg.module:factory, got "
                             f"{self.perceptual!r}")  # fmt: skip
        if self.contrastive not in _CONTRASTIVE:
            raise ValueError(f"model.loss.contrastive: expected one of {', '.join(_CONTRASTIVE)}, got "
                             f"{self.contrastive!r}")  # fmt: skip
        if self.contrastive != "none" and self.perceptual == "none":
            raise ValueError("model.loss.contrastive needs a feature extractor: set model.loss.perceptual=self (or "
                             "pkg.module:factory)")  # fmt: skip
        if not isinstance(self.disc, bool):
            raise ValueError(f"model.loss.disc: expected a bool, got {self.disc!r}")
        if not (isinstance(self.tau_start, (int, float)) and isinstance(self.tau_min, (int, float))
                and 0 < self.tau_min <= self.tau_start < math.inf):  # fmt: skip
            raise ValueError(f"model.loss.tau_start / tau_min: expected 0 < tau_min <= tau_start, finite, got "
                             f"{self.tau_start!r} / {self.tau_min!r}")  # fmt: skip
        for name, lo in (("disc_start", 0), ("disc_ndf", 1), ("disc_layers", 1), ("tau_decay_steps", 1)):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
                raise ValueError(f"model.loss.{name}: expected an int >= {lo}, got {v!r}")
        if self.disc_norm not in ("group", "batch", "none"):
            raise ValueError(f"model.loss.disc_norm: expected group, batch or none, got {self.disc_norm!r}")


class _DetachedEncoderFeatures(nn.Module):
    """The tokenizer encoder's level outputs, computed with detached weights: a perceptual / contrastive feature
    extractor that trains nothing (the encoder is held outside the module tree, so it is not registered twice)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self._encoder = [encoder]

    def forward(self, x):
        enc = self._encoder[0]
        params = {k: v.detach() for k, v in enc.named_parameters()}
        return torch.func.functional_call(enc, params, (x,), {"features": True})


def _import_extractor(spec: str) -> nn.Module:
    mod, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model.loss.perceptual={spec!r}: cannot import it ({e})") from None
    extractor = factory()
    if not isinstance(extractor, nn.Module):
        raise ValueError(f"model.loss.perceptual={spec!r}: the factory returned a {type(extractor).__name__}, "
                         "not an nn.Module")  # fmt: skip
    return extractor


@register_task
class TokenizerTask(Task):
    """VQGAN training: ``loss`` = the tokenizer's generator loss; metrics: ``rec_l1``, ``codebook`` (the quantizer's
    loss), the codebook's ``perplexity`` and ``used`` fraction (this step's batch), ``kl`` (Regularized VQ's usage
    prior), ``contrastive`` (PatchNCE / PCL), and with a discriminator ``disc`` (its loss), ``g_loss``,
    ``d_weight``."""

    name = "tokenizer"
    options = TokenizerLoss

    def prepare_model(self, model):
        o = self.opts
        if isinstance(getattr(model, "loss", None), VQGANLoss):
            return model
        if o.perceptual == "none":
            extractor = None
        elif o.perceptual == "self":
            extractor = _DetachedEncoderFeatures(model.encoder)
        else:
            extractor = _import_extractor(o.perceptual)
        model.loss = VQGANLoss(
            feature_extractor=extractor,
            rec_weight=o.rec_weight,
            perceptual_weight=o.perceptual_weight if extractor is not None else 0.0,
            contrastive=None if o.contrastive == "none" else o.contrastive,
            contrastive_weight=o.contrastive_weight,
            codebook_weight=o.codebook_weight,
            discriminator="patchgan" if o.disc else None,
            disc_in_channels=model.config.in_chans,
            disc_ndf=o.disc_ndf,
            disc_layers=o.disc_layers,
            disc_norm=o.disc_norm,
            disc_start=o.disc_start,
            disc_weight=o.disc_weight,
        )
        return model

    def optimizer_specs(self, model):
        wd = self.cfg.optim.weight_decay
        disc = {id(p) for p in model.loss.discriminator_parameters()}
        own = [p for p in model.parameters() if p.requires_grad and id(p) not in disc]
        specs = [OptimizerSpec("model", [{"params": own, "weight_decay": wd}])]
        if disc:
            groups = [{"params": model.loss.discriminator_parameters(), "weight_decay": wd}]
            specs.append(OptimizerSpec("disc", groups, lr_scale=self.opts.disc_lr_scale))
        return specs

    def flops_per_image(self, model):
        return model.flops_per_image()

    def tau_at(self, step: int) -> float:
        """The Gumbel temperature at optimizer step ``step``: cosine from ``tau_start`` to ``tau_min``."""
        o = self.opts
        t = min(1.0, step / o.tau_decay_steps)
        return o.tau_min + (o.tau_start - o.tau_min) * 0.5 * (1.0 + math.cos(math.pi * t))

    def losses(self, model, batch, device, step):
        inner = unwrap(model)
        imgs = batch.images.to(device, non_blocking=True)
        if hasattr(inner.quantize, "tau"):  # stochastic quantizers: the launcher owns the temperature schedule
            inner.quantize.tau = self.tau_at(step)
        rec, qloss, _, info = model(imgs, return_info=True)
        g, logs = inner.loss.generator_loss(imgs, rec, global_step=step, codebook_loss=qloss,
                                            last_layer=inner.decoder.last_layer,
                                            pcl_weights=info.get("pcl_weights"))  # fmt: skip
        losses = {"model": g}
        usage = inner.quantize.usage()
        metrics = {"rec_l1": logs["rec_l1"], "codebook": logs.get("codebook", qloss.detach()),
                   "perplexity": usage["perplexity"], "used": usage["used_fraction"]}  # fmt: skip
        if "kl" in info:
            metrics["kl"] = info["kl"]
        if "contrastive" in logs:
            metrics["contrastive"] = logs["contrastive"]
        if inner.loss.discriminator is not None:
            d, dlogs = inner.loss.discriminator_loss(imgs, rec, global_step=step)
            losses["disc"] = d
            metrics.update(g_loss=logs["g_loss"], d_weight=logs["d_weight"])
        return losses, metrics

    @torch.no_grad()
    def features(self, model, images):
        z = model.encode_latent(images)  # (B, D, h, w) before quantization; a tokenizer has no class token
        return {"mean": z.mean(dim=(2, 3))}

    @torch.no_grad()
    def reconstruction(self, model, images, *, generator, mask_ratio=None):
        if mask_ratio is not None:
            raise ValueError("mask_ratio: a tokenizer reconstructs whole images; do not pass --mask-ratio")
        rec = model.decode(model.encode(images))
        return ["original", "reconstruction"], [images.float(), rec.float()]

"""``VQGANLoss``: the VQGAN tokenizer objective (taming-transformers' ``VQLPIPSWithDiscriminator``, rewritten).

Generator side: ``rec_weight * L1 + perceptual_weight * P + contrastive_weight * C + codebook_weight * codebook_loss
+ d_weight * disc_factor * g_loss``; discriminator side: ``disc_factor * hinge(logits_real, logits_fake)``.

Differences from taming, all deliberate:

- The perceptual term runs on a user-supplied feature extractor (LPIPS/VGG weights cannot be downloaded everywhere):
  P = mean over layers of the mean squared difference of channel-normalised features (LPIPS without its learned
  linear layers, so each layer's channels weigh the same). ``None`` disables it.
- An optional contrastive term (PatchNCE or Regularized VQ's PCL, :mod:`mimfast.losses.contrastive`) on the same
  extractor's features.
- Both sides can be summed and backpropagated once: the generator loss runs the discriminator with detached
  parameters (``torch.func.functional_call``), so it sends no gradient into the discriminator, and the
  discriminator loss sees detached images, so it sends none into the generator.
- ``rec_weight`` is applied (taming stores ``pixelloss_weight`` but never uses it).
- Before ``disc_start`` the adaptive weight is not computed (it would be multiplied by 0): ``d_weight`` logs 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mimfast.layers.discriminator import NLayerDiscriminator

from .contrastive import (
    _NEGATIVES,
    _RESIZE_MODES,
    _WEIGHT_MODES,
    _upcast,
    patch_nce_loss,
    probabilistic_contrastive_loss,
)

__all__ = [
    "VQGANLoss",
    "adopt_weight",
    "hinge_d_loss",
    "perceptual_distance",
    "vanilla_d_loss",
]


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """taming's ``adopt_weight``: ``value`` while ``global_step < threshold``, ``weight`` from then on."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss: ``0.5 * (mean(relu(1 - logits_real)) + mean(relu(1 + logits_fake)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN discriminator loss: ``0.5 * (mean(softplus(-logits_real)) + mean(softplus(logits_fake)))``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


_D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
_CONTRASTIVE = ("patchnce", "pcl")


def _as_list(feats, name: str) -> list[torch.Tensor]:
    fs = [feats] if isinstance(feats, torch.Tensor) else feats
    if not isinstance(fs, Sequence) or len(fs) == 0 or not all(isinstance(f, torch.Tensor) for f in fs):
        raise TypeError(f"{name}: the feature extractor must return a tensor or a non-empty list of tensors")
    return list(fs)


def perceptual_distance(
    feats_x: torch.Tensor | Sequence[torch.Tensor], feats_y: torch.Tensor | Sequence[torch.Tensor], eps: float = 1e-10
) -> torch.Tensor:
    """LPIPS-style distance without learned linear layers: a scalar (fp32).

    Each layer's features (B, C, H, W) are divided by their l2 norm over C (+ ``eps``, as LPIPS); the distance is
    the mean over layers of the mean (over B, C, H, W) squared difference.
    """
    xs, ys = _as_list(feats_x, "feats_x"), _as_list(feats_y, "feats_y")
    if len(xs) != len(ys):
        raise ValueError(f"feats_x, feats_y: expected the same number of layers, got {len(xs)} and {len(ys)}")
    total = None
    for n, (fx, fy) in enumerate(zip(xs, ys, strict=True)):
        if fx.shape != fy.shape or fx.dim() < 2:
            raise ValueError(
                f"feats_x[{n}], feats_y[{n}]: expected equal shapes (B, C, ...), got {tuple(fx.shape)} and "
                f"{tuple(fy.shape)}"
            )
        fx, fy = _upcast(fx), _upcast(fy)
        fx = fx / (fx.norm(dim=1, keepdim=True) + eps)
        fy = fy / (fy.norm(dim=1, keepdim=True) + eps)
        d = (fx - fy).square().mean()
        total = d if total is None else total + d
    return total / len(xs)


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


class VQGANLoss(nn.Module):
    """VQGAN's tokenizer loss with an optional perceptual, contrastive and PatchGAN term.

    Args:
        feature_extractor: module mapping images (B, 3, H, W) to a feature map (B, C, h, w) or a list of them (one
            per layer), used by the perceptual and contrastive terms; it receives the images as given (do its input
            normalisation inside it). None disables both terms.
        freeze_extractor: set the extractor's parameters to ``requires_grad=False`` and keep it in eval mode (True).
        rec_weight: weight of the pixel L1 term (1.0).
        perceptual_weight: weight of :func:`perceptual_distance` on the extractor's features (1.0; taming's LPIPS
            default). Ignored without an extractor.
        contrastive: None (default), "patchnce" or "pcl": a contrastive term between the extractor's features of the
            reconstruction (queries) and of the input (keys, detached). "pcl" needs ``pcl_weights`` at each call.
        contrastive_weight: its weight (1.0; CUT's lambda_NCE; Regularized VQ publishes none).
        contrastive_tau, contrastive_num_patches: ``tau`` and ``num_patches`` of the contrastive loss (0.07, 256).
        pcl_floor, pcl_negatives, pcl_weight_mode, pcl_resize: see :func:`probabilistic_contrastive_loss`.
        codebook_weight: weight of the quantizer's loss passed to the call (1.0).
        discriminator: "patchgan" (default: :class:`~mimfast.layers.NLayerDiscriminator` built from ``disc_*``), any
            module mapping images to logits, or None (no adversarial term; ``discriminator_loss`` returns 0).
        disc_in_channels, disc_ndf, disc_layers, disc_norm: the PatchGAN's arguments (3, 64, 3, "batch"; under DDP
            convert BatchNorm to SyncBatchNorm or use "group", see :mod:`mimfast.layers.discriminator`).
        disc_loss: "hinge" (default) or "vanilla" for the discriminator. The generator's adversarial term is
            ``-mean(logits_fake)`` for both, as in taming.
        disc_start: the step from which the adversarial terms count (taming's ``discriminator_iter_start``): the
            discriminator factor is 0 while ``global_step < disc_start`` (0: from the start).
        disc_factor: the factor from then on (1.0).
        disc_weight: multiplies the adaptive weight (1.0; taming's ``discriminator_weight``), or is the whole
            weight when ``adaptive_weight=False``.
        adaptive_weight: VQGAN's ``lambda = ||grad_last L_rec|| / (||grad_last g_loss|| + 1e-4)``, clamped to
            [0, 1e4] and detached, where L_rec = ``rec_weight * L1 + perceptual_weight * P`` (taming's nll) and the
            gradients are taken w.r.t. ``last_layer`` (True).

    The discriminator's parameters are those of ``self.discriminator`` (:meth:`discriminator_parameters`); the
    frozen extractor's are not trainable. Give the discriminator its own optimizer.
    """

    def __init__(
        self,
        *,
        feature_extractor: nn.Module | None = None,
        freeze_extractor: bool = True,
        rec_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        contrastive: str | None = None,
        contrastive_weight: float = 1.0,
        contrastive_tau: float = 0.07,
        contrastive_num_patches: int | None = 256,
        pcl_floor: float = 0.1,
        pcl_negatives: str = "mean",
        pcl_weight_mode: str = "logit",
        pcl_resize: str = "area",
        codebook_weight: float = 1.0,
        discriminator: nn.Module | str | None = "patchgan",
        disc_in_channels: int = 3,
        disc_ndf: int = 64,
        disc_layers: int = 3,
        disc_norm: str = "batch",
        disc_loss: str = "hinge",
        disc_start: int = 0,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        adaptive_weight: bool = True,
    ):
        super().__init__()
        if feature_extractor is not None and not isinstance(feature_extractor, nn.Module):
            raise TypeError(f"feature_extractor: expected an nn.Module or None, got {type(feature_extractor).__name__}")
        self.rec_weight = _check_weight("rec_weight", rec_weight)
        self.perceptual_weight = _check_weight("perceptual_weight", perceptual_weight)
        self.contrastive_weight = _check_weight("contrastive_weight", contrastive_weight)
        self.codebook_weight = _check_weight("codebook_weight", codebook_weight)
        self.disc_factor = _check_weight("disc_factor", disc_factor)
        self.disc_weight = _check_weight("disc_weight", disc_weight)
        if contrastive is not None and contrastive not in _CONTRASTIVE:
            raise ValueError(f"contrastive: expected None or one of {_CONTRASTIVE}, got {contrastive!r}")
        if contrastive is not None and feature_extractor is None:
            raise ValueError(f"contrastive={contrastive!r} needs a feature_extractor (got None)")
        if _check_weight("contrastive_tau", contrastive_tau) <= 0:
            raise ValueError(f"contrastive_tau: expected a finite number > 0, got {contrastive_tau!r}")
        n = contrastive_num_patches
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
            raise ValueError(f"contrastive_num_patches: expected an int >= 2 or None, got {n!r}")
        for name, value, allowed in (
            ("pcl_negatives", pcl_negatives, _NEGATIVES),
            ("pcl_weight_mode", pcl_weight_mode, _WEIGHT_MODES),
            ("pcl_resize", pcl_resize, _RESIZE_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        if _check_weight("pcl_floor", pcl_floor) > 1:
            raise ValueError(f"pcl_floor: expected a number in [0, 1], got {pcl_floor!r}")
        if disc_loss not in _D_LOSSES:
            raise ValueError(f"disc_loss: expected one of {tuple(_D_LOSSES)}, got {disc_loss!r}")
        if isinstance(disc_start, bool) or not isinstance(disc_start, int) or disc_start < 0:
            raise ValueError(f"disc_start: expected an int >= 0, got {disc_start!r}")

        self.feature_extractor = feature_extractor
        self.freeze_extractor = bool(freeze_extractor)
        if feature_extractor is not None and self.freeze_extractor:
            feature_extractor.requires_grad_(False)
            feature_extractor.eval()
        self.contrastive = contrastive
        self.contrastive_tau = float(contrastive_tau)
        self.contrastive_num_patches = contrastive_num_patches
        self.pcl_options = dict(
            floor=float(pcl_floor), negatives=pcl_negatives, weight_mode=pcl_weight_mode, resize=pcl_resize
        )

        if isinstance(discriminator, str):
            if discriminator != "patchgan":
                raise ValueError(f"discriminator: expected 'patchgan', an nn.Module or None, got {discriminator!r}")
            discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_layers, norm=disc_norm)
        elif discriminator is not None and not isinstance(discriminator, nn.Module):
            got = type(discriminator).__name__
            raise TypeError(f"discriminator: expected 'patchgan', an nn.Module or None, got {got}")
        self.discriminator = discriminator
        self.disc_loss = disc_loss
        self.disc_start = disc_start
        self.adaptive_weight = bool(adaptive_weight)

    # ------------------------------------------------------------------------------------------------ helpers
    def train(self, mode: bool = True) -> VQGANLoss:
        super().train(mode)
        if self.feature_extractor is not None and self.freeze_extractor:
            self.feature_extractor.eval()
        return self

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """The parameters the discriminator's optimizer should update (empty without a discriminator)."""
        return [] if self.discriminator is None else list(self.discriminator.parameters())

    def discriminator_factor(self, global_step: int) -> float:
        """``disc_factor`` from ``disc_start`` on, 0 before (taming's ``adopt_weight``)."""
        return adopt_weight(self.disc_factor, global_step, threshold=self.disc_start)

    def _frozen_discriminator(self, x: torch.Tensor) -> torch.Tensor:
        """The discriminator's logits with detached parameters: gradients reach ``x`` only (buffers are shared, so
        BatchNorm running statistics update as in taming's generator pass)."""
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, params, (x,))

    def _features(self, x: torch.Tensor, name: str) -> list[torch.Tensor]:
        return _as_list(self.feature_extractor(x), f"feature_extractor({name})")

    def calculate_adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None
    ) -> torch.Tensor:
        """VQGAN's adaptive weight (detached scalar) times ``disc_weight``.

        0 when gradients are not available (grad mode off, or a loss that does not require grad, e.g. in
        evaluation), as taming's fallback. ``last_layer`` (the decoder's last weight) must be in both graphs.
        """
        if not self.adaptive_weight:
            return torch.tensor(self.disc_weight, device=nll_loss.device)
        if not (torch.is_grad_enabled() and nll_loss.requires_grad and g_loss.requires_grad):
            return torch.zeros((), device=nll_loss.device)
        if not isinstance(last_layer, torch.Tensor) or not last_layer.requires_grad:
            raise ValueError(
                "last_layer: expected the decoder's last weight (a tensor that requires grad) to compute the "
                f"adaptive weight, got {type(last_layer).__name__}; pass adaptive_weight=False for a fixed weight"
            )
        (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True, allow_unused=True)
        (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)
        if nll_grad is None or g_grad is None:
            raise ValueError(
                "last_layer: it is not used to compute the reconstruction loss and the adversarial loss; pass the "
                "weight of the layer that produces the reconstructions"
            )
        d_weight = _upcast(nll_grad).norm() / (_upcast(g_grad).norm() + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.disc_weight

    @staticmethod
    def _check_images(inputs: torch.Tensor, reconstructions: torch.Tensor) -> None:
        for name, t in (("inputs", inputs), ("reconstructions", reconstructions)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor (B, C, H, W), got {type(t).__name__}")
            if t.dim() != 4 or not t.is_floating_point() or t.numel() == 0:
                raise ValueError(
                    f"{name}: expected a non-empty floating image batch (B, C, H, W), got shape {tuple(t.shape)} "
                    f"and dtype {t.dtype}"
                )
        if inputs.shape != reconstructions.shape:
            raise ValueError(
                f"inputs, reconstructions: expected equal shapes, got {tuple(inputs.shape)} and "
                f"{tuple(reconstructions.shape)}"
            )

    @staticmethod
    def _check_step(global_step) -> None:
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step: expected an int >= 0, got {global_step!r}")

    # ------------------------------------------------------------------------------------------------ losses
    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        *,
        global_step: int,
        codebook_loss: torch.Tensor | None = None,
        last_layer: torch.Tensor | None = None,
        pcl_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss: a scalar whose gradients reach the generator only (never the discriminator).

        Args:
            inputs: images (B, C, H, W).
            reconstructions: the tokenizer's output, (B, C, H, W).
            global_step: optimizer steps done (for ``disc_start``).
            codebook_loss: the quantizer's loss (any shape, its mean is used); None counts as 0.
            last_layer: the decoder's last weight, for the adaptive weight (needed in training once the
                discriminator counts).
            pcl_weights: (B, h, w) w_i = ||z_sampled - z_best||^2 from the stochastic quantizer (``contrastive="pcl"``).
            generator: seeds the contrastive term's location sampling.

        Returns:
            (loss (), logs) with detached scalar logs: ``rec_l1``, ``nll``, ``perceptual``, ``contrastive``,
            ``codebook``, ``g_loss``, ``d_weight``, ``disc_factor``, ``loss``.
        """
        self._check_images(inputs, reconstructions)
        self._check_step(global_step)
        if self.contrastive == "pcl" and pcl_weights is None:
            raise ValueError("pcl_weights: contrastive='pcl' needs the (B, h, w) weights of the stochastic quantizer")
        device = reconstructions.device
        logs: dict[str, torch.Tensor] = {}
        rec_l1 = (_upcast(inputs) - _upcast(reconstructions)).abs().mean()
        nll = self.rec_weight * rec_l1
        logs["rec_l1"] = rec_l1

        if self.feature_extractor is not None and (self.perceptual_weight > 0 or self.contrastive is not None):
            feats_rec = self._features(reconstructions, "reconstructions")
            feats_in = self._features(inputs, "inputs")
            if self.perceptual_weight > 0:
                p = perceptual_distance(feats_in, feats_rec)
                nll = nll + self.perceptual_weight * p
                logs["perceptual"] = p
        logs["nll"] = nll
        loss = nll

        if self.contrastive is not None:
            keys = [f.detach() for f in feats_in]
            kw = dict(tau=self.contrastive_tau, num_patches=self.contrastive_num_patches, generator=generator)
            if self.contrastive == "pcl":
                c = probabilistic_contrastive_loss(feats_rec, keys, pcl_weights, **kw, **self.pcl_options)
            else:
                c = patch_nce_loss(feats_rec, keys, **kw)
            loss = loss + self.contrastive_weight * c
            logs["contrastive"] = c

        if codebook_loss is not None:
            if not isinstance(codebook_loss, torch.Tensor):
                raise TypeError(f"codebook_loss: expected a tensor or None, got {type(codebook_loss).__name__}")
            cb = _upcast(codebook_loss).mean()
            loss = loss + self.codebook_weight * cb
            logs["codebook"] = cb

        factor = self.discriminator_factor(global_step)
        logs["disc_factor"] = torch.tensor(factor, device=device)
        if self.discriminator is not None:
            if factor > 0:
                g_loss = -_upcast(self._frozen_discriminator(reconstructions)).mean()
                d_weight = self.calculate_adaptive_weight(nll, g_loss, last_layer)
                loss = loss + d_weight * factor * g_loss
            else:  # taming multiplies by 0: skip the adaptive weight (two backward passes), log the term
                with torch.no_grad():
                    g_loss = -_upcast(self._frozen_discriminator(reconstructions)).mean()
                d_weight = torch.zeros((), device=device)
            logs["g_loss"] = g_loss
            logs["d_weight"] = d_weight
        logs["loss"] = loss
        return loss, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, *, global_step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on detached images: its gradients reach the discriminator only.

        ``disc_factor * disc_loss(D(inputs), D(reconstructions))``; computed before ``disc_start`` too (times 0, so
        every discriminator parameter gets a zero gradient, as DDP expects). Without a discriminator: 0.

        Returns:
            (d_loss (), logs) with detached scalar logs ``d_loss``, ``logits_real``, ``logits_fake`` (means) and
            ``disc_factor``.
        """
        self._check_images(inputs, reconstructions)
        self._check_step(global_step)
        factor = self.discriminator_factor(global_step)
        device = reconstructions.device
        if self.discriminator is None:
            zero = torch.zeros((), device=device)
            return zero, {"d_loss": zero, "disc_factor": torch.tensor(factor, device=device)}
        logits_real = _upcast(self.discriminator(inputs.detach()))
        logits_fake = _upcast(self.discriminator(reconstructions.detach()))
        d_loss = factor * _D_LOSSES[self.disc_loss](logits_real, logits_fake)
        logs = {
            "d_loss": d_loss,
            "logits_real": logits_real.mean(),
            "logits_fake": logits_fake.mean(),
            "disc_factor": torch.tensor(factor, device=device),
        }
        return d_loss, {k: v.detach() for k, v in logs.items()}

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        *,
        global_step: int,
        codebook_loss: torch.Tensor | None = None,
        last_layer: torch.Tensor | None = None,
        pcl_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Both sides at once: ``(generator loss, discriminator loss, logs)``; their sum can be backpropagated once.

        Arguments as in :meth:`generator_loss`; the logs of both sides are merged.
        """
        g, g_logs = self.generator_loss(
            inputs,
            reconstructions,
            global_step=global_step,
            codebook_loss=codebook_loss,
            last_layer=last_layer,
            pcl_weights=pcl_weights,
            generator=generator,
        )
        d, d_logs = self.discriminator_loss(inputs, reconstructions, global_step=global_step)
        return g, d, {**g_logs, **d_logs}

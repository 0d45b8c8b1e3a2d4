"""Mixup and CutMix on the device, with label smoothing folded into the soft targets (timm's batch-mode ``Mixup``,
the augmentation of MAE / BEiT / CAE / MAGE fine-tuning).

Per batch (``mode="batch"``, the recipes' setting): with probability ``prob`` the batch is mixed, else only the
labels are smoothed. When both ``mixup_alpha`` and ``cutmix_alpha`` are > 0, CutMix is chosen with probability
``switch_prob``; the mixing weight is ``lam ~ Beta(alpha, alpha)`` of the chosen method. The batch is mixed with its
own reverse (``images.flip(0)``): Mixup blends ``lam * x + (1 - lam) * x.flip(0)``; CutMix pastes one box of the
reversed batch, of area ``(1 - lam)`` of the image with a uniformly drawn centre clipped to the image, and then
corrects ``lam`` to the area actually kept. Targets are ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))`` with
``smooth(y) = (1 - smoothing) * onehot(y) + smoothing / num_classes``, so each row sums to 1.

The random draws (``lam``, the method, the box) are a handful of host scalars per batch taken from a NumPy
generator: by default NumPy's global one, which the launcher seeds from ``train.seed`` and saves in every checkpoint,
so a run and its resume draw the same sequence. The pixels never leave the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Mixup", "MixupDraw", "smooth_one_hot", "soft_target_cross_entropy"]


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """labels (B,) int64 in [0, num_classes) -> (B, num_classes) float32 targets ``(1 - s) onehot + s / C``."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_c target_c log softmax(logits)_c``: logits (B, C), target (B, C) -> scalar (fp32)."""
    return torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _randint(rng, high: int) -> int:
    """Uniform int in [0, high) from a ``numpy.random.Generator`` or the legacy ``RandomState`` / module API."""
    return int(rng.integers(0, high)) if hasattr(rng, "integers") else int(rng.randint(0, high))


@dataclass
class MixupDraw:
    """What one call drew (for logging and tests)."""

    method: str
    """"mixup", "cutmix" or "none"."""
    lam: float
    """Weight of the un-flipped batch in the targets (after CutMix's area correction)."""
    box: tuple[int, int, int, int] | None
    """CutMix's pasted box ``(y0, y1, x0, x1)`` (rows ``y0:y1``, columns ``x0:x1``), else None."""


class Mixup:
    """Batch Mixup / CutMix with label smoothing (see the module docstring).

    Args:
        num_classes: C.
        mixup_alpha: Beta(alpha, alpha) of Mixup; 0 disables it.
        cutmix_alpha: Beta(alpha, alpha) of CutMix; 0 disables it.
        prob: probability that a batch is mixed at all.
        switch_prob: with both enabled, probability of CutMix instead of Mixup.
        smoothing: label smoothing folded into the targets.

    ``mix(images (B, C, H, W), labels (B,), rng=None) -> (images (B, C, H, W), targets (B, C) fp32, MixupDraw)``;
    ``images`` is mixed in place (it is the loader's fresh batch) and returned. ``rng``: a ``numpy.random.Generator``
    or ``RandomState``; None = NumPy's global generator.
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, smoothing: float = 0.1):  # fmt: skip
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
        for name, v in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: expected a finite float >= 0, got {v!r}")
        for name, v in (("prob", prob), ("switch_prob", switch_prob)):
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name}: expected a float in [0, 1], got {v!r}")
        if not (isinstance(smoothing, (int, float)) and 0.0 <= smoothing < 1.0):
            raise ValueError(f"smoothing: expected a float in [0, 1), got {smoothing!r}")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob, self.smoothing = float(prob), float(switch_prob), float(smoothing)

    @property
    def active(self) -> bool:
        """True when some batch may be mixed."""
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def draw(self, height: int, width: int, rng=None) -> MixupDraw:
        """The random choices of one batch (host scalars only; the same draws as :meth:`mix` makes)."""
        rng = np.random if rng is None else rng
        if not self.active or rng.random() >= self.prob:
            return MixupDraw("none", 1.0, None)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return MixupDraw("mixup", lam, None)
        cut = np.sqrt(1.0 - lam)  # the box's side ratio: area (1 - lam) before clipping
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = _randint(rng, height), _randint(rng, width)
        y0, y1 = int(np.clip(cy - ch // 2, 0, height)), int(np.clip(cy + ch // 2, 0, height))
        x0, x1 = int(np.clip(cx - cw // 2, 0, width)), int(np.clip(cx + cw // 2, 0, width))
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)  # the area actually kept
        return MixupDraw("cutmix", lam, (y0, y1, x0, x1))

    def targets(self, labels: torch.Tensor, lam: float) -> torch.Tensor:
        """(B,) labels -> (B, C) fp32 ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))``."""
        y = smooth_one_hot(labels, self.num_classes, self.smoothing)
        return y if lam == 1.0 else torch.lerp(y.flip(0), y, lam)

    def mix(self, images: torch.Tensor, labels: torch.Tensor, rng=None) -> tuple[torch.Tensor, torch.Tensor, MixupDraw]:
        if images.dim() != 4:
            raise ValueError(f"images: expected (B, C, H, W), got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels: expected ({images.shape[0]},), got shape {tuple(labels.shape)}")
        if images.shape[0] % 2:
            raise ValueError(f"images: Mixup / CutMix pair each sample with the reversed batch and need an even "
                             f"batch size, got {images.shape[0]}")  # fmt: skip
        d = self.draw(images.shape[2], images.shape[3], rng)
        if d.method == "mixup":
            flipped = images.flip(0)  # a copy, taken before the in-place blend
            images.mul_(d.lam).add_(flipped, alpha=1.0 - d.lam)
        elif d.method == "cutmix":
            y0, y1, x0, x1 = d.box
            images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
        return images, self.targets(labels, d.lam), d

"""``NLayerDiscriminator``: the PatchGAN discriminator of pix2pix, as taming-transformers' VQGAN uses it.

Layout (``n_layers=3``, ``ndf=64``): conv 4x4 stride 2 (3 -> 64), LeakyReLU(0.2); two blocks of conv 4x4 stride 2
(64 -> 128 -> 256) + norm + LeakyReLU(0.2); conv 4x4 stride 1 (256 -> 512) + norm + LeakyReLU(0.2); conv 4x4 stride 1
(512 -> 1). Every conv has padding 1; channels are ``ndf * min(2**n, 8)``. A 256 px image gives a 30x30 map of
logits, each judging a 70x70 receptive field. The modules sit in ``self.main`` (an ``nn.Sequential``) in the same
order as taming's, so a taming discriminator state dict (``main.0.weight`` ...) loads unchanged when ``norm="batch"``.

Normalisation: taming uses BatchNorm. Under DDP a plain BatchNorm normalises with each rank's own batch statistics
(and DDP broadcasts rank 0's running statistics), so convert it with ``nn.SyncBatchNorm.convert_sync_batchnorm`` for
rank-aggregated statistics, or pick ``norm="group"`` (GroupNorm, batch-independent, no synchronisation) or
``norm="none"``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["NLayerDiscriminator"]

_NORMS = ("batch", "group", "none")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming-transformers).

    Args:
        in_channels: image channels (3).
        ndf: channels of the first conv (64).
        n_layers: number of stride-2 convs (3).
        norm: "batch" (taming's choice; under DDP convert to SyncBatchNorm, see the module docstring), "group"
            (GroupNorm with gcd(32, channels) groups) or "none". Convs followed by a norm carry no bias.

    Shapes: ``forward(x (B, in_channels, H, W)) -> logits (B, 1, H', W')`` (30x30 for 256x256 with the defaults).
    Weights are initialised as in taming: conv weights N(0, 0.02), norm weights N(1, 0.02), biases 0.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, *, norm: str = "batch"):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("ndf", ndf), ("n_layers", n_layers)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm: expected one of {_NORMS}, got {norm!r}")
        self.norm = norm
        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=bias),
                _norm_layer(norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """taming's ``weights_init``: conv weights N(0, 0.02); BatchNorm/GroupNorm weights N(1, 0.02); biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D image batch (B, C, H, W), got shape {tuple(x.shape)}")
        return self.main(x)

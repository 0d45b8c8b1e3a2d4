"""The MAE task: masked-patch reconstruction loss, encoder features for the probe, reconstruction grids."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import Task, register_task

__all__ = ["MAETask"]


def _identity_noise(bsz: int, seq: int, device: torch.device) -> torch.Tensor:
    # with mask ratio 0 every token is kept; increasing noise keeps them in image order
    return torch.arange(seq, dtype=torch.float32, device=device).expand(bsz, seq)


@register_task
class MAETask(Task):
    """He et al. 2021: the model's own (norm-pix) MSE over the removed patches, at ``model.mask_ratio``."""

    name = "mae"

    def losses(self, model, batch, device, step):
        imgs = batch.images.to(device, non_blocking=True)
        loss, _, _ = model(imgs, self.cfg.model.mask_ratio)
        return {"model": loss}, {}

    def flops_per_image(self, model: nn.Module) -> float | None:
        return model.flops_per_image(self.cfg.model.mask_ratio)

    @torch.no_grad()
    def features(self, model, images):
        latent, _, _ = model.forward_encoder(
            images, 0.0, _identity_noise(images.shape[0], model.config.num_patches, images.device)
        )
        return {"cls": latent[:, 0], "mean": latent[:, 1:].mean(dim=1)}

    @torch.no_grad()
    def reconstruction(self, model, images, *, generator, mask_ratio=None):
        ratio = self.cfg.model.mask_ratio if mask_ratio is None else mask_ratio
        if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
            raise ValueError(f"mask_ratio: expected a float in [0, 1), got {ratio!r}")
        noise = torch.rand(images.shape[0], model.config.num_patches, generator=generator).to(images.device)
        _, pred, mask = model(images, ratio, noise=noise)
        if model.config.norm_pix_loss:  # predictions are normalised patches: map back with each target patch's stats
            target = model.patchify(images)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        p, c = model.config.patch_size, model.config.in_chans
        recon = model.unpatchify(pred.float())
        m = model.unpatchify(mask.unsqueeze(-1).repeat(1, 1, p * p * c).float())
        orig = images.float()
        d = self.cfg.data  # removed patches shown as mid grey (0.5 in pixel space)
        mean, std = (torch.tensor(v, device=orig.device).view(1, -1, 1, 1) for v in (d.mean, d.std))
        grey = ((0.5 - mean) / std).expand_as(orig)
        return (["original", "masked", "reconstruction", "reconstruction + visible"],
                [orig, orig * (1 - m) + grey * m, recon, orig * (1 - m) + recon * m])  # fmt: skip

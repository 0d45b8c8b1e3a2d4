"""BEiT and CAE: predict a frozen tokenizer's visual-token ids at block-masked positions.

Both tasks read the same batch: the main view (224 px for ViT-B/16) and the loader's second view of the same crop and
flip at ``data.tokenizer_size`` (112 px, Lanczos, as BEiT), which a frozen tokenizer turns into the target ids
(B, G, G). The mask is drawn on the device by the block-masking kernel with the model config's settings: BEiT's
(``exact=False``: stops early, may under-fill) for ``beit``, CAE's exact count for ``cae``. The model computes its
loss (BEiT: CE over masked positions; CAE: CE + ``align_weight`` x MSE) through the fused linear + cross-entropy op.

The tokenizer is ``model.loss.tokenizer``:

* a ``mimfast pretrain`` tokenizer run (a run directory or a ``ckpt_*.pt`` file; mimfast's own tokenizers,
  ``mimfast pretrain --config regvq_debug`` for the debug presets); its images are renormalised from this run's
  ``data.mean / std`` to the tokenizer run's, so the two may differ;
* ``mage_vqgan:<path>``: MAGE's released VQGAN checkpoint (:func:`mimfast.models.mage_vqgan.load_mage_vqgan`, its
  input range adapted to this run's ``data.mean / std``);
* or ``pkg.module:factory``, a callable returning a module with ``encode(images (B, 3, t, t)) -> ids (B, G, G) or
  (B, G * G)`` on this run's normalised images, and a ``codebook_size`` (or ``vocab_size``) attribute (e.g. a wrapper
  of DALL-E's tokenizer with weights you have locally; nothing is downloaded).

The tokenizer is not part of the trained model or its checkpoints: it is loaded again on resume from the same key.
It runs in fp32 (autocast off), in eval mode, without gradients, on the training device.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...ops.masking import block_masking
from ..distributed import unwrap
from . import Task, register_task

__all__ = ["BEiTTask", "CAETask", "TokenTargets", "check_token_grid", "load_tokenizer", "tokenizer_ids", "vocab_size"]


@dataclass
class TokenTargets:
    """``model.loss.*`` options of the BEiT / CAE tasks."""

    tokenizer: str = ""
    """The frozen tokenizer giving the target ids: a mimfast tokenizer run directory / ``ckpt_*.pt`` file, or
    ``pkg.module:factory``. Its vocabulary must equal the model's ``vocab_size`` and its token grid the model's patch
    grid."""

    def __post_init__(self):
        if not isinstance(self.tokenizer, str):
            raise ValueError(f"model.loss.tokenizer: expected a path or pkg.module:factory, got {self.tokenizer!r}")


class _Renormalize(nn.Module):
    """A mimfast tokenizer behind a change of normalisation (the run's mean/std <-> the tokenizer run's), both ways."""

    def __init__(self, tokenizer: nn.Module, run_mean, run_std, tok_mean, tok_std):
        super().__init__()
        self.tokenizer = tokenizer
        v = lambda t: torch.tensor(t, dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
        # x_tok = (x * run_std + run_mean - tok_mean) / tok_std = x * a + b
        self.register_buffer("a", v(run_std) / v(tok_std))
        self.register_buffer("b", (v(run_mean) - v(tok_mean)) / v(tok_std))
        self.codebook_size = tokenizer.config.codebook_size
        self.grid_size = tokenizer.config.grid_size
        self.img_size = tokenizer.config.img_size

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids (B, G, G) of images (B, 3, t, t) in the run's normalised space."""
        return self.tokenizer.encode(images * self.a + self.b)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, t, t) in the run's normalised space from token ids (B, G, G)."""
        return (self.tokenizer.decode(ids).float() - self.b) / self.a


def load_tokenizer(spec: str, data_cfg) -> nn.Module:
    """The frozen tokenizer of ``model.loss.tokenizer`` (see the module docstring), in eval mode on the CPU.

    Raises ValueError naming ``model.loss.tokenizer`` when it is unset, missing, unreadable or not a tokenizer.
    """
    key = "model.loss.tokenizer"
    hint = ("train one with `mimfast pretrain --config regvq_debug` (debug presets) or point it at a tokenizer run "
            "directory / ckpt_*.pt file, or at pkg.module:factory")  # fmt: skip
    if not spec:
        raise ValueError(f"{key} is not set: the token targets need a tokenizer; {hint}")
    if spec.startswith("mage_vqgan:"):
        from ...models.mage_vqgan import load_mage_vqgan

        path = spec.partition(":")[2]
        if not os.path.isfile(path):
            raise ValueError(f"{key}={spec!r}: no such checkpoint file {path!r} (MAGE's released VQGAN, e.g. "
                             "vqgan_jax_strongaug.ckpt; nothing is downloaded)")  # fmt: skip
        try:
            return load_mage_vqgan(path, input_mean=data_cfg.mean, input_std=data_cfg.std)
        except (KeyError, ValueError, RuntimeError, OSError) as e:
            raise ValueError(f"{key}={spec!r}: cannot load it as MAGE's VQGAN ({e})") from None
    if ":" in spec and not os.path.exists(spec):
        mod, _, attr = spec.partition(":")
        try:
            tok = getattr(importlib.import_module(mod), attr)()
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{key}={spec!r}: cannot import it ({e})") from None
        if not callable(getattr(tok, "encode", None)):
            raise ValueError(f"{key}={spec!r}: the factory returned a {type(tok).__name__} without encode(images)")
        if getattr(tok, "codebook_size", None) is None and getattr(tok, "vocab_size", None) is None:
            raise ValueError(f"{key}={spec!r}: the tokenizer has no codebook_size / vocab_size attribute")
        return tok.eval() if isinstance(tok, nn.Module) else tok
    if not os.path.exists(spec):
        raise ValueError(f"{key}: no tokenizer checkpoint at {spec!r}; {hint}")
    from ..checkpoint import CheckpointError
    from ..evaluate import load_pretrained

    try:
        model, tcfg, _ = load_pretrained(spec)
    except (CheckpointError, ValueError, TypeError) as e:
        raise ValueError(f"{key}={spec!r}: cannot load it as a mimfast tokenizer run ({e})") from None
    if getattr(model, "task", None) != "tokenizer" or not hasattr(model, "encode"):
        raise ValueError(f"{key}={spec!r}: that run trained {tcfg.model.name} (task {getattr(model, 'task', None)!r}), "
                         "not a tokenizer")  # fmt: skip
    if hasattr(model, "loss"):  # the training loss (discriminator...) is not needed to encode
        del model.loss
    for p in model.parameters():
        p.requires_grad_(False)
    d = tcfg.data
    return _Renormalize(model, data_cfg.mean, data_cfg.std, d.mean, d.std).eval()


def vocab_size(tok) -> int:
    """The number of codes of a tokenizer (its ``codebook_size``, else ``vocab_size``)."""
    v = getattr(tok, "codebook_size", None)
    return int(v if v is not None else tok.vocab_size)


def check_token_grid(tok, grid: int, model_name: str, spec: str) -> None:
    """Raise ValueError when the tokenizer's token grid (if it states one) is not the model's ``grid x grid``."""
    tok_grid = getattr(tok, "grid_size", None)
    if tok_grid is not None and tok_grid != grid:
        raise ValueError(f"{spec} gives {tok_grid}x{tok_grid} tokens but {model_name} has a {grid}x{grid} patch grid")


@torch.no_grad()
def tokenizer_ids(tok, images: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Token ids (B, L) int64 of images (B, 3, t, t), computed in fp32 without autocast on the images' device (the
    tokenizer module is moved there on first use)."""
    if isinstance(tok, nn.Module):
        p = next(iter(tok.parameters()), None)
        p = next(iter(tok.buffers()), None) if p is None else p
        if p is not None and p.device != images.device:
            tok.to(images.device)
    with torch.autocast(images.device.type, enabled=False):
        ids = tok.encode(images.float())
    ids = ids.reshape(ids.shape[0], -1).long()
    if ids.shape[1] != num_tokens:
        raise ValueError(f"model.loss.tokenizer: encode gave {ids.shape[1]} tokens per image, the model has "
                         f"{num_tokens} patches")  # fmt: skip
    return ids


class _TokenPredictionTask(Task):
    """Shared by BEiT and CAE: the tokenizer, the targets, the mask, the probe features."""

    options = TokenTargets
    exact: bool = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tokenizer = None

    def check_model(self, model):
        from ..config import ConfigError

        super().check_model(model)
        c, d = model.config, self.cfg.data
        try:
            tok = load_tokenizer(self.opts.tokenizer, d)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        spec = f"model.loss.tokenizer={self.opts.tokenizer!r}"
        if vocab_size(tok) != c.vocab_size:
            raise ConfigError(f"{spec} has {vocab_size(tok)} codes but {self.cfg.model.name} predicts vocab_size="
                              f"{c.vocab_size}: use a tokenizer with {c.vocab_size} codes or set "
                              f"model.overrides.vocab_size={vocab_size(tok)}")  # fmt: skip
        try:
            check_token_grid(tok, c.img_size // c.patch_size, self.cfg.model.name, spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        tok_img = getattr(tok, "img_size", None)
        if d.tokenizer_size is None or (tok_img is not None and d.tokenizer_size != tok_img):
            raise ConfigError(f"data.tokenizer_size={d.tokenizer_size} but {spec} takes {tok_img} px images; set "
                              f"data.tokenizer_size={tok_img}")  # fmt: skip
        self.tokenizer = tok

    def flops_per_image(self, model):
        return model.flops_per_image()

    def targets(self, small: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Token ids (B, L) int64 of the tokenizer view (B, 3, t, t), computed in fp32 without autocast."""
        return tokenizer_ids(self.tokenizer, small, num_tokens)

    def mask(self, model_cfg, bsz: int, device) -> torch.Tensor:
        """(B, L) bool block-wise mask with the model config's settings (BEiT: may under-fill; CAE: exact)."""
        c = model_cfg
        g = c.img_size // c.patch_size
        return block_masking(bsz, g, g, c.num_mask_patches, min_num_patches=c.min_mask_patches,
                             max_num_patches=getattr(c, "max_mask_patches", None), min_aspect=c.min_aspect,
                             exact=self.exact, device=device)  # fmt: skip

    def losses(self, model, batch, device, step):
        inner = unwrap(model)
        if batch.images_small is None:
            raise ValueError("the batch has no tokenizer view: set data.tokenizer_size")
        imgs = batch.images.to(device, non_blocking=True)
        small = batch.images_small.to(device, non_blocking=True)
        c = inner.config
        target = self.targets(small, (c.img_size // c.patch_size) ** 2)
        if hasattr(inner, "sample_masks"):  # the model's own generator (CAE: block or random, exact count)
            mask = inner.sample_masks(imgs.shape[0], device=device)
        else:
            mask = self.mask(inner.config, imgs.shape[0], device)
        loss, metrics = model(imgs, mask, target)
        return {"model": loss}, metrics

    @torch.no_grad()
    def features(self, model, images):
        x = model.forward_features(images)
        return {"cls": x[:, 0], "mean": x[:, 1:].mean(dim=1)}


@register_task
class BEiTTask(_TokenPredictionTask):
    """Bao et al. 2022: all patches in, [M] embeddings at BEiT block-masked positions (may under-fill), CE on the
    tokenizer's ids there."""

    name = "beit"
    exact = False


@register_task
class CAETask(_TokenPredictionTask):
    """Chen et al. 2024: visible patches in, exact-count block mask, regressor + decoder, CE + 2 x alignment MSE."""

    name = "cae"
    exact = True

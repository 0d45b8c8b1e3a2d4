"""The MAGE task: masked generative encoding of a frozen tokenizer's token ids (Li et al. 2023), and MAGE-C.

Each batch's main view goes through the frozen tokenizer of ``model.loss.tokenizer`` (fp32, no gradients; the same
forms as BEiT / CAE: a mimfast tokenizer run or ``pkg.module:factory``, plus ``mage_vqgan:<path>`` for MAGE's
released VQGAN checkpoint) into ids (B, G * G); the model draws its one-per-batch mask ratio, drops / masks, and
returns the label-smoothed CE over the masked positions. With MAGE-C (``model.overrides.contrastive=true``) the second
view is the horizontally flipped image, tokenized the same way and masked independently: our choice, the paper
describes two augmented views without code.

The tokenizer is attached to the model as a plain attribute (not a submodule, so it is never in a checkpoint) by
:meth:`MAGETask.prepare_model`, which is also what ``mimfast probe`` / ``generate`` call when they rebuild a run: the
probe's features are the encoder's on the unmasked token ids of each image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..distributed import unwrap
from . import Task, register_task
from .token_prediction import check_token_grid, load_tokenizer, tokenizer_ids, vocab_size

__all__ = ["MAGELoss", "MAGETask", "attached_tokenizer"]


@dataclass
class MAGELoss:
    """``model.loss.*`` options of the MAGE task."""

    tokenizer: str = ""
    """The frozen tokenizer: a mimfast tokenizer run directory / ``ckpt_*.pt``, ``pkg.module:factory`` or
    ``mage_vqgan:<path>`` (MAGE's released VQGAN). Its vocabulary must equal the model's ``codebook_size`` and its
    token grid the model's."""
    class_conditional: bool = False
    """Feed the true class of each image as the class token (a class-conditional generator, ``mimfast generate
    --class-id``); MAGE's default trains unconditionally with the fake class token."""

    def __post_init__(self):
        if not isinstance(self.tokenizer, str):
            raise ValueError(f"model.loss.tokenizer: expected a path or pkg.module:factory, got {self.tokenizer!r}")
        if not isinstance(self.class_conditional, bool):
            raise ValueError(f"model.loss.class_conditional: expected a bool, got {self.class_conditional!r}")


def attached_tokenizer(model: nn.Module):
    """The frozen tokenizer :meth:`MAGETask.prepare_model` attached to ``model`` (or None)."""
    ref = getattr(unwrap(model), "_mimfast_tokenizer", None)
    return ref[0] if ref else None


@register_task
class MAGETask(Task):
    """MAGE: token ids of the main view in, label-smoothed CE on the masked ones (+ MAGE-C's InfoNCE)."""

    name = "mage"
    options = MAGELoss

    def prepare_model(self, model):
        from ..config import ConfigError

        if attached_tokenizer(model) is not None:
            return model
        try:
            tok = load_tokenizer(self.opts.tokenizer, self.cfg.data)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model._mimfast_tokenizer = (tok,)  # a tuple: a plain attribute, never a registered submodule
        return model

    def check_model(self, model):
        from ..config import ConfigError

        super().check_model(model)
        c, tok = model.config, attached_tokenizer(model)
        spec = f"model.loss.tokenizer={self.opts.tokenizer!r}"
        if vocab_size(tok) != c.codebook_size:
            raise ConfigError(f"{spec} has {vocab_size(tok)} codes but {self.cfg.model.name} has codebook_size="
                              f"{c.codebook_size}: use a tokenizer with {c.codebook_size} codes or set "
                              f"model.overrides.codebook_size={vocab_size(tok)}")  # fmt: skip
        try:
            check_token_grid(tok, model.grid_size, self.cfg.model.name, spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        tok_img = getattr(tok, "img_size", None)
        if tok_img is not None and tok_img != self.cfg.data.img_size:
            raise ConfigError(f"data.img_size={self.cfg.data.img_size} but {spec} takes {tok_img} px images (MAGE "
                              f"tokenizes the main view); set data.img_size={tok_img}")  # fmt: skip
        if self.opts.class_conditional and c.num_classes < 1:
            raise ConfigError("model.loss.class_conditional=true needs a model with num_classes >= 1")

    def flops_per_image(self, model):
        return model.flops_per_image()

    def losses(self, model, batch, device, step):
        inner = unwrap(model)
        tok = attached_tokenizer(inner)
        imgs = batch.images.to(device, non_blocking=True)
        ids = tokenizer_ids(tok, imgs, inner.grid_size**2)
        kwargs = {}
        if self.opts.class_conditional:
            labels = batch.labels.to(device, non_blocking=True)
            kwargs["class_ids"] = labels
        if inner.config.contrastive:
            kwargs["token_ids_view2"] = tokenizer_ids(tok, imgs.flip(-1), inner.grid_size**2)
        loss, metrics = model(ids, **kwargs)
        return {"model": loss}, metrics

    @torch.no_grad()
    def features(self, model, images):
        tok = attached_tokenizer(model)
        if tok is None:
            raise ValueError("the mage task needs the run's tokenizer for features: rebuild the model with "
                             "mimfast.train.load_pretrained (it attaches it)")  # fmt: skip
        x = model.forward_features(tokenizer_ids(tok, images, model.grid_size**2))
        return {"cls": x[:, 0], "mean": x[:, 1:].mean(dim=1)}

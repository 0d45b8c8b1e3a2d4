"""The fine-tuning task: a ViT classifier (:class:`mimfast.models.vit_classifier.ViTClassifier`) trained end to end
from a pretrained MAE / BEiT / CAE / MAGE encoder, with the recipes' tools: layer-wise lr decay, Mixup + CutMix with
label smoothing on the device, drop path (in the model), optional EMA of the weights, and an evaluation of val top-1 /
top-5 every ``eval_every`` epochs through the launcher (the best checkpoint is kept as ``out_dir/best.pt``).

``model.loss.pretrained`` names the weights a fresh run starts from (:meth:`FinetuneTask.initialize`; a resumed run
takes its own checkpoint instead): a mimfast pretraining run directory or ``ckpt_*.pt`` of any ViT family (its
encoder is converted; the decoder and heads are dropped), a mimfast fine-tuning run or ``best.pt`` (loaded as is), or
an official checkpoint (``.pth``, fine-tuned or pretrained) through the classifier's key map. Unset = random init,
the baseline a pretrained encoder must beat.

MAGE's classifier reads token ids: the images (after Mixup / CutMix, as MAGE's fine-tuning mixes pixels) go through
the frozen tokenizer of ``model.loss.tokenizer``, attached to the model like the MAGE task's.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import unwrap
from ..mixup import Mixup, soft_target_cross_entropy
from . import OptimizerSpec, Task, register_task
from .mage import attached_tokenizer
from .token_prediction import load_tokenizer, tokenizer_ids, vocab_size

__all__ = ["FinetuneOptions", "FinetuneTask", "load_into_classifier"]


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class FinetuneOptions:
    """``model.loss.*`` options of the fine-tuning task."""

    pretrained: str = ""
    """Weights of a fresh run: a mimfast pretraining (or fine-tuning) run directory / checkpoint, or an official
    ``.pth``; empty = random init. Resumed runs ignore it (their checkpoint holds the weights)."""
    layer_decay: float = 0.75
    """Layer-wise lr decay: block i's lr is ``lr * layer_decay ** (depth + 1 - (i + 1))``, the embeddings'
    ``layer_decay ** (depth + 1)``, the head's ``lr`` (MAE: 0.65 for ViT-B, 0.75 for ViT-L / H). 1 = none."""
    smoothing: float = 0.1
    """Label smoothing of the (mixed) targets."""
    mixup: float = 0.0
    """Mixup Beta(alpha, alpha); 0 = off (the recipes: 0.8)."""
    cutmix: float = 0.0
    """CutMix Beta(alpha, alpha); 0 = off (the recipes: 1.0)."""
    mixup_prob: float = 1.0
    """Probability that a batch is mixed."""
    mixup_switch_prob: float = 0.5
    """With both on: probability of CutMix rather than Mixup for a batch."""
    ema: float = 0.0
    """Decay of an exponential moving average of the weights, updated after every optimizer step and evaluated next
    to the model (e.g. 0.9999); 0 = off. Saved in the checkpoints; DDP / single process only."""
    eval_every: int = 1
    """Evaluate val top-1 / top-5 every this many epochs (and after the last step)."""
    tokenizer: str = ""
    """MAGE classifiers only: the frozen tokenizer (as the MAGE task's ``model.loss.tokenizer``)."""

    def __post_init__(self):
        for name in ("pretrained", "tokenizer"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"model.loss.{name}: expected a path string, got {getattr(self, name)!r}")
        if not (_num(self.layer_decay) and 0 < self.layer_decay <= 1):
            raise ValueError(f"model.loss.layer_decay: expected a float in (0, 1], got {self.layer_decay!r}")
        if not (_num(self.smoothing) and 0 <= self.smoothing < 1):
            raise ValueError(f"model.loss.smoothing: expected a float in [0, 1), got {self.smoothing!r}")
        for name in ("mixup", "cutmix"):
            if not (_num(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"model.loss.{name}: expected a float >= 0 (0 = off), got {getattr(self, name)!r}")
        for name in ("mixup_prob", "mixup_switch_prob"):
            if not (_num(getattr(self, name)) and 0 <= getattr(self, name) <= 1):
                raise ValueError(f"model.loss.{name}: expected a float in [0, 1], got {getattr(self, name)!r}")
        if not (_num(self.ema) and 0 <= self.ema < 1):
            raise ValueError(f"model.loss.ema: expected a decay in [0, 1) (0 = off), got {self.ema!r}")
        if not (isinstance(self.eval_every, int) and not isinstance(self.eval_every, bool) and self.eval_every >= 1):
            raise ValueError(f"model.loss.eval_every: expected an int >= 1 (epochs), got {self.eval_every!r}")


# --------------------------------------------------------------------------------------------- weights in
def _is_classifier(model) -> bool:
    return getattr(model, "task", None) == "finetune"


def load_into_classifier(classifier: nn.Module, source: str, *, require_head: bool = False) -> str:
    """Initialise ``classifier`` from ``source`` (see the module docstring); returns a one-line description.

    Raises ValueError (a user error: one line naming ``model.loss.pretrained``) when the file is missing, is not a
    ViT encoder (a tokenizer run), or its architecture does not fit the classifier. ``require_head`` (evaluation):
    the weights must include a head of the classifier's class count (an official checkpoint's head of another class
    count is otherwise dropped, as MAE's fine-tuning does).
    """
    from ..checkpoint import CheckpointError, load_checkpoint
    from ..evaluate import load_pretrained

    key = f"model.loss.pretrained={source!r}"
    p = Path(source)
    if not p.exists():
        raise ValueError(f"{key}: no such checkpoint file or run directory")
    try:
        load_checkpoint(p)
        is_mimfast = True
    except CheckpointError as e:
        if p.is_dir():
            raise ValueError(f"{key}: {e}") from None
        is_mimfast = False
    if is_mimfast:
        try:
            model, pcfg, step = load_pretrained(p)
        except (CheckpointError, ValueError, TypeError) as e:
            raise ValueError(f"{key}: {e}") from None
        what = f"{pcfg.model.name} ({pcfg.preset or 'custom'}, step {step})"
        if require_head and not _is_classifier(model):
            raise ValueError(f"{key}: {what} is a pretraining run, it has no classification head to evaluate; "
                             "fine-tune it first (mimfast finetune --checkpoint ...)")  # fmt: skip
        if _is_classifier(model):
            try:
                classifier.load_state_dict(model.state_dict())
            except RuntimeError as e:
                raise ValueError(f"{key}: the fine-tuned {what} does not fit this classifier ({str(e).splitlines()[0]}"
                                 "...); use the same model.name / model.overrides") from None  # fmt: skip
            return f"fine-tuned weights of {what}"
        try:
            report = classifier.load_pretrained_encoder(model)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        dropped = f"; not used: {', '.join(report)}" if report else ""
        return f"encoder of {what}{dropped}"
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{key}: neither a mimfast checkpoint nor a loadable state dict ({type(e).__name__}: "
                         f"{e})") from None  # fmt: skip
    from ...models.vit_classifier import unwrap_state_dict

    inner = unwrap_state_dict(sd)
    items = inner.items() if isinstance(inner, dict) else ()
    head = next((v for k, v in items if k.endswith("head.weight") and hasattr(v, "shape")), None)
    n = classifier.config.num_classes
    if require_head and (head is None or head.shape[0] != n):
        got = "no head" if head is None else f"a head.weight of shape {tuple(head.shape)} ({head.shape[0]} classes)"
        raise ValueError(f"{key}: the official checkpoint has {got}, the classifier has num_classes={n}; evaluate it "
                         f"on a dataset of its classes with model.overrides.num_classes=...")  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the missing / dropped keys are reported in the returned line
            dropped = classifier.load_official_state_dict(sd, strict=False)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{key}: as an official checkpoint: {e}") from None
    return f"official checkpoint {p.name}" + (f"; not used: {', '.join(dropped[:6])}" if dropped else "")


# --------------------------------------------------------------------------------------------- the task
@register_task
class FinetuneTask(Task):
    """End-to-end fine-tuning of a ViT classifier: soft-target cross-entropy on Mixup / CutMix batches."""

    name = "finetune"
    options = FinetuneOptions
    best_metric = "top1"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ema: nn.Module | None = None
        o = self.opts
        self.mixup = None
        if o is not None and cfg is not None:
            self._mixup_args = dict(mixup_alpha=o.mixup, cutmix_alpha=o.cutmix, prob=o.mixup_prob,
                                    switch_prob=o.mixup_switch_prob, smoothing=o.smoothing)  # fmt: skip

    # ------------------------------------------------------------------------------------------ building
    def _tokens(self, model) -> bool:
        return getattr(unwrap(model).config, "input", "pixels") == "tokens"

    def prepare_model(self, model):
        from ..config import ConfigError

        if self._tokens(model) and attached_tokenizer(model) is None and self.cfg is not None:
            try:
                tok = load_tokenizer(self.opts.tokenizer, self.cfg.data)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            model._mimfast_tokenizer = (tok,)
        return model

    def check_model(self, model):
        from ..config import ConfigError

        super().check_model(model)
        c = model.config
        if self._tokens(model):
            tok = attached_tokenizer(model)
            n = vocab_size(tok)
            if c.fake_class_id < n:
                raise ConfigError(f"model.loss.tokenizer={self.opts.tokenizer!r} has {n} codes but the classifier's "
                                  f"token vocabulary starts its special ids at {c.fake_class_id}: set "
                                  "model.overrides.vocab_size / fake_class_id as the MAGE encoder had "
                                  "them")  # fmt: skip
        elif self.opts.tokenizer:
            raise ConfigError(f"model.loss.tokenizer={self.opts.tokenizer!r}: only token-input (MAGE) classifiers "
                              "use a tokenizer; unset it")  # fmt: skip
        if self.opts.ema and self.cfg.train.dist == "fsdp2":
            raise ConfigError("model.loss.ema: the weight EMA is not supported with train.dist=fsdp2 (sharded "
                              "parameters); use train.dist=ddp or model.loss.ema=0")  # fmt: skip
        self.mixup = Mixup(c.num_classes, **self._mixup_args)
        if self.mixup.active and self.cfg.train.batch_size % 2:
            raise ConfigError(f"train.batch_size={self.cfg.train.batch_size}: Mixup / CutMix pair each image with the "
                              "reversed batch and need an even per-rank batch")  # fmt: skip

    def check_data(self, model, loader) -> None:
        from ..config import ConfigError

        n, c = loader.num_classes, unwrap(model).config.num_classes
        if n != c:
            raise ConfigError(f"the dataset data.root={self.cfg.data.root!r} has {n} classes but the classifier has "
                              f"num_classes={c}: set model.overrides.num_classes={n}")  # fmt: skip

    def initialize(self, model, log=print, *, require_head: bool = False) -> None:
        if not self.opts.pretrained:
            log("  weights: random init (model.loss.pretrained is unset)")
            return
        what = load_into_classifier(model, self.opts.pretrained, require_head=require_head)
        log(f"  weights: {what}")

    def optimizer_specs(self, model):
        from ...models.vit_classifier import layer_decay_param_groups

        o = self.cfg.optim
        groups = layer_decay_param_groups(model, o.weight_decay, self.opts.layer_decay)
        return [OptimizerSpec("model", groups)]

    def flops_per_image(self, model):
        f = getattr(model, "flops_per_image", None)
        return f() if f is not None else None

    # ------------------------------------------------------------------------------------------ training
    def _inputs(self, model, images):
        if not self._tokens(model):
            return images
        inner = unwrap(model)
        return tokenizer_ids(attached_tokenizer(inner), images, inner.config.num_patches)

    def losses(self, model, batch, device, step):
        images = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        images, target, draw = self.mixup.mix(images, labels)
        logits = model(self._inputs(model, images))
        return {"model": soft_target_cross_entropy(logits, target)}, {}

    def after_step(self, model) -> None:
        """After each applied optimizer step: the EMA update (when enabled)."""
        if not self.opts.ema:
            return
        inner = unwrap(model)
        if self.ema is None:
            self.ema = _make_ema(inner)
            return
        d = self.opts.ema
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), inner.parameters(), strict=True):
                e.lerp_(p.detach(), 1.0 - d)
            for e, b in zip(self.ema.buffers(), inner.buffers(), strict=True):
                e.copy_(b)

    def state_dict(self) -> dict | None:
        if self.ema is None:
            return None
        return {"ema": {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()}}

    def load_state_dict(self, state: dict | None, model) -> None:
        if not state or "ema" not in state:
            return
        self.ema = _make_ema(unwrap(model))
        self.ema.load_state_dict(state["ema"])

    # ------------------------------------------------------------------------------------------ evaluation
    def eval_every(self) -> int:
        return self.opts.eval_every

    @torch.no_grad()
    def evaluate(self, model, loader, device, autocast) -> dict[str, torch.Tensor]:
        """One pass over this rank's share of the val split: summed counts ``{name: (4,) [n, top1, top5, loss]}``
        for the model and (when on) its EMA; the loop all-reduces them and calls :meth:`eval_metrics`."""
        nets = {"": model}
        if self.ema is not None:
            nets["ema_"] = self.ema
        sums = {k: torch.zeros(4, dtype=torch.float64, device=device) for k in nets}
        was = {k: m.training for k, m in nets.items()}
        for m in nets.values():
            m.eval()
        try:
            for batch in loader:
                images = batch.images.to(device, non_blocking=True)
                labels = batch.labels.to(device, non_blocking=True)
                keep = batch.valid.to(device=device, dtype=torch.bool)
                x = self._inputs(model, images)
                for k, m in nets.items():
                    with autocast():
                        logits = m(x)
                    logits = logits.float()[keep]
                    y = labels[keep]
                    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                    hit = top == y[:, None]
                    s = torch.stack(
                        [
                            torch.tensor(float(y.numel()), device=device),
                            hit[:, 0].sum().double(),
                            hit.any(1).sum().double(),
                            F.cross_entropy(logits, y, reduction="sum").double(),
                        ]
                    )
                    sums[k] += s  # fmt: skip
        finally:
            for k, m in nets.items():
                m.train(was[k])
        return sums

    @staticmethod
    def eval_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """All-reduced sums -> ``{"top1", "top5", "loss"}`` (and ``ema_*``), accuracies in [0, 1]."""
        out = {}
        for k, s in sums.items():
            n, c1, c5, loss = (float(v) for v in s.tolist())
            out.update({f"{k}top1": c1 / max(n, 1), f"{k}top5": c5 / max(n, 1), f"{k}loss": loss / max(n, 1)})
        return out

    @torch.no_grad()
    def features(self, model, images):
        feat = model.pool(model.forward_features(self._inputs(model, images)))
        return {"mean" if model.config.global_pool else "cls": feat}


def _make_ema(model: nn.Module) -> nn.Module:
    tok = model.__dict__.pop("_mimfast_tokenizer", None)  # the frozen tokenizer is shared, not copied
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ema = copy.deepcopy(model)
    finally:
        if tok is not None:
            model._mimfast_tokenizer = tok
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema.eval()

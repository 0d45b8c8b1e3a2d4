"""Tasks: how each method plugs into the one training loop (STYLE.md, "one loop, many methods").

The loop (:mod:`mimfast.train.loop`) owns everything methods share: precision, distribution, accumulation, clipping,
schedules, checkpoints, resume, progress, logging and the NaN guard. A :class:`Task` owns what differs: how a batch
becomes losses and metrics, which parameters each optimizer updates (a GAN tokenizer has two), the FLOPs per image
behind MFU, and what ``mimfast probe`` / ``reconstruct`` need (features, reconstruction columns). A model class names
its task in its ``task`` attribute (``MaskedAutoencoderViT.task = "mae"``); :func:`task_for` finds the class
registered under that name with :func:`register_task`. Adding a method adds a task, never a branch in the loop.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn as nn

from ..optim import param_groups

if TYPE_CHECKING:
    from ..config import RunConfig

__all__ = ["OptimizerSpec", "Task", "register_task", "task_for", "tasks"]

_TASKS: dict[str, type[Task]] = {}


@dataclass
class OptimizerSpec:
    """One optimizer of a task: AdamW over ``groups`` (``[{"params": [...], "weight_decay": ...}, ...]``)."""

    name: str
    """Name of the optimizer; :meth:`Task.losses` returns one loss under this name."""
    groups: list[dict]
    """AdamW parameter groups; the parameters of different optimizers must be disjoint."""
    lr_scale: float = 1.0
    """This optimizer's lr = ``lr_scale`` x the run's scheduled lr."""
    betas: tuple[float, float] | None = None
    """AdamW betas; None = ``optim.betas``."""


class Task(abc.ABC):
    """Base class: the MAE-like default of one optimizer over every trainable parameter of the model.

    Subclasses set :attr:`name` and implement :meth:`losses`; the rest has defaults.
    """

    name: ClassVar[str] = ""
    options: ClassVar[type | None] = None
    """A dataclass of the task's ``model.loss`` options (None: the task takes none)."""

    def __init__(self, cfg: RunConfig | None):
        self.cfg = cfg  # None: evaluation of a bare model (features only)
        self.opts = self._parse_options(cfg.model.loss if cfg is not None else {})

    def _parse_options(self, given: dict):
        from ..config import ConfigError

        if self.options is None:
            if given:
                raise ConfigError(f"model.loss={given!r}: the {self.name} task takes no loss options")
            return None
        valid = [f.name for f in dataclasses.fields(self.options)]
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise ConfigError(f"model.loss.{unknown[0]}: unknown option of the {self.name} task; valid: "
                              f"{', '.join(f'model.loss.{v}' for v in valid)}")  # fmt: skip
        try:
            return self.options(**given)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.loss={given!r}: {e}") from None

    # ---------------------------------------------------------------------------------------------- building
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Attach what training needs beyond the registered model (a tokenizer's loss and discriminator, as taming
        keeps them in ``model.loss``); the result is what the loop wraps and checkpoints, and what ``mimfast probe``
        / ``reconstruct`` rebuild. Default: the model itself."""
        return model

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`~mimfast.train.config.ConfigError` when the model or ``model.loss`` options do not fit the
        run's config."""
        from ..config import ConfigError

        img = getattr(getattr(model, "config", None), "img_size", None)
        if img is not None and img != self.cfg.data.img_size:
            raise ConfigError(
                f"data.img_size={self.cfg.data.img_size} but model {self.cfg.model.name} takes {img} px images; "
                f"set data.img_size={img} (or model.overrides.img_size=...)"
            )

    def initialize(self, model: nn.Module, log=print) -> None:
        """A fresh run only (not a resume, not an evaluation rebuild): load outside weights into the model before it
        moves to the device (fine-tuning from a pretrained encoder). Default: nothing."""
        return None

    def check_data(self, model: nn.Module, loader) -> None:
        """Raise :class:`~mimfast.train.config.ConfigError` when the training loader does not fit the model (e.g. a
        class count). Default: nothing."""
        return None

    def optimizer_specs(self, model: nn.Module) -> list[OptimizerSpec]:
        """The task's optimizers (default: one, over MAE's weight-decay groups of every trainable parameter)."""
        o = self.cfg.optim
        return [OptimizerSpec("model", param_groups(model, o.weight_decay, no_decay_tokens=o.no_decay_tokens))]

    def flops_per_image(self, model: nn.Module) -> float | None:
        """Training FLOPs per image (for MFU); None when unknown."""
        return None

    # ---------------------------------------------------------------------------------------------- training
    @abc.abstractmethod
    def losses(self, model: nn.Module, batch, device: torch.device, step: int) -> tuple[dict[str, torch.Tensor], dict]:
        """One micro-batch of optimizer step ``step + 1``: ``({optimizer name: scalar loss}, {metric: scalar})``.

        ``model`` is the wrapped model (DDP / FSDP2: call it, do not reach around it for the forward); ``batch`` is
        the loader's :class:`~mimfast.data.Batch`; ``step`` counts the optimizer steps done (for loss schedules,
        e.g. a discriminator weight that is 0 before its start step). The loop backpropagates the *sum* of the
        losses once and steps every optimizer every step, so each loss may only produce gradients in its own
        optimizer's parameters (use detached inputs / parameters otherwise). Metrics are averaged over micro-batches
        and ranks and logged next to the loss; keep their keys the same on every call.
        """

    def after_step(self, model: nn.Module) -> None:
        """Called after every applied optimizer step (e.g. a weight EMA). Default: nothing."""
        return None

    def state_dict(self) -> dict | None:
        """Task state saved in each checkpoint (e.g. the EMA weights); None = nothing."""
        return None

    def load_state_dict(self, state: dict | None, model: nn.Module) -> None:
        """Restore :meth:`state_dict` on resume (``model``: the wrapped model, on its device)."""
        return None

    # -------------------------------------------------------------------------------------------- evaluation
    best_metric: ClassVar[str | None] = None
    """Name of the :meth:`eval_metrics` value the launcher maximises (keeping ``out_dir/best.pt``); None = the task
    has no in-training evaluation."""

    def evaluate(self, model: nn.Module, loader, device: torch.device, autocast) -> dict[str, torch.Tensor]:
        """In-training evaluation over this rank's share of the val split (``autocast()``: the run's precision
        context): ``{name: tensor of sums}``, all-reduced by the launcher and turned into metrics by
        :meth:`eval_metrics`. Only called when :attr:`best_metric` is set."""
        raise NotImplementedError

    def eval_every(self) -> int:
        """Epochs between in-training evaluations (there is always one after the last step)."""
        return 1

    @staticmethod
    def eval_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """All-reduced sums of :meth:`evaluate` -> metrics."""
        raise NotImplementedError

    def features(self, model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen features for ``mimfast probe``: ``{"cls": (B, D), "mean": (B, D)}`` (eval mode, no masking)."""
        raise ValueError(f"the {self.name} task has no features for a linear probe")

    def reconstruction(self, model: nn.Module, images: torch.Tensor, *, generator: torch.Generator,
                       mask_ratio: float | None = None) -> tuple[list[str], list[torch.Tensor]]:  # fmt: skip
        """Columns of ``mimfast reconstruct``'s grid: ``(titles, [(B, C, H, W) in the input's normalised space])``."""
        raise ValueError(f"the {self.name} task has no reconstruction")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a task under ``cls.name``."""
    if not cls.name or cls.name in _TASKS:
        raise ValueError(f"register_task: {cls.__name__} needs a new, non-empty name (got {cls.name!r})")
    _TASKS[cls.name] = cls
    return cls


def tasks() -> list[str]:
    """Registered task names."""
    return sorted(_TASKS)


def task_for(model: nn.Module, cfg: RunConfig | None = None) -> Task:
    """The task of ``model`` (its class's ``task`` attribute), built for ``cfg`` (a run's config; None for a bare
    model, enough for :meth:`Task.features`)."""
    name = getattr(model, "task", None)
    if name not in _TASKS:
        raise TypeError(
            f"{type(model).__name__} names no registered training task (task={name!r}; registered: {tasks()})"
        )
    return _TASKS[name](cfg)


from . import finetune as _finetune  # noqa: E402, F401
from . import mae as _mae  # noqa: E402, F401  (registers the built-in tasks)
from . import mage as _mage  # noqa: E402, F401
from . import token_prediction as _token_prediction  # noqa: E402, F401
from . import tokenizer as _tokenizer  # noqa: E402, F401

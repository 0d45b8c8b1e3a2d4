"""LARS (You et al. 2017, in the form MoCo v3 and MAE use) and MAE's linear-probe head trained with it.

:class:`LARS` is the optimizer of MAE's ``main_linprobe``; :func:`fit_lars_probe` trains MAE's probe head
(``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, classes)``) on frozen features with MAE's recipe
(blr 0.1, lr = blr * batch / 256, weight decay 0, momentum 0.9, linear warm-up then half-cycle cosine per iteration,
cross-entropy, shuffled batches with the ragged tail dropped). ``mimfast probe --protocol lars``
(:func:`mimfast.train.evaluate.lars_linear_probes`) extracts the features and calls it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import lr_at

__all__ = ["LARS", "PAPER_PROBE", "PAPER_STEPS", "fit_lars_probe", "lars_probe_head", "probe_schedule", "topk_accuracy"]

PAPER_PROBE = dict(epochs=90, warmup_epochs=10, batch_size=16384, blr=0.1, weight_decay=0.0, momentum=0.9)
"""MAE's linear-probe recipe (paper, appendix A.2; ``main_linprobe.py``) on ImageNet-1k."""
PAPER_TRAIN_IMAGES = 1_281_167
"""ImageNet-1k's training split."""
PAPER_STEPS = PAPER_PROBE["epochs"] * (PAPER_TRAIN_IMAGES // PAPER_PROBE["batch_size"])
"""Optimizer steps of the paper's probe: 90 epochs x 78 steps = 7020."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def probe_schedule(num_train: int, *, epochs: int | None = None, warmup_epochs: float | None = None,
                   batch_size: int = 16384, blr: float = 0.1) -> dict:  # fmt: skip
    """The LARS probe's schedule for ``num_train`` training rows: ``{"epochs", "warmup_epochs", "batch_size", "lr",
    "steps_per_epoch", "steps"}``.

    ``batch_size`` is capped at ``num_train`` (each epoch drops its ragged tail, so a larger batch would take no
    step); ``lr = blr * batch / 256`` with the capped batch. ``epochs`` defaults to the paper's 90, or more on a split
    smaller than ImageNet-1k: enough for the paper's :data:`PAPER_STEPS` (7020) optimizer steps, since LARS moves a
    weight matrix by about ``lr * trust_coefficient * ||W||`` per step whatever the data size (90 epochs of 2000
    images at batch 2000 are 90 steps: a head that barely leaves its init). ``warmup_epochs`` defaults to 10/90 of
    the epochs (the paper's ratio).
    """
    if isinstance(num_train, bool) or not isinstance(num_train, int) or num_train < 1:
        raise ValueError(f"num_train: expected an int >= 1, got {num_train!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs: expected an int >= 1, got {epochs!r}")
    if not (_is_number(blr) and blr > 0):
        raise ValueError(f"blr: expected a finite number > 0, got {blr!r}")
    batch = min(batch_size, num_train)
    per_epoch = num_train // batch
    if epochs is None:
        epochs = max(PAPER_PROBE["epochs"], math.ceil(PAPER_STEPS / per_epoch))
    if warmup_epochs is None:
        warmup_epochs = epochs * PAPER_PROBE["warmup_epochs"] / PAPER_PROBE["epochs"]
    if not (isinstance(warmup_epochs, (int, float)) and 0 <= warmup_epochs <= epochs):
        raise ValueError(f"warmup_epochs: expected a number in [0, epochs={epochs}], got {warmup_epochs!r}")
    return dict(epochs=epochs, warmup_epochs=warmup_epochs, batch_size=batch, lr=blr * batch / 256,
                steps_per_epoch=per_epoch, steps=epochs * per_epoch)  # fmt: skip


class LARS(torch.optim.Optimizer):
    r"""Layer-wise adaptive rate scaling without rate scaling or weight decay for parameters of ndim <= 1.

    For a parameter ``p`` with gradient ``g``, momentum buffer ``m`` (zeros before the first step), learning rate
    ``lr``, weight decay ``wd``, momentum ``mu`` and trust coefficient ``eta``:

    * ``p.ndim > 1`` (weight matrices, conv kernels)::

          u = g + wd * p
          q = eta * ||p|| / ||u||   if ||p|| > 0 and ||u|| > 0, else 1      (Frobenius norms, fp32 or wider)
          m = mu * m + q * u
          p = p - lr * m

    * ``p.ndim <= 1`` (biases, norm scales): plain SGD with momentum, no decay and no trust scaling::

          m = mu * m + g
          p = p - lr * m

    No dampening, no Nesterov; parameters whose ``grad`` is None are skipped (their buffers untouched).

    Args:
        params: parameters or parameter groups (each group may override the options below).
        lr: learning rate (>= 0). MAE sets it per iteration from its schedule; 0 by default as there.
        weight_decay: L2 added to the gradient of ndim > 1 parameters (>= 0).
        momentum: in [0, 1).
        trust_coefficient: ``eta`` above (> 0).
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):  # fmt: skip
        for name, value, ok, expected in (
            ("lr", lr, lambda v: v >= 0, ">= 0"),
            ("weight_decay", weight_decay, lambda v: v >= 0, ">= 0"),
            ("momentum", momentum, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("trust_coefficient", trust_coefficient, lambda v: v > 0, "> 0"),
        ):
            if not (_is_number(value) and ok(value)):
                raise ValueError(f"LARS {name}: expected a finite number {expected}, got {value!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient; returns ``closure()``'s loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mu, eta = group["lr"], group["weight_decay"], group["momentum"], group["trust_coefficient"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise ValueError("LARS: sparse gradients are not supported")
                if p.ndim > 1:
                    u = g.add(p, alpha=wd) if wd != 0 else g
                    acc = torch.promote_types(p.dtype, torch.float32)  # norms of bf16 / fp16 weights in fp32
                    p_norm = torch.linalg.vector_norm(p, dtype=acc)
                    u_norm = torch.linalg.vector_norm(u, dtype=acc)
                    ok = (p_norm > 0) & (u_norm > 0)
                    q = torch.where(ok, eta * p_norm / torch.where(ok, u_norm, 1.0), 1.0)
                    u = u * q.to(u.dtype)
                else:
                    u = g
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["mu"]
                buf.mul_(mu).add_(u)
                p.add_(buf, alpha=-lr)
        return loss


def lars_probe_head(dim: int, num_classes: int, *, generator: torch.Generator | None = None) -> nn.Sequential:
    """MAE's linear-probe head: ``BatchNorm1d(dim, affine=False, eps=1e-6)`` then ``Linear(dim, num_classes)`` with
    the weight drawn from trunc_normal(std=0.01) (MoCo v3's init) and a zero bias. Input (B, dim), output (B, C)."""
    linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        nn.init.trunc_normal_(linear.weight, std=0.01, generator=generator)
        linear.bias.zero_()
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Fraction of rows of ``scores (M, C)`` whose label is among the ``k`` highest scores, for each ``k`` in ``ks``;
    ``k`` is capped at C (top-5 of a 3-class problem is top-3, i.e. 1.0). Ties rank the lower class index first."""
    kmax = min(max(ks), scores.shape[1])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :kmax]
    hit = order == labels.view(-1, 1).to(order.device)
    return [hit[:, : min(k, kmax)].any(dim=1).float().mean().item() for k in ks]


def _check_features(x: torch.Tensor, y: torch.Tensor, name: str, dim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: expected floating-point features (N, D), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")  # fmt: skip
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} features per row like the training features, got {x.shape[1]}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.dtype != torch.int64:
        raise ValueError(f"{name} labels: expected int64 of shape ({x.shape[0]},), got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")  # fmt: skip
    if x.shape[0] == 0:
        raise ValueError(f"{name}: the probe needs at least one sample")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: holds NaN or inf")


@contextlib.contextmanager
def _threads_for(dev: torch.device, macs: int):
    """One intra-op thread for a small head on the CPU: thousands of steps of tiny matmuls gain little from more,
    and on a busy machine OpenMP workers waiting for a descheduled peer made each step ~50x slower (measured: 0.5 ms
    vs 25 ms per step of a 64 x 96 -> 4 head on 2 loaded cores). Restored afterwards."""
    before = torch.get_num_threads()
    single = dev.type == "cpu" and macs < 2**24 and before > 1
    if single:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if single:
            torch.set_num_threads(before)


def fit_lars_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    num_classes: int,
    epochs: int | None = None,
    warmup_epochs: float | None = None,
    batch_size: int = 16384,
    blr: float = 0.1,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    seed: int = 0,
    train_views: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    device=None,
) -> dict:
    """Train MAE's probe head (:func:`lars_probe_head`) with :class:`LARS` on frozen features; score it.

    ``train_x (N, D)`` / ``train_y (N,)``: training features (the eval transform) and int64 labels; ``val_x (M, D)`` /
    ``val_y (M,)``: validation. ``train_views``: optional list of ``(x (N_v, D), y (N_v,))`` augmented views; epoch
    ``e`` then trains on view ``e % len(train_views)`` instead of ``train_x`` (MAE draws a fresh RandomResizedCrop +
    flip view every epoch). Each epoch is a seeded shuffle in batches of ``batch_size`` with the ragged tail dropped
    (MAE's ``drop_last=True``); ``batch_size`` is capped at the number of training rows so that an epoch has at
    least one step, and the peak lr is ``blr * batch / 256`` with the capped batch. The lr follows
    :func:`mimfast.train.config.lr_at` per iteration (min lr 0). Defaults are the paper's (:data:`PAPER_PROBE`),
    except that ``epochs`` / ``warmup_epochs`` default to :func:`probe_schedule`'s (the paper's 7020 steps).

    Returns ``{"top1", "top5", "train_top1", "lr", "batch_size", "steps", "epochs", "warmup_epochs"}`` (accuracies
    in [0, 1]; ``train_top1`` on ``train_x``; top-5 is capped at ``num_classes``).
    """
    _check_features(train_x, train_y, "train features")
    dim = train_x.shape[1]
    _check_features(val_x, val_y, "val features", dim)
    views = [(train_x, train_y)] if not train_views else list(train_views)
    for i, (vx, vy) in enumerate(views):
        _check_features(vx, vy, f"train view {i}", dim)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
    labels = [train_y, val_y, *[v[1] for v in views]]
    if max(int(y.max()) for y in labels) >= num_classes or min(int(y.min()) for y in labels) < 0:
        raise ValueError(f"labels: expected values in [0, num_classes={num_classes}), got "
                         f"{min(int(y.min()) for y in labels)}..{max(int(y.max()) for y in labels)}")  # fmt: skip
    sched = probe_schedule(min(v[0].shape[0] for v in views), epochs=epochs, warmup_epochs=warmup_epochs,
                           batch_size=batch_size, blr=blr)  # fmt: skip
    epochs, batch, lr = sched["epochs"], sched["batch_size"], sched["lr"]
    per_epoch = [v[0].shape[0] // batch for v in views]  # views may differ in size (train loaders drop ragged tails)
    total = sum(per_epoch[e % len(views)] for e in range(epochs))
    whole = math.floor(sched["warmup_epochs"])
    warmup_steps = sum(per_epoch[e % len(views)] for e in range(whole))
    if whole < epochs:
        warmup_steps += (sched["warmup_epochs"] - whole) * per_epoch[whole % len(views)]
    dev = torch.device(device) if device is not None else train_x.device

    with _threads_for(dev, batch * dim * num_classes):
        gen = torch.Generator().manual_seed(seed)
        head = lars_probe_head(dim, num_classes, generator=gen).to(dev).train()
        opt = LARS(head.parameters(), lr=0.0, weight_decay=weight_decay, momentum=momentum)
        views = [(vx.to(dev, torch.float32), vy.to(dev)) for vx, vy in views]
        step = 0
        for epoch in range(epochs):
            vx, vy = views[epoch % len(views)]
            n = vx.shape[0]
            order = None if n == batch else torch.randperm(n, generator=gen).to(dev)
            for i in range(n // batch):
                if order is None:  # one full batch: the order of the rows does not change the step
                    bx, by = vx, vy
                else:
                    idx = order[i * batch : (i + 1) * batch]
                    bx, by = vx[idx], vy[idx]
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, peak=lr, min_lr=0.0, warmup_steps=warmup_steps, total_steps=total)
                loss = F.cross_entropy(head(bx), by)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        head.eval()
        with torch.no_grad():
            top1, top5 = topk_accuracy(head(val_x.to(dev, torch.float32)), val_y.to(dev))
            (train_top1,) = topk_accuracy(head(train_x.to(dev, torch.float32)), train_y.to(dev), ks=(1,))
    return {"top1": top1, "top5": top5, "train_top1": train_top1, "lr": lr, "batch_size": batch, "steps": step,
            "epochs": epochs, "warmup_epochs": sched["warmup_epochs"]}  # fmt: skip

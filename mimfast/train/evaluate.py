"""Evaluating a pretrained MAE: ``mimfast probe`` (linear probe, top-1) and ``mimfast reconstruct`` (a PNG grid).

Linear probe, as MAE's ``main_linprobe`` defines it but sized for a quick check: the pretrained encoder is frozen and
run on *all* patches (mask ratio 0, token order unchanged), one feature per image is taken (the class token after the
final norm, or the mean of the patch tokens: MAE's pretraining loss never reaches the class token directly, and its
fine-tuning recipe pools the patch tokens), features are standardised with the training split's statistics (MAE's
``BatchNorm1d(affine=False)`` before the head) and a linear classifier is trained on them with full-batch AdamW.
Images use the eval transform (resize + centre crop, no flip) on both splits, so features are extracted once.
Top-1 is measured on the validation split. ``random_init=True`` probes a freshly initialised encoder of the same
architecture with the same recipe: the baseline pretraining must beat.

``protocol="lars"`` (:func:`lars_linear_probes`, ``mimfast probe --protocol lars``) is MAE's own probe: the head is
``BatchNorm1d(D, affine=False, eps=1e-6)`` + ``Linear(D, classes)`` trained with LARS by mini-batches (blr 0.1,
lr = blr * batch / 256, momentum 0.9, no weight decay, warm-up then half-cycle cosine per iteration; batch 16384,
90 epochs with 10 of warm-up on ImageNet-1k, i.e. 7020 steps). On a smaller split the batch is capped at the split
and the default epochs grow to keep the paper's 7020 steps (:func:`mimfast.train.lars.probe_schedule`). MAE trains on
RandomResizedCrop + flip views; by default the features are extracted once with the eval transform (fast), and
``augment=V`` extracts V augmented views of the train split (MAE's crop: area 0.08-1, flip) cycled over the epochs.
Top-1 and top-5 on the val split.

Reconstruction: ``num_images`` validation images spread evenly over the split (every class of a class-sorted
folder shows up), masked with a seeded draw, each shown as
[original | masked input | reconstruction | reconstruction with the visible patches pasted back]; with norm-pix loss the
predicted patches are mapped back to pixels with each target patch's mean and variance (as MAE's visualisation does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import create_model
from .checkpoint import CheckpointError, load_checkpoint, load_model_state
from .config import config_from_dict
from .tasks import task_for

__all__ = [
    "ProbeResult",
    "extract_features",
    "extract_pooled_features",
    "fit_linear_probe",
    "lars_linear_probes",
    "linear_probe",
    "linear_probes",
    "load_pretrained",
    "reconstruct",
]


@dataclass
class ProbeResult:
    """Outcome of a linear probe."""

    top1: float
    """Validation top-1 accuracy in [0, 1]."""
    train_top1: float
    """Top-1 on the (probe) training features, for reference."""
    num_train: int
    """Training images the probe saw."""
    num_val: int
    """Validation images scored."""
    num_classes: int
    """Classes of the dataset."""
    feature_dim: int
    """Width of the probed feature."""
    pool: str
    """"cls" or "mean"."""
    random_init: bool
    """True when the encoder was freshly initialised rather than loaded."""
    top5: float | None = None
    """Validation top-5 (the lars protocol; capped at the number of classes)."""
    protocol: str = "quick"
    """"quick" (full-batch AdamW on standardised features) or "lars" (MAE's protocol)."""
    recipe: dict | None = None
    """The lars protocol's schedule as run: epochs, warmup_epochs, batch_size, lr, steps, augment views."""


def _device(name: str | None) -> torch.device:
    """``"auto"`` / None (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:<index>"``; a clear ValueError
    otherwise (``--device`` on the command line)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "expected auto, cpu, cuda or cuda:<index>"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device (--device): {expected}, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device (--device): {expected}, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device (--device): {name!r} was asked for but torch.cuda.is_available() is False")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device (--device): {name!r} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def load_pretrained(checkpoint: str | Path, *, random_init: bool = False, seed: int = 0):
    """Rebuild the model of a ``mimfast pretrain`` run from its checkpoint (a ``ckpt_*.pt`` file or the run directory).

    Returns ``(model, run_config, step)``; with ``random_init=True`` the weights are a fresh seeded initialisation of
    the same architecture (step is then 0). The model is in eval mode on the CPU.
    """
    ckpt = load_checkpoint(checkpoint)
    source = f"checkpoint {ckpt['path']}"
    try:
        cfg = config_from_dict(ckpt["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: its config cannot be read by this mimfast ({e})") from None
    overrides = dict(cfg.model.overrides)
    with torch.random.fork_rng(devices=[], enabled=random_init):  # a random init is seeded, not drawn from the run
        if random_init:
            torch.manual_seed(seed)
        try:
            model = create_model(cfg.model.name, **overrides)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{source}: its model {cfg.model.name!r} (overrides {overrides!r}) cannot be "
                                  f"built: {e}") from None  # fmt: skip
        model = task_for(model, cfg).prepare_model(model)  # e.g. a tokenizer's loss, saved with it
    step = 0
    if not random_init:
        load_model_state(model, ckpt["model"], source=f"{source} (model {cfg.model.name}, overrides {overrides!r})")
        step = int(ckpt["step"])
    return model.eval(), cfg, step


POOLS = ("cls", "mean")


@torch.no_grad()
def extract_pooled_features(model: nn.Module, loader, *, pools=POOLS, device=None, progress: bool = False):
    """Frozen-encoder features of every valid sample of one epoch of ``loader`` (eval mode), pooled each way in
    ``pools`` ("cls": the class token after the final norm; "mean": the mean of the patch tokens) in one pass; the
    model's task (:meth:`mimfast.train.tasks.Task.features`) says how.

    Returns ``({pool: features (N, D) float32 on the CPU}, labels (N,) int64)``.
    """
    pools = tuple(pools)
    if not pools or any(p not in POOLS for p in pools):
        raise ValueError(f"pool: expected 'cls' or 'mean', got {pools if len(pools) != 1 else pools[0]!r}")
    device = _device(device) if not isinstance(device, torch.device) else device
    model = model.to(device).eval()
    task = task_for(model)
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in pools}
    labels = []
    n_batches = len(loader)
    for i, batch in enumerate(loader):
        pooled = task.features(model, batch.images.to(device, non_blocking=True))
        missing = [p for p in pools if p not in pooled]
        if missing:
            raise ValueError(f"pool: the {task.name} task gives no {missing[0]!r} feature (it gives "
                             f"{', '.join(pooled)}); pass --pool {next(iter(pooled))}")  # fmt: skip
        keep = batch.valid.to(torch.bool).cpu()
        for p in pools:
            feats[p].append(pooled[p].float().cpu()[keep])
        labels.append(batch.labels.cpu()[keep])
        if progress and (i + 1 == n_batches or (i + 1) % 20 == 0):
            print(f"  features: batch {i + 1}/{n_batches}", flush=True)
    return {p: torch.cat(v) for p, v in feats.items()}, torch.cat(labels).long()


def extract_features(model: nn.Module, loader, *, pool: str = "cls", device=None, progress: bool = False):
    """Frozen-encoder features of every valid sample of one epoch of ``loader`` (eval mode), pooled by ``pool``.

    Returns ``(features (N, D) float32 on the CPU, labels (N,) int64)``.
    """
    feats, labels = extract_pooled_features(model, loader, pools=(pool,), device=device, progress=progress)
    return feats[pool], labels


def fit_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    num_classes: int,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> tuple[float, float]:
    """Standardise with the training statistics, train ``Linear(D, num_classes)`` by full-batch AdamW.

    ``train_x (N, D)``, ``train_y (N,)``, ``val_x (M, D)``, ``val_y (M,)``. Returns ``(val_top1, train_top1)``.
    """
    if train_x.ndim != 2 or val_x.ndim != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"features: expected (N, D) and (M, D), got {tuple(train_x.shape)} and {tuple(val_x.shape)}")
    if train_x.shape[0] == 0 or val_x.shape[0] == 0:
        raise ValueError("features: the probe needs at least one training and one validation sample")
    mean = train_x.mean(0)
    std = train_x.std(0, unbiased=False).clamp_min(1e-6)
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(tx.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)  # MAE: trunc_normal(std=0.01)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(head(tx), train_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        val_top1 = (head(vx).argmax(1) == val_y).float().mean().item()
        train_top1 = (head(tx).argmax(1) == train_y).float().mean().item()
    return val_top1, train_top1


def _eval_loaders(cfg, data_root: str | None, batch_size: int, device: torch.device):
    import dataclasses

    from ..data import build_loader

    data_cfg = cfg.data if data_root is None else dataclasses.replace(cfg.data, root=data_root)
    data_cfg = dataclasses.replace(data_cfg, tokenizer_size=None)
    device_id = (device.index or 0) if device.type == "cuda" else None
    train = build_loader(data_cfg, batch_size=batch_size, split="train", mode="eval", device_id=device_id)
    val = build_loader(data_cfg, batch_size=batch_size, split="val", mode="eval", device_id=device_id)
    return data_cfg, train, val


def linear_probes(
    checkpoint: str | Path,
    *,
    pools=POOLS,
    data_root: str | None = None,
    random_init: bool = False,
    batch_size: int = 64,
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
    device=None,
    progress: bool = True,
    loaders=None,
) -> dict[str, ProbeResult]:
    """Linear probes of the encoder of a pretraining checkpoint (or of a seeded random encoder of the same
    architecture), one per feature pooling in ``pools``, from one feature-extraction pass: ``{pool: ProbeResult}``.

    ``data_root`` defaults to the run's own ``data.root`` (``"builtin"`` for the debug preset); it needs ``train`` and
    ``val`` splits with class labels. ``loaders`` = ``(train_loader, val_loader)`` skips building them (to reuse one
    pair for several probes).
    """
    dev = _device(device) if not isinstance(device, torch.device) else device
    model, cfg, _ = load_pretrained(checkpoint, random_init=random_init, seed=seed)
    if loaders is None:
        _, train_loader, val_loader = _eval_loaders(cfg, data_root, batch_size, dev)
    else:
        train_loader, val_loader = loaders
    tf, ty = extract_pooled_features(model, train_loader, pools=pools, device=dev, progress=progress)
    vf, vy = extract_pooled_features(model, val_loader, pools=pools, device=dev, progress=progress)
    num_classes = int(max(ty.max().item(), vy.max().item())) + 1
    out = {}
    for p in tf:
        top1, train_top1 = fit_linear_probe(tf[p], ty, vf[p], vy, num_classes=num_classes, steps=steps, lr=lr,
                                            seed=seed)  # fmt: skip
        out[p] = ProbeResult(top1, train_top1, len(ty), len(vy), num_classes, tf[p].shape[1], p, random_init)
    return out


def linear_probe(checkpoint: str | Path, *, pool: str = "cls", **kwargs) -> ProbeResult:
    """:func:`linear_probes` with one pooling (``"cls"`` or ``"mean"``); same keyword arguments."""
    if pool not in POOLS:
        raise ValueError(f"pool: expected 'cls' or 'mean', got {pool!r}")
    return linear_probes(checkpoint, pools=(pool,), **kwargs)[pool]


def _augment_loader(data_cfg, batch_size: int, device: torch.device, num_train: int):
    """Train-split loader of MAE's linear-probe augmentation: RandomResizedCrop (area 0.08-1, ratio 3/4-4/3, the
    torchvision defaults MAE keeps) + horizontal flip, no RandAugment / erasing; shuffled, ragged tail dropped."""
    import dataclasses

    from ..data import build_loader

    cfg = dataclasses.replace(data_cfg, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=True, rand_n=0, reprob=0.0,
                              tokenizer_size=None)  # fmt: skip
    device_id = (device.index or 0) if device.type == "cuda" else None
    return build_loader(cfg, batch_size=min(batch_size, num_train), split="train", mode="train",
                        device_id=device_id)  # fmt: skip


def lars_linear_probes(
    checkpoint: str | Path,
    *,
    pools=POOLS,
    data_root: str | None = None,
    random_init: bool = False,
    epochs: int | None = None,
    warmup_epochs: float | None = None,
    batch_size: int = 16384,
    blr: float = 0.1,
    augment: int = 0,
    extract_batch_size: int = 64,
    seed: int = 0,
    device=None,
    progress: bool = True,
    loaders=None,
) -> dict[str, ProbeResult]:
    """MAE's linear probe (LARS, :func:`mimfast.train.lars.fit_lars_probe`) of the frozen encoder of a pretraining
    checkpoint (or of a seeded random encoder), one head per pooling in ``pools``: ``{pool: ProbeResult}`` with
    top-1, top-5 and the schedule run (``recipe``).

    ``epochs`` / ``warmup_epochs`` default to :func:`mimfast.train.lars.probe_schedule`'s (the paper's 90 / 10 on
    ImageNet-1k; on a smaller split, as many epochs as the paper's 7020 steps take). ``augment=0`` trains on the
    eval-transform train features (extracted once); ``augment=V`` extracts V augmented views of the train split
    (the same views for every encoder) and cycles them over the epochs. ``loaders`` = ``(train, val)`` eval loaders,
    or ``(train, val, augment_loader)``, reuses them.
    """
    from .lars import fit_lars_probe

    if isinstance(augment, bool) or not isinstance(augment, int) or augment < 0:
        raise ValueError(f"augment: expected an int >= 0 (augmented views of the train split), got {augment!r}")
    dev = _device(device) if not isinstance(device, torch.device) else device
    model, cfg, _ = load_pretrained(checkpoint, random_init=random_init, seed=seed)
    if loaders is None:
        data_cfg, train_loader, val_loader = _eval_loaders(cfg, data_root, extract_batch_size, dev)
        aug_loader = _augment_loader(data_cfg, extract_batch_size, dev, train_loader.num_samples) if augment else None
    else:
        train_loader, val_loader, aug_loader = (*loaders, None)[:3]
        if augment and aug_loader is None:
            raise ValueError("loaders: augment > 0 needs (train, val, augment_loader)")
    tf, ty = extract_pooled_features(model, train_loader, pools=pools, device=dev, progress=progress)
    vf, vy = extract_pooled_features(model, val_loader, pools=pools, device=dev, progress=progress)
    views = []
    for v in range(augment):
        aug_loader.set_epoch(v)  # view v is the same crop of every image for every encoder
        views.append(extract_pooled_features(model, aug_loader, pools=pools, device=dev, progress=progress))
    num_classes = int(max(ty.max().item(), vy.max().item())) + 1
    out = {}
    for p in tf:
        r = fit_lars_probe(tf[p], ty, vf[p], vy, num_classes=num_classes, epochs=epochs, warmup_epochs=warmup_epochs,
                           batch_size=batch_size, blr=blr, seed=seed, device=dev,
                           train_views=[(f[p], y) for f, y in views] or None)  # fmt: skip
        recipe = {key: r[key] for key in ("epochs", "warmup_epochs", "batch_size", "lr", "steps")}
        recipe.update(blr=blr, augment=augment)
        out[p] = ProbeResult(r["top1"], r["train_top1"], len(ty), len(vy), num_classes, tf[p].shape[1], p, random_init,
                             top5=r["top5"], protocol="lars", recipe=recipe)  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ reconstruct
def _spread_images(loader, num: int) -> torch.Tensor:
    """``num`` images evenly spaced over one (in-order) epoch of an eval loader, so a class-sorted split shows every
    class rather than the first one: (num, 3, H, W) on the loader's device."""
    n = loader.num_samples
    want = {round(i * n / num) for i in range(min(num, n))}
    picked, seen = [], 0
    for batch in loader:
        for img, ok in zip(batch.images, batch.valid.tolist(), strict=True):
            if ok:
                if seen in want:
                    picked.append(img)
                seen += 1
        if len(picked) == len(want):
            break
    return torch.stack(picked)


@torch.no_grad()
def reconstruct(
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    num_images: int = 8,
    mask_ratio: float | None = None,
    data_root: str | None = None,
    seed: int = 0,
    scale: int | None = None,
    device=None,
    return_titles: bool = False,
) -> Path | tuple[Path, list[str]]:
    """Write a PNG grid of the reconstructions of ``num_images`` validation images spread evenly over the split, one
    row per image, with the columns the model's task gives (:meth:`mimfast.train.tasks.Task.reconstruction`).

    MAE: original, masked input (removed patches grey), reconstruction, reconstruction with the visible patches
    pasted back; ``mask_ratio`` defaults to the run's. ``scale`` (nearest-neighbour upscaling) defaults to reaching
    about 128 px per tile. Returns the path written (default: ``reconstruction.png`` in the checkpoint's directory),
    and the column titles with ``return_titles``.
    """
    from PIL import Image

    from ..data import denormalize

    if not (isinstance(num_images, int) and num_images >= 1):
        raise ValueError(f"num_images: expected an int >= 1, got {num_images!r}")
    dev = _device(device) if not isinstance(device, torch.device) else device
    model, cfg, step = load_pretrained(checkpoint)
    model = model.to(dev)
    data_cfg, _, val = _eval_loaders(cfg, data_root, 32, dev)
    if num_images > val.num_samples:
        warnings.warn(f"num_images={num_images} but the val split of {data_cfg.root} holds {val.num_samples} images: "
                      f"showing {val.num_samples}", stacklevel=2)  # fmt: skip
        num_images = val.num_samples
    imgs = _spread_images(val, num_images).to(dev)
    gen = torch.Generator().manual_seed(seed)
    titles, columns = task_for(model, cfg).reconstruction(model, imgs, generator=gen, mask_ratio=mask_ratio)
    cols = [denormalize(c.float().cpu(), data_cfg) for c in columns]
    orig = cols[0]
    n, _, h, w = orig.shape
    if scale is None:
        scale = max(1, round(128 / h))
    pad = 2
    tile_h, tile_w = h * scale, w * scale
    canvas = torch.ones(3, n * (tile_h + pad) + pad, len(cols) * (tile_w + pad) + pad)
    for i in range(n):
        for j, col in enumerate(cols):
            t = col[i].clamp(0, 1)
            if scale > 1:
                t = F.interpolate(t[None], scale_factor=scale, mode="nearest")[0]
            y, x = pad + i * (tile_h + pad), pad + j * (tile_w + pad)
            canvas[:, y : y + tile_h, x : x + tile_w] = t
    if out is None:  # next to the checkpoint, wherever the run was started from
        run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        out = run_dir / "reconstruction.png"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arr = (canvas.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    tmp = out.with_name(out.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(out)
    return (out, list(titles)) if return_titles else out


# --------------------------------------------------------------------------------------------------- the CLI
def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a ckpt_*.pt file or a run directory (its newest checkpoint)")
    p.add_argument("--data-root", default=None, help="dataset with train/ and val/ (default: the run's data.root)")
    p.add_argument("--pool", choices=("cls", "mean", "both"), default="both",
                   help="feature: the class token, the mean of the patch tokens, or both (default)")  # fmt: skip
    p.add_argument("--protocol", choices=("quick", "lars"), default="quick",
                   help="quick (default): full-batch AdamW on standardised features, seconds; lars: MAE's linear "
                        "probe (BatchNorm + linear head, LARS, warm-up + cosine, top-1 and top-5)")  # fmt: skip
    p.add_argument("--compare-random", action="store_true", help="also probe randomly initialised encoders")
    p.add_argument("--random-seeds", type=int, default=3, help="random inits to probe (seeds seed..seed+N-1)")
    p.add_argument("--random-init", action="store_true", help="probe only randomly initialised encoders")
    p.add_argument("--batch-size", type=int, default=None,
                   help="quick: images per feature-extraction batch (default 64); lars: the head's batch (default "
                        "16384, MAE's; capped at the train split, lr = blr x batch / 256)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="quick: full-batch AdamW steps of the head (default 300)")
    p.add_argument("--lr", type=float, default=None, help="quick: AdamW learning rate (default 0.05)")
    p.add_argument("--epochs", type=int, default=None,
                   help="lars: epochs (default: MAE's 90 on ImageNet-1k; on a smaller split enough epochs for the "
                        "paper's 7020 optimizer steps)")  # fmt: skip
    p.add_argument("--warmup-epochs", type=float, default=None, help="lars: warm-up epochs (default: epochs x 10/90)")
    p.add_argument("--blr", type=float, default=None, help="lars: base lr (default 0.1, MAE's)")
    p.add_argument("--augment", type=int, default=None, metavar="VIEWS",
                   help="lars: train on VIEWS RandomResizedCrop + flip views of the train split, cycled over "
                        "the epochs (MAE's augmentation, slower); default 0: eval-transform features extracted "
                        "once")  # fmt: skip
    p.add_argument("--extract-batch-size", type=int, default=None,
                   help="lars: images per feature-extraction batch (default 64)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pool_name(p: str) -> str:
    return "class token" if p == "cls" else "mean of patches"


def _compare_with_random(rows: list[dict], pools) -> dict:
    """Print one line per pooling comparing the pretrained encoder's val top-1 with the random inits' (rows of
    ``{"encoder": "pretrained" | "random", "seed", pool: {"top1", ...}}``); return the JSON summary."""
    summary = {}
    pre = [r for r in rows if r["encoder"] == "pretrained"]
    rnd = [r for r in rows if r["encoder"] == "random"]
    if pre and rnd:
        for p in pools:
            best = max(r[p]["top1"] for r in rnd)
            mean = sum(r[p]["top1"] for r in rnd) / len(rnd)
            summary[p] = {"pretrained": pre[0][p]["top1"], "random_mean": mean, "random_best": best,
                          "margin_over_best_random": pre[0][p]["top1"] - best}  # fmt: skip
            print(f"  {_pool_name(p)}: pretrained {_pct(pre[0][p]['top1'])} vs random init {_pct(mean)} (mean of "
                  f"{len(rnd)}, best {_pct(best)}): {100 * (pre[0][p]['top1'] - best):+.1f} points over the best "
                  "random init")  # fmt: skip
    return summary


def cmd_probe(args: argparse.Namespace) -> int:
    lars = args.protocol == "lars"
    other = ("steps", "lr") if lars else ("epochs", "warmup_epochs", "blr", "augment", "extract_batch_size")
    given = [f"--{o.replace('_', '-')}" for o in other if getattr(args, o) is not None]
    if given:
        print(f"error: {given[0]} applies to --protocol {'quick' if lars else 'lars'}, not {args.protocol}",
              file=sys.stderr)  # fmt: skip
        return 2
    batch = args.batch_size if args.batch_size is not None else (16384 if lars else 64)
    steps = 300 if args.steps is None else args.steps
    extract = 64 if args.extract_batch_size is None else args.extract_batch_size
    bad = [f"{o} {v}" for o, v in (("--random-seeds", args.random_seeds), ("--steps", steps), ("--batch-size", batch),
           ("--epochs", args.epochs), ("--augment", args.augment), ("--extract-batch-size", extract))
           if v is not None and v < (0 if o == "--augment" else 1)]  # fmt: skip
    if bad:
        print(f"error: --random-seeds, --steps, --batch-size, --epochs and --extract-batch-size must be >= 1 and "
              f"--augment >= 0, got {bad[0]}", file=sys.stderr)  # fmt: skip
        return 2
    dev = _device(args.device)  # errors are reported by mimfast.cli.main (one line, exit 2)
    _, cfg, step = load_pretrained(args.checkpoint)
    data_cfg, train, val = _eval_loaders(cfg, args.data_root, extract if lars else batch, dev)
    loaders = (train, val)
    pools = POOLS if args.pool == "both" else (args.pool,)
    runs = [] if args.random_init else [(False, args.seed)]
    if args.random_init or args.compare_random:
        runs += [(True, args.seed + i) for i in range(args.random_seeds)]
    lars_kw = {}
    if lars:
        from .lars import probe_schedule

        augment = args.augment or 0
        if augment:
            loaders = (train, val, _augment_loader(data_cfg, extract, dev, train.num_samples))
        n_fit = train.num_samples if not augment else len(loaders[2]) * loaders[2].batch_size
        blr = 0.1 if args.blr is None else args.blr
        sched = probe_schedule(n_fit, epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=batch, blr=blr)
        lars_kw = dict(epochs=sched["epochs"], warmup_epochs=sched["warmup_epochs"], batch_size=batch, blr=blr,
                       augment=augment)  # fmt: skip
        feats = f"{augment} RandomResizedCrop + flip views of the train split" if augment else "eval-transform features"
        what = (f"linear probe (lars, MAE's protocol: {sched['epochs']} epochs ({sched['warmup_epochs']:g} warm-up) "
                f"x {sched['steps_per_epoch']} step(s) of batch {sched['batch_size']}, lr {sched['lr']:.4g} = blr "
                f"{blr:g} x {sched['batch_size']} / 256, LARS momentum 0.9, {feats})")  # fmt: skip
        cols = "val top-1 / top-5 (train top-1)"
    else:
        what, cols = "linear probe", "val top-1 (train top-1)"
    print(f"{what}: {cfg.model.name} from {args.checkpoint} (step {step}), data {data_cfg.root}, "
          f"{train.num_samples} train / {val.num_samples} val images; {cols} by feature:")  # fmt: skip
    width = 24 if lars else 22
    print(f"  {'encoder':<22}" + "".join(f"{_pool_name(p):>{width}}" for p in pools))
    rows = []
    for is_random, seed in runs:
        t0 = time.perf_counter()
        if lars:
            res = lars_linear_probes(args.checkpoint, pools=pools, random_init=is_random, seed=seed, device=dev,
                                     progress=False, loaders=loaders, **lars_kw)  # fmt: skip
        else:
            res = linear_probes(args.checkpoint, pools=pools, random_init=is_random, steps=steps,
                                lr=0.05 if args.lr is None else args.lr, seed=seed, device=dev, progress=False,
                                loaders=loaders)  # fmt: skip
        label = f"random init (seed {seed})" if is_random else f"pretrained (step {step})"
        top5 = {p: f" / {_pct(res[p].top5)}" if lars else "" for p in pools}
        cells = "".join(f"{_pct(res[p].top1)}{top5[p]} ({_pct(res[p].train_top1)})".rjust(width) for p in pools)
        print(f"  {label:<22}{cells}   {time.perf_counter() - t0:.1f} s", flush=True)
        rows.append({"encoder": "random" if is_random else "pretrained", "seed": seed,
                     **{p: {"top1": res[p].top1, "train_top1": res[p].train_top1,
                            **({"top5": res[p].top5} if lars else {})} for p in pools}})  # fmt: skip
    summary = _compare_with_random(rows, pools)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"checkpoint": str(args.checkpoint), "step": step, "model": cfg.model.name, "data": data_cfg.root,
                  "num_train": train.num_samples, "num_val": val.num_samples, "protocol": args.protocol}  # fmt: skip
        if lars:
            record["lars"] = res[pools[0]].recipe
        else:
            record["probe_steps"] = steps
        record.update(runs=rows, summary=summary)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"  results: {out}")
    return 0


def add_reconstruct_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a ckpt_*.pt file or a run directory (its newest checkpoint)")
    p.add_argument("--out", default=None, help="PNG to write (default: reconstruction.png beside the checkpoint)")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the run's model.mask_ratio")
    p.add_argument("--data-root", default=None, help="dataset with a val/ split (default: the run's data.root)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def cmd_reconstruct(args: argparse.Namespace) -> int:
    out, titles = reconstruct(args.checkpoint, args.out, num_images=args.num_images, mask_ratio=args.mask_ratio,
                              data_root=args.data_root, seed=args.seed, device=args.device,
                              return_titles=True)  # fmt: skip
    print(f"reconstruction grid ({' | '.join(titles)}): {out}")
    return 0

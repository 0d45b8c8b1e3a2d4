"""``mimfast finetune``: end-to-end fine-tuning of a pretrained encoder through the pretraining launcher, and
``--eval-only`` evaluation of a classifier (a fine-tuning run, or an official fine-tuned checkpoint).

Fine-tuning is the launcher's ``finetune`` task (:mod:`mimfast.train.tasks.finetune`) on a
:class:`~mimfast.models.vit_classifier.ViTClassifier`: everything a pretraining run has (bf16, DDP / FSDP2, atomic
checkpoints, exact resume, progress, TensorBoard) plus val top-1 / top-5 every epoch and ``out_dir/best.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .config import ConfigError, RunConfig, get_config, list_configs, print_config

__all__ = ["FINETUNE_PRESET_FOR", "add_finetune_arguments", "cmd_finetune", "evaluate_classifier", "finetune"]

FINETUNE_PRESET_FOR = {
    "mae_debug": "mae_finetune_debug",
    "beit_debug": "beit_finetune_debug",
    "cae_debug": "cae_finetune_debug",
    "mage_debug": "mage_finetune_debug",
    "mae_vit_base": "mae_finetune_vit_base",
    "mae_vit_large": "mae_finetune_vit_large",
    "mae_vit_huge": "mae_finetune_vit_huge",
    "beit_vit_base": "beit_finetune_vit_base",
    "cae_vit_base": "cae_finetune_vit_base",
    "mage_vit_base": "mage_finetune_vit_base",
    "mage_vit_large": "mage_finetune_vit_large",
}
"""The fine-tuning preset ``mimfast finetune`` picks when ``--config`` is omitted, by the pretraining run's preset."""


def _check_classifier_config(cfg: RunConfig) -> None:
    from ..models import create_model

    with torch.device("meta"):
        try:
            model = create_model(cfg.model.name, **cfg.model.overrides)
        except (TypeError, ValueError) as e:
            msg = f"model.overrides={cfg.model.overrides!r}: not accepted by {cfg.model.name}: {e}"
            raise ConfigError(msg) from None
    task = getattr(model, "task", None)
    if task != "finetune":
        raise ConfigError(f"model.name={cfg.model.name!r} is a pretraining model (task {task!r}); `mimfast finetune` "
                          "trains a classifier: use a fine-tuning preset (--list-configs)")  # fmt: skip


def finetune(cfg: RunConfig, **kwargs):
    """Run (or resume) fine-tuning as configured: :func:`mimfast.train.pretrain` on a classifier config (the result's
    ``evals`` / ``best`` hold the per-epoch evaluations and the best one)."""
    from .loop import pretrain

    _check_classifier_config(cfg)
    return pretrain(cfg, **kwargs)


@torch.no_grad()
def evaluate_classifier(cfg: RunConfig, *, device=None, batch_size: int | None = None, progress: bool = True) -> dict:
    """Val top-1 / top-5 / loss of the classifier ``cfg`` describes, initialised from ``model.loss.pretrained`` (a
    fine-tuning run / ``best.pt``, or an official fine-tuned checkpoint through the key map), in one process.

    Returns ``{"top1", "top5", "loss", "num_val", "weights"}``.
    """
    import contextlib

    from ..data import build_loader
    from ..models import create_model
    from .evaluate import _device
    from .tasks import task_for

    _check_classifier_config(cfg)
    cfg.check_paths()
    if not cfg.model.loss.get("pretrained"):
        raise ConfigError("--eval-only needs weights: pass --checkpoint (a fine-tuning run, best.pt, or an official "
                          "fine-tuned .pth)")  # fmt: skip
    dev = _device(device if device is not None else cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, **cfg.model.overrides)
    task = task_for(model, cfg)
    model = task.prepare_model(model)
    task.check_model(model)
    lines = []
    try:
        task.initialize(model, lines.append, require_head=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model.to(dev).eval()
    loader = build_loader(cfg.data, batch_size=batch_size or cfg.train.batch_size, split="val", mode="eval",
                          device_id=(dev.index or 0) if dev.type == "cuda" else None)  # fmt: skip
    task.check_data(model, loader)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    if dev.type == "cpu" and amp is torch.float16:
        amp = None

    def autocast():
        return torch.autocast(dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    sums = task.evaluate(model, loader, dev, autocast)
    out = task.eval_metrics(sums)
    out.update(num_val=loader.num_samples, weights=lines[-1].strip() if lines else "")
    return out


# --------------------------------------------------------------------------------------------------- the CLI
def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="fine-tuning preset (see --list-configs); default: the one matching --checkpoint's pretraining "
                        "preset (mae_debug -> mae_finetune_debug, ...)")  # fmt: skip
    p.add_argument("--checkpoint", default=None,
                   help="pretrained weights (same as model.loss.pretrained=...): a mimfast pretraining run / ckpt, a "
                        "fine-tuning run / best.pt, or an official .pth")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=3 optim.blr=1e-3 out=DIR")
    p.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint in out_dir) or a checkpoint path")
    p.add_argument("--out", default=None, help="run directory (same as train.out_dir=...)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the --checkpoint classifier on the val split (top-1 / top-5) and exit")  # fmt: skip
    p.add_argument("--json", default=None, help="--eval-only: also write the result to this JSON file")
    p.add_argument("--print-config", action="store_true", help="print every key with its value and meaning; exit")
    p.add_argument("--list-configs", action="store_true", help="list the presets and exit")


def _preset_of_checkpoint(path: str) -> str | None:
    from .checkpoint import CheckpointError, load_checkpoint

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--checkpoint: no such checkpoint file or run directory {path!r}")
    cfg_json = (p if p.is_dir() else p.parent) / "config.json"
    try:
        return json.loads(cfg_json.read_text()).get("preset") or None
    except (OSError, ValueError):
        pass
    try:
        return load_checkpoint(p).get("config", {}).get("preset") or None
    except CheckpointError:
        return None


def cmd_finetune(args: argparse.Namespace) -> int:
    if args.list_configs:
        print("\n".join(n for n in list_configs() if "finetune" in n))
        return 0
    name = args.config
    if name is None:
        if args.checkpoint is None:
            raise ConfigError("pass --config <fine-tuning preset> (see --list-configs) and/or --checkpoint <pretrained "
                              "run>")  # fmt: skip
        pre = _preset_of_checkpoint(args.checkpoint)
        name = pre if pre in FINETUNE_PRESET_FOR.values() else FINETUNE_PRESET_FOR.get(pre or "")
        if name is None:
            raise ConfigError(f"--checkpoint {args.checkpoint!r} (preset {pre!r}) has no default fine-tuning preset: "
                              "pass --config (see --list-configs)")  # fmt: skip
        print(f"--config {name} (for the {pre} checkpoint)", flush=True)
    overrides = list(args.overrides)
    if args.checkpoint is not None:
        overrides.append(f"model.loss.pretrained={args.checkpoint}")
    if args.out is not None:
        overrides.append(f"train.out_dir={args.out}")
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    cfg = get_config(name, overrides)
    if args.print_config:
        print_config(cfg, f"mimfast finetune --config {name}")
        return 0
    if args.eval_only:
        t0 = time.perf_counter()
        res = evaluate_classifier(cfg)
        print(f"eval: {cfg.model.name} | {res['weights']} | {cfg.data.root}: {res['num_val']} val images | top-1 "
              f"{100 * res['top1']:.2f}% | top-5 {100 * res['top5']:.2f}% | loss {res['loss']:.4f} | "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        if args.json:
            out = Path(args.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"config": name, "checkpoint": args.checkpoint, **res}, indent=2) + "\n")
            print(f"  results: {out}")
        return 0
    res = finetune(cfg)
    if res.best is not None and int(os.environ.get("RANK", "0")) == 0:
        b = res.best
        print(f"  best       : {b['metric']} {100 * b['value']:.2f}% at epoch {b['epoch']:g} -> {b['path']}")
    sys.stdout.flush()
    return 0

"""Where a run starts and what a resume may change: the rank-0 decision (:func:`plan`), the checks an exact resume
needs before anything is built (:func:`check_resumable`), and data errors restated with the config key a user sets
(:func:`data_config_error`). Every failure here is a :class:`~mimfast.train.config.ConfigError` raised before anything
in ``out_dir`` changes.
"""

from __future__ import annotations

from pathlib import Path

from mimfast.data import DataError

from . import checkpoint as ckpt_mod
from .config import ConfigError, RunConfig, TrainConfig, config_to_dict, flatten_config_dict

__all__ = ["FREE_ON_RESUME", "check_resumable", "config_changes", "data_config_error", "plan"]

FREE_ON_RESUME = frozenset({
    "train.resume", "train.out_dir", "train.max_steps", "train.log_every", "train.progress", "train.ckpt_every",
    "train.keep_last", "train.tensorboard", "train.nan_policy", "train.max_consecutive_skips", "data.num_threads",
    "data.prefetch",
})  # fmt: skip
"""Keys a resumed run may change without a warning: they do not change what the remaining steps compute."""

# what the loader's batches depend on (its fingerprint, minus root / threads / prefetch): exact resume needs them equal
_DATA_ORDER_KEYS = ("train.batch_size",) + tuple(f"data.{k}" for k in (
    "format", "img_size", "tokenizer_size", "scale", "ratio", "interp", "tokenizer_interp", "hflip", "mean", "std",
    "crop_pct", "seed", "decode", "shuffle_buffer"))  # fmt: skip


def plan(train: TrainConfig, out: Path) -> ckpt_mod.ResumePlan:
    """Rank 0's decision (nothing on disk changes here; stale ``*.tmp`` files aside): a fresh run refuses an
    ``out_dir`` that holds checkpoints; otherwise :func:`~mimfast.train.checkpoint.plan_resume`."""
    try:
        ckpt_mod.remove_stale_tmp(out)  # left by a writer killed mid-write; never a checkpoint
        if train.resume is None:
            existing = ckpt_mod.list_checkpoints(out)
            if existing:
                raise ConfigError(
                    f"train.out_dir={train.out_dir!r} already holds checkpoints (newest {existing[0].name}); "
                    "resume with train.resume=auto, or choose a new train.out_dir"
                )
        return ckpt_mod.plan_resume(train.resume, out)
    except ckpt_mod.CheckpointError as e:
        raise ConfigError(f"train.resume={train.resume!r}: {e}") from None


def check_resumable(ckpt: dict, cfg: RunConfig, world_size: int) -> None:
    """Before the loader is built: the settings an exact resume cannot change, named by their config keys."""
    saved = flatten_config_dict(ckpt["config"])
    now = flatten_config_dict(config_to_dict(cfg))
    changed = [
        f"{k} ({saved[k]!r} -> {now.get(k)!r})" for k in _DATA_ORDER_KEYS if k in saved and saved[k] != now.get(k)
    ]
    ranks = len(ckpt.get("loader") or [])
    if ranks != world_size:
        changed.append(f"world size ({ranks} -> {world_size})")
    if changed:
        raise ConfigError(
            f"train.resume: checkpoint {ckpt['path']} cannot be continued exactly with a different "
            f"{', '.join(changed)}: the data order and the batches depend on them. Resume with the values it was "
            "written with, or start a new run in another train.out_dir"
        )


def config_changes(ckpt: dict, cfg: RunConfig) -> list[str]:
    """``"key: saved -> now"`` for every setting that differs from the checkpoint's, beyond :data:`FREE_ON_RESUME`."""
    saved = flatten_config_dict(ckpt["config"])
    now = flatten_config_dict(config_to_dict(cfg))
    keys = sorted(k for k in now if k not in FREE_ON_RESUME and k in saved and saved[k] != now[k])
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in keys]


def data_config_error(e: DataError, cfg: RunConfig, resumed_from: str | None) -> ConfigError:
    """A :class:`~mimfast.data.DataError` from building the loader, restated with the config key the user sets."""
    msg = str(e)
    for prefix in ("DataConfig.root: ", "state: "):
        msg = msg.removeprefix(prefix)
    d = cfg.data
    if e.key == "state":
        return ConfigError(f"train.resume: checkpoint {resumed_from} cannot continue on this data: {msg}")
    if e.key == "batch_size":
        return ConfigError(f"train.batch_size={cfg.train.batch_size}: {msg}")
    if e.key == "format":
        return ConfigError(f"data.format={d.format!r} (data.root={d.root!r}): {msg}")
    return ConfigError(f"data.root={d.root!r}: {msg}")

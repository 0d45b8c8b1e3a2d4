"""Atomic, self-validating training checkpoints, and finding the newest good one to resume from.

A checkpoint is one file ``out_dir/ckpt_<step:08d>.pt`` (``torch.save`` zip format) holding::

    format      "mimfast.train/1"           marks a mimfast training checkpoint
    step        optimizer steps done         (also in the file name)
    model       unwrapped, full state_dict   (FSDP2: gathered full on rank 0, on the CPU)
    optimizer   full optimizer state_dict keyed by parameter name (torch.distributed.checkpoint.state_dict)
    scaler      GradScaler state or None
    train       step / schedule / epoch counters and the skipped-step count
    rng         per rank: python random, numpy, torch CPU, and that rank's CUDA generator
    loader      per rank: the data loader's state_dict (pickled into a uint8 tensor, see below)
    config      dataclasses.asdict of the run config
    complete    True, written last

Writes are atomic: the bytes go to ``<name>.tmp`` in the same directory, are flushed and fsync'ed, the file is
``os.replace``d onto its final name and the directory is fsync'ed; then the ``latest`` pointer file is replaced the
same way. A crash at any point leaves either the previous checkpoints untouched plus a stray ``*.tmp`` (ignored, and
removed at the next start) or the new complete file. Readers never trust a name alone: :func:`load_checkpoint`
rejects anything that does not load or lacks the required keys, and ``resume=auto`` falls back to the next newest.

Files load with ``torch.load(weights_only=True)`` (no arbitrary code at load time): everything is tensors and plain
Python values, except the loader states, whose contents mimfast.data owns; they are pickled into byte tensors and
unpickled only when a run resumes from its own checkpoint (:func:`decode_object`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "CheckpointError",
    "atomic_save",
    "atomic_save_json",
    "atomic_write_text",
    "capture_rng_state",
    "checkpoint_path",
    "decode_object",
    "encode_object",
    "find_resume_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_stale_tmp",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT = "mimfast.train/1"
REQUIRED = ("format", "step", "model", "config", "complete")
LATEST = "latest"
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")

_serialize = torch.save  # the writer; tests replace it to simulate a crash mid-write


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a mimfast training checkpoint."""


# --------------------------------------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Call ``write(fileobj)`` on ``path.tmp``, make it durable, then atomically rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically (see the module docstring)."""
    path = Path(path)
    _atomic_write(path, lambda f: _serialize(obj, f))
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace the text file ``path`` atomically."""
    path = Path(path)
    _atomic_write(path, lambda f: f.write(text.encode()))
    return path


def atomic_save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:08d}.pt"


def save_checkpoint(out_dir: str | os.PathLike, state: dict, *, keep_last: int = 2) -> Path:
    """Write ``state`` (must hold ``step``) as ``out_dir/ckpt_<step>.pt`` atomically, point ``latest`` at it, then
    delete all but the ``keep_last`` newest checkpoints. Call on one rank only (rank 0)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, **state, "complete": True}
    path = atomic_save(state, checkpoint_path(out, int(state["step"])))
    _atomic_write(out / LATEST, lambda f: f.write((path.name + "\n").encode()))
    for old in list_checkpoints(out)[keep_last:]:
        with contextlib.suppress(OSError):
            old.unlink()
    return path


def remove_stale_tmp(out_dir: str | os.PathLike) -> list[Path]:
    """Delete ``*.tmp`` files left by a writer that died mid-write; returns what was removed."""
    out = Path(out_dir)
    gone = []
    if out.is_dir():
        for p in out.glob("*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()
                gone.append(p)
    return gone


# ------------------------------------------------------------------------------------------------------ reading
def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """``ckpt_<step>.pt`` files in ``out_dir``, newest (highest step) first; ``*.tmp`` files are never listed."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found, key=lambda sp: sp[0], reverse=True)]


def _load_file(path: Path, map_location, mmap: bool) -> dict:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, bad pickle, permissions...: all mean "not a usable checkpoint"
        raise CheckpointError(f"checkpoint {str(path)!r} does not load ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a mimfast.train checkpoint (format {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing or ckpt.get("complete") is not True:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete (missing {missing or ['complete']})")
    return ckpt


def load_checkpoint(path_or_out_dir: str | os.PathLike, *, map_location="cpu", mmap: bool = False) -> dict:
    """Load a training checkpoint: a ``ckpt_*.pt`` file, or a run directory (its newest valid checkpoint; invalid
    ones are skipped with a warning).

    Returns the checkpoint dict; at least ``model`` (the unwrapped model's full ``state_dict``), ``config``
    (``dataclasses.asdict`` of the :class:`~mimfast.train.RunConfig`; rebuild it with ``config_from_dict``), ``step``,
    plus ``optimizer``, ``scaler``, ``train``, ``rng``, ``loader`` and ``path`` (the file it came from).
    Raises :class:`CheckpointError` when nothing valid is found.
    """
    p = Path(path_or_out_dir)
    if p.is_dir():
        for cand in list_checkpoints(p):
            try:
                ckpt = _load_file(cand, map_location, mmap)
            except CheckpointError as e:
                warnings.warn(f"skipping invalid checkpoint: {e}", stacklevel=2)
                continue
            ckpt["path"] = str(cand)
            return ckpt
        raise CheckpointError(f"no valid checkpoint (ckpt_<step>.pt) in {str(p)!r}")
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r}: no such file or directory")
    ckpt = _load_file(p, map_location, mmap)
    ckpt["path"] = str(p)
    return ckpt


def find_resume_checkpoint(resume: str | None, out_dir: str | os.PathLike, *, quarantine: bool = False) -> Path | None:
    """The checkpoint file a run should resume from.

    ``resume=None``: None. ``"auto"``: the newest checkpoint in ``out_dir`` that loads and validates (broken ones are
    skipped with a warning), or None when there is none. A file or directory path: that checkpoint (a directory's
    newest valid one), or :class:`CheckpointError`. With ``quarantine`` (what the training loop passes), a broken
    file skipped by ``auto`` is renamed to ``<name>.invalid`` so that it can never shadow the run's newer checkpoints
    or be counted by ``keep_last``; nothing is deleted.
    """
    if resume is None:
        return None
    if resume == "auto":
        for cand in list_checkpoints(out_dir):
            try:
                _load_file(cand, "cpu", mmap=True)
            except CheckpointError as e:
                note = ""
                if quarantine:
                    with contextlib.suppress(OSError):
                        os.replace(cand, cand.with_name(cand.name + ".invalid"))
                        note = f" (renamed to {cand.name}.invalid)"
                warnings.warn(f"resume=auto: skipping invalid checkpoint: {e}{note}", stacklevel=2)
                continue
            return cand
        return None
    return Path(load_checkpoint(resume, mmap=True)["path"])


# ----------------------------------------------------------------------------------------------------- payloads
def encode_object(obj: Any) -> torch.Tensor:
    """Pickle ``obj`` into a uint8 tensor, so that the checkpoint itself still loads with ``weights_only=True``."""
    buf = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).clone()


def decode_object(t: torch.Tensor) -> Any:
    """Inverse of :func:`encode_object`. Unpickling runs code: use it on your own run's checkpoints only."""
    return pickle.loads(t.contiguous().numpy().tobytes())


def capture_rng_state(device: torch.device) -> dict:
    """Every generator the run draws from: python ``random``, numpy's global, torch CPU, and ``device``'s CUDA."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Inverse of :func:`capture_rng_state` (on the same kind of device)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        if state.get("cuda") is None:
            raise CheckpointError("checkpoint has no CUDA RNG state (written on the CPU): no exact resume on CUDA")
        torch.cuda.set_rng_state(state["cuda"], device)

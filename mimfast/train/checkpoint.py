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

Timelines. The checkpoints at the top level of ``out_dir`` are always one timeline: every reader (``resume=auto``,
:func:`load_checkpoint` on a directory, ``mimfast probe`` / ``reconstruct``) takes the newest valid one by step,
which is also what ``latest`` names (a reader warns when the two disagree). A run that resumes from an explicit, older
checkpoint (a rollback) first moves the checkpoints of the timeline it abandons (those newer than its source, or all
of them when the source lies in another directory) into ``out_dir/abandoned/<time>-from-step-<S>/`` together with
their metrics (:func:`set_aside`); nothing is deleted and nothing newer can shadow the continued run. Pruning
(``keep_last``) only ever deletes checkpoints *older* than the one just written, and never a protected one (the
run's resume source).

Files load with ``torch.load(weights_only=True)`` (no arbitrary code at load time): everything is tensors and plain
Python values, except the loader states, whose contents mimfast.data owns; they are pickled into byte tensors and
unpickled only when a run resumes from its own checkpoint (:func:`decode_object`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "CheckpointError",
    "ResumePlan",
    "atomic_save",
    "atomic_save_json",
    "atomic_write_text",
    "capture_rng_state",
    "checkpoint_path",
    "checkpoint_step",
    "decode_object",
    "describe_state_mismatch",
    "encode_object",
    "find_resume_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_state",
    "plan_resume",
    "remove_stale_tmp",
    "restore_rng_state",
    "save_checkpoint",
    "set_aside",
]

FORMAT = "mimfast.train/1"
REQUIRED = ("format", "step", "model", "config", "complete")
LATEST = "latest"
ABANDONED = "abandoned"
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


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step in a ``ckpt_<step>.pt`` file name."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{str(path)!r} is not named ckpt_<step>.pt")
    return int(m.group(1))


def save_checkpoint(
    out_dir: str | os.PathLike, state: dict, *, keep_last: int = 2, protect: tuple[str | os.PathLike, ...] = ()
) -> Path:
    """Write ``state`` (must hold ``step``) as ``out_dir/ckpt_<step>.pt`` atomically, point ``latest`` at it, then
    prune: of the checkpoints *older* than this one, all but the ``keep_last - 1`` newest are deleted, except those
    in ``protect`` (the run's resume source). Checkpoints newer than this one are never touched (they belong to another
    timeline: the loop moves them aside with :func:`set_aside` before it writes). Call on one rank only (rank 0)."""
    if not (isinstance(keep_last, int) and keep_last >= 1):
        raise ValueError(f"keep_last: expected an int >= 1, got {keep_last!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, **state, "complete": True}
    step = int(state["step"])
    path = atomic_save(state, checkpoint_path(out, step))
    _atomic_write(out / LATEST, lambda f: f.write((path.name + "\n").encode()))
    keep = {Path(p).resolve() for p in protect}
    older = [p for p in list_checkpoints(out) if checkpoint_step(p) < step]
    for old in older[keep_last - 1 :]:
        if old.resolve() not in keep:
            with contextlib.suppress(OSError):
                old.unlink()
    return path


def set_aside(out_dir: str | os.PathLike, paths: list[Path], *, from_step: int, why: str,
              metrics: list[str] = ()) -> Path | None:  # fmt: skip
    """Move ``paths`` (checkpoints of an abandoned timeline) and the ``metrics`` lines they logged into a new
    ``out_dir/abandoned/<UTC time>-from-step-<from_step>/`` with a ``WHY.txt``; returns that directory (None when
    there is nothing to move). Nothing is deleted; readers never look below the top level of ``out_dir``."""
    if not paths and not metrics:
        return None
    base = Path(out_dir) / ABANDONED
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = base / f"{stamp}-from-step-{from_step}"
    n = 1
    while dest.exists():
        n += 1
        dest = base / f"{stamp}-from-step-{from_step}-{n}"
    dest.mkdir(parents=True)
    atomic_write_text(dest / "WHY.txt", why.rstrip() + "\n")
    if metrics:
        atomic_write_text(dest / "metrics.jsonl", "".join(line.rstrip("\n") + "\n" for line in metrics))
    for p in paths:
        os.replace(p, dest / p.name)
    _fsync_dir(dest)
    _fsync_dir(Path(out_dir))
    return dest


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


def _newest_valid(out: Path, map_location, mmap: bool) -> tuple[dict | None, list[tuple[Path, str]]]:
    """The newest checkpoint of ``out`` that loads (or None) and the newer ones that do not, with the reason."""
    skipped = []
    for cand in list_checkpoints(out):
        try:
            ckpt = _load_file(cand, map_location, mmap)
        except CheckpointError as e:
            skipped.append((cand, str(e)))
            continue
        ckpt["path"] = str(cand)
        return ckpt, skipped
    return None, skipped


def _check_latest_pointer(out: Path, chosen: Path) -> None:
    """Warn when ``latest`` names another checkpoint than the readers' choice (the newest valid one)."""
    try:
        named = (out / LATEST).read_text().strip()
    except OSError:
        return
    if named and named != chosen.name:
        warnings.warn(
            f"{str(out / LATEST)!r} names {named} but the newest valid checkpoint is {chosen.name}; using "
            f"{chosen.name} (a run that stopped between writing a checkpoint and updating 'latest', or files moved "
            "by hand)",
            stacklevel=3,
        )


def load_checkpoint(path_or_out_dir: str | os.PathLike, *, map_location="cpu", mmap: bool = False) -> dict:
    """Load a training checkpoint: a ``ckpt_*.pt`` file, or a run directory (its newest valid checkpoint, what every
    reader means by "latest"; invalid ones are skipped with a warning).

    Returns the checkpoint dict; at least ``model`` (the unwrapped model's full ``state_dict``), ``config``
    (``dataclasses.asdict`` of the :class:`~mimfast.train.RunConfig`; rebuild it with ``config_from_dict``), ``step``,
    plus ``optimizer``, ``scaler``, ``train``, ``rng``, ``loader`` and ``path`` (the file it came from).
    Raises :class:`CheckpointError` when nothing valid is found.
    """
    p = Path(path_or_out_dir)
    if p.is_dir():
        ckpt, skipped = _newest_valid(p, map_location, mmap)
        for _, why in skipped:
            warnings.warn(f"skipping invalid checkpoint: {why}", stacklevel=2)
        if ckpt is None:
            detail = "".join(f"; {why}" for _, why in skipped)
            raise CheckpointError(f"no valid checkpoint (ckpt_<step>.pt) in {str(p)!r}{detail}")
        _check_latest_pointer(p, Path(ckpt["path"]))
        return ckpt
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r}: no such file or directory")
    ckpt = _load_file(p, map_location, mmap)
    ckpt["path"] = str(p)
    return ckpt


@dataclasses.dataclass
class ResumePlan:
    """Where a run starts (:func:`plan_resume`); nothing on disk has changed yet."""

    path: Path | None
    """The checkpoint to resume from; None = start fresh."""
    step: int = 0
    """Its step (0 when fresh)."""
    set_aside: list[Path] = dataclasses.field(default_factory=list)
    """Checkpoints in ``out_dir`` not on the continued timeline (newer than ``path``, invalid ones skipped by
    ``auto``, or all of them when ``path`` lies in another directory): moved to ``out_dir/abandoned/`` at start."""
    why: str = ""
    """Why they are set aside (written to ``WHY.txt`` and printed)."""


def plan_resume(resume: str | None, out_dir: str | os.PathLike) -> ResumePlan:
    """Decide where a run starts, without touching any file.

    ``resume=None``: fresh (the loop refuses an ``out_dir`` that already holds checkpoints). ``"auto"``: the newest
    valid checkpoint of ``out_dir``, fresh when ``out_dir`` holds no checkpoint at all, and :class:`CheckpointError`
    when it holds checkpoints none of which loads (never a silent restart from step 0); newer files that do not load
    are set aside. A file or directory path: that checkpoint (a directory's newest valid one), with every checkpoint of
    ``out_dir`` that is newer than it (or every one, when it lies in another directory) set aside: a rollback keeps
    the abandoned timeline, out of the readers' way.
    """
    out = Path(out_dir)
    if resume is None:
        return ResumePlan(None)
    existing = list_checkpoints(out)
    if resume == "auto":
        ckpt, skipped = _newest_valid(out, "cpu", True)
        if ckpt is None:
            if not existing:
                return ResumePlan(None)
            detail = "; ".join(why for _, why in skipped)
            raise CheckpointError(
                f"resume=auto: {str(out)!r} holds {len(existing)} checkpoint(s) but none loads, so the run would start "
                f"over from step 0; nothing was changed. {detail}. If a filesystem error is the cause, retry; to "
                "resume from a particular file pass its path; to really start over, move the checkpoints away or "
                "choose a new train.out_dir"
            )
        path = Path(ckpt["path"])
        for _, w in skipped:
            warnings.warn(f"resume=auto: skipping invalid checkpoint: {w} (moved to {ABANDONED}/ at start)",
                          stacklevel=2)  # fmt: skip
        _check_latest_pointer(out, path)
        why = "".join(f"resume=auto skipped this invalid checkpoint: {w}\n" for _, w in skipped)
        return ResumePlan(path, int(ckpt["step"]), [p for p, _ in skipped], why)
    ckpt = load_checkpoint(resume, mmap=True)
    path = Path(ckpt["path"])
    step = int(ckpt["step"])
    same_dir = out.is_dir() and path.parent.resolve() == out.resolve()
    if same_dir:
        aside = [p for p in existing if checkpoint_step(p) > step]
        why = (f"train.resume={resume!r} rolled the run in {str(out)!r} back to step {step}; these checkpoints "
               f"are newer than that and belong to the timeline it abandoned.")  # fmt: skip
    else:
        aside = [p for p in existing if p.resolve() != path.resolve()]
        why = (f"train.resume={resume!r} continues from {str(path)!r} (another directory) in {str(out)!r}; "
               "the checkpoints that were here belong to another timeline.")  # fmt: skip
    return ResumePlan(path, step, aside, why if aside else "")


def find_resume_checkpoint(resume: str | None, out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a run would resume from (:func:`plan_resume`'s ``path``); nothing on disk changes."""
    return plan_resume(resume, out_dir).path


def describe_state_mismatch(model: torch.nn.Module, state: dict, limit: int = 3) -> str | None:
    """None when ``state`` fits ``model.load_state_dict`` exactly, else a one-line summary of what differs."""
    mine = model.state_dict()
    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in mine.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]  # fmt: skip
    parts = []
    kinds = (("missing", missing), ("unexpected", unexpected), ("shape mismatches (saved vs model)", shapes))
    for what, items in kinds:
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > limit else ""
            parts.append(f"{what}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts) or None


def load_model_state(model: torch.nn.Module, state: dict, *, source: str) -> None:
    """``model.load_state_dict(state)`` with a one-line :class:`CheckpointError` naming ``source`` when the weights
    do not fit the architecture (instead of torch's multi-line RuntimeError)."""
    problem = describe_state_mismatch(model, state)
    if problem is None:
        try:
            model.load_state_dict(state)
            return
        except RuntimeError as e:  # dtype / other load-time failures
            problem = " ".join(str(e).split())
    raise CheckpointError(f"{source}: its weights do not fit this model ({problem})")


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

"""Process-group setup, data-parallel wrapping (DDP / FSDP2) and the few collectives the loop needs.

A single process needs no process group: every helper here degrades to the identity when ``world_size == 1``.
Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in the environment)
:func:`init_distributed` joins the group with NCCL on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "DistInfo",
    "all_gather_object",
    "all_reduce_min",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "grad_sync",
    "init_distributed",
    "unwrap",
    "wrap_model",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank, its device and the collective backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False
    """True when :func:`init_distributed` created the process group (and :func:`cleanup_distributed` ends it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an int, got {raw!r}") from None


def init_distributed(device: str = "auto", *, timeout_s: float = 1800.0) -> DistInfo:
    """Read torchrun's environment, pick this rank's device and join the process group when ``WORLD_SIZE > 1``.

    ``device``: ``auto`` (CUDA when available), ``cuda`` or ``cpu``. On CUDA each rank uses GPU ``LOCAL_RANK`` and
    NCCL; on the CPU, gloo. An already initialised default group is reused (the caller then owns its teardown).
    """
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if not (0 <= rank < world):
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda: torch.cuda.is_available() is False on this machine")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    backend, owns = None, False
    if world > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            owns = True
            kwargs = {"device_id": dev} if use_cuda else {}
            dist.init_process_group(
                backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs
            )
        elif dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError("a process group is already initialised with a different rank / world size")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend, owns_group=owns)


def cleanup_distributed(info: DistInfo) -> None:
    """Leave the process group joined by :func:`init_distributed` (no-op in a single process)."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------- wrapping
def _block_lists(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (``blocks``, ``decoder_blocks``...): FSDP2 / compile units."""
    found = []
    for name in ("blocks", "decoder_blocks"):
        mods = getattr(model, name, None)
        if isinstance(mods, (nn.ModuleList, nn.Sequential)):
            found.extend(mods)
    return found


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` every transformer block in place (``Module.compile``: parameter names are unchanged, so
    checkpoints stay portable); a model without block lists is compiled whole, also in place."""
    blocks = _block_lists(model)
    for blk in blocks:
        blk.compile()
    if not blocks:
        model.compile()


def wrap_model(model: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """DDP or FSDP2 around ``model`` (already on ``info.device``); the model itself when ``world_size == 1``.

    FSDP2 shards each transformer block, then the root (torchtitan's layout), with fp32 parameters (autocast does the
    bf16 compute). It runs on CUDA/NCCL and, in this torch, also on CPU/gloo.
    """
    if not info.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if mode == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as e:  # pragma: no cover - torch < 2.6
            raise RuntimeError(f"train.dist=fsdp2 needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {e}") from e
        for blk in _block_lists(model):
            fully_shard(blk)
        fully_shard(model)
        return model
    raise ValueError(f"train.dist: expected 'ddp' or 'fsdp2', got {mode!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 shards in place, so it is its own unwrapped module)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient all-reduce on (``enabled``) or deferred, for accumulation micro-steps before the last one.

    DDP: ``no_sync()``. FSDP2: ``set_requires_gradient_sync(False)`` (reduce-scatter deferred, unsharded gradients
    accumulate). Single process: nothing to defer.
    """
    if enabled:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        yield
    else:
        yield


# -------------------------------------------------------------------------------------------------- collectives
def all_reduce_min(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place MIN over ranks (every rank gets the same value)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place SUM over ranks (gloo has no AVG: divide by world_size yourself)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled; small objects only)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed:
        dist.barrier()

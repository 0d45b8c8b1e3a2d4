"""Shared test configuration: interpreter switch, the per-dtype tolerance table, the awkward-shape sweep.

Without a CUDA device every Triton kernel runs on CPU tensors through the Triton interpreter, so CI executes every
kernel line. ``TRITON_INTERPRET`` must be set before triton decorates any kernel, hence here, before any mimfast
import. The same tests run unchanged on a GPU (``DEVICE`` becomes "cuda", the interpreter stays off).
"""

from __future__ import annotations

import itertools
import math
import os

import torch  # noqa: E402  (torch itself never reads TRITON_INTERPRET)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["MIMFAST_POISON_OUTPUTS"] = "1"  # launchers poison their outputs before the kernels write them

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# One tolerance table for the whole suite: elementwise results of an op computed in `dtype` against a float64
# reference of the same (dtype-rounded) inputs. rtol is about two ulps of the dtype; atol is the rounding floor.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2.5e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
}


def tol(dtype: torch.dtype) -> dict:
    return TOL[dtype]


# ------------------------------------------------------------------------------------------------ shape sweeps
AWKWARD = dict(N=(1, 97, 1025), K=(1, 3, 1000, 8193), D=(1, 3, 40, 257))


def awkward_sweep(values: dict = AWKWARD, *, budget: float = 2.0e6, always: tuple = ()) -> list[tuple[int, ...]]:
    """Shapes for a sweep: the full cross product of ``values`` whose size (product of dims) is <= ``budget``, plus
    for every value that the budget dropped, the cheapest shape containing it (so every awkward size is exercised),
    plus the shapes in ``always``. Deterministic order. Interpreter time grows with the product, hence the budget.
    """
    names = list(values)
    full = list(itertools.product(*(values[n] for n in names)))
    chosen = [s for s in full if math.prod(s) <= budget]
    for i in range(len(names)):
        for v in values[names[i]]:
            if not any(s[i] == v for s in chosen):
                chosen.append(min((s for s in full if s[i] == v), key=math.prod))
    for s in always:
        if s not in chosen:
            chosen.append(tuple(s))
    return chosen


def shape_id(shape) -> str:
    return "x".join(str(s) for s in shape)


@pytest.fixture
def device() -> str:
    return DEVICE


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_spawned_ranks(target, args_of_rank, tmp_path, world: int = 2, timeout: float = 240) -> None:
    """Start ``target(*args_of_rank(r))`` for ranks 0..world-1 in spawned processes and wait for all of them.

    Fails the test if a rank does not exit with status 0, showing ``tmp_path/error<r>.txt`` (where workers write
    their traceback) when present. A rank still running after ``timeout`` seconds is killed.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of_rank(r)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
        err = tmp_path / f"error{r}.txt"
        assert p.exitcode == 0, f"rank {r} exit {p.exitcode}\n" + (err.read_text() if err.exists() else "")

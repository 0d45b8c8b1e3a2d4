"""Shared plumbing for mimfast's Triton ops: backend selection, input checks, launch heuristics.

Depends on torch (and triton when importable) only, never on the rest of mimfast.

Backend rule, the same for every op:

* CUDA tensors run the Triton kernel.
* CPU tensors run the registered CPU kernel, which is the op's plain-PyTorch reference, unless the Triton interpreter
  is on (``TRITON_INTERPRET=1`` in the environment *before* triton is imported): then the same Triton kernel runs on
  the CPU tensors through the interpreter. That is how the test-suite executes every kernel line without a GPU.
* float64 inputs always take the reference (it is the oracle; Triton kernels cover fp32 / bf16 / fp16).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

try:  # triton is a hard dependency on Linux, but mimfast must still import (reference paths only) where it is absent
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on platforms without a triton wheel
    triton = None
    tl = None
    HAS_TRITON = False

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def interpret_mode() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def poison_outputs() -> bool:
    """Test hook (``MIMFAST_POISON_OUTPUTS=1``): launchers fill output buffers with NaN / -12345 before a kernel
    writes them, so a kernel that skips an element fails its test instead of passing on leftover memory."""
    return os.environ.get("MIMFAST_POISON_OUTPUTS", "0") == "1"


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs, poisoned under the test hook."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs():
        t.fill_(float("nan") if t.is_floating_point() else -12345)
    return t


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op over ``tensors`` should launch its Triton kernel (see the module docstring)."""
    if not HAS_TRITON:
        return False
    if any(t.dtype == torch.float64 for t in tensors):
        return False
    dev = tensors[0].device.type
    return dev == "cuda" or (dev == "cpu" and interpret_mode())


def store_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Dtype a kernel should store an output of ``dtype`` in.

    The Triton interpreter converts fp32 to bf16 by truncation, whereas GPUs round to nearest even. Under the
    interpreter a bf16 result is therefore stored as fp32 and rounded by torch afterwards, which is what the GPU
    kernel's own ``.to(tl.bfloat16)`` gives.
    """
    return torch.float32 if dtype == torch.bfloat16 and device.type == "cpu" else dtype


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# ----------------------------------------------------------------------------------------------------- input checks
def check_tensor(name: str, t, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None) -> None:
    """Raise a clear TypeError / ValueError naming ``name`` when ``t`` is not a tensor of the expected rank / dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)} ({t.dim()}-D)")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise a ValueError naming every argument when the given tensors are not on one device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"expected all tensors on one device, got {where}")


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def fp32_dot_precision() -> str:
    """Triton ``input_precision`` for fp32 operands, following torch's own matmul setting.

    ``torch.get_float32_matmul_precision() == "highest"`` (torch's default) gives full-fp32 ("ieee") products, as
    ``x @ codebook.T`` would in eager mode; "high"/"medium" allow TF32 tensor cores, as they do for torch matmuls.
    """
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# ---------------------------------------------------------------------------------------------- launch heuristics
def vq_search_config(n: int, k: int, d: int, elem_bytes: int) -> dict:
    """Tile sizes for the fused codebook search (shape dims only).

    BLOCK_N rows of x stay resident while the kernel streams the codebook in BLOCK_K x BLOCK_D tiles; every tile
    dimension is >= 16 (tl.dot's minimum). Larger row tiles halve codebook re-reads; small N keeps 64 rows so that
    more programs exist to fill the SMs.
    """
    block_d = min(max(16, next_pow2(d)), 128 if elem_bytes == 2 else 64)
    block_k = min(128, max(16, next_pow2(k)))
    block_n = 128 if n >= 16384 else 64
    num_warps = 8 if block_n * block_k >= 128 * 128 else 4
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps, num_stages=3)


def token_rows_config(rows: int, d: int, interpret: bool = False, loop: bool = False) -> dict:
    """Tile sizes for the token gather / restore kernels (shape dims only).

    A program copies a BLOCK_L x BLOCK_D tile of rows (``loop``: walks all rows of one sample in BLOCK_L steps).
    BLOCK_D covers up to 256 features (a 512 B bf16 row segment) so loads stay wide and coalesced. The interpreter
    costs per program, not per element, so it gets the largest tiles.
    """
    if interpret:
        return dict(BLOCK_L=min(64, next_pow2(rows)), BLOCK_D=min(1024, next_pow2(d)), num_warps=4)
    block_d = min(256, next_pow2(d))
    block_l = 32 if loop else max(1, min(16, next_pow2(rows)))
    return dict(BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4)

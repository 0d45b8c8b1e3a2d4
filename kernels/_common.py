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

import contextlib
import dataclasses
import functools
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


@functools.cache
def check_interpreter_versions() -> None:
    """Raise a clear error for the one known-broken pair: the interpreter of triton <= 3.6 under NumPy >= 2.4 fails
    on ``range`` over a kernel argument (setup.py's [dev] extra asks for triton >= 3.7 for that reason)."""
    import numpy

    def major_minor(v: str) -> tuple[int, int]:
        parts = (v.split("+")[0].split(".") + ["0"])[:2]
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)

    if major_minor(triton.__version__) <= (3, 6) and major_minor(numpy.__version__) >= (2, 4):
        raise RuntimeError(
            f"TRITON_INTERPRET=1 with triton {triton.__version__} and NumPy {numpy.__version__}: the interpreter of "
            "triton <= 3.6 fails under NumPy >= 2.4. Install triton >= 3.7 (pip install -e '.[dev]') or NumPy < 2.4."
        )


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op over ``tensors`` should launch its Triton kernel (see the module docstring)."""
    if not HAS_TRITON:
        return False
    if any(t.dtype == torch.float64 for t in tensors):
        return False
    dev = tensors[0].device.type
    if dev == "cpu" and interpret_mode():
        check_interpreter_versions()
        return True
    return dev == "cuda"


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


# --------------------------------------------------------------------------------------------- device and target
def device_guard(device: torch.device | str):
    """Context that makes ``device`` current for a launch when it is a CUDA device.

    Triton launches on the *current* CUDA device and its current stream; tensors on ``cuda:1`` while ``cuda:0`` is
    current would otherwise be read through the wrong device's context. Non-CUDA devices need no guard.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


@dataclasses.dataclass(frozen=True)
class LaunchTarget:
    """What launch heuristics need to know about the GPU: SM count, the per-CTA shared-memory limit (opt-in
    maximum), compute capability (major * 10 + minor)."""

    num_sms: int
    smem_per_cta: int
    capability: int


# The interpreter (and CPU) plans launches as on an H100 / H200 (132 SMs, 227 KB of shared memory per CTA), so the
# test-suite runs the same tile and split decisions as the GPU the benchmarks target.
DEFAULT_TARGET = LaunchTarget(num_sms=132, smem_per_cta=232448, capability=90)
_target_override: LaunchTarget | None = None


def set_launch_target(target: LaunchTarget | None) -> LaunchTarget | None:
    """Plan every launch for ``target`` instead of the tensors' device (the compile gate's hook); returns the
    previous override. ``None`` restores the default behaviour."""
    global _target_override
    prev, _target_override = _target_override, target
    return prev


@functools.cache
def _cuda_target(index: int) -> LaunchTarget:
    p = torch.cuda.get_device_properties(index)
    cap = p.major * 10 + p.minor
    smem = getattr(p, "shared_memory_per_block_optin", 0) or {90: 232448, 80: 166912, 87: 166912}.get(cap, 101376)
    return LaunchTarget(num_sms=p.multi_processor_count, smem_per_cta=int(smem), capability=cap)


def launch_target(device: torch.device) -> LaunchTarget:
    """The GPU a launch on ``device`` is planned for (see :class:`LaunchTarget`)."""
    if _target_override is not None:
        return _target_override
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_TARGET


# ---------------------------------------------------------------------------------------------- launch heuristics
VQ_MAX_RESIDENT_D = 256  # x stays resident (one dot per codebook tile) up to this padded feature size
VQ_SPLIT_MIN_CODES = 512  # a split-K program scans at least this many codes
VQ_SPLIT_K_ALIGN = 128  # codes per split are a multiple of every candidate BLOCK_K


def vq_search_plan(
    n: int, k: int, d: int, compute_bytes: int, fma: bool, target: LaunchTarget, interpret: bool = False
) -> dict:
    """Launch plan of the fused codebook search (shape dims and the target only).

    * ``D_PAD = next_pow2(D)``; up to 256 (tensor cores) or 32 (the CUDA-core "ieee" path, whose operands live in
      registers) the row tile of x is loaded once and stays resident while the codebook streams past it in
      BLOCK_K x D_PAD tiles, one tl.dot per tile; beyond, the dot walks D in BLOCK_D chunks.
    * BLOCK_N rows per program: 128 (two warpgroups of 64 rows) on tensor cores, 64 on the CUDA-core path.
    * Split over K: when the row tiles alone give fewer than two CTAs per SM, each row tile's codebook scan is
      split into up to ``ceil(2 * SMs / row_tiles)`` contiguous code ranges (each >= 512 codes, a multiple of 128)
      and a merge pass keeps the lowest index among equal minima.
    * ``candidates``: (BLOCK_K, num_warps, num_stages) choices that fit the target's shared memory and compile
      without spills (the compile gate checks every one); the first is the heuristic's pick, and ``triton.autotune``
      times the rest on the GPU. BLOCK_K = 32 keeps the running (best, index) pairs in ~100 registers, so two CTAs
      share an SM and one's epilogue overlaps the other's MMAs (short rows: epilogue-bound); rows of 256 bytes or
      more (bf16 D >= 128, fp32 D >= 64) are MMA-bound and prefer BLOCK_K = 64 (fewer re-reads of the resident x
      tile per code).
    * Targets with ~99 KB of shared memory per CTA (sm_86 / sm_89) get 64-row tiles at D = 256 (fp32: D >= 128).
    * The interpreter (``interpret``) makes the same residency and split decisions with wider D chunks (its cost is
      per tile step, not per element); its single autotune config has BLOCK_K = 128.
    """
    d_pad = max(16, next_pow2(d))
    if fma:
        resident = d_pad <= 32
        block_n, block_d = 64, (d_pad if resident else 16)
        cands = [(64, 4, 2), (32, 4, 2), (64, 8, 2)] if resident else [(64, 8, 2)]
    else:
        resident = d_pad <= VQ_MAX_RESIDENT_D
        block_n = 128
        block_d = d_pad if resident else (32 if compute_bytes == 2 else 16)
        small = [(32, 8, 3), (64, 8, 3), (16, 8, 3)]
        large = [(64, 8, 3), (32, 8, 3), (64, 8, 4)]
        cands = large if d_pad * compute_bytes >= 256 else small
        if target.smem_per_cta < 160 * 1024 and d_pad * compute_bytes >= 512:
            block_n = 64
            cands = [(bk, 4, st) for bk, _, st in cands]

    def smem(bk: int, stages: int) -> int:
        if resident:
            return (block_n * d_pad + stages * bk * d_pad) * compute_bytes
        return stages * (block_n + bk) * block_d * compute_bytes

    k_pow2 = max(16, next_pow2(k))
    kept = [(bk, w, st) for bk, w, st in cands if bk <= k_pow2 and smem(bk, st) <= target.smem_per_cta - 4096]
    if not kept:  # the smallest tile, shallow pipeline
        kept = [(16, 4 if block_n == 64 else 8, 2)]
    if interpret:
        block_n = min(block_n, max(16, next_pow2(n)))
        block_d = block_d if resident else 128
    row_tiles = -(-n // block_n)
    split = 1
    if row_tiles < 2 * target.num_sms:
        split = min(-(-2 * target.num_sms // row_tiles), max(1, k // VQ_SPLIT_MIN_CODES))
    k_per_split = -(-k // split)
    k_per_split = -(-k_per_split // VQ_SPLIT_K_ALIGN) * VQ_SPLIT_K_ALIGN
    split = -(-k // k_per_split)
    return dict(BLOCK_N=block_n, BLOCK_D=block_d, D_PAD=d_pad, RESIDENT=resident, split=split,
                k_per_split=k_per_split, candidates=kept)  # fmt: skip


def token_rows_config(rows: int, d: int, interpret: bool = False) -> dict:
    """Tile sizes for the token gather / restore kernels (shape dims only).

    A program copies a BLOCK_L x BLOCK_D tile of rows. BLOCK_D covers up to 256 features (a 512 B bf16 row
    segment) so loads stay wide and coalesced; 16 rows x 256 features over 4 warps keep 32 elements per thread in
    flight, and a (sample, row block, feature block) grid gives B * ceil(rows / 16) * ceil(D / 256) programs (384
    at the smallest benchmark batch, B = 32 with 50 rows of 768 features). The interpreter costs per program, not
    per element, so it gets the largest tiles.
    """
    if interpret:
        return dict(BLOCK_L=min(64, next_pow2(rows)), BLOCK_D=min(1024, next_pow2(d)), num_warps=4)
    block_d = min(256, next_pow2(d))
    block_l = max(1, min(16, next_pow2(rows)))
    return dict(BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4)


GUMBEL_MAX_SINGLE_K = 8192  # a row of up to this many codes (padded) is one tile, held in registers
GUMBEL_TILE_K = 2048  # codes per tile of a longer row (online max / sum over the tiles)
GUMBEL_TILE_ELEMS = 4096  # elements per program of the single-tile path (rows x codes)
GUMBEL_INTERP_TILE_K = 4096  # the interpreter's tile of a longer row


def gumbel_plan(n: int, k: int, target: LaunchTarget, interpret: bool = False) -> dict:
    """Launch plan of the fused Gumbel-softmax (shape dims and the target only).

    * Rows are independent, so a program owns BLOCK_N whole rows: ``SINGLE`` when ``next_pow2(K) <= 8192`` (the
      row tile stays in registers: one read of the logits, noise computed once per element, one write), otherwise
      the row is walked in 2048-code tiles twice (statistics, then the output; the noise is recomputed), one row
      per program over 4 warps.
    * BLOCK_N x BLOCK_K is about 4096 elements (16 per thread over 8 warps); K = 8192 gets one row over 16 warps.
      BLOCK_N halves while the grid would give fewer than two CTAs per SM (small N keeps the GPU busy).
    * BLOCK_K >= 4: one Philox call yields four lanes, for four consecutive codes.
    * The interpreter (``interpret``) makes the same SINGLE decision with larger tiles (its cost is per program).
    """
    k_pad = max(4, next_pow2(k))
    single = k_pad <= GUMBEL_MAX_SINGLE_K
    if interpret:
        block_k = k_pad if single else GUMBEL_INTERP_TILE_K
        block_n = max(1, min(max(1, 16384 // block_k), next_pow2(n)))
        return dict(SINGLE=single, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    if not single:  # one row per program: the two passes carry several per-row running values
        return dict(SINGLE=False, BLOCK_N=1, BLOCK_K=GUMBEL_TILE_K, num_warps=max(1, min(16, GUMBEL_TILE_K // 512)))
    block_k = k_pad
    block_n = max(1, min(GUMBEL_TILE_ELEMS // block_k, next_pow2(n)))
    while block_n > 1 and -(-n // block_n) < 2 * target.num_sms:
        block_n //= 2
    num_warps = max(1, min(16, block_n * block_k // 512))
    return dict(SINGLE=single, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)


LCE_MEM_FRACTION = 0.05  # PERF.md: extra memory < 5% of the M x V' fp32 logits
LCE_ACC32_FRACTION = 0.045  # the planned total when an fp32 grad-weight accumulator is kept (headroom to 5%)
LCE_CHUNK_FRACTION = 0.035  # the share of that budget the logits chunk may take (the rest: stats, cuBLAS, bias sums)
LCE_SMALL_BYTES = 4 << 20  # below this much extra memory the fraction does not bind (small problems, tests)
LCE_MAX_CHUNK_BYTES = 16 << 20  # a chunk stays L2-resident between the GEMM that writes it and the CE kernel
LCE_ROW_ALIGN = 128  # chunk rows are a multiple of a GEMM tile's rows
LCE_ACC32_MIN_ROWS = 512  # the fp32 grad-weight accumulator may shrink chunks down to this many rows, no further
LCE_MAX_SINGLE_V = 8192  # a row of up to this many (padded) classes is one register tile
LCE_TILE_V = 4096  # classes per tile of a longer row (online max / sum, then a second pass for the gradient)


def linear_cross_entropy_plan(m: int, d: int, v: int, elem: int, acc32_wanted: bool, interpret: bool = False) -> dict:
    """Chunk and launch plan of the fused linear + cross-entropy (shape dims only).

    Memory: the op never holds more than one ``chunk_rows x V'`` logits chunk (input dtype, overwritten in place with
    d loss / d logits), O(M) fp32 row statistics and, when ``acc32``, a ``V' x D`` fp32 grad-weight accumulator.

    * ``chunk_rows``: at most the largest multiple of 128 rows whose chunk takes at most 3.5% of the M x V' fp32
      logits (``LCE_CHUNK_FRACTION``; at least 4 MiB is always allowed, so small problems are one chunk) and at
      most 16 MiB (it stays in L2 between the GEMM that writes it and the kernel that reads it), at least 128; then
      M is split into that many chunks of equal height (a multiple of 8 rows): no short last chunk.
    * ``acc32``: grad weight accumulates over the chunks in fp32 when ``acc32_wanted`` (bf16 / fp16 weights that need
      a gradient) and the accumulator plus the chunk stay within 4.5% of the M x V' fp32 logits (PERF.md's 5% target,
      ``LCE_MEM_FRACTION``, less headroom), shrinking the chunk down to 512 rows if that makes it fit. Otherwise each
      chunk's ``G^T @ h`` is added into the grad-weight output by cuBLAS (fp32 inside one chunk's GEMM, one rounding
      to the weight dtype per chunk).
    * ``extra_bytes``: the planned extra memory (chunk + accumulator + 3 fp32 values per row + fp32 bias sums).
    * Kernel tiles: rows of up to 8192 (padded) classes are one register tile (``SINGLE``: one read of the chunk, one
      write of the gradient); longer rows take 4096-class tiles twice. ``BLOCK_M`` rows per program keep about 2048
      elements per program (32768 in the interpreter, whose cost is per program); ``num_warps`` gives 16 elements per
      thread.
    """
    v, m = max(1, v), max(1, m)
    logits32 = m * v * 4
    row_bytes = v * elem

    def rows_for(nbytes: float) -> int:
        return int(nbytes // row_bytes) // LCE_ROW_ALIGN * LCE_ROW_ALIGN

    chunk_cap = min(max(LCE_CHUNK_FRACTION * logits32, LCE_SMALL_BYTES), LCE_MAX_CHUNK_BYTES)
    rows = max(LCE_ROW_ALIGN, rows_for(chunk_cap))
    acc32 = False
    if acc32_wanted:
        room = max(LCE_ACC32_FRACTION * logits32, LCE_SMALL_BYTES) - v * d * 4 - 12 * m - 4 * v
        fit = min(rows, rows_for(room)) if room > 0 else 0
        if fit >= min(LCE_ACC32_MIN_ROWS, rows, -(-m // LCE_ROW_ALIGN) * LCE_ROW_ALIGN):
            acc32, rows = True, max(LCE_ROW_ALIGN, fit)
    chunks = -(-m // rows)
    rows = min(m, (-(-m // chunks) + 7) // 8 * 8)  # balanced chunks (no short tail), a multiple of 8 rows, <= the cap
    v_pad = next_pow2(v)
    single = v_pad <= LCE_MAX_SINGLE_V
    block_v = v_pad if single else LCE_TILE_V
    elems = 32768 if interpret else 2048
    block_m = max(1, min(elems // block_v, next_pow2(rows)))
    num_warps = max(1, min(16, block_m * block_v // 512))
    extra = rows * row_bytes + (v * d * 4 if acc32 else 0) + 12 * m + 4 * v
    return dict(chunk_rows=rows, acc32=acc32, extra_bytes=extra, SINGLE=single, BLOCK_M=block_m, BLOCK_V=block_v,
                num_warps=num_warps)  # fmt: skip

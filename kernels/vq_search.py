"""Fused codebook nearest-neighbour search: ``mimfast::vq_search``.

For each row x_n of x (N, D) find ``argmin_k d(x_n, e_k)`` over a codebook (K, D) with

    d(x, e) = ||x||^2 + ||e||^2 - 2 x.e                       (metric "l2")
    d(x, e) = ||x^||^2 + ||e^||^2 - 2 x^.e^,  v^ = v / max(||v||, eps)   (metric "cosine", = 2 - 2 cos for non-zero v)

without ever materialising the N x K distance matrix: a program keeps a tile of BLOCK_N rows of x resident (D up to
256; wider D walks the features in chunks) while the codebook streams past in BLOCK_K-code tiles, one tl.dot per
tile. Every (row, lane) of the tile keeps a running (best score, best tile) pair across the codebook tiles, updated
with a strict ``<`` as k increases, and the row's winner is found by one cross-lane reduction at the end. When the
row tiles alone cannot fill the GPU, the codebook scan is split into contiguous code ranges and a merge pass
combines them in increasing k. Usage counts are pre-aggregated per program (one atomic per distinct code).

Precision (``precision=``, resolved by :func:`resolve_precision`): the products x.e are computed in

* "bf16" / "fp16": both operands rounded (to nearest even) to that dtype, products accumulated in fp32 on tensor
  cores. The default under ``torch.autocast`` (its dtype), and for bf16 / fp16 inputs;
* "ieee": fp32 operands, full fp32 products (CUDA cores): the default for fp32 inputs when
  ``torch.get_float32_matmul_precision() == "highest"`` (torch's default), like an eager fp32 matmul;
* "tf32": fp32 operands on tensor cores with a 10-bit mantissa (the default for "high" / "medium"), or "tf32x3"
  (three tf32 products, about fp32 accuracy on tensor cores).

Norms ``||x||^2``, ``||e||^2`` are always fp32 sums of the unrounded inputs, and accumulation is always fp32.

Exact rules (shared by the kernel and the reference, which is the spec):

* The argmin is taken over ``s_k = ||e_k||^2 - 2 x.e_k`` (``||x||^2`` is the same for every k, so dropping it is
  exact in real arithmetic and saves N x K adds); ties go to the lowest k, as ``torch.argmin``. The returned
  distance is ``max(||x||^2 + s_best, 0)``.
* Codes whose score is not finite (NaN / inf in the code, or overflow) are never chosen.
* A row whose x is not finite, or that has no finite score, gets index -1 and distance NaN. For "l2", squared
  norms >= 2^125 (about 4e37) count as non-finite: scoring them could overflow fp32 and pick a wrong code.
* A row marked invalid (``valid[n] == False``) gets index -1 and distance 0 and is not counted.
* ``counts[k]`` (optional, int32) is the number of valid rows whose index is k: a fused histogram for usage
  statistics.

Layout of this file (STYLE.md): Triton kernels, the validating launcher, the ``torch.library`` binding with its
CPU kernel, and ``vq_search_ref``, the plain-PyTorch reference.
"""

from __future__ import annotations

import warnings

import torch

from . import _native
from ._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_same_device,
    check_tensor,
    device_guard,
    interpret_mode,
    launch_target,
    new_output,
    tl_dtype,
    use_triton,
    vq_search_plan,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

METRICS = ("l2", "cosine")
INDEX_DTYPES = (torch.int64, torch.int32)
PRECISIONS = ("fp32", "ieee", "tf32", "tf32x3", "bf16", "fp16")
_PRODUCT_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_EPS = 1e-12  # F.normalize's eps
# l2 only: with ||x||^2 and ||e||^2 both below 2^125, |2 x.e| <= ||x||^2 + ||e||^2 < 2^126 and every score is finite
# in fp32; a row or code at or above it (|v| >~ 6.5e18) is treated as non-finite instead of being scored wrongly.
NORM_LIMIT = 2.0**125
_REF_CHUNK_BYTES = 8 << 20  # the reference's score block (rows x K) never exceeds this (cache-sized)
_MERGE_BLOCK = 64  # rows per program of the split-K merge


# =================================================================================================== 1. kernels
if HAS_TRITON:

    @triton.jit
    def _to_compute(v, COMPUTE_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
        """Cast fp32 (or narrower) values to the product dtype. EMULATE_BF16 (interpreter only): round to nearest
        even bf16 but keep fp32 storage, since the interpreter's bf16 cast truncates and its bf16 dot is wrong."""
        if EMULATE_BF16:
            if v.dtype == tl.bfloat16:  # already representable
                return v.to(tl.float32)
            u = v.to(tl.float32).to(tl.uint32, bitcast=True)
            u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
            return u.to(tl.float32, bitcast=True)
        else:
            return v.to(COMPUTE_DTYPE)

    @triton.jit
    def _vq_code_stats_kernel(
        e_ptr,  # (K, D) codebook, any float dtype, any strides
        norm_ptr,  # (K,) fp32 out: ||e||^2 (l2) or ||e^||^2 (cosine: 1, or 0 for a zero code)
        scale_ptr,  # (K,) fp32 out: 1 / max(||e||, eps) (COSINE only)
        ecast_ptr,  # (K, D) contiguous out: the codes rounded to the product dtype (WRITE_CAST only)
        K,
        D,
        stride_e_row,
        stride_e_col,
        eps,  # cosine normalisation floor
        COSINE: tl.constexpr,
        NORM_LIMIT: tl.constexpr,  # l2: squared norms at or above this count as non-finite
        WRITE_CAST: tl.constexpr,
        COMPUTE_DTYPE: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        row = offs_k.to(tl.int64) * stride_e_row
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m = mask_k[:, None] & (offs_d[None, :] < D)
            e = tl.load(e_ptr + row[:, None] + offs_d.to(tl.int64)[None, :] * stride_e_col, mask=m, other=0.0)
            e = e.to(tl.float32)
            acc += tl.sum(e * e, axis=1)
        if COSINE:  # correctly rounded sqrt and division (no sqrt.approx / div.full)
            inv = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(acc), eps))
            nrm = acc * inv * inv
            tl.store(scale_ptr + offs_k, inv, mask=mask_k)
        else:
            nrm = tl.where(acc < NORM_LIMIT, acc, float("nan"))  # too large to score without overflow
        tl.store(norm_ptr + offs_k, nrm, mask=mask_k)
        if WRITE_CAST:
            out_row = offs_k.to(tl.int64) * D
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                m = mask_k[:, None] & (offs_d[None, :] < D)
                e = tl.load(e_ptr + row[:, None] + offs_d.to(tl.int64)[None, :] * stride_e_col, mask=m, other=0.0)
                e = _to_compute(e.to(tl.float32), COMPUTE_DTYPE, EMULATE_BF16)
                tl.store(ecast_ptr + out_row[:, None] + offs_d[None, :], e.to(ecast_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _vq_finish(
        best,  # (BLOCK_N,) fp32 best score s = ||e||^2 - 2 x.e (+inf: none)
        best_idx,  # (BLOCK_N,) int32 its code
        xsq,  # (BLOCK_N,) fp32 ||x||^2 of the raw rows
        offs_n,
        mask_n,
        valid_ptr,
        stride_valid,
        idx_ptr,
        dist_ptr,
        counts_ptr,
        eps,
        COSINE: tl.constexpr,
        NORM_LIMIT: tl.constexpr,
        HAS_VALID: tl.constexpr,
        WITH_COUNTS: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Distances, validity, index store and the pre-aggregated usage histogram of one row block."""
        if COSINE:
            xinv = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(xsq), eps))
            xn = xsq * xinv * xinv
            finite = (xsq < float("inf")) & (best < float("inf"))
        else:
            xn = xsq
            finite = (xsq < NORM_LIMIT) & (best < float("inf"))
        dist = tl.where(finite, tl.maximum(xn + best, 0.0), float("nan"))
        row_ok = mask_n & finite
        if HAS_VALID:
            keep = tl.load(valid_ptr + offs_n.to(tl.int64) * stride_valid, mask=mask_n, other=0) != 0
            row_ok = row_ok & keep
            dist = tl.where(keep, dist, 0.0)
        out_idx = tl.where(row_ok, best_idx, -1)
        tl.store(dist_ptr + offs_n, dist, mask=mask_n)
        tl.store(idx_ptr + offs_n, out_idx.to(idx_ptr.dtype.element_ty), mask=mask_n)
        if WITH_COUNTS:
            # one atomic per distinct code of the block (its multiplicity), never one per row: a collapsed
            # codebook (every row on one code) costs N / BLOCK_N same-address atomics, not N
            lane = tl.arange(0, BLOCK_N)
            same = (out_idx[:, None] == out_idx[None, :]) & row_ok[:, None] & row_ok[None, :]
            mult = tl.sum(same.to(tl.int32), axis=1)
            first = tl.min(tl.where(same, lane[None, :], BLOCK_N), axis=1) == lane
            tl.atomic_add(counts_ptr + out_idx, mult, mask=row_ok & first, sem="relaxed")

    @triton.jit
    def _vq_search_fwd_kernel(
        x_ptr,  # (N, D) queries, any float dtype, any strides
        e_ptr,  # (K, D) codes as multiplied: the codebook itself or its rounded copy
        enorm_ptr,  # (K,) fp32 code norms from _vq_code_stats_kernel
        escale_ptr,  # (K,) fp32 code scales 1 / ||e|| (COSINE only)
        valid_ptr,  # (N,) bool row mask, any stride (HAS_VALID only)
        idx_ptr,  # (N,) int32/int64 out: best code, -1 for invalid / non-finite rows (SPLIT == False)
        dist_ptr,  # (N,) fp32 out: best distance (SPLIT == False)
        counts_ptr,  # (K,) int32 out, zero-initialised: histogram of idx (WITH_COUNTS and SPLIT == False)
        part_best_ptr,  # (splits, N) fp32 out: best score of each code range (SPLIT)
        part_idx_ptr,  # (splits, N) int32 out: its code (SPLIT)
        xsq_ptr,  # (N,) fp32 out: ||x||^2, written by the first code range (SPLIT)
        N,
        K,
        D,
        stride_x_row,
        stride_x_col,
        stride_e_row,
        stride_e_col,
        stride_valid,
        k_per_split,  # codes per program along axis 1 (a multiple of BLOCK_K)
        eps,  # cosine normalisation floor
        COSINE: tl.constexpr,
        NORM_LIMIT: tl.constexpr,  # l2: rows with ||x||^2 at or above this count as non-finite
        HAS_VALID: tl.constexpr,
        WITH_COUNTS: tl.constexpr,
        SPLIT: tl.constexpr,  # write per-range partials for _vq_merge_kernel instead of the results
        COMPUTE_DTYPE: tl.constexpr,  # dtype of both tl.dot operands
        INPUT_PRECISION: tl.constexpr,  # "ieee" / "tf32" / "tf32x3" for fp32 operands
        EMULATE_BF16: tl.constexpr,  # interpreter: bf16 rounding emulated in fp32 (see _to_compute)
        CHECK_INF: tl.constexpr,  # operands narrowed to fp16 may overflow: a -inf score must not win
        RESIDENT: tl.constexpr,  # D <= BLOCK_D: the x tile is loaded once and stays resident
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,  # = D_PAD when RESIDENT, else the D chunk of each dot
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        x_row = offs_n.to(tl.int64) * stride_x_row
        offs_d0 = tl.arange(0, BLOCK_D)

        # ||x||^2 in fp32 from the unrounded rows (and, resident, the x tile for every codebook tile)
        if RESIDENT:
            xv = tl.load(
                x_ptr + x_row[:, None] + offs_d0.to(tl.int64)[None, :] * stride_x_col,
                mask=mask_n[:, None] & (offs_d0[None, :] < D),
                other=0.0,
            ).to(tl.float32)
            xsq = tl.sum(xv * xv, axis=1)
            x_res = _to_compute(xv, COMPUTE_DTYPE, EMULATE_BF16)
        else:
            xsq = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_d0
                m = mask_n[:, None] & (offs_d[None, :] < D)
                xv = tl.load(x_ptr + x_row[:, None] + offs_d.to(tl.int64)[None, :] * stride_x_col, mask=m, other=0.0)
                xv = xv.to(tl.float32)
                xsq += tl.sum(xv * xv, axis=1)
        if COSINE:
            dot_scale = -2.0 * tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(xsq), eps))
        else:
            dot_scale = tl.full([BLOCK_N], -2.0, tl.float32)

        # running best per (row, lane): lane j of tile t holds code t * BLOCK_K + j; strict < over increasing t
        # keeps the lowest index among equal scores within a lane
        best = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
        best_t = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
        lane = tl.arange(0, BLOCK_K)
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + lane
            mask_k = offs_k < k_hi
            e_row = offs_k.to(tl.int64) * stride_e_row
            if RESIDENT:
                et = tl.load(  # (BLOCK_D, BLOCK_K): the codebook tile, transposed by addressing
                    e_ptr + e_row[None, :] + offs_d0.to(tl.int64)[:, None] * stride_e_col,
                    mask=(offs_d0 < D)[:, None] & mask_k[None, :],
                    other=0.0,
                )
                acc = tl.dot(x_res, _to_compute(et, COMPUTE_DTYPE, EMULATE_BF16), input_precision=INPUT_PRECISION)
            else:
                acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + offs_d0
                    mask_d = offs_d < D
                    xv = tl.load(
                        x_ptr + x_row[:, None] + offs_d.to(tl.int64)[None, :] * stride_x_col,
                        mask=mask_n[:, None] & mask_d[None, :],
                        other=0.0,
                    )
                    et = tl.load(
                        e_ptr + e_row[None, :] + offs_d.to(tl.int64)[:, None] * stride_e_col,
                        mask=mask_d[:, None] & mask_k[None, :],
                        other=0.0,
                    )
                    acc = tl.dot(
                        _to_compute(xv, COMPUTE_DTYPE, EMULATE_BF16),
                        _to_compute(et, COMPUTE_DTYPE, EMULATE_BF16),
                        acc,
                        input_precision=INPUT_PRECISION,
                    )
            # codes past the range get norm +inf, so their score is +inf (or NaN) and never passes the strict <;
            # NaN scores (non-finite codes) never pass it either
            en = tl.load(enorm_ptr + offs_k, mask=mask_k, other=float("inf"))
            if COSINE:  # the codes' scale is applied in fp32: bf16 codes keep exact products
                es = tl.load(escale_ptr + offs_k, mask=mask_k, other=0.0)
                s = en[None, :] + dot_scale[:, None] * (acc * es[None, :])
            else:
                s = en[None, :] + dot_scale[:, None] * acc
            if CHECK_INF:
                s = tl.where(s > float("-inf"), s, float("inf"))
            upd = s < best
            best = tl.where(upd, s, best)
            best_t = tl.where(upd, k0 // BLOCK_K, best_t)

        row_best = tl.min(best, axis=1)
        code = best_t * BLOCK_K + lane[None, :]
        row_idx = tl.min(tl.where(best == row_best[:, None], code, 2147483647), axis=1)  # lowest index of the min
        if SPLIT:
            tl.store(part_best_ptr + pid_s.to(tl.int64) * N + offs_n, row_best, mask=mask_n)
            tl.store(part_idx_ptr + pid_s.to(tl.int64) * N + offs_n, row_idx, mask=mask_n)
            if pid_s == 0:
                tl.store(xsq_ptr + offs_n, xsq, mask=mask_n)
        else:
            _vq_finish(row_best, row_idx, xsq, offs_n, mask_n, valid_ptr, stride_valid, idx_ptr, dist_ptr, counts_ptr,
                       eps, COSINE, NORM_LIMIT, HAS_VALID, WITH_COUNTS, BLOCK_N)  # fmt: skip

    @triton.jit
    def _vq_merge_kernel(
        part_best_ptr,  # (splits, N) fp32 best score per code range
        part_idx_ptr,  # (splits, N) int32 its code
        xsq_ptr,  # (N,) fp32 ||x||^2
        valid_ptr,  # (N,) bool row mask, any stride (HAS_VALID only)
        idx_ptr,  # (N,) int32/int64 out
        dist_ptr,  # (N,) fp32 out
        counts_ptr,  # (K,) int32 out, zero-initialised (WITH_COUNTS only)
        N,
        splits,
        stride_valid,
        eps,
        COSINE: tl.constexpr,
        NORM_LIMIT: tl.constexpr,
        HAS_VALID: tl.constexpr,
        WITH_COUNTS: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        best = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_idx = tl.full([BLOCK_N], -1, tl.int32)
        pb = part_best_ptr + offs_n
        pi = part_idx_ptr + offs_n
        for _ in range(0, splits):  # ranges in increasing k: strict < keeps the lowest index on ties
            b = tl.load(pb, mask=mask_n, other=float("inf"))
            i = tl.load(pi, mask=mask_n, other=-1)
            upd = b < best
            best = tl.where(upd, b, best)
            best_idx = tl.where(upd, i, best_idx)
            pb += N  # the next range's row (64-bit pointer arithmetic: splits * N may pass 2^31)
            pi += N
        xsq = tl.load(xsq_ptr + offs_n, mask=mask_n, other=0.0)
        _vq_finish(best, best_idx, xsq, offs_n, mask_n, valid_ptr, stride_valid, idx_ptr, dist_ptr, counts_ptr, eps,
                   COSINE, NORM_LIMIT, HAS_VALID, WITH_COUNTS, BLOCK_N)  # fmt: skip

    def _prune_configs(configs, named_args, **kwargs):
        """Autotune candidates of one launch: those :func:`vq_search_plan` keeps for the shape and the device."""
        fp32 = kwargs["COMPUTE_DTYPE"] == tl.float32 and not kwargs["EMULATE_BF16"]
        fma = kwargs["INPUT_PRECISION"] == "ieee" and fp32
        target = launch_target(named_args["x_ptr"].device)
        plan = vq_search_plan(named_args["N"], named_args["K"], named_args["D"], 4 if fp32 else 2, fma, target)
        by_key = {(c.kwargs["BLOCK_K"], c.num_warps, c.num_stages): c for c in configs}
        keep = [by_key[c] for c in plan["candidates"] if c in by_key]  # in the plan's order: heuristic pick first
        return keep or configs[:1]

    # Tile candidates (BLOCK_K, num_warps, num_stages) of every path; each launch keeps those its plan lists. The
    # best one depends on the GPU (MMA vs epilogue overlap, occupancy), so it is timed there. The interpreter
    # gets one config: its cost does not depend on the tile, and tuning would multiply test time.
    _VQ_CONFIGS = [(bk, w, st) for bk in (16, 32, 64) for w in (4, 8) for st in (2, 3, 4)]
    _vq_search_tuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bk, w, st in ([(128, 4, 2)] if interpret_mode() else _VQ_CONFIGS)
        ],
        key=["N", "K", "D", "INPUT_PRECISION"],  # shape dims (and the product path they are tuned for)
        prune_configs_by={"early_config_prune": _prune_configs},
        reset_to_zero=["counts_ptr"],  # timing runs add to the histogram
    )(_vq_search_fwd_kernel)


# ================================================================================================== 2. launcher
def resolve_precision(x: torch.Tensor, codebook: torch.Tensor, precision) -> str:
    """The product precision a search of ``x`` against ``codebook`` uses (see the module docstring).

    ``precision`` None follows ``torch.autocast`` (enabled on x's device type: its dtype), else the inputs: bf16 /
    fp16 when both are that dtype, else "fp32": fp32 operands with torch's matmul precision at launch ("highest" ->
    "ieee", "high" / "medium" -> "tf32"). Explicit values: "fp32", "ieee", "tf32", "tf32x3", "bf16" /
    torch.bfloat16, "fp16" / torch.float16 (torch.float32 = "ieee").
    """
    if precision is None:
        dev = x.device.type
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
            precision = torch.get_autocast_dtype(dev)
        else:
            promoted = torch.promote_types(x.dtype, codebook.dtype)
            if promoted not in (torch.bfloat16, torch.float16):
                return "fp32"  # fp32 operands; "ieee" or "tf32" per torch's matmul precision, read at launch
            precision = promoted
    if isinstance(precision, torch.dtype):
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "ieee"}
        if precision not in names:
            raise ValueError(f"precision: expected torch.bfloat16, torch.float16 or torch.float32, got {precision}")
        return names[precision]
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected None, one of {PRECISIONS} or a torch dtype, got {precision!r}")
    return precision


def _launch_precision(precision: str) -> str:
    """ "fp32" (the default for fp32 inputs) follows torch.get_float32_matmul_precision() at launch time, as an
    eager ``x @ codebook.T`` would: "highest" -> "ieee", "high" / "medium" -> "tf32"."""
    if precision == "fp32":
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return precision


def _check_inputs(x, codebook, valid, metric, index_dtype) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("codebook", codebook, ndim=2, dtypes=FLOAT_DTYPES)
    if x.shape[1] == 0:
        raise ValueError(f"x: expected a feature dimension D >= 1, got shape {tuple(x.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError(f"codebook: expected at least one code (K >= 1), got shape {tuple(codebook.shape)}")
    if codebook.shape[1] != x.shape[1]:
        raise ValueError(
            f"codebook: expected shape (K, {x.shape[1]}) to match x's feature dimension D={x.shape[1]}, "
            f"got {tuple(codebook.shape)}"
        )
    if valid is not None:
        check_tensor("valid", valid, ndim=1, dtypes=(torch.bool,))
        if valid.shape[0] != x.shape[0]:
            raise ValueError(f"valid: expected shape ({x.shape[0]},) (one flag per row of x), got {tuple(valid.shape)}")
    check_same_device(x=x, codebook=codebook, valid=valid)
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype: expected torch.int64 or torch.int32, got {index_dtype}")


def _vq_search_triton(x, codebook, valid, cosine, int32_index, with_counts, eps, precision):
    precision = _launch_precision(precision)
    n, d = x.shape
    k = codebook.shape[0]
    dev = x.device
    idx = new_output(n, torch.int32 if int32_index else torch.int64, dev)
    dist = new_output(n, torch.float32, dev)
    counts = torch.zeros(k if with_counts else 0, dtype=torch.int32, device=dev)
    if n == 0:
        return idx, dist, counts
    interp = dev.type == "cpu"
    compute = _PRODUCT_DTYPE.get(precision, torch.float32)
    # The interpreter's bf16 cast truncates and its tl.dot multiplies bf16's raw storage: there bf16 operands are
    # rounded to nearest even in fp32 storage (exact products, as the GPU's bf16 MMA with fp32 accumulation).
    emulate = interp and compute == torch.bfloat16
    stored = torch.float32 if emulate else compute
    dot_precision = precision if compute == torch.float32 else "tf32"  # ignored for 16-bit operands
    plan = vq_search_plan(n, k, d, compute.itemsize, precision == "ieee", launch_target(dev), interp)
    size = codebook.dtype.itemsize
    narrowing = size > compute.itemsize or (size == compute.itemsize and codebook.dtype != compute)
    write_cast = emulate or narrowing  # else the search reads the codebook itself (widening in-kernel)
    enorm = new_output(k, torch.float32, dev)
    escale = new_output(k if cosine else 0, torch.float32, dev)
    ecast = new_output((k, d), stored, dev) if write_cast else enorm
    e_src = ecast if write_cast else codebook
    check_inf = compute == torch.float16 and (x.dtype != torch.float16 or codebook.dtype != torch.float16)
    split = plan["split"]
    part_best = new_output((split, n) if split > 1 else 0, torch.float32, dev)
    part_idx = new_output((split, n) if split > 1 else 0, torch.int32, dev)
    xsq = new_output(n if split > 1 else 0, torch.float32, dev)
    valid_ = valid if valid is not None else x
    stride_valid = valid.stride(0) if valid is not None else 0
    common = dict(COSINE=cosine, NORM_LIMIT=NORM_LIMIT, HAS_VALID=valid is not None, WITH_COUNTS=with_counts)
    stats_block_k = 512 if interp else 32  # the interpreter pays per program, the GPU wants K / 32 CTAs
    with device_guard(dev):
        _vq_code_stats_kernel[(triton.cdiv(k, stats_block_k),)](
            codebook, enorm, escale, ecast, k, d, codebook.stride(0), codebook.stride(1), eps,
            COSINE=cosine, NORM_LIMIT=NORM_LIMIT, WRITE_CAST=write_cast, COMPUTE_DTYPE=tl_dtype(stored),
            EMULATE_BF16=emulate, BLOCK_K=stats_block_k, BLOCK_D=min(plan["D_PAD"], 128),
        )  # fmt: skip
        grid = (triton.cdiv(n, plan["BLOCK_N"]), split)
        _vq_search_tuned[grid](
            x, e_src, enorm, escale, valid_, idx, dist, counts, part_best, part_idx, xsq,
            n, k, d, x.stride(0), x.stride(1), e_src.stride(0), e_src.stride(1), stride_valid, plan["k_per_split"],
            eps, **common, SPLIT=split > 1, COMPUTE_DTYPE=tl_dtype(stored), INPUT_PRECISION=dot_precision,
            EMULATE_BF16=emulate, CHECK_INF=check_inf, RESIDENT=plan["RESIDENT"],
            BLOCK_N=plan["BLOCK_N"], BLOCK_D=plan["BLOCK_D"],
        )  # fmt: skip
        if split > 1:
            _vq_merge_kernel[(triton.cdiv(n, _MERGE_BLOCK),)](
                part_best, part_idx, xsq, valid_, idx, dist, counts, n, split, stride_valid, eps, **common,
                BLOCK_N=_MERGE_BLOCK, num_warps=4,
            )  # fmt: skip
    return idx, dist, counts


# =================================================================================================== 3. binding
@torch.library.custom_op("mimfast::vq_search", mutates_args=(), device_types="cuda")
def _vq_search_op(
    x: torch.Tensor,
    codebook: torch.Tensor,
    valid: torch.Tensor | None,
    cosine: bool,
    int32_index: bool,
    with_counts: bool,
    eps: float,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (x, codebook, valid, cosine, int32_index, with_counts, eps, precision)
    if not use_triton(x, codebook):
        if x.dtype != torch.float64 and codebook.dtype != torch.float64:
            warnings.warn("mimfast: triton is not importable; vq_search runs its PyTorch reference", stacklevel=2)
        return _vq_search_ref_impl(*args)
    return _vq_search_triton(*args)


@_vq_search_op.register_kernel("cpu")
def _vq_search_cpu(x, codebook, valid, cosine, int32_index, with_counts, eps, precision):
    args = (x, codebook, valid, cosine, int32_index, with_counts, eps, precision)
    if interpret_mode() and use_triton(x, codebook):
        return _vq_search_triton(*args)
    native = _native.op("vq_search", x, codebook)  # the C++ kernel (csrc/) when built; fp64 takes the reference
    if native is not None:
        return native(*args)
    return _vq_search_ref_impl(*args)


@_vq_search_op.register_fake
def _vq_search_fake(x, codebook, valid, cosine, int32_index, with_counts, eps, precision):
    n, k = x.shape[0], codebook.shape[0]
    return (
        x.new_empty(n, dtype=torch.int32 if int32_index else torch.int64),
        x.new_empty(n, dtype=torch.float32),
        x.new_empty(k if with_counts else 0, dtype=torch.int32),
    )


def vq_search(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: str = "l2",
    valid: torch.Tensor | None = None,
    index_dtype: torch.dtype = torch.int64,
    return_counts: bool = False,
    eps: float = DEFAULT_EPS,
    precision: str | torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Nearest code for every row of ``x`` without an N x K matrix (see the module docstring for the exact rules).

    Args:
        x: (N, D) fp32 / bf16 / fp16 (fp64 takes the reference); any strides. N may be 0.
        codebook: (K, D), K >= 1, same device; its dtype may differ from x's.
        metric: "l2" or "cosine".
        valid: optional (N,) bool, any stride; rows marked False get index -1, distance 0 and are not counted.
        index_dtype: torch.int64 (default) or torch.int32.
        return_counts: also return the (K,) int32 histogram of chosen indices (fused in the kernel).
        eps: norm floor for the cosine metric (F.normalize's).
        precision: dtype of the products x.e: None (default) follows ``torch.autocast`` when it is enabled (bf16
            activations + fp32 codebook under bf16 autocast multiply in bf16 on tensor cores), else the inputs
            (bf16 / fp16 pairs in their dtype; fp32 per ``torch.get_float32_matmul_precision()``: "highest" ->
            "ieee", else "tf32"). Force one with "ieee" (fp32 CUDA-core products), "tf32", "tf32x3", "bf16" or
            "fp16" (or torch.bfloat16 / torch.float16 / torch.float32). Accumulation and norms are always fp32.

    Returns:
        indices (N,) index_dtype, distances (N,) fp32, counts (K,) int32 or None.
        Non-finite rows come back as index -1 / distance NaN; ``mimfast.ops.vq_search`` turns them into an error.
    """
    _check_inputs(x, codebook, valid, metric, index_dtype)
    prec = resolve_precision(x, codebook, precision)
    idx, dist, counts = torch.ops.mimfast.vq_search(
        x, codebook, valid, metric == "cosine", index_dtype == torch.int32, return_counts, float(eps), prec
    )
    return idx, dist, (counts if return_counts else None)


# ================================================================================================= 4. reference
def _vq_search_ref_impl(x, codebook, valid, cosine, int32_index, with_counts, eps, precision="ieee"):
    ct = torch.float64 if torch.float64 in (x.dtype, codebook.dtype) else torch.float32
    xf, ef = x.to(ct), codebook.to(ct)
    xsq = (xf * xf).sum(-1)
    esq = (ef * ef).sum(-1)
    if cosine:
        xinv = 1.0 / xsq.sqrt().clamp_min(eps)
        einv = 1.0 / esq.sqrt().clamp_min(eps)
        xn, en = xsq * xinv * xinv, esq * einv * einv
        scale = -2.0 * xinv  # both scales are applied to the products in fp32 (rounded operands stay raw)
    else:
        xn, en = xsq, torch.where(esq < NORM_LIMIT, esq, torch.full_like(esq, float("nan")))
        scale = None
    pd = _PRODUCT_DTYPE.get(precision)
    if pd is not None:  # operands rounded to the product dtype; products and sums stay in ct
        xf, ef = xf.to(pd).to(ct), ef.to(pd).to(ct)
    n, k = x.shape[0], codebook.shape[0]
    best = torch.empty(n, dtype=ct, device=x.device)
    best_idx = torch.empty(n, dtype=torch.int64, device=x.device)
    rows = max(1, _REF_CHUNK_BYTES // (k * 4))
    for r0 in range(0, n, rows):
        if scale is None:
            s = torch.addmm(en[None, :], xf[r0 : r0 + rows], ef.T, alpha=-2.0)  # s = ||e||^2 - 2 x.e
        else:
            s = en[None, :] + scale[r0 : r0 + rows, None] * ((xf[r0 : r0 + rows] @ ef.T) * einv[None, :])
        s.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("inf"))  # non-finite codes never win
        best[r0 : r0 + rows], best_idx[r0 : r0 + rows] = s.min(dim=1)  # min/argmin: lowest index on ties
    finite = (torch.isfinite(xsq) if cosine else xsq < NORM_LIMIT) & torch.isfinite(best)
    dist = torch.where(finite, (xn + best).clamp_min(0), torch.full_like(best, float("nan")))
    row_ok = finite if valid is None else finite & valid
    if valid is not None:
        dist = torch.where(valid, dist, torch.zeros_like(dist))
    idx = torch.where(row_ok, best_idx, torch.full_like(best_idx, -1))
    counts = torch.zeros(k if with_counts else 0, dtype=torch.int32, device=x.device)
    if with_counts:
        counts = torch.bincount(idx[row_ok], minlength=k).to(torch.int32)
    return idx.to(torch.int32 if int32_index else torch.int64), dist.float(), counts


def vq_search_ref(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: str = "l2",
    valid: torch.Tensor | None = None,
    index_dtype: torch.dtype = torch.int64,
    return_counts: bool = False,
    eps: float = DEFAULT_EPS,
    precision: str | torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Plain-PyTorch reference of :func:`vq_search` (same arguments, same results): the spec and the test oracle.

    Computes in fp32 (fp64 when an input is fp64) over row chunks, so its peak memory is bounded too; with a
    "bf16" / "fp16" precision the operands of the products are rounded to that dtype first (norms are not).
    """
    _check_inputs(x, codebook, valid, metric, index_dtype)
    prec = resolve_precision(x, codebook, precision)
    idx, dist, counts = _vq_search_ref_impl(
        x, codebook, valid, metric == "cosine", index_dtype == torch.int32, return_counts, float(eps), prec
    )
    return idx, dist, (counts if return_counts else None)

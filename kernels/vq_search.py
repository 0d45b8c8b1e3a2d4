"""Fused codebook nearest-neighbour search: ``mimfast::vq_search``.

For each row x_n of x (N, D) find ``argmin_k d(x_n, e_k)`` over a codebook (K, D) with

    d(x, e) = ||x||^2 + ||e||^2 - 2 x.e                       (metric "l2")
    d(x, e) = ||x^||^2 + ||e^||^2 - 2 x^.e^,  v^ = v / max(||v||, eps)   (metric "cosine", = 2 - 2 cos for non-zero v)

without ever materialising the N x K distance matrix: each program keeps BLOCK_N rows and a running
(best score, best index) pair while it streams the codebook tile by tile. Products and sums accumulate in fp32
whatever the input dtype (fp16 inputs with large norms cannot overflow).

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

from ._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_same_device,
    check_tensor,
    fp32_dot_precision,
    interpret_mode,
    new_output,
    tl_dtype,
    use_triton,
    vq_search_config,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

METRICS = ("l2", "cosine")
INDEX_DTYPES = (torch.int64, torch.int32)
DEFAULT_EPS = 1e-12  # F.normalize's eps
# l2 only: with ||x||^2 and ||e||^2 both below 2^125, |2 x.e| <= ||x||^2 + ||e||^2 < 2^126 and every score is finite
# in fp32; a row or code at or above it (|v| >~ 6.5e18) is treated as non-finite instead of being scored wrongly.
NORM_LIMIT = 2.0**125
_REF_CHUNK_BYTES = 8 << 20  # the reference's score block (rows x K) never exceeds this (cache-sized)


# =================================================================================================== 1. kernels
if HAS_TRITON:

    @triton.jit
    def _vq_code_stats_kernel(
        e_ptr,  # (K, D) codebook, any float dtype, any strides
        norm_ptr,  # (K,) fp32 out: ||e||^2 (l2) or ||e^||^2 (cosine: 1, or 0 for a zero code)
        scale_ptr,  # (K,) fp32 out: 1 (l2) or 1 / max(||e||, eps) (cosine)
        K,
        D,
        stride_e_row,
        stride_e_col,
        eps,  # cosine normalisation floor
        COSINE: tl.constexpr,
        NORM_LIMIT: tl.constexpr,  # l2: squared norms at or above this count as non-finite
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
            e = tl.load(e_ptr + row[:, None] + offs_d[None, :] * stride_e_col, mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(e * e, axis=1)
        if COSINE:
            inv = 1.0 / tl.maximum(tl.sqrt(acc), eps)
            nrm = acc * inv * inv
        else:
            inv = tl.full([BLOCK_K], 1.0, tl.float32)
            nrm = tl.where(acc < NORM_LIMIT, acc, float("nan"))  # too large to score without overflow
        tl.store(norm_ptr + offs_k, nrm, mask=mask_k)
        tl.store(scale_ptr + offs_k, inv, mask=mask_k)

    @triton.jit
    def _vq_search_fwd_kernel(
        x_ptr,  # (N, D) queries, any float dtype, any strides
        e_ptr,  # (K, D) codebook
        enorm_ptr,  # (K,) fp32 code norms from _vq_code_stats_kernel
        escale_ptr,  # (K,) fp32 code scales (cosine only)
        valid_ptr,  # (N,) bool row mask (HAS_VALID only)
        idx_ptr,  # (N,) int32/int64 out: best code, -1 for invalid / non-finite rows
        dist_ptr,  # (N,) fp32 out: best distance
        counts_ptr,  # (K,) int32 out, zero-initialised: histogram of idx (WITH_COUNTS only)
        N,
        K,
        D,
        stride_x_row,
        stride_x_col,
        stride_e_row,
        stride_e_col,
        eps,  # cosine normalisation floor
        COSINE: tl.constexpr,
        NORM_LIMIT: tl.constexpr,  # l2: rows with ||x||^2 at or above this count as non-finite
        HAS_VALID: tl.constexpr,
        WITH_COUNTS: tl.constexpr,
        COMPUTE_DTYPE: tl.constexpr,  # dtype both tl.dot operands are cast to (promotion of x's and e's)
        INPUT_PRECISION: tl.constexpr,  # "ieee" / "tf32" for fp32 operands
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SINGLE_D: tl.constexpr,  # D <= BLOCK_D: load the x tile once, outside the codebook loop
    ):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        x_row = offs_n.to(tl.int64) * stride_x_row

        # prologue: ||x||^2 in fp32 (also warms L2 with this row block)
        xsq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m = mask_n[:, None] & (offs_d[None, :] < D)
            xv = tl.load(x_ptr + x_row[:, None] + offs_d[None, :] * stride_x_col, mask=m, other=0.0).to(tl.float32)
            xsq += tl.sum(xv * xv, axis=1)
        if COSINE:
            xinv = 1.0 / tl.maximum(tl.sqrt(xsq), eps)
            xn = xsq * xinv * xinv
            dot_scale = -2.0 * xinv
        else:
            xn = xsq
            dot_scale = tl.full([BLOCK_N], -2.0, tl.float32)

        offs_d0 = tl.arange(0, BLOCK_D)
        if SINGLE_D:
            x_res = tl.load(
                x_ptr + x_row[:, None] + offs_d0[None, :] * stride_x_col,
                mask=mask_n[:, None] & (offs_d0[None, :] < D),
                other=0.0,
            ).to(COMPUTE_DTYPE)
        best = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_idx = tl.full([BLOCK_N], -1, tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            e_row = offs_k.to(tl.int64) * stride_e_row
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            if SINGLE_D:  # D <= BLOCK_D: x stays in registers, only the codebook tile is loaded
                et = tl.load(
                    e_ptr + e_row[None, :] + offs_d0[:, None] * stride_e_col,
                    mask=(offs_d0 < D)[:, None] & mask_k[None, :],
                    other=0.0,
                ).to(COMPUTE_DTYPE)
                acc = tl.dot(x_res, et, acc, input_precision=INPUT_PRECISION)
            else:
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    mask_d = offs_d < D
                    xv = tl.load(
                        x_ptr + x_row[:, None] + offs_d[None, :] * stride_x_col,
                        mask=mask_n[:, None] & mask_d[None, :],
                        other=0.0,
                    ).to(COMPUTE_DTYPE)
                    et = tl.load(  # (BLOCK_D, BLOCK_K): the codebook tile, transposed by addressing
                        e_ptr + e_row[None, :] + offs_d[:, None] * stride_e_col,
                        mask=mask_d[:, None] & mask_k[None, :],
                        other=0.0,
                    ).to(COMPUTE_DTYPE)
                    acc = tl.dot(xv, et, acc, input_precision=INPUT_PRECISION)
            # codes past K get norm +inf, so their score is +inf and needs no separate mask
            en = tl.load(enorm_ptr + offs_k, mask=mask_k, other=float("inf"))
            if COSINE:
                es = tl.load(escale_ptr + offs_k, mask=mask_k, other=0.0)
                s = en[None, :] + dot_scale[:, None] * (acc * es[None, :])
            else:
                s = en[None, :] + dot_scale[:, None] * acc
            # NaN (tl.min's NaN handling is unspecified on GPU) and -inf (fp32 overflow of finite inputs) never win
            s = tl.where(tl.abs(s) < float("inf"), s, float("inf"))
            tile_min = tl.min(s, axis=1)
            cand = tl.where(s == tile_min[:, None], offs_k[None, :], 2147483647)
            tile_idx = tl.min(cand, axis=1)  # lowest index attaining the tile minimum
            upd = tile_min < best  # strict: an earlier tile (lower indices) keeps ties
            best = tl.where(upd, tile_min, best)
            best_idx = tl.where(upd, tile_idx, best_idx)

        if COSINE:
            finite = (xsq < float("inf")) & (best < float("inf"))
        else:
            finite = (xsq < NORM_LIMIT) & (best < float("inf"))
        dist = tl.where(finite, tl.maximum(xn + best, 0.0), float("nan"))
        row_ok = mask_n & finite
        if HAS_VALID:
            keep = tl.load(valid_ptr + offs_n, mask=mask_n, other=0) != 0
            row_ok = row_ok & keep
            dist = tl.where(keep, dist, 0.0)
        out_idx = tl.where(row_ok, best_idx, -1)
        tl.store(dist_ptr + offs_n, dist, mask=mask_n)
        tl.store(idx_ptr + offs_n, out_idx.to(idx_ptr.dtype.element_ty), mask=mask_n)
        if WITH_COUNTS:
            tl.atomic_add(counts_ptr + out_idx, tl.full([BLOCK_N], 1, tl.int32), mask=row_ok)


# ================================================================================================== 2. launcher
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


def _vq_search_triton(x, codebook, valid, cosine, int32_index, with_counts, eps):
    n, d = x.shape
    k = codebook.shape[0]
    dev = x.device
    idx = new_output(n, torch.int32 if int32_index else torch.int64, dev)
    dist = new_output(n, torch.float32, dev)
    counts = torch.zeros(k if with_counts else 0, dtype=torch.int32, device=dev)
    if n == 0:
        return idx, dist, counts
    enorm = new_output(k, torch.float32, dev)
    escale = new_output(k, torch.float32, dev)
    compute = torch.promote_types(x.dtype, codebook.dtype)  # bf16 + fp16 promote to fp32
    cfg = vq_search_config(n, k, d, compute.itemsize)
    if compute == torch.bfloat16 and x.device.type == "cpu":
        # The interpreter's tl.dot multiplies bf16's raw uint16 storage. bf16 x bf16 products are exact in fp32, so
        # computing in fp32 there gives the values the GPU's bf16 MMA (fp32 accumulate) gives.
        compute = torch.float32
    # "ieee"/"tf32" matters for fp32 operands only; half-precision dots keep Triton's default.
    precision = fp32_dot_precision() if compute == torch.float32 else "tf32"
    stats_block_k = 64
    _vq_code_stats_kernel[(triton.cdiv(k, stats_block_k),)](
        codebook, enorm, escale, k, d, codebook.stride(0), codebook.stride(1), eps,
        COSINE=cosine, NORM_LIMIT=NORM_LIMIT, BLOCK_K=stats_block_k, BLOCK_D=min(cfg["BLOCK_D"], 64),
    )  # fmt: skip
    _vq_search_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x, codebook, enorm, escale, valid if valid is not None else x, idx, dist, counts,
        n, k, d, x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1), eps,
        COSINE=cosine, NORM_LIMIT=NORM_LIMIT, HAS_VALID=valid is not None, WITH_COUNTS=with_counts,
        COMPUTE_DTYPE=tl_dtype(compute), INPUT_PRECISION=precision,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"], SINGLE_D=d <= cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not use_triton(x, codebook):
        if x.dtype != torch.float64 and codebook.dtype != torch.float64:
            warnings.warn("mimfast: triton is not importable; vq_search runs its PyTorch reference", stacklevel=2)
        return _vq_search_ref_impl(x, codebook, valid, cosine, int32_index, with_counts, eps)
    return _vq_search_triton(x, codebook, valid, cosine, int32_index, with_counts, eps)


@_vq_search_op.register_kernel("cpu")
def _vq_search_cpu(x, codebook, valid, cosine, int32_index, with_counts, eps):
    if interpret_mode() and use_triton(x, codebook):
        return _vq_search_triton(x, codebook, valid, cosine, int32_index, with_counts, eps)
    return _vq_search_ref_impl(x, codebook, valid, cosine, int32_index, with_counts, eps)


@_vq_search_op.register_fake
def _vq_search_fake(x, codebook, valid, cosine, int32_index, with_counts, eps):
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Nearest code for every row of ``x`` without an N x K matrix (see the module docstring for the exact rules).

    Args:
        x: (N, D) fp32 / bf16 / fp16 (fp64 takes the reference); any strides. N may be 0.
        codebook: (K, D), K >= 1, same device; its dtype may differ from x's (both are promoted for the products).
        metric: "l2" or "cosine".
        valid: optional (N,) bool; rows marked False get index -1, distance 0 and are not counted.
        index_dtype: torch.int64 (default) or torch.int32.
        return_counts: also return the (K,) int32 histogram of chosen indices (fused in the kernel).
        eps: norm floor for the cosine metric (F.normalize's).

    Returns:
        indices (N,) index_dtype, distances (N,) fp32, counts (K,) int32 or None.
        Non-finite rows come back as index -1 / distance NaN; ``mimfast.ops.vq_search`` turns them into an error.
    """
    _check_inputs(x, codebook, valid, metric, index_dtype)
    idx, dist, counts = torch.ops.mimfast.vq_search(
        x, codebook, valid, metric == "cosine", index_dtype == torch.int32, return_counts, float(eps)
    )
    return idx, dist, (counts if return_counts else None)


# ================================================================================================= 4. reference
def _vq_search_ref_impl(x, codebook, valid, cosine, int32_index, with_counts, eps):
    ct = torch.float64 if torch.float64 in (x.dtype, codebook.dtype) else torch.float32
    xf, ef = x.to(ct), codebook.to(ct)
    xsq = (xf * xf).sum(-1)
    esq = (ef * ef).sum(-1)
    if cosine:
        xinv = 1.0 / xsq.sqrt().clamp_min(eps)
        einv = 1.0 / esq.sqrt().clamp_min(eps)
        xn, en = xsq * xinv * xinv, esq * einv * einv
        xf, ef = xf * xinv[:, None], ef * einv[:, None]
    else:
        xn, en = xsq, torch.where(esq < NORM_LIMIT, esq, torch.full_like(esq, float("nan")))
    n, k = x.shape[0], codebook.shape[0]
    best = torch.empty(n, dtype=ct, device=x.device)
    best_idx = torch.empty(n, dtype=torch.int64, device=x.device)
    rows = max(1, _REF_CHUNK_BYTES // (k * 4))
    for r0 in range(0, n, rows):
        s = torch.addmm(en[None, :], xf[r0 : r0 + rows], ef.T, alpha=-2.0)  # s = ||e||^2 - 2 x.e
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Plain-PyTorch reference of :func:`vq_search` (same arguments, same results): the spec and the test oracle.

    Computes in fp32 (fp64 when an input is fp64) over row chunks, so its peak memory is bounded too.
    """
    _check_inputs(x, codebook, valid, metric, index_dtype)
    idx, dist, counts = _vq_search_ref_impl(
        x, codebook, valid, metric == "cosine", index_dtype == torch.int32, return_counts, float(eps)
    )
    return idx, dist, (counts if return_counts else None)

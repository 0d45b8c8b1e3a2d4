"""Fused Gumbel-softmax sampling: ``mimfast::gumbel_softmax`` (forward) and ``mimfast::gumbel_softmax_bwd``.

For each row l (K logits) of an (N, K) matrix, with temperature tau > 0 and a per-row flag "sampled"::

    g_k = Gumbel noise of element (n, k)  (sampled rows),   g_k = 0  (argmax rows)
    s_k = (l_k + g_k) * r,   r = fp32(1 / tau)              (noise added before the temperature, as F.gumbel_softmax)
    y   = softmax(s)                                        (soft sample)
    idx = argmax_k s_k, ties to the lowest k                (= argmax of l + g: tau changes y, not which code wins)
    out = one_hot(idx) (hard, straight-through) or y (soft)

and the gradient, on every row and in both modes, is the softmax's: ``dl = r * y * (dy - sum_k y_k dy_k)``
(straight-through: F.gumbel_softmax's ``one_hot - y.detach() + y``). On argmax rows that is the gradient of
softmax(l / tau) (Regularized VQ's "forward argmax, backward softmax"); on sampled rows of the Gumbel-softmax.

Noise (bit-exact between the kernel and :func:`gumbel_noise_ref`)::

    (seed, offset)  = philox[0], philox[1]                  int64, from the generator (see mimfast.ops.gumbel)
    counter(n, k)   = offset + n * ceil(K / 4) + k // 4     int64: low 32 bits -> c0, high 32 bits -> c1, c2 = c3 = 0
    bits(n, k)      = lane k % 4 of Philox4x32-10(counter, key = (seed low 32 bits, seed high 32 bits))
                      (triton.language.randint4x; one Philox call serves four consecutive codes)
    u               = triton's uint_to_uniform_float(bits) in [0, 1):  v = bits if bits < 2^31 else 2^32 - 1 - bits,
                      u = fp32(v) * fp32(4.6566127342e-10)
    g               = -log(max(-log(max(u, 2^-32)), 2^-26))

The clamps keep g finite: ``max(u, 2^-32)`` only moves u = 0 (probability 2^-31; the smallest non-zero u is
4.66e-10), and ``max(., 2^-26)`` guards a log that rounds log(u) to 0 just below u = 1 (the exact value there is
>= 5.96e-8 > 2^-26). So g lies in [-3.11, 18.03]. The integer stream and u are identical in the kernel and the
reference (bit for bit, tested against ``triton.language.randint4x`` / ``rand``); g differs by the last bits of the
logs: the inner log is an accurate logf everywhere (near u = 1, where the winning codes' noise comes from, -log(u) is
tiny and an approximate log's absolute error would swamp it), the outer one is the GPU's ``lg2.approx`` (relative
error ~2^-22, i.e. an absolute error of g below ~1e-6 * max(1, |g|)) and numpy's / torch's log on the CPU.

Non-finite rows: a row with a NaN or +inf logit, with every logit -inf, or whose score (l + g) * r overflows fp32,
has no defined sample. Its index (and ``best``) is -1 and its output, row statistic and gradient are NaN (what
F.gumbel_softmax gives there); ``mimfast.ops`` raises on such rows by default. -inf logits elsewhere are fine:
those codes get probability 0 and are never chosen.

What the backward saves: the logits (the input, by reference, no copy), the (2,) int64 ``philox`` tensor, the
optional (N,) ``sample_rows`` flags and one (N,) fp32 log-sum-exp per row. It never stores an N x K sample: the
noise is recomputed from (seed, offset). Rows that fit one tile (K <= 8192) recompute their statistics from the
row in registers, so the soft sample is bit-identical to the forward's; longer rows use the saved log-sum-exp.

Layout of this file (STYLE.md): Triton kernels, the validating launchers, the ``torch.library`` bindings with their
CPU kernels and autograd, and the plain-PyTorch references ``gumbel_softmax_ref`` / ``gumbel_noise_ref``.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from . import _native
from ._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_same_device,
    check_tensor,
    device_guard,
    gumbel_plan,
    interpret_mode,
    launch_target,
    new_output,
    store_dtype,
    use_triton,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    try:  # lg2.approx (the SFU) for the outer log on NVIDIA GPUs; the interpreter has no libdevice
        from triton.language.extra.cuda.libdevice import fast_logf as _fast_logf
    except ImportError:  # pragma: no cover - a triton without the CUDA extras
        _fast_logf = None

U_MIN = 2.0**-32  # floor of the uniform sample (moves u = 0 only)
E_MIN = 2.0**-26  # floor of -log(u) (a fast log may round log(u) to 0 just below 1)
UNIFORM_SCALE = 4.6566127342e-10  # triton.language.random.uint_to_uniform_float, 32-bit path
PHILOX_ROUNDS = 10
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_M32 = 0xFFFFFFFF
_REF_CHUNK_ELEMS = 1 << 20  # the reference's working set (rows x K) per chunk


def inv_tau(tau: float) -> float:
    """r = 1 / tau rounded to fp32: the factor both the kernel and the reference multiply by."""
    return float(torch.tensor(1.0 / tau, dtype=torch.float32))


# =================================================================================================== 1. kernels
if HAS_TRITON:

    @triton.jit
    def _gumbel_noise(seed, offset, offs_n, k0, G, BLOCK_K: tl.constexpr, FAST_LOG: tl.constexpr):
        """(BLOCK_N, BLOCK_K) fp32 Gumbel noise of rows offs_n, codes k0 .. k0 + BLOCK_K (k0 a multiple of 4)."""
        q = tl.arange(0, BLOCK_K // 4).to(tl.int64)
        cnt = offset + offs_n.to(tl.int64)[:, None] * G + (k0 // 4 + q)[None, :]  # (BLOCK_N, BLOCK_K // 4)
        r0, r1, r2, r3 = tl.randint4x(seed, cnt)
        bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # code k0 + 4q + j <- lane j of q
        u = tl.maximum(tl.random.uint_to_uniform_float(bits), 2.3283064365386963e-10)  # U_MIN = 2^-32
        # inner log accurate (libdevice logf): near u = 1, where the winning codes' noise comes from, -log(u) is
        # small and an approximate log's absolute error would dominate it
        e = tl.maximum(-tl.log(u), 1.4901161193847656e-08)  # E_MIN = 2^-26
        if FAST_LOG:  # e >= 2^-26 is normal: lg2.approx's relative error (~2^-22) is an absolute error in g
            return -_fast_logf(e)
        else:
            return -tl.log(e)

    @triton.jit
    def _gumbel_scores(
        logits_ptr, offs_n, mask_n, offs_k, K, stride_l_row, stride_l_col, sampled, any_sampled, seed, offset, G,
        k0, inv_tau, HAS_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, FAST_LOG: tl.constexpr,
    ):  # fmt: skip
        """Scores s = (l + g) * r of one tile (fp32; -inf past K or N), and the raw logits l (fp32)."""
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        l_ptrs = logits_ptr + offs_n.to(tl.int64)[:, None] * stride_l_row + offs_k.to(tl.int64)[None, :] * stride_l_col
        lv = tl.load(l_ptrs, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_ROWS:
            if any_sampled:  # a tile without sampled rows skips the Philox rounds and the two logs
                g = _gumbel_noise(seed, offset, offs_n, k0, G, BLOCK_K, FAST_LOG)
                s = (lv + tl.where(sampled[:, None], g, 0.0)) * inv_tau
            else:
                s = lv * inv_tau
        else:
            s = (lv + _gumbel_noise(seed, offset, offs_n, k0, G, BLOCK_K, FAST_LOG)) * inv_tau
        return s, lv

    @triton.jit
    def _row_flags(rows_ptr, philox_ptr, offs_n, mask_n, stride_rows, HAS_ROWS: tl.constexpr):
        """Per-row sampled flags of a row block, whether any is set, and the Philox (seed, offset)."""
        if HAS_ROWS:
            sampled = tl.load(rows_ptr + offs_n.to(tl.int64) * stride_rows, mask=mask_n, other=0) != 0
            any_sampled = tl.max(sampled.to(tl.int32), axis=0) > 0
        else:
            sampled = mask_n
            any_sampled = True
        seed = tl.load(philox_ptr)
        offset = tl.load(philox_ptr + 1)
        return sampled, any_sampled, seed, offset

    @triton.jit
    def _gumbel_softmax_fwd_kernel(
        logits_ptr,  # (N, K) logits, fp32 / bf16 / fp16, any strides
        rows_ptr,  # (N,) bool: True = Gumbel-sampled row, False = argmax row (HAS_ROWS only)
        philox_ptr,  # (2,) int64: seed, counter offset
        y_ptr,  # (N, K) contiguous out: one-hot (HARD) or soft sample (WRITE_Y only)
        idx_ptr,  # (N,) int64 out: argmax of s, -1 for a non-finite row
        lse_ptr,  # (N,) fp32 out: log-sum-exp of s (WRITE_LSE only)
        best_ptr,  # (N,) int64 out: argmax of l * r without noise (WITH_BEST only)
        N,
        K,
        G,  # counters per row: ceil(K / 4)
        stride_l_row,
        stride_l_col,
        stride_rows,
        inv_tau,  # fp32 1 / tau
        HAS_ROWS: tl.constexpr,
        HARD: tl.constexpr,
        WRITE_Y: tl.constexpr,
        WRITE_LSE: tl.constexpr,
        WITH_BEST: tl.constexpr,
        SINGLE: tl.constexpr,  # the whole row is one tile (BLOCK_K >= K)
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FAST_LOG: tl.constexpr,  # outer log of the noise on the GPU's SFU (lg2.approx); off in the interpreter
    ):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        lane = tl.arange(0, BLOCK_K)
        sampled, any_sampled, seed, offset = _row_flags(rows_ptr, philox_ptr, offs_n, mask_n, stride_rows, HAS_ROWS)
        if SINGLE:
            s, lv = _gumbel_scores(logits_ptr, offs_n, mask_n, lane, K, stride_l_row, stride_l_col, sampled,
                                   any_sampled, seed, offset, G, 0, inv_tau, HAS_ROWS, BLOCK_K, FAST_LOG)  # fmt: skip
            isnan = s != s
            nan_row = tl.max(isnan.to(tl.int32), axis=1) > 0
            s = tl.where(isnan, float("-inf"), s)
            m = tl.max(s, axis=1)
            bad = nan_row | (m == float("inf")) | (m == float("-inf"))
            idx = tl.min(tl.where(s == m[:, None], lane[None, :], 2147483647), axis=1)
            if WITH_BEST:
                b = tl.where(isnan, float("-inf"), lv * inv_tau)
                bm = tl.max(b, axis=1)
                bidx = tl.min(tl.where(b == bm[:, None], lane[None, :], 2147483647), axis=1)
                tl.store(best_ptr + offs_n, tl.where(bad, -1, bidx).to(tl.int64), mask=mask_n)
            if WRITE_LSE or (WRITE_Y and not HARD):
                m_sub = tl.where(bad, 0.0, m)
                p = tl.exp(s - m_sub[:, None])
                z = tl.where(bad, 1.0, tl.sum(p, axis=1))  # non-finite rows (and rows past N) end up NaN below
                if WRITE_LSE:
                    tl.store(lse_ptr + offs_n, tl.where(bad, float("nan"), m + tl.log(z)), mask=mask_n)
            if WRITE_Y:
                if HARD:
                    y = (lane[None, :] == idx[:, None]).to(tl.float32)
                else:
                    y = p * (1.0 / z)[:, None]
                y = tl.where(bad[:, None], float("nan"), y)
                y_ptrs = y_ptr + offs_n.to(tl.int64)[:, None] * K + lane[None, :]
                tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & (lane < K)[None, :])
        else:
            # one pass for the row statistics (online max / sum, fp32), a second to write y
            m = tl.full([BLOCK_N], float("-inf"), tl.float32)
            idx = tl.zeros([BLOCK_N], dtype=tl.int32)
            z = tl.zeros([BLOCK_N], dtype=tl.float32)
            nan_row = tl.zeros([BLOCK_N], dtype=tl.int32)
            bm = tl.full([BLOCK_N], float("-inf"), tl.float32)
            bidx = tl.zeros([BLOCK_N], dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + lane
                s, lv = _gumbel_scores(logits_ptr, offs_n, mask_n, offs_k, K, stride_l_row, stride_l_col,
                                       sampled, any_sampled, seed, offset, G, k0, inv_tau, HAS_ROWS, BLOCK_K,
                                       FAST_LOG)  # fmt: skip
                isnan = s != s
                nan_row = tl.maximum(nan_row, tl.max(isnan.to(tl.int32), axis=1))
                s = tl.where(isnan, float("-inf"), s)
                tmax = tl.max(s, axis=1)
                targ = tl.min(tl.where(s == tmax[:, None], offs_k[None, :], 2147483647), axis=1)
                if WRITE_LSE or (WRITE_Y and not HARD):
                    m_new = tl.maximum(m, tmax)
                    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep z = 0, not NaN
                    z = z * tl.exp(m - m_sub) + tl.sum(tl.exp(s - m_sub[:, None]), axis=1)
                upd = tmax > m  # strict: an equal maximum in a later tile keeps the lower index
                idx = tl.where(upd, targ, idx)
                m = tl.where(upd, tmax, m)
                if WITH_BEST:
                    b = tl.where(isnan, float("-inf"), lv * inv_tau)
                    btmax = tl.max(b, axis=1)
                    btarg = tl.min(tl.where(b == btmax[:, None], offs_k[None, :], 2147483647), axis=1)
                    bupd = btmax > bm
                    bidx = tl.where(bupd, btarg, bidx)
                    bm = tl.where(bupd, btmax, bm)
            bad = (nan_row > 0) | (m == float("inf")) | (m == float("-inf"))
            if WITH_BEST:
                tl.store(best_ptr + offs_n, tl.where(bad, -1, bidx).to(tl.int64), mask=mask_n)
            lse = tl.where(bad, float("nan"), m + tl.log(tl.where(bad, 1.0, z)))
            if WRITE_LSE:
                tl.store(lse_ptr + offs_n, lse, mask=mask_n)
            if WRITE_Y:
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + lane
                    if HARD:
                        y = (offs_k[None, :] == idx[:, None]).to(tl.float32)
                        y = tl.where(bad[:, None], float("nan"), y)
                    else:  # the noise again, from the same counters
                        s, lv = _gumbel_scores(logits_ptr, offs_n, mask_n, offs_k, K, stride_l_row, stride_l_col,
                                               sampled, any_sampled, seed, offset, G, k0, inv_tau, HAS_ROWS,
                                               BLOCK_K, FAST_LOG)  # fmt: skip
                        y = tl.exp(s - lse[:, None])  # NaN rows: lse is NaN
                    y_ptrs = y_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
                    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & (offs_k < K)[None, :])
        tl.store(idx_ptr + offs_n, tl.where(bad, -1, idx).to(tl.int64), mask=mask_n)

    @triton.jit
    def _gumbel_softmax_bwd_kernel(
        grad_ptr,  # (N, K) gradient of the output y, any float dtype, any strides (0 for expanded grads)
        logits_ptr,  # (N, K) the forward's logits, any strides
        rows_ptr,  # (N,) bool sampled rows (HAS_ROWS only)
        philox_ptr,  # (2,) int64 seed, offset: the forward's noise is recomputed
        lse_ptr,  # (N,) fp32 the forward's log-sum-exp (NaN: non-finite row)
        dl_ptr,  # (N, K) contiguous out: gradient of the logits
        N,
        K,
        G,
        stride_g_row,
        stride_g_col,
        stride_l_row,
        stride_l_col,
        stride_rows,
        inv_tau,
        HAS_ROWS: tl.constexpr,
        SINGLE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FAST_LOG: tl.constexpr,  # outer log of the noise on the GPU's SFU (lg2.approx); off in the interpreter
    ):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        lane = tl.arange(0, BLOCK_K)
        sampled, any_sampled, seed, offset = _row_flags(rows_ptr, philox_ptr, offs_n, mask_n, stride_rows, HAS_ROWS)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        bad = lse != lse
        g_row = offs_n.to(tl.int64)[:, None] * stride_g_row
        if SINGLE:
            mask = mask_n[:, None] & (lane < K)[None, :]
            s, lv = _gumbel_scores(logits_ptr, offs_n, mask_n, lane, K, stride_l_row, stride_l_col, sampled,
                                   any_sampled, seed, offset, G, 0, inv_tau, HAS_ROWS, BLOCK_K, FAST_LOG)  # fmt: skip
            dy = tl.load(grad_ptr + g_row + lane.to(tl.int64)[None, :] * stride_g_col, mask=mask, other=0.0)
            dy = dy.to(tl.float32)
            # the forward's soft sample, recomputed from the row in registers (bit-identical to its y)
            s = tl.where(s != s, float("-inf"), s)
            m = tl.max(s, axis=1)
            p = tl.exp(s - tl.where(bad, 0.0, m)[:, None])
            y = p * (1.0 / tl.where(bad, 1.0, tl.sum(p, axis=1)))[:, None]
            dot = tl.sum(y * dy, axis=1)
            dl = (y * (dy - dot[:, None])) * inv_tau
            dl = tl.where(bad[:, None], float("nan"), dl)
            dl_ptrs = dl_ptr + offs_n.to(tl.int64)[:, None] * K + lane[None, :]
            tl.store(dl_ptrs, dl.to(dl_ptr.dtype.element_ty), mask=mask)
        else:
            dot = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + lane
                mask = mask_n[:, None] & (offs_k < K)[None, :]
                s, lv = _gumbel_scores(logits_ptr, offs_n, mask_n, offs_k, K, stride_l_row, stride_l_col,
                                       sampled, any_sampled, seed, offset, G, k0, inv_tau, HAS_ROWS, BLOCK_K,
                                       FAST_LOG)  # fmt: skip
                dy = tl.load(grad_ptr + g_row + offs_k.to(tl.int64)[None, :] * stride_g_col, mask=mask, other=0.0)
                y = tl.exp(s - lse[:, None])
                dot += tl.sum(tl.where(mask, y * dy.to(tl.float32), 0.0), axis=1)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + lane
                mask = mask_n[:, None] & (offs_k < K)[None, :]
                s, lv = _gumbel_scores(logits_ptr, offs_n, mask_n, offs_k, K, stride_l_row, stride_l_col,
                                       sampled, any_sampled, seed, offset, G, k0, inv_tau, HAS_ROWS, BLOCK_K,
                                       FAST_LOG)  # fmt: skip
                dy = tl.load(grad_ptr + g_row + offs_k.to(tl.int64)[None, :] * stride_g_col, mask=mask, other=0.0)
                y = tl.exp(s - lse[:, None])
                dl = (y * (dy.to(tl.float32) - dot[:, None])) * inv_tau
                dl_ptrs = dl_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
                tl.store(dl_ptrs, dl.to(dl_ptr.dtype.element_ty), mask=mask)


# ================================================================================================== 2. launchers
def _check_inputs(logits, philox, tau, sample_rows) -> None:
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    if logits.shape[1] == 0:
        raise ValueError(
            f"logits: expected at least one code (K >= 1) along the softmax dim, got {tuple(logits.shape)}"
        )
    check_tensor("philox", philox, ndim=1, dtypes=(torch.int64,))
    if philox.shape[0] != 2:
        raise ValueError(f"philox: expected a (2,) int64 tensor (seed, offset), got shape {tuple(philox.shape)}")
    check_tau(tau)
    if sample_rows is not None:
        check_tensor("sample_rows", sample_rows, ndim=1, dtypes=(torch.bool,))
        if sample_rows.shape[0] != logits.shape[0]:
            raise ValueError(f"sample_rows: expected shape ({logits.shape[0]},) (one flag per row of logits), "
                             f"got {tuple(sample_rows.shape)}")  # fmt: skip
    check_same_device(logits=logits, philox=philox, sample_rows=sample_rows)


def check_tau(tau) -> None:
    """tau must be a finite real number > 0 (a Python number or a one-element tensor)."""
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1:
            raise ValueError(f"tau: expected a number or a one-element tensor, got shape {tuple(tau.shape)}")
        tau = float(tau)
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau: expected a positive finite number, got {type(tau).__name__}")
    if not (math.isfinite(float(tau)) and float(tau) > 0):
        raise ValueError(f"tau: expected a finite temperature > 0, got {tau}")


def _fast_log(device: torch.device) -> bool:
    """lg2.approx for the outer log: NVIDIA GPUs (and the compile gate's meta launches), not the interpreter."""
    return _fast_logf is not None and device.type != "cpu" and torch.version.hip is None


def _launch_meta(logits, sample_rows):
    n, k = logits.shape
    dev = logits.device
    plan = gumbel_plan(n, k, launch_target(dev), dev.type == "cpu")
    rows = sample_rows if sample_rows is not None else logits  # a placeholder pointer when HAS_ROWS is False
    stride_rows = sample_rows.stride(0) if sample_rows is not None else 0
    return n, k, -(-k // 4), plan, rows, stride_rows


def _gumbel_fwd_triton(logits, sample_rows, philox, tau, hard, write_y, with_best):
    n, k, g, plan, rows, stride_rows = _launch_meta(logits, sample_rows)
    dev = logits.device
    ydt = store_dtype(logits.dtype, dev)
    y = new_output((n, k) if write_y else (0, k), ydt, dev)
    idx = new_output(n, torch.int64, dev)
    lse = new_output(n if write_y else 0, torch.float32, dev)
    best = new_output(n if with_best else 0, torch.int64, dev)
    if n > 0:
        with device_guard(dev):
            _gumbel_softmax_fwd_kernel[(triton.cdiv(n, plan["BLOCK_N"]),)](
                logits, rows, philox, y, idx, lse, best, n, k, g, logits.stride(0), logits.stride(1), stride_rows,
                inv_tau(tau), HAS_ROWS=sample_rows is not None, HARD=hard, WRITE_Y=write_y,
                WRITE_LSE=write_y, WITH_BEST=with_best, SINGLE=plan["SINGLE"], BLOCK_N=plan["BLOCK_N"],
                BLOCK_K=plan["BLOCK_K"], FAST_LOG=_fast_log(dev), num_warps=plan["num_warps"],
            )  # fmt: skip
    if ydt != logits.dtype:
        y = y.to(logits.dtype)
    return y, idx, lse, best


def _gumbel_bwd_triton(grad, logits, sample_rows, philox, lse, tau):
    n, k, g, plan, rows, stride_rows = _launch_meta(logits, sample_rows)
    dev = logits.device
    ddt = store_dtype(logits.dtype, dev)
    dl = new_output((n, k), ddt, dev)
    if n > 0:
        with device_guard(dev):
            _gumbel_softmax_bwd_kernel[(triton.cdiv(n, plan["BLOCK_N"]),)](
                grad, logits, rows, philox, lse, dl, n, k, g, grad.stride(0), grad.stride(1), logits.stride(0),
                logits.stride(1), stride_rows, inv_tau(tau), HAS_ROWS=sample_rows is not None,
                SINGLE=plan["SINGLE"], BLOCK_N=plan["BLOCK_N"], BLOCK_K=plan["BLOCK_K"], FAST_LOG=_fast_log(dev),
                num_warps=plan["num_warps"],
            )  # fmt: skip
    return dl.to(logits.dtype) if ddt != logits.dtype else dl


def _no_triton_warning(logits) -> None:
    if not HAS_TRITON and logits.dtype != torch.float64:
        warnings.warn("mimfast: triton is not importable; gumbel_softmax runs its PyTorch reference", stacklevel=3)


# =================================================================================================== 3. bindings
@torch.library.custom_op("mimfast::gumbel_softmax", mutates_args=(), device_types="cuda")
def _gumbel_op(
    logits: torch.Tensor,
    sample_rows: torch.Tensor | None,
    philox: torch.Tensor,
    tau: float,
    hard: bool,
    write_y: bool,
    with_best: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (N, K) or (0, K), indices (N,) int64, lse (N,) fp32 or (0,), best (N,) int64 or (0,))."""
    if use_triton(logits):
        return _gumbel_fwd_triton(logits, sample_rows, philox, tau, hard, write_y, with_best)
    _no_triton_warning(logits)
    return _gumbel_ref_impl(logits, sample_rows, philox, tau, hard, write_y, with_best)


@_gumbel_op.register_kernel("cpu")
def _gumbel_cpu(logits, sample_rows, philox, tau, hard, write_y, with_best):
    if interpret_mode() and use_triton(logits):
        return _gumbel_fwd_triton(logits, sample_rows, philox, tau, hard, write_y, with_best)
    native = _native.op("gumbel_softmax", logits)  # the C++ kernel (csrc/) when built; fp64 takes the reference
    if native is not None:
        return native(logits, sample_rows, philox, tau, hard, write_y, with_best)
    return _gumbel_ref_impl(logits, sample_rows, philox, tau, hard, write_y, with_best)


@_gumbel_op.register_fake
def _gumbel_fake(logits, sample_rows, philox, tau, hard, write_y, with_best):
    n, k = logits.shape
    return (
        logits.new_empty((n, k) if write_y else (0, k)),
        logits.new_empty(n, dtype=torch.int64),
        logits.new_empty(n if write_y else 0, dtype=torch.float32),
        logits.new_empty(n if with_best else 0, dtype=torch.int64),
    )


@torch.library.custom_op("mimfast::gumbel_softmax_bwd", mutates_args=(), device_types="cuda")
def _gumbel_bwd_op(
    grad: torch.Tensor,
    logits: torch.Tensor,
    sample_rows: torch.Tensor | None,
    philox: torch.Tensor,
    lse: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """Gradient of the logits: r * y * (grad - sum(y * grad)), y the recomputed soft sample."""
    if use_triton(logits):
        return _gumbel_bwd_triton(grad, logits, sample_rows, philox, lse, tau)
    return _gumbel_bwd_ref_impl(grad, logits, sample_rows, philox, lse, tau)


@_gumbel_bwd_op.register_kernel("cpu")
def _gumbel_bwd_cpu(grad, logits, sample_rows, philox, lse, tau):
    if interpret_mode() and use_triton(logits):
        return _gumbel_bwd_triton(grad, logits, sample_rows, philox, lse, tau)
    native = _native.op("gumbel_softmax_bwd", logits)
    if native is not None:
        return native(grad, logits, sample_rows, philox, lse, tau)
    return _gumbel_bwd_ref_impl(grad, logits, sample_rows, philox, lse, tau)


@_gumbel_bwd_op.register_fake
def _gumbel_bwd_fake(grad, logits, sample_rows, philox, lse, tau):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _gumbel_setup(ctx, inputs, output):
    logits, sample_rows, philox, tau, hard, write_y, with_best = inputs
    _, _, lse, _ = output
    ctx.save_for_backward(logits, sample_rows, philox, lse)  # never an N x K sample: the noise is recomputed
    ctx.tau, ctx.write_y = tau, write_y


def _gumbel_backward(ctx, grad_y, grad_idx, grad_lse, grad_best):
    logits, sample_rows, philox, lse = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or grad_y is None or not ctx.write_y:
        return None, None, None, None, None, None, None
    grad = torch.ops.mimfast.gumbel_softmax_bwd(grad_y, logits, sample_rows, philox, lse, ctx.tau)
    return grad, None, None, None, None, None, None


_gumbel_op.register_autograd(_gumbel_backward, setup_context=_gumbel_setup)


def gumbel_softmax(
    logits: torch.Tensor,
    philox: torch.Tensor,
    tau: float = 1.0,
    *,
    hard: bool = False,
    sample_rows: torch.Tensor | None = None,
    write_y: bool = True,
    with_best: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Gumbel-softmax of every row of ``logits`` with explicit Philox state (see the module docstring).

    Args:
        logits: (N, K) fp32 / bf16 / fp16 (fp64 takes the reference), any strides, K >= 1; N may be 0.
        philox: (2,) int64 (seed, counter offset) on the logits' device (``mimfast.ops`` draws it from a generator).
        tau: temperature > 0.
        hard: output one_hot(argmax) with the soft sample's gradient (straight-through), else the soft sample.
        sample_rows: optional (N,) bool; True rows get Gumbel noise, False rows none (plain argmax / softmax).
            None: every row is sampled.
        write_y: False: indices only, no N x K output (no gradient).
        with_best: also return the argmax of the noise-free logits (the best match), (N,) int64.

    Returns:
        (y (N, K) in the logits' dtype, differentiable, or None; indices (N,) int64, -1 for non-finite rows;
        best (N,) int64 or None).
    """
    _check_inputs(logits, philox, tau, sample_rows)
    y, idx, _, best = torch.ops.mimfast.gumbel_softmax(
        logits, sample_rows, philox, float(tau), bool(hard), bool(write_y), bool(with_best)
    )
    return (y if write_y else None), idx, (best if with_best else None)


# ================================================================================================= 4. references
def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a (int64 tensor holding uint32 values) and a uint32 constant b, without
    overflowing int64: a = ah * 2^16 + al, a * b = (ah * b + (al * b >> 16)) * 2^16 + (al * b & 0xFFFF)."""
    ah, al = a >> 16, a & 0xFFFF
    p = al * b
    t = ah * b + (p >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (p & 0xFFFF)


def philox4x32_ref(seed: int, counters: torch.Tensor, rounds: int = PHILOX_ROUNDS):
    """Philox4x32-10 in int64 torch ops, as ``triton.language.randint4x(seed, counters)`` with int64 counters:
    c0 / c1 = low / high 32 bits of the counter, c2 = c3 = 0, key = (seed low, seed high). Returns four int64
    tensors holding uint32 values."""
    counters = counters.to(torch.int64)
    c0, c1 = counters & _M32, (counters >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = int(seed) & _M32, (int(seed) >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, _PHILOX_ROUND_A)
        c0, c2 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def uniform_ref(bits: torch.Tensor) -> torch.Tensor:
    """triton's uint_to_uniform_float for uint32 values held in int64: fp32 in [0, 1)."""
    v = torch.where(bits >= 2**31, _M32 - bits, bits)
    return v.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=bits.device)


def exponential_noise_ref(philox, rows: int | range, k: int, *, device=None) -> torch.Tensor:
    """E = max(-log(max(u, 2^-32)), 2^-26), the Exp(1) variate behind the kernel's noise g = -log(E), of rows
    ``rows`` (a count from 0, or a range) and K codes: (len(rows), K) fp32. ``philox``: (seed, offset) as a (2,)
    tensor or a pair of ints."""
    seed, offset = (int(v) for v in (philox.tolist() if isinstance(philox, torch.Tensor) else philox))
    if device is None:
        device = philox.device if isinstance(philox, torch.Tensor) else "cpu"
    rows = range(rows) if isinstance(rows, int) else rows
    g = -(-k // 4)
    n = torch.arange(rows.start, rows.stop, dtype=torch.int64, device=device)
    cnt = offset + n[:, None] * g + torch.arange(g, dtype=torch.int64, device=device)[None, :]
    lanes = torch.stack(philox4x32_ref(seed, cnt), dim=-1).reshape(len(n), 4 * g)[:, :k]
    u = uniform_ref(lanes).clamp_min(U_MIN)
    return (-torch.log(u)).clamp_min(E_MIN)


def gumbel_noise_ref(philox, rows: int | range, k: int, *, device=None) -> torch.Tensor:
    """The kernel's Gumbel noise g = -log(E) (module docstring): (len(rows), K) fp32, see exponential_noise_ref."""
    return -torch.log(exponential_noise_ref(philox, rows, k, device=device))


def _scores_ref(logits, sample_rows, philox, tau, r0, r1):
    """s = (l + g) * r for rows r0:r1 in fp32 (fp64 for fp64 logits; there r = 1 / tau in fp64)."""
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lv = logits[r0:r1].to(ct)
    g = gumbel_noise_ref(philox, range(r0, r1), logits.shape[1], device=logits.device).to(ct)
    if sample_rows is not None:
        g = torch.where(sample_rows[r0:r1, None], g, torch.zeros((), dtype=ct, device=g.device))
    r = torch.tensor(1.0 / tau if ct == torch.float64 else inv_tau(tau), dtype=ct, device=logits.device)
    return (lv + g) * r, lv * r


def _row_stats_ref(s):
    """Clean scores (NaN -> -inf), the non-finite-row flags, the row max and the log-sum-exp."""
    nan_row = torch.isnan(s).any(dim=1)
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    m = s.max(dim=1).values
    bad = nan_row | torch.isinf(m)
    m_sub = torch.where(bad, torch.zeros_like(m), m)
    lse = m + torch.log(torch.exp(s - m_sub[:, None]).sum(dim=1))  # with m_sub = m on good rows
    lse = torch.where(bad, torch.full_like(lse, float("nan")), lse)
    return s, bad, m_sub, lse


def _gumbel_ref_forward(logits, sample_rows, philox, tau, hard, write_y, with_best):
    """The reference forward over row chunks; y is autograd-connected to logits when grad mode is on."""
    n, k = logits.shape
    rows = max(1, _REF_CHUNK_ELEMS // max(k, 1))
    ys, idxs, lses, bests = [], [], [], []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        s, b = _scores_ref(logits, sample_rows, philox, tau, r0, r1)
        s, bad, m_sub, lse = _row_stats_ref(s)
        idx = torch.where(bad, torch.full_like(bad, -1, dtype=torch.int64), s.argmax(dim=1))  # first maximum
        idxs.append(idx)
        lses.append(lse.float())
        if with_best:
            b = torch.where(torch.isnan(b), torch.full_like(b, float("-inf")), b)
            bests.append(torch.where(bad, torch.full_like(idx, -1), b.argmax(dim=1)))
        if write_y:
            y = torch.softmax(s - m_sub[:, None], dim=1)
            if hard:  # exactly one-hot forward, the soft sample's gradient (F.gumbel_softmax's straight-through)
                y = F_one_hot(idx.clamp_min(0), k, y.dtype) + (y - y.detach())
            ys.append(torch.where(bad[:, None], torch.full_like(y, float("nan")), y))
    cat = lambda ts, empty: torch.cat(ts) if ts else empty  # noqa: E731
    dev = logits.device
    y = cat(ys, torch.empty(0, k, device=dev)).to(logits.dtype) if write_y else logits.new_empty(0, k)
    idx = cat(idxs, torch.empty(0, dtype=torch.int64, device=dev))
    lse = cat(lses, torch.empty(0, device=dev)) if write_y else torch.empty(0, device=dev)
    best = cat(bests, torch.empty(0, dtype=torch.int64, device=dev)) if with_best else idx.new_empty(0)
    return y, idx, lse, best


def F_one_hot(idx: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:  # noqa: N802
    return torch.zeros(idx.shape[0], k, dtype=dtype, device=idx.device).scatter_(1, idx[:, None], 1.0)


def _gumbel_ref_impl(logits, sample_rows, philox, tau, hard, write_y, with_best):
    with torch.no_grad():
        return _gumbel_ref_forward(logits, sample_rows, philox, tau, hard, write_y, with_best)


def _gumbel_bwd_ref_impl(grad, logits, sample_rows, philox, lse, tau):
    n, k = logits.shape
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = torch.empty(n, k, dtype=logits.dtype, device=logits.device)
    r = torch.tensor(1.0 / tau if ct == torch.float64 else inv_tau(tau), dtype=ct, device=logits.device)
    rows = max(1, _REF_CHUNK_ELEMS // k)
    with torch.no_grad():
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            s, _ = _scores_ref(logits, sample_rows, philox, tau, r0, r1)
            s, bad, m_sub, _ = _row_stats_ref(s)
            y = torch.softmax(s - m_sub[:, None], dim=1)
            dy = grad[r0:r1].to(ct)
            dl = y * (dy - (y * dy).sum(dim=1, keepdim=True)) * r
            out[r0:r1] = torch.where(bad[:, None], torch.full_like(dl, float("nan")), dl).to(logits.dtype)
    return out


def gumbel_softmax_ref(
    logits: torch.Tensor,
    philox: torch.Tensor,
    tau: float = 1.0,
    *,
    hard: bool = False,
    sample_rows: torch.Tensor | None = None,
    write_y: bool = True,
    with_best: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Plain-PyTorch reference of :func:`gumbel_softmax` (same arguments, same results): the spec and the oracle.

    Differentiable through ordinary autograd (softmax of the scores; ``hard`` adds ``y - y.detach()`` to the
    one-hot), so ``torch.autograd.gradcheck`` runs on it in float64. fp32 statistics for fp32 / bf16 / fp16 logits.
    """
    _check_inputs(logits, philox, tau, sample_rows)
    y, idx, _, best = _gumbel_ref_forward(logits, sample_rows, philox, float(tau), hard, write_y, with_best)
    return (y if write_y else None), idx, (best if with_best else None)

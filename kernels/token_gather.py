"""Masked-token gather and restore: ``mimfast::gather_tokens``, ``mimfast::restore_tokens``.

MAE-style encoders run on the visible tokens only, and their decoders put the tokens back in image order with a
filler (MAE's mask token, MAGE's class-token feature) in the removed slots. The official code does this with an int64
index expanded to the activations' shape, a ``cat``, a ``repeat`` and two ``gather`` calls. These ops do each side in
one pass over the bytes that must move, with the position-embedding add, the class-token prefix and the filler fused.

gather (encoder side), P = number of prefix rows (0 or more, e.g. the class token)::

    out[b, p]     = prefix[b or 0, p]                                       p < P
    out[b, P + j] = x[b, ids_keep[b, j]] + pos[ids_keep[b, j]]              j < Lk

restore (decoder side), x holds P prefix rows then Lk visible rows, ids_restore is MAE's (B, L) restore index::

    out[b, p]     = x[b, p] + pos[p]                                        p < P
    out[b, P + l] = x[b, P + r] + pos[P + l]    if r = ids_restore[b, l] < Lk
                  = fill[b or 0] + pos[P + l]   if Lk <= r < L   (a removed slot)

Index contract (checked by ``mimfast.ops`` when ``validate`` is on, which it is on CPU by default):

* ``ids_keep[b]`` holds Lk distinct positions in [0, L); ``ids_restore[b]`` is its inverse: ``ids_restore[b,
  ids_keep[b, j]] = j`` and every other entry is >= Lk. MAE's (ids_keep, ids_restore) pair satisfies this.
* for restore, each visible row j < Lk is referenced at most once (exactly once when ``covers_all``).
* An index outside [0, L) is never dereferenced: the kernels mask the access and write NaN for that row, so a bad
  index shows up as NaN instead of a memory fault (CUDA path; the reference raises).

Gradients never need an atomic: the gather's input gradient is a restore with a zero filler (scatter through the
inverse index), and the restore's is one pass that writes visible rows to their unique slot and sums the filled
rows per sample for the filler's gradient. Values are added in fp32 and stored in the output dtype, which follows
torch's type promotion of (x, pos, fill, prefix) exactly as ``x + pos`` would.

Layout of this file (STYLE.md): Triton kernels, launchers, ``torch.library`` bindings with autograd and CPU
kernels, and the plain-PyTorch references ``gather_tokens_ref`` / ``restore_tokens_ref``.
"""

from __future__ import annotations

import warnings

import torch

from . import _native
from ._common import (
    HAS_TRITON,
    device_guard,
    interpret_mode,
    new_output,
    next_pow2,
    store_dtype,
    token_rows_config,
    use_triton,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

INDEX_DTYPES = (torch.int32, torch.int64)


# =================================================================================================== 1. kernels
if HAS_TRITON:

    @triton.jit
    def _gather_tokens_fwd_kernel(
        x_ptr,  # (B, L, D) tokens
        idx_ptr,  # (B, LK) int32/int64 positions to keep
        pos_ptr,  # (L, D) position embedding, read at the kept positions (HAS_POS)
        pre_ptr,  # (B or 1, P, D) prefix rows copied to the front (HAS_PREFIX)
        out_ptr,  # (B, P + LK, D)
        L, LK, D, P, n_lblocks,  # sizes; n_lblocks = cdiv(P + LK, BLOCK_L)
        stride_xb, stride_xl, stride_xd,
        stride_ib, stride_il,
        stride_pl, stride_pd,
        stride_qb, stride_qp, stride_qd,  # prefix strides; stride_qb = 0 for a shared prefix
        stride_ob, stride_ol, stride_od,
        HAS_POS: tl.constexpr,
        HAS_PREFIX: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b = (pid // n_lblocks).to(tl.int64)
        o = (pid % n_lblocks) * BLOCK_L + tl.arange(0, BLOCK_L)  # output rows
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        d64 = offs_d.to(tl.int64)  # 64-bit offsets: feature strides of huge views must not wrap
        o64 = o.to(tl.int64)
        is_tok = (o >= P) & (o < P + LK)
        i = tl.load(idx_ptr + b * stride_ib + (o64 - P) * stride_il, mask=is_tok, other=0).to(tl.int64)
        ok = (i >= 0) & (i < L)
        i = tl.where(ok, i, 0)
        m = (is_tok & ok)[:, None] & mask_d[None, :]
        val = tl.load(x_ptr + b * stride_xb + i[:, None] * stride_xl + d64[None, :] * stride_xd, mask=m, other=0.0)
        val = val.to(tl.float32)
        if HAS_POS:
            pe = tl.load(pos_ptr + i[:, None] * stride_pl + d64[None, :] * stride_pd, mask=m, other=0.0)
            val += pe.to(tl.float32)
        val = tl.where((is_tok & ~ok)[:, None], float("nan"), val)
        if HAS_PREFIX:
            is_pre = o < P
            mp = is_pre[:, None] & mask_d[None, :]
            pre = tl.load(pre_ptr + b * stride_qb + o64[:, None] * stride_qp + d64[None, :] * stride_qd, mask=mp)
            val = tl.where(is_pre[:, None], pre.to(tl.float32), val)
        out = out_ptr + b * stride_ob + o64[:, None] * stride_ol + d64[None, :] * stride_od
        tl.store(out, val.to(out_ptr.dtype.element_ty), mask=(o < P + LK)[:, None] & mask_d[None, :])

    @triton.jit
    def _restore_tokens_fwd_kernel(
        x_ptr,  # (B, P + LK, D): prefix rows, then the visible rows
        ridx_ptr,  # (B, L) int32/int64 restore index; r < LK picks visible row r, LK <= r < L takes the filler
        fill_ptr,  # (B or 1, D) filler (FILL); its batch stride is 0 when shared
        pos_ptr,  # (P + L, D) position embedding added to every output row (HAS_POS)
        out_ptr,  # (B, P + L, D)
        L, LK, D, P, n_lblocks,
        stride_xb, stride_xl, stride_xd,
        stride_rb, stride_rl,
        stride_fb, stride_fd,
        stride_pl, stride_pd,
        stride_ob, stride_ol, stride_od,
        FILL: tl.constexpr,  # False: removed slots get 0 (the gather's backward)
        HAS_POS: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b = (pid // n_lblocks).to(tl.int64)
        o = (pid % n_lblocks) * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        d64 = offs_d.to(tl.int64)  # 64-bit offsets: feature strides of huge views must not wrap
        o64 = o.to(tl.int64)
        in_out = o < P + L
        is_tok = (o >= P) & in_out
        r = tl.load(ridx_ptr + b * stride_rb + (o64 - P) * stride_rl, mask=is_tok, other=0).to(tl.int64)
        ok = (r >= 0) & (r < L)
        visible = is_tok & ok & (r < LK)
        src = tl.where(visible, P + r, o64)  # prefix rows pass through
        take = (visible | (o < P))[:, None] & mask_d[None, :]
        val = tl.load(x_ptr + b * stride_xb + src[:, None] * stride_xl + d64[None, :] * stride_xd, mask=take, other=0.0)
        val = val.to(tl.float32)
        if FILL:
            fv = tl.load(fill_ptr + b * stride_fb + d64 * stride_fd, mask=mask_d, other=0.0).to(tl.float32)
            val = tl.where((is_tok & ok & (r >= LK))[:, None], fv[None, :], val)
        if HAS_POS:
            mo = in_out[:, None] & mask_d[None, :]
            pe = tl.load(pos_ptr + o64[:, None] * stride_pl + d64[None, :] * stride_pd, mask=mo, other=0.0)
            val += pe.to(tl.float32)
        val = tl.where((is_tok & ~ok)[:, None], float("nan"), val)
        out = out_ptr + b * stride_ob + o64[:, None] * stride_ol + d64[None, :] * stride_od
        tl.store(out, val.to(out_ptr.dtype.element_ty), mask=in_out[:, None] & mask_d[None, :])

    @triton.jit
    def _restore_tokens_bwd_kernel(
        g_ptr,  # (B, P + L, D) gradient of the restore output
        ridx_ptr,  # (B, L) restore index
        gx_ptr,  # (B, P + LK, D) out: gradient of x (prefix rows and visible rows, gathered)
        part_ptr,  # (B, n_chunks, D) fp32 out: per-chunk sums of the gradient over filled slots (FILL)
        L, LK, D, P, n_jblocks, n_chunks,
        stride_gb, stride_gl, stride_gd,
        stride_rb, stride_rl,
        stride_xb, stride_xl, stride_xd,
        FILL: tl.constexpr,
        ORPHAN_NAN: tl.constexpr,  # a visible row no valid index points to gets NaN (True) or 0 (False)
        BLOCK_L: tl.constexpr,  # rows per step
        BLOCK_R: tl.constexpr,  # restore-index entries compared per step when looking up a visible row's slot
        CHUNK: tl.constexpr,  # filled-slot rows summed per program (a multiple of BLOCK_L)
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # Programs [0, n_jblocks) of each sample gather BLOCK_L rows of gx: prefix rows copy g, visible row j reads
        # the slot o with ids_restore[b, o] == j (found by comparing against the index row: no inverse index, no
        # scatter). Programs [n_jblocks, n_jblocks + n_chunks) sum CHUNK slots of the filled rows' gradient. No
        # atomics; every sum has a fixed order.
        pid = tl.program_id(0)
        b = (pid // (n_jblocks + n_chunks)).to(tl.int64)
        t = pid % (n_jblocks + n_chunks)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        d64 = offs_d.to(tl.int64)
        if t < n_jblocks:
            j = t * BLOCK_L + tl.arange(0, BLOCK_L)  # gx rows
            in_x = j < P + LK
            jv = j - P  # visible row index (negative for prefix rows)
            src = tl.full([BLOCK_L], -1, tl.int32)
            for o0 in range(0, L, BLOCK_R):
                o = o0 + tl.arange(0, BLOCK_R)
                r = tl.load(ridx_ptr + b * stride_rb + o.to(tl.int64) * stride_rl, mask=o < L, other=-1)
                hit = (r.to(tl.int32)[None, :] == jv[:, None]) & (jv[:, None] >= 0)
                src = tl.maximum(src, tl.max(tl.where(hit, o[None, :], -1), axis=1))
            row = tl.where(jv < 0, j, P + src)  # prefix rows pass through
            found = (jv < 0) | (src >= 0)
            m = (in_x & found)[:, None] & mask_d[None, :]
            val = tl.load(g_ptr + b * stride_gb + row.to(tl.int64)[:, None] * stride_gl + d64[None, :] * stride_gd,
                          mask=m, other=0.0).to(tl.float32)  # fmt: skip
            if ORPHAN_NAN:
                val = tl.where((in_x & ~found)[:, None], float("nan"), val)
            tl.store(gx_ptr + b * stride_xb + j.to(tl.int64)[:, None] * stride_xl + d64[None, :] * stride_xd,
                     val.to(gx_ptr.dtype.element_ty), mask=in_x[:, None] & mask_d[None, :])  # fmt: skip
        elif FILL:
            c = t - n_jblocks
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for s0 in range(0, CHUNK, BLOCK_L):
                l = c * CHUNK + s0 + tl.arange(0, BLOCK_L)  # token slot
                r = tl.load(ridx_ptr + b * stride_rb + l.to(tl.int64) * stride_rl, mask=l < L, other=0)
                filled = (l < L) & (r >= LK) & (r < L)
                slot = (P + l).to(tl.int64)
                g = tl.load(g_ptr + b * stride_gb + slot[:, None] * stride_gl + d64[None, :] * stride_gd,
                            mask=filled[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # fmt: skip
                acc += tl.sum(g, axis=0)
            tl.store(part_ptr + (b * n_chunks + c) * D + offs_d, acc, mask=mask_d)


# ================================================================================================= 2. launchers
def _batch_stride(t: torch.Tensor | None, full_rank: int) -> int:
    """Batch stride of an optional per-sample or shared operand (0 when shared or absent)."""
    return 0 if t is None or t.dim() < full_rank else t.stride(0)


def _gather_tokens_triton(x, ids_keep, pos, prefix, out_dtype):
    bsz, seq, dim = x.shape
    lk = ids_keep.shape[1]
    p = 0 if prefix is None else prefix.shape[-2]
    out = new_output((bsz, p + lk, dim), store_dtype(out_dtype, x.device), x.device)
    if out.numel() == 0:
        return out.to(out_dtype)
    cfg = token_rows_config(p + lk, dim, interpret_mode())
    n_lblocks = triton.cdiv(p + lk, cfg["BLOCK_L"])
    pre = prefix if prefix is not None else x
    pos_ = pos if pos is not None else x
    with device_guard(x.device):
        _gather_tokens_fwd_kernel[(bsz * n_lblocks, triton.cdiv(dim, cfg["BLOCK_D"]))](
            x, ids_keep, pos_, pre, out,
            seq, lk, dim, p, n_lblocks,
            *x.stride(), *ids_keep.stride(),
            pos_.stride(-2), pos_.stride(-1),
            _batch_stride(prefix, 3), pre.stride(-2), pre.stride(-1),
            *out.stride(),
            HAS_POS=pos is not None, HAS_PREFIX=prefix is not None,
            BLOCK_L=cfg["BLOCK_L"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        )  # fmt: skip
    return out.to(out_dtype)


def _restore_tokens_triton(x, ids_restore, fill, pos, num_prefix, out_dtype):
    bsz, rows, dim = x.shape
    seq = ids_restore.shape[1]
    p = num_prefix
    lk = rows - p
    out = new_output((bsz, p + seq, dim), store_dtype(out_dtype, x.device), x.device)
    if out.numel() == 0:
        return out.to(out_dtype)
    cfg = token_rows_config(p + seq, dim, interpret_mode())
    n_lblocks = triton.cdiv(p + seq, cfg["BLOCK_L"])
    fill_ = fill if fill is not None else x
    pos_ = pos if pos is not None else x
    with device_guard(x.device):
        _restore_tokens_fwd_kernel[(bsz * n_lblocks, triton.cdiv(dim, cfg["BLOCK_D"]))](
            x, ids_restore, fill_, pos_, out,
            seq, lk, dim, p, n_lblocks,
            *x.stride(), *ids_restore.stride(),
            _batch_stride(fill, 2), fill_.stride(-1),
            pos_.stride(-2), pos_.stride(-1),
            *out.stride(),
            FILL=fill is not None, HAS_POS=pos is not None,
            BLOCK_L=cfg["BLOCK_L"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        )  # fmt: skip
    return out.to(out_dtype)


def _restore_tokens_bwd_triton(grad, ids_restore, rows, num_prefix, x_dtype, with_fill, covers_all):
    bsz, _, dim = grad.shape
    seq = ids_restore.shape[1]
    lk = rows - num_prefix
    gx = new_output((bsz, rows, dim), x_dtype, grad.device)
    if bsz == 0 or dim == 0 or rows == 0 and not with_fill:
        return gx.zero_(), new_output((bsz, dim) if with_fill else (0, dim), torch.float32, grad.device).zero_()
    cfg = token_rows_config(num_prefix + seq, dim, interpret_mode())
    block_l = cfg["BLOCK_L"]
    chunk = block_l * 4  # four independent row steps per fill program
    n_jblocks = triton.cdiv(rows, block_l)
    n_chunks = triton.cdiv(seq, chunk) if with_fill else 0
    part = new_output((bsz, max(n_chunks, 1), dim) if with_fill else 0, torch.float32, grad.device)
    with device_guard(grad.device):
        _restore_tokens_bwd_kernel[(bsz * (n_jblocks + n_chunks), triton.cdiv(dim, cfg["BLOCK_D"]))](
            grad, ids_restore, gx, part,
            seq, lk, dim, num_prefix, n_jblocks, n_chunks,
            *grad.stride(), *ids_restore.stride(), *gx.stride(),
            FILL=with_fill, ORPHAN_NAN=covers_all, BLOCK_L=block_l, BLOCK_R=min(256, next_pow2(max(seq, 1))),
            CHUNK=chunk, BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        )  # fmt: skip
    if not with_fill:
        return gx, new_output((0, dim), torch.float32, grad.device)
    if n_chunks == 0:
        return gx, torch.zeros((bsz, dim), dtype=torch.float32, device=grad.device)
    return gx, part.sum(1)


def _no_triton_warning(*tensors) -> None:
    if not HAS_TRITON and all(t.dtype != torch.float64 for t in tensors):
        warnings.warn(
            "mimfast: triton is not importable; token gather/restore run their PyTorch reference", stacklevel=3
        )


# =================================================================================================== 3. bindings
# Output dtypes travel as a string so the schema stays simple ("float32", "bfloat16", ...).
def _dtype_from_name(name: str) -> torch.dtype:
    return getattr(torch, name)


@torch.library.custom_op("mimfast::gather_tokens", mutates_args=(), device_types="cuda")
def _gather_tokens_op(
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    ids_restore: torch.Tensor,
    pos: torch.Tensor | None,
    prefix: torch.Tensor | None,
    out_dtype: str,
) -> torch.Tensor:
    dt = _dtype_from_name(out_dtype)
    if use_triton(x, *(t for t in (pos, prefix) if t is not None)) and dt != torch.float64:
        return _gather_tokens_triton(x, ids_keep, pos, prefix, dt)
    _no_triton_warning(x)
    return _gather_tokens_ref_impl(x, ids_keep, pos, prefix, dt)


@_gather_tokens_op.register_kernel("cpu")
def _gather_tokens_cpu(x, ids_keep, ids_restore, pos, prefix, out_dtype):
    dt = _dtype_from_name(out_dtype)
    if interpret_mode() and use_triton(x, *(t for t in (pos, prefix) if t is not None)) and dt != torch.float64:
        return _gather_tokens_triton(x, ids_keep, pos, prefix, dt)
    native = _native.op("gather_tokens", x, pos, prefix, dtypes=(dt,))  # C++ kernel when built; fp64: reference
    if native is not None:
        return native(x, ids_keep, ids_restore, pos, prefix, out_dtype)
    return _gather_tokens_ref_impl(x, ids_keep, pos, prefix, dt)


@_gather_tokens_op.register_fake
def _gather_tokens_fake(x, ids_keep, ids_restore, pos, prefix, out_dtype):
    p = 0 if prefix is None else prefix.shape[-2]
    return x.new_empty((x.shape[0], p + ids_keep.shape[1], x.shape[2]), dtype=_dtype_from_name(out_dtype))


def _gather_setup(ctx, inputs, output):
    x, ids_keep, ids_restore, pos, prefix, _ = inputs
    ctx.save_for_backward(ids_restore)
    ctx.meta = (
        x.shape[1],
        x.dtype,
        None if pos is None else pos.dtype,
        None if prefix is None else (prefix.shape[-2], prefix.dim(), prefix.dtype),
    )


def _gather_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    seq, x_dtype, pos_dtype, pre = ctx.meta
    p = 0 if pre is None else pre[0]
    need_x, _, _, need_pos, need_pre, _ = ctx.needs_input_grad
    gx = gpos = gpre = None
    if need_x or need_pos:
        # d out / d x is a scatter through the inverse index: a restore with a zero filler.
        gx = torch.ops.mimfast.restore_tokens(grad[:, p:], ids_restore, None, None, 0, True, str(x_dtype)[6:])
        if need_pos:
            gpos = gx.sum(0, dtype=torch.float32).to(pos_dtype)
    if need_pre:
        gpre = grad[:, :p].to(pre[2]) if pre[1] == 3 else grad[:, :p].sum(0, dtype=torch.float32).to(pre[2])
    return gx if need_x else None, None, None, gpos, gpre, None


_gather_tokens_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("mimfast::restore_tokens", mutates_args=(), device_types="cuda")
def _restore_tokens_op(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    fill: torch.Tensor | None,
    pos: torch.Tensor | None,
    num_prefix: int,
    covers_all: bool,
    out_dtype: str,
) -> torch.Tensor:
    # covers_all (every visible row is referenced by ids_restore) only matters to the backward.
    dt = _dtype_from_name(out_dtype)
    if use_triton(x, *(t for t in (pos, fill) if t is not None)) and dt != torch.float64:
        return _restore_tokens_triton(x, ids_restore, fill, pos, num_prefix, dt)
    _no_triton_warning(x)
    return _restore_tokens_ref_impl(x, ids_restore, fill, pos, num_prefix, dt)


@_restore_tokens_op.register_kernel("cpu")
def _restore_tokens_cpu(x, ids_restore, fill, pos, num_prefix, covers_all, out_dtype):
    dt = _dtype_from_name(out_dtype)
    if interpret_mode() and use_triton(x, *(t for t in (pos, fill) if t is not None)) and dt != torch.float64:
        return _restore_tokens_triton(x, ids_restore, fill, pos, num_prefix, dt)
    native = _native.op("restore_tokens", x, fill, pos, dtypes=(dt,))
    if native is not None:
        return native(x, ids_restore, fill, pos, num_prefix, covers_all, out_dtype)
    return _restore_tokens_ref_impl(x, ids_restore, fill, pos, num_prefix, dt)


@_restore_tokens_op.register_fake
def _restore_tokens_fake(x, ids_restore, fill, pos, num_prefix, covers_all, out_dtype):
    return x.new_empty((x.shape[0], num_prefix + ids_restore.shape[1], x.shape[2]), dtype=_dtype_from_name(out_dtype))


@torch.library.custom_op("mimfast::restore_tokens_bwd", mutates_args=(), device_types="cuda")
def _restore_tokens_bwd_op(
    grad: torch.Tensor,
    ids_restore: torch.Tensor,
    rows: int,
    num_prefix: int,
    x_dtype: str,
    with_fill: bool,
    covers_all: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dt = _dtype_from_name(x_dtype)
    if use_triton(grad) and dt != torch.float64:
        return _restore_tokens_bwd_triton(grad, ids_restore, rows, num_prefix, dt, with_fill, covers_all)
    return _restore_tokens_bwd_ref_impl(grad, ids_restore, rows, num_prefix, dt, with_fill)


@_restore_tokens_bwd_op.register_kernel("cpu")
def _restore_tokens_bwd_cpu(grad, ids_restore, rows, num_prefix, x_dtype, with_fill, covers_all):
    dt = _dtype_from_name(x_dtype)
    if interpret_mode() and use_triton(grad) and dt != torch.float64:
        return _restore_tokens_bwd_triton(grad, ids_restore, rows, num_prefix, dt, with_fill, covers_all)
    native = _native.op("restore_tokens_bwd", dtypes=(dt,))
    if native is not None:
        return native(grad, ids_restore, rows, num_prefix, x_dtype, with_fill, covers_all)
    return _restore_tokens_bwd_ref_impl(grad, ids_restore, rows, num_prefix, dt, with_fill)


@_restore_tokens_bwd_op.register_fake
def _restore_tokens_bwd_fake(grad, ids_restore, rows, num_prefix, x_dtype, with_fill, covers_all):
    b, _, d = grad.shape
    return (
        grad.new_empty((b, rows, d), dtype=_dtype_from_name(x_dtype)),
        grad.new_empty((b, d) if with_fill else (0, d), dtype=torch.float32),
    )


def _restore_setup(ctx, inputs, output):
    x, ids_restore, fill, pos, num_prefix, covers_all, _ = inputs
    ctx.save_for_backward(ids_restore)
    ctx.meta = (
        x.shape[1],
        num_prefix,
        x.dtype,
        None if fill is None else (fill.dim(), fill.dtype),
        None if pos is None else pos.dtype,
        covers_all,
    )


def _restore_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    rows, p, x_dtype, fill, pos_dtype, covers_all = ctx.meta
    need_x, _, need_fill, need_pos, _, _, _ = ctx.needs_input_grad
    gx = gfill = gpos = None
    if need_x or need_fill:
        gx, part = torch.ops.mimfast.restore_tokens_bwd(
            grad, ids_restore, rows, p, str(x_dtype)[6:], bool(need_fill), covers_all
        )
        if need_fill:
            gfill = (part if fill[0] == 2 else part.sum(0)).to(fill[1])
    if need_pos:
        gpos = grad.sum(0, dtype=torch.float32).to(pos_dtype)
    return gx if need_x else None, None, gfill, gpos, None, None, None


_restore_tokens_op.register_autograd(_restore_backward, setup_context=_restore_setup)


# ================================================================================================= 4. references
def _gather_tokens_ref_impl(x, ids_keep, pos, prefix, out_dtype):
    """Plain torch: one torch.gather of the kept rows, plus pos, prefix concatenated in front."""
    ct = torch.float64 if out_dtype == torch.float64 else torch.float32
    idx = ids_keep.long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= x.shape[1]):
        raise IndexError(f"ids_keep: values must lie in [0, {x.shape[1]}), got [{int(idx.min())}, {int(idx.max())}]")
    rows = torch.gather(x.to(ct), 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    if pos is not None:
        rows = rows + pos.to(ct)[idx]
    if prefix is not None:
        pre = prefix.to(ct)
        pre = pre.expand(x.shape[0], -1, -1) if pre.dim() == 2 else pre
        rows = torch.cat([pre, rows], dim=1)
    return rows.to(out_dtype)


def _restore_tokens_ref_impl(x, ids_restore, fill, pos, num_prefix, out_dtype):
    """Plain torch: visible rows gathered through the restore index, filled slots from ``fill``, plus pos."""
    ct = torch.float64 if out_dtype == torch.float64 else torch.float32
    bsz, rows, dim = x.shape
    p, seq = num_prefix, ids_restore.shape[1]
    lk = rows - p
    r = ids_restore.long()
    if r.numel() and (r.min() < 0 or r.max() >= seq):
        raise IndexError(f"ids_restore: values must lie in [0, {seq}), got [{int(r.min())}, {int(r.max())}]")
    xf = x.to(ct)
    vis = torch.gather(xf[:, p:], 1, r.clamp(max=max(lk - 1, 0)).unsqueeze(-1).expand(-1, -1, dim)) if lk else None
    if fill is None:
        filler = xf.new_zeros(bsz, seq, dim)
    else:
        f = fill.to(ct)
        filler = (f.unsqueeze(1) if f.dim() == 2 else f.view(1, 1, dim)).expand(bsz, seq, dim)
    body = filler if vis is None else torch.where((r < lk).unsqueeze(-1), vis, filler)
    out = torch.cat([xf[:, :p], body], dim=1)
    if pos is not None:
        out = out + pos.to(ct)
    return out.to(out_dtype)


def _restore_tokens_bwd_ref_impl(grad, ids_restore, rows, num_prefix, x_dtype, with_fill):
    bsz, _, dim = grad.shape
    p, lk = num_prefix, rows - num_prefix
    ct = torch.float64 if x_dtype == torch.float64 else torch.float32
    g = grad.to(ct)
    r = ids_restore.long()
    gx = g.new_zeros(bsz, rows, dim)
    gx[:, :p] = g[:, :p]
    visible = r < lk
    if lk:  # scatter_add is exact here: each visible row receives at most one contribution
        src = torch.where(visible.unsqueeze(-1), g[:, p:], 0)
        gx[:, p:].scatter_add_(1, torch.where(visible, r, 0).unsqueeze(-1).expand(-1, -1, dim), src)
    if with_fill:
        gfill = torch.where(visible.unsqueeze(-1), 0, g[:, p:]).sum(1).float()
    else:
        gfill = g.new_zeros(0, dim).float()
    return gx.to(x_dtype), gfill


def gather_tokens_ref(
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    pos: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference gather (differentiable by autograd): ``cat([prefix, x[b, ids_keep] + pos[ids_keep]], 1)``.

    x: (B, L, D); ids_keep: (B, Lk) integer; pos: (L, D) or None; prefix: (P, D) shared or (B, P, D) or None.
    Returns (B, P + Lk, D) in the promoted dtype of the inputs.
    """
    out_dtype = _promote(x, pos, prefix)
    idx = ids_keep.long()
    rows = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2])).to(out_dtype)
    if pos is not None:
        rows = rows + pos[idx].to(out_dtype)
    if prefix is not None:
        pre = prefix.to(out_dtype)
        rows = torch.cat([pre.expand(x.shape[0], -1, -1) if pre.dim() == 2 else pre, rows], dim=1)
    return rows


def restore_tokens_ref(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    fill: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    num_prefix: int = 0,
) -> torch.Tensor:
    """Reference restore (differentiable by autograd), MAE's decoder unshuffle generalised.

    x: (B, P + Lk, D); ids_restore: (B, L) integer; fill: (D,) shared, (B, D) per sample, or None for zeros;
    pos: (P + L, D) or None. Returns (B, P + L, D).
    """
    out_dtype = _promote(x, pos, fill)
    bsz, rows, dim = x.shape
    p, seq = num_prefix, ids_restore.shape[1]
    lk = rows - p
    xs = x.to(out_dtype)
    if fill is None:
        fill_rows = xs.new_zeros(bsz, seq - lk, dim)
    else:
        f = fill.to(out_dtype)
        fill_rows = (f.unsqueeze(1) if f.dim() == 2 else f.view(1, 1, dim)).expand(bsz, seq - lk, dim)
    body = torch.cat([xs[:, p:], fill_rows], dim=1)  # MAE: visible rows, then mask tokens, then unshuffle
    body = torch.gather(body, 1, ids_restore.long().unsqueeze(-1).expand(-1, -1, dim))
    out = torch.cat([xs[:, :p], body], dim=1)
    if pos is not None:
        out = out + pos.to(out_dtype)
    return out


def _promote(*tensors) -> torch.dtype:
    dt = None
    for t in tensors:
        if t is not None:
            dt = t.dtype if dt is None else torch.promote_types(dt, t.dtype)
    return dt

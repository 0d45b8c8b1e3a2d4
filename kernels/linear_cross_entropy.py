"""Fused linear + cross-entropy: ``mimfast::linear_cross_entropy`` (forward) and ``mimfast::linear_cross_entropy_bwd``.

For hidden rows h (M, D), a weight W (V, D), an optional bias b (V,), int targets t (M,) and V' = vocab_size <= V::

    z_r    = h_r @ W[:V']^T + b[:V']            logits in the input dtype (cuBLAS), statistics in fp32
    lse_r  = log sum_j exp(z_rj)
    loss_r = (1 - eps) (lse_r - z_rt) + eps / V' * sum_j (lse_r - z_rj)      (0 where t_r == ignore_index)
    mean   = sum_r loss_r / #(t_r != ignore_index)  (NaN when every row is ignored, as torch)
    sum    = sum_r loss_r,   none = loss_r (fp32; fp64 for fp64 inputs)
    dloss_r / dz_r = (softmax(z_r) - (1 - eps) onehot(t_r) - eps / V') * s_r  (0 on ignored rows)

which is exactly ``F.cross_entropy(F.linear(h, W[:V'], b[:V']).float(), t, ignore_index, label_smoothing=eps)``
(torch divides the smoothing term of 'mean' by the same non-ignored count). Rows >= V' of the weight and bias
gradients are zero. A target outside [0, V') that is not ``ignore_index`` is never dereferenced: its row's loss and
gradient are NaN (the wrappers raise on such targets first when ``validate`` is on).

Design (why chunked, cuBLAS + one Triton kernel, rather than fully fused as cut-cross-entropy): the op is matmul
bound (6 M D V' FLOPs for forward + backward against ~4 M V' bytes of row work), so its speed is cuBLAS's. Per chunk
of ``chunk_rows`` rows (``linear_cross_entropy_plan`` in ``_common``): ``z = h_c @ W^T`` in the input dtype, then
``_linear_cross_entropy_fwd_kernel`` computes each row's fp32 max / log-sum-exp, the loss, and overwrites the chunk
in place with ``G = dloss/dz`` (one read, one write while the chunk is L2-resident); then ``grad_h_c = G @ W`` and
``grad_W += G^T @ h_c`` (fp32 accumulator when the plan affords it, otherwise cuBLAS's fp32 accumulation inside each
chunk and one rounding per chunk into the output), ``grad_b += sum_rows G`` in fp32. Fully fused kernels
(cut-cross-entropy) reach the same memory floor but need atomics for grad W / grad h (non-deterministic, and a
Triton GEMM with a softmax epilogue rarely matches cuBLAS on Hopper); this way every reduction has a fixed order
(two runs are bit-identical) and the M x V' logits never exist in fp32 or at full height.

Backward, by reduction:

* 'mean' / 'sum' (scalar loss): when grads are required the forward computes them with grad_output = 1 (no second
  logits GEMM, 6 M D V' FLOPs in all) and the backward scales them in place by grad_output. The precomputed grads
  are used once: a second backward through the same graph (``retain_graph=True``) recomputes them from the saved
  log-sum-exp like 'none'. The scaling happens after rounding to the input dtype (the reference scales before),
  an extra bf16 / fp16 rounding only when grad_output != 1.
* 'none' (per-row grad_output g_r): the forward computes the losses only; the backward recomputes each chunk's
  logits and writes ``G * g_r`` from the saved lse (8 M D V' FLOPs in all): grad W = sum_r g_r (p_r - y_r)^T h_r
  cannot be formed before g is known.

Memory (extra over inputs and outputs): one chunk of logits (input dtype), 3 fp32 values per row, V' fp32 bias sums
and, with ``acc32``, a V' x D fp32 grad-weight accumulator: below 5% of the M x V' fp32 logits at PERF.md's shapes
(see the plan; tested).

Backends (``_common``): CUDA tensors run the Triton kernel; CPU tensors run the registered CPU kernel, the same chunk
loop with the row statistics in plain torch (``_rows_torch``), unless ``TRITON_INTERPRET=1``; fp64 always takes
torch. ``linear_cross_entropy_ref`` is the spec and the oracle (F.linear + F.cross_entropy, differentiable).

Layout of this file (STYLE.md): Triton kernels, the validating launcher / chunk loop, the ``torch.library`` bindings
with their CPU kernels and autograd, the plain-PyTorch reference.
"""

from __future__ import annotations

import numbers
import warnings

import torch
import torch.nn.functional as F

from ._common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_same_device,
    check_tensor,
    device_guard,
    interpret_mode,
    linear_cross_entropy_plan,
    new_output,
    store_dtype,
    use_triton,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

REDUCTIONS = ("mean", "sum", "none")
TARGET_DTYPES = (torch.int32, torch.int64)


# =================================================================================================== 1. kernels
if HAS_TRITON:

    @triton.jit
    def _lce_grad_pass(
        logits_ptr, grad_ptr, r64, mask_m, t, lse, sc, V, stride_l_row, stride_g_row, one_minus_eps, eps_over_v,
        BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        """g = (exp(z - lse) - (1 - eps) [j == t] - eps / V) * sc over the row tiles (a second pass over the chunk)."""
        lane = tl.arange(0, BLOCK_V)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + lane
            mask = mask_m[:, None] & (offs < V)[None, :]
            z = tl.load(logits_ptr + r64[:, None] * stride_l_row + offs[None, :], mask=mask, other=0.0)
            p = tl.exp(z.to(tl.float32) - lse[:, None])
            g = p - eps_over_v - tl.where(offs[None, :] == t[:, None], one_minus_eps, 0.0)
            g_ptrs = grad_ptr + r64[:, None] * stride_g_row + offs[None, :]
            tl.store(g_ptrs, (g * sc[:, None]).to(grad_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _lce_rows(target_ptr, scale_ptr, pid, R, V, stride_t, stride_s, ignore_index, BLOCK_M: tl.constexpr):
        """Rows of a program, their targets, the ignored / valid-target flags and the gradient scale per row (0 on
        ignored rows, NaN on rows whose target is outside [0, V))."""
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rows < R
        r64 = rows.to(tl.int64)
        t = tl.load(target_ptr + r64 * stride_t, mask=mask_m, other=0).to(tl.int64)
        ignored = t == ignore_index
        ok = (t >= 0) & (t < V) & ~ignored & mask_m
        sc = tl.load(scale_ptr + r64 * stride_s, mask=mask_m, other=0.0).to(tl.float32)
        sc = tl.where(ignored, 0.0, tl.where(ok, sc, float("nan")))
        return rows, mask_m, r64, t, ignored, ok, sc

    @triton.jit
    def _linear_cross_entropy_fwd_kernel(
        logits_ptr,  # (R, V) logits of a chunk of rows in the input dtype (row stride stride_l_row)
        grad_ptr,  # (R, V) out: dloss/dlogits (WRITE_GRAD); the logits buffer itself on the GPU (in place)
        target_ptr,  # (R,) int32 / int64 targets
        scale_ptr,  # fp32 gradient scale of row r at r * stride_s (1 / #valid for 'mean', 1 for 'sum')
        loss_ptr,  # (R,) fp32 out: per-row loss, 0 on ignored rows, NaN on rows with an out-of-range target
        lse_ptr,  # (R,) fp32 out: per-row log-sum-exp
        R,  # rows in the chunk
        V,  # classes scored (vocab_size)
        stride_l_row,
        stride_g_row,
        stride_t,
        stride_s,  # 0: one scale for every row
        ignore_index,
        one_minus_eps,  # fp32 1 - label_smoothing
        eps_over_v,  # fp32 label_smoothing / V
        WRITE_GRAD: tl.constexpr,  # also write dloss/dlogits
        SMOOTH: tl.constexpr,  # label_smoothing > 0: the row sum of the logits enters the loss
        SINGLE: tl.constexpr,  # the whole row is one register tile (BLOCK_V >= V)
        BLOCK_M: tl.constexpr,  # rows per program
        BLOCK_V: tl.constexpr,  # classes per tile
    ):
        pid = tl.program_id(0)
        rows, mask_m, r64, t, ignored, ok, sc = _lce_rows(target_ptr, scale_ptr, pid, R, V, stride_t, stride_s,
                                                          ignore_index, BLOCK_M)  # fmt: skip
        zt = tl.load(logits_ptr + r64 * stride_l_row + tl.where(ok, t, 0), mask=ok, other=0.0).to(tl.float32)
        lane = tl.arange(0, BLOCK_V)
        if SINGLE:
            mask = mask_m[:, None] & (lane < V)[None, :]
            z = tl.load(logits_ptr + r64[:, None] * stride_l_row + lane[None, :], mask=mask, other=float("-inf"))
            z = z.to(tl.float32)
            m = tl.max(z, axis=1)
            m_sub = tl.where(m == float("-inf"), 0.0, m)
            s = tl.sum(tl.exp(z - m_sub[:, None]), axis=1)
            zsum = tl.sum(tl.where(mask, z, 0.0), axis=1)
        else:  # online max / sum over the tiles
            m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK_M], dtype=tl.float32)
            zsum = tl.zeros([BLOCK_M], dtype=tl.float32)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + lane
                mask = mask_m[:, None] & (offs < V)[None, :]
                z = tl.load(logits_ptr + r64[:, None] * stride_l_row + offs[None, :], mask=mask, other=float("-inf"))
                z = z.to(tl.float32)
                m_new = tl.maximum(m, tl.max(z, axis=1))
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing finite yet: keep s = 0, not NaN
                s = s * tl.exp(m - m_sub) + tl.sum(tl.exp(z - m_sub[:, None]), axis=1)
                m = m_new
                if SMOOTH:
                    zsum += tl.sum(tl.where(mask, z, 0.0), axis=1)
        lse = m + tl.log(s)
        loss = lse - one_minus_eps * zt
        if SMOOTH:
            loss -= eps_over_v * zsum
        loss = tl.where(ignored, 0.0, tl.where(ok, loss, float("nan")))
        tl.store(loss_ptr + rows, loss, mask=mask_m)
        tl.store(lse_ptr + rows, lse, mask=mask_m)
        if WRITE_GRAD:
            if SINGLE:  # the row is still in registers
                p = tl.exp(z - lse[:, None])
                g = p - eps_over_v - tl.where(lane[None, :] == t[:, None], one_minus_eps, 0.0)
                g_ptrs = grad_ptr + r64[:, None] * stride_g_row + lane[None, :]
                tl.store(g_ptrs, (g * sc[:, None]).to(grad_ptr.dtype.element_ty), mask=mask)
            else:
                _lce_grad_pass(logits_ptr, grad_ptr, r64, mask_m, t, lse, sc, V, stride_l_row, stride_g_row,
                               one_minus_eps, eps_over_v, BLOCK_V)  # fmt: skip

    @triton.jit
    def _linear_cross_entropy_bwd_kernel(
        logits_ptr,  # (R, V) recomputed logits of a chunk in the input dtype
        grad_ptr,  # (R, V) out: dloss/dlogits scaled per row; the logits buffer itself on the GPU (in place)
        target_ptr,  # (R,) int32 / int64 targets
        lse_ptr,  # (R,) fp32 the forward's log-sum-exp
        scale_ptr,  # fp32 grad_output of row r at r * stride_s ('none'), or one scale with stride_s = 0
        R,
        V,
        stride_l_row,
        stride_g_row,
        stride_t,
        stride_s,
        ignore_index,
        one_minus_eps,  # fp32 1 - label_smoothing
        eps_over_v,  # fp32 label_smoothing / V
        BLOCK_M: tl.constexpr,  # rows per program
        BLOCK_V: tl.constexpr,  # classes per tile
    ):
        pid = tl.program_id(0)
        rows, mask_m, r64, t, ignored, ok, sc = _lce_rows(target_ptr, scale_ptr, pid, R, V, stride_t, stride_s,
                                                          ignore_index, BLOCK_M)  # fmt: skip
        lse = tl.load(lse_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
        _lce_grad_pass(logits_ptr, grad_ptr, r64, mask_m, t, lse, sc, V, stride_l_row, stride_g_row, one_minus_eps,
                       eps_over_v, BLOCK_V)  # fmt: skip


# ========================================================================================= 2. launcher (chunk loop)
def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the loss and the row statistics: fp32, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_triton(lg, tgt, scale, lse_out, loss_out, lse_in, ignore_index, eps, write_grad, plan):
    """Row statistics / gradient of one chunk ``lg`` (R, V') with the Triton kernels; G overwrites ``lg``."""
    r, v = lg.shape
    gdt = store_dtype(lg.dtype, lg.device)
    g = lg  # in place on the GPU; the interpreter writes bf16 through fp32 and torch rounds it (store_dtype)
    if write_grad and gdt != lg.dtype:
        g = torch.empty(r, v, dtype=gdt, device=lg.device)
    grid = (triton.cdiv(r, plan["BLOCK_M"]),)
    s_stride = scale.stride(0) if scale.numel() > 1 else 0
    common = dict(BLOCK_M=plan["BLOCK_M"], BLOCK_V=plan["BLOCK_V"], num_warps=plan["num_warps"])
    with device_guard(lg.device):
        if lse_in is None:
            _linear_cross_entropy_fwd_kernel[grid](
                lg, g, tgt, scale, loss_out, lse_out, r, v, lg.stride(0), g.stride(0), tgt.stride(0), s_stride,
                ignore_index, 1.0 - eps, eps / v, WRITE_GRAD=write_grad, SMOOTH=eps > 0, SINGLE=plan["SINGLE"],
                **common,
            )  # fmt: skip
        else:
            _linear_cross_entropy_bwd_kernel[grid](
                lg, g, tgt, lse_in, scale, r, v, lg.stride(0), g.stride(0), tgt.stride(0), s_stride, ignore_index,
                1.0 - eps, eps / v, **common,
            )  # fmt: skip
    if write_grad and g is not lg:
        lg.copy_(g)


def _rows_torch(lg, tgt, scale, lse_out, loss_out, lse_in, ignore_index, eps, write_grad, plan):
    """The same row work in plain torch (the CPU kernel's path; fp64 stays fp64)."""
    ct = stat_dtype(lg.dtype)
    z = lg.to(ct)
    v = z.shape[1]
    t = tgt.long()
    ignored = t == ignore_index
    ok = ~ignored & (t >= 0) & (t < v)
    tc = torch.where(ok, t, torch.zeros_like(t))[:, None]
    nan = torch.full((), float("nan"), dtype=ct, device=z.device)
    zero = torch.zeros((), dtype=ct, device=z.device)
    if lse_in is None:
        lse = torch.logsumexp(z, dim=1)
        loss = lse - (1.0 - eps) * z.gather(1, tc).squeeze(1)
        if eps > 0:
            loss = loss - (eps / v) * z.sum(dim=1)
        loss_out.copy_(torch.where(ignored, zero, torch.where(ok, loss, nan)))
        lse_out.copy_(lse)
    else:
        lse = lse_in.to(ct)
    if write_grad:
        sc = torch.where(ignored, zero, torch.where(ok, scale.to(ct).expand(len(t)), nan))
        g = torch.exp(z - lse[:, None]) - eps / v
        g.scatter_add_(1, tc, torch.full_like(tc, -(1.0 - eps), dtype=ct) * ok[:, None])
        lg.copy_(g * sc[:, None])


def _addmm_acc32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with an fp32 (fp64) accumulator and bf16 / fp16 operands, without upcasting the operands on CUDA
    (cuBLAS with an fp32 output, torch's ``out_dtype``)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, NotImplementedError, TypeError) as exc:  # pragma: no cover - torch without out_dtype
            warnings.warn(f"mimfast: addmm with out_dtype unavailable ({exc}); upcasting operands", stacklevel=2)
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunk_loop(hidden, weight, target, bias, ignore_index, eps, reduction, v, need_h, need_w, need_b, grad_loss,
                lse_saved, rows_fn):  # fmt: skip
    """The op's body: forward (``lse_saved`` None) or the recomputing backward. Returns (loss, lse, gh, gw, gb); the
    gradients are (0,)-shaped where not computed."""
    forward = lse_saved is None
    m, d = hidden.shape
    vv = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    ct = stat_dtype(dt)
    need_b = need_b and bias is not None
    grads = (need_h or need_w or need_b) and (reduction != "none" or not forward)
    w = weight[:v]
    b = bias[:v] if bias is not None else None
    acc32_wanted = grads and need_w and weight.dtype not in (torch.float32, torch.float64)
    plan = linear_cross_entropy_plan(m, d, v, hidden.element_size(), acc32_wanted, interpret_mode())
    valid = target != ignore_index
    if forward:
        loss_rows, lse = new_output(m, ct, dev), new_output(m, ct, dev)
        scale = torch.ones(1, dtype=torch.float32, device=dev)
        if reduction == "mean":
            scale = (1.0 / valid.sum().to(torch.float32)).reshape(1)  # inf with no valid row: every G row is 0
    else:
        loss_rows, lse = None, lse_saved
        g = grad_loss.to(torch.float32)
        scale = g.reshape(-1) if reduction == "none" else g.reshape(1)
        if reduction == "mean":
            scale = scale / valid.sum().to(torch.float32)
    gh = new_output((m, d), dt, dev) if grads and need_h else hidden.new_empty(0)
    gw = torch.zeros(vv, d, dtype=weight.dtype, device=dev) if grads and need_w else weight.new_empty(0)
    gb = torch.zeros(vv, dtype=bias.dtype, device=dev) if grads and need_b else hidden.new_empty(0, dtype=ct)
    gw_acc = (torch.zeros(v, d, dtype=torch.float32, device=dev) if plan["acc32"] else gw[:v]) if gw.numel() else None
    gb_acc = torch.zeros(v, dtype=ct, device=dev) if gb.numel() else None
    rows = plan["chunk_rows"]
    buf = torch.empty(min(rows, m), v, dtype=dt, device=dev) if m else None
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        h, lg = hidden[r0:r1], buf[: r1 - r0]
        if b is not None:
            torch.addmm(b, h, w.t(), out=lg)
        else:
            torch.mm(h, w.t(), out=lg)
        sl = scale[r0:r1] if scale.numel() > 1 else scale
        rows_fn(lg, target[r0:r1], sl, lse[r0:r1] if forward else None, loss_rows[r0:r1] if forward else None,
                None if forward else lse[r0:r1], ignore_index, eps, grads, plan)  # fmt: skip
        if not grads:
            continue
        if need_h:
            torch.mm(lg, w, out=gh[r0:r1])
        if gw_acc is not None:
            if plan["acc32"]:
                _addmm_acc32(gw_acc, lg.t(), h)
            else:  # cuBLAS: fp32 inside the GEMM, one rounding per chunk into the output
                gw_acc.addmm_(lg.t(), h)
        if gb_acc is not None:
            gb_acc += lg.sum(dim=0, dtype=ct)
    if gw_acc is not None and plan["acc32"]:
        gw[:v].copy_(gw_acc)
    if gb_acc is not None:
        gb[:v].copy_(gb_acc)
    if not forward:
        return None, None, gh, gw, gb
    if reduction == "none":
        loss = loss_rows
    else:
        loss = loss_rows.sum()
        if reduction == "mean":
            loss = loss / valid.sum().to(ct)
    return loss, lse, gh, gw, gb


def _impl(*args):
    """Dispatch the chunk loop to the Triton row kernels or the torch rows (see the module docstring)."""
    hidden = args[0]
    rows_fn = _rows_triton if use_triton(hidden) else _rows_torch
    if hidden.device.type not in ("cuda", "cpu"):
        return _chunk_loop(*args, rows_fn)
    with torch.autocast(hidden.device.type, enabled=False):  # the wrapper cast already; the GEMMs stay as given
        return _chunk_loop(*args, rows_fn)


# =================================================================================================== 3. bindings
@torch.library.custom_op("mimfast::linear_cross_entropy", mutates_args=(), device_types="cuda")
def _lce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    vocab_size: int,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss () or (M,), lse (M,), grad hidden (M, D) | (0,), grad weight (V, D) | (0,), grad bias (V,) | (0,)):
    the gradients (of grad_output = 1) only for 'mean' / 'sum' and the flags set."""
    loss, lse, gh, gw, gb = _impl(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, vocab_size,
                                  grad_hidden, grad_weight, grad_bias, None, None)  # fmt: skip
    return loss, lse, gh, gw, gb


@_lce_op.register_kernel("cpu")
def _lce_cpu(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, vocab_size, grad_hidden,
             grad_weight, grad_bias):  # fmt: skip
    return _impl(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, vocab_size, grad_hidden,
                 grad_weight, grad_bias, None, None)  # fmt: skip


def _grad_shapes(hidden, weight, bias, pre: bool, need_h: bool, need_w: bool, need_b: bool):
    m, d = hidden.shape
    ct = stat_dtype(hidden.dtype)
    gh = hidden.new_empty((m, d) if pre and need_h else (0,))
    gw = weight.new_empty((weight.shape[0], d) if pre and need_w else (0,))
    with_b = pre and need_b and bias is not None
    gb = bias.new_empty(bias.shape[0]) if with_b else hidden.new_empty(0, dtype=ct)
    return gh, gw, gb


@_lce_op.register_fake
def _lce_fake(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, vocab_size, grad_hidden,
              grad_weight, grad_bias):  # fmt: skip
    m = hidden.shape[0]
    ct = stat_dtype(hidden.dtype)
    loss = hidden.new_empty((m,) if reduction == "none" else (), dtype=ct)
    pre = reduction != "none"
    return (loss, hidden.new_empty(m, dtype=ct),
            *_grad_shapes(hidden, weight, bias, pre, grad_hidden, grad_weight, grad_bias))  # fmt: skip


@torch.library.custom_op("mimfast::linear_cross_entropy_bwd", mutates_args=(), device_types="cuda")
def _lce_bwd_op(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    vocab_size: int,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients recomputed chunk by chunk from the saved lse: (grad hidden, grad weight, grad bias), (0,) if unset."""
    _, _, gh, gw, gb = _impl(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, vocab_size,
                             grad_hidden, grad_weight, grad_bias, grad_loss, lse)  # fmt: skip
    return gh, gw, gb


@_lce_bwd_op.register_kernel("cpu")
def _lce_bwd_cpu(grad_loss, hidden, weight, target, bias, lse, ignore_index, label_smoothing, reduction, vocab_size,
                 grad_hidden, grad_weight, grad_bias):  # fmt: skip
    _, _, gh, gw, gb = _impl(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, vocab_size,
                             grad_hidden, grad_weight, grad_bias, grad_loss, lse)  # fmt: skip
    return gh, gw, gb


@_lce_bwd_op.register_fake
def _lce_bwd_fake(grad_loss, hidden, weight, target, bias, lse, ignore_index, label_smoothing, reduction, vocab_size,
                  grad_hidden, grad_weight, grad_bias):  # fmt: skip
    return _grad_shapes(hidden, weight, bias, True, grad_hidden, grad_weight, grad_bias)


def _traced(t: torch.Tensor) -> bool:
    """Whether the op runs under a tracer (torch.compile, AOTAutograd, opcheck): fake / functional tensors."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t) or torch._is_functional_tensor(t)


def _lce_setup(ctx, inputs, output):
    hidden, weight, target, bias, ignore_index, eps, reduction, v, need_h, need_w, need_b = inputs
    _, lse, gh, gw, gb = output
    ctx.args = (ignore_index, eps, reduction, v)
    ctx.pre_flags = (need_h, need_w, need_b and bias is not None)
    ctx.mark_non_differentiable(lse, gh, gw, gb)
    # the forward's gradients (grad_output = 1, 'mean' / 'sum'): eager hands them to the first backward, which scales
    # them in place (no M x D / V x D copies) and drops them; under a tracer they are saved and scaled out of place
    ctx.mode = "none" if reduction == "none" else ("saved" if _traced(lse) else "eager")
    ctx.pre = (gh, gw, gb) if ctx.mode == "eager" else None
    extra = (gh, gw, gb) if ctx.mode == "saved" else ()
    ctx.save_for_backward(hidden, weight, target, bias, lse, *extra)


def _lce_backward(ctx, grad_loss, _lse, _gh, _gw, _gb):
    hidden, weight, target, bias, lse, *saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    want = (need[0], need[1], bool(need[3]) and bias is not None)
    pre, ctx.pre = (tuple(saved) if saved else ctx.pre), None
    if grad_loss is None or not any(want):
        return (None,) * 11
    if pre is not None and all(f or not w for w, f in zip(want, ctx.pre_flags, strict=True)):
        g = grad_loss.reshape(())
        if ctx.mode == "eager":
            gh, gw, gb = (t.mul_(g) if w else None for t, w in zip(pre, want, strict=True))
        else:
            gh, gw, gb = ((t * g).to(t.dtype) if w else None for t, w in zip(pre, want, strict=True))
    else:  # 'none', or a second backward through the same graph: recompute chunk by chunk
        gh, gw, gb = torch.ops.mimfast.linear_cross_entropy_bwd(grad_loss, hidden, weight, target, bias, lse,
                                                                *ctx.args, *want)  # fmt: skip
        gh, gw, gb = (t if w else None for t, w in zip((gh, gw, gb), want, strict=True))
    return gh, gw, None, gb, None, None, None, None, None, None, None


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup)


# ============================================================================================ validation + entry
def resolve_vocab_size(vocab_size, v: int) -> int:
    """V' (``vocab_size``, default V) checked to lie in [1, V]."""
    if vocab_size is None:
        return v
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size: expected an int or None, got {type(vocab_size).__name__}")
    if not 1 <= int(vocab_size) <= v:
        raise ValueError(f"vocab_size: expected 1 <= vocab_size <= V = {v} (weight rows), got {vocab_size}")
    return int(vocab_size)


def default_validate(target: torch.Tensor) -> bool:
    """``validate=None``: check the targets on CPU tensors (free), skip on accelerators (a host synchronisation)."""
    return target.device.type == "cpu"


def check_inputs(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, vocab_size, validate):
    """Raise a clear error naming the argument for any bad input; returns V' (see the public docstring)."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("target", target, ndim=1, dtypes=TARGET_DTYPES)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
    check_same_device(hidden=hidden, weight=weight, target=target, bias=bias)
    m, d = hidden.shape
    v = weight.shape[0]
    if v == 0:
        raise ValueError("weight: has 0 rows (an empty vocabulary); expected at least one class")
    if weight.shape[1] != d:
        raise ValueError(f"weight: expected shape (V, D) with D = {d} (hidden's features), got {tuple(weight.shape)}")
    if target.shape[0] != m:
        raise ValueError(f"target: expected shape ({m},) (one per hidden row), got {tuple(target.shape)}")
    if bias is not None and bias.shape[0] != v:
        raise ValueError(f"bias: expected shape ({v},) (one per weight row), got {tuple(bias.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        got = f"hidden {hidden.dtype}, weight {weight.dtype}" + (f", bias {bias.dtype}" if bias is not None else "")
        raise TypeError(f"hidden / weight / bias: expected one dtype outside autocast, got {got} (cast them, or call "
                        "under torch.autocast, which casts all three to its dtype)")  # fmt: skip
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing: expected a float in [0, 1], got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    vp = resolve_vocab_size(vocab_size, v)
    if validate is None:
        validate = default_validate(target)
    if validate and target.numel() and target.device.type != "meta":
        bad = (target != ignore_index) & ((target < 0) | (target >= vp))
        if bool(bad.any()):
            first = int(target[bad][0])
            raise ValueError(f"target: {int(bad.sum())} value(s) outside [0, {vp}) (vocab_size) that are not "
                             f"ignore_index = {ignore_index}, e.g. {first}")  # fmt: skip
    return vp


def _no_triton_warning(hidden) -> None:
    if not HAS_TRITON and hidden.device.type == "cuda":
        warnings.warn("mimfast: triton is not importable; linear_cross_entropy runs its PyTorch path", stacklevel=3)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    vocab_size: int | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Fused ``F.cross_entropy(F.linear(hidden, weight[:V'], bias[:V']).float(), target)`` (module docstring).

    Args:
        hidden: (M, D) fp32 / bf16 / fp16 (fp64 takes torch), any strides; M may be 0.
        weight: (V, D), V >= 1, hidden's dtype; rows >= vocab_size are not scored (their gradient is 0).
        target: (M,) int64 or int32 class ids in [0, vocab_size), or ``ignore_index``.
        bias: optional (V,), hidden's dtype.
        ignore_index: target value whose rows add nothing to the loss and get zero gradients.
        label_smoothing: eps in [0, 1], torch's definition.
        reduction: "mean" (over the non-ignored rows; NaN when there are none), "sum" or "none".
        vocab_size: V' in [1, V]: score only the first V' rows of weight / bias (default V).
        validate: check targets against [0, V') (one device-to-host sync). None: on CPU tensors only; on the GPU an
            out-of-range target is never read and its row's loss / gradient is NaN.

    Returns:
        fp32 loss (fp64 for fp64 inputs): a scalar for "mean" / "sum", (M,) for "none". Differentiable w.r.t.
        hidden, weight and bias.
    """
    vp = check_inputs(hidden, weight, target, bias, ignore_index, label_smoothing, reduction, vocab_size, validate)
    _no_triton_warning(hidden)
    grad = torch.is_grad_enabled()
    flags = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)  # fmt: skip
    loss, *_ = torch.ops.mimfast.linear_cross_entropy(hidden, weight, target, bias, int(ignore_index),
                                                      float(label_smoothing), reduction, vp, *flags)  # fmt: skip
    return loss


# ================================================================================================= 4. reference
def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Plain-PyTorch reference (the spec and the oracle): ``F.linear`` then ``F.cross_entropy`` on the logits
    upcast to fp32 (fp64 stays fp64), int32 targets widened. Same arguments and result as
    :func:`linear_cross_entropy`; differentiable (gradcheck runs on it in float64). Materialises the M x V' logits."""
    v = resolve_vocab_size(vocab_size, weight.shape[0]) if isinstance(weight, torch.Tensor) else vocab_size
    logits = F.linear(hidden, weight[:v], None if bias is None else bias[:v])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)  # fmt: skip

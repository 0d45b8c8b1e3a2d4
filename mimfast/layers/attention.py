"""Multi-head attention behind one backend switch: FlashAttention, PyTorch SDPA, xFormers or the eager reference.

Shapes (every backend, whatever layout it uses inside)::

    q: (B, H, Lq, d)    k: (B, H, Lk, d)    v: (B, H, Lk, d)    attn_bias: broadcastable to (B, H, Lq, Lk)
    out = attention(q, k, v) : (B, H, Lq, d)

Backends:

* ``"flash"``: ``flash_attn.flash_attn_func`` (FlashAttention 2; optional, source build against CUDA). It wants
  (B, L, H, d), so q/k/v are passed as transposed *views* (no copy: the last dim keeps stride 1) and the output is
  transposed back. CUDA, fp16/bf16, head dim <= 256, Ampere or newer, no additive bias.
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``; on a GPU it picks its flash / cuDNN /
  memory-efficient kernels (force one with ``torch.nn.attention.sdpa_kernel``), on the CPU its fused CPU kernel or
  the math path. Supports ``attn_bias``.
* ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (optional; CUDA). Supports ``attn_bias``.
* ``"eager"``: the explicit computation of the official timm 0.3.2 / MAE ``Attention`` in the input dtype:
  ``softmax((q @ k^T) * scale + attn_bias) @ v`` with dropout on the probabilities. The reference and the oracle.
* ``"auto"``: ``"flash"`` when it is installed and the inputs qualify, else ``"sdpa"``.

The backend used when ``backend=None`` is, in order: the innermost :func:`attention_backend` context /
:func:`set_default_backend`, the environment variable ``MIMFAST_ATTN_BACKEND``, then ``"auto"``. Under
``torch.compile`` the setter / context manager are guarded (changing them recompiles), while the environment
variable is read when a graph is traced: set it before the first compiled call.

``attn_bias`` is additive (e.g. BEiT's relative position bias), differentiable, and is cast to the dtype of ``q``
(SDPA requires that; the other backends follow so that every backend computes the same thing). Dropout draws
different random numbers on different backends; everything else agrees to rounding (tests/test_vit_layers.py).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from types import SimpleNamespace

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "AttentionBackendUnavailable",
    "attention",
    "attention_backend",
    "attention_eager",
    "attention_varlen",
    "available_backends",
    "get_default_backend",
    "resolve_backend",
    "set_default_backend",
]

BACKENDS = ("auto", "flash", "sdpa", "xformers", "eager")
ENV_VAR = "MIMFAST_ATTN_BACKEND"
_CONCRETE = ("flash", "sdpa", "xformers", "eager")
_INSTALL = {
    "flash": "install it with `pip install flash-attn --no-build-isolation` (no wheel on PyPI: it builds from source "
    "against your CUDA toolkit; or `pip install -e '.[flash]'`)",
    "xformers": "install it with `pip install xformers` (its wheels pin one torch version; or "
    "`pip install -e '.[xformers]'`)",
}
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256

_default_backend: str | None = None  # set_default_backend / attention_backend; None = env var, then "auto"


class AttentionBackendUnavailable(RuntimeError):
    """An explicitly requested attention backend cannot run on this machine (not installed, or no CUDA)."""


# ------------------------------------------------------------------------------------------- optional imports
@functools.cache
def _load(backend: str) -> tuple[SimpleNamespace | None, str | None]:
    """(namespace of the backend's entry points, None) or (None, why the import failed). Imported once, lazily."""
    try:
        if backend == "flash":
            from flash_attn import flash_attn_func, flash_attn_varlen_func

            return SimpleNamespace(func=flash_attn_func, varlen=flash_attn_varlen_func), None
        if backend == "xformers":
            import xformers.ops as xops

            return SimpleNamespace(func=xops.memory_efficient_attention), None
    except Exception as exc:  # ImportError, or OSError / RuntimeError from a binary built against another torch
        return None, f"{type(exc).__name__}: {exc}"
    raise AssertionError(backend)


@torch.compiler.assume_constant_result  # torch.compile: evaluated once while tracing, never traced into
def _unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine at all, or None when it can."""
    if backend in ("sdpa", "eager"):
        return None
    module_name = {"flash": "flash_attn", "xformers": "xformers"}[backend]
    ns, err = _load(backend)
    if ns is None:
        return f"`{module_name}` is not importable ({err}); {_INSTALL[backend]}"
    if not torch.cuda.is_available():
        return f"`{module_name}` is installed but runs on CUDA devices only and torch sees no CUDA device"
    return None


def available_backends() -> list[str]:
    """The concrete backends that can run on this machine, in the order "auto" prefers them.

    "sdpa" and "eager" are always there; "flash" and "xformers" when their package imports and CUDA is present.
    """
    return [b for b in _CONCRETE if _unavailable_reason(b) is None]


@torch.compiler.assume_constant_result
@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _flash_reject(q: torch.Tensor, attn_bias: torch.Tensor | None) -> str | None:
    """Why flash_attn_func cannot take these inputs, or None. Cheap: no host sync."""
    if attn_bias is not None:
        return "flash_attn has no additive attention bias (attn_bias); use 'sdpa', 'xformers' or 'eager'"
    if q.device.type != "cuda":
        return f"flash_attn needs CUDA tensors, got device {q.device}"
    if q.dtype not in _FLASH_DTYPES:
        return f"flash_attn needs float16 or bfloat16 inputs, got {q.dtype} (use torch.autocast or cast)"
    if q.shape[-1] > _FLASH_MAX_HEAD_DIM:
        return f"flash_attn supports head dims up to {_FLASH_MAX_HEAD_DIM}, got {q.shape[-1]}"
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        return "flash_attn needs non-empty batch, heads and query length"
    major, _ = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if major < 8:
        return f"flash_attn 2 needs an Ampere-or-newer GPU (compute capability >= 8.0), got {major}.x"
    return None


def _xformers_reject(q: torch.Tensor) -> str | None:
    if q.device.type != "cuda":
        return f"xformers memory_efficient_attention needs CUDA tensors, got device {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"xformers memory_efficient_attention needs float16, bfloat16 or float32 inputs, got {q.dtype}"
    return None


# ------------------------------------------------------------------------------------------ default selection
def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"{what}: expected one of {BACKENDS}, got {name!r}")
    return name.strip().lower()


def set_default_backend(name: str | None) -> None:
    """Set the backend used when ``backend=None`` (process-wide). ``None`` restores the default: the environment
    variable ``MIMFAST_ATTN_BACKEND`` if set, else ``"auto"``. Availability is checked when attention runs."""
    global _default_backend
    _default_backend = None if name is None else _check_name(name, "set_default_backend(name)")


def get_default_backend() -> str:
    """The backend name that ``backend=None`` means right now (may be ``"auto"``)."""
    return _requested(None)[0]


@contextlib.contextmanager
def attention_backend(name: str | None) -> Iterator[None]:
    """``with attention_backend("eager"): ...`` — the default backend inside the block, restored on exit."""
    global _default_backend
    previous = _default_backend
    set_default_backend(name)
    try:
        yield
    finally:
        _default_backend = previous


def _requested(backend: str | None) -> tuple[str, str]:
    """(requested name, where it came from) for error messages."""
    if backend is not None:
        return _check_name(backend, "backend"), f"backend={backend!r}"
    if _default_backend is not None:
        return _default_backend, f"the default set by set_default_backend/attention_backend ({_default_backend!r})"
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}"), f"{ENV_VAR}={env!r}"
    return "auto", "backend='auto'"


def resolve_backend(q: torch.Tensor, backend: str | None = None, attn_bias: torch.Tensor | None = None) -> str:
    """The concrete backend :func:`attention` would run for query ``q`` (B, H, Lq, d) and this bias.

    Raises :class:`AttentionBackendUnavailable` for an explicitly requested backend that is not available here, and
    ``ValueError`` when an explicitly requested backend cannot take these inputs ("auto" falls back instead).
    """
    name, source = _requested(backend)
    if name == "auto":
        if _unavailable_reason("flash") is None and _flash_reject(q, attn_bias) is None:
            return "flash"
        return "sdpa"
    reason = _unavailable_reason(name)
    if reason is not None:
        raise AttentionBackendUnavailable(
            f"attention backend {name!r} (from {source}) is not available here: {reason}. "
            f"Available here: {available_backends()} (or 'auto')."
        )
    reject = {"flash": lambda: _flash_reject(q, attn_bias), "xformers": lambda: _xformers_reject(q)}.get(name)
    if reject is not None and (why := reject()) is not None:
        raise ValueError(
            f"attention backend {name!r} (from {source}) cannot run these inputs: {why}. "
            "backend='auto' falls back to 'sdpa' in that case."
        )
    return name


# ---------------------------------------------------------------------------------------------- validation
def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor | None, dropout_p: float, scale
) -> torch.Tensor | None:
    """Validate shapes / dtypes / devices; return ``attn_bias`` as a 4-D tensor in q's dtype (or None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (B, H, L, d), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: device {t.device} differs from q's {q.device}")
    b, h, lq, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(
            f"k: expected shape (B={b}, H={h}, Lk, d={d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    lk = k.shape[2]
    if lk == 0:
        raise ValueError("k, v: key length Lk is 0; softmax over no keys is undefined")
    if d == 0:
        raise ValueError("q, k, v: head dim d is 0")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p <= 1.0):
        raise ValueError(f"dropout_p: expected a float in [0, 1], got {dropout_p!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    if attn_bias is None:
        return None
    if not isinstance(attn_bias, torch.Tensor):
        raise TypeError(f"attn_bias: expected a torch.Tensor or None, got {type(attn_bias).__name__}")
    if not attn_bias.is_floating_point():
        raise TypeError(f"attn_bias: expected an additive floating-point bias, got {attn_bias.dtype}")
    if attn_bias.device != q.device:
        raise ValueError(f"attn_bias: device {attn_bias.device} differs from q's {q.device}")
    target = (b, h, lq, lk)
    ok = attn_bias.dim() <= 4
    if ok:
        try:
            ok = torch.broadcast_shapes(attn_bias.shape, target) == target
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(
            f"attn_bias: expected a shape broadcastable to (B, H, Lq, Lk) = {target}, got {tuple(attn_bias.shape)}"
        )
    bias = attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
    return bias.to(q.dtype)


# ------------------------------------------------------------------------------------------------ backends
def attention_eager(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The official timm 0.3.2 / MAE computation, in the input dtype (no validation; use :func:`attention`).

    ``attn = (q @ k^T) * scale (+ attn_bias); attn = softmax(attn, -1); attn = dropout(attn); out = attn @ v``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    attn = (q @ k.transpose(-2, -1)) * scale
    if attn_bias is not None:
        attn = attn + attn_bias
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    return attn @ v


def _sdpa(q, k, v, dropout_p, scale, attn_bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)


def _flash(q, k, v, dropout_p, scale, attn_bias):
    assert attn_bias is None  # resolve_backend rejected it
    fa = _load("flash")[0]
    # (B, H, L, d) -> (B, L, H, d) views; flash_attn only needs the last dim contiguous.
    out = fa.func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, softmax_scale=scale)
    return out.transpose(1, 2)


def _xformers(q, k, v, dropout_p, scale, attn_bias):
    xf = _load("xformers")[0]
    bias = None
    if attn_bias is not None:
        b, h, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        # xformers' kernels want the bias rows 8-element aligned: pad the key dim in memory, then slice it away.
        pad = (-lk) % 8
        bias = attn_bias
        if pad or bias.stride(-1) != 1:
            bias = F.pad(bias, (0, pad))[..., :lk]
        bias = bias.expand(b, h, lq, lk)
    out = xf.func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p, scale=scale)
    return out.transpose(1, 2)


_IMPLS = {"flash": _flash, "sdpa": _sdpa, "xformers": _xformers, "eager": attention_eager}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head scaled dot-product attention ``softmax(q k^T * scale + attn_bias) v`` on one of several backends.

    Args:
        q: (B, H, Lq, d) queries. Any strides (views of a packed qkv projection are fine).
        k: (B, H, Lk, d) keys, same dtype and device as q.
        v: (B, H, Lk, d) values.
        backend: "auto", "flash", "sdpa", "xformers", "eager", or None for the default (see the module docstring).
        dropout_p: dropout probability on the attention weights. Pass 0 in eval (``p if self.training else 0``).
        scale: logit scale; None = 1/sqrt(d).
        attn_bias: additive bias broadcastable to (B, H, Lq, Lk), e.g. (1, H, Lq, Lk); cast to q's dtype.

    Returns:
        (B, H, Lq, d) in q's dtype.
    """
    bias = _check_inputs(q, k, v, attn_bias, dropout_p, scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = resolve_backend(q, backend, bias)
    return _IMPLS[name](q, k, v, float(dropout_p), float(scale), bias)


# --------------------------------------------------------------------------------------------- varlen path
def _check_cu(cu: torch.Tensor, name: str, total: int, device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name}: expected a 1-D integer tensor (num_seqs + 1,), got {getattr(cu, 'shape', cu)!r}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected int32 or int64, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name}: device {cu.device} differs from q's {device}")


def _check_cu_values(cu: list[int], name: str, total: int, max_seqlen: int) -> None:
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"{name}: expected to start at 0 and end at the packed length {total}, got {cu[0]}..{cu[-1]}")
    lens = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    if min(lens) < 0:
        raise ValueError(f"{name}: expected non-decreasing offsets, got {cu}")
    if max(lens) > max_seqlen:
        raise ValueError(f"max_seqlen for {name}: {max_seqlen} is shorter than the longest sequence {max(lens)}")


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    backend: str | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed variable-length sequences (no padding): sequence i is rows
    ``cu_seqlens[i]:cu_seqlens[i+1]`` of q (and of k/v with ``cu_seqlens_k``, default ``cu_seqlens``).

    Args:
        q: (Tq, H, d) packed queries; k, v: (Tk, H, d) packed keys / values.
        cu_seqlens: (n + 1,) int32/int64 cumulative query lengths, starting at 0 and ending at Tq.
        max_seqlen: the longest query sequence (an int, as flash_attn wants it without a host sync).
        cu_seqlens_k, max_seqlen_k: the same for keys (cross-attention); default: those of the queries.
        backend, dropout_p, scale: as in :func:`attention` (no additive bias here).

    Returns:
        (Tq, H, d).

    "flash" runs ``flash_attn_varlen_func`` in one launch (offsets are not range-checked there, to avoid a host
    sync). Every other backend loops over the sequences with :func:`attention` (one host sync for the offsets, which
    are checked); a sequence with queries but no keys is an error, one without queries contributes nothing.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D packed tensor (T, H, d), got {getattr(t, 'shape', t)!r}")
    if k.shape[1:] != q.shape[1:] or v.shape != k.shape:
        raise ValueError(f"q, k, v: expected (Tq, H, d), (Tk, H, d), (Tk, H, d); got {q.shape}, {k.shape}, {v.shape}")
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError("cu_seqlens_k: required when k and q have different packed lengths")
        cu_seqlens_k = cu_seqlens
        max_seqlen_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
    if max_seqlen_k is None:
        raise ValueError("max_seqlen_k: required with cu_seqlens_k")
    _check_cu(cu_seqlens, "cu_seqlens", q.shape[0], q.device)
    _check_cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0], q.device)
    if cu_seqlens.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_k: expected {cu_seqlens.numel()} offsets like cu_seqlens, got {cu_seqlens_k.numel()}"
        )
    for name, m in (("max_seqlen", max_seqlen), ("max_seqlen_k", max_seqlen_k)):
        if not (isinstance(m, int) and m >= 0):
            raise ValueError(f"{name}: expected an int >= 0, got {m!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q4 = q.unsqueeze(0).transpose(1, 2)  # (1, H, Tq, d) view, only for backend resolution
    name = resolve_backend(q4, backend, None)
    if name == "flash":
        fa = _load("flash")[0]
        return fa.varlen(
            q, k, v, cu_seqlens.to(torch.int32), cu_seqlens_k.to(torch.int32), max_seqlen, max_seqlen_k,
            dropout_p=float(dropout_p), softmax_scale=float(scale),
        )  # fmt: skip
    cq, ck = cu_seqlens.tolist(), cu_seqlens_k.tolist()
    _check_cu_values(cq, "cu_seqlens", q.shape[0], max_seqlen)
    _check_cu_values(ck, "cu_seqlens_k", k.shape[0], max_seqlen_k)
    outs = []
    for i in range(len(cq) - 1):
        (a, b), (c, e) = (cq[i], cq[i + 1]), (ck[i], ck[i + 1])
        if b == a:
            continue
        if e == c:
            raise ValueError(f"cu_seqlens_k: sequence {i} has {b - a} queries but no keys")
        qi, ki, vi = (t.transpose(0, 1).unsqueeze(0) for t in (q[a:b], k[c:e], v[c:e]))
        out = attention(qi, ki, vi, backend=name, dropout_p=dropout_p, scale=scale)
        outs.append(out[0].transpose(0, 1))
    if not outs:
        return q.new_empty(q.shape)
    return torch.cat(outs, 0)

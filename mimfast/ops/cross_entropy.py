"""Fused linear + cross-entropy over selected rows (masked tokens): ``mimfast::linear_cross_entropy``.

:func:`linear_cross_entropy` is ``F.cross_entropy(F.linear(hidden, weight[:V'], bias[:V']).float(), target, ...)``
without the M x V' logits: chunks of rows go through cuBLAS and one Triton kernel (fp32 log-sum-exp and softmax
statistics, the gradient written over the chunk in place), so extra memory stays below 5% of the fp32 logits at
PERF.md's shapes. ``mimfast.kernels.linear_cross_entropy`` has the exact rules, the chunk plan and the backward modes.

Mixed precision: under ``torch.autocast`` (CUDA or CPU) hidden, weight and bias are cast to the autocast dtype here,
as ``F.linear`` would be, so fp32 master weights receive their gradient through the cast. Outside autocast they must
share one dtype.
"""

from __future__ import annotations

import torch

from ..kernels.linear_cross_entropy import linear_cross_entropy as _lce
from ..kernels.linear_cross_entropy import linear_cross_entropy_ref as _lce_ref

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref"]


def _autocast_dtype(t) -> torch.dtype | None:
    """The autocast dtype active for ``t``'s device, or None."""
    if not isinstance(t, torch.Tensor) or t.device.type not in ("cuda", "cpu"):
        return None
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _cast(t, dtype):
    eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (dtype, torch.float64)
    return t.to(dtype) if eligible else t  # autocast leaves fp64 alone


def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                         reduction="mean", vocab_size=None, validate=None):  # fmt: skip
    """Cross-entropy of ``hidden @ weight[:V']^T + bias[:V']`` against ``target``, fused (forward + backward).

    Args:
        hidden: (M, D) rows to score (e.g. the masked tokens), fp32 / bf16 / fp16 (fp64: plain torch).
        weight: (V, D) class embeddings (e.g. an output head or a tied, detached input embedding).
        target: (M,) int64 / int32 class ids in [0, V'), or ``ignore_index``.
        bias: optional (V,).
        ignore_index: rows with this target add nothing and get zero gradients.
        label_smoothing: in [0, 1], torch's definition (the smoothing term averages over the V' scored classes).
        reduction: "mean" over non-ignored rows (NaN if none), "sum", or "none" ((M,) losses).
        vocab_size: V' <= V: score only the first V' classes (MAGE: 1024 codes of a 2025-entry vocabulary).
        validate: check targets (a host sync); None = on CPU tensors only. Unchecked bad targets give NaN rows.

    Returns:
        fp32 loss: () for "mean" / "sum", (M,) for "none"; gradients flow to hidden, weight and bias.
    """
    dtype = _autocast_dtype(hidden)
    if dtype is not None:  # what F.linear does under autocast: compute in the autocast dtype, grads through the cast
        hidden, weight, bias = _cast(hidden, dtype), _cast(weight, dtype), _cast(bias, dtype)
    return _lce(hidden, weight, target, bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
                reduction=reduction, vocab_size=vocab_size, validate=validate)  # fmt: skip


def linear_cross_entropy_ref(hidden, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                             reduction="mean", vocab_size=None):  # fmt: skip
    """``F.cross_entropy(F.linear(hidden, weight[:V'], bias[:V']).float(), target)`` with V' = vocab_size or V: the
    plain-PyTorch reference of :func:`linear_cross_entropy` (materialises the M x V' logits)."""
    return _lce_ref(hidden, weight, target, bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
                    reduction=reduction, vocab_size=vocab_size)  # fmt: skip

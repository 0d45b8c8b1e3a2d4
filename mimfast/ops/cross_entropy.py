"""Fused linear + cross-entropy (placeholder: the reference semantics; the Triton op replaces the body)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref"]


def linear_cross_entropy_ref(hidden, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                             reduction="mean", vocab_size=None):  # fmt: skip
    """``F.cross_entropy(F.linear(hidden, weight[:V'], bias[:V']), target)`` with V' = vocab_size or V."""
    v = weight.shape[0] if vocab_size is None else vocab_size
    logits = F.linear(hidden, weight[:v], None if bias is None else bias[:v]).float()
    return F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)  # fmt: skip


def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                         reduction="mean", vocab_size=None):  # fmt: skip
    """hidden (M, D), weight (V, D), target (M,) int -> loss. Placeholder = the reference."""
    return linear_cross_entropy_ref(hidden, weight, target, bias, ignore_index=ignore_index,
                                    label_smoothing=label_smoothing, reduction=reduction,
                                    vocab_size=vocab_size)  # fmt: skip

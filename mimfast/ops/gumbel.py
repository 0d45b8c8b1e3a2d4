"""Gumbel-softmax sampling over the fused ``mimfast::gumbel_softmax`` op.

* :func:`gumbel_softmax` is a drop-in for ``torch.nn.functional.gumbel_softmax``: same arguments (``eps`` is
  deprecated and ignored there too), same outputs, any leading shape, any dim, any K.
* :func:`gumbel_quantize` is the quantizer's entry point: per-row choice between Gumbel sampling and plain argmax
  (Regularized VQ's stochastic mask), an indices-only mode that writes no N x K tensor, and the noise-free best
  match of every row.

Semantics (``mimfast.kernels.gumbel_softmax`` has the exact rules)::

    y_soft = softmax((logits + g) / tau)      g ~ Gumbel(0, 1), added before dividing by tau (F.gumbel_softmax)
    index  = argmax(logits + g), ties to the lowest index (tau changes y_soft, never which code wins)
    hard   : forward one_hot(index) exactly, backward the gradient of y_soft (straight-through)

Noise: counter-based Philox (Triton's ``tl.randint4x`` / ``tl.rand``). Each call draws one int64 seed and one
int64 counter offset from ``generator`` (torch's default generator of the logits' device when None) with
``torch.randint``, so ``torch.manual_seed`` / a seeded generator reproduces a call and successive calls differ. The
pair stays on the device (no host sync, CUDA-graph safe) and the backward regenerates the same noise from it.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..kernels._common import FLOAT_DTYPES
from ..kernels.gumbel_softmax import check_tau
from ..kernels.gumbel_softmax import gumbel_softmax as _gumbel_op

__all__ = ["GUMBEL_NAN_POLICIES", "draw_philox", "gumbel_quantize", "gumbel_softmax"]

GUMBEL_NAN_POLICIES = ("raise", "propagate")
PHILOX_RANGE = 2**62  # seeds and offsets are drawn in [0, 2^62): offset + N * ceil(K / 4) never overflows int64


def draw_philox(generator: torch.Generator | None, device) -> torch.Tensor:
    """(2,) int64 (seed, counter offset) for one call, drawn from ``generator`` (or the default generator of
    ``device``) on ``device``. Advances the generator's state like any other random draw."""
    device = torch.device(device)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        gdev = generator.device
        same = gdev.type == device.type and (gdev.index is None or device.index is None or gdev.index == device.index)
        if not same and device.type != "meta":
            raise ValueError(
                f"generator: lives on {gdev} but the logits are on {device}; pass a generator of the logits' device "
                f"(torch.Generator(device={str(device)!r}))"
            )
        if device.type == "meta":
            generator = None
    return torch.randint(0, PHILOX_RANGE, (2,), generator=generator, device=device, dtype=torch.int64)


def _rows_of(logits: torch.Tensor, dim, sample_rows):
    """Validate the public arguments; return (logits as (N, K), leading shape, sample_rows as (N,) or None)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"logits: expected a floating-point tensor (float32 / bfloat16 / float16 / float64), got {logits.dtype}"
        )
    if logits.dim() == 0:
        raise ValueError("logits: expected at least one dimension (the codes), got a 0-d tensor")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim: expected an int, got {type(dim).__name__}")
    if not -logits.dim() <= dim < logits.dim():
        raise IndexError(f"dim: {dim} is out of range for logits of shape {tuple(logits.shape)} ({logits.dim()}-D)")
    k = logits.shape[dim]
    if k == 0:
        raise ValueError(f"logits: the softmax dim (dim={dim}) has size 0; expected at least one code")
    x = logits.movedim(dim, -1)
    lead = tuple(x.shape[:-1])
    rows = None
    if sample_rows is not None:
        if not isinstance(sample_rows, torch.Tensor) or sample_rows.dtype != torch.bool:
            got = f"{sample_rows.dtype}" if isinstance(sample_rows, torch.Tensor) else type(sample_rows).__name__
            raise TypeError(f"sample_rows: expected a bool tensor, got {got}")
        if tuple(sample_rows.shape) != lead:
            raise ValueError(
                f"sample_rows: expected shape {lead} (logits without the softmax dim), got {tuple(sample_rows.shape)}"
            )
        if sample_rows.device != logits.device:
            raise ValueError(f"sample_rows: on {sample_rows.device}, expected the logits' device {logits.device}")
        rows = sample_rows.reshape(-1)
    return x.reshape(math.prod(lead), k), x.shape, rows


def _raise_bad_rows(logits: torch.Tensor, idx: torch.Tensor, tau: float) -> None:
    bad = idx < 0
    n_bad = int(bad.sum())
    if bool(torch.isnan(logits).any()):
        reason = "logits contain NaN"
    elif bool(torch.isposinf(logits).any()):
        reason = "logits contain +inf"
    elif bool(torch.isneginf(logits).all(dim=-1).any()):
        reason = "a row has every logit = -inf (no code can be chosen)"
    else:
        reason = f"(logits + noise) / tau overflowed fp32 (tau = {tau:g}, max |logit| = {logits.abs().max():.3g})"
    raise ValueError(
        f"gumbel_softmax: {n_bad} of {bad.numel()} rows have no defined sample: {reason}. Fix the inputs, or pass "
        "nan_policy='propagate' to get NaN rows and index -1 (as F.gumbel_softmax's NaN output) without this check."
    )


def _run(logits, tau, *, hard, dim, sample_rows, write_y, with_best, generator, nan_policy):
    if nan_policy not in GUMBEL_NAN_POLICIES:
        raise ValueError(f"nan_policy: expected one of {GUMBEL_NAN_POLICIES}, got {nan_policy!r}")
    check_tau(tau)
    tau = float(tau)
    flat, shape, rows = _rows_of(logits, dim, sample_rows)
    philox = draw_philox(generator, logits.device)
    y, idx, best = _gumbel_op(flat, philox, tau, hard=hard, sample_rows=rows, write_y=write_y, with_best=with_best)
    if nan_policy == "raise" and idx.numel() and bool((idx < 0).any()):
        _raise_bad_rows(flat.detach(), idx, tau)
    lead = tuple(shape[:-1])
    if y is not None:
        y = y.reshape(shape).movedim(-1, dim)
    return y, idx.reshape(lead), (best.reshape(lead) if best is not None else None)


def gumbel_softmax(
    logits: torch.Tensor,
    tau: float = 1.0,
    hard: bool = False,
    eps: float = 1e-10,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
    nan_policy: str = "raise",
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.gumbel_softmax`` in one fused kernel (forward and backward).

    Args:
        logits: (..., K, ...) unnormalised log-probabilities; fp32 / bf16 / fp16 on the kernel (fp32 statistics),
            fp64 on the reference. K >= 1 along ``dim``; other dims may be 0.
        tau: temperature, a finite number > 0.
        hard: return one-hot samples whose gradient is the soft sample's (straight-through).
        eps: deprecated in torch and without effect (kept for signature compatibility).
        dim: the dim of the K codes.
        generator: torch.Generator of the logits' device for the noise (default: torch's default generator).
        nan_policy: "raise" (default): a row with a NaN / +inf logit, every logit -inf, or an fp32 overflow of
            (logits + g) / tau raises ValueError (one N-element device-to-host check). "propagate": such rows come
            back NaN, as in F.gumbel_softmax, with no check. -inf logits elsewhere simply get probability 0.

    Returns:
        y like logits (same dtype): soft samples, or exact one-hot vectors with ``hard``.
        The one-hot picks argmax(logits + g) with ties to the lowest index; F.gumbel_softmax takes the argmax of
        its rounded soft sample, which can only differ where two codes round to the same probability.
    """
    if eps != 1e-10:
        warnings.warn("`eps` parameter is deprecated and has no effect.", stacklevel=2)
    y, _, _ = _run(logits, tau, hard=hard, dim=dim, sample_rows=None, write_y=True, with_best=False,
                   generator=generator, nan_policy=nan_policy)  # fmt: skip
    return y


def gumbel_quantize(
    logits: torch.Tensor,
    tau: float = 1.0,
    *,
    hard: bool = True,
    sample_rows: torch.Tensor | None = None,
    indices_only: bool = False,
    generator: torch.Generator | None = None,
    dim: int = -1,
    nan_policy: str = "raise",
    return_best: bool = False,
):
    """Gumbel sampling for quantizers: per-row sampled / argmax selection, indices-only mode, best match.

    Args:
        logits: (..., K) (K along ``dim``), as :func:`gumbel_softmax`.
        tau: temperature > 0 of the soft sample (the gradient); the chosen code does not depend on it.
        hard: y is one_hot(index) with the soft sample's gradient (straight-through), else the soft sample.
        sample_rows: optional bool of the leading shape (logits without ``dim``): True rows get Gumbel noise
            (index = Gumbel-argmax, gradient of softmax((l + g) / tau)), False rows none (index = argmax, gradient
            of softmax(l / tau)). None: every row is sampled. Regularized VQ's stochastic mask M.
        indices_only: compute the indices only; no N x K tensor is written (y is None, nothing to differentiate).
        generator: torch.Generator of the logits' device (default: torch's default generator).
        dim: the dim of the K codes.
        nan_policy: "raise" or "propagate", see :func:`gumbel_softmax`.
        return_best: also return the noise-free argmax of every row (the best match; equal to index on argmax rows).

    Returns:
        (y like logits or None, indices (leading shape) int64), plus best (leading shape) int64 with return_best.
        Index -1 marks a non-finite row under nan_policy="propagate".
    """
    y, idx, best = _run(logits, tau, hard=hard, dim=dim, sample_rows=sample_rows, write_y=not indices_only,
                        with_best=return_best, generator=generator, nan_policy=nan_policy)  # fmt: skip
    return (y, idx, best) if return_best else (y, idx)

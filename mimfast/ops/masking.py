"""Mask generators on the device, batched, seeded and free of host synchronisation.

* :func:`random_masking` — MAE's per-sample random masking (ids_keep / ids_restore / mask), exactly MAE's values.
* :func:`block_masking` (and :func:`beit_block_masking`, :func:`cae_block_masking`) — BEiT's block-wise masking,
  BEiT's under-filling variant or CAE's exact-count one, for a whole batch in one ``mimfast::block_mask`` launch.
* :func:`mage_masking` — MAGE's variable-ratio masking: one truncated-normal ratio per batch, the drop / mask split.

Every generator takes ``generator=`` (a ``torch.Generator``; the same seed gives the same masks) and ``device=``.
Randomness is drawn with ``torch.rand`` on the generator's device (moved to ``device`` when they differ). Nothing
here reads a device value on the host, so the calls can run ahead of the GPU and be captured in CUDA graphs.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from ..kernels._common import check_tensor
from ..kernels.block_mask import block_mask, default_max_attempts, resolve_block_params

__all__ = [
    "MageMask",
    "RandomMask",
    "beit_block_masking",
    "block_masking",
    "cae_block_masking",
    "mage_masking",
    "random_masking",
]

INDEX_DTYPES = (torch.int64, torch.int32)
_NOISE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class RandomMask(NamedTuple):
    """MAE's masking of B sequences of L tokens, Lk = int(L * (1 - mask_ratio)) kept."""

    ids_keep: torch.Tensor  # (B, Lk) positions the encoder sees, in shuffle order (smallest noise first)
    ids_restore: torch.Tensor  # (B, L) inverse of ids_shuffle: slot of each position in [kept ; removed]
    mask: torch.Tensor  # (B, L) float32, 1 = removed, 0 = kept, in the original token order
    ids_shuffle: torch.Tensor  # (B, L) argsort of the noise


class MageMask(NamedTuple):
    """MAGE's masking of B sequences of L tokens (class token not included: prepend it, never masked, yourself)."""

    ratio: torch.Tensor  # () float64 on the device: the batch's mask ratio
    num_masked: torch.Tensor  # () int64 on the device: ceil(L * ratio), tokens masked per sample
    drop_mask: torch.Tensor  # (B, L) bool: the ceil(L * ratio_min) tokens dropped before the encoder
    token_all_mask: torch.Tensor  # (B, L) bool: the num_masked tokens masked (dropped or replaced); ⊇ drop_mask
    ids_keep: torch.Tensor  # (B, L - num_dropped) positions the encoder sees, increasing (MAGE's nonzero order)
    ids_restore: torch.Tensor  # (B, L) slot of each position in [kept in order ; dropped in order]


# ------------------------------------------------------------------------------------------------------- helpers
def _check_int(name: str, v, lo: int) -> int:
    if not isinstance(v, numbers.Integral) or isinstance(v, bool):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
    return int(v)


def _check_float(name: str, v, lo: float | None = None, hi: float | None = None) -> float:
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
        raise ValueError(f"{name}: expected a finite float{rng}, got {v}")
    return v


def _resolve_device(device, generator: torch.Generator | None, given: torch.Tensor | None = None) -> torch.device:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if device is not None:
        device = torch.device(device)
        same = given is None or given.device == device or (device.index is None and given.device.type == device.type)
        if not same:
            raise ValueError(f"device: {device} differs from the given noise's device {given.device}")
        return device
    if given is not None:
        return given.device
    if generator is not None:
        return generator.device
    return torch.get_default_device()


def _rand(shape, device: torch.device, generator: torch.Generator | None, dtype=torch.float32) -> torch.Tensor:
    """U[0, 1) of ``shape`` on ``device``, drawn on the generator's device when one is given."""
    if generator is None:
        return torch.rand(shape, device=device, dtype=dtype)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _check_noise(noise, bsz: int, seq_len: int) -> None:
    check_tensor("noise", noise, ndim=2, dtypes=_NOISE_DTYPES)
    if tuple(noise.shape) != (bsz, seq_len):
        raise ValueError(f"noise: expected shape ({bsz}, {seq_len}) (batch_size, seq_len), got {tuple(noise.shape)}")


def _ranks(noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, rank): order = argsort(noise) with ties to the lower index, rank = its inverse permutation."""
    order = torch.argsort(noise, dim=1, stable=True)
    ar = torch.arange(noise.shape[1], device=noise.device).expand_as(order)
    return order, torch.empty_like(order).scatter_(1, order, ar)


# ------------------------------------------------------------------------------------------------------------ MAE
def random_masking(
    batch_size: int,
    seq_len: int,
    mask_ratio: float = 0.75,
    *,
    device=None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    index_dtype: torch.dtype = torch.int64,
) -> RandomMask:
    """MAE's per-sample random masking, index side only (gather the tokens with :func:`mimfast.ops.gather_tokens`).

    noise ~ U(0, 1) of shape (B, L) (or ``noise``); ids_shuffle = argsort(noise) (small = keep); ids_restore =
    argsort(ids_shuffle); Lk = int(L * (1 - mask_ratio)); ids_keep = ids_shuffle[:, :Lk]; mask = 1 for the removed
    positions, in the original order. These are MAE's values for the same noise (ties in the noise, which MAE leaves
    to an unstable sort, go to the lower position here). ids_restore is an O(L) scatter, not a second sort.

    Args:
        batch_size: B >= 0. seq_len: L >= 1. mask_ratio: in [0, 1].
        device: where the outputs live (default: noise's device, else the generator's, else torch's default).
        generator: torch.Generator for the noise (ignored when ``noise`` is given).
        noise: optional (B, L) float noise to use instead of drawing it.
        index_dtype: torch.int64 (default) or torch.int32 for ids_keep / ids_restore / ids_shuffle.

    Returns:
        RandomMask(ids_keep (B, Lk), ids_restore (B, L), mask (B, L) float32, ids_shuffle (B, L)).
    """
    bsz = _check_int("batch_size", batch_size, 0)
    seq_len = _check_int("seq_len", seq_len, 1)
    mask_ratio = _check_float("mask_ratio", mask_ratio, 0.0, 1.0)
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype: expected torch.int64 or torch.int32, got {index_dtype}")
    if noise is not None:
        _check_noise(noise, bsz, seq_len)
    device = _resolve_device(device, generator, noise)
    if noise is None:
        noise = _rand((bsz, seq_len), device, generator)
    len_keep = int(seq_len * (1 - mask_ratio))  # MAE's expression, rounding included
    ids_shuffle, ids_restore = _ranks(noise)
    mask = (ids_restore >= len_keep).to(torch.float32)  # = gather([0] * Lk + [1] * (L - Lk), ids_restore)
    ids_shuffle, ids_restore = ids_shuffle.to(index_dtype), ids_restore.to(index_dtype)
    return RandomMask(ids_shuffle[:, :len_keep], ids_restore, mask, ids_shuffle)


# ------------------------------------------------------------------------------------------------------ BEiT/CAE
def block_masking(
    batch_size: int,
    height: int = 14,
    width: int = 14,
    num_masking_patches: int = 75,
    *,
    min_num_patches: int = 16,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    exact: bool = False,
    device=None,
    generator: torch.Generator | None = None,
    max_attempts: int | None = None,
    return_attempts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """BEiT's block-wise masking for B samples in one launch (``mimfast::block_mask``; see kernels/block_mask.py).

    Blocks of area ~ U(min_num_patches, remaining) and log-uniform aspect ratio in [min_aspect, max_aspect] are
    placed, 10 attempts per block, until num_masking_patches cells are masked. ``exact=False`` is BEiT: stop when a
    block fails 10 times (a mask may hold fewer cells; with 75 of 196 about a third do). ``exact=True`` is CAE:
    always exactly the target. The cell count never exceeds the target.

    Each sample has a budget of ``max_attempts`` attempts (uniforms drawn up front: B * max_attempts * 16 bytes).
    Past it BEiT mode stops and exact mode fills the remaining cells in random order (the count stays exact). The
    defaults, 128 (BEiT mode) and 512 (exact mode), come from 10^6 samples each of BEiT 75/196 (at most 51 attempts
    seen) and CAE 98/196 (p99.99 174, max 300, P(> 256) = 5e-6); other settings may need other budgets
    (``return_attempts`` shows what was used).

    Args:
        batch_size: B >= 0. height, width: the patch grid (next_pow2(H) * next_pow2(W) <= 16384, e.g. 128 x 128).
        num_masking_patches: target count, 0 <= target <= H * W (BEiT 75, CAE 98 on 14 x 14).
        min_num_patches: smallest block drawn (>= 1). max_num_patches: largest block (None: the target).
        min_aspect: > 0. max_aspect: >= min_aspect (None: 1 / min_aspect).
        exact: CAE's exact count instead of BEiT's early stop.
        device, generator: where the masks live / the seeded source of all randomness.
        max_attempts: attempt budget per sample (>= 1); None: 128 for BEiT mode, 512 for exact mode.
        return_attempts: also return the (B,) int32 attempts each sample used.

    Returns:
        mask (B, H * W) bool, True = masked, row-major over the grid (BEiT's ``bool_masked_pos`` flattened);
        and attempts (B,) int32 when ``return_attempts``.
    """
    bsz = _check_int("batch_size", batch_size, 0)
    if max_attempts is None:
        max_attempts = default_max_attempts(bool(exact))
    max_attempts = _check_int("max_attempts", max_attempts, 1)
    p = resolve_block_params(height, width, num_masking_patches, min_num_patches, max_num_patches, min_aspect,
                             max_aspect)  # fmt: skip
    device = _resolve_device(device, generator)
    uniforms = _rand((bsz, max_attempts, 4), device, generator)
    noise = _rand((bsz, p[0] * p[1]), device, generator) if exact else None
    return block_mask(
        uniforms, noise, height=p[0], width=p[1], num_masking_patches=p[2], min_num_patches=p[3],
        max_num_patches=p[4], min_aspect=p[5], max_aspect=p[6], exact=bool(exact), return_attempts=return_attempts,
    )  # fmt: skip


def beit_block_masking(
    batch_size: int, height: int = 14, width: int = 14, num_masking_patches: int = 75, **kwargs
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """BEiT's setting: :func:`block_masking` with 75 of 14 x 14 by default and ``exact=False`` (may under-fill)."""
    return block_masking(batch_size, height, width, num_masking_patches, exact=False, **kwargs)


def cae_block_masking(
    batch_size: int, height: int = 14, width: int = 14, num_masking_patches: int = 98, **kwargs
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """CAE's setting: :func:`block_masking` with 98 of 14 x 14 by default and ``exact=True`` (always the target)."""
    return block_masking(batch_size, height, width, num_masking_patches, exact=True, **kwargs)


# ----------------------------------------------------------------------------------------------------------- MAGE
def _ndtr(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def _truncated_normal(mean: float, std: float, lo: float, hi: float, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample of N(mean, std^2) truncated to [lo, hi] for a float64 uniform ``u`` (any shape).

    The CDF values of the bounds are host floats (they depend on the arguments only); the quantile runs on the
    device with torch.special.ndtri. Both bounds above the mean use the upper tail, so tails keep their precision.
    """
    if std == 0.0:
        return torch.full_like(u, min(max(mean, lo), hi))
    za, zb = (lo - mean) / std, (hi - mean) / std
    if za > 0:  # both bounds above the mean: work with survival probabilities, which are not rounded to 1
        pa, pb, sign = _ndtr(-za), _ndtr(-zb), -1.0
    else:
        pa, pb, sign = _ndtr(za), _ndtr(zb), 1.0
    if pa == pb:  # the whole mass sits at one bound in float64
        return torch.full_like(u, min(max(mean, lo), hi))
    z = sign * torch.special.ndtri(u * (pb - pa) + pa)
    return (z * std + mean).clamp(lo, hi)


def mage_masking(
    batch_size: int,
    seq_len: int = 256,
    *,
    ratio_mean: float = 0.55,
    ratio_std: float = 0.25,
    ratio_min: float = 0.5,
    ratio_max: float = 1.0,
    device=None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    ratio: float | torch.Tensor | None = None,
    index_dtype: torch.dtype = torch.int64,
) -> MageMask:
    """MAGE's variable-ratio masking: one truncated-normal mask ratio per batch, then the drop / mask split.

    ratio ~ N(ratio_mean, ratio_std^2) truncated to [ratio_min, ratio_max] (one draw, inverse CDF, on the device).
    With noise ~ U(0, 1) of shape (B, L) and r = the rank of each token's noise (ties to the lower position):
    drop_mask = r < ceil(L * ratio_min), token_all_mask = r < ceil(L * ratio). MAGE selects with ``noise <= sorted
    cutoff`` and redraws the noise on the host when a tie breaks the counts; ranks give the same masks for
    tie-free noise and exact counts always, without the host loop. ids_keep lists each row's kept positions in
    increasing order, the order MAGE's ``nonzero`` gives.

    Args:
        batch_size: B >= 0. seq_len: L >= 1 (MAGE: 256 tokens; prepend the class token yourself).
        ratio_mean, ratio_std (>= 0), ratio_min, ratio_max (0 <= min <= max <= 1): the ratio distribution.
        device, generator: where outputs live / the seeded source (one float64 uniform for the ratio, then noise).
        noise: optional (B, L) float noise. ratio: optional fixed ratio, a float in [ratio_min, ratio_max] or a
            0-dim tensor on the device (not checked on the host; the masked count is clamped to [num_dropped, L]).
        index_dtype: torch.int64 (default) or torch.int32 for ids_keep / ids_restore.

    Returns:
        MageMask(ratio () float64, num_masked () int64, drop_mask (B, L) bool, token_all_mask (B, L) bool,
        ids_keep (B, L - ceil(L * ratio_min)), ids_restore (B, L)).
    """
    bsz = _check_int("batch_size", batch_size, 0)
    seq_len = _check_int("seq_len", seq_len, 1)
    ratio_min = _check_float("ratio_min", ratio_min, 0.0, 1.0)
    ratio_max = _check_float("ratio_max", ratio_max, 0.0, 1.0)
    if ratio_max < ratio_min:
        raise ValueError(f"ratio_max: expected >= ratio_min = {ratio_min}, got {ratio_max}")
    ratio_mean = _check_float("ratio_mean", ratio_mean)
    ratio_std = _check_float("ratio_std", ratio_std, 0.0)
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype: expected torch.int64 or torch.int32, got {index_dtype}")
    if noise is not None:
        _check_noise(noise, bsz, seq_len)
    device = _resolve_device(device, generator, noise)
    if ratio is None:
        u = _rand((), device, generator, dtype=torch.float64)
        ratio_t = _truncated_normal(ratio_mean, ratio_std, ratio_min, ratio_max, u)
    elif isinstance(ratio, torch.Tensor):
        if ratio.dim() != 0 or not ratio.is_floating_point():
            raise ValueError(f"ratio: expected a 0-dim float tensor, got shape {tuple(ratio.shape)} {ratio.dtype}")
        ratio_t = ratio.to(device, torch.float64)
    else:
        ratio_t = torch.tensor(_check_float("ratio", ratio, ratio_min, ratio_max), dtype=torch.float64, device=device)
    if noise is None:
        noise = _rand((bsz, seq_len), device, generator)

    num_dropped = int(math.ceil(seq_len * ratio_min))  # MAGE's int(np.ceil(seq_len * mask_ratio_min))
    num_masked = torch.ceil(ratio_t * seq_len).long().clamp(num_dropped, seq_len)  # on the device: no sync
    _, rank = _ranks(noise)
    drop = rank < num_dropped
    token_all_mask = rank < num_masked
    keep = ~drop
    len_keep = seq_len - num_dropped
    slot_keep = torch.cumsum(keep, dim=1) - 1
    slot_drop = torch.cumsum(drop, dim=1) - 1 + len_keep
    ids_restore = torch.where(keep, slot_keep, slot_drop)
    ar = torch.arange(seq_len, device=noise.device).expand(bsz, seq_len)
    ids_shuffle = torch.empty_like(ids_restore).scatter_(1, ids_restore, ar)
    ids_keep = ids_shuffle[:, :len_keep].to(index_dtype)
    return MageMask(ratio_t, num_masked, drop, token_all_mask, ids_keep, ids_restore.to(index_dtype))

"""PatchNCE (CUT, Park et al. 2020) and Regularized VQ's probabilistic contrastive loss (Zhang et al., CVPR 2023).

Both compare the feature map of a reconstruction (the queries ``feat_q``) with the feature map of the image it
reconstructs (the keys ``feat_k``), location by location: the key at the same location is the positive, the keys at
the other sampled locations of the same image are the negatives. Per image and layer, with ``S`` sampled locations,
l2-normalised features ``q_i``, ``k_j`` and ``s_ij = q_i . k_j / tau``::

    PatchNCE:  l_i = -log( exp(s_ii) / (exp(s_ii) + sum_{j != i} exp(s_ij)) )
    PCL:       l_i = -log( exp(m_i s_ii) / (exp(m_i s_ii) + 1/L sum_{j != i} exp(s_ij)) ),   L = S - 1

where ``m_i`` is the position weight of :func:`pcl_position_weights` (mean 1 per image). The loss is the mean of
``l_i`` over images and locations, then over layers. The locations are one seeded random subset per layer, shared by
the images of the batch and by queries and keys (as in CUT). CUT's projection MLP is not part of these functions:
put it in the feature extractor if you want one. Everything is computed in fp32 (bf16/fp16 features are upcast;
fp64 stays fp64).

Regularized VQ has no public code; where its paper leaves a detail open, :func:`probabilistic_contrastive_loss`
makes it a parameter and says which reading is the default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["patch_nce_loss", "pcl_position_weights", "probabilistic_contrastive_loss"]

Features = torch.Tensor | Sequence[torch.Tensor]

_NEGATIVES = ("mean", "sum")
_WEIGHT_MODES = ("logit", "loss")
_RESIZE_MODES = ("area", "nearest")


# --------------------------------------------------------------------------------------------------- validation
def _layers(feat_q: Features, feat_k: Features) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pair the layers of ``feat_q`` and ``feat_k`` and check them: 4-D, floating, equal shapes, >= 2 locations."""
    qs = [feat_q] if isinstance(feat_q, torch.Tensor) else feat_q
    ks = [feat_k] if isinstance(feat_k, torch.Tensor) else feat_k
    for name, fs in (("feat_q", qs), ("feat_k", ks)):
        if not isinstance(fs, Sequence) or isinstance(fs, str) or len(fs) == 0:
            raise TypeError(f"{name}: expected a tensor (B, C, H, W) or a non-empty list of them, got {fs!r}")
    if len(qs) != len(ks):
        raise ValueError(f"feat_q, feat_k: expected the same number of layers, got {len(qs)} and {len(ks)}")
    pairs = []
    for n, (q, k) in enumerate(zip(qs, ks, strict=True)):
        at = f"[{n}]" if len(qs) > 1 or not isinstance(feat_q, torch.Tensor) else ""
        for name, f in (("feat_q", q), ("feat_k", k)):
            if not isinstance(f, torch.Tensor):
                raise TypeError(f"{name}{at}: expected a torch.Tensor, got {type(f).__name__}")
            if f.dim() != 4 or not f.is_floating_point():
                raise ValueError(
                    f"{name}{at}: expected a floating feature map (B, C, H, W), got shape {tuple(f.shape)} "
                    f"and dtype {f.dtype}"
                )
        if q.shape != k.shape:
            raise ValueError(
                f"feat_q{at}, feat_k{at}: expected equal shapes, got {tuple(q.shape)} and {tuple(k.shape)}"
            )
        if q.device != k.device:
            raise ValueError(f"feat_q{at}, feat_k{at}: expected the same device, got {q.device} and {k.device}")
        b, c, h, w = q.shape
        if b == 0 or c == 0 or h * w < 2:
            raise ValueError(
                f"feat_q{at}: expected B >= 1, C >= 1 and H*W >= 2 (a positive and at least one negative), "
                f"got shape {tuple(q.shape)}"
            )
        pairs.append((q, k))
    return pairs


def _check_common(tau: float, num_patches: int | None, generator: torch.Generator | None) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau: expected a finite number > 0, got {tau!r}")
    if num_patches is not None and (
        isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 2
    ):
        raise ValueError(f"num_patches: expected an int >= 2 or None (every location), got {num_patches!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")


# --------------------------------------------------------------------------------------------------- core
def _sample_locations(
    hw: int, num_patches: int | None, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor | None:
    """Indices (S,) of the sampled locations of an H*W grid, or None for all of them (no random numbers drawn)."""
    if num_patches is None or num_patches >= hw:
        return None
    gen_device = generator.device if generator is not None else device
    perm = torch.randperm(hw, generator=generator, device=gen_device)
    return perm[:num_patches].to(device)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32/fp64 unchanged (fp64 keeps gradcheck possible)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _gather(f: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """(B, C, H, W) -> (B, S, C) in fp32 (or fp64), l2-normalised over C, at the locations ``idx`` (all when None)."""
    x = _upcast(f.flatten(2))
    if idx is not None:
        x = x.index_select(2, idx)
    return F.normalize(x.transpose(1, 2), dim=-1)


def _nce_per_location(
    q: torch.Tensor, k: torch.Tensor, tau: float, pos_scale: torch.Tensor | None, negatives: str
) -> torch.Tensor:
    """Per-location InfoNCE of queries q (B, S, C) against keys k (B, S, C): -> (B, S).

    Positive of row i: ``pos_scale_i * s_ii`` (``s_ii`` when None); negatives: ``s_ij``, j != i, summed
    (``negatives="sum"``) or averaged (``"mean"``: their exponentials scaled by 1/(S-1)).
    """
    s = torch.bmm(q, k.transpose(1, 2)) / tau  # (B, S, S): s[b, i, j] = q_i . k_j / tau
    n = s.shape[-1]
    pos = s.diagonal(dim1=1, dim2=2)
    if pos_scale is not None:
        pos = pos * pos_scale
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    neg = torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=-1)
    if negatives == "mean":
        neg = neg - math.log(n - 1)
    return torch.logaddexp(pos, neg) - pos


def patch_nce_loss(
    feat_q: Features,
    feat_k: Features,
    *,
    tau: float = 0.07,
    num_patches: int | None = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PatchNCE loss (CUT, Park et al. 2020) between a reconstruction's features and its image's features.

    Args:
        feat_q: features of the reconstruction (the queries), (B, C, H, W), or a list of such maps (one per layer,
            shapes may differ between layers).
        feat_k: features of the image itself (the keys), same shape(s) as ``feat_q``. Not detached here: detach them
            (as CUT does) unless gradients should flow into them.
        tau: temperature (0.07, CUT's value).
        num_patches: locations sampled per layer (256, CUT's value); every location when None or when the map has
            no more than that. The sample is one ``torch.randperm`` per layer drawn from ``generator`` (or the
            default generator of the features' device), shared by the images of the batch.
        generator: makes the sampled locations reproducible.

    Returns:
        scalar (fp32): the mean over images and locations of ``-log softmax`` of the positive (same location) among
        the positive and the ``S - 1`` other sampled locations of the same image, averaged over layers. Features are
        l2-normalised over C first.
    """
    _check_common(tau, num_patches, generator)
    total = None
    pairs = _layers(feat_q, feat_k)
    for q, k in pairs:
        idx = _sample_locations(q.shape[2] * q.shape[3], num_patches, generator, q.device)
        layer = _nce_per_location(_gather(q, idx), _gather(k, idx), tau, None, "sum").mean()
        total = layer if total is None else total + layer
    return total / len(pairs)


def pcl_position_weights(weights: torch.Tensor, *, floor: float = 0.1) -> torch.Tensor:
    """Regularized VQ's per-position weights, normalised per image: (B, h, w) -> (B, h, w) multipliers of mean 1.

    ``p = (1 - floor) * w / sum(w) + floor / N`` is ``w`` normalised to sum to 1 over the N = h*w positions of an
    image and mixed with the uniform distribution; the returned multiplier is ``N * p`` (mean 1), so a position of
    zero weight (an argmax position) gets exactly ``floor`` and the others share the remaining ``1 - floor`` of the
    mean in proportion to ``w``. An image whose weights are all zero (or all equal) gets multipliers of 1.

    Args:
        weights: w_i = ||z_sampled_i - z_best_i||^2 from the stochastic quantizer, (B, h, w), finite and >= 0
            (0 at argmax positions). Detached: the weights are not trained through.
        floor: the multiplier of a zero-weight position, in [0, 1] (0.1). 1 ignores the weights (plain PatchNCE
            weighting).
    """
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor: expected a number in [0, 1], got {floor!r}")
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights: expected a torch.Tensor (B, h, w), got {type(weights).__name__}")
    if weights.dim() != 3 or weights.numel() == 0 or not weights.is_floating_point():
        raise ValueError(
            f"weights: expected a non-empty floating tensor (B, h, w), got shape {tuple(weights.shape)} and "
            f"dtype {weights.dtype}"
        )
    w = _upcast(weights.detach())
    bad = ~torch.isfinite(w) | (w < 0)
    if bool(bad.any()):  # one device-to-host sync
        kind = "non-finite" if not bool(torch.isfinite(w).all()) else "negative"
        raise ValueError(f"weights: expected finite values >= 0, got {kind} values")
    n = w.shape[1] * w.shape[2]
    total = w.sum(dim=(1, 2), keepdim=True)
    share = torch.where(total > 0, w * (n / total.clamp_min(torch.finfo(torch.float32).tiny)), torch.ones_like(w))
    return share + floor * (1.0 - share)  # = floor + (1 - floor) * share; exactly 1 where share is 1, floor where 0


def _resize(m: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(B, h, w) -> (B, H, W): "area" (averages over each target cell; replicates when upsampling by an integer
    factor) or "nearest" (``nearest-exact``: each target cell takes the value of the source cell under its centre)."""
    if tuple(m.shape[1:]) == tuple(size):
        return m
    mode = "nearest-exact" if mode == "nearest" else "area"
    return F.interpolate(m.unsqueeze(1), size=size, mode=mode).squeeze(1)


def probabilistic_contrastive_loss(
    feat_q: Features,
    feat_k: Features,
    weights: torch.Tensor,
    *,
    tau: float = 0.07,
    num_patches: int | None = 256,
    floor: float = 0.1,
    negatives: str = "mean",
    weight_mode: str = "logit",
    resize: str = "area",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Regularized VQ's probabilistic contrastive loss (PCL; Zhang et al., CVPR 2023), our reading of the paper.

    PatchNCE (see :func:`patch_nce_loss`) in which the positive logit of location i is multiplied by the position
    weight ``m_i`` (``weight_mode="logit"``) and the negatives' exponentials are scaled by 1/L, L = S - 1 negatives
    (``negatives="mean"``)::

        l_i = -log( exp(m_i s_ii) / (exp(m_i s_ii) + 1/L sum_{j != i} exp(s_ij)) ),   s_ij = q_i . k_j / tau

    ``m`` comes from ``weights`` by :func:`pcl_position_weights` (w normalised to sum 1 per image at token
    resolution, mixed with a ``floor`` so argmax positions still contribute, and expressed as a multiplier of
    mean 1), then resized to each feature map's H x W (``resize``).

    Interpretation (the paper gives the formula's ingredients, not every detail; each choice is a parameter):

    - ``weight_mode``: "logit" (default, as SPEC.md words it: the positive logit is weighted) or "loss" (plain
      PatchNCE terms averaged with the weights, ``mean_i m_i l_i``).
    - ``negatives``: "mean" (default: "negatives scaled by 1/L" read as averaging their exponentials, i.e. a
      log-mean-exp; scaling the negative *logits* by 1/L would make them all ~0 for L = 255 and is not offered) or
      "sum" (PatchNCE's denominator).
    - normalisation: "sum to 1 per image" is kept, then multiplied by the number of positions so that uniform
      weights leave the positives unscaled; without that factor every positive logit would be ~1/N of PatchNCE's.
    - ``floor``: see :func:`pcl_position_weights` (0.1: an argmax position weighs a tenth of the average position).
    - ``resize``: "area" (default) or "nearest" from the (h, w) token grid to each feature map; weights are
      normalised on the token grid first, so both modes keep the mean multiplier at 1 for integer scale factors.

    Equals :func:`patch_nce_loss` with the same ``tau``, ``num_patches`` and generator state when
    ``negatives="sum"`` and every multiplier is 1, i.e. when within each image all weights are equal (all zero
    included) or ``floor == 1`` (up to fp32 rounding of the normalisation).

    Args:
        feat_q: features of the reconstruction, (B, C, H, W) or a list of them (one per layer).
        feat_k: features of the image itself, same shape(s).
        weights: (B, h, w) w_i = ||z_sampled_i - z_best_i||^2 at token resolution, finite, >= 0; detached here.
        tau, num_patches, generator: as in :func:`patch_nce_loss`.
        floor, negatives, weight_mode, resize: see above.

    Returns:
        scalar (fp32): mean over images and sampled locations, averaged over layers.
    """
    _check_common(tau, num_patches, generator)
    if negatives not in _NEGATIVES:
        raise ValueError(f"negatives: expected one of {_NEGATIVES}, got {negatives!r}")
    if weight_mode not in _WEIGHT_MODES:
        raise ValueError(f"weight_mode: expected one of {_WEIGHT_MODES}, got {weight_mode!r}")
    if resize not in _RESIZE_MODES:
        raise ValueError(f"resize: expected one of {_RESIZE_MODES}, got {resize!r}")
    pairs = _layers(feat_q, feat_k)
    m = pcl_position_weights(weights, floor=floor)
    b = pairs[0][0].shape[0]
    if m.shape[0] != b:
        raise ValueError(f"weights: expected a batch of {b} (as feat_q), got shape {tuple(weights.shape)}")
    if m.device != pairs[0][0].device:
        raise ValueError(f"weights: expected device {pairs[0][0].device} (as feat_q), got {m.device}")
    total = None
    for q, k in pairs:
        if q.shape[0] != b:
            raise ValueError(f"feat_q: every layer must have the batch size {b}, got shape {tuple(q.shape)}")
        idx = _sample_locations(q.shape[2] * q.shape[3], num_patches, generator, q.device)
        mq = _resize(m, (q.shape[2], q.shape[3]), resize).flatten(1)
        if idx is not None:
            mq = mq.index_select(1, idx)
        qs, ks = _gather(q, idx), _gather(k, idx)
        if weight_mode == "logit":
            layer = _nce_per_location(qs, ks, tau, mq, negatives).mean()
        else:
            layer = (mq * _nce_per_location(qs, ks, tau, None, negatives)).mean()
        total = layer if total is None else total + layer
    return total / len(pairs)

"""Drop-in vector quantization: ``mimfast.quantize`` and the checked ``mimfast.vq_search``.

The nearest-code search is the fused ``mimfast::vq_search`` op (no N x K matrix); the rest (code gather,
straight-through estimator, commitment/codebook losses) is a handful of elementwise passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimfast.kernels.vq_search import DEFAULT_EPS
from mimfast.kernels.vq_search import vq_search as _vq_search_op

NAN_POLICIES = ("raise", "mask")

__all__ = ["NAN_POLICIES", "QuantizeInfo", "quantize", "quantize_with_info", "usage_stats", "vq_search"]


def _raise_non_finite(x: torch.Tensor, codebook: torch.Tensor, bad: torch.Tensor) -> None:
    n_bad = int(bad.sum())
    where = []
    if not bool(torch.isfinite(x).all()):
        where.append("x contains NaN/inf")
    if not bool(torch.isfinite(codebook).all()):
        where.append("codebook contains NaN/inf")
    reason = "; ".join(where) if where else "distances overflowed fp32 (inputs of magnitude ~1e19 or more)"
    raise ValueError(
        f"vq_search: {n_bad} of {bad.numel()} rows have no finite distance to any code ({reason}). "
        "Fix the inputs, or pass nan_policy='mask' to give such rows index -1 and skip them."
    )


def vq_search(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: str = "l2",
    valid: torch.Tensor | None = None,
    index_dtype: torch.dtype = torch.int64,
    return_counts: bool = False,
    nan_policy: str = "raise",
    eps: float = DEFAULT_EPS,
    precision: str | torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Nearest code of every row: ``indices[n] = argmin_k d(x[n], codebook[k])`` in one fused kernel.

    Args:
        x: (N, D) float tensor (fp32 / bf16 / fp16 on the kernel; fp64 on the reference).
        codebook: (K, D) on the same device, K >= 1.
        metric: "l2" (``||x||^2 + ||e||^2 - 2 x.e``) or "cosine" (the same on l2-normalised x and codes).
        valid: optional (N,) bool, False rows are skipped (index -1, distance 0, not counted).
        index_dtype: torch.int64 or torch.int32.
        return_counts: also return the (K,) int32 histogram of the chosen indices.
        nan_policy: "raise" (default): a row with no finite distance (NaN/inf in x or in every code, or fp32
            overflow) raises ValueError; this costs one device-to-host sync on an N-element flag.
            "mask": such rows get index -1 and distance NaN, no sync. Non-finite codes are never chosen either way.
        eps: norm floor of the cosine metric.
        precision: dtype of the products x.e. None (default) follows ``torch.autocast`` when it is enabled (bf16
            activations + an fp32 codebook under bf16 autocast multiply in bf16 on tensor cores, with fp32
            accumulation and fp32 norms), else the inputs (bf16 / fp16 pairs in their dtype; fp32 as torch's
            matmul precision says: "highest" -> full fp32, "high" -> tf32). Force one with "ieee", "tf32",
            "tf32x3", "bf16" or "fp16" (or a torch dtype).

    Returns:
        (indices (N,), distances (N,) fp32, counts (K,) int32 or None). Ties go to the lowest index.
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy: expected one of {NAN_POLICIES}, got {nan_policy!r}")
    idx, dist, counts = _vq_search_op(
        x, codebook, metric=metric, valid=valid, index_dtype=index_dtype, return_counts=return_counts, eps=eps,
        precision=precision,
    )  # fmt: skip
    if nan_policy == "raise" and dist.numel():
        bad = torch.isnan(dist)
        if bool(bad.any()):
            _raise_non_finite(x, codebook, bad)
    return idx, dist, counts


class QuantizeInfo:
    """Everything ``quantize_with_info`` computed besides the triple; flat over positions (M = prod(leading dims)).

    Attributes:
        z: (M, D) the input as searched (l2-normalised for the cosine metric), autograd-connected.
        indices: (M,) chosen code per position, -1 where ignored.
        valid: (M,) bool, positions that took part (mask and nan_policy applied).
        counts: (K,) int32 histogram of the chosen indices over valid positions.
        distances: (M,) fp32 distance to the chosen code.
    """

    __slots__ = ("z", "indices", "valid", "counts", "distances")

    def __init__(self, z, indices, valid, counts, distances):
        self.z, self.indices, self.valid, self.counts, self.distances = z, indices, valid, counts, distances


def _check_quantize_args(x, codebook, metric, channel_first, mask, commitment_weight):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"codebook: expected a torch.Tensor, got {type(codebook).__name__}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook: expected a 2-D tensor (K, D), got shape {tuple(codebook.shape)}")
    min_dim = 2 if channel_first else 1
    if x.dim() < min_dim:
        want = "(B, D, *spatial)" if channel_first else "(..., D)"
        raise ValueError(f"x: expected shape {want}, got shape {tuple(x.shape)}")
    d = x.shape[1] if channel_first else x.shape[-1]
    if d != codebook.shape[1]:
        where = "dim 1 (channel_first=True)" if channel_first else "the last dim"
        raise ValueError(
            f"x: feature size {d} along {where} does not match codebook's D={codebook.shape[1]} "
            f"(x shape {tuple(x.shape)}, codebook shape {tuple(codebook.shape)})"
        )
    if mask is not None:
        lead = (x.shape[0],) + tuple(x.shape[2:]) if channel_first else tuple(x.shape[:-1])
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != lead:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask: expected a bool tensor of shape {lead} (x without its feature dim), got {got}")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric: expected 'l2' or 'cosine', got {metric!r}")
    if not commitment_weight >= 0:
        raise ValueError(f"commitment_weight: expected a number >= 0, got {commitment_weight}")


def quantize_with_info(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: str = "l2",
    channel_first: bool = False,
    commitment_weight: float = 0.25,
    legacy_beta: bool = False,
    codebook_loss: bool = True,
    mask: torch.Tensor | None = None,
    index_dtype: torch.dtype = torch.int64,
    nan_policy: str = "raise",
    eps: float = DEFAULT_EPS,
    precision: str | torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, QuantizeInfo]:
    """:func:`quantize` plus a :class:`QuantizeInfo` with the flat intermediates (for EMA updates and statistics)."""
    _check_quantize_args(x, codebook, metric, channel_first, mask, commitment_weight)
    xl = x.movedim(1, -1) if channel_first else x
    lead, d = xl.shape[:-1], xl.shape[-1]
    z = xl.reshape(-1, d)
    e = codebook
    if metric == "cosine":
        z = F.normalize(z, dim=-1, eps=eps)
        e = F.normalize(codebook, dim=-1, eps=eps)
    valid = None if mask is None else mask.reshape(-1)

    # the search never needs gradients: it sees detached tensors (the op is not differentiable)
    idx, dist, counts = vq_search(
        z.detach(), e.detach(), metric="l2", valid=valid, index_dtype=index_dtype, return_counts=True,
        nan_policy=nan_policy, eps=eps, precision=precision,
    )  # fmt: skip
    keep = idx >= 0  # excludes masked rows and (nan_policy="mask") non-finite ones
    zq = F.embedding(idx.clamp_min(0).long(), e).to(z.dtype)  # gradient reaches the codebook through index_add

    # losses over the kept positions only, in fp32 (fp64 for fp64 inputs)
    lt = torch.promote_types(z.dtype, torch.float32)
    kf = keep.to(lt)[:, None]
    denom = (kf.sum() * d).clamp_min(1.0)
    zf, zqf = z.to(lt), zq.to(lt)
    safe_z = torch.where(keep[:, None], zf, torch.zeros_like(zf))  # NaN rows must not poison the sums
    safe_q = torch.where(keep[:, None], zqf, torch.zeros_like(zqf))
    commit = ((safe_q.detach() - safe_z) ** 2 * kf).sum() / denom
    w_commit, w_cb = (1.0, commitment_weight) if legacy_beta else (commitment_weight, 1.0)
    loss = w_commit * commit
    if codebook_loss:
        loss = loss + w_cb * (((safe_q - safe_z.detach()) ** 2 * kf).sum() / denom)

    out = z + (zq - z).detach()  # straight-through: forward zq, backward identity to z
    out = torch.where(keep[:, None], out, xl.reshape(-1, d))  # ignored positions pass the input through
    out = out.reshape(*lead, d).to(x.dtype)
    if channel_first:
        out = out.movedim(-1, 1)
    indices = idx.reshape(lead)
    return out, indices, loss, QuantizeInfo(z, idx, keep, counts, dist)


def quantize(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: str = "l2",
    channel_first: bool = False,
    commitment_weight: float = 0.25,
    legacy_beta: bool = False,
    codebook_loss: bool = True,
    mask: torch.Tensor | None = None,
    index_dtype: torch.dtype = torch.int64,
    nan_policy: str = "raise",
    eps: float = DEFAULT_EPS,
    precision: str | torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to its nearest codes with a straight-through gradient; drop-in for VQ layers.

    Args:
        x: (..., D), or (B, D, *spatial) with ``channel_first=True`` (image feature maps, e.g. (B, D, H, W)).
        codebook: (K, D). A learnable codebook receives the codebook-loss gradient; pass an EMA codebook with
            ``codebook_loss=False``.
        metric: "l2" or "cosine" (x and codes are l2-normalised; the output is then the normalised code).
        commitment_weight: beta (0.25).
        legacy_beta: False (default): ``loss = beta * ||sg[zq] - z||^2 + ||zq - sg[z]||^2`` (VQ-VAE's placement).
            True: ``||sg[zq] - z||^2 + beta * ||zq - sg[z]||^2``, the placement taming-transformers' quantizer
            applies by default, to reproduce checkpoints trained with it.
        codebook_loss: include the codebook term (False for EMA codebooks, which learn by averaging).
        mask: optional bool of x's leading shape, **True where a position is real** (vector-quantize-pytorch's
            convention); False positions get index -1, pass x through unchanged and are excluded from the loss and
            the counts.
        index_dtype: torch.int64 or torch.int32.
        nan_policy: "raise" or "mask", see :func:`vq_search`.
        eps: norm floor of the cosine metric.
        precision: dtype of the search's products, see :func:`vq_search` (None: follow ``torch.autocast``).

    Returns:
        quantized: like x (straight-through; ignored positions equal x),
        indices: x's leading shape ((B, *spatial) for channel_first), -1 at ignored positions,
        loss: scalar fp32 (fp64 for fp64 x), mean squared error per element over the kept positions.
    """
    out, indices, loss, _ = quantize_with_info(
        x, codebook, metric=metric, channel_first=channel_first, commitment_weight=commitment_weight,
        legacy_beta=legacy_beta, codebook_loss=codebook_loss, mask=mask, index_dtype=index_dtype,
        nan_policy=nan_policy, eps=eps, precision=precision,
    )  # fmt: skip
    return out, indices, loss


def usage_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Codebook usage from a (K,) histogram: ``perplexity`` = exp(entropy) (K at uniform use, 1 at collapse) and
    ``used_fraction`` = share of codes chosen at least once. Tensors, so no host sync until you read them."""
    c = counts.float()
    p = c / c.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return {"perplexity": entropy.exp(), "used_fraction": (c > 0).float().mean()}

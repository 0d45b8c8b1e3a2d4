"""``VectorQuantizer``: a codebook module over ``mimfast.quantize`` (learnable or EMA codebook).

EMA statistics are segment sums (``index_add_``) of the batch vectors and the kernel's fused histogram, never a
one-hot GEMM; under ``torch.distributed`` they are summed across ranks in one all-reduce, so every rank holds the
same codebook. Argument names follow vector-quantize-pytorch where the meaning is the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mimfast.ops.quantize import quantize_with_info, usage_stats, vq_search

__all__ = ["VectorQuantizer"]


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _laplace(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    """Laplace-smoothed cluster sizes: (c + eps) / (n + K eps) * n, so that no code divides by zero."""
    n = cluster_size.sum()
    return (cluster_size + eps) / (n + cluster_size.numel() * eps) * n


class VectorQuantizer(nn.Module):
    """Vector quantizer with a learnable or EMA codebook, dead-code restart and optional k-means init.

    Args:
        dim: feature size D.
        codebook_size: number of codes K.
        commitment_weight: beta of the commitment loss (0.25).
        legacy_beta: put beta on the codebook term instead, as taming-transformers' quantizer does (see
            :func:`mimfast.quantize`). Only meaningful with a learnable codebook.
        use_cosine_sim: cosine metric (inputs and codes l2-normalised).
        ema_update: True: the codebook is a buffer updated by exponential moving averages (no codebook loss);
            False: an ``nn.Parameter`` trained by the codebook loss.
        decay: EMA decay of cluster sizes and sums.
        eps: Laplace smoothing of the cluster sizes.
        threshold_ema_dead_code: codes whose EMA cluster size falls below this are restarted from random batch
            vectors (their EMA state is reset to that vector with a cluster size of the threshold). 0 disables.
        kmeans_init: initialise the codebook by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that k-means.
        accept_image_fmap: inputs are (B, D, *spatial) feature maps instead of (..., D).
        sync_codebook: all-reduce EMA statistics across ranks; None (default) = when torch.distributed is
            initialised with more than one rank.
        index_dtype: dtype of the returned indices (torch.int64 or torch.int32).
        nan_policy: "raise" or "mask", see :func:`mimfast.vq_search`.
        precision: dtype of the nearest-code search's products (see :func:`mimfast.vq_search`): None (default)
            follows ``torch.autocast`` (bf16 activations and the fp32 codebook multiply in bf16 on tensor cores,
            fp32 accumulation and norms), or "ieee" / "tf32" / "tf32x3" / "bf16" / "fp16".

    Shapes: ``forward(x (..., D), mask (...) | None) -> (quantized (..., D), indices (...), loss ())``.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        commitment_weight: float = 0.25,
        legacy_beta: bool = False,
        use_cosine_sim: bool = False,
        ema_update: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 0.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        accept_image_fmap: bool = False,
        sync_codebook: bool | None = None,
        index_dtype: torch.dtype = torch.int64,
        nan_policy: str = "raise",
        precision: str | torch.dtype | None = None,
    ):
        super().__init__()
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"dim: expected an int >= 1, got {dim!r}")
        if not (isinstance(codebook_size, int) and codebook_size >= 1):
            raise ValueError(f"codebook_size: expected an int >= 1, got {codebook_size!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected 0 <= decay < 1, got {decay}")
        if not eps > 0:
            raise ValueError(f"eps: expected > 0, got {eps}")
        if threshold_ema_dead_code < 0:
            raise ValueError(f"threshold_ema_dead_code: expected >= 0, got {threshold_ema_dead_code}")
        if kmeans_iters < 1:
            raise ValueError(f"kmeans_iters: expected >= 1, got {kmeans_iters}")
        if legacy_beta and ema_update:
            raise ValueError("legacy_beta: only applies to a learnable codebook (ema_update=False)")
        self.dim, self.codebook_size = dim, codebook_size
        self.commitment_weight, self.legacy_beta = float(commitment_weight), legacy_beta
        self.metric = "cosine" if use_cosine_sim else "l2"
        self.ema_update, self.decay, self.eps = ema_update, float(decay), float(eps)
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.accept_image_fmap, self.sync_codebook = accept_image_fmap, sync_codebook
        self.index_dtype, self.nan_policy, self.precision = index_dtype, nan_policy, precision

        embed = torch.randn(codebook_size, dim)
        if use_cosine_sim:
            embed = F.normalize(embed, dim=-1)
        if ema_update:
            self.register_buffer("embed", embed)
        else:
            self.embed = nn.Parameter(embed)
        # cluster_size starts at 1 so that embed == embed_avg / laplace(cluster_size) holds from the first step
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("last_counts", torch.zeros(codebook_size, dtype=torch.int32), persistent=False)

    # ------------------------------------------------------------------------------------------------- helpers
    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) the current codes."""
        return self.embed

    def _synced(self) -> bool:
        return self.sync_codebook if self.sync_codebook is not None else _dist_world() > 1

    def _all_reduce_(self, *tensors: torch.Tensor) -> None:
        """Sum fp32 tensors across ranks in a single collective (packed into one flat buffer)."""
        if not self._synced():
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        off = 0
        for t in tensors:
            t.copy_(flat[off : off + t.numel()].view_as(t))
            off += t.numel()

    def _broadcast_(self, t: torch.Tensor) -> None:
        if self._synced():
            dist.broadcast(t, src=0)

    def _sample_rows(self, z: torch.Tensor, valid: torch.Tensor, num: int) -> torch.Tensor:
        """(num, D) random rows of z among the valid ones (all rows if none is valid); no host sync."""
        w = valid.float()
        w = torch.where(w.sum() > 0, w, torch.ones_like(w))
        rows = torch.multinomial(w, num, replacement=True)
        out = z[rows].float()
        self._broadcast_(out)  # rank 0's draw is every rank's draw
        return out

    def _segment_sums(self, z: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        zf = torch.where(valid[:, None], z.float(), torch.zeros((), device=z.device))  # NaN rows add nothing
        sums = torch.zeros(self.codebook_size, self.dim, device=z.device, dtype=torch.float32)
        return sums.index_add_(0, idx.clamp_min(0).long(), zf)

    def _normalise(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(e, dim=-1) if self.metric == "cosine" else e

    # ----------------------------------------------------------------------------------------- state updates
    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Lloyd's k-means on the rows of z (M, D) (all-reduced across ranks); sets codes and EMA state."""
        z = z.detach()
        if self.metric == "cosine":
            z = F.normalize(z.float(), dim=-1)
        valid = torch.ones(z.shape[0], dtype=torch.bool, device=z.device) if valid is None else valid
        centroids = self._sample_rows(z, valid, self.codebook_size)
        counts = torch.zeros(self.codebook_size, device=z.device)
        for _ in range(self.kmeans_iters):
            idx, _, c = vq_search(z, centroids, valid=valid, return_counts=True, nan_policy="mask")
            sums = self._segment_sums(z, idx, valid & (idx >= 0))
            counts = c.float()
            self._all_reduce_(counts, sums)
            means = self._normalise(sums / counts.clamp_min(1.0)[:, None])
            centroids = torch.where(counts[:, None] > 0, means, centroids)  # empty clusters keep their centre
        size = counts.clamp_min(1.0)  # an empty cluster starts with a pseudo-count of 1 so its centre is kept
        self.embed.data.copy_(centroids)
        self.cluster_size.copy_(size)
        self.embed_avg.copy_(centroids * _laplace(size, self.eps)[:, None])
        self.initted.fill_(True)

    @torch.no_grad()
    def _update(self, z: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor) -> None:
        counts = counts.float()
        sums = self._segment_sums(z.detach(), idx, valid) if self.ema_update else None
        if sums is not None:
            self._all_reduce_(counts, sums)
        else:
            self._all_reduce_(counts)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        if self.ema_update:
            self.embed_avg.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
            self.embed.copy_(self._normalise(self.embed_avg / _laplace(self.cluster_size, self.eps)[:, None]))
        if self.threshold_ema_dead_code > 0:
            self._restart_dead_codes(z.detach(), valid)

    @torch.no_grad()
    def _restart_dead_codes(self, z: torch.Tensor, valid: torch.Tensor) -> None:
        """Codes with EMA cluster size < threshold take a random batch vector; their EMA state is reset to it."""
        dead = self.cluster_size < self.threshold_ema_dead_code  # identical on every rank (synced statistics)
        samples = self._normalise(self._sample_rows(z, valid, self.codebook_size))
        d = dead[:, None]
        self.embed.data.copy_(torch.where(d, samples.to(self.embed.dtype), self.embed.data))
        self.cluster_size.copy_(torch.where(dead, torch.full_like(self.cluster_size, self.threshold_ema_dead_code),
                                            self.cluster_size))  # fmt: skip
        # keep embed == embed_avg / laplace(cluster_size) for the restarted codes
        scale = _laplace(self.cluster_size, self.eps)[:, None]
        self.embed_avg.copy_(torch.where(d, samples * scale, self.embed_avg))

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (..., D) or (B, D, *spatial) with accept_image_fmap; mask: bool of the leading shape, True = real.

        Returns (quantized like x, indices of the leading shape with -1 at masked positions, scalar loss).
        In training mode the EMA statistics (and k-means init / dead-code restart) are updated after the search.
        """
        if self.training and not bool(self.initted):
            xl = x.movedim(1, -1) if self.accept_image_fmap else x
            self.init_kmeans(xl.reshape(-1, self.dim), None if mask is None else mask.reshape(-1))
        out, indices, loss, info = quantize_with_info(
            x, self.embed, metric=self.metric, channel_first=self.accept_image_fmap,
            commitment_weight=self.commitment_weight, legacy_beta=self.legacy_beta,
            codebook_loss=not self.ema_update, mask=mask, index_dtype=self.index_dtype, nan_policy=self.nan_policy,
            precision=self.precision,
        )  # fmt: skip
        self.last_counts = info.counts
        if self.training:
            self._update(info.z, info.indices, info.valid, info.counts)
        return out, indices, loss

    @torch.no_grad()
    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices (...) -> (..., D), or (B, D, *spatial) with accept_image_fmap; index -1 gives zeros."""
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices: expected int64 or int32, got {indices.dtype}")
        if indices.numel() and (int(indices.max()) >= self.codebook_size or int(indices.min()) < -1):
            raise ValueError(f"indices: expected values in [-1, {self.codebook_size - 1}]")
        codes = F.embedding(indices.clamp_min(0).long(), self.embed)
        codes = torch.where((indices >= 0)[..., None], codes, torch.zeros((), dtype=codes.dtype, device=codes.device))
        return codes.movedim(-1, 1) if self.accept_image_fmap else codes

    def usage(self) -> dict[str, torch.Tensor]:
        """Usage of the last forward batch (``perplexity``, ``used_fraction``) and ``ema_used_fraction``, the
        share of codes whose EMA cluster size is at or above max(threshold_ema_dead_code, 1e-3)."""
        stats = usage_stats(self.last_counts)
        stats["ema_used_fraction"] = (self.cluster_size >= max(self.threshold_ema_dead_code, 1e-3)).float().mean()
        return stats

    def extra_repr(self) -> str:
        kind = "ema" if self.ema_update else "learnable"
        return f"dim={self.dim}, codebook_size={self.codebook_size}, metric={self.metric}, codebook={kind}"

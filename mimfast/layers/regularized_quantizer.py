"""``RegularizedQuantizer``: Regularized VQ (Zhang et al., "Regularized Vector Quantization for Tokenized Image
Synthesis", CVPR 2023). The paper has no public code; this is our reading of it, every open detail a parameter.

For positions z_n (channel-last rows of the input) and codes e_k (K x D)::

    logits[n, k] = -(||z_n - e_k||^2 - ||z_n||^2) / T  = (2 z_n.e_k - ||e_k||^2) / T
                   (the negative squared distance over ``distance_temperature`` T; dropping ||z_n||^2, the same for
                   every k, changes neither the softmax nor the argmax. With ``use_cosine_sim`` z and e are
                   l2-normalised first.)
    q_n          = softmax(logits[n])                              the soft assignment
    P_post       = mean of q_n over the positions of the batch AND of every rank (one all-reduce)
    L_kl         = sum_k P_k log(K P_k)                            prior (usage) regularisation, KL(P_post || uniform)
    M_n          ~ stochastic mask, ``mask_ratio`` (0.4) of the positions; ``mask_mode`` says how it is drawn:
                   "exact" (default): exactly round(ratio * L) positions of each sample (L positions per sample:
                   h * w for feature maps, dim 1.. for (B, L, D) inputs, all rows for (N, D)), uniformly at random;
                   "bernoulli": every position independently with probability ratio.
    index_n      = Gumbel-argmax(logits[n]) where M_n, argmax(logits[n]) elsewhere (one fused kernel)
    quantized_n  = e[index_n] in the forward; backward: Gumbel-softmax (tau) on masked positions, softmax (tau)
                   on the others, straight-through (``mimfast.gumbel_quantize`` with ``sample_rows=M``)

What the loss contains (a scalar, fp32)::

    loss = commitment_weight * mean((z - sg[e_best])^2) + codebook_weight * mean((sg[z] - e_best)^2)
           + kl_weight * L_kl

with e_best = e[argmax logits] (VQ's terms on the best match: committing to a randomly sampled code would pull z
away from its nearest code). Set the first two weights to 0 for the paper's bare quantizer. What PCL needs
(``forward_with_info``): the sampled and best-match embeddings per position and w_n = ||z_sampled - z_best||^2, exactly
0 wherever the sampled code is the best one (every unmasked position). Under ``torch.distributed`` (training) the
KL's gradient is scaled by the world size, so that after DDP / FSDP average the gradients across ranks it is the
gradient of the global L_kl.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mimfast.ops.gumbel import gumbel_quantize

from .gumbel_quantizer import UsageTracker, _codes_for_indices, check_fmap_input, codes_from_one_hot

__all__ = ["MASK_MODES", "RegularizedQuantizer"]

MASK_MODES = ("exact", "bernoulli")


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class RegularizedQuantizer(nn.Module):
    """Regularized VQ quantizer (see the module docstring for the exact definitions).

    Args:
        dim: code size D (= the input's channels).
        codebook_size: number of codes K.
        tau: Gumbel-softmax temperature of the backward (the soft sample's sharpness; it never changes which code
            is chosen). An attribute a schedule may set.
        distance_temperature: T in logits = -||z - e||^2 / T; sets how peaked q (and so the Gumbel samples and
            P_post) are. 1.0 by default; raise it with D (squared distances grow with D).
        mask_ratio: share of positions that are Gumbel-sampled in training (0.4, the paper's); 0 = plain argmax.
        mask_mode: "exact" (default) or "bernoulli", how the mask is drawn (module docstring).
        kl_weight: weight of L_kl (0.1, our choice: L_kl is at most log K).
        commitment_weight, codebook_weight: VQ's terms on the best match (0.25 and 1.0).
        use_cosine_sim: l2-normalise z and the codes first (logits = 2 cos / T).
        accept_image_fmap: inputs are (B, D, *spatial) feature maps, else (..., D).
        sync_kl: all-reduce P_post (and the usage counts) across ranks in training; None (default) = when
            torch.distributed is initialised with more than one rank.
        usage_decay, dead_code_threshold: code-usage telemetry, see :class:`GumbelQuantizer`.
        nan_policy: "raise" or "propagate", see :func:`mimfast.gumbel_softmax`.

    Shapes: ``forward(z) -> (quantized like z, indices (leading shape), loss ())``; ``forward_with_info`` adds the
    info dict (PCL weights, embeddings, mask, KL, ...).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        tau: float = 1.0,
        distance_temperature: float = 1.0,
        mask_ratio: float = 0.4,
        mask_mode: str = "exact",
        kl_weight: float = 0.1,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        use_cosine_sim: bool = False,
        accept_image_fmap: bool = False,
        sync_kl: bool | None = None,
        usage_decay: float = 0.99,
        dead_code_threshold: float = 1e-3,
        nan_policy: str = "raise",
    ):
        super().__init__()
        for name, v in (("dim", dim), ("codebook_size", codebook_size)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if not (math.isfinite(distance_temperature) and distance_temperature > 0):
            raise ValueError(f"distance_temperature: expected a finite number > 0, got {distance_temperature}")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio: expected 0 <= mask_ratio <= 1, got {mask_ratio}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode: expected one of {MASK_MODES}, got {mask_mode!r}")
        for name, v in (("kl_weight", kl_weight), ("commitment_weight", commitment_weight),
                        ("codebook_weight", codebook_weight)):  # fmt: skip
            if not v >= 0:
                raise ValueError(f"{name}: expected >= 0, got {v}")
        self.dim, self.codebook_size = dim, codebook_size
        self.tau, self.distance_temperature = float(tau), float(distance_temperature)
        self.mask_ratio, self.mask_mode = float(mask_ratio), mask_mode
        self.kl_weight, self.commitment_weight = float(kl_weight), float(commitment_weight)
        self.codebook_weight, self.use_cosine_sim = float(codebook_weight), use_cosine_sim
        self.accept_image_fmap, self.sync_kl, self.nan_policy = accept_image_fmap, sync_kl, nan_policy
        self.embed = nn.Parameter(torch.randn(codebook_size, dim))
        self.tracker = UsageTracker(codebook_size, usage_decay, dead_code_threshold)
        self.register_buffer("last_p_post", torch.zeros(codebook_size), persistent=False)

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) the codes as compared (l2-normalised with use_cosine_sim)."""
        return F.normalize(self.embed, dim=-1) if self.use_cosine_sim else self.embed

    def _synced(self) -> bool:
        return self.training and (self.sync_kl if self.sync_kl is not None else _world() > 1)

    # ------------------------------------------------------------------------------------------------ pieces
    def draw_mask(self, lead: tuple, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool mask of the leading shape, True = Gumbel-sampled position (``mask_mode``, ``mask_ratio``)."""
        n = math.prod(lead)
        if self.mask_ratio == 0 or n == 0:
            return torch.zeros(lead, dtype=torch.bool, device=device)
        if self.mask_mode == "bernoulli":
            return torch.rand(lead, generator=generator, device=device) < self.mask_ratio
        groups = lead[0] if len(lead) >= 2 else 1
        per = n // groups
        count = math.floor(self.mask_ratio * per + 0.5)
        noise = torch.rand(groups, per, generator=generator, device=device)
        mask = torch.zeros(groups, per, dtype=torch.bool, device=device)
        mask.scatter_(1, noise.topk(count, dim=1, largest=False).indices, True)
        return mask.reshape(lead)

    def logits(self, zf: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """(N, K) fp32 logits (2 z.e - ||e||^2) / T of the rows zf (N, D) against the codes e (K, D)."""
        if zf.dtype != e.dtype and not torch.is_autocast_enabled(zf.device.type):
            dots = zf.float() @ e.float().t()
        else:
            dots = zf @ e.t()  # under autocast: its dtype, like an eager distance matmul
        esq = (e.float() * e.float()).sum(-1)
        return (2.0 * dots.float() - esq[None, :]) * (1.0 / self.distance_temperature)

    def _p_post(self, q: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P_post (K,) over the positions of every rank (with the KL's gradient scaled for DDP) and the counts."""
        local = q.sum(0)
        n = torch.tensor([float(q.shape[0])], device=q.device)
        if not self._synced():
            return local / n.clamp_min(1.0), counts
        world = _world()
        flat = torch.cat([local.detach(), counts, n])
        dist.all_reduce(flat)  # one collective: soft usage sums, hard counts, number of positions
        k = self.codebook_size
        total, counts, n = flat[:k], flat[k : 2 * k], flat[2 * k :]
        # forward: the global sum; backward: world * this rank's share (DDP divides the summed grads by world)
        s = total + world * (local - local.detach())
        return s / n.clamp_min(1.0), counts

    # ------------------------------------------------------------------------------------------------ forward
    def forward_with_info(
        self, z: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """z: (..., D) or (B, D, *spatial); generator (z's device) drives the mask and the Gumbel noise.

        Returns (quantized, indices, loss, info). info (leading shape = z without its channel dim, e.g. (B, h, w)):
        ``pcl_weights`` (leading) fp32 w_n = ||z_sampled - z_best||^2, detached, 0 where index == best;
        ``z_sampled`` (= quantized, with gradients) and ``z_best`` (detached) shaped like quantized;
        ``indices`` / ``best_indices`` (leading) int64; ``mask`` (leading) bool, True = Gumbel-sampled;
        ``kl`` L_kl (scalar, differentiable, before kl_weight); ``commitment``, ``codebook`` the two VQ terms;
        ``p_post`` (K,) detached global usage distribution.
        """
        zl = check_fmap_input(z, self.dim, self.accept_image_fmap)
        lead = tuple(zl.shape[:-1])
        zf = zl.reshape(-1, self.dim)
        e = self.embed
        if self.use_cosine_sim:
            zf, e = F.normalize(zf, dim=-1), F.normalize(e, dim=-1)
        logits = self.logits(zf, e)
        mask = self.draw_mask(lead, z.device, generator) if self.training else torch.zeros(lead, dtype=torch.bool,
                                                                                          device=z.device)  # fmt: skip
        need_y = torch.is_grad_enabled() and logits.requires_grad
        y, idx, best = gumbel_quantize(logits, self.tau, hard=True, sample_rows=mask.reshape(-1),
                                       indices_only=not need_y, generator=generator, nan_policy=self.nan_policy,
                                       return_best=True)  # fmt: skip
        zq = codes_from_one_hot(y, idx, e)  # forward e[idx] exactly; backward of one_hot_ST @ e
        e_best = F.embedding(best, e)
        z_best = e_best.detach()
        w = ((zq.detach().float() - z_best.float()) ** 2).sum(-1)  # exactly 0 where idx == best

        q = torch.softmax(logits, dim=-1)
        counts = UsageTracker.counts(idx, self.codebook_size)
        p, counts = self._p_post(q, counts)
        kl = (p * (torch.log(p.clamp_min(1e-30)) + math.log(self.codebook_size))).sum()
        zf32, eb32 = zf.float(), e_best.float()
        commitment = ((zf32 - eb32.detach()) ** 2).mean()
        codebook = ((eb32 - zf32.detach()) ** 2).mean()
        loss = self.commitment_weight * commitment + self.codebook_weight * codebook + self.kl_weight * kl

        self.tracker.update(counts, self.training)
        self.last_p_post = p.detach()
        out = zq.reshape(*lead, self.dim).to(z.dtype)
        zb = z_best.reshape(*lead, self.dim).to(z.dtype)
        if self.accept_image_fmap:
            out, zb = out.movedim(-1, 1), zb.movedim(-1, 1)
        info = dict(pcl_weights=w.reshape(lead), z_sampled=out, z_best=zb, indices=idx.reshape(lead),
                    best_indices=best.reshape(lead), mask=mask, kl=kl, commitment=commitment.detach(),
                    codebook=codebook.detach(), p_post=p.detach())  # fmt: skip
        return out, idx.reshape(lead), loss, info

    def forward(
        self, z: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantized, indices, loss) of :meth:`forward_with_info`."""
        out, idx, loss, _ = self.forward_with_info(z, generator=generator)
        return out, idx, loss

    @torch.no_grad()
    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices (...) -> (..., D), or (B, D, *spatial) with accept_image_fmap; index -1 gives zeros."""
        return _codes_for_indices(indices, self.codebook, self.codebook_size, self.accept_image_fmap)

    def usage(self) -> dict[str, torch.Tensor]:
        """As :meth:`GumbelQuantizer.usage` (all ranks' counts when synced), plus ``soft_perplexity``: exp of the
        entropy of the last P_post."""
        s = self.tracker.stats()
        p = self.last_p_post
        s["soft_perplexity"] = torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())
        return s

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, tau={self.tau}, "
                f"distance_temperature={self.distance_temperature}, mask_ratio={self.mask_ratio} ({self.mask_mode}), "
                f"kl_weight={self.kl_weight}")  # fmt: skip

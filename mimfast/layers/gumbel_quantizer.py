"""``GumbelQuantizer``: taming-transformers' ``GumbelQuantize`` over the fused Gumbel-softmax op.

What is reproduced from taming (``taming/modules/vqvae/quantize.py``, ``GumbelQuantize``), for z (B, C, H, W):

* ``logits = proj(z)``, ``proj`` a 1x1 ``nn.Conv2d(num_hiddens, n_embed)``; ``embed`` an ``nn.Embedding(n_embed,
  embedding_dim)`` (default N(0, 1) init, as taming); the state-dict keys are taming's (``proj.weight``,
  ``proj.bias``, ``embed.weight``; ``quantize.`` in front inside a VQGAN), so taming's weights load as they are.
* ``y = F.gumbel_softmax(logits, tau=temperature, dim=1, hard=straight_through)`` in training, ``z_q = y @ embed``.
* loss ``kl_weight * mean over positions of sum_k q_k log(q_k K)``, q = softmax(logits) (no noise, no tau): the KL
  of each position's code distribution to the uniform prior. taming writes ``log(q K + 1e-10)``; we use
  log_softmax (exact for q -> 0; the two differ by < 1e-10 per position).
* ``temperature`` (``tau`` here, ``temperature`` is an alias) is an attribute the training loop sets (taming anneals it
  from a schedule) or a ``temp=`` argument of ``forward``; ``kl_weight`` defaults to taming's 5e-4.

Differences (documented choices): at evaluation taming still draws Gumbel noise (``hard=True`` with noise); here
eval is the deterministic argmax of the logits unless ``eval_sample=True`` (taming's behaviour). Indices are the
kernel's argmax of (logits + g) (ties to the lowest index) rather than the argmax of the rounded soft sample. In hard
mode the codes are gathered (``z_q = embed[index]`` exactly, no N x K x D product in the forward) and the backward
is that of ``one_hot_ST @ embed``: ``dy = dz_q @ embed^T`` and ``d embed = scatter of dz_q``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mimfast.ops.gumbel import gumbel_quantize
from mimfast.ops.quantize import usage_stats

__all__ = ["GumbelQuantizer", "codes_from_one_hot"]


class _OneHotCodes(torch.autograd.Function):
    """z_q = one_hot(idx) @ e computed as e[idx]; gradients of the product: dy = dz e^T, de = one_hot^T dz."""

    @staticmethod
    def forward(ctx, y, idx, e):
        ctx.save_for_backward(idx, e)
        ctx.y_dtype = y.dtype
        return F.embedding(idx, e)

    @staticmethod
    def backward(ctx, dz):
        idx, e = ctx.saved_tensors
        dy = de = None
        if ctx.needs_input_grad[0]:
            dy = (dz @ e.to(dz.dtype).t()).to(ctx.y_dtype)
        if ctx.needs_input_grad[2]:
            de = torch.zeros_like(e).index_add_(0, idx, dz.to(e.dtype))
        return dy, None, de


def codes_from_one_hot(y: torch.Tensor | None, idx: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """(N, D) codes of a hard straight-through sample: forward exactly ``e[idx]``; with y (N, K), the backward of
    ``y @ e`` (to y and to e). y None: a plain embedding lookup."""
    if y is None:
        return F.embedding(idx, e)
    return _OneHotCodes.apply(y, idx, e)


class UsageTracker(nn.Module):
    """Codebook telemetry shared by the Gumbel quantizers: the last batch's histogram and an EMA of it.

    Buffers are not persistent (they are telemetry, not model state), so state dicts keep taming's keys.
    """

    def __init__(self, codebook_size: int, decay: float, dead_threshold: float):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"usage_decay: expected 0 <= decay < 1, got {decay}")
        if dead_threshold < 0:
            raise ValueError(f"dead_code_threshold: expected >= 0, got {dead_threshold}")
        self.decay, self.dead_threshold = float(decay), float(dead_threshold)
        self.register_buffer("last_counts", torch.zeros(codebook_size, dtype=torch.int32), persistent=False)
        self.register_buffer("usage_ema", torch.zeros(codebook_size), persistent=False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64), persistent=False)

    @staticmethod
    def counts(idx: torch.Tensor, k: int) -> torch.Tensor:
        """(K,) fp32 histogram of valid indices, without a host sync (bincount would sync on CUDA)."""
        idx = idx.reshape(-1)
        ok = idx >= 0
        return torch.zeros(k, device=idx.device).index_add_(0, idx.clamp_min(0), ok.float())

    @torch.no_grad()
    def update(self, counts: torch.Tensor, training: bool) -> None:
        self.last_counts = counts.to(torch.int32)
        if training:
            first = self.updates == 0  # the EMA starts at the first batch's counts, not at zero
            ema = torch.where(first, counts, self.usage_ema * self.decay + counts * (1.0 - self.decay))
            self.usage_ema.copy_(ema)
            self.updates.add_(1)

    def stats(self) -> dict[str, torch.Tensor]:
        s = usage_stats(self.last_counts)
        live = self.usage_ema >= max(self.dead_threshold, 1e-12)
        s["ema_used_fraction"] = live.float().mean()
        s["dead_codes"] = (~live).sum()
        return s


def check_fmap_input(z: torch.Tensor, channels: int, image_fmap: bool, name: str = "z") -> torch.Tensor:
    """z (B, C, *spatial) (image_fmap) or (..., C) -> channel-last view (..., C), with a clear error."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {z.dtype}")
    if image_fmap:
        if z.dim() < 2 or z.shape[1] != channels:
            raise ValueError(f"{name}: expected shape (B, {channels}, *spatial) (accept_image_fmap=True), "
                             f"got {tuple(z.shape)}")  # fmt: skip
        return z.movedim(1, -1)
    if z.dim() < 1 or z.shape[-1] != channels:
        raise ValueError(f"{name}: expected shape (..., {channels}), got {tuple(z.shape)}")
    return z


class GumbelQuantizer(nn.Module):
    """Gumbel-softmax quantizer (taming's ``GumbelQuantize``; see the module docstring for the exact semantics).

    Args:
        dim: code size D (taming's ``embedding_dim``).
        codebook_size: number of codes K (taming's ``n_embed``).
        num_hiddens: channels C of the input (taming's ``num_hiddens``); default ``dim``.
        tau: initial temperature (taming's ``temp_init``); set ``module.tau`` (or ``.temperature``) to anneal it.
        kl_weight: weight of the KL to the uniform prior (taming: 5e-4).
        straight_through: training output is hard one-hot with the soft gradient (True, taming's default), else the
            soft sample y @ embed.
        eval_sample: False (default): evaluation picks argmax(logits), deterministic. True: taming's evaluation,
            a Gumbel-sampled hard code.
        accept_image_fmap: inputs are (B, C, *spatial) feature maps (outputs (B, D, *spatial)), else (..., C).
        usage_decay: EMA decay of the code-usage telemetry; dead_code_threshold: codes whose EMA count per batch is
            below it count as dead in :meth:`usage`.
        nan_policy: "raise" or "propagate", see :func:`mimfast.gumbel_softmax`.

    Shapes: ``forward(z (..., C) or (B, C, *spatial)) -> (quantized (..., D) or (B, D, *spatial), indices (...) or
    (B, *spatial), loss ())``.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        num_hiddens: int | None = None,
        tau: float = 1.0,
        kl_weight: float = 5e-4,
        straight_through: bool = True,
        eval_sample: bool = False,
        accept_image_fmap: bool = False,
        usage_decay: float = 0.99,
        dead_code_threshold: float = 1e-3,
        nan_policy: str = "raise",
    ):
        super().__init__()
        for name, v in (("dim", dim), ("codebook_size", codebook_size), ("num_hiddens", num_hiddens or dim)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if not kl_weight >= 0:
            raise ValueError(f"kl_weight: expected >= 0, got {kl_weight}")
        self.dim, self.codebook_size = dim, codebook_size
        self.num_hiddens = num_hiddens or dim
        self.tau = float(tau)
        self.kl_weight = float(kl_weight)
        self.straight_through, self.eval_sample = straight_through, eval_sample
        self.accept_image_fmap, self.nan_policy = accept_image_fmap, nan_policy
        self.proj = nn.Conv2d(self.num_hiddens, codebook_size, 1)
        self.embed = nn.Embedding(codebook_size, dim)
        self.tracker = UsageTracker(codebook_size, usage_decay, dead_code_threshold)

    # taming's name for the temperature
    @property
    def temperature(self) -> float:
        return self.tau

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.tau = float(value)

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) the codes."""
        return self.embed.weight

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(..., K) logits of channel-last z (..., C): the 1x1 projection as a matmul over the channels."""
        w, b = self.proj.weight.view(self.codebook_size, self.num_hiddens), self.proj.bias
        if z.dtype != w.dtype and not torch.is_autocast_enabled(z.device.type):  # bf16 features, fp32 weights
            w, b = w.to(z.dtype), b.to(z.dtype)
        return F.linear(z, w, b)

    def forward(
        self, z: torch.Tensor, temp: float | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: (..., C) or (B, C, *spatial); temp overrides ``tau`` for this call; generator drives the noise.

        Returns (quantized, indices, loss = kl_weight * KL(q || uniform) averaged over positions).
        """
        zl = check_fmap_input(z, self.num_hiddens, self.accept_image_fmap)
        lead = zl.shape[:-1]
        tau = self.tau if temp is None else float(temp)
        logits = self.logits(zl).reshape(-1, self.codebook_size)
        sample = self.training or self.eval_sample
        hard = self.straight_through if self.training else True
        need_y = torch.is_grad_enabled() and logits.requires_grad
        rows = None if sample else torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        y, idx = gumbel_quantize(logits, tau, hard=hard, sample_rows=rows, indices_only=not need_y and hard,
                                 generator=generator, nan_policy=self.nan_policy)  # fmt: skip
        e = self.embed.weight
        if hard:
            zq = codes_from_one_hot(y, idx, e)
        else:
            zq = y @ (e if torch.is_autocast_enabled(y.device.type) else e.to(y.dtype))
        # KL(q || uniform) per position, q = softmax(logits) without noise or temperature (taming)
        logq = F.log_softmax(logits.float(), dim=-1)
        kl = (logq.exp() * (logq + math.log(self.codebook_size))).sum(-1).mean()
        loss = self.kl_weight * kl
        self.tracker.update(UsageTracker.counts(idx, self.codebook_size), self.training)
        out = zq.reshape(*lead, self.dim).to(z.dtype)
        if self.accept_image_fmap:
            out = out.movedim(-1, 1)
        return out, idx.reshape(lead), loss

    @torch.no_grad()
    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices (...) -> (..., D), or (B, D, *spatial) with accept_image_fmap; index -1 gives zeros."""
        return _codes_for_indices(indices, self.embed.weight, self.codebook_size, self.accept_image_fmap)

    def usage(self) -> dict[str, torch.Tensor]:
        """Last batch: ``perplexity`` (exp entropy of the code histogram), ``used_fraction``; over training (EMA of the
        per-batch counts): ``ema_used_fraction`` and ``dead_codes`` (EMA count below ``dead_code_threshold``)."""
        return self.tracker.stats()

    def load_taming_state_dict(self, state_dict: dict, prefix: str = "quantize.", strict: bool = True):
        """Load a taming ``GumbelQuantize`` state dict (keys ``proj.weight``, ``proj.bias``, ``embed.weight``, with
        ``prefix`` in front when taken from a whole model). Returns the keys that were not the quantizer's."""
        own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not own:  # a bare quantizer state dict
            own = {k: v for k, v in state_dict.items() if k in ("proj.weight", "proj.bias", "embed.weight")}
        self.load_state_dict(own, strict=strict)
        return [k for k in state_dict if not (k.startswith(prefix) or k in own)]

    def extra_repr(self) -> str:
        return (f"num_hiddens={self.num_hiddens}, dim={self.dim}, codebook_size={self.codebook_size}, tau={self.tau}, "
                f"kl_weight={self.kl_weight}, straight_through={self.straight_through}")  # fmt: skip


def _codes_for_indices(indices: torch.Tensor, e: torch.Tensor, k: int, image_fmap: bool) -> torch.Tensor:
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices: expected an int64 or int32 tensor, got {getattr(indices, 'dtype', indices)}")
    if indices.numel() and (int(indices.max()) >= k or int(indices.min()) < -1):
        raise ValueError(f"indices: expected values in [-1, {k - 1}]")
    codes = F.embedding(indices.clamp_min(0).long(), e)
    codes = torch.where((indices >= 0)[..., None], codes, torch.zeros((), dtype=codes.dtype, device=codes.device))
    return codes.movedim(-1, 1) if image_fmap else codes

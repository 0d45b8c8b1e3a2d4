"""The optimizer and the numbers MFU is measured against: MAE's AdamW parameter groups, the optimizer factory and
the bf16 tensor-core peaks of known GPUs."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .config import RunConfig

__all__ = ["PEAK_BF16_FLOPS", "build_optimizer", "param_groups", "peak_flops"]

# Dense bf16 tensor-core peak per GPU (datasheet, no sparsity), for MFU. Matched against the device name.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` from :data:`PEAK_BF16_FLOPS`; None for the CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def param_groups(model: nn.Module, weight_decay: float, *, no_decay_tokens: bool = True) -> list[dict]:
    """AdamW groups: weight matrices decay; 1-D parameters (norms), biases and, with ``no_decay_tokens``, class /
    mask tokens and position embeddings (plus a timm-style ``model.no_weight_decay()`` set) do not. Frozen
    parameters (MAE's fixed sin-cos ``pos_embed``) are left out."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        token = leaf.endswith("token") or "pos_embed" in leaf or name in skip
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or (no_decay_tokens and token) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(
    groups: list[dict],
    cfg: RunConfig,
    lr: float,
    device: torch.device,
    log: Callable[[str], None],
    *,
    betas: tuple[float, float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (:func:`param_groups`; torch's fused kernel on CUDA unless ``optim.fused`` says
    otherwise), or apex's FusedAdam with ``optim.apex=true`` when it imports and the run is on CUDA (``log`` says why
    not otherwise). ``betas`` defaults to ``optim.betas``."""
    o = cfg.optim
    betas = o.betas if betas is None else betas
    if o.apex:
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            FusedAdam, why = None, "apex is not importable (not on PyPI: build NVIDIA/apex with --cuda_ext)"
        else:
            why = "apex FusedAdam needs CUDA" if device.type != "cuda" else None
        if why is None:
            return FusedAdam(groups, lr=lr, betas=betas, eps=o.eps, adam_w_mode=True)
        log(f"note: optim.apex=true but {why}; using torch.optim.AdamW")
    fused = o.fused if o.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=o.eps, fused=fused or None)

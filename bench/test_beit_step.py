"""BEiT training step (forward + backward + fused AdamW), bf16 autocast: mimfast's fused model (SDPA with the shared
relative position bias, static-shape masked head through ``linear_cross_entropy``) vs its official-code eager twin,
each also under torch.compile. Reports img/s and MFU (model FLOPs from ``flops_per_image`` over the dense bf16 peak
of PERF.md).

GPU: BEiT-B/16 (8192-token vocabulary, 75 of 196 patches block-masked) at batch 256 (PERF.md target: >= 1.5x the
eager twin). CPU: the debug model at a small batch, fp32, so the file runs in the smoke pass. Masks (BEiT's
under-filling block masking) and random target ids are generated once, outside the timing.
"""

from __future__ import annotations

import pytest
import torch
from _perf import STEP_PROVIDERS, make_train_step, skip_step_case, time_train_step

from mimfast.models import create_model
from mimfast.ops.masking import beit_block_masking

CASES = [
    pytest.param("beit_base_patch16_224", 256, "cuda", id="cuda-beit_b16-B256-bf16"),
    pytest.param("beit_tiny_patch4_debug", 16, "cpu", id="cpu-debug-B16-fp32"),
]


@pytest.mark.parametrize("provider", STEP_PROVIDERS)
@pytest.mark.parametrize("name,batch,device", CASES)
def test_beit_step(benchmark, provider, name, batch, device):
    skip_step_case(provider, device)
    torch.manual_seed(0)
    base = create_model(name, fused=provider.startswith("mimfast")).to(device)
    model = torch.compile(base) if provider.endswith("compile") else base
    opt = torch.optim.AdamW(base.parameters(), lr=1.5e-3, betas=(0.9, 0.98), weight_decay=0.05,
                            fused=device == "cuda")  # fmt: skip
    cfg = base.config
    g = torch.Generator(device=device).manual_seed(0)
    imgs = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device, generator=g)
    mask = beit_block_masking(batch, cfg.grid_size, cfg.grid_size, cfg.num_mask_patches,
                              min_num_patches=cfg.min_mask_patches, max_num_patches=cfg.max_mask_patches,
                              min_aspect=cfg.min_aspect, generator=g)  # fmt: skip
    target = torch.randint(0, cfg.vocab_size, (batch, cfg.num_patches), device=device, generator=g)
    step = make_train_step(lambda: model(imgs, mask, target), opt, device)
    info = dict(model=name, img_size=cfg.img_size, masked_per_image=mask.sum().item() / batch)
    time_train_step(
        benchmark,
        step,
        provider,
        batch=batch,
        device=device,
        flops=base.flops_per_image(),
        group=f"beit_step {name} {device} B={batch}",
        info=info,
    )

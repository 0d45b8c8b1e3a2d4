"""MAE training step (forward + backward + fused AdamW), bf16 autocast: mimfast's fused model vs its official-code
eager twin, each also under torch.compile. Reports img/s and MFU (model FLOPs from ``flops_per_image`` over the
dense bf16 peak of PERF.md).

GPU: ViT-B/16 with the 512-d 8-block decoder at batch 256 (PERF.md target: >= 5,000 img/s on one H100, >= 2x the
eager twin, >= 30% MFU). CPU: the debug model at a small batch, fp32, so the file runs in the smoke pass.
"""

from __future__ import annotations

import pytest
import torch
from _perf import STEP_PROVIDERS, make_train_step, skip_step_case, time_train_step

from mimfast.models import create_model

CASES = [
    pytest.param("mae_vit_base_patch16_dec512d8b", 256, "cuda", id="cuda-vit_b16-B256-bf16"),
    pytest.param("mae_vit_tiny_patch4_dec64d2b_debug", 16, "cpu", id="cpu-debug-B16-fp32"),
]


@pytest.mark.parametrize("provider", STEP_PROVIDERS)
@pytest.mark.parametrize("name,batch,device", CASES)
def test_mae_step(benchmark, provider, name, batch, device):
    skip_step_case(provider, device)
    torch.manual_seed(0)
    base = create_model(name, fused=provider.startswith("mimfast")).to(device)
    model = torch.compile(base) if provider.endswith("compile") else base
    opt = torch.optim.AdamW(base.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=device == "cuda")  # fmt: skip
    cfg = base.config
    imgs = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    step = make_train_step(lambda: model(imgs, 0.75), opt, device)
    time_train_step(
        benchmark,
        step,
        provider,
        batch=batch,
        device=device,
        flops=base.flops_per_image(),
        group=f"mae_step {name} {device} B={batch}",
        info=dict(model=name, img_size=cfg.img_size),
    )

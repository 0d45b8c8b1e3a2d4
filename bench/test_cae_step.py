"""CAE training step (forward + backward + fused AdamW), bf16 autocast: mimfast's fused model vs its official-code
eager twin, each also under torch.compile. Reports img/s and MFU (model FLOPs from ``flops_per_image``, the no_grad
alignment pass counted forward-only, over the bf16 peak of PERF.md or the one measured in this run).

GPU: CAE-base (ViT-B/16, 4 regressor + 4 decoder blocks, vocab 8192) at batch 256, 98 of 196 patches masked
(PERF.md target: >= 1.5x the eager twin). CPU: the debug model at a small batch, fp32, so the file runs in the smoke
pass. Masks (``cae_block_masking``) and token ids are drawn once, outside the timing.
"""

from __future__ import annotations

import pytest
import torch
from _perf import STEP_PROVIDERS, make_train_step, skip_step_case, time_train_step

from mimfast.models import create_model

CASES = [
    pytest.param("cae_base_patch16_224", 256, "cuda", id="cuda-cae_b16-B256-bf16"),
    pytest.param("cae_tiny_patch4_debug", 16, "cpu", id="cpu-debug-B16-fp32"),
]


@pytest.mark.parametrize("provider", STEP_PROVIDERS)
@pytest.mark.parametrize("name,batch,device", CASES)
def test_cae_step(benchmark, provider, name, batch, device):
    skip_step_case(provider, device)
    torch.manual_seed(0)
    base = create_model(name, fused=provider.startswith("mimfast")).to(device)
    model = torch.compile(base) if provider.endswith("compile") else base
    opt = torch.optim.AdamW(base.parameters(), lr=1.5e-3, betas=(0.9, 0.999), weight_decay=0.05,
                            fused=device == "cuda")  # fmt: skip
    cfg = base.config
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
    masks = base.sample_masks(batch, generator=g).to(device)
    target = torch.randint(0, cfg.vocab_size, (batch, cfg.num_patches), generator=g).to(device)
    step = make_train_step(lambda: model(imgs, masks, target), opt, device)
    info = dict(model=name, img_size=cfg.img_size, num_masked=cfg.num_mask_patches)
    time_train_step(
        benchmark,
        step,
        provider,
        batch=batch,
        device=device,
        flops=base.flops_per_image(),
        group=f"cae_step {name} {device} B={batch}",
        info=info,
    )

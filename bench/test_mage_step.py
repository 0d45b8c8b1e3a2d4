"""MAGE training step (forward + backward + fused AdamW), bf16 autocast: mimfast's fused model (gather / restore
kernels with the class-feature filler, default attention backend, fused linear + label-smoothed CE over the 1024
codes) vs its official-code eager twin, each also under torch.compile. Reports img/s and MFU (model FLOPs from
``flops_per_image`` over the bf16 peak of PERF.md or the one measured in this run).

GPU: MAGE ViT-B/16 (768-d x 12 encoder, 768-d x 8 decoder, 16 x 16 tokens, vocabulary 2025) at batch 256 (PERF.md
target: >= 1.5x the eager twin). CPU: the debug model at a small batch, fp32, so the file runs in the smoke pass.
Inputs are random token ids generated once (the frozen tokenizer is not part of the step); the model draws its mask
ratio and drop / mask noise on the device every step, as in training.
"""

from __future__ import annotations

import pytest
import torch
from _perf import STEP_PROVIDERS, make_train_step, skip_step_case, time_train_step

from mimfast.models import create_model

CASES = [
    pytest.param("mage_vit_base_patch16", 256, "cuda", id="cuda-mage_b16-B256-bf16"),
    pytest.param("mage_tiny_patch4_debug", 16, "cpu", id="cpu-debug-B16-fp32"),
]


@pytest.mark.parametrize("provider", STEP_PROVIDERS)
@pytest.mark.parametrize("name,batch,device", CASES)
def test_mage_step(benchmark, provider, name, batch, device):
    skip_step_case(provider, device)
    torch.manual_seed(0)
    base = create_model(name, fused=provider.startswith("mimfast")).to(device)
    model = torch.compile(base) if provider.endswith("compile") else base
    # the official recipe: AdamW(0.9, 0.95), wd 0.05, lr = 1.5e-4 * batch / 256 (blr 1.5e-4 in the README's command)
    opt = torch.optim.AdamW(base.parameters(), lr=1.5e-4 * batch / 256, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=device == "cuda")  # fmt: skip
    cfg = base.config
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.codebook_size, (batch, cfg.num_tokens), device=device, generator=g)
    step = make_train_step(lambda: model(ids, generator=g), opt, device)
    info = dict(model=name, tokens=cfg.num_tokens, encoder_tokens=1 + cfg.num_tokens - cfg.num_dropped,
                vocab=cfg.vocab_size)  # fmt: skip
    time_train_step(
        benchmark,
        step,
        provider,
        batch=batch,
        device=device,
        flops=base.flops_per_image(),
        group=f"mage_step {name} {device} B={batch}",
        info=info,
    )

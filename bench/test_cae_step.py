"""CAE training step (forward + backward + fused AdamW), bf16 autocast: mimfast's fused model vs its official-code
eager twin, each also under torch.compile. Reports img/s and MFU (model FLOPs from ``flops_per_image``, the no_grad
alignment pass counted forward-only, over the bf16 peak of PERF.md or the one measured in this run).

GPU: CAE-base (ViT-B/16, 4 regressor + 4 decoder blocks, vocab 8192) at batch 256, 98 of 196 patches masked
(PERF.md target: >= 1.5x the eager twin). CPU: the debug model at a small batch, fp32, so the file runs in the smoke
pass. Masks (``cae_block_masking``) and token ids are drawn once, outside the timing.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from _perf import PEAKS

import mimfast.models.cae  # noqa: F401  (registers the CAE models)
from mimfast.models import create_model

CUDA = torch.cuda.is_available()
CASES = [
    pytest.param("cae_base_patch16_224", 256, "cuda", id="cuda-cae_b16-B256-bf16"),
    pytest.param("cae_tiny_patch4_debug", 16, "cpu", id="cpu-debug-B16-fp32"),
]
PROVIDERS = ["mimfast", "eager", "mimfast_compile", "eager_compile"]


def make_step(model, opt, inputs, device):
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def step():
        with amp:
            loss = model(*inputs)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name,batch,device", CASES)
def test_cae_step(benchmark, provider, name, batch, device):
    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    if device == "cpu" and CUDA:
        pytest.skip("CPU shapes run only on CPU-only machines")
    if device == "cpu" and provider.endswith("compile"):
        pytest.skip("torch.compile of a training step is a GPU comparison")
    torch.manual_seed(0)
    base = create_model(name, fused=provider.startswith("mimfast")).to(device)
    model = torch.compile(base) if provider.endswith("compile") else base
    opt = torch.optim.AdamW(base.parameters(), lr=1.5e-3, betas=(0.9, 0.98), weight_decay=0.05,
                            fused=device == "cuda")  # fmt: skip
    cfg = base.config
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
    masks = base.sample_masks(batch, generator=g).to(device)
    target = torch.randint(0, cfg.vocab_size, (batch, cfg.num_patches), generator=g).to(device)
    step = make_step(model, opt, (imgs, masks, target), device)
    try:
        step()  # warm-up: Triton / inductor / cuDNN autotuning here, not in the timing
    except Exception as exc:  # noqa: BLE001 - a compile provider that cannot run here is skipped with its reason
        if provider.endswith("compile"):
            pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}")
        raise
    benchmark.group = f"cae_step {name} {device} B={batch}"
    flops = base.flops_per_image()
    info = dict(provider=provider, model=name, batch=batch, device=device, torch=torch.__version__,
                img_size=cfg.img_size, num_masked=cfg.num_mask_patches, gflop_per_image=flops / 1e9)  # fmt: skip
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["dtype"] = "bf16 autocast"
        steps = 5

        def target_fn():
            for _ in range(steps):
                step()
            torch.cuda.synchronize()

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        benchmark.pedantic(target_fn, warmup_rounds=1, rounds=5, iterations=1)
        info["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        info["dtype"] = "fp32"
        steps = 1
        benchmark.pedantic(step, warmup_rounds=1, rounds=3, iterations=1)
    per_step = benchmark.stats.stats.median / steps
    info["img_per_s"] = batch / per_step
    info["mfu"] = flops * batch / per_step / PEAKS["bf16_flops"] if device == "cuda" else None
    loss = step().item()
    info["loss_after"] = loss
    benchmark.extra_info.update(info)
    assert loss == loss and abs(loss) < 1e4  # finite

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

import contextlib

import pytest
import torch
from _perf import PEAKS

import mimfast.models.mage  # noqa: F401  (registers the MAGE models until mimfast.models imports them)
from mimfast.models import create_model

CUDA = torch.cuda.is_available()
CASES = [
    pytest.param("mage_vit_base_patch16", 256, "cuda", id="cuda-mage_b16-B256-bf16"),
    pytest.param("mage_tiny_patch4_debug", 16, "cpu", id="cpu-debug-B16-fp32"),
]
PROVIDERS = ["mimfast", "eager", "mimfast_compile", "eager_compile"]


def make_step(model, opt, ids, device, generator):
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def step():
        with amp:
            loss = model(ids, generator=generator)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name,batch,device", CASES)
def test_mage_step(benchmark, provider, name, batch, device):
    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    if device == "cpu" and CUDA:
        pytest.skip("CPU shapes run only on CPU-only machines")
    if device == "cpu" and provider.endswith("compile"):
        pytest.skip("torch.compile of a training step is a GPU comparison")
    torch.manual_seed(0)
    model = create_model(name, fused=provider.startswith("mimfast")).to(device)
    cfg = model.config
    flops = model.flops_per_image()
    if provider.endswith("compile"):
        model = torch.compile(model)
    # the official recipe: AdamW(0.9, 0.95), wd 0.05, lr = 1.5e-4 * batch / 256 (blr 1.5e-4 in the README's command)
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4 * batch / 256, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=device == "cuda")  # fmt: skip
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.codebook_size, (batch, cfg.num_tokens), device=device, generator=g)
    step = make_step(model, opt, ids, device, g)
    try:
        step()  # warm-up: Triton / inductor / cuDNN autotuning here, not in the timing
    except Exception as exc:  # noqa: BLE001 - a compile provider that cannot run here is skipped with its reason
        if provider.endswith("compile"):
            pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}")
        raise
    benchmark.group = f"mage_step {name} {device} B={batch}"
    info = dict(provider=provider, model=name, batch=batch, device=device, torch=torch.__version__,
                tokens=cfg.num_tokens, encoder_tokens=1 + cfg.num_tokens - cfg.num_dropped,
                vocab=cfg.vocab_size, gflop_per_image=flops / 1e9)  # fmt: skip
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

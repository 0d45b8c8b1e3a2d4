"""Fine-tuning step of a ViT classifier (Mixup / CutMix on the device, forward + soft-target CE + backward + fused
AdamW over the layer-decayed groups), bf16 autocast: mimfast's classifier on the default attention backend vs its
eager twin, each also under torch.compile; and the whole launcher (``mimfast.train.finetune``) fed by the DALI loader
with the fine-tuning augmentations (RandomResizedCrop + flip + RandAugment m9 n2 + random erasing), to show whether
the loader keeps up with the step.

GPU: ViT-B/16 at 224 px, batch 256 (the issue's must-show). The launcher case runs 40 steps over generated 500x375
JPEGs with ``mixed`` decode and reports the launcher's img/s (loader and step together) next to the step-only rate:
when the two agree the loader keeps up. CPU: the debug classifier at a small batch (the smoke pass).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from _perf import STEP_PROVIDERS, make_train_step, skip_step_case, time_train_step

from mimfast.models import create_model
from mimfast.models.vit_classifier import layer_decay_param_groups
from mimfast.train.mixup import Mixup, soft_target_cross_entropy

CASES = [
    pytest.param("vit_base_patch16_224_cls", 256, "cuda", id="cuda-vit_b16-B256-bf16"),
    pytest.param("vit_tiny_patch4_32_cls_debug", 16, "cpu", id="cpu-debug-B16-fp32"),
]
HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


@pytest.mark.parametrize("provider", STEP_PROVIDERS)
@pytest.mark.parametrize("name,batch,device", CASES)
def test_finetune_step(benchmark, provider, name, batch, device):
    skip_step_case(provider, device)
    torch.manual_seed(0)
    base = create_model(name, fused=provider.startswith("mimfast"), drop_path_rate=0.1).to(device)
    model = torch.compile(base) if provider.endswith("compile") else base
    # MAE's ViT-B recipe: AdamW (0.9, 0.999), wd 0.05, blr 5e-4 (lr = blr * batch / 256), layer decay 0.65
    groups = layer_decay_param_groups(base, 0.05, 0.65)
    for g in groups:
        g["lr"] = 5e-4 * batch / 256 * g["lr_scale"]
    opt = torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.999), fused=device == "cuda")
    cfg = base.config
    imgs = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
    mix = Mixup(cfg.num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, smoothing=0.1)

    def forward():
        x, target, _ = mix.mix(imgs.clone(), labels)
        return soft_target_cross_entropy(model(x), target)

    step = make_train_step(forward, opt, device)
    time_train_step(benchmark, step, provider, batch=batch, device=device, flops=base.flops_per_image(),
                    group=f"finetune_step {name} {device} B={batch}",
                    info=dict(model=name, img_size=cfg.img_size, tokens=1 + cfg.num_patches))  # fmt: skip


def test_finetune_launcher_with_dali(benchmark, tmp_path_factory):
    """The launcher's img/s for ViT-B/16 fine-tuning at batch 256 with the DALI loader (mixed decode, RandAugment +
    random erasing on the GPU): loader + step + optimizer together, over steps 11..40 of one run."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not HAVE_DALI:
        pytest.skip("NVIDIA DALI is not installed (pip install -e '.[dali]')")
    from mimfast.data import make_builtin_dataset
    from mimfast.train import get_config
    from mimfast.train.finetune import finetune

    root = tmp_path_factory.mktemp("ft_bench") / "builtin-500x375"
    make_builtin_dataset(root, num_classes=10, train_per_class=1100, val_per_class=26, size=(500, 375),
                         workers=max(1, min(16, os.cpu_count() or 1)), progress=False)  # fmt: skip
    out = tmp_path_factory.mktemp("ft_run")
    threads = max(1, min(16, os.cpu_count() or 1))
    cfg = get_config("mae_finetune_vit_base", [f"data.root={root}", "model.loss.pretrained=",
                                               "model.overrides.num_classes=10", "train.batch_size=256",
                                               "train.global_batch_size=256", "train.max_steps=40",
                                               "train.log_every=10", "train.ckpt_every=0", "train.tensorboard=false",
                                               f"data.num_threads={threads}", f"out={out}/run"])  # fmt: skip
    rates = []

    def on_step(step, model, metrics):
        if step in (10, 40):
            torch.cuda.synchronize()
            rates.append((step, __import__("time").perf_counter()))

    benchmark.group = "finetune launcher vit_b16 cuda B=256 (DALI, RandAugment + erasing)"
    res = benchmark.pedantic(lambda: finetune(cfg, on_step=on_step), rounds=1, iterations=1)
    (s0, t0), (s1, t1) = rates[-2], rates[-1]
    ips = (s1 - s0) * 256 / (t1 - t0)
    benchmark.extra_info.update(provider="mimfast launcher + DALI", device="cuda", batch=256, img_size=224,
                                img_per_s=ips, img_per_s_launcher=res.images_per_sec, steps=res.step,
                                gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                num_threads=threads)  # fmt: skip
    assert res.step == 40 and all(v is not None for v in res.losses)

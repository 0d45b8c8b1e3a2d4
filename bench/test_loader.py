"""Input pipeline throughput: mimfast.data's DALI train pipeline (RandomResizedCrop fused with the JPEG decode, flip,
normalise to float32 CHW) in images per second.

GPU: 224 px crops, batch 256, over generated 500x375 JPEGs (the typical ImageNet size), ``mixed`` decode (nvJPEG and
the hardware JPEG decoder) next to CPU decode feeding the same GPU. PERF.md: the input pipeline must not be the
bottleneck, i.e. stay above the model's step rate (MAE ViT-B/16 target: 5,000 img/s on one H100).
CPU: a small smoke run (CPU decode, 64 px, a handful of batches) so the file runs in CI's benchmark pass.

Each round iterates one full epoch (a fresh DALI pipeline is built per epoch; its start-up is in the timing, as in
training). ``extra_info`` also separates the steady state (batches after the first) from the time to the first batch.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from mimfast.data import DataConfig, build_loader, make_builtin_dataset

CUDA = torch.cuda.is_available()
HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
CASES = [  # device, decode, img_size, batch, (jpeg width, height), images per class (10 classes)
    pytest.param("cuda", "mixed", 224, 256, (500, 375), 512, id="cuda-mixed-224px-B256-500x375"),
    pytest.param("cuda", "cpu", 224, 256, (500, 375), 512, id="cuda-cpudecode-224px-B256-500x375"),
    pytest.param("cpu", "cpu", 64, 16, (160, 120), 12, id="cpu-64px-B16-160x120"),
]
_DATASETS: dict = {}


def dataset(tmp_path_factory, size: tuple[int, int], per_class: int):
    key = (size, per_class)
    if key not in _DATASETS:
        root = tmp_path_factory.mktemp("loader_bench") / f"builtin-{size[0]}x{size[1]}-{per_class}"
        _DATASETS[key] = make_builtin_dataset(root, num_classes=10, train_per_class=per_class, val_per_class=1,
                                              size=size, workers=max(1, min(16, os.cpu_count() or 1)))  # fmt: skip
    return _DATASETS[key]


@pytest.mark.parametrize("device,decode,img_size,batch,jpeg_size,per_class", CASES)
def test_loader_train(benchmark, tmp_path_factory, device, decode, img_size, batch, jpeg_size, per_class):
    if not HAVE_DALI:
        pytest.skip("NVIDIA DALI is not installed (pip install -e '.[dali]')")
    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    if device == "cpu" and CUDA:
        pytest.skip("the CPU smoke case runs only on CPU-only machines")
    root = dataset(tmp_path_factory, jpeg_size, per_class)
    threads = max(1, min(16, os.cpu_count() or 1)) if device == "cuda" else 2
    cfg = DataConfig(root=str(root), img_size=img_size, num_threads=threads, decode=decode, prefetch=2)
    loader = build_loader(cfg, batch_size=batch, device_id=0 if device == "cuda" else None)
    n_img = len(loader) * batch
    marks: list[float] = []

    def one_epoch():
        marks.clear()
        marks.append(time.perf_counter())
        last = None
        for b in loader:
            last = b
            if device == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
        return last

    one_epoch()  # warm-up: DALI start-up, nvJPEG / hardware decoder initialisation, page cache
    benchmark.group = f"loader train {device} {img_size}px B={batch} {jpeg_size[0]}x{jpeg_size[1]} JPEGs"
    last = benchmark.pedantic(one_epoch, warmup_rounds=0, rounds=3, iterations=1)
    import nvidia.dali

    per_epoch = benchmark.stats.stats.median
    steady = (len(marks) - 2) * batch / (marks[-1] - marks[1]) if len(marks) > 2 else None
    info = dict(provider=f"dali-{decode}-decode", device=device, img_size=img_size, batch=batch,
                jpeg_size=f"{jpeg_size[0]}x{jpeg_size[1]}", images_per_epoch=n_img, num_threads=threads,
                img_per_s=n_img / per_epoch, img_per_s_steady=steady, first_batch_s=marks[1] - marks[0],
                dali=nvidia.dali.__version__, torch=torch.__version__, cpu_count=os.cpu_count())  # fmt: skip
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    benchmark.extra_info.update(info)
    # the batches are real: right shape and device, normalised pixel values, every label in range
    assert last.images.shape == (batch, 3, img_size, img_size) and last.images.device.type == device
    assert torch.isfinite(last.images).all() and 0.2 < last.images.float().std().item() < 3
    assert int(last.labels.min()) >= 0 and int(last.labels.max()) < 10

"""Block-wise (BEiT / CAE) mask generation: mimfast's one-launch batched kernel vs the way BEiT makes its masks.

BEiT builds one mask per sample with Python's ``random`` and a numpy array inside each data-loader worker; the
``beit_loop`` provider is that loop over the batch (one CPU core, plus stacking into a tensor), whatever the device
of the other providers. ``ref`` is mimfast's vectorised PyTorch reference on the same device (it reads the live
count on the host once per attempt). GPU: B in {256, 1024}, BEiT 75/196 and CAE 98/196, several launches then one
synchronize. CPU: a small batch, where mimfast runs that reference (no interpreter timing here).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from _perf import gpu_target

from mimfast.kernels import interpret_mode
from mimfast.kernels.block_mask import block_mask_ref, default_max_attempts
from mimfast.ops.masking import block_masking

CUDA = torch.cuda.is_available()
MODES = {"beit75": (75, False), "cae98": (98, True)}
GPU_BATCHES = (256, 1024)
CPU_BATCHES = (32,)
PROVIDERS = ["mimfast", "ref", "beit_loop"]


# ------------------------------------------------------------------------------------------ the BEiT-style loop
class _NumpyBlockMasker:
    """One mask per call, numpy array + Python ``random`` as BEiT's generator (CAE's loop when ``exact``)."""

    def __init__(self, height, width, target, min_num=16, min_aspect=0.3, exact=False, seed=0):
        self.h, self.w, self.target, self.min_num, self.exact = height, width, target, min_num, exact
        self.log_ar = (math.log(min_aspect), math.log(1 / min_aspect))
        self.rng = random.Random(seed)

    def _block(self, mask, max_mask):
        for _ in range(10):
            area = self.rng.uniform(self.min_num, max_mask)
            ar = math.exp(self.rng.uniform(*self.log_ar))
            h, w = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if w < self.w and h < self.h:
                top, left = self.rng.randint(0, self.h - h), self.rng.randint(0, self.w - w)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_mask:
                    window[...] = 1
                    return new
        return 0

    def __call__(self):
        mask = np.zeros((self.h, self.w), dtype=np.int64)
        count = 0
        while count < self.target:
            delta = self._block(mask, self.target - count)
            if delta == 0 and not self.exact:
                break
            count += delta
        return mask


def beit_loop(masker, bsz, device):
    return torch.from_numpy(np.stack([masker().reshape(-1) for _ in range(bsz)])).bool().to(device)


# ---------------------------------------------------------------------------------------------------- cases
def cases():
    for mode in MODES:
        for bsz in GPU_BATCHES:
            yield pytest.param(mode, bsz, "cuda", id=f"cuda-{mode}-B{bsz}")
        for bsz in CPU_BATCHES:
            yield pytest.param(mode, bsz, "cpu", id=f"cpu-{mode}-B{bsz}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode,bsz,device", list(cases()))
def test_mask_generators(benchmark, provider, mode, bsz, device):
    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    if device == "cpu" and CUDA:
        pytest.skip("CPU shapes run only on CPU-only machines")
    if device == "cpu" and provider != "beit_loop" and interpret_mode():
        pytest.skip("TRITON_INTERPRET=1: the CPU path would time the Triton interpreter")
    target, exact = MODES[mode]
    attempts = default_max_attempts(exact)
    g = torch.Generator(device=device).manual_seed(0)
    if provider == "mimfast":

        def fn():
            return block_masking(bsz, num_masking_patches=target, exact=exact, device=device, generator=g)

    elif provider == "ref":

        def fn():
            u = torch.rand(bsz, attempts, 4, generator=g, device=device)
            noise = torch.rand(bsz, 196, generator=g, device=device) if exact else None
            return block_mask_ref(u, noise, num_masking_patches=target, exact=exact)

    else:
        masker = _NumpyBlockMasker(14, 14, target, exact=exact)

        def fn():
            return beit_loop(masker, bsz, device)

    fn()  # warm-up: Triton compile here, not in the timing
    benchmark.group = f"mask_generators {device} {mode} B={bsz}"
    info = dict(provider=provider, batch=bsz, grid="14x14", target=target, exact=exact, device=device,
                max_attempts=attempts, torch=torch.__version__)  # fmt: skip
    launches = 1
    if device == "cuda" and provider != "beit_loop":
        launches = 5
        info["gpu"] = torch.cuda.get_device_name()
        benchmark.pedantic(gpu_target(lambda: fn(), [()], launches), warmup_rounds=2, rounds=10, iterations=1)
    else:
        benchmark.pedantic(fn, warmup_rounds=1, rounds=3, iterations=1)
    per_call = benchmark.stats.stats.median / launches
    info["median_us_per_call"] = per_call * 1e6
    info["us_per_sample"] = per_call * 1e6 / bsz
    # sanity outside the timing: counts within the rules
    counts = fn().sum(1)
    info["mean_masked"] = counts.double().mean().item()
    benchmark.extra_info.update(info)
    assert int(counts.max()) <= target
    if exact:
        assert bool((counts == target).all())

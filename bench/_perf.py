"""Ceilings, floors and GPU timing helpers for the benchmarks (numbers from ../shared/PERF.md, H100 SXM datasheet)."""

from __future__ import annotations

import json
import os

import torch

H100 = dict(
    hbm_bytes_s=3.35e12, bf16_flops=990e12, tf32_flops=495e12, fp32_flops=67e12, fp32_ops=33.5e12, sfu_ops_s=3.9e12
)


def _run_peaks() -> tuple[dict, str]:
    """The ceilings the benchmarks' floors use: the H100 datasheet (PERF.md), with the HBM bandwidth and the bf16
    matmul rate replaced by the ones measured on this GPU in this run when ``MIMFAST_CEILINGS`` names the JSON that
    ``bench/gpu/ceilings.py`` wrote (PERF.md: compute every floor ratio from ceilings measured in the same run)."""
    path = os.environ.get("MIMFAST_CEILINGS")
    if not path:
        return dict(H100), "H100 datasheet (PERF.md)"
    with open(path) as f:
        m = json.load(f)
    scale = m["bf16_flops"] / H100["bf16_flops"]  # tensor-core rates scale together
    peaks = dict(H100, hbm_bytes_s=m["hbm_bytes_s"], bf16_flops=m["bf16_flops"], tf32_flops=H100["tf32_flops"] * scale)
    gpu, tbs, tfs = m.get("gpu", "?"), m["hbm_bytes_s"] / 1e12, m["bf16_flops"] / 1e12
    return peaks, f"measured on {gpu}: {tbs:.2f} TB/s, {tfs:.0f} TFLOP/s"


PEAKS, PEAKS_SOURCE = _run_peaks()


def matmul_peak(dtype: torch.dtype, peaks: dict = H100) -> float:
    if dtype in (torch.bfloat16, torch.float16):
        return peaks["bf16_flops"]
    return peaks["fp32_flops"] if torch.get_float32_matmul_precision() == "highest" else peaks["tf32_flops"]


def vq_search_floor_s(n: int, k: int, d: int, dtype: torch.dtype, peaks: dict = H100) -> float:
    """max(matmul FLOPs / peak, bytes / HBM, epilogue): the epilogue is ~3 fp32 ops per (row, code) score."""
    elem = torch.empty(0, dtype=dtype).element_size()
    flops = 2.0 * n * k * d
    bytes_ = (n * d + k * d) * elem + n * (8 + 4)
    return max(flops / matmul_peak(dtype, peaks), bytes_ / peaks["hbm_bytes_s"], 3.0 * n * k / peaks["fp32_ops"])


def gumbel_floor_parts(n: int, k: int, dtype: torch.dtype, mode: str, peaks: dict = H100) -> dict:
    """Floors (seconds) of the fused Gumbel-softmax phases: each is max(bytes / HBM, special-function ops / rate).

    * forward, straight-through (F.gumbel_softmax's API): read the logits and write the N x K one-hot, 2 logs (the
      noise) + 1 exp (the row statistics the backward uses) per element, indices and row statistics per row;
    * forward, indices only: read the logits, 2 logs per element;
    * backward: read the logits and the output gradient, write the logits' gradient (3 passes), 2 logs + 1 exp.

    PERF.md's 65536 x 8192 bf16 figures are the parts: forward SFU ~413 us, backward bytes ~960 us (H100).
    """
    e = torch.empty(0, dtype=dtype).element_size()
    nk = n * k
    sfu_fwd = (2 if mode == "indices" else 3) * nk / peaks["sfu_ops_s"]
    bytes_fwd = nk * e * (1 if mode == "indices" else 2) + n * (8 + 4)
    parts = {"fwd_bytes": bytes_fwd / peaks["hbm_bytes_s"], "fwd_sfu": sfu_fwd}
    if mode == "fwd_bwd":
        parts["bwd_bytes"] = 3 * nk * e / peaks["hbm_bytes_s"]
        parts["bwd_sfu"] = 3 * nk / peaks["sfu_ops_s"]
    return parts


def gumbel_floor_s(n: int, k: int, dtype: torch.dtype, mode: str, peaks: dict = H100) -> float:
    """Floor of one call in ``mode`` ("fwd", "indices", "fwd_bwd"): the phases run one after the other."""
    p = gumbel_floor_parts(n, k, dtype, mode, peaks)
    floor = max(p["fwd_bytes"], p["fwd_sfu"])
    if mode == "fwd_bwd":
        floor += max(p["bwd_bytes"], p["bwd_sfu"])
    return floor


def gpu_target(fn, inputs: list, launches: int = 5):
    """A benchmark target that launches ``fn`` on rotating input copies, then synchronises once."""
    state = {"i": 0}

    def run():
        for _ in range(launches):
            fn(*inputs[state["i"] % len(inputs)])
            state["i"] += 1
        torch.cuda.synchronize()

    return run


def time_provider(benchmark, fn, inputs: list, info: dict, device: str, *, launches: int = 5, warmup_rounds: int = 2,
                  rounds: int = 10, peak_memory: bool = True) -> float:  # fmt: skip
    """Time ``fn`` and return the median seconds per call (the caller has already warmed it up once).

    CUDA: the peak extra memory of one call goes into ``info`` (``peak_extra_mem_bytes``, ``peak_mem_gib``), then
    ``launches`` launches on rotating ``inputs`` and one synchronize per round (:func:`gpu_target`). CPU: 3 rounds of
    one call. ``info`` also gets the GPU name and ``median_us_per_call``.
    """
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        if peak_memory:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(*inputs[0])
            torch.cuda.synchronize()
            info["peak_extra_mem_bytes"] = torch.cuda.max_memory_allocated() - base
            info["peak_mem_gib"] = info["peak_extra_mem_bytes"] / 2**30
        benchmark.pedantic(gpu_target(fn, inputs, launches), warmup_rounds=warmup_rounds, rounds=rounds, iterations=1)
    else:
        launches = 1
        benchmark.pedantic(fn, args=inputs[0], warmup_rounds=1, rounds=3, iterations=1)
    per_call = benchmark.stats.stats.median / launches
    info["median_us_per_call"] = per_call * 1e6
    return per_call


# ------------------------------------------------------------------------------------------------ train steps
STEP_PROVIDERS = ["mimfast", "eager", "mimfast_compile", "eager_compile"]


def skip_step_case(provider: str, device: str) -> None:
    """The skips every model-step suite shares: CUDA cases need CUDA, CPU cases run only on CPU-only machines (the
    smoke pass), and torch.compile of a training step is a GPU comparison."""
    import pytest

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("CPU shapes run only on CPU-only machines")
    if device == "cpu" and provider.endswith("compile"):
        pytest.skip("torch.compile of a training step is a GPU comparison")


def make_train_step(forward, opt, device: str):
    """One training step: ``forward()`` (returning the loss first) under bf16 autocast on CUDA, backward, ``opt``."""
    import contextlib

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def step():
        with amp:
            out = forward()
        loss = out[0] if isinstance(out, (tuple, list)) else out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def time_train_step(benchmark, step, provider: str, *, batch: int, device: str, flops: float, group: str,
                    info: dict) -> None:  # fmt: skip
    """Warm up ``step`` (a compile provider that cannot run here is skipped with its reason), time it (CUDA: 5 steps
    then one synchronize per round, after 2 untimed steps; CPU: one step per round), and record img/s, MFU (model
    FLOPs over the bf16 peak), peak memory and the loss after the timing in ``benchmark.extra_info``."""
    import pytest

    try:
        step()  # warm-up: Triton / inductor / cuDNN autotuning here, not in the timing
    except Exception as exc:  # noqa: BLE001 - a compile provider that cannot run here is skipped with its reason
        if provider.endswith("compile"):
            pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}")
        raise
    benchmark.group = group
    info = dict(provider=provider, batch=batch, device=device, torch=torch.__version__, gflop_per_image=flops / 1e9,
                **info)  # fmt: skip
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["dtype"] = "bf16 autocast"
        steps = 5

        def target():
            for _ in range(steps):
                step()
            torch.cuda.synchronize()

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        benchmark.pedantic(target, warmup_rounds=1, rounds=5, iterations=1)
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

"""Ceilings, floors and GPU timing helpers for the benchmarks (numbers from ../shared/PERF.md, H100 SXM datasheet)."""

from __future__ import annotations

import torch

H100 = dict(hbm_bytes_s=3.35e12, bf16_flops=990e12, tf32_flops=495e12, fp32_flops=67e12, fp32_ops=33.5e12)


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


def gpu_target(fn, inputs: list, launches: int = 5):
    """A benchmark target that launches ``fn`` on rotating input copies, then synchronises once."""
    state = {"i": 0}

    def run():
        for _ in range(launches):
            fn(*inputs[state["i"] % len(inputs)])
            state["i"] += 1
        torch.cuda.synchronize()

    return run

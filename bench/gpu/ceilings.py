"""Measure the two ceilings PERF.md's floors use, on the GPU at hand: HBM bandwidth and the dense bf16 matmul rate.

    python bench/gpu/ceilings.py --out $OUT/ceilings.json      # then MIMFAST_CEILINGS=$OUT/ceilings.json pytest bench/

* HBM: a device-to-device copy of a 4 GiB buffer (2 x 4 GiB moved per copy), median of 20 after a warm-up.
* bf16: an 8192^3 matmul (2 * 8192^3 FLOP), median of 20 after a warm-up.

Both are timed with CUDA events; the JSON also records the GPU name, torch / triton versions and the command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


def _median_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def measure(copy_gib: float = 4.0, n: int = 8192) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("error: ceilings.py needs a CUDA device")
    import triton

    numel = int(copy_gib * 2**30) // 4
    src = torch.empty(numel, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    hbm = 2 * numel * 4 / (ms * 1e-3)
    src = dst = None  # free 8 GiB before the matmul
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms_mm = _median_ms(lambda: a @ b)
    flops = 2 * n**3 / (ms_mm * 1e-3)
    return {"gpu": torch.cuda.get_device_name(), "hbm_bytes_s": hbm, "bf16_flops": flops, "copy_gib": copy_gib,
            "matmul_n": n, "copy_ms": ms, "matmul_ms": ms_mm, "torch": torch.__version__, "triton": triton.__version__,
            "command": " ".join(["python", *sys.argv])}  # fmt: skip


def _line(m: dict) -> str:
    return (f"ceilings measured in this run on {m['gpu']}: HBM {m['hbm_bytes_s'] / 1e12:.2f} TB/s (copy), bf16 "
            f"matmul {m['bf16_flops'] / 1e12:.0f} TFLOP/s ({m['matmul_n']}^3); torch {m['torch']}, "
            f"triton {m['triton']}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="measure, and write the JSON here")
    g.add_argument("--show", help="print the line of a JSON written before")
    args = p.parse_args()
    if args.show:
        with open(args.show) as f:
            print(_line(json.load(f)) + "\n")
        return
    m = measure()
    with open(args.out, "w") as f:
        json.dump(m, f, indent=2)
    print(f"{_line(m)} -> {args.out}")


if __name__ == "__main__":
    main()

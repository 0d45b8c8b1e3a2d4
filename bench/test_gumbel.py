"""Gumbel-softmax, straight-through (hard): mimfast's fused kernel vs F.gumbel_softmax vs torch.compile of it.

GPU: PERF.md's shapes (N x K = 65536 x 1024 / 8192 and 16384 x 1024, bf16 and fp32), forward, forward + backward
and (mimfast only) the indices-only forward, timed as several launches + one synchronize, with effective GB/s, the
floor ratio (bench/_perf.py: bytes and special-function floors per phase) and peak extra memory in extra_info.
CPU: one small shape (the mimfast CPU path is the plain-torch reference with its int64 Philox, not a speed claim).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _perf import PEAKS, gumbel_floor_parts, gumbel_floor_s, time_provider

import mimfast
from mimfast.kernels.gumbel_softmax import gumbel_softmax, gumbel_softmax_ref
from mimfast.ops.gumbel import draw_philox

CUDA = torch.cuda.is_available()
GPU_SHAPES = [(65536, 8192), (65536, 1024), (16384, 1024)]
CPU_SHAPES = [(2048, 1024)]
PROVIDERS = ["mimfast", "torch", "compile"]
MODES = ["fwd", "fwd_bwd", "indices"]
TAU = 1.0

_compiled = None


def compiled_gumbel(logits):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(lambda x: F.gumbel_softmax(x, tau=TAU, hard=True))
    return _compiled(logits)


FORWARD = {
    "mimfast": lambda x: mimfast.gumbel_softmax(x, tau=TAU, hard=True, nan_policy="propagate"),
    "torch": lambda x: F.gumbel_softmax(x, tau=TAU, hard=True),
    "compile": compiled_gumbel,
}


def make_fn(provider: str, mode: str):
    if mode == "indices":  # the quantizer's eval / tokenization path: no N x K output
        return lambda x, cot: mimfast.gumbel_quantize(x, TAU, indices_only=True, nan_policy="propagate")[1]
    fwd = FORWARD[provider]
    if mode == "fwd":
        return lambda x, cot: fwd(x)

    def fwd_bwd(x, cot):  # a dense, pre-made cotangent; autograd.grad does not accumulate into .grad
        return torch.autograd.grad(fwd(x), x, cot)[0]

    return fwd_bwd


def moved_bytes(n, k, dtype, mode) -> int:
    """Bytes that must cross HBM once (the floor's bytes): see bench/_perf.py's gumbel_floor_parts."""
    e = torch.empty(0, dtype=dtype).element_size()
    fwd = n * k * e * (1 if mode == "indices" else 2) + n * 12
    return fwd + (3 * n * k * e if mode == "fwd_bwd" else 0)


def cases():
    for n, k in GPU_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            yield pytest.param((n, k), dtype, "cuda", id=f"cuda-{n}x{k}-{str(dtype)[6:]}")
    for n, k in CPU_SHAPES:
        yield pytest.param((n, k), torch.float32, "cpu", id=f"cpu-{n}x{k}-float32")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,dtype,device", list(cases()))
def test_gumbel(benchmark, provider, mode, shape, dtype, device):
    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    if device == "cpu" and CUDA:
        pytest.skip("CPU shapes run only on CPU-only machines")
    if mode == "indices" and provider != "mimfast":
        pytest.skip("indices-only is a mimfast mode (F.gumbel_softmax always writes the N x K sample)")
    if device == "cpu" and provider == "compile":
        pytest.skip("torch.compile of F.gumbel_softmax is a GPU comparison (inductor's CPU build is not the point)")
    n, k = shape
    g = torch.Generator().manual_seed(0)
    copies = 1 if device == "cpu" else max(1, min(3, int(400e6 // (n * k * dtype.itemsize))))  # rotate past L2
    grad = mode == "fwd_bwd"
    inputs = [(torch.randn(n, k, generator=g).mul_(2).to(device, dtype).requires_grad_(grad),
               torch.randn(n, k, generator=g).to(device, dtype) if grad else None) for _ in range(copies)]  # fmt: skip
    fn = make_fn(provider, mode)
    try:
        fn(*inputs[0])  # warm-up: Triton / inductor compile here, not in the timing
    except Exception as exc:  # noqa: BLE001 - a provider that cannot run here is skipped with its reason
        if provider == "compile":
            pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}")
        raise
    benchmark.group = f"gumbel {mode} {device} N={n} K={k} {str(dtype)[6:]}"
    info = dict(provider=provider, mode=mode, n=n, k=k, tau=TAU, hard=True, dtype=str(dtype), device=device,
                torch=torch.__version__)  # fmt: skip
    per_call = time_provider(benchmark, fn, inputs, info, device)
    nbytes = moved_bytes(n, k, dtype, mode)
    info["bytes"] = nbytes
    info["effective_gb_s"] = nbytes / per_call / 1e9
    info["effective_tb_s"] = nbytes / per_call / 1e12  # the column bench/summarize.py shows
    if device == "cuda":
        floor = gumbel_floor_s(n, k, dtype, mode, PEAKS)
        info["floor_us"], info["floor_ratio"] = floor * 1e6, per_call / floor
        info["floor_parts_us"] = {p: v * 1e6 for p, v in gumbel_floor_parts(n, k, dtype, mode, PEAKS).items()}
    # correctness outside the timing: the fused samples are one-hot and equal the reference of the same noise
    if provider == "mimfast":
        rows = min(n, 512)
        x = inputs[0][0].detach()[:rows]
        ph = draw_philox(torch.Generator(device=device).manual_seed(1), device)
        y, idx, _ = gumbel_softmax(x, ph, TAU, hard=True)
        _, ridx, _ = gumbel_softmax_ref(x, ph, TAU, hard=True)
        info["index_agreement_ref"] = (idx == ridx).float().mean().item()
        info["one_hot"] = bool(torch.equal(y.sum(1), torch.ones(rows, dtype=y.dtype, device=device)))
    benchmark.extra_info.update(info)
    if provider == "mimfast":
        assert info["one_hot"] and info["index_agreement_ref"] >= 0.995  # ties within the logs' last bits may flip


def test_floor_matches_perf_md():
    """PERF.md, 65536 x 8192 bf16 on an H100: forward ~413 us (exp/log-bound), backward ~960 us (bytes)."""
    parts = gumbel_floor_parts(65536, 8192, torch.bfloat16, "fwd_bwd")
    for key, want in (("fwd_sfu", 413), ("bwd_bytes", 960)):
        got = parts[key] * 1e6
        assert abs(got - want) / want < 0.05, (key, got, want)

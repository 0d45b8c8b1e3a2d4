"""Attention on MAE's visible-token shapes (PERF.md): every backend of mimfast.layers.attention side by side.

Providers: ``flash`` (flash-attn, when installed), ``sdpa`` (PyTorch's own pick), ``sdpa-flash`` / ``sdpa-cudnn`` /
``sdpa-efficient`` (one SDPA kernel forced with ``torch.nn.attention.sdpa_kernel``), ``xformers`` (when installed)
and ``eager`` (the official MAE formula). Modes: ``fwd`` and ``fwdbwd`` (forward, then ``autograd.grad`` of q, k, v).

q, k, v are (B, H, L, d) views of (B, L, H, d) tensors, the strides the model's qkv projection produces.
extra_info: effective TB/s = bytes / time, where bytes counts q, k, v, out once (fwd) plus dout, dq, dk, dv (fwdbwd);
TFLOP/s with 4·B·H·L²·d for fwd and 3.5x that for fwd+bwd (the backward's 5 matmuls are 2.5x the forward's 2, the
FlashAttention benchmark convention); the floor (max of bytes / HBM, FLOPs / peak, exps / exp rate) and the ratio.
GPU: several launches then one synchronize per round; CPU: one tiny shape, so a CPU smoke run takes seconds.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from _perf import H100, PEAKS, matmul_peak, time_provider

from mimfast.layers.attention import attention, attention_eager, available_backends

CUDA = torch.cuda.is_available()
GPU_SHAPES = [(256, 50, 12, 64), (256, 197, 16, 32), (128, 197, 12, 64), (256, 257, 12, 64)]  # (B, L, H, d)
CPU_SHAPES = [(2, 50, 2, 32)]
PROVIDERS = ["flash", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "xformers", "eager"]
MODES = ["fwd", "fwdbwd"]
SDPA_FORCED = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
}
EXP_RATE = 3.9e12  # PERF.md: exp/log units on an H100
L2_BYTES = 50 << 20  # H100 L2; inputs rotate through at least twice this


def attention_cost(b: int, n: int, h: int, d: int, elem: int, mode: str) -> tuple[float, float, float]:
    """(bytes, FLOPs, exps) of one call: every tensor read or written once, 2 matmuls fwd (+5 bwd), exp of the
    L x L scores once forward (and recomputed once backward)."""
    tensor = b * n * h * d * elem
    flops = 4.0 * b * h * n * n * d
    exps = float(b * h * n * n)
    if mode == "fwd":
        return 4.0 * tensor, flops, exps
    return 8.0 * tensor, 3.5 * flops, 2.0 * exps


def attention_floor_s(b, n, h, d, dtype, mode, peaks: dict = H100) -> float:
    bytes_, flops, exps = attention_cost(b, n, h, d, torch.empty(0, dtype=dtype).element_size(), mode)
    return max(bytes_ / peaks["hbm_bytes_s"], flops / matmul_peak(dtype, peaks), exps / EXP_RATE)


def cases():
    for shape in GPU_SHAPES:
        yield pytest.param(shape, torch.bfloat16, "cuda", id=f"cuda-B{shape[0]}-L{shape[1]}-{shape[2]}x{shape[3]}-bf16")
    for shape in CPU_SHAPES:
        yield pytest.param(shape, torch.float32, "cpu", id=f"cpu-B{shape[0]}-L{shape[1]}-{shape[2]}x{shape[3]}-fp32")


def _skip_reason(provider: str, device: str) -> str | None:
    backend = provider.split("-")[0]
    if device == "cuda" and not CUDA:
        return "needs CUDA"
    if device == "cpu" and CUDA:
        return "CPU shapes run only on CPU-only machines"
    if provider in SDPA_FORCED:
        if device != "cuda":
            return f"{provider}: SDPA's {SDPA_FORCED[provider]} kernel is CUDA-only"
        if not hasattr(torch.nn.attention.SDPBackend, SDPA_FORCED[provider]):
            return f"{provider}: this torch has no SDPBackend.{SDPA_FORCED[provider]}"
    if backend not in available_backends():
        return f"{provider}: backend {backend!r} is not available here (pip install -e '.[{backend}]', needs CUDA)"
    return None


def _sdpa_context(provider: str):
    if provider not in SDPA_FORCED:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_FORCED[provider]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape,dtype,device", list(cases()))
def test_attention(benchmark, provider, mode, shape, dtype, device):
    if (reason := _skip_reason(provider, device)) is not None:
        pytest.skip(reason)
    backend = provider.split("-")[0]
    b, n, h, d = shape
    g = torch.Generator(device).manual_seed(0)
    set_bytes = 4 * b * n * h * d * dtype.itemsize
    copies = 1 if device == "cpu" else min(4, max(2, math.ceil(2 * L2_BYTES / set_bytes)))
    grad = mode == "fwdbwd"
    inputs = []
    for _ in range(copies):  # (B, L, H, d) leaves; the benchmarked function sees (B, H, L, d) views
        q, k, v, dout = (torch.randn(b, n, h, d, generator=g, device=device, dtype=dtype) for _ in range(4))
        inputs.append((q.requires_grad_(grad), k.requires_grad_(grad), v.requires_grad_(grad), dout))

    def fwd(q, k, v, dout):
        return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=backend)

    def fwdbwd(q, k, v, dout):
        out = fwd(q, k, v, dout)
        return torch.autograd.grad(out, (q, k, v), dout.transpose(1, 2))

    fn = fwd if mode == "fwd" else fwdbwd
    with _sdpa_context(provider):
        try:
            fn(*inputs[0])  # warm-up, and a forced SDPA kernel that cannot take this shape says so here
        except RuntimeError as exc:
            if provider in SDPA_FORCED:
                pytest.skip(f"{provider} cannot run this case: {str(exc).splitlines()[0]}")
            raise
        benchmark.group = f"attention {device} B={b} L={n} H={h}x{d} {str(dtype)[6:]} {mode}"
        info = dict(provider=provider, mode=mode, b=b, seq_len=n, h=h, d=d, dtype=str(dtype), device=device,
                    torch=torch.__version__)  # fmt: skip
        per_call = time_provider(benchmark, fn, inputs, info, device, warmup_rounds=3)
        # correctness outside the timing: the first two samples against a float64 reference
        q, k, v, _ = (t[:2].detach() for t in inputs[0])
        out = fwd(q, k, v, None).double()
    bytes_, flops, _ = attention_cost(b, n, h, d, dtype.itemsize, mode)
    info["effective_tb_s"] = bytes_ / per_call / 1e12
    info["tflops"] = flops / per_call / 1e12
    if device == "cuda":
        floor = attention_floor_s(b, n, h, d, dtype, mode, PEAKS)
        info["floor_us"], info["floor_ratio"] = floor * 1e6, per_call / floor
    q64, k64, v64 = (t.transpose(1, 2).double() for t in (q, k, v))
    ref = attention_eager(q64, k64, v64)
    eager = attention_eager(q64.to(dtype), k64.to(dtype), v64.to(dtype)).double()
    info["max_abs_err_fp64"] = (out - ref).abs().max().item()
    info["eager_max_abs_err_fp64"] = (eager - ref).abs().max().item()
    benchmark.extra_info.update(info)
    assert info["max_abs_err_fp64"] <= 2 * info["eager_max_abs_err_fp64"] + 1e-5, info


def test_visible_token_shapes_are_bytes_bound():
    """PERF.md: at these lengths attention is bytes-bound on an H100, so effective TB/s is the figure to report."""
    for b, n, h, d in GPU_SHAPES:
        for mode in MODES:
            bytes_, flops, exps = attention_cost(b, n, h, d, 2, mode)
            floor = attention_floor_s(b, n, h, d, torch.bfloat16, mode)
            assert floor == bytes_ / H100["hbm_bytes_s"], (b, n, h, d, mode)
    # (256, 50, 12x64) fwd: 4 tensors of 256*50*768 bf16 = 78.6 MB -> 23.5 us at 3.35 TB/s
    assert abs(attention_floor_s(256, 50, 12, 64, torch.bfloat16, "fwd") * 1e6 - 23.5) < 0.1

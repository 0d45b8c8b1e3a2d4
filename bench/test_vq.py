"""Codebook nearest-neighbour search: mimfast vs the eager PyTorch paths (and vector-quantize-pytorch when present).

GPU: the shapes of PERF.md, timed as several launches + one synchronize, with TFLOP/s, the floor ratio and peak
memory in extra_info. CPU: small shapes only (the mimfast CPU path is the chunked PyTorch reference).
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch
from _perf import PEAKS, time_provider, vq_search_floor_s

from mimfast.kernels import vq_search

CUDA = torch.cuda.is_available()
GPU_SHAPES = [(65536, k, d) for k in (1024, 8192, 16384) for d in (32, 64, 256)] + [(16384, 8192, 64),
                                                                                   (262144, 8192, 64)]  # fmt: skip
CPU_SHAPES = [(4096, 1024, 32), (4096, 1024, 64)]
PROVIDERS = ["mimfast", "eager", "cdist", "compile", "vqp"]
NXK_BUDGET = 4 << 30  # eager providers that would allocate more than this for the N x K fp32 matrix are skipped


def eager_search(x, e):
    xf, ef = x.float(), e.float()
    return ((xf * xf).sum(1, keepdim=True) + (ef * ef).sum(1)[None] - 2 * xf @ ef.T).argmin(1)


def cdist_search(x, e):
    return torch.cdist(x.float(), e.float()).argmin(1)


_compiled = None


def compiled_search(x, e):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(eager_search)
    return _compiled(x, e)


def vqp_search(x, e):
    # vector-quantize-pytorch's EuclideanCodebook scores with its cdist helper then argmax of -dist
    from vector_quantize_pytorch.vector_quantize_pytorch import cdist

    return (-cdist(x.float()[None], e.float()[None])).argmax(-1)[0]


FNS = {"mimfast": lambda x, e: vq_search(x, e)[0], "eager": eager_search, "cdist": cdist_search,
       "compile": compiled_search, "vqp": vqp_search}  # fmt: skip


AUTOCAST = "autocast"  # bf16 activations, fp32 codebook, under torch.autocast(bfloat16): the common training call


def cases():
    for shape in GPU_SHAPES:
        for dtype in (torch.bfloat16, torch.float32, AUTOCAST):
            name = dtype if dtype == AUTOCAST else str(dtype)[6:]
            yield pytest.param(shape, dtype, "cuda", id=f"cuda-{shape[0]}x{shape[1]}x{shape[2]}-{name}")
    for shape in CPU_SHAPES:
        yield pytest.param(shape, torch.float32, "cpu", id=f"cpu-{shape[0]}x{shape[1]}x{shape[2]}-float32")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape,dtype,device", list(cases()))
def test_vq_search(benchmark, provider, shape, dtype, device):
    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    if device == "cpu" and CUDA:
        pytest.skip("CPU shapes run only on CPU-only machines")
    if provider == "vqp" and importlib.util.find_spec("vector_quantize_pytorch") is None:
        pytest.skip("vector-quantize-pytorch is not installed (pip install -e '.[bench]')")
    n, k, d = shape
    if provider != "mimfast" and n * k * 4 > NXK_BUDGET:
        pytest.skip(f"{provider} would allocate an N x K fp32 matrix of {n * k * 4 / 2**30:.0f} GiB")
    g = torch.Generator().manual_seed(0)
    xdt, edt = (torch.bfloat16, torch.float32) if dtype == AUTOCAST else (dtype, dtype)
    copies = 1 if device == "cpu" else max(1, min(4, int(100e6 // (n * d * xdt.itemsize))))  # rotate past L2
    inputs = [(torch.randn(n, d, generator=g).to(device, xdt), torch.randn(k, d, generator=g).to(device, edt))
              for _ in range(copies)]  # fmt: skip
    base_fn = FNS[provider]

    def fn(x, e):  # under bf16 autocast for the AUTOCAST case (every provider, so eager matmuls run in bf16 too)
        with torch.autocast(device, dtype=torch.bfloat16) if dtype == AUTOCAST else contextlib.nullcontext():
            return base_fn(x, e)

    try:
        fn(*inputs[0])  # warm-up: Triton / inductor compile here, not in the timing
    except Exception as exc:  # noqa: BLE001 - a provider that cannot run here is skipped with its reason
        if provider == "compile":
            pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}")
        raise
    name = dtype if dtype == AUTOCAST else str(dtype)[6:]
    benchmark.group = f"vq_search {device} N={n} K={k} D={d} {name}"
    info = dict(provider=provider, n=n, k=k, d=d, dtype=str(dtype), device=device, torch=torch.__version__)
    per_call = time_provider(benchmark, fn, inputs, info, device)
    info["tflops"] = 2.0 * n * k * d / per_call / 1e12
    if device == "cuda":
        floor = vq_search_floor_s(n, k, d, xdt, PEAKS)
        info["floor_us"], info["floor_ratio"] = floor * 1e6, per_call / floor
    # correctness outside the timing: indices agree with a float64 reference where the margin is clear
    x, e = inputs[0]
    rows = min(n, 2048)
    got = fn(x[:rows], e).long().cpu()
    s = (e.double() ** 2).sum(1)[None] - 2 * x[:rows].double() @ e.double().T
    top = s.topk(2, dim=1, largest=False)
    # a clear margin: 1e-3 of the scores' scale; bf16 products of an fp32 codebook (autocast) round each code, so 1e-2
    clear = (top.values[:, 1] - top.values[:, 0]) > (1e-2 if dtype == AUTOCAST else 1e-3) * s.abs().amax(1)
    info["index_agreement_fp64"] = (got[clear.cpu()] == top.indices[:, 0][clear].cpu()).float().mean().item()
    benchmark.extra_info.update(info)
    if provider == "mimfast":
        assert info["index_agreement_fp64"] == 1.0


def test_floor_matches_perf_md():
    """PERF.md's floors for N=65536, K=8192 in bf16: D32 ~48 us (epilogue), D64 ~70, D256 ~278."""
    for d, want in ((32, 48), (64, 70), (256, 278)):
        got = vq_search_floor_s(65536, 8192, d, torch.bfloat16) * 1e6
        assert abs(got - want) / want < 0.05, (d, got, want)

"""mimfast::vq_search — the fused Triton kernel against its float64 reference (interpreter on CPU, GPU unchanged)."""

from __future__ import annotations

import pytest
import torch

import mimfast
from conftest import AWKWARD, DEVICE, KERNEL_DTYPES, awkward_sweep, shape_id
from mimfast.kernels import use_triton, vq_search, vq_search_ref

SWEEP = awkward_sweep(AWKWARD, budget=2.0e6)
BIG = [(1025, 1000, 257), (97, 8193, 257), (1025, 8193, 3)]  # mixed large cases, one dtype/metric each


def scores64(x: torch.Tensor, e: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float64 scores ||e||^2 - 2 x.e (on normalised vectors for cosine) and (N,) ||x||^2, from the spec."""
    xd, ed = x.double(), e.double()
    if metric == "cosine":
        xd = xd / xd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ed = ed / ed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (ed * ed).sum(-1)[None, :] - 2 * xd @ ed.T, (xd * xd).sum(-1)


def torch_fp32_error(x, e, metric, s64) -> torch.Tensor:
    """Per-row max |error| of the same scores computed by eager PyTorch in fp32: the yardstick for our error."""
    xf, ef = x.float(), e.float()
    if metric == "cosine":
        xf = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ef = ef / ef.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s32 = (ef * ef).sum(-1)[None, :] - 2 * xf @ ef.T
    return (s32.double() - s64).abs().amax(dim=1)


def assert_matches_reference(x, e, metric, idx, dist, counts=None):
    s64, xsq = scores64(x, e, metric)
    best, best_idx = s64.min(dim=1)
    # allowed error: 2x eager fp32's error plus a rounding floor relative to the magnitudes involved
    scale = xsq + (s64 + 2 * (x.double() @ e.double().T).abs()).abs().amax(dim=1)
    allowed = 2 * torch_fp32_error(x, e, metric, s64) + 1e-6 * scale + 1e-12
    idx = idx.long().cpu()
    assert (idx >= 0).all() and (idx < e.shape[0]).all(), "index out of range"
    top2 = s64.topk(min(2, s64.shape[1]), dim=1, largest=False).values
    margin = top2[:, 1] - top2[:, 0] if s64.shape[1] > 1 else torch.full_like(best, float("inf"))
    clear = margin > 2 * allowed
    assert torch.equal(idx[clear], best_idx[clear]), f"{(idx[clear] != best_idx[clear]).sum()} clear-margin rows differ"
    chosen = s64.gather(1, idx[:, None])[:, 0]
    assert ((chosen - best) <= 2 * allowed).all(), "a near-tie row chose a code farther than the tolerance allows"
    d64 = (xsq + best).clamp_min(0)  # xsq is ||x^||^2 for cosine (scores64 normalised x)
    err = (dist.double().cpu() - d64).abs()
    assert (err <= allowed + 1e-6 * d64).all(), f"distance error {err.max():.3e} > allowed {allowed.max():.3e}"
    if counts is not None:
        assert torch.equal(counts.long().cpu(), torch.bincount(idx, minlength=e.shape[0]))


def make(n, k, d, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) * scale).to(dtype).to(DEVICE)
    e = (torch.randn(k, d, generator=g) * scale).to(dtype).to(DEVICE)
    return x, e


# ------------------------------------------------------------------------------------------------ correctness
def test_kernel_path_is_exercised():
    x, e = make(4, 3, 2, torch.float32)
    assert use_triton(x, e), "tests must run the Triton kernel (TRITON_INTERPRET=1 on CPU)"


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SWEEP, ids=shape_id)
def test_sweep_matches_fp64(shape, dtype, metric):
    n, k, d = shape
    x, e = make(n, k, d, dtype, seed=n * 7 + k * 3 + d)
    idx, dist, counts = vq_search(x, e, metric=metric, return_counts=True)
    assert idx.shape == (n,) and idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert counts.shape == (k,) and counts.dtype == torch.int32
    assert_matches_reference(x, e, metric, idx, dist, counts)


@pytest.mark.slow
@pytest.mark.parametrize("shape,dtype,metric", [(BIG[0], torch.float32, "l2"), (BIG[1], torch.bfloat16, "cosine"),
                                                (BIG[2], torch.float16, "l2")], ids=str)  # fmt: skip
def test_large_mixed_shapes(shape, dtype, metric):
    x, e = make(*shape, dtype, seed=1)
    idx, dist, counts = vq_search(x, e, metric=metric, return_counts=True)
    assert_matches_reference(x, e, metric, idx, dist, counts)


def test_reference_is_the_spec():
    """vq_search_ref in float64 equals the formula of SPEC.md computed directly (full argmin over d)."""
    x, e = make(97, 40, 7, torch.float64)
    idx, dist, _ = vq_search_ref(x, e)
    d = (x * x).sum(-1)[:, None] + (e * e).sum(-1)[None, :] - 2 * x @ e.T
    assert torch.equal(idx.cpu(), d.argmin(dim=1).cpu())
    torch.testing.assert_close(dist.double(), d.min(dim=1).values.clamp_min(0).float().double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_exact_ties_take_lowest_index(dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(200, 16, generator=g)
    e = base.clone()
    # duplicates inside one K tile (3, 4) and across tiles (5 / 130 / 199): the lowest index must win
    e[4] = e[3]
    e[130] = e[5]
    e[199] = e[5]
    e = e.to(dtype).to(DEVICE)
    x = torch.cat([e[[4, 3, 130, 199, 5]].float().cpu(), base[[130]] * 0.999]).to(dtype).to(DEVICE)
    idx, _, _ = vq_search(x, e)
    assert idx[:5].tolist() == [3, 3, 5, 5, 5]
    # an exact tie between different codes: x = 0 is equidistant from +v and -v
    e2 = torch.stack([torch.ones(8), -torch.ones(8), torch.ones(8) * 3]).to(dtype).to(DEVICE)
    idx2, dist2, _ = vq_search(torch.zeros(2, 8, dtype=dtype, device=DEVICE), e2)
    assert idx2.tolist() == [0, 0] and dist2.tolist() == [8.0, 8.0]
    # torch.argmin's rule on the same scores
    assert torch.argmin(torch.tensor([8.0, 8.0, 72.0])).item() == 0


def test_fp16_large_magnitude_does_not_overflow():
    """fp16 inputs near the fp16 max: ||x||^2 ~ 1e11 overflows fp16 but not the fp32 accumulators."""
    g = torch.Generator().manual_seed(5)
    e = (torch.rand(300, 64, generator=g) * 2 - 1) * 60000
    x = e[torch.randint(0, 300, (97,), generator=g)] * 0.9
    x16, e16 = x.half().to(DEVICE), e.half().to(DEVICE)
    assert torch.isinf((x16 * x16).sum(-1)).all(), "the test must use norms that overflow fp16"
    idx, dist, _ = vq_search(x16, e16)
    assert torch.isfinite(dist).all()
    assert_matches_reference(x16, e16, "l2", idx, dist)


def test_int32_indices_and_counts():
    x, e = make(97, 1000, 40, torch.float32)
    i64, d64, c64 = vq_search(x, e, return_counts=True)
    i32, d32, c32 = vq_search(x, e, index_dtype=torch.int32, return_counts=True)
    assert i32.dtype == torch.int32 and torch.equal(i32.long(), i64) and torch.equal(d32, d64)
    assert torch.equal(c32, c64) and int(c64.sum()) == 97


def test_valid_mask_rows_skipped():
    x, e = make(97, 50, 8, torch.float32)
    valid = torch.arange(97, device=DEVICE) % 3 != 0
    idx, dist, counts = vq_search(x, e, valid=valid, return_counts=True)
    full, fdist, _ = vq_search(x, e)
    assert (idx[~valid] == -1).all() and (dist[~valid] == 0).all()
    assert torch.equal(idx[valid], full[valid]) and torch.equal(dist[valid], fdist[valid])
    assert torch.equal(counts.long(), torch.bincount(full[valid], minlength=50))


def test_strided_and_mixed_dtype_inputs():
    x, e = make(64, 33, 20, torch.float32)
    xt = torch.randn(20, 64, device=DEVICE).T  # non-contiguous (64, 20)
    et = e.T.contiguous().T  # column-major codebook
    for xi in (x, xt, x[::2]):
        idx, dist, _ = vq_search(xi, et)
        ref_i, ref_d, _ = vq_search(xi.contiguous(), e)
        # Different layouts compile to different load / reduction orders on a GPU: the distances agree to fp32
        # rounding, not bit for bit, and the indices wherever the margin between the two best codes is clear.
        torch.testing.assert_close(dist, ref_d, rtol=1e-5, atol=1e-5)
        assert_matches_reference(xi, e, "l2", idx, dist)
        s64, _ = scores64(xi, e, "l2")
        top2 = s64.topk(2, dim=1, largest=False).values
        clear = (top2[:, 1] - top2[:, 0] > 1e-4 * (1 + top2[:, 0].abs())).to(idx.device)
        assert torch.equal(idx[clear], ref_i[clear])
    xb = x.bfloat16()
    idx, dist, _ = vq_search(xb, e)  # bf16 activations, fp32 codebook (autocast)
    assert_matches_reference(xb, e, "l2", idx, dist)


def test_deterministic_repeat():
    x, e = make(300, 500, 24, torch.bfloat16)
    a = vq_search(x, e, return_counts=True)
    b = vq_search(x, e, return_counts=True)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_empty_rows():
    x, e = make(0, 5, 3, torch.float32)
    idx, dist, counts = vq_search(x, e, return_counts=True)
    assert idx.shape == (0,) and dist.shape == (0,) and counts.tolist() == [0] * 5


# ----------------------------------------------------------------------------------------------- non-finite
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_rows_and_codes():
    x, e = make(10, 6, 4, torch.float32)
    x[2, 1] = float("nan")
    x[5, 0] = float("inf")
    e[1, 0] = float("nan")  # a poisoned code is never chosen
    e[3, 2] = float("-inf")
    idx, dist, counts = vq_search(x, e, return_counts=True)
    assert idx[2] == -1 and idx[5] == -1 and torch.isnan(dist[[2, 5]]).all()
    ok = torch.tensor([i not in (2, 5) for i in range(10)], device=DEVICE)
    assert not ((idx[ok] == 1) | (idx[ok] == 3)).any() and torch.isfinite(dist[ok]).all()
    clean = torch.stack([e[0], e[2], e[4], e[5]])
    ci, cd, _ = vq_search(x[ok], clean)
    assert torch.equal(idx[ok], torch.tensor([0, 2, 4, 5], device=DEVICE)[ci])
    # same codes, same distances up to fp32 rounding: the two launches have different tile shapes, and the CPU BLAS
    # behind the interpreter's tl.dot may order a sum differently per shape (bit-equal on some CPUs, not on all)
    torch.testing.assert_close(dist[ok], cd, rtol=1e-6, atol=1e-6)
    assert int(counts.sum()) == 8
    with pytest.raises(ValueError, match=r"x contains NaN/inf.*nan_policy='mask'"):
        mimfast.vq_search(x, e)
    mi, _, _ = mimfast.vq_search(x, e, nan_policy="mask")
    assert torch.equal(mi, idx)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (interpreter) warns about the overflow it computes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp32_overflow_is_never_a_silent_wrong_code(dtype):
    """Finite inputs near 1.7e19: 2 x.e overflows fp32 for the true nearest code. The row must be flagged, not
    answered with a farther code; codes too large to score are never chosen; moderate rows are unaffected."""
    e = torch.tensor([[0.0], [1.7e19], [1.0]]).to(dtype).to(DEVICE)
    x = torch.tensor([[1.7e19], [0.9]]).to(dtype).to(DEVICE)
    for fn in (vq_search, vq_search_ref):
        idx, dist, _ = fn(x, e)
        assert idx.tolist() == [-1, 2] and torch.isnan(dist[0]) and dist[1] < 1
    with pytest.raises(ValueError, match="overflowed"):
        mimfast.vq_search(x, e)
    idx, dist, _ = vq_search(x, e, metric="cosine")  # normalised vectors cannot overflow
    assert set(idx.tolist()) <= {1, 2} and (dist < 1e-5).all()  # codes 1 and 2 normalise to the same unit vector


def test_all_codes_non_finite_raises():
    x, e = make(4, 3, 2, torch.float32)
    e[:, 0] = float("nan")
    with pytest.raises(ValueError, match="codebook contains NaN/inf"):
        mimfast.vq_search(x, e)


# ----------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "args,kwargs,exc,msg",
    [
        ((torch.randn(4), torch.randn(3, 4)), {}, ValueError, r"x: expected a 2-D tensor"),
        ((torch.randn(4, 2, 2), torch.randn(3, 4)), {}, ValueError, r"x: expected a 2-D tensor"),
        ((torch.randn(4, 4), torch.randn(3, 5)), {}, ValueError, r"codebook: expected shape \(K, 4\)"),
        ((torch.randn(4, 4), torch.randn(12)), {}, ValueError, r"codebook: expected a 2-D tensor"),
        ((torch.randint(0, 5, (4, 4)), torch.randn(3, 4)), {}, TypeError, r"x: expected dtype in"),
        ((torch.randn(4, 4), torch.randn(3, 4).int()), {}, TypeError, r"codebook: expected dtype in"),
        ((torch.randn(4, 4), torch.randn(0, 4)), {}, ValueError, r"codebook: expected at least one code"),
        ((torch.randn(4, 0), torch.randn(3, 0)), {}, ValueError, r"x: expected a feature dimension D >= 1"),
        ((torch.randn(4, 4), torch.randn(3, 4)), {"metric": "dot"}, ValueError, r"metric: expected one of"),
        ((torch.randn(4, 4), torch.randn(3, 4)), {"index_dtype": torch.int16}, ValueError, r"index_dtype"),
        ((torch.randn(4, 4), torch.randn(3, 4)), {"valid": torch.ones(4)}, TypeError, r"valid: expected dtype"),
        ((torch.randn(4, 4), torch.randn(3, 4)), {"valid": torch.ones(5, dtype=torch.bool)}, ValueError, "valid"),
        (([[1.0]], torch.randn(3, 1)), {}, TypeError, r"x: expected a torch.Tensor"),
        ((torch.randn(4, 4), torch.randn(3, 4)), {"nan_policy": "zero"}, ValueError, r"nan_policy"),
    ],
)
def test_bad_inputs_raise_clear_errors(args, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        mimfast.vq_search(*args, **kwargs)


def test_mixed_devices_error():
    x = torch.randn(4, 4)
    e = torch.randn(3, 4, device="meta")
    with pytest.raises(ValueError, match=r"one device.*x on cpu.*codebook on meta"):
        vq_search(x, e)


# ------------------------------------------------------------------------------------------ torch.library op
def test_opcheck():
    x, e = make(37, 19, 5, torch.float32)
    valid = torch.rand(37, device=DEVICE) > 0.3
    for args in [(x, e, None, False, False, True, 1e-12, "fp32"), (x, e, valid, True, True, False, 1e-12, "bf16"),
                 (x, e, valid[::2].repeat(2)[:37], False, False, True, 1e-12, "tf32")]:  # fmt: skip
        torch.library.opcheck(torch.ops.mimfast.vq_search.default, args)


def test_torch_compile_fullgraph():
    x, e = make(50, 20, 8, torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, e):
        idx, dist, _ = vq_search(x, e)
        return idx, dist * 2

    idx, dist2 = f(x, e)
    ref_i, ref_d, _ = vq_search(x, e)
    assert torch.equal(idx, ref_i) and torch.equal(dist2, ref_d * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak-memory check needs CUDA (CPU has no allocator stats)")
def test_no_nxk_allocation_on_gpu():
    n, k, d = 16384, 8192, 64
    x, e = make(n, k, d, torch.bfloat16)
    vq_search(x, e, return_counts=True)  # a shape's first call autotunes (do_bench's L2-flush buffer): warm up first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    vq_search(x, e, return_counts=True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 64 * (n + k) + (1 << 20), f"extra memory {extra} B is not O(N + K) (N x K fp32 = {n * k * 4} B)"


# ------------------------------------------------------------------------------------- precision and autocast
def rounded_scores64(x, e, dtype):
    """(N, K) float64 scores with the kernel's "bf16"/"fp16" rule: fp32 norms of the raw codes, products of the
    operands rounded to ``dtype``."""
    xr, er = x.to(dtype).double(), e.to(dtype).double()
    return (e.double() ** 2).sum(-1)[None, :] - 2 * xr @ er.T


@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float16], ids=str)
def test_precision_rounds_the_product_operands(pdtype):
    """fp32 inputs searched with 16-bit products: the kernel equals the reference's rule (operands rounded to nearest
    even, fp32 norms of the raw codes, fp32 accumulation) up to fp32 summation order."""
    x, e = make(300, 700, 40, torch.float32, seed=11)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[pdtype]
    idx, dist, counts = vq_search(x, e, precision=name, return_counts=True)
    ridx, rdist, rcounts = vq_search_ref(x, e, precision=name, return_counts=True)
    s64 = rounded_scores64(x.cpu(), e.cpu(), pdtype)
    top2 = s64.topk(2, dim=1, largest=False)
    clear = (top2.values[:, 1] - top2.values[:, 0] > 1e-4 * (1 + top2.values[:, 0].abs())).to(idx.device)
    assert clear.float().mean() > 0.9
    assert torch.equal(idx[clear], top2.indices[:, 0].to(idx.device)[clear])
    assert torch.equal(idx[clear], ridx[clear])
    torch.testing.assert_close(dist, rdist, rtol=1e-5, atol=1e-4)
    # the rounding is real: some rows pick a different code than the full-precision search
    fidx, _, _ = vq_search(x, e, precision="ieee")
    assert int(counts.sum()) == 300 and int(rcounts.sum()) == 300
    assert not torch.equal(rounded_scores64(x.cpu(), e.cpu(), pdtype), scores64(x.cpu(), e.cpu(), "l2")[0])
    assert (fidx != idx).any() or pdtype == torch.float16  # bf16 (8-bit mantissa) moves some near ties


def test_autocast_selects_the_autocast_dtype():
    """Under torch.autocast the search multiplies in the autocast dtype (bf16 activations + fp32 codebook, the common
    training call, run on tensor cores); outside it, fp32 inputs keep fp32 products."""
    x, e = make(200, 300, 24, torch.float32, seed=5)
    xb = x.bfloat16()
    dev = torch.device(DEVICE).type
    with torch.autocast(dev, dtype=torch.bfloat16):
        a = vq_search(xb, e, return_counts=True)
    b = vq_search(xb, e, precision="bf16", return_counts=True)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    from mimfast.kernels.vq_search import resolve_precision

    with torch.autocast(dev, dtype=torch.bfloat16):
        assert resolve_precision(xb, e, None) == "bf16"
        assert resolve_precision(xb, e, "ieee") == "ieee"  # an explicit precision wins
    assert resolve_precision(xb, e, None) == "fp32"  # no autocast: bf16 + fp32 promote to fp32
    assert resolve_precision(xb, xb, None) == "bf16"
    assert resolve_precision(x, e, torch.float16) == "fp16"


def test_precision_argument_errors():
    x, e = make(4, 3, 2, torch.float32)
    with pytest.raises(ValueError, match=r"precision: expected None, one of"):
        vq_search(x, e, precision="tf64")
    with pytest.raises(ValueError, match=r"precision: expected torch.bfloat16"):
        vq_search(x, e, precision=torch.int8)
    for p in ("ieee", "tf32", "tf32x3", "fp32"):
        idx, _, _ = vq_search(x, e, precision=p)
        assert idx.shape == (4,)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (interpreter) warns about the inf it computes
def test_fp16_products_that_overflow_never_win():
    """fp32 inputs narrowed to fp16 products: a code past fp16's range becomes inf there, and its -inf score must not
    be chosen (the reference treats it as non-finite)."""
    e = torch.tensor([[1.0, 0.0], [1e5, 0.0], [2.0, 0.0]]).to(DEVICE)
    x = torch.tensor([[1.5, 0.0], [3.0, 0.1]]).to(DEVICE)
    idx, dist, _ = vq_search(x, e, precision="fp16")
    ref, _, _ = vq_search_ref(x, e, precision="fp16")
    assert idx.tolist() == ref.tolist() and 1 not in idx.tolist()


# ---------------------------------------------------------------------------- tiling, split over K, counts
def test_ties_across_tiles_and_split_ranges():
    """Duplicated codes within a tile lane, across tiles and across split-K ranges (K = 3000 is split for a few rows):
    the lowest index wins, exactly as torch.argmin."""
    from mimfast.kernels._common import DEFAULT_TARGET, vq_search_plan

    k = 3000
    assert vq_search_plan(6, k, 16, 4, True, DEFAULT_TARGET)["split"] > 1, "the test must exercise split-K"
    g = torch.Generator().manual_seed(8)
    base = torch.randn(k, 16, generator=g)
    e = base.clone()
    dup = {7: [7 + 128, 7 + 256], 300: [301, 2999], 1000: [1900, 2500], 64: [65]}
    for src, dsts in dup.items():
        for d in dsts:
            e[d] = e[src]
    x = torch.stack([e[2999], e[2500], e[7 + 256], e[65], e[1900], e[7]])
    for dtype in KERNEL_DTYPES:
        idx, _, counts = vq_search(x.to(dtype).to(DEVICE), e.to(dtype).to(DEVICE), return_counts=True)
        assert idx.tolist() == [300, 1000, 7, 64, 1000, 7]
        assert counts[300] == 1 and counts[1000] == 2 and counts[7] == 2 and counts[64] == 1


@pytest.mark.parametrize("n,k", [(1025, 40), (300, 3000)], ids=["one-range", "split-k"])
def test_counts_under_collapse(n, k):
    """Every row on one code (codebook collapse): the histogram is exact on both the single-range and the split-K
    paths, with invalid and non-finite rows left out."""
    g = torch.Generator().manual_seed(2)
    e = torch.randn(k, 8, generator=g)
    x = (e[k // 2] + 1e-3 * torch.randn(n, 8, generator=g)).to(DEVICE)
    x[3, 0] = float("nan")
    valid = torch.ones(n, dtype=torch.bool, device=DEVICE)
    valid[10:20] = False
    idx, _, counts = vq_search(x, e.to(DEVICE), valid=valid, return_counts=True)
    assert counts.sum() == n - 11 and counts[k // 2] == n - 11
    assert (idx[valid & (torch.arange(n, device=DEVICE) != 3)] == k // 2).all()


# --------------------------------------------------------------------------------- launcher defects (issue 12)
def test_strided_valid_mask():
    """A non-contiguous ``valid`` (every other flag of a longer mask) is read through its stride."""
    x, e = make(97, 50, 8, torch.float32, seed=4)
    wide = torch.rand(2 * 97, generator=torch.Generator().manual_seed(1)) > 0.4
    valid = wide.to(DEVICE)[::2]
    assert not valid.is_contiguous()
    idx, dist, counts = vq_search(x, e, valid=valid, return_counts=True)
    ridx, rdist, rcounts = vq_search(x, e, valid=valid.contiguous(), return_counts=True)
    assert torch.equal(idx, ridx) and torch.equal(counts, rcounts)
    torch.testing.assert_close(dist, rdist)
    ref, _, _ = vq_search_ref(x, e, valid=valid)
    assert torch.equal(idx.cpu(), ref.cpu())


def test_launches_run_under_the_inputs_device_guard(monkeypatch):
    """Every Triton launch of vq_search happens inside ``device_guard(x.device)`` (Triton launches on the current
    CUDA device: tensors on cuda:1 with cuda:0 current need the guard), and the guard picks the tensors' CUDA
    device."""
    import contextlib
    import importlib

    from mimfast.kernels import _common

    vs = importlib.import_module("mimfast.kernels.vq_search")  # the module (the package exports the function)

    g = _common.device_guard(torch.device("cuda", 1))
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    assert isinstance(_common.device_guard(torch.device("cpu")), contextlib.nullcontext)
    state = {"depth": 0, "devices": [], "launches": 0}

    @contextlib.contextmanager
    def recording_guard(device):
        state["devices"].append(torch.device(device))
        state["depth"] += 1
        try:
            yield
        finally:
            state["depth"] -= 1

    monkeypatch.setattr(vs, "device_guard", recording_guard)
    for name in ("_vq_code_stats_kernel", "_vq_search_tuned", "_vq_merge_kernel"):
        kernel = getattr(vs, name)

        class Guarded:
            def __init__(self, k):
                self.k = k

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    assert state["depth"] > 0, "a kernel launched outside the device guard"
                    state["launches"] += 1
                    return self.k[grid](*args, **kwargs)

                return launch

        monkeypatch.setattr(vs, name, Guarded(kernel))
    x, e = make(6, 3000, 8, torch.float32)  # split-K: stats, search and merge launches
    vq_search(x, e, return_counts=True)
    assert state["launches"] == 3 and set(state["devices"]) == {x.device}

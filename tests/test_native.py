"""The native C++ CPU kernels (csrc/, torch.ops.mimfast_native.*) against the plain-torch references.

The suite runs with TRITON_INTERPRET=1 (conftest), where the public ops' CPU kernels take the Triton interpreter, so
these tests call the native ops directly, plus the public ops with the interpreter switched off for the dispatch and
gradient checks. They skip (with the reason) when the library is not built; the build-disabled path
(MIMFAST_NATIVE=0) is tested in a subprocess that always runs.

Exactness: on small-integer data every fp32 product, sum, square root and division of the search is exact or
correctly rounded in the same order as the reference, so indices, counts and distances must be bit-identical
(including every tie, which such data is full of). On Gaussian data the GEMM's summation order differs from the
reference's BLAS call, so indices must agree wherever the two best codes are separated by more than rounding.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import AWKWARD, KERNEL_DTYPES, shape_id, tol
from mimfast.kernels import _native
from mimfast.kernels.gumbel_softmax import _gumbel_bwd_ref_impl, _gumbel_ref_impl, gumbel_noise_ref
from mimfast.kernels.token_gather import (
    _gather_tokens_ref_impl,
    _restore_tokens_bwd_ref_impl,
    _restore_tokens_ref_impl,
    gather_tokens_ref,
    restore_tokens_ref,
)
from mimfast.kernels.vq_search import _vq_search_ref_impl

ROOT = Path(__file__).resolve().parents[1]
native = pytest.mark.skipif(not _native.available(), reason=f"native CPU kernels not loaded: {_native.info()}")
NAT = torch.ops.mimfast_native if _native.available() else None
EPS = 1e-12


# ------------------------------------------------------------------------------------------- always: disabled
def test_disabled_path_runs_the_references():
    """MIMFAST_NATIVE=0: nothing is loaded, the public CPU ops give exactly the references' results, info says so."""
    code = """
import torch
from mimfast.kernels import _native, vq_search
from mimfast.kernels.vq_search import _vq_search_ref_impl
x, e = torch.randn(300, 40), torch.randn(500, 40)
got = torch.ops.mimfast.vq_search(x, e, None, False, False, True, 1e-12, "fp32")
ref = _vq_search_ref_impl(x, e, None, False, False, True, 1e-12, "fp32")
assert all(torch.equal(a, b) for a, b in zip(got, ref))
assert not _native.available() and not hasattr(torch.ops.mimfast_native, "vq_search")
print(_native.describe())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MIMFAST_POISON_OUTPUTS")}
    env["MIMFAST_NATIVE"] = "0"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "disabled (MIMFAST_NATIVE=0)" in r.stdout and "CPU tensors: PyTorch references" in r.stdout


def test_build_is_best_effort_without_cmake(tmp_path):
    """The install-time build never fails: without CMake it prints a one-line notice and exits 0."""
    env = dict(os.environ, PATH=str(tmp_path))  # no cmake, no compiler
    r = subprocess.run([sys.executable, str(ROOT / "kernels" / "_native.py"), "build", "--best-effort", "--out",
                        str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "not built (CMake is not on PATH)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / _native.LIB_NAME).exists()


# ------------------------------------------------------------------------------------------- codebook search
def ints(shape, seed, lo=-3, hi=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).to(dtype)


def vq_both(x, e, valid=None, cosine=False, int32=False, counts=True, precision="fp32"):
    args = (x, e, valid, cosine, int32, counts, EPS, precision)
    return NAT.vq_search(*args), _vq_search_ref_impl(*args)


def assert_equal(got, ref):
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a[~a.isnan()], b[~b.isnan()])), (a, b)  # fmt: skip


SHAPES = [(n, k, d) for n in AWKWARD["N"] for k in AWKWARD["K"] for d in AWKWARD["D"]]


@native
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_vq_exact_on_integer_data(shape):
    """Every awkward shape: indices, counts and distances bit-identical to the reference (l2 and cosine)."""
    n, k, d = shape
    x, e = ints((n, d), n + d), ints((k, d), k * 7 + d)
    for cosine in (False, True):
        assert_equal(*vq_both(x, e, cosine=cosine))


@native
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_vq_exact_dtypes_strides_valid_int32(dtype):
    """bf16 / fp16 / mixed inputs (fp32 accumulation), non-contiguous views, valid rows, int32 indices, product
    precisions: exactly the reference."""
    x, e = ints((1025, 40), 1, dtype=dtype), ints((1000, 40), 2, dtype=dtype)
    valid = torch.arange(1025) % 3 != 0
    xt = ints((40, 2050), 3, dtype=dtype).T[::2]  # transposed and strided
    et = e.T.contiguous().T  # column-major codebook
    for args in ((x, e), (xt, et), (x, e.float())):
        for cosine in (False, True):
            assert_equal(*vq_both(*args, valid=valid[: args[0].shape[0]], cosine=cosine, int32=True))
    # product precisions on integers that bf16 / fp16 must round (to integers: the products stay exact)
    xb, eb = ints((1025, 40), 5, -300, 301), ints((1000, 40), 6, -300, 301)
    xh, eh = ints((1025, 1), 7, -3000, 3001), ints((1000, 1), 8, -3000, 3001)
    for precision, (xp, ep) in (("bf16", (xb, eb)), ("fp16", (xh, eh)), ("tf32", (xb, eb))):
        if precision != "tf32":
            assert not torch.equal(xp, xp.to(torch.bfloat16 if precision == "bf16" else torch.float16).float())
        for cosine in (False, True):
            assert_equal(*vq_both(xp.to(dtype), ep, cosine=cosine, precision=precision))


@native
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
@pytest.mark.parametrize("shape", [(1025, 8193, 40), (97, 1000, 257), (1025, 1000, 3)], ids=shape_id)
def test_vq_gaussian_matches_reference(shape, cosine):
    """Real-valued data: identical indices where the margin is clear, near-ties within rounding, distances within
    the fp32 tolerance."""
    n, k, d = shape
    g = torch.Generator().manual_seed(n + k + d)
    x, e = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    (ni, nd, nc), (ri, rd, _) = vq_both(x, e, cosine=cosine)
    xd, ed = x.double(), e.double()
    if cosine:
        xd, ed = xd / xd.norm(dim=1, keepdim=True), ed / ed.norm(dim=1, keepdim=True)
    s = (ed * ed).sum(1)[None] - 2 * xd @ ed.T
    top = s.topk(min(2, k), dim=1, largest=False).values
    scale = (xd * xd).sum(1) + (ed * ed).sum(1).max()
    slack = 1e-5 * scale
    clear = (top[:, 1] - top[:, 0] > slack) if k > 1 else torch.ones(n, dtype=torch.bool)
    assert torch.equal(ni[clear], ri[clear])
    assert (s.gather(1, ni[:, None])[:, 0] - top[:, 0] <= slack).all()
    torch.testing.assert_close(nd, rd, rtol=1e-5, atol=1e-5 * float(scale.max()))
    assert torch.equal(nc.long(), torch.bincount(ni, minlength=k))


@native
def test_vq_ties_and_non_finite_rules():
    e = ints((300, 16), 4)
    e[4], e[130], e[299] = e[3], e[5], e[5]  # duplicates: the lowest index wins
    e[7, 0], e[8, 2], e[9, 1] = float("nan"), float("-inf"), float("inf")  # never chosen
    e[10] = 2.0**70  # ||e||^2 >= 2^125: non-finite for l2
    x = torch.cat([e[[4, 130, 299, 5, 7, 8]], torch.zeros(1, 16), ints((50, 16), 5)])
    x[5] = e[0]
    x[10, 3], x[11, 0], x[12, 0] = float("nan"), float("inf"), -float("inf")
    x[13] = 2.0**70  # a row at the norm limit: index -1 / NaN for l2; cosine scores it (finite norm is fine)
    valid = torch.ones(x.shape[0], dtype=torch.bool)
    valid[20] = False
    for cosine in (False, True):
        (ni, nd, nc), ref = vq_both(x, e, valid=valid, cosine=cosine)
        assert_equal((ni, nd, nc), ref)
        assert ni[:4].tolist() == [3, 5, 5, 5] and ni[[10, 11, 12]].tolist() == [-1, -1, -1]
        assert not torch.isin(ni, torch.tensor([7, 8, 9] + ([] if cosine else [10]))).any()
        assert ni[20] == -1 and nd[20] == 0 and nd[[10, 11, 12]].isnan().all()
    e_bad = torch.full((3, 4), float("nan"))
    (ni, nd, _), ref = vq_both(torch.ones(5, 4), e_bad)
    assert_equal((ni, nd, _), ref) and (ni == -1).all()


@native
def test_vq_fp16_overflow_and_empty():
    g = torch.Generator().manual_seed(5)
    e = ((torch.rand(300, 64, generator=g) * 2 - 1) * 60000).round()
    x = e[torch.randint(0, 300, (97,), generator=g)]
    assert_equal(*vq_both(x.half(), e.half()))
    assert_equal(*vq_both(torch.empty(0, 5), torch.ones(3, 5)))


@native
def test_vq_isas_agree():
    """Every compiled ISA variant (baseline, AVX2, AVX-512) gives the same search results and Gumbel indices (the
    noise is the same bits); the softmax row sums are accumulated per vector lane, so y agrees to rounding."""
    x, e, logits = torch.randn(333, 40), torch.randn(1000, 40), torch.randn(37, 1001)
    outs = []
    try:
        for isa in ("base", "avx2", "avx512"):
            try:
                NAT.set_isa(isa)
            except RuntimeError:
                continue  # not built for this machine / not supported by this CPU
            outs.append(NAT.vq_search(x, e, None, True, False, True, EPS, "fp32"))
            outs[-1] += NAT.gumbel_softmax(logits, None, torch.tensor([3, 5]), 0.7, False, True, True)
    finally:
        NAT.set_isa("")
    for o in outs[1:]:  # search results, noise-driven indices: same bits; softmax sums: vector-width order
        exact, close = (0, 1, 2, 4, 6), (3, 5)  # vq (idx, dist, counts), Gumbel (y, idx, lse, best)
        assert_equal([o[i] for i in exact], [outs[0][i] for i in exact])
        for i in close:
            torch.testing.assert_close(o[i], outs[0][i], rtol=5e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- Gumbel-softmax
def philox(seed=1234567890123, offset=42):
    return torch.tensor([seed, offset], dtype=torch.int64)


def clear_rows(s64, rel=1e-5):
    if s64.shape[1] == 1:
        return torch.ones(s64.shape[0], dtype=torch.bool)
    top = s64.topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]) > rel * (1 + top.abs().amax(dim=1))


GUMBEL_CASES = [(s, torch.float32) for s in [(1, 1), (97, 3), (1025, 1000), (3, 8193)]] + [
    (s, dt) for dt in (torch.bfloat16, torch.float16) for s in [(97, 1000), (3, 8193)]
]  # the reference's int64 Philox is slow: the large shape once


@native
@pytest.mark.parametrize("shape,dtype", GUMBEL_CASES, ids=str)
def test_gumbel_forward_backward_match_reference(shape, dtype):
    n, k = shape
    g = torch.Generator().manual_seed(n * k)
    logits = (torch.randn(n, k, generator=g) * 2).to(dtype)
    rows = torch.arange(n) % 4 != 1
    ph = philox(7, 11)
    for tau, hard, sample_rows in ((1.0, False, None), (0.5, True, rows), (2.0, False, rows)):
        args = (logits, sample_rows, ph, tau, hard, True, True)
        y, idx, lse, best = NAT.gumbel_softmax(*args)
        ry, ridx, rlse, rbest = _gumbel_ref_impl(*args)
        noise = gumbel_noise_ref(ph, n, k).double()
        if sample_rows is not None:
            noise = torch.where(sample_rows[:, None], noise, torch.zeros_like(noise))
        clear = clear_rows((logits.double() + noise) / tau)
        assert torch.equal(idx[clear], ridx[clear]) and torch.equal(best, rbest)
        assert y.dtype == dtype and y.shape == (n, k)
        t = dict(rtol=max(tol(dtype)["rtol"], 2e-5), atol=max(tol(dtype)["atol"], 2e-6))
        torch.testing.assert_close(y[clear].float(), ry[clear].float(), **t)
        torch.testing.assert_close(lse[clear], rlse[clear], rtol=2e-5, atol=2e-5)
        grad = torch.randn(n, k, generator=g).to(dtype)
        dl = NAT.gumbel_softmax_bwd(grad, logits, sample_rows, ph, lse, tau)
        rdl = _gumbel_bwd_ref_impl(grad, logits, sample_rows, ph, rlse, tau)
        assert dl.dtype == dtype
        torch.testing.assert_close(dl.float(), rdl.float(), rtol=t["rtol"], atol=t["atol"] / tau * 4)
    y, idx, lse, best = NAT.gumbel_softmax(logits, None, ph, 1.0, False, False, False)
    assert y.shape == (0, k) and lse.shape == (0,) and best.shape == (0,) and idx.shape == (n,)


@native
def test_gumbel_noise_is_the_reference_philox():
    """Zero logits: log y recovers the noise; it equals gumbel_noise_ref (same Philox counters) to the logs' last
    bits, and the hard indices are identical."""
    n, k = 97, 1000
    ph = philox(5, 123)
    y, idx, _, _ = NAT.gumbel_softmax(torch.zeros(n, k), None, ph, 1.0, False, True, False)
    g = gumbel_noise_ref(ph, n, k).double()
    logy = torch.log(y.double())
    torch.testing.assert_close(logy - logy.mean(1, keepdim=True), g - g.mean(1, keepdim=True), rtol=0, atol=2e-5)
    assert torch.equal(idx, g.argmax(dim=1))


@native
def test_gumbel_reproducible_and_distributed():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(40000, 4).contiguous()
    a = NAT.gumbel_softmax(logits, None, philox(9, 0), 1.0, True, True, False)
    b = NAT.gumbel_softmax(logits, None, philox(9, 0), 1.0, True, True, False)
    c = NAT.gumbel_softmax(logits, None, philox(9, 40000), 1.0, True, True, False)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True)) and not torch.equal(a[1], c[1])
    freq = torch.bincount(a[1], minlength=4).double() / 40000
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / 40000).sqrt()).all(), freq  # 5 standard errors
    assert torch.equal(a[0], torch.nn.functional.one_hot(a[1], 4).float())


@native
def test_gumbel_non_finite_rows():
    logits = torch.randn(6, 9)
    logits[0, 3] = float("nan")
    logits[1, 2] = float("inf")
    logits[2] = float("-inf")
    logits[3, :4] = float("-inf")  # fine: those codes are never chosen
    logits[4, 0] = 3e38  # (l + g) / tau overflows
    for hard in (False, True):
        args = (logits, None, philox(), 0.5, hard, True, True)
        y, idx, lse, best = NAT.gumbel_softmax(*args)
        ry, ridx, rlse, rbest = _gumbel_ref_impl(*args)
        assert torch.equal(idx, ridx) and torch.equal(best, rbest)
        assert idx[:3].tolist() == [-1, -1, -1] and idx[4] == -1 and idx[3] >= 4
        assert y[[0, 1, 2, 4]].isnan().all() and lse[[0, 1, 2, 4]].isnan().all() and (y[3, :4] == 0).all()
        torch.testing.assert_close(y, ry, equal_nan=True, rtol=2e-5, atol=2e-6)
    dl = NAT.gumbel_softmax_bwd(torch.ones(6, 9), logits, None, philox(), lse, 0.5)
    assert dl[[0, 1, 2, 4]].isnan().all() and torch.isfinite(dl[[3, 5]]).all()


# ------------------------------------------------------------------------------------------- token gather
def mae_masks(b, seq, lk, seed=0):
    g = torch.Generator().manual_seed(seed)
    shuffle = torch.rand(b, seq, generator=g).argsort(dim=1)
    return shuffle[:, :lk], shuffle.argsort(dim=1)


@native
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 13, 4, 40), (3, 196, 49, 257), (2, 97, 0, 5)], ids=shape_id)
def test_tokens_exact(shape):
    """gather / restore / restore's backward: bit-identical to the references (fp32 adds, then the output dtype)."""
    b, seq, lk, d = shape
    keep, restore = mae_masks(b, seq, lk, seq)
    g = torch.Generator().manual_seed(d)
    for xdt, pdt in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)):
        x = torch.randn(b, seq, d, generator=g).to(xdt)
        pos = torch.randn(seq + 1, d, generator=g).to(pdt)
        out = str(torch.promote_types(xdt, pdt))[6:]
        dt = getattr(torch, out)
        for prefix in (None, torch.randn(1, d, generator=g), torch.randn(b, 2, d, generator=g).to(xdt)):
            args = (x, keep.int(), restore, pos[1:], prefix)
            assert torch.equal(NAT.gather_tokens(*args, out), _gather_tokens_ref_impl(*args[:2], *args[3:], dt))
        xs = torch.randn(b, 1 + lk, 2 * d, generator=g).to(xdt)[..., ::2]  # strided
        for fill in (None, torch.randn(d, generator=g), torch.randn(b, d, generator=g).to(xdt)):
            got = NAT.restore_tokens(xs, restore, fill, pos, 1, True, out)
            assert torch.equal(got, _restore_tokens_ref_impl(xs, restore, fill, pos, 1, dt))
        grad = torch.randn(b, 1 + seq, d, generator=g).to(dt)
        gx, gf = NAT.restore_tokens_bwd(grad, restore, 1 + lk, 1, str(xdt)[6:], True, True)
        rgx, rgf = _restore_tokens_bwd_ref_impl(grad, restore, 1 + lk, 1, xdt, True)
        assert torch.equal(gx, rgx)
        torch.testing.assert_close(gf, rgf, rtol=1e-5, atol=1e-5)


@native
def test_tokens_bad_index_raises():
    x = torch.randn(2, 5, 3)
    with pytest.raises(IndexError, match="ids_keep"):
        NAT.gather_tokens(x, torch.tensor([[0, 5], [1, 2]]), torch.zeros(2, 5, dtype=torch.long), None, None,
                          "float32")  # fmt: skip
    with pytest.raises(IndexError, match="ids_restore"):
        NAT.restore_tokens(x, torch.tensor([[0, -1, 2, 3, 4]] * 2), None, None, 0, True, "float32")


# ------------------------------------------------------------------------------------------- dispatch, autograd
@pytest.fixture
def no_interpreter(monkeypatch):
    """The public ops' CPU kernels as outside the test-suite: native first (TRITON_INTERPRET off)."""
    for name in ("vq_search", "gumbel_softmax", "token_gather"):
        monkeypatch.setattr(importlib.import_module(f"mimfast.kernels.{name}"), "interpret_mode", lambda: False)
    calls = []
    real = _native.op

    def spy(name, *tensors, dtypes=()):
        fn = real(name, *tensors, dtypes=dtypes)
        calls.append((name, fn is not None))
        return fn

    monkeypatch.setattr(_native, "op", spy)
    return calls


@native
def test_public_ops_dispatch_to_native_and_gradients_match(no_interpreter):
    from mimfast.kernels import gumbel_softmax, vq_search
    from mimfast.ops.tokens import gather_tokens, restore_tokens

    x, e = ints((97, 40), 1), ints((1000, 40), 2)
    assert_equal(vq_search(x, e, return_counts=True), vq_search(x.double(), e.double(), return_counts=True)[:1]
                 + vq_search(x, e, return_counts=True)[1:])  # fmt: skip
    assert ("vq_search", True) in no_interpreter
    assert_equal(vq_search(x, e)[:2], _vq_search_ref_impl(x, e, None, False, False, False, EPS, "fp32")[:2])

    logits = torch.randn(33, 70, requires_grad=True)
    y, _, _ = gumbel_softmax(logits, philox(), 0.7)
    w = torch.randn(33, 70)
    (y * w).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()
    from mimfast.kernels.gumbel_softmax import gumbel_softmax_ref

    ry, _, _ = gumbel_softmax_ref(ref_logits, philox(), 0.7)
    (ry * w).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=2e-5, atol=2e-6)
    assert ("gumbel_softmax", True) in no_interpreter and ("gumbel_softmax_bwd", True) in no_interpreter

    keep, restore = mae_masks(2, 13, 4, 3)
    xt = torch.randn(2, 13, 8, requires_grad=True)
    pos = torch.randn(13, 8, requires_grad=True)
    fill = torch.randn(8, requires_grad=True)
    out = restore_tokens(gather_tokens(xt, keep, pos=pos, ids_restore=restore), restore, fill)
    ref = restore_tokens_ref(gather_tokens_ref(xt, keep, pos=pos), restore, fill)
    assert torch.equal(out, ref)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (xt, pos, fill))
    rgrads = torch.autograd.grad((ref * w).sum(), (xt, pos, fill))
    for a, b in zip(grads, rgrads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert ("gather_tokens", True) in no_interpreter and ("restore_tokens_bwd", True) in no_interpreter
    # float64 keeps the reference
    vq_search(x.double(), e.double())
    assert no_interpreter[-1] == ("vq_search", False)

"""mimfast::gumbel_softmax — the fused Triton kernel (interpreter on CPU, GPU unchanged) against its plain-torch
reference, F.gumbel_softmax's math fed the same noise, Triton's own Philox, and statistics."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import mimfast
from conftest import AWKWARD, DEVICE, KERNEL_DTYPES, awkward_sweep, shape_id, tol
from mimfast.kernels import _common
from mimfast.kernels._common import poison_outputs, use_triton
from mimfast.kernels.gumbel_softmax import (
    exponential_noise_ref,
    gumbel_noise_ref,
    gumbel_softmax,
    gumbel_softmax_ref,
    philox4x32_ref,
    uniform_ref,
)
from mimfast.ops.gumbel import draw_philox

gs_mod = importlib.import_module("mimfast.kernels.gumbel_softmax")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (interpreter) on masked lanes

SWEEP = awkward_sweep({"N": AWKWARD["N"], "K": AWKWARD["K"]}, budget=1.2e5)
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def philox(seed=1234567890123, offset=42):
    return torch.tensor([seed, offset], dtype=torch.int64, device=DEVICE)


def make(n, k, dtype=torch.float32, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * scale).to(dtype).to(DEVICE)


def scores64(logits, ph, tau, rows=None):
    """float64 scores (l + g) / tau of the reference's noise (same fp32 g the kernel recomputes)."""
    g = gumbel_noise_ref(ph, logits.shape[0], logits.shape[1]).double().to(logits.device)
    if rows is not None:
        g = torch.where(rows[:, None], g, torch.zeros_like(g))
    return (logits.double() + g) / tau


def clear_rows(s64, rel=1e-5):
    """Rows whose top-2 score gap exceeds the noise's rounding (the two logs' last bits) by a wide margin."""
    if s64.shape[1] == 1:
        return torch.ones(s64.shape[0], dtype=torch.bool, device=s64.device)
    top = s64.topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]) > rel * (1 + top.abs().amax(dim=1))


def assert_soft_close(y, s64, stat_dtype=torch.float32):
    """y against softmax(s64) in float64: relative error of exp(s - lse) grows with |s| (fp32 statistics), plus
    the output dtype's rounding."""
    y64 = torch.softmax(s64, dim=1)
    smax = torch.where(torch.isfinite(s64), s64.abs(), torch.zeros_like(s64)).amax(dim=1, keepdim=True)
    allowed = y64 * (16 * EPS[stat_dtype] * (2 + smax)) + tol(y.dtype)["rtol"] * y64 + tol(y.dtype)["atol"]
    err = (y.double() - y64).abs()
    assert (err <= allowed).all(), f"max error {err.max():.3e}, worst ratio {(err / allowed).max():.2f}"


# ------------------------------------------------------------------------------------------------- the noise
def test_kernel_path_is_exercised():
    assert use_triton(make(2, 3)), "tests must run the Triton kernel (TRITON_INTERPRET=1 on CPU)"
    assert poison_outputs(), "conftest must poison kernel outputs (MIMFAST_POISON_OUTPUTS=1)"


def test_reference_philox_is_tritons():
    """philox4x32_ref / uniform_ref reproduce triton.language.randint4x / rand bit for bit (int64 counters whose
    high half is non-zero, a negative seed, and the four lanes)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(ph_ptr, bits_ptr, u_ptr, BLOCK: tl.constexpr):
        seed = tl.load(ph_ptr)
        cnt = tl.load(ph_ptr + 1) + tl.arange(0, BLOCK).to(tl.int64)
        r0, r1, r2, r3 = tl.randint4x(seed, cnt)
        q = tl.arange(0, BLOCK) * 4
        tl.store(bits_ptr + q, r0.to(tl.int32, bitcast=True))
        tl.store(bits_ptr + q + 1, r1.to(tl.int32, bitcast=True))
        tl.store(bits_ptr + q + 2, r2.to(tl.int32, bitcast=True))
        tl.store(bits_ptr + q + 3, r3.to(tl.int32, bitcast=True))
        tl.store(u_ptr + tl.arange(0, BLOCK), tl.rand(seed, cnt))

    for seed, off in ((0, 0), (-7046029254386353131, 2**33 + 5), (2**62 - 1, 2**40 - 3)):
        ph = torch.tensor([seed, off], dtype=torch.int64, device=DEVICE)
        bits = torch.empty(256, dtype=torch.int32, device=DEVICE)
        u = torch.empty(64, dtype=torch.float32, device=DEVICE)
        _probe[(1,)](ph, bits, u, BLOCK=64)
        cnt = off + torch.arange(64, dtype=torch.int64)
        ref = torch.stack(philox4x32_ref(seed, cnt), dim=-1).reshape(-1)
        assert torch.equal(bits.cpu().long() & 0xFFFFFFFF, ref)
        assert torch.equal(u.cpu(), uniform_ref(philox4x32_ref(seed, cnt)[0]))
        assert (u >= 0).all() and (u < 1).all()


def test_noise_definition():
    """gumbel_noise_ref is -log(E), E = max(-log(max(u, 2^-32)), 2^-26): finite and inside [-3.11, 18.03]."""
    ph = philox(99, 7)
    e = exponential_noise_ref(ph, 64, 1000)
    g = gumbel_noise_ref(ph, 64, 1000)
    assert torch.equal(g, -torch.log(e))
    assert torch.isfinite(g).all() and g.min() >= -math.log(32 * math.log(2)) - 1e-6 and g.max() <= 26 * math.log(2)
    # extreme bits map inside the clamps: u = 0 (bits 0 and 2^32 - 1) and the largest u < 1
    u = uniform_ref(torch.tensor([0, 2**32 - 1, 2**31 - 1, 2**31]))
    assert u[0] == 0 and u[1] == 0 and u[2] < 1 and u[3] < 1
    # moments of Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6 (64000 draws: 5 standard errors)
    gd = g.double().reshape(-1)
    se = math.sqrt(math.pi**2 / 6 / gd.numel())
    assert abs(gd.mean().item() - 0.5772156649) < 5 * se
    assert abs(gd.var().item() - math.pi**2 / 6) < 5 * math.sqrt(2.4 / gd.numel()) * math.pi**2 / 6


def test_kernel_noise_matches_reference():
    """Zero logits: the kernel's soft sample is softmax(g), so log y + lse recovers its g; it equals the reference's
    g to the last bits of the logs, and the hard indices are identical."""
    n, k = 97, 1000
    ph = philox(5, 123)
    zero = torch.zeros(n, k, device=DEVICE)
    y, idx, _ = gumbel_softmax(zero, ph, 1.0)
    g = gumbel_noise_ref(ph, n, k).to(DEVICE)
    logy = torch.log(y.double())
    recovered = logy - logy.mean(dim=1, keepdim=True)
    expect = g.double() - g.double().mean(dim=1, keepdim=True)
    torch.testing.assert_close(recovered, expect, rtol=0, atol=2e-5)
    assert torch.equal(idx, g.argmax(dim=1))


def test_counter_layout():
    """counter(n, k) = offset + n * ceil(K / 4) + k // 4: advancing the offset by ceil(K / 4) shifts the rows, in the
    kernel and in the reference; different seeds and offsets give different samples."""
    n, k = 33, 10
    logits = make(n, k)
    base = philox(11, 1000)
    shifted = philox(11, 1000 + math.ceil(k / 4))
    y0, i0, _ = gumbel_softmax(logits, base, 0.5)
    y1, i1, _ = gumbel_softmax(logits.roll(-1, 0), shifted, 0.5)  # row n: logits[n + 1], base's noise of row n + 1
    assert torch.equal(y0[1:], y1[:-1]) and torch.equal(i0[1:], i1[:-1])
    assert torch.equal(gumbel_noise_ref(base, range(1, n), k), gumbel_noise_ref(shifted, n - 1, k))
    y2, _, _ = gumbel_softmax(logits, philox(12, 1000), 0.5)
    y3, _, _ = gumbel_softmax(logits, philox(11, 1001), 0.5)
    y4, _, _ = gumbel_softmax(logits, base, 0.5)
    assert not torch.equal(y2, y4) and not torch.equal(y3, y4)
    assert not torch.equal(y4, gumbel_softmax(logits, base, 0.5)[0].roll(1, 0))  # rows are not repeats


# -------------------------------------------------------------------------------------------- kernel vs ref
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SWEEP, ids=shape_id)
def test_sweep_matches_reference(shape, dtype):
    """Indices identical to the reference (where the top-2 gap is clear), soft sample within the statistics'
    rounding, gradient of the logits close to the float64 reference's, best match = argmax of the logits."""
    n, k = shape
    logits = make(n, k, dtype, seed=n * 7 + k).requires_grad_(True)
    ph, tau = philox(n, k), 0.7
    y, idx, best = gumbel_softmax(logits, ph, tau, with_best=True)
    yh, idx_h, _ = gumbel_softmax(logits, ph, tau, hard=True)
    assert y.dtype == dtype and y.shape == (n, k) and idx.dtype == torch.int64
    ridx = gumbel_softmax_ref(logits.detach(), ph, tau)[1]
    s64 = scores64(logits.detach(), ph, tau)
    clear = clear_rows(s64)
    assert clear.float().mean() > 0.95
    assert torch.equal(idx[clear], ridx[clear]) and torch.equal(idx_h, idx)
    assert torch.equal(best, logits.detach().float().argmax(dim=1))
    assert_soft_close(y.detach(), s64)
    assert torch.equal(yh.detach(), F.one_hot(idx, k).to(dtype))
    # backward: the same for soft and hard (straight-through), against autograd through the float64 reference
    w = make(n, k, torch.float32, seed=3).to(dtype)
    (g_soft,) = torch.autograd.grad((y * w).sum(), logits)
    (g_hard,) = torch.autograd.grad((yh * w).sum(), logits)
    assert torch.equal(g_soft, g_hard)
    l64 = logits.detach().double().requires_grad_(True)
    y64 = torch.softmax((l64 + gumbel_noise_ref(ph, n, k).double().to(DEVICE)) / tau, dim=1)
    (g64,) = torch.autograd.grad((y64 * w.double()).sum(), l64)
    err = (g_soft.double() - g64).abs().max()
    scale = g64.abs().max() + 1e-30
    assert err <= 1e-4 * scale + (tol(dtype)["rtol"] * 2 * scale if dtype != torch.float32 else 0), (err, scale)


@pytest.mark.parametrize("shape,dtype", [((1025, 1000), torch.float32), ((97, 8193), torch.bfloat16)], ids=str)
def test_large_shapes(shape, dtype):
    n, k = shape
    logits = make(n, k, dtype, seed=2)
    ph = philox(3, 2**35)
    y, idx, _ = gumbel_softmax(logits, ph, 1.3)
    s64 = scores64(logits, ph, 1.3)
    clear = clear_rows(s64)
    assert torch.equal(idx[clear], s64.argmax(dim=1)[clear])
    assert_soft_close(y, s64)


def test_tiled_path_matches_single_tile(monkeypatch):
    """Rows longer than one tile (online max / sum over tiles, a second pass for y, a two-pass backward) give the
    same indices and, to fp32 rounding, the same sample and gradient as the single-tile path."""
    n, k = 37, 1000
    logits = make(n, k, seed=5)
    logits[3] = 0.0  # exact ties across every tile: the lowest index must win
    logits[4, 900] = logits[4, 100] = 50.0  # a tie between two tiles
    logits.requires_grad_(True)
    rows = torch.rand(n, generator=torch.Generator().manual_seed(1)).to(DEVICE) < 0.5
    rows[3] = rows[4] = False
    ph, w = philox(8, 9), make(n, k, seed=6)
    outs = []
    for single_max in (8192, 256):
        monkeypatch.setattr(_common, "GUMBEL_MAX_SINGLE_K", single_max)
        monkeypatch.setattr(_common, "GUMBEL_INTERP_TILE_K", 128)
        monkeypatch.setattr(_common, "GUMBEL_TILE_K", 128)
        assert _common.gumbel_plan(n, k, _common.DEFAULT_TARGET)["SINGLE"] == (single_max == 8192)
        y, idx, best = gumbel_softmax(logits, ph, 0.8, sample_rows=rows, with_best=True)
        (g,) = torch.autograd.grad((y * w).sum(), logits)
        outs.append((y.detach(), idx, best, g))
    (y1, i1, b1, g1), (y2, i2, b2, g2) = outs
    assert torch.equal(i1, i2) and torch.equal(b1, b2)
    assert i2[3] == 0 and i2[4] == 100 and b2[3] == 0 and b2[4] == 100
    torch.testing.assert_close(y2, y1, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ F.gumbel_softmax, same noise
@pytest.mark.parametrize("hard", [False, True])
def test_drop_in_for_f_gumbel_softmax(monkeypatch, hard):
    """mimfast.gumbel_softmax against F.gumbel_softmax itself, its exponential_ draw replaced by the kernel's
    E: outputs, indices and gradients agree (leading shape, dim=1, bf16 too)."""
    for dtype in (torch.float32, torch.bfloat16):
        logits = make(6 * 7, 33, dtype, seed=4).reshape(6, 7, 33).movedim(2, 1).contiguous()  # (6, 33, 7), dim=1
        logits.requires_grad_(True)
        gen = torch.Generator(device=DEVICE).manual_seed(2024)
        ph = draw_philox(torch.Generator(device=DEVICE).manual_seed(2024), DEVICE)
        ours = mimfast.gumbel_softmax(logits, tau=0.6, hard=hard, dim=1, generator=gen)
        e = exponential_noise_ref(ph, 42, 33).to(DEVICE).reshape(6, 7, 33).movedim(2, 1)

        def fake_exponential(self, *args, e=e, **kwargs):
            return self.copy_(e.to(self.dtype))

        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "exponential_", fake_exponential)
            theirs = F.gumbel_softmax(logits, tau=0.6, hard=hard, dim=1)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        # F.gumbel_softmax keeps bf16 logits' noise and softmax in bf16: compare where that rounding cannot flip
        # the winner (fp32: where the fp32 rounding cannot)
        s64 = scores64(logits.detach().movedim(1, -1).reshape(42, 33), ph, 0.6)
        clear = clear_rows(s64, 1e-5 if dtype == torch.float32 else 0.05).reshape(6, 7)
        assert clear.float().mean() > 0.6
        assert torch.equal(ours.argmax(dim=1)[clear], theirs.argmax(dim=1)[clear])
        close = {"rtol": 2e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 8e-3}
        pick = clear[:, None, :].expand_as(ours)
        torch.testing.assert_close(ours[pick], theirs[pick], **close)
        w = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
        (ga,) = torch.autograd.grad((ours * w).sum(), logits)
        (gb,) = torch.autograd.grad((theirs * w).sum(), logits)
        scale = gb.abs().max().float()
        assert (ga.float() - gb.float()).abs().max() <= (2e-5 if dtype == torch.float32 else 3e-2) * scale


# ------------------------------------------------------------------------------------------------ gradients
def test_gradcheck_reference_and_op_fp64():
    """float64: the reference (plain autograd) and the op (its registered backward, on the reference CPU kernel)
    pass gradcheck on the soft sample, with and without per-row sampling."""
    logits = make(23, 9, torch.float64, seed=7).requires_grad_(True)
    rows = torch.arange(23, device=DEVICE) % 3 == 0
    ph = philox(1, 2)
    for r in (None, rows):
        assert torch.autograd.gradcheck(lambda x, r=r: gumbel_softmax_ref(x, ph, 0.7, sample_rows=r)[0], (logits,))
        assert torch.autograd.gradcheck(lambda x, r=r: gumbel_softmax(x, ph, 0.7, sample_rows=r)[0], (logits,))
    # hard: the straight-through gradient is the soft sample's gradient
    w = torch.randn(23, 9, dtype=torch.float64, device=DEVICE)
    gh = torch.autograd.grad((gumbel_softmax_ref(logits, ph, 0.7, hard=True)[0] * w).sum(), logits)[0]
    gs = torch.autograd.grad((gumbel_softmax_ref(logits, ph, 0.7)[0] * w).sum(), logits)[0]
    torch.testing.assert_close(gh, gs, rtol=1e-12, atol=1e-14)


def test_mixed_sample_rows():
    """sample_rows=False rows: index = argmax(logits) (lowest on ties), y = softmax(logits / tau) and its gradient;
    True rows: exactly the all-sampled call's rows (the noise of a row does not depend on the mask)."""
    n, k, tau = 64, 50, 0.5
    logits = make(n, k, seed=9)
    logits[4] = 0.0  # a tie over the whole row (an argmax row) -> code 0
    logits = logits.requires_grad_(True)
    rows = (torch.arange(n, device=DEVICE) % 4) == 1
    ph = philox(21, 0)
    y, idx, best = gumbel_softmax(logits, ph, tau, sample_rows=rows, with_best=True)
    y_all, idx_all, _ = gumbel_softmax(logits, ph, tau)
    plain = ~rows
    assert torch.equal(idx[plain], logits.detach().argmax(dim=1)[plain]) and idx[4] == 0
    assert torch.equal(best, logits.detach().argmax(dim=1)) and torch.equal(idx[plain], best[plain])
    assert torch.equal(y[rows], y_all[rows]) and torch.equal(idx[rows], idx_all[rows])
    assert (idx[rows] != best[rows]).any(), "sampled rows must sometimes leave the argmax"
    torch.testing.assert_close(y[plain], torch.softmax(logits[plain] / tau, dim=1), rtol=1e-5, atol=1e-7)
    w = make(n, k, seed=10)
    (g,) = torch.autograd.grad((y * w).sum(), logits)
    l2 = logits.detach().clone().requires_grad_(True)
    (g_plain,) = torch.autograd.grad((torch.softmax(l2 / tau, dim=1) * w).sum(), l2)
    torch.testing.assert_close(g[plain], g_plain[plain], rtol=1e-4, atol=1e-6)
    (g_all,) = torch.autograd.grad((y_all * w).sum(), logits)
    assert torch.equal(g[rows], g_all[rows])
    # Regularized VQ's straight-through path (hard, mixed rows): one-hot forward, the same gradient
    yh, idx_h, _ = gumbel_softmax(logits, ph, tau, hard=True, sample_rows=rows)
    assert torch.equal(idx_h, idx) and torch.equal(yh.detach(), F.one_hot(idx, k).float())
    assert torch.equal(torch.autograd.grad((yh * w).sum(), logits)[0], g)
    # no row sampled: no noise anywhere (the kernel skips it), identical to argmax / softmax(l / tau)
    y0, i0, _ = gumbel_softmax(logits, ph, tau, sample_rows=torch.zeros(n, dtype=torch.bool, device=DEVICE))
    assert torch.equal(i0, logits.detach().argmax(dim=1))


def test_neg_inf_logits_are_masked_codes():
    logits = make(20, 12, seed=3)
    logits[:, ::2] = float("-inf")
    y, idx, _ = gumbel_softmax(logits.requires_grad_(True), philox(), 1.0)
    assert (idx % 2 == 1).all() and (y[:, ::2] == 0).all() and torch.isfinite(y).all()
    (g,) = torch.autograd.grad((y * make(20, 12, seed=4)).sum(), logits)
    assert (g[:, ::2] == 0).all() and torch.isfinite(g).all()


# --------------------------------------------------------------------------------- seeds and determinism
def test_seeded_determinism_and_independence():
    logits = make(50, 30, seed=1).requires_grad_(True)
    w = make(50, 30, seed=2)

    def run(seed=None, gen=None):
        if seed is not None:
            torch.manual_seed(seed)
        y = mimfast.gumbel_softmax(logits, 0.9, hard=True, generator=gen)
        return y, torch.autograd.grad((y * w).sum(), logits)[0]

    a, b = run(seed=0), run(seed=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # torch.manual_seed reproduces a call
    c = run()
    assert not torch.equal(a[0], c[0])  # successive calls differ
    g1, g2 = torch.Generator(device=DEVICE).manual_seed(5), torch.Generator(device=DEVICE).manual_seed(5)
    d, e = run(gen=g1), run(gen=g2)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])
    f = run(gen=torch.Generator(device=DEVICE).manual_seed(6))
    assert not torch.equal(d[0], f[0])
    # two seeds give independent samples: agreement of the chosen codes is at chance level
    idx = [mimfast.gumbel_quantize(torch.zeros(4000, 8, device=DEVICE), generator=torch.Generator(
        device=DEVICE).manual_seed(s), indices_only=True)[1] for s in (1, 2)]  # fmt: skip
    agree = (idx[0] == idx[1]).float().mean().item()
    assert abs(agree - 1 / 8) < 5 * math.sqrt((1 / 8) * (7 / 8) / 4000)


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper chi-square quantile by the Wilson-Hilferty approximation (z = 3.719: one-sided 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("tau", [0.3, 1.0, 3.0])
def test_hard_samples_follow_softmax_of_logits(tau):
    """Frequencies of the hard samples of one logits row (20000 draws) match softmax(logits): chi-square test at
    significance 1e-4 (fixed seed, so deterministic). tau is applied after the noise, so it never changes which
    code wins: the indices are identical for every tau."""
    k, n = 10, 20000
    row = torch.linspace(-2.0, 1.5, k)
    logits = row.repeat(n, 1).to(DEVICE)
    ph = philox(77, 0)
    _, idx, _ = gumbel_softmax(logits, ph, tau, hard=True, write_y=False)
    _, idx1, _ = gumbel_softmax(logits, ph, 1.0, hard=True, write_y=False)
    assert torch.equal(idx, idx1)
    counts = torch.bincount(idx.cpu(), minlength=k).double()
    expected = torch.softmax(row.double(), 0) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < _chi2_critical(k - 1), (chi2, counts.tolist(), expected.tolist())
    # the soft sample does depend on tau: sharper below 1, flatter above
    if tau != 1.0:
        y, _, _ = gumbel_softmax(logits[:200], ph, tau)
        y1, _, _ = gumbel_softmax(logits[:200], ph, 1.0)
        assert bool(y.amax(1).mean() > y1.amax(1).mean()) == (tau < 1)


# --------------------------------------------------------------------------------- modes and op contract
def test_indices_only_writes_no_nxk_tensor(monkeypatch):
    n, k = 300, 500
    logits = make(n, k, seed=12)
    shapes = []
    real = gs_mod.new_output

    def recording(shape, dtype, device):
        shapes.append(tuple(shape) if isinstance(shape, (tuple, list)) else (shape,))
        return real(shape, dtype, device)

    monkeypatch.setattr(gs_mod, "new_output", recording)
    y, idx = mimfast.gumbel_quantize(logits, indices_only=True, generator=torch.Generator(DEVICE).manual_seed(0))
    assert y is None and idx.shape == (n,)
    assert shapes and all(math.prod(s) <= n for s in shapes), shapes
    _, full = mimfast.gumbel_quantize(logits, generator=torch.Generator(DEVICE).manual_seed(0))
    assert torch.equal(idx, full)
    assert any(math.prod(s) == n * k for s in shapes)  # the recorder does see the N x K output of the full call
    out = torch.ops.mimfast.gumbel_softmax(logits, None, philox(), 1.0, True, False, False)
    assert out[0].shape == (0, k) and out[2].shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak-memory check needs CUDA (CPU has no allocator stats)")
def test_indices_only_peak_memory_on_gpu():
    n, k = 65536, 8192
    logits = make(n, k, torch.bfloat16)
    mimfast.gumbel_quantize(logits, indices_only=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    mimfast.gumbel_quantize(logits, indices_only=True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 64 * n + (1 << 20)


def test_outputs_fully_written_under_poison():
    """Outputs start as NaN / -12345 (MIMFAST_POISON_OUTPUTS): every element must be written."""
    for n, k in ((1, 1), (97, 3), (130, 257)):
        logits = make(n, k, seed=n)
        rows = torch.arange(n, device=DEVICE) % 2 == 0
        for hard in (False, True):
            y, idx, best = gumbel_softmax(logits.requires_grad_(True), philox(), 0.5, hard=hard, sample_rows=rows,
                                          with_best=True)  # fmt: skip
            assert torch.isfinite(y).all() and (idx >= 0).all() and (best >= 0).all()
            (g,) = torch.autograd.grad(y.sum() + (y * y).sum(), logits)
            assert torch.isfinite(g).all()


def test_leading_shapes_and_dim():
    """Any leading shape and dim: the same as the last-dim call on the moved tensor, with the same noise."""
    x = make(4 * 5 * 6, 7, seed=13).reshape(4, 5, 6, 7)
    for dim in (0, 1, 2, -1, -3):
        moved = x.movedim(dim, -1)
        a = mimfast.gumbel_softmax(x, 0.5, dim=dim, generator=torch.Generator(DEVICE).manual_seed(3))
        b = mimfast.gumbel_softmax(moved.contiguous(), 0.5, generator=torch.Generator(DEVICE).manual_seed(3))
        assert a.shape == x.shape and torch.equal(a.movedim(dim, -1), b)
        y, idx = mimfast.gumbel_quantize(x, dim=dim, generator=torch.Generator(DEVICE).manual_seed(3))
        assert idx.shape == moved.shape[:-1] and torch.equal(idx, b.argmax(-1))
    empty = mimfast.gumbel_softmax(torch.zeros(0, 5, device=DEVICE))
    assert empty.shape == (0, 5)


def test_opcheck():
    logits = make(37, 19, seed=14)
    rows = torch.rand(37, generator=torch.Generator().manual_seed(2)).to(DEVICE) > 0.5
    ph = philox()
    for args in [
        (logits, None, ph, 0.7, True, True, False),
        (logits, rows, ph, 1.3, False, True, True),
        (logits, None, ph, 1.0, True, False, True),
        (logits[:, ::2], rows, ph, 2.0, False, True, False),
    ]:
        torch.library.opcheck(torch.ops.mimfast.gumbel_softmax.default, args)
    lse = torch.ops.mimfast.gumbel_softmax(logits, rows, ph, 0.7, False, True, False)[2]
    grad = make(19, 37, seed=15).T  # a non-contiguous gradient
    torch.library.opcheck(torch.ops.mimfast.gumbel_softmax_bwd.default, (grad, logits, rows, ph, lse, 0.7))


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        ({"tau": 0.0}, ValueError, r"tau: expected a finite temperature > 0"),
        ({"tau": -1.0}, ValueError, r"tau: expected a finite temperature > 0"),
        ({"tau": float("nan")}, ValueError, r"tau: expected a finite"),
        ({"tau": float("inf")}, ValueError, r"tau: expected a finite"),
        ({"tau": "1"}, TypeError, r"tau: expected a positive finite number"),
        ({"tau": True}, TypeError, r"tau: expected a positive finite number"),
        ({"dim": 2}, IndexError, r"dim: 2 is out of range"),
        ({"dim": 1.0}, TypeError, r"dim: expected an int"),
        ({"nan_policy": "zero"}, ValueError, r"nan_policy"),
        ({"generator": 3}, TypeError, r"generator: expected a torch.Generator"),
    ],
)
def test_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        mimfast.gumbel_softmax(make(4, 5), **kwargs)


def test_bad_tensors():
    with pytest.raises(TypeError, match=r"logits: expected a floating-point tensor"):
        mimfast.gumbel_softmax(torch.ones(4, 5, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match=r"logits: expected a torch.Tensor"):
        mimfast.gumbel_softmax([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"softmax dim \(dim=-1\) has size 0"):
        mimfast.gumbel_softmax(torch.zeros(3, 0, device=DEVICE))
    with pytest.raises(ValueError, match=r"0-d tensor"):
        mimfast.gumbel_softmax(torch.tensor(1.0, device=DEVICE))
    x = make(6, 5)
    with pytest.raises(ValueError, match=r"sample_rows: expected shape \(6,\)"):
        mimfast.gumbel_quantize(x, sample_rows=torch.ones(5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match=r"sample_rows: expected a bool tensor"):
        mimfast.gumbel_quantize(x, sample_rows=torch.ones(6, device=DEVICE))
    with pytest.raises(ValueError, match=r"philox: expected a \(2,\) int64"):
        gumbel_softmax(x, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"logits: expected a 2-D tensor"):
        gumbel_softmax(x[0], philox())


@pytest.mark.parametrize(
    "poison,reason",
    [(("nan", 2, 3), "logits contain NaN"), (("inf", 4, 0), r"logits contain \+inf"), (("-inf", 1, None), "every")],
)
def test_non_finite_rows(poison, reason):
    """Default: a clear error. nan_policy='propagate': NaN rows, index -1, other rows untouched, NaN gradient."""
    x = make(6, 5, seed=16)
    value, r, c = poison
    if c is None:
        x[r] = float(value)
    else:
        x[r, c] = float(value)
    with pytest.raises(ValueError, match=reason):
        mimfast.gumbel_softmax(x)
    with pytest.raises(ValueError, match=reason):
        mimfast.gumbel_quantize(x, indices_only=True)
    xr = x.clone().requires_grad_(True)
    y, idx = mimfast.gumbel_quantize(xr, hard=False, nan_policy="propagate", generator=torch.Generator(DEVICE))
    assert idx[r] == -1 and torch.isnan(y[r]).all()
    ok = torch.arange(6, device=DEVICE) != r
    assert (idx[ok] >= 0).all() and torch.isfinite(y[ok]).all()
    (g,) = torch.autograd.grad((y[ok] * 2).sum() + (y[r] * 0).nansum(), xr)
    assert torch.isfinite(g[ok]).all()


def test_overflowing_scores_are_flagged():
    x = torch.full((2, 3), 3e38, device=DEVICE)
    x[0] = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="overflowed fp32"):
        mimfast.gumbel_softmax(x, tau=0.01)

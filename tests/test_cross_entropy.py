"""mimfast::linear_cross_entropy — the chunked cuBLAS + Triton op (interpreter on CPU, GPU unchanged) against
F.linear + F.cross_entropy in float64 and in the same dtype, its gradients, the chunk plan and the error messages."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import mimfast
from conftest import AWKWARD, DEVICE, KERNEL_DTYPES, awkward_sweep, shape_id
from mimfast.kernels import _common
from mimfast.kernels._common import linear_cross_entropy_plan, poison_outputs, use_triton
from mimfast.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

lce_mod = importlib.import_module("mimfast.kernels.linear_cross_entropy")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (interpreter) on masked lanes

SWEEP = awkward_sweep({"M": AWKWARD["N"], "V": AWKWARD["K"]}, budget=1.2e5)
REDUCTIONS = ("mean", "sum", "none")
# floor of the comparison against float64, relative to the largest reference value (rounding of the inputs' dtype)
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def make(m, d, v, dtype=torch.float32, seed=0, bias=True, ignore_every=0, vocab=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(v, d, generator=g) / d**0.5 * 2).to(dtype).to(DEVICE)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).to(DEVICE) if bias else None
    t = torch.randint(0, vocab or v, (m,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return h, w, b, t.to(DEVICE)


def run(fn, h, w, b, t, grad_out=None, **kw):
    """Loss and gradients (hidden, weight, bias) of ``fn`` on leaf copies of the inputs."""
    h, w = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True) if b is not None else None
    loss = fn(h, w, t, b, **kw)
    if grad_out is None:
        grad_out = torch.ones_like(loss) * 1.3
    inputs = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, inputs, grad_out.to(loss.dtype))
    return loss.detach(), list(grads) + ([None] if b is None else [])


def assert_vs_reference(ours, same, ref64, dtype, slack=2.0, what=""):
    """max |ours - ref64| <= slack * max |torch in the same dtype - ref64| + FLOOR * max |ref64| (NaN positions
    agree; the loss's floor scale is at least 1: a loss of exactly 0 (V = 1) still carries the logits' rounding)."""
    assert ours.shape == ref64.shape, (what, ours.shape, ref64.shape)
    o, s, r = ours.double(), same.double(), ref64.double()
    nan = torch.isnan(r)
    assert torch.equal(torch.isnan(o), nan), (what, "NaN positions differ")
    o, s, r = o[~nan], s[~nan], r[~nan]
    if r.numel() == 0:
        return
    err = (o - r).abs().max().item()
    base = (s - r).abs().max().item()
    scale = r.abs().max().item() if what != "loss" else max(r.abs().max().item(), 1.0)  # losses are O(1) or 0
    allowed = slack * base + FLOOR[dtype] * scale + 1e-30
    assert err <= allowed, f"{what}: error {err:.3e} > allowed {allowed:.3e} (torch in {dtype}: {base:.3e})"


def check_case(m, d, v, dtype, reduction, eps=0.0, bias=True, ignore_every=0, vocab=None, seed=0, slack=2.0,
               grad_out=None):  # fmt: skip
    h, w, b, t = make(m, d, v, dtype, seed=seed, bias=bias, ignore_every=ignore_every, vocab=vocab)
    kw = dict(label_smoothing=eps, reduction=reduction, vocab_size=vocab)
    if grad_out is None and reduction == "none":
        grad_out = torch.randn(m, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    loss, grads = run(linear_cross_entropy, h, w, b, t, grad_out, **kw)
    loss_s, grads_s = run(linear_cross_entropy_ref, h, w, b, t, grad_out, **kw)
    h64, w64 = h.double(), w.double()
    b64 = b.double() if b is not None else None
    loss64, grads64 = run(linear_cross_entropy_ref, h64, w64, b64, t, grad_out, **kw)
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    assert_vs_reference(loss, loss_s, loss64, dtype, slack, "loss")
    for name, g, gs, g64 in zip(("hidden", "weight", "bias"), grads, grads_s, grads64, strict=True):
        if g64 is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == g64.shape
        assert_vs_reference(g, gs, g64, dtype, slack, f"grad {name}")
    return loss, grads


# ------------------------------------------------------------------------------------------------------ basics
def test_kernel_path_is_exercised():
    h, w, b, t = make(2, 3, 4)
    assert use_triton(h), "tests must run the Triton kernel (TRITON_INTERPRET=1 on CPU)"
    assert poison_outputs(), "conftest must poison kernel outputs (MIMFAST_POISON_OUTPUTS=1)"


def test_public_exports():
    assert mimfast.linear_cross_entropy is linear_cross_entropy
    assert mimfast.ops.linear_cross_entropy is linear_cross_entropy
    assert "linear_cross_entropy" in mimfast.__all__ and "linear_cross_entropy" in mimfast.__doc__


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SWEEP, ids=shape_id)
def test_sweep_matches_reference(shape, dtype):
    """Awkward M x V (D = 40), each dtype; reduction, bias, smoothing and ignored rows vary with the shape."""
    m, v = shape
    i = SWEEP.index(shape)
    check_case(m, 40, v, dtype, REDUCTIONS[i % 3], eps=(0.0, 0.1)[i % 2], bias=i % 2 == 0, ignore_every=(0, 3)[i % 2])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_reductions_smoothing_and_ignored_rows(reduction, eps):
    check_case(97, 40, 1000, torch.float32, reduction, eps=eps, ignore_every=4, seed=5)
    check_case(97, 40, 1000, torch.bfloat16, reduction, eps=eps, ignore_every=4, seed=6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_all_rows_ignored(reduction, eps):
    """torch: 'mean' over zero rows is NaN, 'sum' is 0, 'none' is zeros; every gradient is exactly zero."""
    h, w, b, t = make(33, 8, 50)
    t = torch.full_like(t, -100)
    loss, grads = run(linear_cross_entropy, h, w, b, t, None, label_smoothing=eps, reduction=reduction)
    ref, _ = run(linear_cross_entropy_ref, h, w, b, t, None, label_smoothing=eps, reduction=reduction)
    assert torch.equal(torch.isnan(loss), torch.isnan(ref)) and (reduction != "mean" or torch.isnan(loss))
    torch.testing.assert_close(torch.nan_to_num(loss), torch.nan_to_num(ref))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    h, w, b, t = make(0, 8, 50)
    loss, grads = run(linear_cross_entropy, h, w, b, t, None, reduction=reduction)
    ref, _ = run(linear_cross_entropy_ref, h, w, b, t, None, reduction=reduction)
    assert loss.shape == ref.shape and torch.equal(torch.isnan(loss), torch.isnan(ref))
    assert grads[0].shape == (0, 8) and torch.equal(grads[1], torch.zeros_like(grads[1]))


def test_ignore_index_inside_the_vocabulary():
    check_case(97, 16, 20, torch.float32, "mean", eps=0.1, seed=3)
    h, w, b, t = make(97, 16, 20, seed=3)
    kw = dict(ignore_index=7, label_smoothing=0.1)
    loss, grads = run(linear_cross_entropy, h, w, b, t, None, **kw)
    ref, rgrads = run(linear_cross_entropy_ref, h, w, b, t, None, **kw)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, rgrads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_vocab_slice(dtype):
    """vocab_size = V' scores the first V' rows only: MAGE's 1024 of 2025 (scaled down); gradients of rows >= V' are
    exactly zero."""
    v, vp = 2025, 1024
    loss, grads = check_case(65, 24, v, dtype, "mean", eps=0.1, vocab=vp, ignore_every=5, seed=9)
    assert torch.equal(grads[1][vp:], torch.zeros_like(grads[1][vp:]))
    assert torch.equal(grads[2][vp:], torch.zeros_like(grads[2][vp:]))
    assert grads[1][:vp].abs().sum() > 0


def test_int32_targets_and_strided_inputs():
    h, w, b, t = make(97, 40, 1000, seed=2)
    base = linear_cross_entropy(h, w, t, b)
    hs = h.t().contiguous().t()  # column-major hidden
    assert not hs.is_contiguous()
    ws = torch.empty(1000, 80)[:, ::2]
    ws.copy_(w)
    ts = torch.stack([t.int(), t.int()], 1)[:, 0]  # int32, stride 2
    out = linear_cross_entropy(hs, ws, ts, b)
    torch.testing.assert_close(out, base, rtol=2e-6, atol=1e-6)
    _, g_strided = run(linear_cross_entropy, hs, ws, b, ts, None)
    _, g_base = run(linear_cross_entropy, h, w, b, t, None)
    for a, c in zip(g_strided, g_base, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_none_with_random_grad_output():
    """'none' recomputes in backward with per-row weights: grad W = sum_r g_r (p_r - y_r)^T h_r."""
    g = torch.randn(97, generator=torch.Generator().manual_seed(4)) * 3
    check_case(97, 40, 1000, torch.float32, "none", eps=0.1, ignore_every=3, grad_out=g.to(DEVICE))
    check_case(97, 40, 1000, torch.bfloat16, "none", grad_out=g.to(DEVICE))


@pytest.mark.parametrize("acc32", [True, False], ids=["acc32", "acc-in-output"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_chunks_and_tiled_rows(monkeypatch, acc32, dtype):
    """Chunks of 104, 104 and 92 rows (M = 300), rows longer than one tile (V = 8193: the two-pass kernel), and
    both grad-weight accumulations (fp32 accumulator / one rounding per chunk into the output)."""
    monkeypatch.setattr(_common, "LCE_SMALL_BYTES", 0)
    monkeypatch.setattr(_common, "LCE_ACC32_FRACTION", 1.0 if acc32 else 0.0)
    plan = linear_cross_entropy_plan(300, 16, 8193, dtype.itemsize, dtype != torch.float32)
    assert plan["chunk_rows"] == 104 and not plan["SINGLE"]  # 3 balanced chunks of at most 128 rows
    assert plan["acc32"] == (acc32 and dtype != torch.float32)
    slack = 2.0 if acc32 or dtype == torch.float32 else 4.0  # three roundings of grad W instead of one
    for reduction in ("mean", "none"):
        check_case(300, 16, 8193, dtype, reduction, eps=0.1, ignore_every=7, seed=11, slack=slack)


def test_gradcheck_reference_float64():
    h, w, b, t = make(7, 5, 11, torch.float64, ignore_every=3, vocab=9)
    for reduction, eps in (("mean", 0.0), ("mean", 0.2), ("sum", 0.2), ("none", 0.2)):

        def fn(h, w, b, reduction=reduction, eps=eps):
            return linear_cross_entropy_ref(h, w, t, b, label_smoothing=eps, reduction=reduction, vocab_size=9)

        args = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
        assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_op_float64():
    """fp64 takes the op's torch path (same chunk loop, same autograd registration): gradcheck it too."""
    h, w, b, t = make(7, 5, 11, torch.float64, ignore_every=3)
    for reduction in REDUCTIONS:

        def fn(h, w, b, reduction=reduction):
            return linear_cross_entropy(h, w, t, b, label_smoothing=0.1, reduction=reduction)

        args = [x.detach().clone().requires_grad_(True) for x in (h, w, b)]
        assert torch.autograd.gradcheck(fn, args)


def test_opcheck():
    h, w, b, t = make(33, 8, 50, ignore_every=4, vocab=40)
    for reduction in REDUCTIONS:
        for bias, flags in ((b, (True, True, True)), (None, (True, False, False))):
            b_arg = None if bias is None else bias.clone().requires_grad_(True)
            args = (h.clone().requires_grad_(True), w.clone().requires_grad_(flags[1]), t, b_arg, -100, 0.1, reduction,
                    40, *flags)  # fmt: skip
            torch.library.opcheck(torch.ops.mimfast.linear_cross_entropy, args)
    lse = torch.randn(33)
    for reduction, g in (("none", torch.randn(33)), ("mean", torch.tensor(1.5))):
        torch.library.opcheck(torch.ops.mimfast.linear_cross_entropy_bwd,
                              (g, h, w, t, b, lse, -100, 0.0, reduction, 50, True, True, True))  # fmt: skip


def test_deterministic():
    h, w, b, t = make(300, 16, 1000, torch.bfloat16, ignore_every=5)
    a_loss, a_grads = run(linear_cross_entropy, h, w, b, t, None, label_smoothing=0.1)
    b_loss, b_grads = run(linear_cross_entropy, h, w, b, t, None, label_smoothing=0.1)
    assert torch.equal(a_loss, b_loss) and all(torch.equal(x, y) for x, y in zip(a_grads, b_grads, strict=True))


def test_retain_graph_second_backward_recomputes():
    """The forward's gradients are used (scaled in place) by the first backward; a second backward through the same
    graph recomputes them, with the same result."""
    h, w, b, t = make(97, 16, 300, ignore_every=5)
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = linear_cross_entropy(h, w, t, b, label_smoothing=0.1)
    g1 = torch.autograd.grad(loss * 2.0, (h, w), retain_graph=True)
    g2 = torch.autograd.grad(loss * 2.0, (h, w))
    for a, c in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


def test_only_some_gradients():
    """MAGE ties the head to a detached embedding: only hidden and bias need gradients (no grad-weight GEMM)."""
    h, w, b, t = make(97, 16, 300, vocab=200)
    h.requires_grad_(True)
    b.requires_grad_(True)
    gh, gb = torch.autograd.grad(linear_cross_entropy(h, w, t, b, vocab_size=200), (h, b))
    rh, rb = torch.autograd.grad(linear_cross_entropy_ref(h, w, t, b, vocab_size=200), (h, b))
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, b), linear_cross_entropy_ref(h, w, t, b))


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast case (the CUDA one is the same code path)")
def test_autocast_gives_fp32_master_weights_their_gradient():
    h, w, b, t = make(65, 16, 200, ignore_every=6)
    w.requires_grad_(True)
    b.requires_grad_(True)
    h.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t, b, label_smoothing=0.1)
        ref = linear_cross_entropy_ref(h, w, t, b, label_smoothing=0.1)
    grads = torch.autograd.grad(loss, (h, w, b))
    rgrads = torch.autograd.grad(ref, (h, w, b))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    for g, r in zip(grads, rgrads, strict=True):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2 * r.abs().max().item())


def test_unvalidated_bad_target_gives_nan_row():
    h, w, b, t = make(9, 8, 20)
    t[3] = 25
    rows = linear_cross_entropy(h, w, t, b, reduction="none", validate=False)
    assert torch.isnan(rows[3]) and torch.isfinite(rows[torch.arange(9) != 3]).all()


@pytest.mark.parametrize("shape", [(9600, 768, 8192, 8192), (19600, 768, 8192, 8192), (32768, 768, 8192, 8192),
                                   (32768, 1024, 16384, 16384), (32768, 768, 2025, 1024)], ids=shape_id)  # fmt: skip
def test_chunk_plan_memory_below_5_percent(shape):
    """PERF.md: extra memory < 5% of the M x V' fp32 logits at the benchmark shapes (bf16, every gradient)."""
    m, d, v, vp = shape
    plan = linear_cross_entropy_plan(m, d, vp, 2, True)
    extra = plan["chunk_rows"] * vp * 2 + (vp * d * 4 if plan["acc32"] else 0) + 12 * m + 4 * vp
    assert extra <= plan["extra_bytes"] and plan["extra_bytes"] < 0.05 * m * vp * 4
    assert plan["chunk_rows"] >= 512 and plan["chunk_rows"] % 8 == 0  # GEMM-sized chunks
    last = m - (-(-m // plan["chunk_rows"]) - 1) * plan["chunk_rows"]
    assert last >= 132 * plan["BLOCK_M"]  # the last chunk fills the GPU too
    assert plan["chunk_rows"] // plan["BLOCK_M"] >= 132  # at least one program per SM in the row kernel


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(hidden=torch.randn(4)), ValueError, "hidden"),
        (dict(hidden=torch.randint(0, 3, (4, 8))), TypeError, "hidden"),
        (dict(weight=torch.randn(10, 7)), ValueError, "weight"),
        (dict(weight=torch.randn(0, 8)), ValueError, "weight"),
        (dict(weight=torch.randn(10, 8, dtype=torch.float64)), TypeError, "hidden / weight"),
        (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, "target"),
        (dict(target=torch.zeros(4)), TypeError, "target"),
        (dict(target=torch.tensor([0, 1, 10, 2])), ValueError, "target"),
        (dict(target=torch.tensor([0, 1, -1, 2])), ValueError, "target"),
        (dict(bias=torch.randn(9)), ValueError, "bias"),
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(vocab_size=11), ValueError, "vocab_size"),
        (dict(vocab_size=2.0), TypeError, "vocab_size"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(ignore_index=1.0), TypeError, "ignore_index"),
    ],
    ids=lambda x: str(x)[:40] if not isinstance(x, dict) else next(iter(x)),
)
def test_bad_inputs_raise(change, exc, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), target=torch.tensor([0, 1, -100, 9]), bias=None)
    kw = {}
    for k, val in change.items():
        (args if k in args else kw)[k] = val
    with pytest.raises(exc, match=match):
        linear_cross_entropy(args["hidden"], args["weight"], args["target"], args["bias"], **kw)


def test_vocab_slice_validates_against_v_prime():
    with pytest.raises(ValueError, match=r"target.*\[0, 5\)"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 7, 2]), vocab_size=5)
    linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 7, 2]), vocab_size=5,
                         validate=False)  # fmt: skip


def test_reference_matches_torch_definition():
    """The reference is F.cross_entropy on the fp32 logits (the spec): a direct check with torch's own call."""
    h, w, b, t = make(50, 8, 30, torch.bfloat16, ignore_every=4)
    logits = F.linear(h, w[:20], b[:20]).float()
    t = t.clamp(max=19).masked_fill(t < 0, -100)
    want = F.cross_entropy(logits, t, label_smoothing=0.2)
    torch.testing.assert_close(linear_cross_entropy_ref(h, w, t.int(), b, label_smoothing=0.2, vocab_size=20), want)

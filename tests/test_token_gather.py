"""mimfast::gather_tokens / restore_tokens: kernels (through the interpreter on CPU) against MAE's formulation and
the plain-torch references, forward and backward, round trips, strides, edge sizes, errors, op checks."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES, shape_id, tol
from mimfast.kernels._common import use_triton
from mimfast.kernels.token_gather import gather_tokens_ref, restore_tokens_ref
from mimfast.ops.tokens import gather_tokens, inverse_index, restore_tokens

# (B, L, Lk, D): MAE's 196/49, MAGE's 256/128, and awkward sizes (1, primes, > one block, Lk = 0 and Lk = L)
SHAPES = [
    (1, 1, 1, 1),
    (2, 7, 3, 3),
    (3, 13, 4, 40),
    (2, 196, 49, 24),
    (2, 256, 128, 16),
    (1, 97, 0, 5),
    (2, 11, 11, 257),
    (5, 70, 17, 129),
]


def masks(bsz, seq, lk, seed=0, index_dtype=torch.int64):
    """MAE's random masking: (ids_keep, ids_restore, mask) for uniform noise."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(bsz, seq, generator=g)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(bsz, seq)
    mask[:, :lk] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return (
        ids_shuffle[:, :lk].to(index_dtype).to(DEVICE),
        ids_restore.to(index_dtype).to(DEVICE),
        mask.to(DEVICE),
    )


def rand(*shape, dtype=torch.float32, seed=1, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
    return t.requires_grad_(grad)


# MAE's official code, written out: the formulation these ops replace.
def mae_encoder_gather(x, pos_embed, cls_token, ids_keep):
    x = x + pos_embed[:, 1:, :]
    x_masked = torch.gather(x, dim=1, index=ids_keep.long().unsqueeze(-1).repeat(1, 1, x.shape[2]))
    cls = cls_token + pos_embed[:, :1, :]
    return torch.cat((cls.expand(x.shape[0], -1, -1), x_masked), dim=1)


def mae_decoder_restore(x, mask_token, ids_restore, decoder_pos_embed):
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.long().unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + decoder_pos_embed


def test_kernel_path_is_exercised():
    assert use_triton(rand(2, 3)), "tests must run the Triton kernels (TRITON_INTERPRET=1 on CPU)"


# ------------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gather_equals_mae_formulation(shape, dtype, index_dtype):
    bsz, seq, lk, dim = shape
    keep, restore, _ = masks(bsz, seq, lk, index_dtype=index_dtype)
    x = rand(bsz, seq, dim, dtype=dtype)
    pos_embed = rand(1, 1 + seq, dim, dtype=dtype, seed=2)
    cls = rand(1, 1, dim, dtype=dtype, seed=3)
    out = gather_tokens(x, keep, pos=pos_embed[:, 1:], prefix=cls + pos_embed[:, :1], ids_restore=restore)
    ref = mae_encoder_gather(x, pos_embed, cls, keep)
    assert out.dtype == ref.dtype and out.shape == (bsz, 1 + lk, dim)
    assert torch.equal(out, ref)  # a copy plus one add, rounded once: bit-exact


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_restore_equals_mae_formulation(shape, dtype, index_dtype):
    bsz, seq, lk, dim = shape
    _, restore, _ = masks(bsz, seq, lk, index_dtype=index_dtype)
    y = rand(bsz, 1 + lk, dim, dtype=dtype)
    mask_token = rand(1, 1, dim, dtype=dtype, seed=4)
    dpos = rand(1, 1 + seq, dim, dtype=dtype, seed=5)
    out = restore_tokens(y, restore, mask_token, pos=dpos, num_prefix=1)
    ref = mae_decoder_restore(y, mask_token, restore, dpos)
    assert out.dtype == ref.dtype and out.shape == (bsz, 1 + seq, dim)
    assert torch.equal(out, ref)


def test_mixed_dtypes_follow_torch_promotion():
    """bf16 tokens + fp32 position embedding (MAE under autocast) give fp32, exactly as ``x + pos`` does."""
    bsz, seq, lk, dim = 3, 20, 5, 33
    keep, restore, _ = masks(bsz, seq, lk)
    x = rand(bsz, seq, dim, dtype=torch.bfloat16)
    pos = rand(seq, dim, seed=2)
    out = gather_tokens(x, keep, pos=pos, ids_restore=restore)
    assert out.dtype == torch.float32
    assert torch.equal(out, gather_tokens_ref(x, keep, pos))
    y = rand(bsz, lk, dim, dtype=torch.float16)
    fill = rand(dim, dtype=torch.bfloat16, seed=3)
    out = restore_tokens(y, restore, fill)
    assert out.dtype == torch.float32 and torch.equal(out, restore_tokens_ref(y, restore, fill))


def test_per_sample_fill_and_prefix():
    """MAGE pads removed slots with each sample's class-token feature; prefixes may differ per sample too."""
    bsz, seq, lk, dim = 4, 16, 6, 12
    keep, restore, _ = masks(bsz, seq, lk)
    x = rand(bsz, seq, dim)
    pre = rand(bsz, 2, dim, seed=7)
    out = gather_tokens(x, keep, prefix=pre)
    assert torch.equal(out, gather_tokens_ref(x, keep, prefix=pre))
    y = rand(bsz, 1 + lk, dim)
    out = restore_tokens(y, restore, y[:, 0], num_prefix=1)
    assert torch.equal(out, restore_tokens_ref(y, restore, y[:, 0], num_prefix=1))
    filled = restore.long() >= lk
    assert torch.equal(out[:, 1:][filled], y[:, :1].expand(-1, seq, -1)[filled])


def test_round_trip_gather_then_restore():
    bsz, seq, lk, dim = 3, 50, 13, 20
    keep, restore, mask = masks(bsz, seq, lk)
    x = rand(bsz, seq, dim)
    back = restore_tokens(gather_tokens(x, keep, ids_restore=restore), restore)
    assert torch.equal(back, x * (1 - mask).unsqueeze(-1))  # visible rows in place, zeros in removed slots


def test_strided_inputs():
    bsz, seq, lk, dim = 3, 21, 8, 10
    keep, restore, _ = masks(bsz, seq, lk)
    x = rand(bsz, dim, seq).transpose(1, 2)  # feature stride != 1
    pos = rand(dim, seq, seed=2).t()
    keep_nc = torch.cat([keep, keep], dim=1)[:, ::2]  # index with a column stride of 2
    keep_nc[:] = keep
    assert not x.is_contiguous() and not keep_nc.is_contiguous()
    out = gather_tokens(x, keep_nc, pos=pos)
    assert torch.equal(out, gather_tokens_ref(x.contiguous(), keep, pos.contiguous()))
    y = rand(bsz, dim, 1 + lk).transpose(1, 2)
    out = restore_tokens(y, restore.t().contiguous().t(), rand(dim, seed=3), num_prefix=1)
    assert torch.equal(out, restore_tokens_ref(y.contiguous(), restore, rand(dim, seed=3), num_prefix=1))


def test_empty_batch():
    keep, restore, _ = masks(0, 9, 3)
    x = rand(0, 9, 4)
    assert gather_tokens(x, keep).shape == (0, 3, 4)
    assert restore_tokens(rand(0, 3, 4), restore, rand(4)).shape == (0, 9, 4)


def test_out_of_range_index_gives_nan_rows_not_a_fault():
    bsz, seq, lk, dim = 2, 10, 4, 8
    keep, restore, _ = masks(bsz, seq, lk)
    keep = keep.clone()
    keep[1, 2] = seq + 5
    x = rand(bsz, seq, dim)
    with pytest.raises(ValueError, match=r"ids_keep: values must lie in \[0, 10\)"):
        gather_tokens(x, keep)  # validated by default on CPU
    out = gather_tokens(x, keep, validate=False)
    assert torch.isnan(out[1, 2]).all() and not torch.isnan(out[0]).any() and not torch.isnan(out[1, :2]).any()
    bad = restore.clone()
    bad[0, 3] = -1
    with pytest.raises(ValueError, match="ids_restore: values must lie"):
        restore_tokens(rand(bsz, lk, dim), bad, rand(dim))
    out = restore_tokens(rand(bsz, lk, dim), bad, rand(dim), validate=False)
    assert torch.isnan(out[0, 3]).all() and torch.isfinite(out[1]).all()


def test_restore_backward_invalid_index_gives_nan_rows(monkeypatch):
    """The restore's backward with an out-of-range index (validate=False): the visible row no valid index points to
    gets a NaN gradient (as documented), not whatever the output buffer held; other samples are exact. The output
    buffer is pre-filled with a finite sentinel here so that a row the kernel skips cannot pass as NaN."""
    import importlib

    tg = importlib.import_module("mimfast.kernels.token_gather")
    real = tg.new_output

    def sentinel_output(shape, dtype, device):
        t = real(shape, dtype, device)
        return t.fill_(7.0) if t.is_floating_point() else t

    monkeypatch.setattr(tg, "new_output", sentinel_output)
    bsz, seq, lk, dim, p = 3, 10, 4, 8, 1
    keep, restore, _ = masks(bsz, seq, lk)
    bad = restore.clone()
    orphan = int(bad[1].argmin())  # the slot of visible row 0 of sample 1
    bad[1, orphan] = seq + 3
    g = rand(bsz, p + seq, dim, seed=3)
    for covers_all in (True, False):
        gx, gfill = torch.ops.mimfast.restore_tokens_bwd(g, bad, p + lk, p, "float32", True, covers_all)
        want, wfill = torch.ops.mimfast.restore_tokens_bwd(g, restore, p + lk, p, "float32", True, covers_all)
        row = gx[1, p + 0]
        if covers_all:
            assert torch.isnan(row).all(), row
        else:  # covers_all=False: an unreferenced visible row has a zero gradient by contract
            assert (row == 0).all(), row
        keep_rows = torch.ones(bsz, p + lk, dtype=torch.bool, device=DEVICE)
        keep_rows[1, p + 0] = False
        torch.testing.assert_close(gx[keep_rows], want[keep_rows])
        torch.testing.assert_close(gfill[[0, 2]], wfill[[0, 2]])


def test_large_strides_use_64_bit_offsets(tmp_path):
    """Feature strides of 2^30 elements (a view into a > 2^31-element buffer): offset * stride must not wrap in 32
    bits. Runs in a subprocess (a wrapped offset faults instead of failing) on a lazily allocated 4 GiB bf16 buffer
    of which only the viewed elements are touched."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import torch
        from mimfast.kernels import vq_search
        from mimfast.ops.tokens import gather_tokens, restore_tokens
        dev = {DEVICE!r}
        stride = 1 << 30
        n, d = 4, 3
        store = torch.empty(n + (d - 1) * stride + 1, dtype=torch.bfloat16, device=dev)
        g = torch.Generator().manual_seed(0)
        vals = torch.randn(n, d, generator=g).bfloat16().to(dev)
        x = store.as_strided((n, d), (1, stride))
        x.copy_(vals)
        e = torch.randn(5, d, generator=g).bfloat16().to(dev)
        i1, d1, _ = vq_search(x, e)
        i2, d2, _ = vq_search(vals, e)
        assert torch.equal(i1, i2) and torch.equal(d1, d2), (i1, i2)
        t = store.as_strided((1, n, d), (n, 1, stride))  # (B, L, D) tokens with a 2^30 feature stride
        keep = torch.tensor([[2, 0]], device=dev)
        restore = torch.tensor([[1, 2, 0, 3]], device=dev)
        assert torch.equal(gather_tokens(t, keep, validate=False), vals[None, [2, 0]])
        y = restore_tokens(t[:, :2], restore, None, validate=False)
        assert torch.equal(y[0, 0], vals[1]) and torch.equal(y[0, 2], vals[0]) and (y[0, [1, 3]] == 0).all()
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-3000:])


# ----------------------------------------------------------------------------------------------------- backward
def _grads(out, inputs, seed=9, like=None):
    """Gradients of ``out`` for a seeded cotangent, rounded to ``like`` (default out's dtype) then cast to out's."""
    g = rand(*out.shape, dtype=like or out.dtype, seed=seed).to(out.dtype)
    return torch.autograd.grad(out, inputs, g)


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def assert_reduction_close(got, want, want64, dtype):
    """A batch / row sum: error vs float64 at most 2x that of PyTorch's own result in ``dtype``, plus a floor."""
    err = (got.double() - want64).abs()
    bound = 2 * (want.double() - want64).abs() + tol(dtype)["atol"] + tol(dtype)["rtol"] * want64.abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:6], ids=shape_id)
def test_gather_backward(shape, dtype):
    bsz, seq, lk, dim = shape
    keep, restore, _ = masks(bsz, seq, lk, index_dtype=torch.int32)
    x = rand(bsz, seq, dim, dtype=dtype, grad=True)
    pos = rand(seq, dim, dtype=dtype, seed=2, grad=True)
    pre = rand(1, dim, dtype=dtype, seed=3, grad=True)
    got = _grads(gather_tokens(x, keep, pos=pos, prefix=pre, ids_restore=restore), (x, pos, pre))
    want = _grads(gather_tokens_ref(x, keep, pos, pre), (x, pos, pre))
    x64, pos64, pre64 = _f64(x), _f64(pos), _f64(pre)
    want64 = _grads(gather_tokens_ref(x64, keep, pos64, pre64), (x64, pos64, pre64), like=dtype)
    assert torch.equal(got[0], want[0])  # scatter of copies: exact, zeros at removed positions
    for a, b, c in zip(got[1:], want[1:], want64[1:], strict=True):  # sums over the batch
        assert_reduction_close(a, b, c, dtype)


@pytest.mark.parametrize("fill_kind", ["shared", "per_sample", "none"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:6], ids=shape_id)
def test_restore_backward(shape, dtype, fill_kind):
    bsz, seq, lk, dim = shape
    _, restore, _ = masks(bsz, seq, lk)
    y = rand(bsz, 1 + lk, dim, dtype=dtype, grad=True)
    fill = {"shared": rand(dim, dtype=dtype, seed=4), "per_sample": rand(bsz, dim, dtype=dtype, seed=4)}.get(fill_kind)
    pos = rand(1 + seq, dim, dtype=dtype, seed=5, grad=True)
    inputs = (y, pos) if fill is None else (y, pos, fill.requires_grad_())
    got = _grads(restore_tokens(y, restore, fill, pos=pos, num_prefix=1), inputs)
    want = _grads(restore_tokens_ref(y, restore, fill, pos, 1), inputs)
    in64 = tuple(_f64(t) for t in inputs)
    fill64 = in64[2] if fill is not None else None
    want64 = _grads(restore_tokens_ref(in64[0], restore, fill64, in64[1], 1), in64, like=dtype)
    assert torch.equal(got[0], want[0])
    for a, b, c in zip(got[1:], want[1:], want64[1:], strict=True):  # sums over the batch / the filled slots
        assert_reduction_close(a, b, c, dtype)


def test_restore_backward_unplaced_rows_get_zero_gradient():
    """MAGE-style: some visible rows are replaced by the filler; with covers_all=False their gradient is 0."""
    bsz, seq, lk, dim = 3, 12, 6, 9
    _, restore, _ = masks(bsz, seq, lk)
    r = restore.clone()
    r[:, :3] = torch.where(r[:, :3] < lk, lk, r[:, :3])  # the first three positions are always filled
    y = rand(bsz, 1 + lk, dim, grad=True)
    fill = y[:, 0]
    with pytest.raises(ValueError, match="covers_all=False"):
        restore_tokens(y, r, fill, num_prefix=1)
    got = _grads(restore_tokens(y, r, fill, num_prefix=1, covers_all=False), (y,))
    want = _grads(restore_tokens_ref(y, r, fill, num_prefix=1), (y,))
    torch.testing.assert_close(got[0], want[0], **tol(torch.float32))


def test_gradcheck_float64():
    bsz, seq, lk, dim = 2, 7, 3, 4
    keep, restore, _ = masks(bsz, seq, lk)
    x = rand(bsz, seq, dim, dtype=torch.float64, grad=True)
    pos = rand(seq, dim, dtype=torch.float64, seed=2, grad=True)
    pre = rand(bsz, 1, dim, dtype=torch.float64, seed=3, grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: gather_tokens(a, keep, pos=b, prefix=c), (x, pos, pre))
    y = rand(bsz, 1 + lk, dim, dtype=torch.float64, grad=True)
    dpos = rand(1 + seq, dim, dtype=torch.float64, seed=5, grad=True)
    for fill in (rand(dim, dtype=torch.float64, seed=4), rand(bsz, dim, dtype=torch.float64, seed=4)):
        fill.requires_grad_()
        fn = lambda a, f, p: restore_tokens(a, restore, f, pos=p, num_prefix=1)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (y, fill, dpos))


def test_deterministic_repeat():
    bsz, seq, lk, dim = 4, 30, 9, 17
    keep, restore, _ = masks(bsz, seq, lk)
    y = rand(bsz, 1 + lk, dim, grad=True)
    fill = rand(dim, seed=4, grad=True)
    runs = []
    for _ in range(2):
        out = restore_tokens(y, restore, fill, num_prefix=1)
        runs.append((out, *_grads(out, (y, fill))))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


# ------------------------------------------------------------------------------------------------------- errors
B, L, K, D = 2, 10, 4, 8
_x, _keep, _restore = torch.randn(B, L, D), torch.zeros(B, K, dtype=torch.long), torch.zeros(B, L, dtype=torch.long)


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda: gather_tokens(_x[0], _keep), ValueError, r"x: expected a 3-D tensor"),
        (lambda: gather_tokens(_x.long(), _keep), TypeError, r"x: expected dtype"),
        (lambda: gather_tokens(_x, _keep.float()), TypeError, r"ids_keep: expected dtype in \(int32, int64\)"),
        (lambda: gather_tokens(_x, _keep[0]), ValueError, r"ids_keep: expected a 2-D tensor"),
        (lambda: gather_tokens(_x, _keep[:1]), ValueError, r"ids_keep: expected batch size 2"),
        (lambda: gather_tokens(_x, torch.zeros(B, L + 1, dtype=torch.long)), ValueError, r"keeps 11 tokens.*L=10"),
        (lambda: gather_tokens(_x, _keep, pos=torch.randn(L + 1, D)), ValueError, r"pos: expected shape \(10, 8\)"),
        (lambda: gather_tokens(_x, _keep, prefix=torch.randn(3, 1, D)), ValueError, r"prefix: expected shape"),
        (lambda: gather_tokens(_x, _keep, ids_restore=_restore[:, :5]), ValueError, r"ids_restore: expected shape"),
        (lambda: gather_tokens(_x, torch.ones(B, K, dtype=torch.long)), ValueError, r"ids_keep: every row.*distinct"),
        (lambda: gather_tokens(_x, _keep[:, :1], ids_restore=_restore + 1), ValueError, r"inverse of ids_keep"),
        (lambda: restore_tokens(_x[0], _restore), ValueError, r"x: expected a 3-D tensor"),
        (lambda: restore_tokens(_x, _restore[:1]), ValueError, r"ids_restore: expected batch size 2"),
        (lambda: restore_tokens(_x, _restore[:, :5]), ValueError, r"holds 10 visible rows.*L=5"),
        (lambda: restore_tokens(_x, _restore, torch.randn(D + 1)), ValueError, r"fill: expected shape \(8,\)"),
        (lambda: restore_tokens(_x, _restore, torch.randn(3, D)), ValueError, r"fill: expected shape"),
        (lambda: restore_tokens(_x, _restore, pos=torch.randn(L, D), num_prefix=1), ValueError, r"pos: expected"),
        (lambda: restore_tokens(_x, _restore, num_prefix=-1), ValueError, r"num_prefix: expected an int"),
        (lambda: restore_tokens(_x, _restore, num_prefix=11), ValueError, r"num_prefix: expected an int in \[0, 10\]"),
        (lambda: restore_tokens(_x[:, :4], _restore), ValueError, r"referenced more than once"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_mixed_devices_error():
    with pytest.raises(ValueError, match=r"one device.*x on cpu.*ids_keep on meta"):
        gather_tokens(torch.randn(2, 5, 3), torch.zeros(2, 2, dtype=torch.long, device="meta"))


def test_inverse_index():
    keep, restore, _ = masks(3, 17, 5)
    inv = inverse_index(keep, 17)
    assert torch.equal(inv.gather(1, keep), torch.arange(5).expand(3, 5).to(inv))
    assert ((inv >= 5) == (restore >= 5)).all()


# -------------------------------------------------------------------------------------------- torch.library ops
def test_opcheck():
    keep, restore, _ = masks(2, 9, 4, index_dtype=torch.int32)
    x, pos, pre = rand(2, 9, 6), rand(9, 6, seed=2), rand(2, 1, 6, seed=3)
    torch.library.opcheck(torch.ops.mimfast.gather_tokens.default, (x, keep, restore, pos, pre, "float32"))
    torch.library.opcheck(torch.ops.mimfast.gather_tokens.default, (x, keep, restore, None, None, "float32"))
    y, fill, dpos = rand(2, 5, 6, grad=True), rand(6, seed=4), rand(10, 6, seed=5)
    torch.library.opcheck(torch.ops.mimfast.restore_tokens.default, (y, restore, fill, dpos, 1, True, "float32"))
    torch.library.opcheck(torch.ops.mimfast.restore_tokens.default, (y, restore, None, None, 1, True, "float32"))
    g = rand(2, 10, 6, seed=6)
    torch.library.opcheck(torch.ops.mimfast.restore_tokens_bwd.default, (g, restore, 5, 1, "float32", True, True))


def test_torch_compile_fullgraph():
    keep, restore, _ = masks(2, 9, 4)
    x, pos, fill = rand(2, 9, 6, grad=True), rand(9, 6, seed=2), rand(6, seed=4, grad=True)

    def f(x, fill):
        enc = gather_tokens(x, keep, pos=pos, ids_restore=restore, validate=False)
        return restore_tokens(enc * 2, restore, fill, validate=False).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, fill), (x, fill))
    want = torch.autograd.grad(f(x, fill), (x, fill))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs CUDA")
def test_no_host_sync_on_gpu():
    keep, restore, _ = masks(8, 196, 49)
    x = rand(8, 196, 64, grad=True)
    fill = rand(64, seed=4, grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        enc = gather_tokens(x, keep, ids_restore=restore)
        restore_tokens(enc, restore, fill).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

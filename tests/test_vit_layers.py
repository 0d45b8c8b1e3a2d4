"""mimfast.layers.attention (backend switch) and mimfast.layers.vit (ViT blocks with MAE's parameter names).

Backends that cannot run here (flash-attn / xformers without CUDA) are skipped with their reason; their plumbing
(layout transposes, scale, bias alignment, varlen offsets, "auto" routing) is still exercised on the CPU through
stand-in modules that compute attention in the layout the real library expects.
"""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEVICE, TOL
from mimfast.layers.attention import (
    ENV_VAR,
    AttentionBackendUnavailable,
    attention,
    attention_backend,
    attention_varlen,
    available_backends,
    get_default_backend,
    resolve_backend,
    set_default_backend,
)
from mimfast.layers.vit import (
    Attention,
    Block,
    DropPath,
    LayerScale,
    Mlp,
    PatchEmbed,
    drop_path,
    get_2d_sincos_pos_embed,
    init_patch_embed_weights,
    init_vit_weights,
)

# the module itself (mimfast.layers re-exports the `attention` function under the module's name)
attn_mod = sys.modules["mimfast.layers.attention"]

CONCRETE = ("flash", "sdpa", "xformers", "eager")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# (B, H, Lq, Lk, d): PERF.md's visible-token shapes scaled down (L = 50, 197, 257 with d 64 / 32), odd lengths,
# cross-attention (Lq != Lk, CAE's regressor), a single query.
SHAPES = [(2, 3, 50, 50, 64), (2, 4, 197, 197, 32), (1, 2, 257, 257, 64), (3, 2, 7, 7, 32), (2, 2, 13, 29, 32),
          (2, 3, 1, 5, 64)]  # fmt: skip
# bound on the eager path's own error against the float64 reference (it is the oracle, so check it too)
EAGER_ERR = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 6e-2, torch.float16: 8e-3}


@pytest.fixture(autouse=True)
def _clean_default(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    set_default_backend(None)
    yield
    set_default_backend(None)
    attn_mod._load.cache_clear()


def make_qkv(shape, dtype, seed=0, requires_grad=False):
    b, h, lq, lk, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, lk, d, generator=g, dtype=torch.float64)
    out = [t.to(DEVICE, dtype).requires_grad_(requires_grad) for t in (q, k, v)]
    return out


def make_bias(shape, dtype, seed=1, per_batch=False):
    b, h, lq, lk, _ = shape
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(b if per_batch else 1, h, lq, lk, generator=g, dtype=torch.float64)).to(DEVICE, dtype)


def ref_attention(q, k, v, bias=None, scale=None):
    """Independent float64 reference: explicit max-subtracted exp / sum with einsum (not the module's code)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if bias is not None:
        s = s + bias.double()
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", p, v)


def run_or_skip(backend, q, k, v, **kw):
    """Run ``attention`` on ``backend``, skipping when the backend or these inputs are unsupported here."""
    if backend not in available_backends():
        pytest.skip(f"{backend}: {attn_mod._unavailable_reason(backend)}")
    try:
        resolve_backend(q, backend, kw.get("attn_bias"))
    except ValueError as exc:
        pytest.skip(str(exc))
    return attention(q, k, v, backend=backend, **kw)


# ---------------------------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", CONCRETE)
def test_backend_matches_reference(backend, shape, dtype, with_bias):
    """Error of each backend vs a float64 reference <= 2x the eager path's error in the same dtype + a floor."""
    q, k, v = make_qkv(shape, dtype)
    bias = make_bias(shape, dtype, per_batch=shape[0] == 3) if with_bias else None
    out = run_or_skip(backend, q, k, v, attn_bias=bias)
    assert out.shape == q.shape[:3] + (v.shape[-1],) and out.dtype == dtype and out.device == q.device
    ref = ref_attention(q, k, v, bias)
    eager = attention(q, k, v, backend="eager", attn_bias=bias)
    err_eager = (eager.double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err_eager <= EAGER_ERR[dtype], (err_eager, dtype)
    floor = TOL[dtype]["atol"] + TOL[dtype]["rtol"] * ref.abs().max().item()
    assert err <= 2 * err_eager + floor, (backend, err, err_eager, floor)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_gradients_match_eager(backend, shape, dtype):
    """d(q, k, v, attn_bias) of each backend equal those of the eager path (bias is learned in BEiT)."""
    q, k, v = make_qkv(shape, dtype, requires_grad=True)
    bias = make_bias(shape, dtype).requires_grad_(True)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE, dtype)
    out = run_or_skip(backend, q, k, v, attn_bias=bias)
    got = torch.autograd.grad(out, (q, k, v, bias), g)
    want = torch.autograd.grad(attention(q, k, v, backend="eager", attn_bias=bias), (q, k, v, bias), g)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    for name, a, b in zip("qkvb", got, want, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


def test_eager_matches_official_formula_and_dropout():
    """eager = timm 0.3.2: softmax((q @ k^T) * scale) -> dropout -> @ v, with the same RNG draws."""
    q, k, v = make_qkv((2, 3, 11, 11, 16), torch.float32)
    torch.manual_seed(7)
    out = attention(q, k, v, backend="eager", dropout_p=0.3, scale=0.2)
    torch.manual_seed(7)
    a = ((q @ k.transpose(-2, -1)) * 0.2).softmax(dim=-1)
    want = F.dropout(a, p=0.3, training=True) @ v
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert not torch.allclose(out, attention(q, k, v, backend="eager", scale=0.2))


def test_attention_module_dropout_only_in_training():
    torch.manual_seed(0)
    m = Attention(32, num_heads=4, attn_drop=0.5).to(DEVICE)
    x = torch.randn(2, 9, 32, device=DEVICE)
    m.eval()
    ref = m(x)
    m.attn_drop.p = 0.0
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    m.attn_drop.p = 0.5
    m.train()
    assert not torch.allclose(m(x), ref)


def test_auto_runs_sdpa_without_flash():
    q, k, v = make_qkv(SHAPES[0], torch.float32)
    name = resolve_backend(q, "auto")
    assert name == ("flash" if "flash" in available_backends() and attn_mod._flash_reject(q, None) is None else "sdpa")
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend=name), rtol=0, atol=0)


@pytest.mark.parametrize("backend", CONCRETE)
def test_bias_is_cast_to_query_dtype(backend):
    """A float32 bias (a learned parameter under autocast) with bf16 q/k/v runs on every backend, as its bf16 cast."""
    shape = SHAPES[4]
    q, k, v = make_qkv(shape, torch.bfloat16)
    bias = make_bias(shape, torch.float32)
    out = run_or_skip(backend, q, k, v, attn_bias=bias)
    torch.testing.assert_close(out, attention(q, k, v, backend=backend, attn_bias=bias.bfloat16()), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- availability / errors
def test_available_backends():
    av = available_backends()
    assert "sdpa" in av and "eager" in av
    for b in ("flash", "xformers"):
        assert (b in av) == (attn_mod._unavailable_reason(b) is None)


@pytest.mark.parametrize("backend,pip", [("flash", "pip install flash-attn"), ("xformers", "pip install xformers")])
def test_unavailable_backend_clear_error(backend, pip, monkeypatch):
    monkeypatch.setitem(sys.modules, {"flash": "flash_attn", "xformers": "xformers"}[backend], None)  # not importable
    attn_mod._load.cache_clear()
    q, k, v = make_qkv(SHAPES[3], torch.float32)
    assert backend not in available_backends()
    with pytest.raises(AttentionBackendUnavailable, match=rf"'{backend}'.*not available here.*{pip}"):
        attention(q, k, v, backend=backend)
    assert resolve_backend(q, "auto") == "sdpa"


def test_flash_rejects_unqualified_inputs():
    q = torch.randn(1, 2, 3, 8)
    assert "CUDA" in attn_mod._flash_reject(q, None)
    assert "attn_bias" in attn_mod._flash_reject(q, torch.zeros(1, 1, 3, 3))


def test_bad_arguments():
    q, k, v = make_qkv(SHAPES[3], torch.float32)
    with pytest.raises(ValueError, match="backend: expected one of"):
        attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match=r"q: expected a 4-D"):
        attention(q[0], k, v)
    with pytest.raises(TypeError, match="k: dtype"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match="k: expected shape"):
        attention(q, k[..., :16], v)
    with pytest.raises(ValueError, match="v: expected the shape of k"):
        attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="Lk is 0"):
        attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="attn_bias: expected a shape broadcastable"):
        attention(q, k, v, attn_bias=torch.zeros(1, 5, 7, 7, device=DEVICE))
    with pytest.raises(TypeError, match="attn_bias: expected an additive floating-point"):
        attention(q, k, v, attn_bias=torch.zeros(7, 7, dtype=torch.bool, device=DEVICE))
    # a 2-D bias broadcasts like (1, 1, Lq, Lk)
    b2 = make_bias(SHAPES[3], torch.float32)[0, 0]
    torch.testing.assert_close(
        attention(q, k, v, attn_bias=b2), ref_attention(q, k, v, b2).float(), **TOL[torch.float32]
    )


# ------------------------------------------------------------------------------------------ default selection
def test_env_var_selects_backend(monkeypatch):
    q, k, v = make_qkv(SHAPES[3], torch.float32)
    monkeypatch.setenv(ENV_VAR, "eager")
    assert get_default_backend() == "eager" and resolve_backend(q) == "eager"

    def no_sdpa(*a, **kw):
        raise AssertionError("sdpa must not run when MIMFAST_ATTN_BACKEND=eager")

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
    attention(q, k, v)  # runs eager, does not touch SDPA
    Block(64, 2).to(DEVICE)(torch.randn(2, 7, 64, device=DEVICE))
    monkeypatch.setenv(ENV_VAR, "SDPA ")  # case / whitespace tolerant
    assert resolve_backend(q) == "sdpa"
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=ENV_VAR):
        attention(q, k, v)


def test_env_var_unavailable_backend_names_its_source(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    attn_mod._load.cache_clear()
    monkeypatch.setenv(ENV_VAR, "flash")
    q, k, v = make_qkv(SHAPES[3], torch.float32)
    with pytest.raises(AttentionBackendUnavailable, match=rf"{ENV_VAR}='flash'.*pip install flash-attn"):
        attention(q, k, v)


def test_setter_and_context_manager(monkeypatch):
    q, k, v = make_qkv(SHAPES[3], torch.float32)
    assert get_default_backend() == "auto"
    monkeypatch.setenv(ENV_VAR, "sdpa")
    set_default_backend("eager")  # the setter wins over the environment
    assert resolve_backend(q) == "eager"
    with attention_backend("sdpa"):
        assert resolve_backend(q) == "sdpa"
        assert resolve_backend(q, "eager") == "eager"  # an explicit argument wins over every default
        with attention_backend("eager"):
            assert get_default_backend() == "eager"
        assert get_default_backend() == "sdpa"
    assert get_default_backend() == "eager"
    set_default_backend(None)
    assert get_default_backend() == "sdpa"  # back to the environment
    with pytest.raises(ValueError, match="set_default_backend"):
        set_default_backend("triton")
    with pytest.raises(RuntimeError, match="boom"), attention_backend("eager"):
        raise RuntimeError("boom")
    assert get_default_backend() == "sdpa"
    m = Attention(32, 4, backend="eager")
    assert m.backend == "eager"


# ------------------------------------------------------------------------------- stand-ins for flash / xformers
def _fake_flash():
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
        calls.append(("func", tuple(q.shape), dropout_p, softmax_scale))
        # (B, L, H, d) layout, as flash_attn expects
        s = torch.einsum("blhd,bmhd->bhlm", q, k) * softmax_scale
        return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v).contiguous()

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
        calls.append(("varlen", tuple(q.shape), max_q, max_k))
        return _block_diag_ref(q, k, v, cu_q.tolist(), cu_k.tolist(), softmax_scale).to(q.dtype)

    mod = types.ModuleType("flash_attn")
    mod.flash_attn_func, mod.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return mod, calls


def _fake_xformers():
    calls = []

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        b, m, h, _ = query.shape
        if attn_bias is not None:  # the real kernels want a full (B, H, Mq, Mk) bias with 8-aligned rows
            assert tuple(attn_bias.shape) == (b, h, m, key.shape[1]), attn_bias.shape
            assert attn_bias.stride(-2) % 8 == 0 and attn_bias.stride(-1) == 1
        calls.append((tuple(query.shape), p, scale, attn_bias is not None))
        s = torch.einsum("blhd,bmhd->bhlm", query, key) * scale
        if attn_bias is not None:
            s = s + attn_bias
        return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), value)

    pkg, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    pkg.ops = ops
    return pkg, ops, calls


@pytest.fixture
def fake_flash(monkeypatch):
    mod, calls = _fake_flash()
    monkeypatch.setitem(sys.modules, "flash_attn", mod)
    attn_mod._load.cache_clear()
    real_reason, real_reject = attn_mod._unavailable_reason, attn_mod._flash_reject
    monkeypatch.setattr(attn_mod, "_unavailable_reason", lambda b: None if b == "flash" else real_reason(b))
    # keep every rule except the CUDA-device one, so CPU tensors qualify
    monkeypatch.setattr(attn_mod, "_flash_reject", lambda q, bias: None if bias is None else real_reject(q, bias))
    return calls


def test_flash_plumbing_with_stand_in(fake_flash):
    shape = (2, 3, 13, 13, 32)  # H != L, so a wrong layout gives a wrong answer
    q, k, v = make_qkv(shape, torch.float64)
    qkv = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).contiguous()  # (B, L, 3, H, d) like Attention's projection
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = attention(q, k, v, backend="flash", scale=0.3)
    torch.testing.assert_close(out, ref_attention(q, k, v, scale=0.3), **TOL[torch.float64])
    assert fake_flash[-1] == ("func", (2, 13, 3, 32), 0.0, 0.3)
    qf = q.float()
    assert resolve_backend(qf, "auto") == "flash"
    assert resolve_backend(qf, "auto", torch.zeros(1, 1, 13, 13)) == "sdpa"  # auto routes a bias to SDPA
    with pytest.raises(ValueError, match="'flash'.*attn_bias"):
        attention(qf, k.float(), v.float(), backend="flash", attn_bias=torch.zeros(1, 1, 13, 13, device=DEVICE))
    blk = Block(64, 4, attn_backend="flash").to(DEVICE, torch.float64).eval()
    x = torch.randn(2, 9, 64, device=DEVICE, dtype=torch.float64)
    got = blk(x)
    blk.attn.backend = "eager"
    torch.testing.assert_close(got, blk(x), **TOL[torch.float64])


def test_xformers_plumbing_with_stand_in(monkeypatch):
    pkg, ops, calls = _fake_xformers()
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    attn_mod._load.cache_clear()
    real_reason = attn_mod._unavailable_reason
    monkeypatch.setattr(attn_mod, "_unavailable_reason", lambda b: None if b == "xformers" else real_reason(b))
    monkeypatch.setattr(attn_mod, "_xformers_reject", lambda q: None)
    shape = (2, 3, 13, 29, 32)  # Lk = 29 is not a multiple of 8: the bias must be padded in memory
    q, k, v = make_qkv(shape, torch.float64)
    bias = make_bias(shape, torch.float64)  # (1, H, Lq, Lk): expanded to B
    out = attention(q, k, v, backend="xformers", attn_bias=bias)
    torch.testing.assert_close(out, ref_attention(q, k, v, bias), **TOL[torch.float64])
    assert calls[-1] == ((2, 13, 3, 32), 0.0, 32**-0.5, True)
    out = attention(q, k, v, backend="xformers")
    torch.testing.assert_close(out, ref_attention(q, k, v), **TOL[torch.float64])


# ----------------------------------------------------------------------------------------------- varlen
def _block_diag_ref(q, k, v, cq, ck, scale):
    """Packed attention as one dense (1, H, Tq, Tk) problem with -inf outside each sequence's block."""
    mask = torch.full((q.shape[0], k.shape[0]), float("-inf"), dtype=torch.float64, device=q.device)
    for i in range(len(cq) - 1):
        mask[cq[i] : cq[i + 1], ck[i] : ck[i + 1]] = 0.0
    rows = torch.isfinite(mask).any(1)
    mask[~rows] = 0.0  # rows of empty sequences do not exist; keep them finite
    out = ref_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), mask, scale)[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("backend", ["eager", "sdpa", "fake-flash"])
def test_varlen_matches_block_diagonal(backend, request):
    name = backend
    if backend == "fake-flash":
        request.getfixturevalue("fake_flash")
        name = "flash"
    lens_q, lens_k = [3, 0, 7, 1, 5], [4, 2, 7, 1, 6]
    cq = torch.tensor([0, *np.cumsum(lens_q)], device=DEVICE)
    ck = torch.tensor([0, *np.cumsum(lens_k)], device=DEVICE)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(sum(lens_q), 3, 16, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    k, v = (torch.randn(sum(lens_k), 3, 16, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
            for _ in range(2))  # fmt: skip
    out = attention_varlen(q, k, v, cq, max(lens_q), cu_seqlens_k=ck, max_seqlen_k=max(lens_k), backend=name)
    want = _block_diag_ref(q, k, v, cq.tolist(), ck.tolist(), 16**-0.5)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    if backend != "fake-flash":
        gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
        got = torch.autograd.grad(out, (q, k, v), gout)
        ref = torch.autograd.grad(want, (q, k, v), gout)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
    # self-attention form: cu_seqlens_k defaults to cu_seqlens
    out = attention_varlen(q, q, q, cq, max(lens_q), backend=name)
    torch.testing.assert_close(out, _block_diag_ref(q, q, q, cq.tolist(), cq.tolist(), 16**-0.5), **TOL[torch.float64])


def test_varlen_bad_offsets():
    q = torch.randn(10, 2, 8, device=DEVICE)
    cu = lambda *x: torch.tensor(x, device=DEVICE)  # noqa: E731
    with pytest.raises(ValueError, match="start at 0 and end at the packed length 10"):
        attention_varlen(q, q, q, cu(0, 4, 9), 5, backend="sdpa")
    with pytest.raises(ValueError, match="non-decreasing"):
        attention_varlen(q, q, q, cu(0, 6, 4, 10), 6, backend="sdpa")
    with pytest.raises(ValueError, match="max_seqlen"):
        attention_varlen(q, q, q, cu(0, 4, 10), 5, backend="sdpa")
    with pytest.raises(TypeError, match="cu_seqlens: expected int32 or int64"):
        attention_varlen(q, q, q, cu(0.0, 10.0), 10)
    with pytest.raises(ValueError, match="queries but no keys"):
        attention_varlen(q, q[:6], q[:6], cu(0, 4, 10), 6, cu_seqlens_k=cu(0, 6, 6), max_seqlen_k=6, backend="eager")
    with pytest.raises(ValueError, match="cu_seqlens_k: required"):
        attention_varlen(q, q[:6], q[:6], cu(0, 10), 10)


# -------------------------------------------------------------------------------------------------- Block
OFFICIAL_BLOCK_KEYS = [
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
]  # fmt: skip


def test_block_state_dict_matches_official_layout():
    blocks = nn.ModuleList([Block(64, 4, drop_path=0.1) for _ in range(2)])
    sd = blocks.state_dict()
    assert list(sd) == [f"{i}.{k}" for i in range(2) for k in OFFICIAL_BLOCK_KEYS]
    shapes = {"attn.qkv.weight": (192, 64), "attn.qkv.bias": (192,), "mlp.fc1.weight": (256, 64),
              "mlp.fc2.weight": (64, 256), "attn.proj.weight": (64, 64)}  # fmt: skip
    for k, s in shapes.items():
        assert tuple(sd[f"1.{k}"].shape) == s
    blk = Block(64, 4)
    assert isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)
    ls = Block(64, 4, init_values=0.1).state_dict()
    assert sorted(ls) == sorted(OFFICIAL_BLOCK_KEYS + ["ls1.gamma", "ls2.gamma"])
    assert torch.equal(ls["ls1.gamma"], torch.full((64,), 0.1))
    # an official-layout state dict loads strictly
    Block(64, 4).load_state_dict({k: v.clone() for k, v in Block(64, 4).state_dict().items()}, strict=True)
    no_bias = Block(64, 4, qkv_bias=False).state_dict()
    assert "attn.qkv.bias" not in no_bias


def official_block(x, sd, num_heads, bias=None, gamma=(None, None), eps=1e-6):
    """The timm 0.3.2 Block forward written out by hand (eval mode): pre-norm attention and MLP with residuals."""
    b, n, c = x.shape
    d = c // num_heads
    h = F.layer_norm(x, (c,), sd["norm1.weight"], sd["norm1.bias"], eps)
    qkv = (h @ sd["attn.qkv.weight"].T + sd["attn.qkv.bias"]).reshape(b, n, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = (q @ k.transpose(-2, -1)) * d**-0.5
    if bias is not None:
        a = a + bias
    a = a.softmax(dim=-1)
    h = (a @ v).transpose(1, 2).reshape(b, n, c)
    h = h @ sd["attn.proj.weight"].T + sd["attn.proj.bias"]
    x = x + (h if gamma[0] is None else gamma[0] * h)
    h = F.layer_norm(x, (c,), sd["norm2.weight"], sd["norm2.bias"], eps)
    h = h @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"]
    h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU
    h = h @ sd["mlp.fc2.weight"].T + sd["mlp.fc2.bias"]
    return x + (h if gamma[1] is None else gamma[1] * h)


@pytest.mark.parametrize("init_values", [None, 0.1])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_block_matches_official_computation(backend, init_values):
    torch.manual_seed(0)
    blk = Block(64, 4, drop_path=0.2, init_values=init_values, attn_backend=backend).to(DEVICE, torch.float64).eval()
    with torch.no_grad():
        for p in blk.parameters():  # no zero biases / unit norms: every parameter must matter
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 1.0))
    sd = blk.state_dict()
    gamma = (sd["ls1.gamma"], sd["ls2.gamma"]) if init_values else (None, None)
    x = torch.randn(3, 50, 64, device=DEVICE, dtype=torch.float64)
    torch.testing.assert_close(blk(x), official_block(x, sd, 4, gamma=gamma), **TOL[torch.float64])
    bias = torch.randn(1, 4, 50, 50, device=DEVICE, dtype=torch.float64)
    torch.testing.assert_close(blk(x, bias), official_block(x, sd, 4, bias, gamma), **TOL[torch.float64])


def test_block_traces_in_one_graph():
    """torch.compile sees through the backend switch (no graph break); the default setter is guarded."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    blk = Block(32, 2).to(DEVICE).eval()
    x = torch.randn(2, 7, 32, device=DEVICE)
    compiled = torch.compile(blk, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), blk(x), rtol=0, atol=0)
    with attention_backend("eager"):
        torch.testing.assert_close(compiled(x), blk(x), rtol=0, atol=0)


def test_block_drop_path_in_training():
    torch.manual_seed(0)
    blk = Block(32, 2, drop_path=0.5).to(DEVICE).train()
    x = torch.randn(64, 5, 32, device=DEVICE)
    out = blk(x)
    # a sample whose both branches were dropped is returned unchanged; with p=0.5 and 64 samples some are
    unchanged = (out == x).flatten(1).all(1)
    assert 0 < unchanged.sum() < 64


def test_init_vit_weights():
    torch.manual_seed(0)
    blk = Block(64, 4)
    with torch.no_grad():
        for p in blk.parameters():
            p.fill_(3.0)
    blk.apply(init_vit_weights)
    for name, m in blk.named_modules():
        if isinstance(m, nn.Linear):
            out_f, in_f = m.weight.shape
            bound = math.sqrt(6.0 / (in_f + out_f))
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound, name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    pe = PatchEmbed(32, 8, 3, 48)
    init_patch_embed_weights(pe)
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 48))
    assert pe.proj.weight.abs().max() <= bound and pe.proj.weight.abs().max() > 0.9 * bound


# ------------------------------------------------------------------------------------- DropPath / LayerScale
def test_drop_path_eval_identity_and_train_per_sample():
    x = torch.randn(256, 3, 5, device=DEVICE) + 2.0
    m = DropPath(0.25)
    m.eval()
    assert m(x) is x
    m.train()
    torch.manual_seed(11)
    y = m(x)
    dropped = (y == 0).flatten(1).all(1)
    kept = (y == x * torch.ones((), device=DEVICE).div(0.75)).flatten(1).all(1)  # survivors scaled by 1/keep
    assert torch.equal(dropped | kept, torch.ones_like(kept)) and not (dropped & kept).any()
    assert 0.15 < dropped.float().mean().item() < 0.35
    torch.manual_seed(11)
    assert torch.equal(m(x), y)  # seeded: reproducible
    g1, g2 = torch.Generator(DEVICE).manual_seed(3), torch.Generator(DEVICE).manual_seed(3)
    a, b = drop_path(x, 0.5, True, generator=g1), drop_path(x, 0.5, True, generator=g2)
    assert torch.equal(a, b) and not torch.equal(a, drop_path(x, 0.5, True, generator=g1))
    assert torch.equal(drop_path(x, 1.0, True), torch.zeros_like(x))
    y = drop_path(x, 0.5, True, scale_by_keep=False)
    assert (((y == 0) | (y == x)).flatten(1).all(1)).all()
    assert drop_path(x, 0.0, True) is x and drop_path(x, 0.9, False) is x
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.5)


def test_layer_scale():
    ls = LayerScale(8, 0.1)
    assert tuple(ls.gamma.shape) == (8,) and torch.equal(ls.gamma.data, torch.full((8,), 0.1))
    with torch.no_grad():
        ls.gamma.copy_(torch.arange(8.0))
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(ls(x), x * torch.arange(8.0), rtol=0, atol=0)
    ls(x).sum().backward()
    torch.testing.assert_close(ls.gamma.grad, x.sum((0, 1)))


def test_mlp():
    torch.manual_seed(0)
    m = Mlp(16, 40, out_features=12)
    x = torch.randn(2, 5, 16)
    want = F.linear(F.gelu(F.linear(x, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    assert [k for k, _ in m.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


# ------------------------------------------------------------------------------------------------ PatchEmbed
@pytest.mark.parametrize("img,patch", [(32, 8), ((16, 24), 8), (28, (7, 4))])
def test_patch_embed_is_patchify_matmul(img, patch):
    torch.manual_seed(0)
    pe = PatchEmbed(img, patch, in_chans=3, embed_dim=24).to(DEVICE, torch.float64)
    (h, w), (ph, pw) = pe.img_size, pe.patch_size
    x = torch.randn(2, 3, h, w, device=DEVICE, dtype=torch.float64)
    gh, gw = h // ph, w // pw
    # MAE-style patchify (channels-first inside a patch to match the conv weight's (C, p_h, p_w) flattening)
    patches = x.reshape(2, 3, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(2, gh * gw, 3 * ph * pw)
    want = patches @ pe.proj.weight.reshape(24, -1).T + pe.proj.bias
    out = pe(x)
    assert out.shape == (2, gh * gw, 24) and pe.num_patches == gh * gw and pe.grid_size == (gh, gw)
    torch.testing.assert_close(out, want, **TOL[torch.float64])


def test_patch_embed_errors():
    pe = PatchEmbed(32, 8, in_chans=3, embed_dim=16)
    with pytest.raises(ValueError, match=r"image size \(32, 32\), got \(32, 24\)"):
        pe(torch.randn(1, 3, 32, 24))
    with pytest.raises(ValueError, match="3 channels, got 1"):
        pe(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        pe(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="must divide img_size"):
        PatchEmbed(30, 8)
    with pytest.raises(ValueError, match="img_size / patch_size"):
        PatchEmbed(32, 0)


# -------------------------------------------------------------------------------------------- sin-cos embed
def numpy_sincos_reference(d, g, cls_token):
    """Independent loop derivation of MAE's layout: token n = i*G + j (row i, col j); channels [0, D/2) encode the
    column j and [D/2, D) the row i, each as D/4 sines then D/4 cosines of pos * 10000^(-c / (D/4))."""
    quarter = d // 4
    out = np.zeros((g * g, d), dtype=np.float64)
    for n in range(g * g):
        i, j = divmod(n, g)
        for half, pos in ((0, j), (1, i)):
            for c in range(quarter):
                omega = 1.0 / 10000.0 ** (2.0 * c / (d / 2.0))
                out[n, half * 2 * quarter + c] = math.sin(pos * omega)
                out[n, half * 2 * quarter + quarter + c] = math.cos(pos * omega)
    if cls_token:
        out = np.concatenate([np.zeros((1, d)), out], 0)
    return out


@pytest.mark.parametrize("d,g", [(768, 14), (512, 14), (16, 5), (4, 3)])
@pytest.mark.parametrize("cls_token", [False, True])
def test_2d_sincos_pos_embed(d, g, cls_token):
    emb = get_2d_sincos_pos_embed(d, g, cls_token=cls_token, dtype=torch.float64)
    assert emb.shape == (g * g + cls_token, d) and emb.dtype == torch.float64
    want = torch.from_numpy(numpy_sincos_reference(d, g, cls_token))
    torch.testing.assert_close(emb, want, rtol=0, atol=1e-12)
    f32 = get_2d_sincos_pos_embed(d, g, cls_token=cls_token)
    assert f32.dtype == torch.float32 and torch.equal(f32, want.float())  # float64 math, then one rounding
    if cls_token:
        assert torch.equal(emb[0], torch.zeros(d, dtype=torch.float64))
    body = emb[1:] if cls_token else emb
    q = d // 4
    # token 1 = (row 0, col 1): the column (first half) moves, the row half stays at sin 0 / cos 1 (MAE's w-first)
    assert body[1, :q].abs().max() > 0.5 and torch.equal(body[1, 2 * q : 3 * q], torch.zeros(q, dtype=torch.float64))
    assert torch.equal(body[1, 3 * q :], torch.ones(q, dtype=torch.float64))


def test_sincos_and_module_arg_errors():
    with pytest.raises(ValueError, match="embed_dim: expected a multiple of 4"):
        get_2d_sincos_pos_embed(7, 4)
    with pytest.raises(ValueError, match="embed_dim: expected a multiple of 4"):
        get_2d_sincos_pos_embed(6, 4)
    with pytest.raises(ValueError, match="grid_size"):
        get_2d_sincos_pos_embed(8, 0)
    with pytest.raises(ValueError, match="dim: expected a positive multiple of num_heads=3"):
        Attention(10, num_heads=3)
    with pytest.raises(ValueError, match="dim: expected a positive multiple of num_heads=3"):
        Block(64, 3)
    with pytest.raises(ValueError, match="num_heads"):
        Attention(64, num_heads=0)
    with pytest.raises(ValueError, match=r"x: expected \(B, L, 32\)"):
        Attention(32, 4)(torch.randn(2, 5, 16))


# ------------------------------------------------------------------------------------- BEiT / CAE attention parts
def test_qv_bias_attention_matches_explicit_bias():
    from mimfast.layers.vit import Attention

    torch.manual_seed(0)
    attn = Attention(16, 2, qkv_bias="qv", backend="eager")
    assert attn.qkv.bias is None and attn.q_bias.shape == (16,) and attn.v_bias.shape == (16,)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(3, 5, 16)
    full = torch.nn.Linear(16, 48)
    with torch.no_grad():
        full.weight.copy_(attn.qkv.weight)
        full.bias.copy_(torch.cat((attn.q_bias, torch.zeros(16), attn.v_bias)))
    ref = Attention(16, 2, qkv_bias=True, backend="eager")
    ref.load_state_dict({"qkv.weight": full.weight, "qkv.bias": full.bias, "proj.weight": attn.proj.weight,
                         "proj.bias": attn.proj.bias})  # fmt: skip
    torch.testing.assert_close(attn(x), ref(x))
    with pytest.raises(ValueError, match="qkv_bias"):
        Attention(16, 2, qkv_bias="k")


def test_relative_position_bias_index_is_beits():
    from mimfast.layers.vit import RelativePositionBias

    rpb = RelativePositionBias((3, 4), num_heads=2)
    idx = rpb.relative_position_index
    n = (2 * 3 - 1) * (2 * 4 - 1) + 3
    assert rpb.relative_position_bias_table.shape == (n, 2) and idx.shape == (13, 13)
    assert idx[0, 0] == n - 1 and (idx[0, 1:] == n - 3).all() and (idx[1:, 0] == n - 2).all()
    # patch (i, j) to patch (k, l): offset (i - k, j - l) shifted to be >= 0, rows of width 2 G_w - 1
    for a in range(12):
        for b in range(12):
            (i, j), (k, m) = divmod(a, 4), divmod(b, 4)
            assert idx[1 + a, 1 + b] == (i - k + 2) * 7 + (j - m + 3)
    assert idx[1:, 1:].unique().numel() == n - 3  # every patch offset has its own entry
    with torch.no_grad():
        rpb.relative_position_bias_table.copy_(torch.randn(n, 2))
    out = rpb()
    assert out.shape == (2, 13, 13)
    torch.testing.assert_close(out[1, 4, 7], rpb.relative_position_bias_table[idx[4, 7], 1])

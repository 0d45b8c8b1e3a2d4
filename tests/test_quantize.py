"""mimfast.quantize: straight-through values and gradients, beta placement, taming equivalence, masks, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mimfast
from conftest import DEVICE


def taming_quantize(z, emb, beta, legacy):
    """A taming-transformers-style quantizer written from its formula: (B, C, H, W) input, d = z^2 + e^2 - 2 z.e."""
    zl = z.permute(0, 2, 3, 1).contiguous()
    zf = zl.view(-1, emb.shape[1])
    d = (zf**2).sum(1, keepdim=True) + (emb**2).sum(1) - 2 * torch.einsum("bd,kd->bk", zf, emb)
    idx = d.argmin(1)
    zq = F.embedding(idx, emb).view(zl.shape)
    if legacy:
        loss = torch.mean((zq.detach() - zl) ** 2) + beta * torch.mean((zq - zl.detach()) ** 2)
    else:
        loss = beta * torch.mean((zq.detach() - zl) ** 2) + torch.mean((zq - zl.detach()) ** 2)
    zq = zl + (zq - zl).detach()
    return zq.permute(0, 3, 1, 2), idx.view(zl.shape[:-1]), loss


@pytest.mark.parametrize("legacy", [True, False])
def test_equivalent_to_taming_quantizer(legacy):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 8, 5, 3, generator=g)
    e0 = torch.randn(40, 8, generator=g)
    outs = []
    for fn in ("taming", "mimfast"):
        z = z0.clone().to(DEVICE).requires_grad_()
        e = e0.clone().to(DEVICE).requires_grad_()
        if fn == "taming":
            q, i, loss = taming_quantize(z, e, 0.25, legacy)
        else:
            q, i, loss = mimfast.quantize(z, e, channel_first=True, legacy_beta=legacy)
        (q.square().sum() + 3 * loss).backward()
        outs.append((q.detach(), i, loss.detach(), z.grad, e.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_beta_placement_by_hand():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 6, generator=g).to(DEVICE)
    e = torch.randn(9, 6, generator=g).to(DEVICE)
    q, i, loss = mimfast.quantize(x, e)
    mse = ((e[i] - x) ** 2).mean()
    torch.testing.assert_close(loss, 1.25 * mse)  # both terms have the same value; their weights differ
    for legacy, want in ((False, 1.0), (True, 0.25)):  # weight of the codebook term = d loss / d codebook scale
        ep = e.clone().requires_grad_()
        mimfast.quantize(x, ep, legacy_beta=legacy)[2].backward()
        ref = 2 * want * torch.zeros_like(e).index_add_(0, i, e[i] - x) / x.numel()
        torch.testing.assert_close(ep.grad, ref)
    _, _, l_ema = mimfast.quantize(x, e, codebook_loss=False)
    torch.testing.assert_close(l_ema, 0.25 * mse)


def test_straight_through_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    e = torch.randn(6, 4, generator=g, dtype=torch.float64) * 3  # well-separated codes: no argmin flips under eps
    x = (e[torch.tensor([0, 3, 5, 1])] + 0.05 * torch.randn(4, 4, generator=g, dtype=torch.float64)).requires_grad_()
    e.requires_grad_()

    # Stop-gradients make each loss term differentiable exactly in one argument: the commitment term in x (the
    # chosen code is locally constant) and the codebook term in the codebook (x held fixed). The straight-through
    # output's backward is the identity by design (its forward is piecewise constant), checked below.
    x0, e0 = x.detach(), e.detach()
    assert torch.autograd.gradcheck(lambda x: mimfast.quantize(x, e0, codebook_loss=False)[2], (x,))
    assert torch.autograd.gradcheck(lambda e: mimfast.quantize(x0, e, commitment_weight=0.0)[2], (e,))
    q, _, _ = mimfast.quantize(x, e)
    (gx,) = torch.autograd.grad(q.sum(), x)
    assert torch.equal(gx, torch.ones_like(x))  # straight-through: identity to x


def test_mask_ignores_positions():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 6, generator=g).to(DEVICE)
    e = torch.randn(7, 6, generator=g).to(DEVICE)
    mask = torch.rand(4, 5, generator=g).to(DEVICE) > 0.4
    q, i, loss, info = mimfast.quantize_with_info(x, e, mask=mask)
    assert (i[~mask] == -1).all() and (i[mask] >= 0).all()
    assert torch.equal(q[~mask], x[~mask])
    torch.testing.assert_close(loss, 1.25 * ((e[i[mask]] - x[mask]) ** 2).mean())
    assert int(info.counts.sum()) == int(mask.sum())
    _, i0, l0 = mimfast.quantize(x, e, mask=torch.zeros_like(mask))
    assert (i0 == -1).all() and l0.item() == 0.0


def test_cosine_int32_and_mixed_dtype():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 8, generator=g).to(DEVICE)
    e = torch.randn(11, 8, generator=g).to(DEVICE)
    q, i, _ = mimfast.quantize(x, e, metric="cosine", index_dtype=torch.int32)
    assert i.dtype == torch.int32
    torch.testing.assert_close(q, F.normalize(e, dim=-1)[i.long()])
    assert torch.equal(i.long(), (F.normalize(x, dim=-1) @ F.normalize(e, dim=-1).T).argmax(1))
    qb, ib, _ = mimfast.quantize(x.bfloat16(), e)
    assert qb.dtype == torch.bfloat16 and qb.shape == x.shape


def test_nan_policy_and_determinism():
    x = torch.randn(20, 4, device=DEVICE)
    e = torch.randn(5, 4, device=DEVICE)
    a, b = mimfast.quantize(x, e), mimfast.quantize(x, e)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="nan_policy"):
        mimfast.quantize(x, e)
    q, i, loss = mimfast.quantize(x, e, nan_policy="mask")
    assert i[3] == -1 and torch.isfinite(loss) and (i[torch.arange(20) != 3] >= 0).all()


@pytest.mark.parametrize(
    "x,e,kw,msg",
    [
        ("no", torch.randn(3, 4), {}, "x: expected a torch.Tensor"),
        (torch.randn(2, 4), torch.randn(12), {}, "codebook: expected a 2-D"),
        (torch.randn(2, 4), torch.randn(3, 5), {}, "does not match codebook's D=5"),
        (torch.randn(4), torch.randn(3, 4), {"channel_first": True}, r"x: expected shape \(B, D, \*spatial\)"),
        (torch.randn(2, 4), torch.randn(3, 4), {"mask": torch.ones(3, dtype=torch.bool)}, "mask: expected a bool"),
        (torch.randn(2, 4), torch.randn(3, 4), {"mask": torch.ones(2)}, "mask: expected a bool"),
        (torch.randn(2, 4), torch.randn(3, 4), {"metric": "dot"}, "metric"),
        (torch.randn(2, 4), torch.randn(3, 4), {"commitment_weight": -1.0}, "commitment_weight"),
        (torch.randn(2, 4), torch.randn(3, 4), {"nan_policy": "zero"}, "nan_policy"),
        (torch.ones(2, 4, dtype=torch.int64), torch.randn(3, 4), {}, "dtype"),
        (torch.randn(2, 4), torch.randn(0, 4), {}, "at least one code"),
    ],
)
def test_bad_inputs(x, e, kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        mimfast.quantize(x, e, **kw)


def test_usage_stats():
    u = mimfast.usage_stats(torch.full((16,), 5))
    assert abs(u["perplexity"].item() - 16) < 1e-4 and u["used_fraction"].item() == 1.0
    u = mimfast.usage_stats(torch.tensor([0, 9, 0, 0]))
    assert abs(u["perplexity"].item() - 1) < 1e-6 and u["used_fraction"].item() == 0.25


def test_autocast_search_precision():
    """Under bf16 autocast, bf16 activations with an fp32 codebook search with bf16 products (the tensor-core
    path), exactly as ``precision="bf16"`` does; the output codes, loss and gradients stay in the inputs' dtypes."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 16, 5, 5, generator=g).bfloat16().to(DEVICE).requires_grad_()
    emb = torch.nn.Parameter(torch.randn(64, 16, generator=g).to(DEVICE))
    dev = torch.device(DEVICE).type
    with torch.autocast(dev, dtype=torch.bfloat16):
        q, idx, loss = mimfast.quantize(z, emb, channel_first=True)
    q2, idx2, loss2 = mimfast.quantize(z, emb, channel_first=True, precision="bf16")
    assert torch.equal(idx, idx2) and torch.equal(q, q2) and torch.equal(loss, loss2)
    assert q.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert z.grad is not None and emb.grad is not None and torch.isfinite(emb.grad).all()
    # the search itself agrees with the reference's rule (rounded operands, fp32 norms)
    zf = z.detach().movedim(1, -1).reshape(-1, 16)
    ref, _, _ = mimfast.kernels.vq_search_ref(zf, emb.detach(), precision="bf16")
    assert torch.equal(idx.reshape(-1).cpu(), ref.cpu())
    with pytest.raises(ValueError, match="precision"):
        mimfast.quantize(z, emb, channel_first=True, precision="fp8")

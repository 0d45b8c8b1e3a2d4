"""mimfast.losses: PatchNCE and PCL against naive float64 references, and VQGANLoss's semantics.

The references below compute each loss a second way (explicit loops, exp and sums in float64), sharing only the
documented sampling contract (one ``torch.randperm(H*W, generator)[:num_patches]`` per layer, in layer order).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimfast.layers import NLayerDiscriminator
from mimfast.losses import (
    VQGANLoss,
    hinge_d_loss,
    patch_nce_loss,
    pcl_position_weights,
    probabilistic_contrastive_loss,
    vanilla_d_loss,
)


# ------------------------------------------------------------------------------------------------ references
def _locations(hw: int, num_patches, gen) -> list[int]:
    if num_patches is None or num_patches >= hw:
        return list(range(hw))
    return torch.randperm(hw, generator=gen)[:num_patches].tolist()


def naive_nce(feat_q, feat_k, tau, num_patches=None, gen=None, mult=None, negatives="sum", weight_mode="logit"):
    """Loop reference. ``mult``: per layer (B, H, W) multipliers (None = PatchNCE)."""
    qs = feat_q if isinstance(feat_q, list) else [feat_q]
    ks = feat_k if isinstance(feat_k, list) else [feat_k]
    mults = mult if isinstance(mult, list) else [mult] * len(qs)
    layer_losses = []
    for q, k, m in zip(qs, ks, mults, strict=True):
        b, c, h, w = q.shape
        locs = _locations(h * w, num_patches, gen)
        terms = []
        for n in range(b):
            qv = [q[n].double().reshape(c, -1)[:, i] for i in locs]
            kv = [k[n].double().reshape(c, -1)[:, i] for i in locs]
            qv = [v / v.norm() for v in qv]
            kv = [v / v.norm() for v in kv]
            for a, i in enumerate(locs):
                mi = 1.0 if m is None else float(m[n].reshape(-1)[i])
                pos_logit = float(qv[a] @ kv[a]) / tau
                if weight_mode == "logit":
                    pos_logit *= mi
                neg = sum(math.exp(float(qv[a] @ kv[j]) / tau) for j in range(len(locs)) if j != a)
                if negatives == "mean":
                    neg /= len(locs) - 1
                term = -math.log(math.exp(pos_logit) / (math.exp(pos_logit) + neg))
                terms.append(term * (mi if weight_mode == "loss" else 1.0))
        layer_losses.append(sum(terms) / len(terms))
    return sum(layer_losses) / len(layer_losses)


def naive_multipliers(weights: torch.Tensor, floor: float) -> torch.Tensor:
    """N * ((1 - floor) * w / sum(w) + floor / N) per image; uniform for an all-zero image."""
    out = torch.empty_like(weights, dtype=torch.float64)
    for n in range(weights.shape[0]):
        w = weights[n].double()
        count = w.numel()
        p = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / count)
        out[n] = count * ((1 - floor) * p + floor / count)
    return out


def _feats(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ------------------------------------------------------------------------------------------------ PatchNCE
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_patch_nce_matches_naive_reference(tau):
    q, k = _feats(2, 5, 3, 4, seed=1), _feats(2, 5, 3, 4, seed=2)
    got = patch_nce_loss(q, k, tau=tau, num_patches=None)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(naive_nce(q, k, tau), rel=1e-5)


def test_patch_nce_sampled_locations_and_layers_match_naive_reference():
    qs = [_feats(2, 4, 5, 5, seed=3), _feats(2, 6, 3, 3, seed=4)]
    ks = [_feats(2, 4, 5, 5, seed=5), _feats(2, 6, 3, 3, seed=6)]
    got = patch_nce_loss(qs, ks, tau=0.1, num_patches=7, generator=torch.Generator().manual_seed(11))
    want = naive_nce(qs, ks, 0.1, num_patches=7, gen=torch.Generator().manual_seed(11))
    assert got.item() == pytest.approx(want, rel=1e-5)
    # a layer with no more locations than num_patches uses all of them (and draws no random numbers)
    full = patch_nce_loss(qs[1], ks[1], tau=0.1, num_patches=9)
    assert full.item() == pytest.approx(naive_nce(qs[1], ks[1], 0.1), rel=1e-5)


def test_patch_nce_lower_for_identical_features():
    for seed in range(3):
        k = _feats(2, 16, 6, 6, seed=seed)
        same = patch_nce_loss(k.clone(), k, num_patches=None)
        rand = patch_nce_loss(_feats(2, 16, 6, 6, seed=seed + 100), k, num_patches=None)
        assert same < rand
        # moving the reconstruction towards the input lowers the loss
        half = patch_nce_loss(0.5 * k + 0.5 * _feats(2, 16, 6, 6, seed=seed + 100), k, num_patches=None)
        assert same < half < rand


def test_patch_nce_seeded_determinism():
    q, k = _feats(3, 8, 8, 8, seed=7), _feats(3, 8, 8, 8, seed=8)
    a = patch_nce_loss(q, k, num_patches=10, generator=torch.Generator().manual_seed(0))
    b = patch_nce_loss(q, k, num_patches=10, generator=torch.Generator().manual_seed(0))
    c = patch_nce_loss(q, k, num_patches=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_patch_nce_gradcheck_and_low_precision():
    q = _feats(1, 3, 2, 3, seed=9, dtype=torch.float64).requires_grad_()
    k = _feats(1, 3, 2, 3, seed=10, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: patch_nce_loss(a, b, tau=0.3, num_patches=None), (q, k))
    qb, kb = q.detach().bfloat16(), k.detach().bfloat16()
    lo = patch_nce_loss(qb, kb, tau=0.3, num_patches=None)
    assert lo.dtype == torch.float32
    assert lo.item() == pytest.approx(naive_nce(qb.double(), kb.double(), 0.3), rel=1e-5)


# ------------------------------------------------------------------------------------------------ PCL
def test_pcl_position_weights_floor_and_normalisation():
    w = torch.tensor([[[0.0, 1.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]])
    m = pcl_position_weights(w, floor=0.2)
    torch.testing.assert_close(m.double(), naive_multipliers(w, 0.2))
    assert m[0, 0, 0].item() == pytest.approx(0.2) and m[0, 1, 1].item() == pytest.approx(0.2)  # argmax: the floor
    assert m[0, 1, 0].item() == pytest.approx(0.2 + 0.8 * 4 * 3 / 4)
    torch.testing.assert_close(m.mean(dim=(1, 2)), torch.ones(3))  # mean 1 per image
    assert torch.equal(m[1], torch.ones(2, 2)) and torch.allclose(m[2], torch.ones(2, 2))
    assert torch.allclose(pcl_position_weights(w, floor=1.0), torch.ones(3, 2, 2))
    assert torch.equal(pcl_position_weights(w, floor=0.0)[0] == 0, w[0] == 0)


@pytest.mark.parametrize("weight_mode", ["logit", "loss"])
@pytest.mark.parametrize("negatives", ["mean", "sum"])
def test_pcl_matches_naive_reference(weight_mode, negatives):
    q, k = _feats(2, 5, 3, 4, seed=12), _feats(2, 5, 3, 4, seed=13)
    w = _feats(2, 3, 4, seed=14).abs() * (_feats(2, 3, 4, seed=15) > 0)  # zeros where "argmax"
    got = probabilistic_contrastive_loss(
        q, k, w, tau=0.2, num_patches=None, floor=0.1, negatives=negatives, weight_mode=weight_mode
    )
    want = naive_nce(q, k, 0.2, mult=naive_multipliers(w, 0.1), negatives=negatives, weight_mode=weight_mode)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # the weights matter
    plain = probabilistic_contrastive_loss(
        q, k, torch.ones_like(w), tau=0.2, num_patches=None, negatives=negatives, weight_mode=weight_mode
    )
    assert abs(got.item() - plain.item()) > 1e-3


@pytest.mark.parametrize("weight_mode", ["logit", "loss"])
def test_pcl_equals_patch_nce_when_weights_are_uniform(weight_mode):
    """Condition: negatives="sum" and every multiplier 1, i.e. equal weights within each image (all-zero included)
    or floor == 1. Same tau, num_patches and generator seed."""
    qs = [_feats(2, 4, 6, 6, seed=16), _feats(2, 4, 3, 3, seed=17)]
    ks = [_feats(2, 4, 6, 6, seed=18), _feats(2, 4, 3, 3, seed=19)]
    ref = patch_nce_loss(qs, ks, tau=0.07, num_patches=16, generator=torch.Generator().manual_seed(3))
    per_image_const = torch.tensor([0.7, 3.0]).view(2, 1, 1).expand(2, 3, 3).contiguous()
    random_w = _feats(2, 3, 3, seed=20).abs()
    for w, floor in ((per_image_const, 0.1), (torch.zeros(2, 3, 3), 0.1), (random_w, 1.0)):
        got = probabilistic_contrastive_loss(
            qs,
            ks,
            w,
            tau=0.07,
            num_patches=16,
            floor=floor,
            negatives="sum",
            weight_mode=weight_mode,
            generator=torch.Generator().manual_seed(3),
        )
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # ...and not otherwise
    other = probabilistic_contrastive_loss(
        qs,
        ks,
        random_w,
        tau=0.07,
        num_patches=16,
        floor=0.1,
        negatives="sum",
        weight_mode=weight_mode,
        generator=torch.Generator().manual_seed(3),
    )
    assert abs(other.item() - ref.item()) > 1e-3


def test_pcl_floor_zero_removes_argmax_positions_in_loss_mode():
    q = _feats(1, 4, 2, 3, seed=21).requires_grad_()
    k = _feats(1, 4, 2, 3, seed=22)
    w = torch.tensor([[[0.0, 1.0, 2.0], [0.0, 0.5, 0.0]]])
    for floor in (0.0, 0.25):
        q.grad = None
        probabilistic_contrastive_loss(q, k, w, num_patches=None, floor=floor, weight_mode="loss").backward()
        g = q.grad.norm(dim=1)[0]  # (2, 3) gradient norm per location
        if floor == 0.0:
            assert torch.equal(g[w[0] == 0], torch.zeros(3))  # argmax positions do not contribute
        else:
            assert (g[w[0] == 0] > 0).all()  # the floor keeps them in
        assert (g[w[0] > 0] > 0).all()


@pytest.mark.parametrize("resize", ["area", "nearest"])
def test_pcl_resizes_weights_to_each_feature_map(resize):
    w = _feats(2, 2, 2, seed=23).abs()  # token grid 2x2
    w[0, 0, 1] = 0.0
    m = naive_multipliers(w, 0.1)
    qs = [_feats(2, 3, 4, 4, seed=24), _feats(2, 3, 3, 3, seed=25), _feats(2, 3, 2, 2, seed=26)]
    ks = [_feats(2, 3, 4, 4, seed=27), _feats(2, 3, 3, 3, seed=28), _feats(2, 3, 2, 2, seed=29)]
    up2 = m.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # integer upsampling: replicate (both modes)
    idx = torch.tensor([0, 1, 1])  # 2 -> 3: nearest-exact takes floor((i + 0.5) * 2 / 3)
    up15 = m[:, idx][:, :, idx] if resize == "nearest" else F.adaptive_avg_pool2d(m[:, None], 3)[:, 0]
    got = probabilistic_contrastive_loss(qs, ks, w, tau=0.3, num_patches=None, resize=resize)
    want = naive_nce(qs, ks, 0.3, mult=[up2, up15, m], negatives="mean")
    assert got.item() == pytest.approx(want, rel=1e-5)
    # downsampling (token grid 4x4 -> 2x2 feature map): area averages, nearest picks
    w4 = _feats(1, 4, 4, seed=30).abs()
    m4 = naive_multipliers(w4, 0.1)
    down = F.avg_pool2d(m4[:, None], 2)[:, 0] if resize == "area" else m4[:, 1::2, 1::2]
    got = probabilistic_contrastive_loss(qs[2][:1], ks[2][:1], w4, tau=0.3, num_patches=None, resize=resize)
    assert got.item() == pytest.approx(naive_nce(qs[2][:1], ks[2][:1], 0.3, mult=down, negatives="mean"), rel=1e-5)


def test_pcl_seeded_and_sampled_matches_naive():
    q, k = _feats(2, 4, 5, 5, seed=31), _feats(2, 4, 5, 5, seed=32)
    w = _feats(2, 5, 5, seed=33).abs()
    got = probabilistic_contrastive_loss(q, k, w, num_patches=6, generator=torch.Generator().manual_seed(5))
    want = naive_nce(
        q,
        k,
        0.07,
        num_patches=6,
        gen=torch.Generator().manual_seed(5),
        mult=naive_multipliers(w, 0.1),
        negatives="mean",
    )
    assert got.item() == pytest.approx(want, rel=1e-5)
    again = probabilistic_contrastive_loss(q, k, w, num_patches=6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, again)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_contrastive_bad_inputs_name_the_argument():
    q, k, w = _feats(2, 3, 4, 4), _feats(2, 3, 4, 4, seed=1), torch.rand(2, 4, 4)
    for tau in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau"):
            patch_nce_loss(q, k, tau=tau)
        with pytest.raises(ValueError, match="tau"):
            probabilistic_contrastive_loss(q, k, w, tau=tau)
    with pytest.raises(ValueError, match=r"feat_q, feat_k: expected equal shapes"):
        patch_nce_loss(q, k[:, :, :3])
    with pytest.raises(ValueError, match="same number of layers"):
        patch_nce_loss([q, q], [k])
    with pytest.raises(ValueError, match=r"feat_q.*\(B, C, H, W\)"):
        patch_nce_loss(q[0], k[0])
    with pytest.raises(ValueError, match="H\\*W >= 2"):
        patch_nce_loss(q[:, :, :1, :1], k[:, :, :1, :1])
    with pytest.raises(ValueError, match="num_patches"):
        patch_nce_loss(q, k, num_patches=1)
    with pytest.raises(TypeError, match="generator"):
        patch_nce_loss(q, k, generator=0)
    with pytest.raises(ValueError, match="weights: expected finite values >= 0, got negative"):
        probabilistic_contrastive_loss(q, k, -w)
    with pytest.raises(ValueError, match="weights: expected finite values >= 0, got non-finite"):
        probabilistic_contrastive_loss(q, k, w * float("nan"))
    with pytest.raises(ValueError, match="weights: expected a batch of 2"):
        probabilistic_contrastive_loss(q, k, w[:1])
    with pytest.raises(ValueError, match=r"weights: expected a non-empty floating tensor \(B, h, w\)"):
        probabilistic_contrastive_loss(q, k, w[0])
    for name, kw in (
        ("floor", dict(floor=1.5)),
        ("floor", dict(floor=-0.1)),
        ("negatives", dict(negatives="max")),
        ("weight_mode", dict(weight_mode="x")),
        ("resize", dict(resize="bilinear")),
    ):
        with pytest.raises(ValueError, match=name):
            probabilistic_contrastive_loss(q, k, w, **kw)


# ------------------------------------------------------------------------------------------------ VQGANLoss
class ChannelMeanD(nn.Module):
    """Stub discriminator: logits = channel mean of the image times a learnable scale (1.0)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return x.mean(dim=1, keepdim=True) * self.scale


def _images_with_logits(values) -> torch.Tensor:
    """(1, 3, 2, 2) images whose channel mean is ``values`` (2x2) exactly."""
    v = torch.tensor(values, dtype=torch.float32).view(1, 1, 2, 2)
    return torch.cat([v - 0.5, v, v + 0.5], dim=1)


REAL = [[2.0, 0.5], [-1.0, 0.0]]  # relu(1 - x) = 0, 0.5, 2, 1       -> mean 0.875
FAKE = [[-3.0, -0.5], [1.0, 0.25]]  # relu(1 + x) = 0, 0.5, 2, 1.25  -> mean 0.9375


def test_hinge_and_disc_start_on_hand_made_logits():
    x, base = _images_with_logits(REAL), _images_with_logits(FAKE)
    scale = nn.Parameter(torch.tensor(1.0))  # the "decoder's last layer"
    crit = VQGANLoss(discriminator=ChannelMeanD(), disc_start=10, disc_factor=0.5, rec_weight=2.0, codebook_weight=3.0)
    cb = torch.tensor([0.25, 0.75])
    l1 = (x - base).abs().mean()
    for step, factor in ((0, 0.0), (9, 0.0), (10, 0.5), (1000, 0.5)):
        d, d_logs = crit.discriminator_loss(x, base * scale, global_step=step)
        assert d.item() == factor * 0.5 * (0.875 + 0.9375)
        assert d_logs["disc_factor"].item() == factor
        assert d_logs["logits_real"].item() == pytest.approx(0.375)
        assert d_logs["logits_fake"].item() == pytest.approx(-0.5625)
        g, g_logs = crit.generator_loss(x, base * scale, global_step=step, codebook_loss=cb, last_layer=scale)
        assert g_logs["g_loss"].item() == pytest.approx(0.5625)  # -mean(fake logits), logged before the start too
        nll = 2.0 * l1 + 3.0 * 0.5
        if factor == 0:
            assert g.item() == pytest.approx(nll.item(), abs=1e-6) and g_logs["d_weight"].item() == 0
        else:
            assert g_logs["d_weight"].item() > 0
            assert g.item() == pytest.approx(nll.item() + g_logs["d_weight"].item() * factor * 0.5625, rel=1e-6)
    assert hinge_d_loss(_images_with_logits(REAL)[:, 1], _images_with_logits(FAKE)[:, 1]).item() == 0.90625
    sp = lambda t: math.log1p(math.exp(t))  # noqa: E731
    want = 0.5 * (sum(sp(-v) for r in REAL for v in r) / 4 + sum(sp(v) for r in FAKE for v in r) / 4)
    vd = VQGANLoss(discriminator=ChannelMeanD(), disc_loss="vanilla")
    assert vd.discriminator_loss(x, base, global_step=0)[0].item() == pytest.approx(want, rel=1e-6)
    assert vanilla_d_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.relu(self.conv_in(z)))


class TinyExtractor(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 8, 3, stride=2, padding=1)

    def forward(self, x):
        f1 = F.relu(self.a(x))
        return [f1, self.b(f1)]


def _setup(seed=0, **kw):
    torch.manual_seed(seed)
    dec, ext = TinyDecoder(), TinyExtractor()
    kw = {"discriminator": "patchgan", "disc_ndf": 8, "disc_layers": 2, "perceptual_weight": 0.7, **kw}
    crit = VQGANLoss(feature_extractor=ext, **kw)
    z, x = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 16, 16)
    return dec, crit, z, x


def test_adaptive_weight_matches_manual_autograd():
    dec, crit, z, x = _setup(disc_weight=0.8, rec_weight=1.5)
    rec = dec(z)
    loss, logs = crit.generator_loss(
        x, rec, global_step=0, codebook_loss=torch.tensor(0.3), last_layer=dec.conv_out.weight
    )
    # second computation, by hand
    l1 = (x - rec).abs().mean()
    p = 0.0
    for fx, fy in zip(crit.feature_extractor(x), crit.feature_extractor(rec), strict=True):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        p = p + ((nx - ny) ** 2).mean() / 2
    nll = 1.5 * l1 + 0.7 * p
    g = -crit.discriminator(rec).mean()
    gn = torch.autograd.grad(nll, dec.conv_out.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, dec.conv_out.weight, retain_graph=True)[0].norm()
    d_weight = (gn / (gg + 1e-4)).clamp(0, 1e4) * 0.8
    torch.testing.assert_close(logs["d_weight"], d_weight.detach())
    torch.testing.assert_close(logs["perceptual"], p.detach())
    torch.testing.assert_close(loss, nll + 0.3 + d_weight.detach() * g, rtol=1e-5, atol=1e-6)
    assert all(v.dim() == 0 and not v.requires_grad for v in logs.values())
    # no gradients available (evaluation): taming's fallback to 0
    with torch.no_grad():
        _, eval_logs = crit.generator_loss(x, dec(z), global_step=0)
    assert eval_logs["d_weight"].item() == 0
    # training without last_layer, or with a weight that is not in the graph: a clear error
    with pytest.raises(ValueError, match="last_layer"):
        crit.generator_loss(x, dec(z), global_step=0)
    with pytest.raises(ValueError, match="last_layer"):
        crit.generator_loss(x, dec(z), global_step=0, last_layer=nn.Parameter(torch.ones(1)))
    fixed = VQGANLoss(discriminator=ChannelMeanD(), adaptive_weight=False, disc_weight=0.3)
    assert fixed.generator_loss(x, dec(z), global_step=0)[1]["d_weight"].item() == pytest.approx(0.3)


def _grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def test_generator_and_discriminator_gradients_are_isolated():
    dec, crit, z, x = _setup(contrastive="patchnce")
    gen_params, disc_params = list(dec.parameters()), crit.discriminator_parameters()
    assert len(disc_params) > 0 and not any(p.requires_grad for p in crit.feature_extractor.parameters())

    def run(which):
        for p in gen_params + disc_params:
            p.grad = None
        rec = dec(z)
        g, _ = crit.generator_loss(
            x, rec, global_step=0, last_layer=dec.conv_out.weight, generator=torch.Generator().manual_seed(0)
        )
        d, _ = crit.discriminator_loss(x, rec, global_step=0)
        {"g": g, "d": d, "sum": g + d}[which].backward()
        return _grads(gen_params), _grads(disc_params)

    g_gen, g_disc = run("g")
    assert all(t is None for t in g_disc)  # the generator loss gives the discriminator nothing
    assert all(t is not None and t.abs().sum() > 0 for t in g_gen)
    d_gen, d_disc = run("d")
    assert all(t is None for t in d_gen)  # the discriminator loss gives the generator nothing
    assert all(t is not None for t in d_disc) and sum(t.abs().sum() for t in d_disc) > 0
    s_gen, s_disc = run("sum")  # one backward of the sum == each side alone
    for a, b in zip(s_gen, g_gen, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(s_disc, d_disc, strict=True):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in crit.feature_extractor.parameters())


def test_vqgan_loss_contrastive_terms():
    dec, crit, z, x = _setup(contrastive="pcl", contrastive_num_patches=20, discriminator=None)
    rec = dec(z)
    w = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="pcl_weights"):
        crit.generator_loss(x, rec, global_step=0)
    loss, logs = crit.generator_loss(x, rec, global_step=0, pcl_weights=w, generator=torch.Generator().manual_seed(1))
    feats_r, feats_x = crit.feature_extractor(rec), crit.feature_extractor(x)
    want = probabilistic_contrastive_loss(
        feats_r, feats_x, w, num_patches=20, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(logs["contrastive"], want.detach())
    torch.testing.assert_close(loss.detach(), logs["nll"] + want.detach())
    assert "g_loss" not in logs
    d, d_logs = crit.discriminator_loss(x, rec, global_step=0)
    assert d.item() == 0 and not d.requires_grad


def test_vqgan_loss_bad_inputs_name_the_argument():
    x = torch.randn(2, 3, 8, 8)
    crit = VQGANLoss(discriminator=ChannelMeanD())
    with pytest.raises(ValueError, match="inputs, reconstructions: expected equal shapes"):
        crit.generator_loss(x, x[:, :, :4], global_step=0)
    with pytest.raises(ValueError, match="inputs, reconstructions"):
        crit.discriminator_loss(x, x[:1], global_step=0)
    with pytest.raises(ValueError, match="reconstructions: expected a non-empty floating image batch"):
        crit.generator_loss(x, x[0], global_step=0)
    with pytest.raises(ValueError, match="global_step"):
        crit.discriminator_loss(x, x, global_step=-1)
    for name in ("rec_weight", "perceptual_weight", "contrastive_weight", "codebook_weight", "disc_weight"):
        with pytest.raises(ValueError, match=name):
            VQGANLoss(**{name: -1.0})
    for tau in (0.0, -0.5):
        with pytest.raises(ValueError, match="contrastive_tau"):
            VQGANLoss(feature_extractor=TinyExtractor(), contrastive="patchnce", contrastive_tau=tau)
    with pytest.raises(ValueError, match="feature_extractor"):
        VQGANLoss(contrastive="patchnce")
    for kw, name in (
        (dict(contrastive="nce"), "contrastive"),
        (dict(disc_loss="wgan"), "disc_loss"),
        (dict(disc_start=-5), "disc_start"),
        (dict(discriminator="stylegan"), "discriminator"),
        (dict(disc_norm="layer"), "norm"),
        (dict(pcl_floor=2.0), "pcl_floor"),
        (dict(pcl_negatives="x"), "pcl_negatives"),
    ):
        with pytest.raises(ValueError, match=name):
            VQGANLoss(**kw)


# ------------------------------------------------------------------------------------------------ PatchGAN
def test_nlayer_discriminator_matches_taming_layout():
    d = NLayerDiscriminator()  # ndf 64, 3 layers, BatchNorm
    assert sum(p.numel() for p in d.parameters()) == 2_765_633  # pix2pix's 70x70 PatchGAN
    convs = [m for m in d.main if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1] and all(c.kernel_size == (4, 4) for c in convs)
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert {"main.0.weight", "main.3.running_mean", "main.9.weight", "main.11.bias"} <= set(d.state_dict())
    small = NLayerDiscriminator(3, ndf=8, n_layers=3, norm="group")
    assert small(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # H / 8 - 2
    assert [c.bias is not None for c in small.main if isinstance(c, nn.Conv2d)] == [True, False, False, False, True]
    none = NLayerDiscriminator(3, ndf=8, norm="none")
    assert all(c.bias is not None for c in none.main if isinstance(c, nn.Conv2d))
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        small(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="ndf"):
        NLayerDiscriminator(ndf=0)

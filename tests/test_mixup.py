"""Mixup / CutMix with label smoothing (mimfast.train.mixup): targets, boxes, reproducibility, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mimfast.train.mixup import Mixup, smooth_one_hot, soft_target_cross_entropy


def _batch(b=8, c=3, h=16, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.randint(0, 10, (b,), generator=g)


@pytest.mark.parametrize("mix,cut", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0), (0.0, 0.0)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_targets_sum_to_one_and_match_lam(mix, cut, smoothing):
    m = Mixup(10, mixup_alpha=mix, cutmix_alpha=cut, smoothing=smoothing)
    rng = np.random.default_rng(3)
    for _ in range(20):
        x, y = _batch()
        _, t, d = m.mix(x, y, rng)
        assert t.dtype == torch.float32 and t.shape == (8, 10)
        torch.testing.assert_close(t.sum(1), torch.ones(8), rtol=0, atol=1e-6)
        assert (t >= 0).all()
        ref = d.lam * smooth_one_hot(y, 10, smoothing) + (1 - d.lam) * smooth_one_hot(y.flip(0), 10, smoothing)
        torch.testing.assert_close(t, ref)
        if mix == 0 and cut == 0:
            assert d.method == "none" and d.lam == 1.0


def test_smoothing_values():
    t = smooth_one_hot(torch.tensor([2, 0]), 5, 0.1)
    assert t[0, 2].item() == pytest.approx(0.9 + 0.02) and t[0, 0].item() == pytest.approx(0.02)
    torch.testing.assert_close(t.sum(1), torch.ones(2))


def test_mixup_blends_with_reversed_batch():
    m = Mixup(10, mixup_alpha=0.8, cutmix_alpha=0.0)
    x, y = _batch()
    orig = x.clone()
    out, _, d = m.mix(x, y, np.random.default_rng(1))
    assert d.method == "mixup" and 0 < d.lam < 1
    torch.testing.assert_close(out, d.lam * orig + (1 - d.lam) * orig.flip(0))


def test_cutmix_box_and_area_corrected_lam():
    m = Mixup(10, mixup_alpha=0.0, cutmix_alpha=1.0)
    rng = np.random.default_rng(5)
    seen = 0
    for _ in range(30):
        x, y = _batch(h=16, w=12)
        orig = x.clone()
        out, _, d = m.mix(x, y, rng)
        assert d.method == "cutmix"
        y0, y1, x0, x1 = d.box
        assert 0 <= y0 <= y1 <= 16 and 0 <= x0 <= x1 <= 12
        inside = torch.zeros(16, 12, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        torch.testing.assert_close(out[:, :, inside], orig.flip(0)[:, :, inside])
        torch.testing.assert_close(out[:, :, ~inside], orig[:, :, ~inside])
        assert d.lam == pytest.approx(1 - inside.sum().item() / (16 * 12))
        seen += inside.any().item()
    assert seen > 10  # boxes are not all empty


def test_switch_and_prob():
    rng = np.random.default_rng(0)
    m = Mixup(10, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    methods = [m.draw(16, 16, rng).method for _ in range(400)]
    frac = methods.count("cutmix") / len(methods)
    assert 0.4 < frac < 0.6 and "none" not in methods
    m = Mixup(10, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.25)
    methods = [m.draw(16, 16, rng).method for _ in range(400)]
    assert 0.15 < 1 - methods.count("none") / 400 < 0.35
    assert not Mixup(10, mixup_alpha=0.8, prob=0.0).active


def test_reproducible_from_the_seed_and_global_rng():
    m = Mixup(10, mixup_alpha=0.8, cutmix_alpha=1.0)
    outs = []
    for _ in range(2):
        np.random.seed(123)  # the launcher seeds NumPy's global generator and saves it in every checkpoint
        x, y = _batch(seed=4)
        outs.append([m.mix(x.clone(), y)[:2] for _ in range(5)])
    for (a1, t1), (a2, t2) in zip(outs[0], outs[1], strict=True):
        assert torch.equal(a1, a2) and torch.equal(t1, t2)
    np.random.seed(124)
    x, y = _batch(seed=4)
    other = [m.mix(x.clone(), y)[1] for _ in range(5)]
    assert any(not torch.equal(a, b) for a, b in zip(other, [t for _, t in outs[0]], strict=True))


def test_soft_target_ce_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 7, generator=g)
    y = torch.randint(0, 7, (6,), generator=g)
    ce = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    torch.testing.assert_close(soft_target_cross_entropy(logits, smooth_one_hot(y, 7, 0.1)), ce)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=10, mixup_alpha=-1), "mixup_alpha"),
        (dict(num_classes=10, cutmix_alpha=float("nan")), "cutmix_alpha"),
        (dict(num_classes=10, prob=2.0), "prob"),
        (dict(num_classes=10, switch_prob=-0.1), "switch_prob"),
        (dict(num_classes=10, smoothing=1.0), "smoothing"),
    ],
)
def test_bad_arguments(kwargs, match):
    n = kwargs.pop("num_classes")
    with pytest.raises(ValueError, match=match):
        Mixup(n, **kwargs)


def test_bad_batches():
    m = Mixup(10)
    x, y = _batch(b=7)
    with pytest.raises(ValueError, match="even batch"):
        m.mix(x, y)
    x, y = _batch()
    with pytest.raises(ValueError, match="labels"):
        m.mix(x, y[:3])
    with pytest.raises(ValueError, match="images"):
        m.mix(x[0], y)

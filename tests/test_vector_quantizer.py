"""mimfast.VectorQuantizer: EMA statistics vs a one-hot reference, dead-code restart, k-means init, modes, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mimfast
from conftest import DEVICE


def clustered(n, d, clusters, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g) * 4
    return (centres[torch.randint(0, clusters, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)).to(DEVICE)


def test_ema_matches_one_hot_reference():
    k, d, decay, eps = 16, 8, 0.9, 1e-5
    vq = mimfast.VectorQuantizer(d, k, decay=decay, eps=eps).to(DEVICE)
    embed, cs, avg = vq.embed.clone(), vq.cluster_size.clone(), vq.embed_avg.clone()
    for step in range(4):
        x = clustered(200, d, 10, seed=step)
        _, idx, _ = vq(x)
        onehot = F.one_hot(torch.cdist(x, embed).argmin(1), k).float()  # the reference, one-hot GEMM style
        assert torch.equal(idx, onehot.argmax(1))
        cs = decay * cs + (1 - decay) * onehot.sum(0)
        avg = decay * avg + (1 - decay) * onehot.T @ x
        n = cs.sum()
        embed = avg / ((cs + eps) / (n + k * eps) * n)[:, None]
        torch.testing.assert_close(vq.cluster_size, cs)
        torch.testing.assert_close(vq.embed_avg, avg, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vq.embed, embed, rtol=1e-5, atol=1e-5)


def test_dead_code_restart_revives_codes():
    d, k = 8, 32
    x = clustered(512, d, 32, seed=1)
    used = {}
    for threshold in (0.0, 1.0):
        torch.manual_seed(0)
        vq = mimfast.VectorQuantizer(d, k, decay=0.8, threshold_ema_dead_code=threshold).to(DEVICE)
        vq.embed.copy_(torch.randn(k, d, device=DEVICE) * 0.01 + 100)  # far from every data point
        vq.embed[0] = x[0]  # one live code collects every vector
        vq.embed_avg.copy_(vq.embed)
        for _ in range(10):
            vq(x)
        vq.eval()
        vq(x)
        used[threshold] = vq.usage()["used_fraction"].item()
        if threshold:
            restarted = vq.cluster_size == threshold
            assert restarted.any()
            # restarted codes are batch vectors (up to the EMA update of later steps) with a consistent EMA state
            dist = torch.cdist(vq.embed[restarted], x).min(1).values
            assert (dist < 1e-4).all()
    assert used[0.0] <= 2 / k, used
    assert used[1.0] >= 0.5, used


def test_kmeans_init_first_batch_only():
    x = clustered(600, 6, 12, seed=2)
    vq = mimfast.VectorQuantizer(6, 12, kmeans_init=True, kmeans_iters=10).to(DEVICE)
    rnd = mimfast.VectorQuantizer(6, 12).to(DEVICE)
    assert not bool(vq.initted)
    _, _, loss = vq(x)
    assert bool(vq.initted)
    before = vq.embed.clone()
    vq.eval()
    rnd.eval()
    assert vq(x)[2] < 0.5 * rnd(x)[2]
    assert torch.equal(vq.embed, before)  # eval mode changes nothing, nor re-initialises


def test_learnable_codebook_trains():
    x = clustered(300, 4, 8, seed=3)
    vq = mimfast.VectorQuantizer(4, 8, ema_update=False).to(DEVICE)
    opt = torch.optim.SGD(vq.parameters(), lr=1.0)
    losses = []
    for _ in range(20):
        _, _, loss = vq(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert vq.embed.grad is not None and losses[-1] < 0.5 * losses[0]


def test_image_fmap_indices_roundtrip_and_state_dict():
    vq = mimfast.VectorQuantizer(5, 10, accept_image_fmap=True).to(DEVICE)
    x = torch.randn(2, 5, 3, 4, device=DEVICE)
    mask = torch.rand(2, 3, 4, device=DEVICE) > 0.3
    vq.eval()
    q, idx, _ = vq(x, mask)
    assert q.shape == x.shape and idx.shape == (2, 3, 4)
    codes = vq.get_output_from_indices(idx)
    torch.testing.assert_close(codes.movedim(1, -1)[mask], q.movedim(1, -1)[mask])  # z + (zq - z) rounds
    assert (codes.movedim(1, -1)[~mask] == 0).all()
    other = mimfast.VectorQuantizer(5, 10, accept_image_fmap=True).to(DEVICE)
    other.load_state_dict(vq.state_dict())
    other.eval()
    assert torch.equal(other(x, mask)[1], idx)


def test_mask_excluded_from_statistics():
    vq = mimfast.VectorQuantizer(4, 6, decay=0.5).to(DEVICE)
    x = torch.randn(50, 4, device=DEVICE)
    mask = torch.arange(50, device=DEVICE) < 20
    x_poison = torch.where(mask[:, None], x, torch.full_like(x, 1e6))
    a = mimfast.VectorQuantizer(4, 6, decay=0.5).to(DEVICE)
    a.load_state_dict(vq.state_dict())
    vq(x_poison, mask)
    a(x[:20])
    torch.testing.assert_close(vq.embed, a.embed)
    torch.testing.assert_close(vq.cluster_size, a.cluster_size)


def test_cosine_codes_stay_normalised():
    vq = mimfast.VectorQuantizer(6, 9, use_cosine_sim=True).to(DEVICE)
    for s in range(3):
        vq(clustered(100, 6, 5, seed=s))
    torch.testing.assert_close(vq.embed.norm(dim=-1), torch.ones(9, device=DEVICE))


@pytest.mark.parametrize(
    "kw,msg",
    [({"dim": 0}, "dim"), ({"codebook_size": 0}, "codebook_size"), ({"decay": 1.0}, "decay"), ({"eps": 0}, "eps"),
     ({"threshold_ema_dead_code": -1}, "threshold"), ({"kmeans_iters": 0}, "kmeans_iters"),
     ({"legacy_beta": True}, "legacy_beta")],
)  # fmt: skip
def test_bad_constructor_args(kw, msg):
    args = {"dim": 4, "codebook_size": 8} | kw
    with pytest.raises(ValueError, match=msg):
        mimfast.VectorQuantizer(**args)


def test_precision_is_forwarded_to_the_search():
    """``precision=`` reaches the search: "bf16" rounds the products like mimfast.vq_search(precision="bf16")."""
    x = clustered(300, 8, 10, seed=3)
    vq = mimfast.VectorQuantizer(8, 32, precision="bf16").to(DEVICE).eval()
    _, idx, _ = vq(x)
    ref, _, _ = mimfast.vq_search(x, vq.embed, precision="bf16")
    assert torch.equal(idx, ref)
    with pytest.raises(ValueError, match="precision"):
        mimfast.VectorQuantizer(8, 32, precision="fp8").to(DEVICE)(x)

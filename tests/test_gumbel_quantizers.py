"""GumbelQuantizer (taming's GumbelQuantize) and RegularizedQuantizer (Regularized VQ): shapes, straight-through
gradients, KL values, the stochastic mask, PCL weights, eval argmax, seeding, telemetry, ranks, taming keys."""

from __future__ import annotations

import math
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

import mimfast
from conftest import DEVICE, free_port, run_spawned_ranks
from mimfast.kernels.gumbel_softmax import gumbel_noise_ref
from mimfast.ops.gumbel import draw_philox
from mimfast.ops.quantize import usage_stats

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (interpreter) on masked lanes


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape, seed=0, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return t.requires_grad_(grad)


# ------------------------------------------------------------------------------------------ GumbelQuantizer
@pytest.mark.parametrize("fmap", [True, False])
def test_gumbel_shapes_and_dtypes(fmap):
    torch.manual_seed(0)
    q = mimfast.GumbelQuantizer(8, 50, num_hiddens=6, accept_image_fmap=fmap).to(DEVICE)
    z = randn(2, 6, 4, 5) if fmap else randn(2, 7, 6)
    out, idx, loss = q(z, generator=gen(1))
    assert out.shape == ((2, 8, 4, 5) if fmap else (2, 7, 8)) and out.dtype == z.dtype
    assert idx.shape == ((2, 4, 5) if fmap else (2, 7)) and idx.dtype == torch.int64
    assert loss.shape == () and loss.dtype == torch.float32
    # hard forward: the output is exactly the chosen codes
    assert torch.equal(out, q.get_output_from_indices(idx))
    assert set(q.state_dict()) == {"proj.weight", "proj.bias", "embed.weight"}


def test_gumbel_straight_through_matches_taming_formulation():
    """Same noise fed to taming's formulation (F.gumbel_softmax's math: one_hot - y.detach() + y, einsum with the
    codebook, KL of softmax(logits) with its 1e-10): equal outputs, loss and gradients for z, proj and embed."""
    torch.manual_seed(1)
    k, c, d, tau = 40, 6, 5, 0.7
    q = mimfast.GumbelQuantizer(d, k, num_hiddens=c, tau=tau, kl_weight=0.3, accept_image_fmap=True).to(DEVICE)
    z = randn(2, c, 3, 4, seed=2, grad=True)
    w = randn(2, d, 3, 4, seed=3)
    out, idx, loss = q(z, generator=gen(7))
    ours = torch.autograd.grad((out * w).sum() + loss, [z, q.proj.weight, q.proj.bias, q.embed.weight])

    ph = draw_philox(gen(7), DEVICE)  # the pair the module's call drew
    logits = q.proj(z)  # (B, K, H, W), taming's conv
    g = gumbel_noise_ref(ph, 24, k).to(DEVICE).reshape(2, 3, 4, k).permute(0, 3, 1, 2)
    y = torch.softmax((logits + g) / tau, dim=1)
    hard = F.one_hot(y.argmax(1), k).permute(0, 3, 1, 2).to(y.dtype)
    soft_one_hot = hard - y.detach() + y
    zq = torch.einsum("bnhw,nd->bdhw", soft_one_hot, q.embed.weight)
    qy = F.softmax(logits, dim=1)
    diff = 0.3 * torch.sum(qy * torch.log(qy * k + 1e-10), dim=1).mean()
    theirs = torch.autograd.grad((zq * w).sum() + diff, [z, q.proj.weight, q.proj.bias, q.embed.weight])
    assert torch.equal(idx, y.argmax(1))
    torch.testing.assert_close(out, zq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, diff, rtol=1e-5, atol=1e-8)
    for a, b in zip(ours, theirs, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gumbel_kl_on_hand_made_logits():
    """KL(q || uniform) per position, averaged: 0 for equal logits, log K - H(q) otherwise."""
    k = 4
    q = mimfast.GumbelQuantizer(3, k, num_hiddens=k, kl_weight=1.0).to(DEVICE)
    with torch.no_grad():
        q.proj.weight.copy_(torch.eye(k).reshape(k, k, 1, 1))
        q.proj.bias.zero_()
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]], device=DEVICE)  # q = (.5, 1/6 x 3)
    _, _, loss = q(z, generator=gen(0))
    p = torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6], dtype=torch.float64)
    expected = (0.0 + (p * torch.log(p * k)).sum().item()) / 2
    assert abs(loss.item() - expected) < 1e-6 and expected > 0.05
    q.kl_weight = 5e-4
    _, _, loss2 = q(z, generator=gen(0))
    assert abs(loss2.item() - 5e-4 * expected) < 1e-9


def test_gumbel_eval_is_argmax_and_temperature():
    torch.manual_seed(3)
    q = mimfast.GumbelQuantizer(4, 30, num_hiddens=5, straight_through=False).to(DEVICE)
    z = randn(64, 5, seed=4)
    q.eval()
    _, i1, _ = q(z, generator=gen(1))
    _, i2, _ = q(z, generator=gen(2))
    assert torch.equal(i1, i2) and torch.equal(i1, q.logits(z).argmax(-1))
    q.eval_sample = True  # taming's evaluation: a Gumbel-sampled hard code
    _, i3, _ = q(z, generator=gen(1))
    assert not torch.equal(i3, i1)
    q.train()  # soft training output (straight_through=False): depends on the temperature
    a, ia, _ = q(z, generator=gen(5))
    q.temperature = 0.1  # taming's attribute name
    assert q.tau == 0.1
    b, ib, _ = q(z, generator=gen(5))
    _, ic, _ = q(z, 3.0, generator=gen(5))  # taming's temp argument
    assert torch.equal(ia, ib) and torch.equal(ib, ic)  # tau changes the soft codes, not the sampled index
    off_a = (a - q.get_output_from_indices(ia)).abs().mean()
    off_b = (b - q.get_output_from_indices(ib)).abs().mean()
    assert off_b < off_a / 3  # tau = 0.1: much closer to one-hot codes than tau = 1


def test_gumbel_loads_taming_state_dict():
    k, c, d = 16, 6, 5
    q = mimfast.GumbelQuantizer(d, k, num_hiddens=c, accept_image_fmap=True).to(DEVICE)
    sd = {
        "encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
        "quantize.proj.weight": torch.randn(k, c, 1, 1),
        "quantize.proj.bias": torch.randn(k),
        "quantize.embed.weight": torch.randn(k, d),
        "loss.discriminator.main.0.weight": torch.randn(2),
    }
    ignored = q.load_taming_state_dict(sd)
    assert sorted(ignored) == ["encoder.conv_in.weight", "loss.discriminator.main.0.weight"]
    assert torch.equal(q.proj.weight.cpu(), sd["quantize.proj.weight"])
    assert torch.equal(q.embed.weight.cpu(), sd["quantize.embed.weight"])
    # the same names without the prefix load with the ordinary strict load_state_dict
    q.load_state_dict({k_[len("quantize.") :]: v for k_, v in sd.items() if k_.startswith("quantize.")})
    with pytest.raises(RuntimeError):
        q.load_taming_state_dict({"quantize.proj.weight": torch.randn(k, c, 1, 1)})  # strict: missing keys


# ------------------------------------------------------------------------------------- RegularizedQuantizer
def make_rq(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return mimfast.RegularizedQuantizer(kw.pop("dim", 6), kw.pop("codebook_size", 32), **kw).to(DEVICE)


@pytest.mark.parametrize("fmap", [True, False])
def test_regvq_shapes_and_info(fmap):
    rq = make_rq(accept_image_fmap=fmap)
    z = randn(3, 6, 5, 4) if fmap else randn(3, 20, 6)
    out, idx, loss, info = rq.forward_with_info(z, generator=gen(0))
    lead = (3, 5, 4) if fmap else (3, 20)
    assert out.shape == z.shape and idx.shape == lead and loss.shape == ()
    for key in ("pcl_weights", "indices", "best_indices", "mask"):
        assert info[key].shape == lead, key
    assert info["z_best"].shape == z.shape and info["p_post"].shape == (32,)
    assert torch.equal(info["z_sampled"], out) and torch.equal(out, rq.get_output_from_indices(idx))
    assert torch.equal(info["z_best"], rq.get_output_from_indices(info["best_indices"]))
    # the best match is the nearest code (logits = -||z - e||^2 / T up to a per-row constant)
    zl = z.movedim(1, -1) if fmap else z
    nearest = torch.cdist(zl.reshape(-1, 6), rq.embed.detach()).argmin(-1).reshape(lead)
    assert torch.equal(info["best_indices"], nearest)
    assert math.isclose(loss.item(), (0.25 * info["commitment"] + info["codebook"] + 0.1 * info["kl"]).item(),
                        rel_tol=1e-5)  # fmt: skip


def test_regvq_mask_ratio():
    rq = make_rq(accept_image_fmap=True)
    m = rq.draw_mask((4, 16, 16), DEVICE, gen(0))
    assert (m.sum(dim=(1, 2)) == round(0.4 * 256)).all()  # "exact": 102 of 256 per sample
    assert not torch.equal(m[0], m[1])
    assert rq.draw_mask((7, 5), DEVICE, gen(0)).sum(1).tolist() == [2] * 7  # round(0.4 * 5)
    assert rq.draw_mask((10,), DEVICE, gen(0)).sum() == 4  # (N, D) inputs: one group
    rq.mask_mode = "bernoulli"
    mb = rq.draw_mask((200, 100), DEVICE, gen(1))
    assert abs(mb.float().mean().item() - 0.4) < 5 * math.sqrt(0.4 * 0.6 / 20000)
    assert mb.sum(1).unique().numel() > 1  # per-position draws: the count varies per sample
    rq.mask_ratio = 0.0
    assert not rq.draw_mask((4, 8), DEVICE, gen(1)).any()
    rq.train()
    rq.mask_ratio, rq.mask_mode = 0.4, "exact"
    _, _, _, info = rq.forward_with_info(randn(2, 6, 5, 5), generator=gen(2))
    assert info["mask"].shape == (2, 5, 5) and (info["mask"].sum((1, 2)) == 10).all()
    rq.eval()
    _, _, _, info = rq.forward_with_info(randn(2, 6, 5, 5), generator=gen(2))
    assert not info["mask"].any()


def test_regvq_pcl_weights_zero_at_argmax_positions():
    """w = ||z_sampled - z_best||^2: exactly 0 at every unmasked position (argmax = best) and wherever the sample
    hit the best code; positive where a masked position sampled another code."""
    rq = make_rq(distance_temperature=50.0)  # flat logits: masked positions often sample away from the best
    out, idx, _, info = rq.forward_with_info(randn(4, 64, 6, seed=3), generator=gen(3))
    w, m = info["pcl_weights"], info["mask"]
    assert (w[~m] == 0).all() and torch.equal(idx[~m], info["best_indices"][~m])
    moved = idx != info["best_indices"]
    assert moved.any() and (w[moved] > 0).all() and (w[~moved] == 0).all()
    assert not moved[~m].any()
    expected = ((rq.embed[idx] - rq.embed[info["best_indices"]]) ** 2).sum(-1)
    torch.testing.assert_close(w, expected.detach())


def test_regvq_gradients_reach_encoder_and_codebook():
    """With the VQ and KL terms off, the decoder's gradient still reaches z and the codebook: through the logits
    (softmax on argmax positions, Gumbel-softmax on sampled ones) and through the chosen codes."""
    rq = make_rq(commitment_weight=0.0, codebook_weight=0.0, kl_weight=0.0, accept_image_fmap=True)
    z = randn(2, 6, 4, 4, seed=5, grad=True)
    out, _, loss, _ = rq.forward_with_info(z, generator=gen(4))
    assert loss.item() == 0.0
    (out * randn(2, 6, 4, 4, seed=6)).sum().backward()
    assert z.grad.abs().sum() > 0 and rq.embed.grad.abs().sum() > 0
    # the KL term alone also trains both (P_post depends on z and the codes)
    rq2 = make_rq(commitment_weight=0.0, codebook_weight=0.0)
    z2 = randn(50, 6, seed=7, grad=True)
    _, _, _, info = rq2.forward_with_info(z2, generator=gen(5))
    info["kl"].backward()
    assert z2.grad.abs().sum() > 0 and rq2.embed.grad.abs().sum() > 0


def test_regvq_backward_is_softmax_on_argmax_and_gumbel_softmax_on_sampled():
    """The gradient of the logits the quantizer hands back equals softmax(l / tau)'s on unmasked positions and
    softmax((l + g) / tau)'s on masked ones (g: the call's noise)."""
    rq = make_rq(tau=0.8, commitment_weight=0.0, codebook_weight=0.0, kl_weight=0.0, distance_temperature=4.0)
    z = randn(40, 6, seed=8)
    captured = {}
    real = rq.logits

    def spy(zf, e):
        out = real(zf, e)
        out.retain_grad()
        captured["logits"] = out
        return out

    rq.logits = spy
    g = gen(9)
    mask_gen = gen(9)
    out, idx, _, info = rq.forward_with_info(z, generator=g)
    w = randn(40, 6, seed=10)
    (out * w).sum().backward()
    logits = captured["logits"]
    rq.draw_mask((40,), DEVICE, mask_gen)  # replay the mask draw, then the op's (seed, offset) draw
    ph = draw_philox(mask_gen, DEVICE)
    m = info["mask"]
    noise = torch.where(m[:, None], gumbel_noise_ref(ph, 40, 32).to(DEVICE), torch.zeros(()))
    lg = logits.detach().clone().requires_grad_(True)
    y = torch.softmax((lg + noise) / 0.8, dim=1)
    (expected,) = torch.autograd.grad((y * (w @ rq.embed.detach().T)).sum(), lg)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-4, atol=1e-6)


def test_regvq_kl_on_hand_made_assignments():
    """L_kl = sum_k P log(K P) with P = mean of softmax(-||z - e||^2 / T): hand-computed for two codes."""
    rq = make_rq(dim=1, codebook_size=2, distance_temperature=1.0, mask_ratio=0.0)
    with torch.no_grad():
        rq.embed.copy_(torch.tensor([[0.0], [1.0]]))
    z = torch.tensor([[0.0], [0.0], [1.0], [0.5]], device=DEVICE)
    _, _, _, info = rq.forward_with_info(z, generator=gen(0))
    a = 1 / (1 + math.exp(-1))  # softmax(-[0, 1]) for z = 0
    p0 = (a + a + (1 - a) + 0.5) / 4
    p = torch.tensor([p0, 1 - p0], dtype=torch.float64)
    assert abs(info["kl"].item() - (p * torch.log(2 * p)).sum().item()) < 1e-6
    z_sym = torch.tensor([[0.0], [1.0]], device=DEVICE)  # symmetric usage: P uniform, KL = 0
    _, _, _, info = rq.forward_with_info(z_sym, generator=gen(0))
    assert abs(info["kl"].item()) < 1e-7


def test_regvq_eval_is_deterministic_argmax_and_seeding():
    rq = make_rq(distance_temperature=10.0)
    z = randn(3, 30, 6, seed=11)
    a = rq.forward_with_info(z, generator=gen(1))
    b = rq.forward_with_info(z, generator=gen(1))
    c = rq.forward_with_info(z, generator=gen(2))
    assert torch.equal(a[1], b[1]) and torch.equal(a[3]["mask"], b[3]["mask"]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[3]["mask"], c[3]["mask"]) and not torch.equal(a[1], c[1])
    rq.eval()
    e1, i1, _, info = rq.forward_with_info(z, generator=gen(1))
    _, i2, _, _ = rq.forward_with_info(z, generator=gen(2))
    assert torch.equal(i1, i2) and torch.equal(i1, info["best_indices"]) and (info["pcl_weights"] == 0).all()
    with torch.no_grad():  # no autograd: indices-only kernel path, same result
        _, i3, _ = rq(z)
    assert torch.equal(i3, i1)


def test_usage_telemetry():
    rq = make_rq(codebook_size=16, usage_decay=0.5, dead_code_threshold=0.5)
    z = rq.embed.detach()[:4].repeat(25, 1) + 1e-3 * randn(100, 6, seed=12)  # only codes 0..3 are near
    rq.mask_ratio = 0.0
    for _ in range(3):
        _, idx, _, _ = rq.forward_with_info(z, generator=gen(0))
    u = rq.usage()
    ref = usage_stats(torch.bincount(idx.reshape(-1).cpu(), minlength=16))
    assert torch.allclose(u["perplexity"].cpu(), ref["perplexity"]) and u["used_fraction"].item() == 4 / 16
    assert u["dead_codes"].item() == 12 and u["ema_used_fraction"].item() == 4 / 16
    assert 1.0 <= u["soft_perplexity"].item() <= 16
    gq = mimfast.GumbelQuantizer(4, 10, num_hiddens=3).to(DEVICE)
    _, gidx, _ = gq(randn(50, 3, seed=13), generator=gen(1))
    gu = gq.usage()
    assert int(gq.tracker.last_counts.sum()) == 50
    assert torch.allclose(gu["perplexity"].cpu(), usage_stats(torch.bincount(gidx.cpu(), minlength=10))["perplexity"])


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"z: expected shape \(B, 6, \*spatial\)"):
        make_rq(accept_image_fmap=True)(randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"z: expected shape \(\.\.\., 6\)"):
        make_rq()(randn(2, 5))
    with pytest.raises(ValueError, match="mask_ratio"):
        mimfast.RegularizedQuantizer(4, 8, mask_ratio=1.5)
    with pytest.raises(ValueError, match="mask_mode"):
        mimfast.RegularizedQuantizer(4, 8, mask_mode="blocks")
    with pytest.raises(ValueError, match="distance_temperature"):
        mimfast.RegularizedQuantizer(4, 8, distance_temperature=0.0)
    with pytest.raises(ValueError, match="tau"):
        mimfast.GumbelQuantizer(4, 8)(randn(3, 4), temp=0.0)
    with pytest.raises(TypeError, match="z: expected a floating-point tensor"):
        mimfast.GumbelQuantizer(4, 8)(torch.ones(3, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="NaN"):
        mimfast.GumbelQuantizer(4, 8)(torch.full((3, 4), float("nan"), device=DEVICE))


# ------------------------------------------------------------------------------------------------- 2 ranks
def _batch(rank: int) -> torch.Tensor:
    return torch.randn(48, 6, generator=torch.Generator().manual_seed(10 + rank)) + rank


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import torch.distributed as dist

        import mimfast

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))  # fmt: skip
        torch.manual_seed(0)
        rq = mimfast.RegularizedQuantizer(6, 16, distance_temperature=4.0)
        _, _, _, info = rq.forward_with_info(_batch(rank), generator=torch.Generator().manual_seed(rank))
        info["kl"].backward()
        torch.save({"kl": info["kl"].detach(), "grad": rq.embed.grad.clone(), "p": info["p_post"],
                    "counts": rq.tracker.last_counts.clone()}, os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_two_ranks_kl_equals_one_process_on_the_concatenated_batch(tmp_path):
    """P_post is averaged over both ranks' positions: the KL equals the single-process KL of the concatenated
    batch, and the ranks' gradients averaged (as DDP does) equal its gradient."""
    port = free_port()
    run_spawned_ranks(_worker, lambda r: (r, port, str(tmp_path)), tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.manual_seed(0)
    rq = mimfast.RegularizedQuantizer(6, 16, distance_temperature=4.0, sync_kl=False)
    _, idx, _, info = rq.forward_with_info(torch.cat([_batch(0), _batch(1)]), generator=torch.Generator())
    info["kl"].backward()
    assert torch.equal(r0["kl"], r1["kl"]) and torch.equal(r0["p"], r1["p"])
    torch.testing.assert_close(r0["kl"], info["kl"].detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r0["p"], info["p_post"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close((r0["grad"] + r1["grad"]) / 2, rq.embed.grad, rtol=1e-4, atol=1e-7)
    assert torch.equal(r0["counts"], r1["counts"]) and int(r0["counts"].sum()) == 96  # usage over both ranks

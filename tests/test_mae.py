"""MAE: fused path vs the official-code twin, official checkpoint layout, loss semantics, configs and errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import DEVICE
from mimfast.models import MAEConfig, MaskedAutoencoderViT, create_model, list_models

DEBUG = "mae_vit_tiny_patch4_dec64d2b_debug"


def official_mae_layout(cfg: MAEConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official MAE model (models_mae.MaskedAutoencoderViT with timm 0.3.2 blocks), written out
    from its architecture description."""
    d, dd, c, p, n = cfg.embed_dim, cfg.decoder_embed_dim, cfg.in_chans, cfg.patch_size, cfg.num_patches
    h = int(d * cfg.mlp_ratio)
    hd = int(dd * cfg.mlp_ratio)

    def block(prefix, w, hidden):
        return {
            f"{prefix}.norm1.weight": (w,), f"{prefix}.norm1.bias": (w,),
            f"{prefix}.attn.qkv.weight": (3 * w, w), f"{prefix}.attn.qkv.bias": (3 * w,),
            f"{prefix}.attn.proj.weight": (w, w), f"{prefix}.attn.proj.bias": (w,),
            f"{prefix}.norm2.weight": (w,), f"{prefix}.norm2.bias": (w,),
            f"{prefix}.mlp.fc1.weight": (hidden, w), f"{prefix}.mlp.fc1.bias": (hidden,),
            f"{prefix}.mlp.fc2.weight": (w, hidden), f"{prefix}.mlp.fc2.bias": (w,),
        }  # fmt: skip

    keys = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, n + 1, d),
        "patch_embed.proj.weight": (d, c, p, p),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(cfg.depth):
        keys.update(block(f"blocks.{i}", d, h))
    keys.update({"norm.weight": (d,), "norm.bias": (d,), "mask_token": (1, 1, dd)})
    keys.update({"decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,), "decoder_pos_embed": (1, n + 1, dd)})
    for i in range(cfg.decoder_depth):
        keys.update(block(f"decoder_blocks.{i}", dd, hd))
    keys.update({"decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,)})
    keys.update({"decoder_pred.weight": (p * p * c, dd), "decoder_pred.bias": (p * p * c,)})
    return keys


def official_checkpoint(cfg: MAEConfig, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in official_mae_layout(cfg).items()}


def twins(seed=0, **kw):
    torch.manual_seed(seed)
    fused = create_model(DEBUG, **kw).to(DEVICE)
    eager = create_model(DEBUG, fused=False, **kw).to(DEVICE)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


def batch(bsz=4, seed=1, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, 3, size, size, generator=g).to(DEVICE), torch.rand(bsz, (size // 4) ** 2, generator=g).to(
        DEVICE
    )


# ------------------------------------------------------------------------------------------ checkpoint layout
@pytest.mark.parametrize(
    "name", ["mae_vit_base_patch16_dec512d8b", "mae_vit_large_patch16_dec512d8b", "mae_vit_huge_patch14_dec512d8b"]
)
def test_parameter_names_and_shapes_are_the_official_ones(name):
    with torch.device("meta"):
        model = create_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_mae_layout(model.config)


def test_loads_an_official_state_dict():
    cfg = create_model(DEBUG).config
    sd = official_checkpoint(cfg)
    for wrapped in ({"model": sd}, {f"module.{k}": v for k, v in sd.items()}, sd):
        model = create_model(DEBUG)
        assert model.load_official_state_dict(wrapped) == []
        for k, v in model.state_dict().items():
            assert torch.equal(v, sd[k]), k
    # the loaded weights drive both paths identically
    fused, eager = create_model(DEBUG).to(DEVICE), create_model(DEBUG, fused=False).to(DEVICE)
    fused.load_official_state_dict(sd)
    eager.load_official_state_dict(sd)
    imgs, noise = batch()
    torch.testing.assert_close(fused(imgs, 0.75, noise)[0], eager(imgs, 0.75, noise)[0], rtol=1e-5, atol=1e-6)


def test_encoder_only_checkpoint_loads_with_a_warning():
    cfg = create_model(DEBUG).config
    sd = {k: v for k, v in official_checkpoint(cfg).items() if not k.startswith(("decoder_", "mask_token"))}
    model = create_model(DEBUG)
    dec_before = model.decoder_pred.weight.clone()
    with pytest.warns(UserWarning, match="no decoder"):
        missing = model.load_official_state_dict({"model": sd})
    assert missing and all(k.startswith(("decoder_", "mask_token")) for k in missing)
    assert torch.equal(model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    assert torch.equal(model.decoder_pred.weight, dec_before)


def test_bad_checkpoints_raise():
    cfg = create_model(DEBUG).config
    sd = official_checkpoint(cfg)
    with pytest.raises(KeyError, match="unexpected keys.*head.weight"):
        create_model(DEBUG).load_official_state_dict({**sd, "head.weight": torch.zeros(3)})
    with pytest.raises(KeyError, match="missing keys.*blocks.0.norm1.bias"):
        create_model(DEBUG).load_official_state_dict({k: v for k, v in sd.items() if k != "blocks.0.norm1.bias"})
    with pytest.raises(ValueError, match=r"state_dict\['pos_embed'\]: expected shape \(1, 65, 96\)"):
        create_model(DEBUG).load_official_state_dict({**sd, "pos_embed": torch.zeros(1, 197, 96)})
    with pytest.raises(TypeError, match="state_dict: expected a dict"):
        create_model(DEBUG).load_official_state_dict([1, 2])


# ------------------------------------------------------------------------------------------- fused vs twin
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.9])
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_fused_equals_official_twin(mask_ratio, norm_pix_loss):
    fused, eager = twins(norm_pix_loss=norm_pix_loss)
    imgs, noise = batch()
    lf, pf, mf = fused(imgs, mask_ratio, noise)
    le, pe, me = eager(imgs, mask_ratio, noise)
    assert torch.equal(mf, me)
    torch.testing.assert_close(pf, pe, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-7)
    lf.backward()
    le.backward()
    for (name, a), b in zip(fused.named_parameters(), eager.parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, name
            continue
        scale = b.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_twins_agree_under_bf16_autocast():
    if DEVICE == "cpu":
        ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        ctx = torch.autocast("cuda", dtype=torch.bfloat16)
    fused, eager = twins()
    imgs, noise = batch()
    with ctx:
        lf = fused(imgs, 0.75, noise)[0]
        le = eager(imgs, 0.75, noise)[0]
    lf32 = fused(imgs, 0.75, noise)[0]
    assert torch.isfinite(lf) and torch.isfinite(le)
    torch.testing.assert_close(lf.float(), le.float(), rtol=3e-2, atol=0)
    torch.testing.assert_close(lf.float(), lf32, rtol=3e-2, atol=0)


def test_encoder_sees_visible_tokens_only():
    model = create_model(DEBUG).to(DEVICE)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    model.decoder_blocks[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    imgs, noise = batch(bsz=3)
    _, pred, mask = model(imgs, 0.75, noise)
    assert seen == [(3, 1 + 16, 96), (3, 1 + 64, 64)]
    assert pred.shape == (3, 64, 48) and mask.shape == (3, 64)
    assert torch.equal(mask.sum(1), torch.full((3,), 48.0, device=DEVICE))
    # small noise = kept (MAE's convention)
    kept = noise.argsort(1)[:, :16]
    assert (mask.gather(1, kept) == 0).all()


def test_loss_is_norm_pix_mse_on_removed_patches():
    model = create_model(DEBUG).to(DEVICE)
    imgs, noise = batch(bsz=2)
    loss, pred, mask = model(imgs, 0.75, noise)
    p = 4
    # independent patchify with explicit indexing: patch (i, j), pixel (u, v), channel c -> (u * p + v) * 3 + c
    target = torch.empty(2, 64, 48, device=DEVICE)
    for i in range(8):
        for j in range(8):
            patch = imgs[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # (B, 3, p, p)
            target[:, i * 8 + j] = patch.permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(model.patchify(imgs), target)
    assert torch.equal(model.unpatchify(target), imgs)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, unbiased=True, keepdim=True)
    per_patch = ((pred - (target - mean) / (var + 1e-6).sqrt()) ** 2).mean(-1)
    want = per_patch[mask.bool()].mean()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = create_model(DEBUG).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    imgs, noise = batch(bsz=8)
    losses = []
    for _ in range(8):
        loss = model(imgs, 0.75, noise)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_torch_compile_fullgraph_matches_eager_mode():
    model = create_model(DEBUG).to(DEVICE)
    imgs, noise = batch(bsz=2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    lc = compiled(imgs, 0.75, noise)[0]
    le = model(imgs, 0.75, noise)[0]
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    gc = torch.autograd.grad(lc, model.blocks[0].attn.qkv.weight)[0]
    ge = torch.autograd.grad(le, model.blocks[0].attn.qkv.weight)[0]
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-7)


def test_fresh_model_follows_mae_init():
    model = create_model(DEBUG)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(96))  # class-token position is zero
    assert 0.01 < model.cls_token.std() < 0.04 and 0.01 < model.mask_token.std() < 0.04
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros(288))


# -------------------------------------------------------------------------------------- configs and errors
def test_registry_and_flops():
    names = list_models("mae")
    assert {
        "mae_vit_base_patch16_dec512d8b",
        "mae_vit_large_patch16_dec512d8b",
        "mae_vit_huge_patch14_dec512d8b",
        DEBUG,
    } <= set(names)
    with pytest.raises(ValueError, match="unknown name 'mae_vit_small'.*mae_vit_base_patch16_dec512d8b"):
        create_model("mae_vit_small")
    with torch.device("meta"):
        base = create_model("mae_vit_base_patch16_dec512d8b")
    assert abs(base.flops_per_image() / 59e9 - 1) < 0.02  # PERF.md: about 59 GFLOP per image for a train step


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda m: m(torch.randn(2, 3, 64, 64)), ValueError, r"imgs: expected shape \(B, 3, 32, 32\)"),
        (lambda m: m(torch.randn(2, 1, 32, 32)), ValueError, r"imgs: expected shape"),
        (lambda m: m(torch.randn(3, 32, 32)), ValueError, r"imgs: expected shape"),
        (lambda m: m(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)), TypeError, r"imgs: expected a floating-point"),
        (lambda m: m(torch.randn(2, 3, 32, 32), 1.0), ValueError, r"mask_ratio: expected a float in \[0, 1\)"),
        (lambda m: m(torch.randn(2, 3, 32, 32), -0.1), ValueError, r"mask_ratio"),
        (lambda m: m(torch.randn(2, 3, 32, 32), 0.75, torch.rand(2, 63)), ValueError, r"noise: expected shape"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(create_model(DEBUG))


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(img_size=30), r"img_size: expected a multiple of patch_size=4"),
        (dict(num_heads=5), r"embed_dim: expected a multiple of num_heads=5"),
        (dict(decoder_embed_dim=66, decoder_num_heads=3), r"decoder_embed_dim: expected a multiple"),
        (dict(depth=0), r"depth: expected an int >= 1"),
        (dict(mlp_ratio=0), r"mlp_ratio: expected > 0"),
    ],
)
def test_bad_configs_raise(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        create_model(DEBUG, **kwargs)


def test_direct_construction():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = MaskedAutoencoderViT(MAEConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2))  # fmt: skip
    loss, pred, mask = model(torch.randn(2, 3, 32, 32))
    assert pred.shape == (2, 16, 192) and torch.isfinite(loss)

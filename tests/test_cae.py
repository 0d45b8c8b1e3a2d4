"""CAE: fused path vs the official-code twin, the no-grad alignment target, cross-attention semantics, the official
checkpoint layout, errors and FLOPs."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import mimfast.models.cae  # noqa: F401  (registers the CAE models)
from conftest import DEVICE
from mimfast.models import create_model, list_models
from mimfast.models.cae import CAE, CAEConfig, RegressorBlock
from mimfast.ops.masking import cae_block_masking

DEBUG = "cae_tiny_patch4_debug"


def official_cae_layout(cfg: CAEConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official ``ContextAutoencoderViT`` (model_type "cae", decoder_embed_dim = embed_dim), written
    out from models/modeling_cae.py and modeling_cae_helper.py of Atten4Vis/CAE."""
    d, c, p, n, v = cfg.embed_dim, cfg.in_chans, cfg.patch_size, cfg.num_patches, cfg.vocab_size
    h = int(d * cfg.mlp_ratio)

    def pair(name, *shape):
        return {f"{name}.weight": shape or (d,), f"{name}.bias": (shape[0],) if shape else (d,)}

    def block(prefix):  # helper Block: q_bias / v_bias, qkv without bias, gamma_1 / gamma_2
        keys = {**pair(f"{prefix}.norm1"), f"{prefix}.attn.q_bias": (d,), f"{prefix}.attn.v_bias": (d,),
                f"{prefix}.attn.qkv.weight": (3 * d, d), **pair(f"{prefix}.attn.proj", d, d), **pair(f"{prefix}.norm2"),
                **pair(f"{prefix}.mlp.fc1", h, d), **pair(f"{prefix}.mlp.fc2", d, h)}  # fmt: skip
        return {**keys, f"{prefix}.gamma_1": (d,), f"{prefix}.gamma_2": (d,)}

    keys: dict[str, tuple[int, ...]] = {}
    for enc in ("encoder", "alignment_encoder"):
        keys.update({f"{enc}.cls_token": (1, 1, d), f"{enc}.pos_embed": (1, n + 1, d),
                     f"{enc}.patch_embed.proj.weight": (d, c, p, p), f"{enc}.patch_embed.proj.bias": (d,)})  # fmt: skip
        for i in range(cfg.depth):
            keys.update(block(f"{enc}.blocks.{i}"))
        keys.update(pair(f"{enc}.norm"))
    keys.update({"rd_pos_embed": (1, n + 1, d), "mask_token": (1, 1, d)})
    for i in range(cfg.regressor_depth):
        b = f"regresser.regressor_blocks.{i}"
        for nm in ("norm1_q", "norm1_k", "norm1_v", "norm2_cross"):
            keys.update(pair(f"{b}.{nm}"))
        keys.update({f"{b}.cross_attn.{x}.weight": (d, d) for x in "qkv"})
        keys.update(
            {f"{b}.cross_attn.q_bias": (d,), f"{b}.cross_attn.v_bias": (d,), **pair(f"{b}.cross_attn.proj", d, d)}
        )
        keys.update({**pair(f"{b}.mlp_cross.fc1", h, d), **pair(f"{b}.mlp_cross.fc2", d, h)})
        keys.update({f"{b}.gamma_1_cross": (d,), f"{b}.gamma_2_cross": (d,)})
    keys.update(pair("regresser.norm"))
    for i in range(cfg.decoder_depth):
        keys.update(block(f"decoder.decoder_blocks.{i}"))
    keys.update({**pair("decoder.norm"), **pair("decoder.head", v, d)})
    return keys


def official_checkpoint(cfg: CAEConfig, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in official_cae_layout(cfg).items()}


def twins(seed=0, **kw):
    """Fused and eager debug models with the same (perturbed: non-zero biases) weights, no stochastic depth."""
    torch.manual_seed(seed)
    fused = create_model(DEBUG, drop_path_rate=0.0, **kw).to(DEVICE)
    with torch.no_grad():
        for p in fused.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    eager = create_model(DEBUG, drop_path_rate=0.0, fused=False, **kw).to(DEVICE)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


def batch(model, bsz=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    imgs = torch.randn(bsz, c.in_chans, c.img_size, c.img_size, generator=g)
    target = torch.randint(0, c.vocab_size, (bsz, c.num_patches), generator=g)
    mask = cae_block_masking(bsz, c.grid_size, c.grid_size, c.num_mask_patches, min_num_patches=c.min_mask_patches,
                             generator=g)  # fmt: skip
    return imgs.to(DEVICE), mask.to(DEVICE), target.to(DEVICE)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------- fused == eager
def test_fused_equals_official_twin():
    fused, eager = twins()
    imgs, mask, target = batch(fused)
    assert mask.sum(1).tolist() == [fused.config.num_mask_patches] * 2
    lf, mf = fused(imgs, mask, target)
    le, me = eager(imgs, mask, target)
    lf.backward()
    le.backward()
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lf, le, **tol)
    for k in ("loss_ce", "loss_align"):
        torch.testing.assert_close(mf[k], me[k], **tol)
        assert not mf[k].requires_grad
    torch.testing.assert_close(mf["loss_ce"] + mf["loss_align"], lf.detach())
    gf, ge = grads(fused), grads(eager)
    assert gf.keys() == ge.keys() and len(gf) == sum(p.requires_grad for p in eager.parameters())
    scale = max(g.abs().max().item() for g in ge.values())
    for k in ge:  # the key LayerNorm bias cancels in the softmax: its gradient is rounding noise, hence the atol
        torch.testing.assert_close(gf[k], ge[k], rtol=1e-4, atol=1e-6 * scale, msg=k)
    features = fused.forward_features(imgs)
    assert features.shape == (2, 1 + fused.config.num_patches, fused.config.embed_dim)
    torch.testing.assert_close(features, eager.forward_features(imgs), **tol)
    # the features are the encoder on every patch: the official encoder with nothing masked
    none = torch.zeros_like(mask)
    with torch.no_grad():
        torch.testing.assert_close(features, eager._encode_official(imgs, none), **tol)


def test_twins_agree_under_bf16_autocast():
    fused, eager = twins(seed=2)
    imgs, mask, target = batch(fused, bsz=3)
    out = []
    for model in (fused, eager):
        with torch.autocast(imgs.device.type, dtype=torch.bfloat16):
            loss, metrics = model(imgs, mask, target)
        loss.backward()
        assert loss.dtype == torch.float32
        out.append((loss.detach(), metrics, model.blocks[0].attn.qkv.weight.grad))
    (lf, mf, gf), (le, me, ge) = out
    torch.testing.assert_close(lf, le, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(mf["loss_align"], me["loss_align"], rtol=3e-2, atol=2e-2)
    assert F.cosine_similarity(gf.flatten(), ge.flatten(), dim=0) > 0.99


def test_alignment_target_has_no_gradient_path():
    _, model = twins(seed=3)
    imgs, mask, target = batch(model, seed=4)
    loss, _ = model(imgs, mask, target)
    loss.backward()
    g_model = grads(model)

    def manual_loss(target_encoder, no_grad):
        """The official structure: a separate alignment encoder (a frozen copy, or the model itself with a gradient
        path when ``no_grad`` is False)."""
        b, d = imgs.shape[0], model.config.embed_dim
        model.zero_grad(set_to_none=True)
        z = model._encode_official(imgs, mask)
        with torch.set_grad_enabled(not no_grad):
            latent_target = target_encoder._encode_official(imgs, ~mask)[:, 1:]
        pos = model.pos_embed.expand(b, -1, -1)[:, 1:]
        pos_m, pos_v = pos[mask].reshape(b, -1, d), pos[~mask].reshape(b, -1, d)
        pred = model.regress(z[:, 1:], pos_v, pos_m)
        logits = model.lm_head(model._decode(pred, pos_m)).reshape(-1, model.config.vocab_size)
        out = F.cross_entropy(logits, target[mask]) + model.config.align_weight * F.mse_loss(pred, latent_target)
        out.backward()
        return out.detach(), grads(model)

    frozen = copy.deepcopy(model).requires_grad_(False)
    loss2, g_frozen = manual_loss(frozen, no_grad=True)
    torch.testing.assert_close(loss2, loss.detach(), rtol=1e-6, atol=1e-6)
    for k in g_model:
        torch.testing.assert_close(g_model[k], g_frozen[k], rtol=1e-5, atol=1e-7, msg=k)
    _, g_leaky = manual_loss(model, no_grad=False)  # the check can fail: a target with a gradient path differs
    assert not torch.allclose(g_leaky["blocks.0.attn.qkv.weight"], g_model["blocks.0.attn.qkv.weight"], atol=1e-6)


# --------------------------------------------------------------------------------------- cross-attention
def test_regressor_block_matches_an_explicit_computation():
    torch.manual_seed(5)
    d, heads, m, n_vis, b = 12, 3, 3, 4, 2
    blk = RegressorBlock(d, heads, 2.0, init_values=0.1)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    assert blk.cross_attn.k.bias is None and not hasattr(blk.cross_attn, "k_bias")
    assert blk.cross_attn.q.bias is None and blk.cross_attn.q_bias is not None and blk.cross_attn.v_bias is not None
    x_q, pos_q = torch.randn(b, m, d), torch.randn(b, m, d)
    z, pos_v = torch.randn(b, n_vis, d), torch.randn(b, n_vis, d)
    x_kv, pos_kv = torch.cat([z, x_q], 1), torch.cat([pos_v, pos_q], 1)
    out = blk(x_q, x_kv, pos_q, pos_kv)

    def ln(mod, t):
        return F.layer_norm(t, (d,), mod.weight, mod.bias, mod.eps)

    a = blk.cross_attn
    q = ln(blk.norm1_q, x_q + pos_q) @ a.q.weight.T + a.q_bias
    k = ln(blk.norm1_k, x_kv + pos_kv) @ a.k.weight.T  # keys: positions added, no bias
    v = ln(blk.norm1_v, x_kv) @ a.v.weight.T + a.v_bias  # values: no positions
    dh = d // heads
    heads_out = []
    for i in range(heads):
        sl = slice(i * dh, (i + 1) * dh)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh), dim=-1)
        heads_out.append(w @ v[..., sl])
    y = x_q + blk.ls1.gamma * a.proj(torch.cat(heads_out, -1))
    y = ln(blk.norm2_cross, y)
    y = y + blk.ls2.gamma * blk.mlp_cross(y)
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)


def test_regressor_keys_hold_the_current_queries():
    _, model = twins(seed=6)
    b, m, lv, d = 2, 5, 7, model.config.embed_dim
    g = torch.Generator().manual_seed(0)
    z, pos_v, pos_m = (torch.randn(b, n, d, generator=g) for n in (lv, lv, m))
    got = model.regress(z, pos_v, pos_m)
    x, x_stale = model.mask_token.expand(b, m, d), model.mask_token.expand(b, m, d)
    for blk in model.regressor_blocks:
        x = blk(x, torch.cat([z, x], 1), pos_m, torch.cat([pos_v, pos_m], 1))
        x_stale = blk(x_stale, torch.cat([z, model.mask_token.expand(b, m, d)], 1), pos_m, torch.cat([pos_v, pos_m], 1))
    torch.testing.assert_close(got, model.regressor_norm(x))
    assert not torch.allclose(got, model.regressor_norm(x_stale), atol=1e-4)  # queries from the first block differ


def test_position_table_is_cae_layout():
    cfg = CAEConfig(**create_model(DEBUG).config.__dict__)
    model = CAE(cfg)
    g, d = cfg.grid_size, cfg.embed_dim
    omega = 1.0 / 10000.0 ** (torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    n = torch.arange(g * g, dtype=torch.float64)
    row, col = (n // g)[:, None] * omega, (n % g)[:, None] * omega
    want = torch.cat([torch.sin(row), torch.cos(row), torch.sin(col), torch.cos(col)], 1)
    want = torch.cat([torch.zeros(1, d, dtype=torch.float64), want]).float()
    torch.testing.assert_close(model.pos_embed[0], want, rtol=0, atol=1e-6)
    assert not model.pos_embed.requires_grad


# ---------------------------------------------------------------------------------------- official layout
def test_layer_scale_off_follows_the_official_blocks():
    model = create_model(DEBUG, init_values=0.0)
    keys = model.official_state_dict()
    assert "encoder.blocks.0.gamma_1" not in keys and "decoder.decoder_blocks.0.gamma_2" not in keys
    gamma = model.regressor_blocks[0].ls1.gamma  # the official regressor keeps fixed ones
    assert torch.all(gamma == 1) and not gamma.requires_grad
    assert keys["regresser.regressor_blocks.0.gamma_1_cross"] is not None


@pytest.mark.parametrize("name", ["cae_base_patch16_224", "cae_large_patch16_224", DEBUG])
def test_official_layout_round_trips(name):
    with torch.device("meta"):
        model = create_model(name)
    layout = official_cae_layout(model.config)
    assert {k: tuple(v.shape) for k, v in model.official_state_dict().items()} == layout
    assert len(model.state_dict()) == len([k for k in layout if not k.startswith("alignment_")]) - 1  # rd_pos_embed


def test_loads_an_official_state_dict():
    model = create_model(DEBUG)
    sd = official_checkpoint(model.config)
    missing = model.load_official_state_dict({"model": {f"module.{k}": v for k, v in sd.items()}})
    assert missing == []
    ours = model.state_dict()
    for k, v in sd.items():
        mapped = CAE.official_to_ours(k)
        if mapped is None:
            assert k.startswith("alignment_encoder.") or k == "rd_pos_embed"
            continue
        assert torch.equal(ours[mapped], v), k
    assert torch.equal(ours["blocks.1.ls2.gamma"], sd["encoder.blocks.1.gamma_2"])
    assert torch.equal(ours["regressor_blocks.0.ls1.gamma"], sd["regresser.regressor_blocks.0.gamma_1_cross"])
    assert torch.equal(ours["lm_head.weight"], sd["decoder.head.weight"])
    back = model.official_state_dict()
    assert back.keys() == sd.keys()
    for k, v in back.items():
        if k.startswith("alignment_encoder."):
            assert torch.equal(v, sd["encoder." + k[len("alignment_encoder.") :]]), k
        elif k == "rd_pos_embed":
            assert torch.equal(v, sd["encoder.pos_embed"])
        else:
            assert torch.equal(v, sd[k]), k


def test_encoder_only_checkpoints_load_with_a_warning():
    model = create_model(DEBUG)
    sd = {k: v for k, v in official_checkpoint(model.config).items() if k.startswith("encoder.")}
    with pytest.warns(UserWarning, match="lacks"):
        missing = model.load_official_state_dict(sd)
    assert missing and all(k.startswith(("mask_token", "regressor_", "decoder_", "lm_head")) for k in missing)
    assert torch.equal(model.blocks[0].ls1.gamma, sd["encoder.blocks.0.gamma_1"])
    # fine-tuning layout: bare encoder keys plus a classifier head
    bare = {k[len("encoder.") :]: v * 2 for k, v in sd.items()}
    bare.update({"head.weight": torch.zeros(10, 96), "head.bias": torch.zeros(10)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_official_state_dict(bare)
    assert any("head.weight" in str(w.message) for w in caught)
    assert torch.equal(model.norm.weight, bare["norm.weight"])


def test_bad_checkpoints_raise():
    model = create_model(DEBUG)
    sd = official_checkpoint(model.config)
    bad = dict(sd, **{"decoder.head.weight": torch.zeros(7, 96)})
    with pytest.raises(ValueError, match="decoder.head.weight"):
        model.load_official_state_dict(bad)
    with pytest.raises(ValueError, match="rd_pos_embed"):
        model.load_official_state_dict(dict(sd, rd_pos_embed=torch.zeros(1, 5, 96)))
    with pytest.raises(KeyError, match="unexpected"):
        model.load_official_state_dict(dict(sd, **{"encoder.rel_pos_bias.table": torch.zeros(3)}))
    partial = {k: v for k, v in sd.items() if k != "regresser.norm.weight"}
    with pytest.raises(KeyError, match="regressor_norm.weight"):
        model.load_official_state_dict(partial)
    with pytest.warns(UserWarning):
        assert model.load_official_state_dict(partial, strict=False) == ["regressor_norm.weight"]
    with pytest.raises(TypeError, match="state_dict"):
        model.load_official_state_dict({"model": [1, 2]})


# ---------------------------------------------------------------------------------------------- errors
def _bad_inputs():
    c = create_model(DEBUG).config
    imgs = torch.randn(2, 3, 32, 32)
    mask = cae_block_masking(2, 8, 8, c.num_mask_patches, min_num_patches=4, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, c.vocab_size, (2, 64))
    unequal = mask.clone()
    unequal[0, (~mask[0]).nonzero()[0]] = True
    fewer = torch.zeros_like(mask)
    fewer[:, :10] = True
    return [
        ((torch.randn(2, 3, 24, 24), mask, target), {}, ValueError, "images"),
        ((imgs[:, :1], mask, target), {}, ValueError, "images"),
        ((imgs.long(), mask, target), {}, TypeError, "images"),
        ((imgs, unequal, target), {}, ValueError, "bool_masked_pos: CAE needs the same number"),
        ((imgs, fewer, target), {}, ValueError, "bool_masked_pos: expected 32"),
        ((imgs, mask.float(), target), {}, TypeError, "bool_masked_pos"),
        ((imgs, mask[:, :10], target), {}, ValueError, "bool_masked_pos"),
        ((imgs, mask, target.int()), {}, TypeError, "target"),
        ((imgs, mask, target[:1]), {}, ValueError, "target"),
        ((imgs, mask, target.clamp(max=c.vocab_size - 1).index_fill(1, torch.tensor([3]), c.vocab_size)), {},
         ValueError, r"target: expected token ids in \[0, 128\)"),
        ((imgs, mask, target.index_fill(1, torch.tensor([5]), -1)), {}, ValueError, "target"),
        ((imgs, unequal, target), dict(validate=False), RuntimeError, "bool_masked_pos"),
        ((imgs, fewer, target), dict(num_masked=10, validate=True), ValueError, "bool_masked_pos: CAE needs|"),
        ((imgs, mask, target), dict(num_masked=64), ValueError, "num_masked"),
    ]  # fmt: skip


@pytest.mark.parametrize("fused", [True, False])
def test_bad_inputs_raise_clear_errors(fused):
    model = create_model(DEBUG, fused=fused)
    for args, kw, exc, msg in _bad_inputs():
        if kw.get("num_masked") == 10:  # a valid call with an explicit count: must run
            loss, _ = model(*args, **kw)
            assert torch.isfinite(loss)
            continue
        with pytest.raises(exc, match=msg):
            model(*args, **kw)
    with pytest.raises(ValueError, match="images"):
        model.forward_features(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(img_size=30), "img_size"),
        (dict(depth=0), "depth"),
        (dict(num_heads=5), "num_heads"),
        (dict(decoder_num_heads=7), "decoder_num_heads"),
        (dict(embed_dim=90, num_heads=3), "embed_dim"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(init_values=-1.0), "init_values"),
        (dict(align_weight=float("nan")), "align_weight"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(num_mask_patches=64), "num_mask_patches"),
        (dict(min_mask_patches=40), "min_mask_patches"),
        (dict(max_mask_patches=2), "max_mask_patches"),
        (dict(min_aspect=0.0), "min_aspect"),
        (dict(mask_generator="grid"), "mask_generator"),
        (dict(mlp_ratio=0), "mlp_ratio"),
    ],
)
def test_bad_configs_raise(kwargs, msg):
    with pytest.raises(ValueError, match=f"CAEConfig.{msg}"):
        create_model(DEBUG, **kwargs)


# ----------------------------------------------------------------------------------------- misc / metrics
def test_registry_init_masks_and_flops():
    assert {"cae_base_patch16_224", "cae_large_patch16_224", DEBUG} <= set(list_models("cae"))
    model = create_model(DEBUG)
    c = model.config
    assert (c.num_patches, c.embed_dim, c.vocab_size, c.num_mask_patches) == (64, 96, 128, 32) and model.task == "cae"
    assert torch.all(model.blocks[0].ls1.gamma == 0.1) and torch.all(model.blocks[0].attn.q_bias == 0)
    assert model.cls_token.abs().max() <= c.init_std
    for gen in ("block", "random"):
        m = create_model(DEBUG, mask_generator=gen).sample_masks(5, generator=torch.Generator().manual_seed(1))
        assert m.dtype == torch.bool and m.sum(1).tolist() == [32] * 5
    with torch.device("meta"):
        base = create_model("cae_base_patch16_224")
    gf = base.flops_per_image() / 1e9
    assert 100 < gf < 120, gf  # ~93 GFLOP trained + ~17 GFLOP for the no_grad alignment pass
    assert base.flops_per_image(training=False) < base.flops_per_image() < 3 * base.flops_per_image(training=False)
    # forward FLOPs = what torch's counter sees in the official-path forward (which embeds the patches twice)
    eager = create_model(DEBUG, fused=False)
    imgs, mask, target = batch(eager)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        eager(imgs, mask, target)
    embed = 2 * c.num_patches * c.patch_size**2 * c.in_chans * c.embed_dim
    assert counter.get_total_flops() == model.flops_per_image(training=False) * 2 + embed * 2


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = create_model(DEBUG, fused=False)
    imgs, mask, target = batch(model, bsz=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss, _ = model(imgs, mask, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

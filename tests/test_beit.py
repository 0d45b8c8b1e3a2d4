"""BEiT: fused path vs the official-code twin, official checkpoint layout, shared relative position bias, mask
replacement, errors, FLOPs and BEiT's initialisation."""

from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch

import mimfast.models.beit  # noqa: F401  (registers the BEiT models)
from conftest import DEVICE
from mimfast.models import create_model, list_models
from mimfast.models.beit import BEiT, BEiTConfig
from mimfast.ops.masking import beit_block_masking

DEBUG = "beit_tiny_patch4_debug"


# ------------------------------------------------------------------------------------------------ helpers
def official_rel_index(gh: int, gw: int) -> torch.Tensor:
    """``relative_position_index`` as the official RelativePositionBias builds it (written out independently)."""
    n = (2 * gh - 1) * (2 * gw - 1) + 3
    out = torch.zeros(gh * gw + 1, gh * gw + 1, dtype=torch.long)
    for a in range(gh * gw):
        for b in range(gh * gw):
            dy, dx = a // gw - b // gw, a % gw - b % gw
            out[1 + a, 1 + b] = (dy + gh - 1) * (2 * gw - 1) + (dx + gw - 1)
    out[0, :], out[:, 0], out[0, 0] = n - 3, n - 2, n - 1
    return out


def official_beit_layout(cfg: BEiTConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of microsoft/unilm beit/modeling_pretrain.py ``VisionTransformerForMaskedImageModeling`` built
    with use_abs_pos_emb=False, use_shared_rel_pos_bias=True, init_values > 0, qkv_bias=True (the pretraining
    recipe), written out from that code's attribute names (modeling_finetune.py Block / Attention)."""
    d, c, p, n, g, h = cfg.embed_dim, cfg.in_chans, cfg.patch_size, cfg.num_patches, cfg.grid_size, cfg.num_heads
    hidden = int(d * cfg.mlp_ratio)
    keys = {
        "cls_token": (1, 1, d),
        "mask_token": (1, 1, d),
        "patch_embed.proj.weight": (d, c, p, p),
        "patch_embed.proj.bias": (d,),
        "rel_pos_bias.relative_position_bias_table": ((2 * g - 1) ** 2 + 3, h),
        "rel_pos_bias.relative_position_index": (n + 1, n + 1),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        keys.update({
            f"{b}.gamma_1": (d,), f"{b}.gamma_2": (d,),
            f"{b}.norm1.weight": (d,), f"{b}.norm1.bias": (d,),
            f"{b}.attn.q_bias": (d,), f"{b}.attn.v_bias": (d,), f"{b}.attn.qkv.weight": (3 * d, d),
            f"{b}.attn.proj.weight": (d, d), f"{b}.attn.proj.bias": (d,),
            f"{b}.norm2.weight": (d,), f"{b}.norm2.bias": (d,),
            f"{b}.mlp.fc1.weight": (hidden, d), f"{b}.mlp.fc1.bias": (hidden,),
            f"{b}.mlp.fc2.weight": (d, hidden), f"{b}.mlp.fc2.bias": (d,),
        })  # fmt: skip
    keys.update({"norm.weight": (d,), "norm.bias": (d,), "lm_head.weight": (cfg.vocab_size, d)})
    keys["lm_head.bias"] = (cfg.vocab_size,)
    return keys


def official_checkpoint(cfg: BEiTConfig, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in official_beit_layout(cfg).items()}
    sd["rel_pos_bias.relative_position_index"] = official_rel_index(cfg.grid_size, cfg.grid_size)
    return sd


def twins(seed=0, **kw):
    torch.manual_seed(seed)
    fused = create_model(DEBUG, **kw).to(DEVICE)
    with torch.no_grad():  # make the zero-initialised tensors non-trivial so that a wrong wiring shows
        g = torch.Generator().manual_seed(seed + 7)
        table = fused.rel_pos_bias.relative_position_bias_table
        table.copy_(torch.randn(table.shape, generator=g))
        for blk in fused.blocks:
            blk.attn.q_bias.copy_(0.1 * torch.randn(blk.attn.q_bias.shape, generator=g))
            blk.attn.v_bias.copy_(0.1 * torch.randn(blk.attn.v_bias.shape, generator=g))
    eager = copy.deepcopy(fused)
    eager.fused = False
    return fused, eager


def masks(bsz=4, seed=1):
    """(B, 64) masks with row 0 exactly num_mask_patches (24) masked and the last row under-filled (< 24)."""
    return _masks(bsz, seed).clone()


@functools.cache
def _masks(bsz, seed):
    g = torch.Generator().manual_seed(seed)
    full = beit_block_masking(16, 8, 8, 24, min_num_patches=4, generator=g)
    small = beit_block_masking(1, 8, 8, 10, min_num_patches=4, generator=g)
    exact = full[full.sum(1) == 24]
    rest = full[: bsz - 2]
    m = torch.cat([exact[:1], rest, small])
    assert m.sum(1)[0] == 24 and m.sum(1)[-1] < 24
    return m.to(DEVICE)


def batch(bsz=4, seed=1, vocab=128):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(bsz, 3, 32, 32, generator=g)
    target = torch.randint(0, vocab, (bsz, 64), generator=g)
    return imgs.to(DEVICE), masks(bsz, seed), target.to(DEVICE)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_and_configs():
    assert {"beit_base_patch16_224", "beit_large_patch16_224", DEBUG} <= set(list_models("beit"))
    with torch.device("meta"):
        base, large = create_model("beit_base_patch16_224"), create_model("beit_large_patch16_224")
    assert (base.config.embed_dim, base.config.depth, base.config.num_heads) == (768, 12, 12)
    assert (large.config.embed_dim, large.config.depth, large.config.num_heads) == (1024, 24, 16)
    assert base.config.vocab_size == 8192 and base.config.num_mask_patches == 75 and base.config.num_patches == 196
    dbg = create_model(DEBUG).config
    assert (dbg.num_patches, dbg.embed_dim, dbg.depth, dbg.num_heads, dbg.vocab_size) == (64, 96, 4, 3, 128)
    assert (dbg.num_mask_patches, dbg.min_mask_patches) == (24, 4)
    assert BEiT.task == "beit"
    assert create_model(DEBUG, fused=False).fused is False
    # the masking fields are what beit_block_masking takes
    m = beit_block_masking(3, dbg.grid_size, dbg.grid_size, dbg.num_mask_patches, min_num_patches=dbg.min_mask_patches,
                           max_num_patches=dbg.max_mask_patches, min_aspect=dbg.min_aspect)  # fmt: skip
    assert m.shape == (3, 64) and int(m.sum(1).max()) <= 24


def test_drop_path_increases_linearly():
    model = create_model(DEBUG, drop_path_rate=0.3)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


# ------------------------------------------------------------------------------------------- fused vs twin
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fused_equals_official_twin(mode):
    fused, eager = twins()
    imgs, m, target = batch()
    losses = []
    for model in (fused, eager):
        model.train(mode == "train")
        torch.manual_seed(123)  # the same drop-path draws on both paths
        loss, metrics = model(imgs, m, target)
        assert metrics == {}
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(fused.named_parameters(), eager.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, name
        assert b.grad.abs().max() > 0, name  # every parameter is used, including the mask token and the bias table
        scale = b.grad.abs().max().item()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_loss_is_the_mean_ce_over_masked_positions():
    fused, eager = twins()
    fused.eval()
    imgs, m, target = batch()
    with torch.no_grad():
        h = fused.forward_features(imgs, m)[:, 1:]
        logits = fused.lm_head(h)  # (B, L, V)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        want = (ce * m).sum() / m.sum()
        torch.testing.assert_close(fused(imgs, m, target)[0], want, rtol=1e-5, atol=1e-6)
        # unmasked targets are never read
        other = torch.where(m, target, (target + 5) % 128)
        torch.testing.assert_close(fused(imgs, m, other)[0], want, rtol=1e-5, atol=1e-6)


def test_masked_rows_static_selection():
    model = create_model(DEBUG)
    m = masks()
    ids, valid = model.masked_rows(m)
    assert ids.dtype == torch.int32 and ids.shape == (4, 24) and valid.shape == (4, 24)
    for b in range(4):
        pos = torch.nonzero(m[b]).flatten()
        k = pos.numel()
        assert torch.equal(valid[b], torch.arange(24, device=m.device) < k)
        assert torch.equal(ids[b, :k].long(), pos)  # masked positions first, in increasing order
        assert not m[b, ids[b, k:].long()].any()  # padding rows are unmasked positions


def test_forward_features_twins_agree():
    fused, eager = twins()
    imgs, m, _ = batch()
    for mask in (m, None):
        a, b = fused.eval().forward_features(imgs, mask), eager.eval().forward_features(imgs, mask)
        assert a.shape == (4, 65, 96)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_twins_agree_under_bf16_autocast():
    fused, eager = twins()
    imgs, m, target = batch()
    ctx = torch.autocast(DEVICE, dtype=torch.bfloat16)
    with ctx:
        lf = fused.eval()(imgs, m, target)[0]
        le = eager.eval()(imgs, m, target)[0]
    assert lf.dtype == torch.float32 and torch.isfinite(lf)
    torch.testing.assert_close(lf, le, rtol=2e-2, atol=2e-2)


def test_mlm_accuracy():
    model = create_model(DEBUG).to(DEVICE).eval()
    imgs, m, target = batch()
    with torch.no_grad():
        pred = model.lm_head(model.forward_features(imgs, m)[:, 1:]).argmax(-1)
    acc = model.mlm_accuracy(imgs, m, torch.where(m, pred, target))
    assert acc.item() == 1.0


# ------------------------------------------------------------------------------ relative position bias
def test_relative_position_bias_is_shared_and_used():
    fused, eager = twins()
    tables = [n for n, _ in fused.named_parameters() if "relative_position" in n]
    assert tables == ["rel_pos_bias.relative_position_bias_table"]  # one table, no per-block tables
    assert fused.rel_pos_bias.relative_position_bias_table.shape == (15 * 15 + 3, 3)
    assert torch.equal(fused.rel_pos_bias.relative_position_index.cpu(), official_rel_index(8, 8))
    imgs, m, target = batch()
    for model in (fused.eval(), eager.eval()):
        with torch.no_grad():
            model.lm_head.weight.mul_(100.0)  # at init the logits are ~0 and the loss ~log(V) whatever the input
            before, feats = model(imgs, m, target)[0], model.forward_features(imgs, m)
            model.rel_pos_bias.relative_position_bias_table[-1].add_(1.0)  # the cls-to-cls entry
            assert (model.forward_features(imgs, m)[:, 0] - feats[:, 0]).abs().max() > 1e-3
            table = model.rel_pos_bias.relative_position_bias_table
            table.add_(3.0 * torch.randn(table.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE))
            after = model(imgs, m, target)[0]
        assert (after - before).abs() > 1e-2


# ------------------------------------------------------------------------------------------ mask replacement
def test_masked_patch_content_does_not_leak():
    fused, eager = twins()
    imgs, m, _ = batch()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(imgs.shape, generator=g).to(DEVICE)
    pix = m.reshape(4, 1, 8, 1, 8, 1).expand(4, 3, 8, 4, 8, 4).reshape(imgs.shape)  # masked patches' pixels
    swapped = torch.where(pix, noise, imgs)
    changed_visible = torch.where(pix, imgs, noise)
    for model in (fused.eval(), eager.eval()):
        with torch.no_grad():
            a = model.forward_features(imgs, m)
            assert torch.equal(a, model.forward_features(swapped, m))
            assert not torch.allclose(a, model.forward_features(changed_visible, m))
            # and the mask token is what those positions see
            model.mask_token.add_(1.0)
            assert not torch.allclose(a, model.forward_features(imgs, m))
            model.mask_token.sub_(1.0)


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", ["beit_base_patch16_224", "beit_large_patch16_224", DEBUG])
def test_parameter_names_and_shapes_are_the_official_ones(name):
    with torch.device("meta"):
        model = create_model(name)
    ours = {k: tuple(v.shape) for k, v in model.official_state_dict().items()}
    assert ours == official_beit_layout(model.config)


def test_loads_an_official_state_dict_and_round_trips():
    cfg = create_model(DEBUG).config
    sd = official_checkpoint(cfg)
    for wrapped in ({"model": sd}, {f"module.{k}": v for k, v in sd.items()}, sd):
        model = create_model(DEBUG)
        assert model.load_official_state_dict(wrapped) == []
        out = model.official_state_dict()
        assert set(out) == set(sd)
        for k, v in out.items():
            assert torch.equal(v, sd[k]), k
    # explicit spot checks of the renamed / special entries
    assert torch.equal(model.blocks[2].ls1.gamma, sd["blocks.2.gamma_1"])
    assert torch.equal(model.blocks[3].ls2.gamma, sd["blocks.3.gamma_2"])
    assert torch.equal(model.blocks[1].attn.q_bias, sd["blocks.1.attn.q_bias"])
    assert model.blocks[0].attn.qkv.bias is None
    # round trip: ours -> official -> a fresh model
    again = create_model(DEBUG)
    again.load_official_state_dict(model.official_state_dict())
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # the loaded weights drive both paths identically
    fused, eager = create_model(DEBUG).to(DEVICE).eval(), create_model(DEBUG, fused=False).to(DEVICE).eval()
    fused.load_official_state_dict(sd)
    eager.load_official_state_dict(sd)
    imgs, m, target = batch()
    torch.testing.assert_close(fused(imgs, m, target)[0], eager(imgs, m, target)[0], rtol=1e-5, atol=1e-6)


def test_checkpoint_without_index_buffer_loads():
    cfg = create_model(DEBUG).config
    sd = official_checkpoint(cfg)
    del sd["rel_pos_bias.relative_position_index"]
    assert create_model(DEBUG).load_official_state_dict(sd) == []


def test_encoder_only_checkpoint_loads_with_a_warning():
    cfg = create_model(DEBUG).config
    sd = {k: v for k, v in official_checkpoint(cfg).items() if not k.startswith(("lm_head", "mask_token"))}
    model = create_model(DEBUG)
    head_before = model.lm_head.weight.clone()
    with pytest.warns(UserWarning, match="no lm_head / mask_token"):
        missing = model.load_official_state_dict({"model": sd})
    assert sorted(missing) == ["lm_head.bias", "lm_head.weight", "mask_token"]
    assert torch.equal(model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    assert torch.equal(model.lm_head.weight, head_before)


def test_bad_checkpoints_raise():
    cfg = create_model(DEBUG).config
    sd = official_checkpoint(cfg)
    with pytest.raises(KeyError, match="unexpected keys.*pos_embed"):
        create_model(DEBUG).load_official_state_dict({**sd, "pos_embed": torch.zeros(1, 65, 96)})
    with pytest.raises(KeyError, match="missing keys.*blocks.0.gamma_1"):
        create_model(DEBUG).load_official_state_dict({k: v for k, v in sd.items() if k != "blocks.0.gamma_1"})
    with pytest.raises(KeyError, match="per-block relative position"):
        create_model(DEBUG).load_official_state_dict({**sd, "blocks.0.attn.relative_position_bias_table": sd[
            "rel_pos_bias.relative_position_bias_table"]})  # fmt: skip
    with pytest.raises(ValueError, match=r"state_dict\['blocks.1.gamma_2'\]: expected shape \(96,\)"):
        create_model(DEBUG).load_official_state_dict({**sd, "blocks.1.gamma_2": torch.zeros(768)})
    with pytest.raises(ValueError, match=r"state_dict\['rel_pos_bias.relative_position_bias_table'\]"):
        create_model(DEBUG).load_official_state_dict(
            {**sd, "rel_pos_bias.relative_position_bias_table": torch.zeros(732, 3)}
        )
    bad_index = sd["rel_pos_bias.relative_position_index"].clone()
    bad_index[1, 2] += 1
    with pytest.raises(ValueError, match="relative_position_index.*not BEiT's"):
        create_model(DEBUG).load_official_state_dict({**sd, "rel_pos_bias.relative_position_index": bad_index})
    with pytest.raises(TypeError, match="state_dict: expected a dict"):
        create_model(DEBUG).load_official_state_dict([1, 2])
    # strict=False: other missing keys are returned (and warned about)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        missing = create_model(DEBUG).load_official_state_dict(
            {k: v for k, v in sd.items() if k != "norm.bias"}, strict=False
        )
    assert missing == ["norm.bias"]


# ----------------------------------------------------------------------------------------------- errors
def test_input_errors():
    # CPU tensors: their value checks run on the host. On a GPU they are torch._assert_async device asserts, which
    # would poison the CUDA context of the rest of the session, so they are not triggered here.
    model = create_model(DEBUG)
    eager = create_model(DEBUG, fused=False)
    imgs, m, target = (t.cpu() for t in batch(bsz=2))
    with pytest.raises(ValueError, match=r"images: expected shape \(B, 3, 32, 32\)"):
        model(imgs[:, :, :16], m, target)
    with pytest.raises(TypeError, match="images: expected a floating-point"):
        model(imgs.long(), m, target)
    with pytest.raises(ValueError, match=r"bool_masked_pos: expected shape \(B, L\) = \(2, 64\)"):
        model(imgs, m.reshape(2, 8, 8), target)
    with pytest.raises(TypeError, match="bool_masked_pos: expected dtype torch.bool"):
        model(imgs, m.to(torch.uint8), target)
    with pytest.raises(ValueError, match="bool_masked_pos: no position is masked"):
        model(imgs, torch.zeros_like(m), target)
    too_many = m.clone()
    too_many[0, :30] = True
    with pytest.raises(ValueError, match="bool_masked_pos: a sample has more masked positions than num_mask"):
        model(imgs, too_many, target)
    loss, _ = eager(imgs, too_many, target)  # the official path has no bound
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"target: expected shape \(B, L\) = \(2, 64\)"):
        model(imgs, m, target[:, :10])
    with pytest.raises(TypeError, match="target: expected integer token ids"):
        model(imgs, m, target.float())
    for bad in (128, -1):
        t = target.clone()
        t[m] = bad
        with pytest.raises(ValueError, match=r"target: token ids at masked positions must lie in \[0, vocab_size=128"):
            model(imgs, m, t)
    with pytest.raises(ValueError, match="bool_masked_pos: expected shape"):
        model.forward_features(imgs, m[:, :5])


@pytest.mark.parametrize(
    "field,value",
    [("img_size", 30), ("patch_size", 0), ("embed_dim", 100), ("depth", 0), ("vocab_size", 0), ("mlp_ratio", 0),
     ("init_values", -0.1), ("drop_path_rate", 1.0), ("layer_norm_eps", 0.0), ("init_std", float("nan")),
     ("num_mask_patches", 65), ("num_mask_patches", 0), ("min_mask_patches", 25), ("max_mask_patches", 2),
     ("min_aspect", 0.0), ("min_aspect", 2.0)],
)  # fmt: skip
def test_bad_config_fields(field, value):
    base = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, vocab_size=128, num_mask_patches=24,
                min_mask_patches=4)  # fmt: skip
    with pytest.raises(ValueError, match=f"BEiTConfig.{field}"):
        BEiTConfig(**{**base, field: value})


def test_no_layer_scale_option():
    model = create_model(DEBUG, init_values=None)
    assert not any("gamma" in k for k in model.official_state_dict())


# ------------------------------------------------------------------------------------------- flops / init
def test_flops_per_image():
    with torch.device("meta"):
        base, large = create_model("beit_base_patch16_224"), create_model("beit_large_patch16_224")
    fb = base.flops_per_image()
    assert 100e9 < fb < 115e9  # ~36 GFLOP forward x 3
    assert base.flops_per_image(training=False) == pytest.approx(fb / 3)
    assert 3.2 * fb < large.flops_per_image() < 3.8 * fb
    d = create_model(DEBUG)
    n, dim = 65, 96
    want = 2 * 64 * 48 * dim + 4 * (2 * n * dim * 12 * dim + 4 * n * n * dim) + 2 * 24 * dim * 128
    assert d.flops_per_image(training=False) == want


def test_beit_initialisation():
    torch.manual_seed(0)
    model = create_model(DEBUG)
    std = 0.02
    trunc_std = std * 0.5398  # std of N(0, std^2) truncated at +-std
    for blk in model.blocks:
        assert torch.all(blk.ls1.gamma == 0.1) and torch.all(blk.ls2.gamma == 0.1)
        assert torch.all(blk.attn.q_bias == 0) and torch.all(blk.attn.v_bias == 0)
    for i, blk in enumerate(model.blocks):
        s = math.sqrt(2.0 * (i + 1))
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert w.abs().max() <= std / s + 1e-7
            assert w.std().item() == pytest.approx(trunc_std / s, rel=0.05)
        for w in (blk.attn.qkv.weight, blk.mlp.fc1.weight):  # not rescaled
            assert w.abs().max() <= std + 1e-7
            assert w.std().item() == pytest.approx(trunc_std, rel=0.05)
    for t in (model.cls_token, model.mask_token, model.patch_embed.proj.weight, model.lm_head.weight):
        assert t.abs().max() <= std + 1e-7 and t.abs().max() > 0
    assert torch.all(model.lm_head.bias == 0) and torch.all(model.patch_embed.proj.bias == 0)
    assert torch.all(model.rel_pos_bias.relative_position_bias_table == 0)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)

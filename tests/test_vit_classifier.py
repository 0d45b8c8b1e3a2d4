"""ViT classifier for fine-tuning: shapes, config and input errors, fused vs eager twins, drop path, layer-wise lr
decay groups, conversion of the pretrained MAE / BEiT / CAE / MAGE encoders, official fine-tuned key maps, FLOPs."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from mimfast.data import BUILTIN_CLASSES
from mimfast.models import create_model, list_models
from mimfast.models.vit_classifier import (
    ViTClassifierConfig,
    classifier_overrides,
    encoder_state_for_classifier,
    layer_decay_param_groups,
)

DEBUG = "vit_tiny_patch4_32_cls_debug"
PRESETS = ["vit_base_patch16_224_cls", "vit_large_patch16_224_cls", "vit_huge_patch14_224_cls", DEBUG]
PRETRAINED = {"mae": "mae_vit_tiny_patch4_dec64d2b_debug", "beit": "beit_tiny_patch4_debug",
              "cae": "cae_tiny_patch4_debug", "mage": "mage_tiny_patch4_debug"}  # fmt: skip
BEIT_LIKE = dict(qkv_bias="qv", init_values=0.1, pos_embed="none", rel_pos_bias=True)
TOKENS = dict(input="tokens", vocab_size=139, fake_class_id=137, codebook_size=128)


def images(b=3, seed=0):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def token_ids(b=3, seed=0, hi=128):
    return torch.randint(0, hi, (b, 64), generator=torch.Generator().manual_seed(seed))


def perturb(model, seed=0, scale=0.05):
    """Random offsets on every parameter (zero-initialised tables, LayerScale, biases included): a wrong mapping
    must change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return create_model(DEBUG, **kw)


# ------------------------------------------------------------------------------------------ registry / shapes
def test_registry_presets_and_debug_matches_the_debug_encoders():
    assert set(PRESETS) <= set(list_models("_cls"))
    want = {"vit_base_patch16_224_cls": (224, 16, 768, 12, 12), "vit_large_patch16_224_cls": (224, 16, 1024, 24, 16),
            "vit_huge_patch14_224_cls": (224, 14, 1280, 32, 16), DEBUG: (32, 4, 96, 4, 3)}  # fmt: skip
    for name, arch in want.items():
        with torch.device("meta"):
            m = create_model(name, num_classes=7, drop_path_rate=0.2)
        c = m.config
        assert (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads) == arch
        assert (c.num_classes, c.drop_path_rate, m.task) == (7, 0.2, "finetune")
    m = create_model(DEBUG, fused=False)
    assert m.config.num_classes == len(BUILTIN_CLASSES) == 10 and not m.fused and create_model(DEBUG).fused
    for name in PRETRAINED.values():  # the debug preset needs no shape override for any tiny encoder
        ov = classifier_overrides(create_model(name))
        assert all(ov[k] == getattr(m.config, k) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"))


@pytest.mark.parametrize("kw", [{}, dict(global_pool=False), BEIT_LIKE, TOKENS])
def test_shapes(kw):
    m = tiny(**kw).eval()
    x = token_ids() if kw.get("input") == "tokens" else images()
    t = m.forward_features(x)
    assert t.shape == (3, 65, 96)
    feat = m.pool(t)
    assert feat.shape == (3, 96)
    logits = m(x)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, m.forward_head(feat))
    if m.config.global_pool:
        torch.testing.assert_close(feat, m.fc_norm(t[:, 1:].mean(1)))
    else:
        torch.testing.assert_close(feat, m.norm(t)[:, 0])


@pytest.mark.parametrize("field, value", [
    ("img_size", 30), ("patch_size", 0), ("embed_dim", 97), ("num_classes", 0), ("mlp_ratio", 0.0),
    ("qkv_bias", "k"), ("qkv_bias", 1), ("init_values", 0.0), ("pos_embed", "sincos"), ("rel_pos_bias", 1),
    ("global_pool", "yes"), ("drop_path_rate", 1.0), ("drop_rate", -0.1), ("attn_drop_rate", float("nan")),
    ("layer_norm_eps", 0.0), ("head_init_std", -1.0), ("input", "ids"), ("vocab_size", 139), ("token_dropout", 1.0),
])  # fmt: skip
def test_bad_config_fields(field, value):
    with pytest.raises(ValueError, match=rf"ViTClassifierConfig\.{field}: expected"):
        ViTClassifierConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("vocab_size", None), ("fake_class_id", 139), ("codebook_size", 140),
                                          ("pos_embed", "learned")])  # fmt: skip
def test_bad_token_config_fields(field, value):
    with pytest.raises(ValueError, match=rf"ViTClassifierConfig\.{field}: expected"):
        ViTClassifierConfig(**{**TOKENS, field: value})
    assert ViTClassifierConfig(**TOKENS).pos_embed == "none" and ViTClassifierConfig().pos_embed == "learned"


def test_input_errors():
    m = tiny()
    for bad, err, what in [(torch.randn(2, 3, 28, 28), ValueError, r"\(B, 3, 32, 32\)"),
                           (torch.randn(2, 1, 32, 32), ValueError, "shape"),
                           (torch.randn(3, 32, 32), ValueError, "shape"),
                           (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
                           (torch.randn(0, 3, 32, 32), ValueError, "empty")]:  # fmt: skip
        with pytest.raises(err, match=what):
            m(bad)
    t = tiny(**TOKENS)
    for bad, err, what in [(torch.randn(2, 64), TypeError, "integer token ids"),
                           (token_ids()[:, :63], ValueError, r"\(B >= 1, 64\)"),
                           (token_ids().clone().fill_(128), ValueError, r"\[0, 128\)"),
                           (-token_ids() - 1, ValueError, r"\[0, 128\)")]:  # fmt: skip
        with pytest.raises(err, match=what):
            t(bad)


# ------------------------------------------------------------------------------------------ twins / drop path
@pytest.mark.parametrize("kw", [dict(global_pool=False), BEIT_LIKE, dict(TOKENS, pos_embed="none", rel_pos_bias=True)],
                         ids=["mae_cls", "beit_gp", "tokens"])  # fmt: skip
def test_fused_equals_eager_logits_and_grads(kw):
    kw = dict(kw, drop_path_rate=0.0, token_dropout=0.0)
    fused = perturb(tiny(**kw))
    eager = create_model(DEBUG, fused=False, **kw)
    eager.load_state_dict(fused.state_dict())
    x = token_ids() if kw.get("input") == "tokens" else images()
    out = [m(x) for m in (fused, eager)]
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)
    for o in out:
        (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward()
    for (name, a), b in zip(fused.named_parameters(), eager.parameters(), strict=True):
        assert a.grad is not None and a.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_drop_path_is_linear_and_active_only_in_training():
    m = perturb(tiny(drop_path_rate=0.6))
    rates = [blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0.0 for blk in m.blocks]
    assert rates == pytest.approx([0.0, 0.2, 0.4, 0.6])
    ref = create_model(DEBUG, drop_path_rate=0.0)
    ref.load_state_dict(m.state_dict())
    x = images(8)
    m.eval()
    torch.testing.assert_close(m(x), ref.eval()(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, ref(x))


# ------------------------------------------------------------------------------------------ layer-wise lr decay
def expected_layer(name: str, depth: int) -> int:
    if name in ("cls_token", "pos_embed") or name.split(".")[0] in ("patch_embed", "token_emb"):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


@pytest.mark.parametrize("name", PRESETS)
def test_layer_id_of_every_parameter(name):
    with torch.device("meta"):
        m = create_model(name, rel_pos_bias=True, init_values=0.1)
    d = m.config.depth
    assert m.num_layers == d + 1
    for n, _ in m.named_parameters():
        assert m.layer_id(n) == expected_layer(n, d), n
    assert m.layer_id("patch_embed.proj.weight") == 0 and m.layer_id("blocks.3.attn.qkv.weight") == 4
    assert m.layer_id(f"blocks.{d - 1}.rel_pos_bias.relative_position_bias_table") == d
    assert m.layer_id("head.weight") == m.layer_id("fc_norm.bias") == d + 1 == m.layer_id("module.head.bias")
    with pytest.raises(ValueError, match="names no block"):
        m.layer_id(f"blocks.{d}.norm1.weight")


@pytest.mark.parametrize("kw", [dict(BEIT_LIKE, pos_embed="fixed"), TOKENS], ids=["pixels", "tokens"])
def test_layer_decay_param_groups(kw):
    m = tiny(**kw)
    decay, wd = 0.65, 0.05
    groups = layer_decay_param_groups(m, wd, decay)
    ids = {id(p): n for n, p in m.named_parameters()}
    seen, keys = [], set()
    for g in groups:
        layers = {m.layer_id(ids[id(p)]) for p in g["params"]}
        assert len(layers) == 1
        lid = layers.pop()
        assert g["lr_scale"] == decay ** (m.num_layers - lid)
        no_decay = {p.ndim == 1 or ids[id(p)] in m.no_weight_decay() for p in g["params"]}
        assert len(no_decay) == 1 and g["weight_decay"] == (0.0 if no_decay.pop() else wd)
        assert (lid, g["weight_decay"]) not in keys
        keys.add((lid, g["weight_decay"]))
        seen += [ids[id(p)] for p in g["params"]]
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen == (["pos_embed"] if kw.get("pos_embed") == "fixed" else [])
    if kw.get("input") != "tokens":
        assert {"cls_token", "blocks.0.rel_pos_bias.relative_position_bias_table"} <= m.no_weight_decay()
    assert {g["lr_scale"] for g in groups} == {decay**k for k in range(m.num_layers + 1)}
    wrapped = torch.nn.Module()
    wrapped.module = m  # a DDP-like wrapper
    assert [g["lr_scale"] for g in layer_decay_param_groups(wrapped, wd, decay)] == [g["lr_scale"] for g in groups]
    custom = layer_decay_param_groups(m, wd, 1.0, no_weight_decay_list=[])
    assert all(g["lr_scale"] == 1.0 for g in custom)
    w = next(n for n, p in m.named_parameters() if p.ndim > 1 and n in m.no_weight_decay()) if kw.get(
        "input") != "tokens" else None  # fmt: skip
    if w is not None:
        assert any(g["weight_decay"] == wd and any(p is dict(m.named_parameters())[w] for p in g["params"])
                   for g in custom)  # fmt: skip
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="layer_decay"):
            layer_decay_param_groups(m, wd, bad)
    with pytest.raises(TypeError, match="ViTClassifier"):
        layer_decay_param_groups(torch.nn.Linear(2, 2), wd, decay)


# ------------------------------------------------------------------------------------ pretrained encoders
def pretrained_features(fam, model, x):
    if fam == "mae":
        return model.forward_encoder(x, 0.0, torch.arange(64.0).expand(x.shape[0], 64))[0]
    return model.forward_features(x)


@pytest.mark.parametrize("global_pool", [True, False], ids=["gp", "cls"])
@pytest.mark.parametrize("fam", list(PRETRAINED))
def test_converted_encoder_equals_the_pretrained_one(fam, global_pool):
    torch.manual_seed(0)
    pre = perturb(create_model(PRETRAINED[fam], fused=False), seed=1).eval()
    ov = classifier_overrides(pre)
    assert ov["input"] == ("tokens" if fam == "mage" else "pixels")
    assert ov["qkv_bias"] == ("qv" if fam in ("beit", "cae") else True)
    assert ov["pos_embed"] == {"mae": "learned", "beit": "none", "cae": "fixed", "mage": "none"}[fam]
    clf = tiny(global_pool=global_pool, **ov).eval()
    head = clf.head.weight.detach().clone()
    state = encoder_state_for_classifier(pre, clf)
    report = clf.load_pretrained_encoder(pre)
    x = token_ids() if fam == "mage" else images()
    with torch.no_grad():
        ref = pretrained_features(fam, pre, x)
        t = clf.forward_features(x)
        torch.testing.assert_close(pre.norm(t), ref, rtol=1e-5, atol=1e-5)
        if not global_pool:  # the class token equals the pretrained encoder's
            torch.testing.assert_close(clf.pool(t), ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clf.head.weight, head)  # the head is never loaded
    norm_dropped = global_pool and fam != "cae"
    assert ("norm.*" in report) == norm_dropped and "blocks.*" not in report
    assert "mask_token" in report or fam == "mage"
    assert set(state) <= set(clf.state_dict()) and "head.weight" not in state
    if global_pool:
        want = (pre.norm.weight, pre.norm.bias) if fam == "cae" else (torch.ones(96), torch.zeros(96))
        torch.testing.assert_close((clf.fc_norm.weight, clf.fc_norm.bias), want)
    if fam == "mae":
        assert clf.pos_embed.requires_grad and torch.equal(clf.pos_embed, pre.pos_embed)
    if fam == "cae":
        assert not clf.pos_embed.requires_grad and torch.equal(clf.pos_embed, pre.pos_embed)
    if fam == "beit":
        tables = [blk.rel_pos_bias.relative_position_bias_table for blk in clf.blocks]
        assert all(torch.equal(tb, pre.rel_pos_bias.relative_position_bias_table) for tb in tables)
        assert len({tb.data_ptr() for tb in tables}) == len(tables)  # independent copies, trained per block
    assert torch.isfinite(clf(x)).all()


def test_conversion_errors():
    clf = tiny()
    with pytest.raises(ValueError, match=r"is a VQGAN \(a tokenizer\), not a ViT encoder; fine-tuning needs an MAE, "
                                         "BEiT, CAE or MAGE checkpoint"):  # fmt: skip
        clf.load_pretrained_encoder(create_model("vqgan_f4_k128_debug"))
    with pytest.raises(ValueError, match="already a classifier"):
        clf.load_pretrained_encoder(tiny())
    narrow = create_model(PRETRAINED["mae"], embed_dim=48)
    with pytest.raises(ValueError, match=r"ViTClassifierConfig\.embed_dim=96 but the pretrained MAE .*has 48.*"
                                         r"model\.overrides=.*'embed_dim': 48"):  # fmt: skip
        clf.load_pretrained_encoder(narrow)
    with pytest.raises(ValueError, match=r"qkv_bias=True but the pretrained BEiT has 'qv'.*create_model\("
                                         rf"'{DEBUG}', qkv_bias='qv', init_values=0.1, pos_embed='none', "
                                         "rel_pos_bias=True\\)"):  # fmt: skip
        clf.load_pretrained_encoder(create_model(PRETRAINED["beit"]))
    with pytest.raises(ValueError, match="input='pixels' but the pretrained MAGE has 'tokens'"):
        clf.load_pretrained_encoder(create_model(PRETRAINED["mage"]))
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    assert all(torch.equal(v, clf.state_dict()[k]) for k, v in before.items())  # nothing loaded by a failure
    with pytest.raises(ValueError, match="does not fit"):
        encoder_state_for_classifier(create_model(PRETRAINED["cae"]), clf)


# ------------------------------------------------------------------------------------ official checkpoints
def official_layout(kind: str, c: ViTClassifierConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official fine-tuned classifier, written out from the official attribute names: "timm"
    (MAE models_vit.py / timm 0.3.2 VisionTransformer), "beit" (BEiT / CAE modeling_finetune.py with
    use_rel_pos_bias, layer scale gamma_1/2, q/v biases; CAE also has its sin-cos pos_embed), "mage"
    (models_vit_mage.py: timm's unused cls_token / pos_embed / patch_embed, BertEmbeddings, a frozen vqgan)."""
    d, n, p, g, hd = c.embed_dim, c.num_patches, c.patch_size, c.grid_size, int(c.embed_dim * c.mlp_ratio)
    keys = {"cls_token": (1, 1, d), "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,)}
    if kind != "beit" or c.pos_embed != "none":
        keys["pos_embed"] = (1, n + 1, d)
    if kind == "mage":
        keys.update({"token_emb.word_embeddings.weight": (c.vocab_size, d), "token_emb.position_ids": (1, n + 1),
                     "token_emb.position_embeddings.weight": (n + 1, d), "token_emb.LayerNorm.weight": (d,),
                     "token_emb.LayerNorm.bias": (d,), "vqgan.quantize.embedding.weight": (128, 8),
                     "vqgan.encoder.conv_in.weight": (8, 3, 3, 3)})  # fmt: skip
    for i in range(c.depth):
        b = f"blocks.{i}"
        keys.update({f"{b}.norm1.weight": (d,), f"{b}.norm1.bias": (d,), f"{b}.attn.qkv.weight": (3 * d, d),
                     f"{b}.attn.proj.weight": (d, d), f"{b}.attn.proj.bias": (d,), f"{b}.norm2.weight": (d,),
                     f"{b}.norm2.bias": (d,), f"{b}.mlp.fc1.weight": (hd, d), f"{b}.mlp.fc1.bias": (hd,),
                     f"{b}.mlp.fc2.weight": (d, hd), f"{b}.mlp.fc2.bias": (d,)})  # fmt: skip
        if kind == "beit":
            keys.update({f"{b}.gamma_1": (d,), f"{b}.gamma_2": (d,), f"{b}.attn.q_bias": (d,),
                         f"{b}.attn.v_bias": (d,), f"{b}.attn.relative_position_bias_table": ((2 * g - 1) ** 2 + 3,
                         c.num_heads), f"{b}.attn.relative_position_index": (n + 1, n + 1)})  # fmt: skip
        else:
            keys[f"{b}.attn.qkv.bias"] = (3 * d,)
    pool = "fc_norm" if c.global_pool else "norm"
    keys.update({f"{pool}.weight": (d,), f"{pool}.bias": (d,), "head.weight": (c.num_classes, d),
                 "head.bias": (c.num_classes,)})  # fmt: skip
    return keys


def official_rel_index(g: int) -> torch.Tensor:
    """BEiT's relative_position_index, written out independently."""
    n = (2 * g - 1) ** 2 + 3
    out = torch.zeros(g * g + 1, g * g + 1, dtype=torch.long)
    for a in range(g * g):
        for b in range(g * g):
            out[1 + a, 1 + b] = (a // g - b // g + g - 1) * (2 * g - 1) + (a % g - b % g + g - 1)
    out[0, :], out[:, 0], out[0, 0] = n - 3, n - 2, n - 1
    return out


def official_checkpoint(kind, c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=gen) * 0.05 for k, s in official_layout(kind, c).items()}
    for k in sd:
        if k.endswith("relative_position_index"):
            sd[k] = official_rel_index(c.grid_size)
        elif k.endswith("norm1.weight") or k.endswith("norm.weight"):
            sd[k] = sd[k] + 1
    if "token_emb.position_ids" in sd:
        sd["token_emb.position_ids"] = torch.arange(c.num_patches + 1).unsqueeze(0)
    return sd


def to_ours(key: str) -> str | None:
    """The test's own map official -> ours (None: dropped)."""
    if key.startswith("vqgan.") or key.endswith(("relative_position_index", "position_ids")):
        return None
    key = re.sub(r"\.gamma_(\d)$", r".ls\1.gamma", key)
    return key.replace(".attn.relative_position_bias_table", ".rel_pos_bias.relative_position_bias_table")


KINDS = {"timm": {}, "timm_cls": dict(global_pool=False), "beit": BEIT_LIKE,
         "cae": dict(BEIT_LIKE, pos_embed="fixed"), "mage": TOKENS}  # fmt: skip


@pytest.mark.parametrize("kind", list(KINDS))
def test_official_checkpoint_round_trip_and_logits(kind):
    clf = tiny(**KINDS[kind]).eval()
    layout = "beit" if kind == "cae" else kind.split("_")[0]
    sd = official_checkpoint(layout, clf.config)
    fresh_logits = clf(token_ids() if kind == "mage" else images())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dropped = clf.load_official_state_dict({"model": dict(sd)})
    want_dropped = {"mage": ["cls_token", "patch_embed.*", "pos_embed", "token_emb.position_ids", "vqgan.*"],
                    "beit": ["blocks.*.attn.relative_position_index"],
                    "cae": ["blocks.*.attn.relative_position_index"]}.get(kind, [])  # fmt: skip
    assert dropped == want_dropped
    own = clf.state_dict()
    mapped = {to_ours(k): v for k, v in sd.items() if to_ours(k) is not None and to_ours(k) in own}
    assert set(mapped) == {k for k in own if not k.endswith("relative_position_index")}
    for k, v in mapped.items():
        assert torch.equal(own[k], v), k
    back = clf.official_state_dict()
    for k, v in sd.items():
        if kind != "mage" or to_ours(k) in own or k == "token_emb.position_ids":
            assert torch.equal(back[k], v), k
    ref = create_model(DEBUG, **KINDS[kind]).eval()
    ref.load_state_dict(mapped, strict=False)
    x = token_ids() if kind == "mage" else images()
    torch.testing.assert_close(clf(x), ref(x), rtol=0, atol=0)
    assert not torch.allclose(clf(x), fresh_logits)
    for wrapped in ({"state_dict": sd}, {"module": sd}, {f"module.{k}": v for k, v in sd.items()}):
        assert create_model(DEBUG, **KINDS[kind]).load_official_state_dict(wrapped) == want_dropped


def test_official_checkpoint_errors():
    clf = tiny(**BEIT_LIKE)
    sd = official_checkpoint("beit", clf.config)
    bad = dict(sd, **{"blocks.1.mlp.fc1.weight": torch.zeros(384, 95)})
    with pytest.raises(ValueError, match=r"'blocks\.1\.mlp\.fc1\.weight'.*\(384, 96\), got \(384, 95\)"):
        clf.load_official_state_dict(bad)
    idx = sd["blocks.2.attn.relative_position_index"].clone()
    idx[3, 4] += 1
    with pytest.raises(ValueError, match=r"blocks\.2\.attn\.relative_position_index.*8x8 grid"):
        clf.load_official_state_dict(dict(sd, **{"blocks.2.attn.relative_position_index": idx}))
    with pytest.raises(KeyError, match=r"unexpected keys \['lm_head\.weight'\]"):
        clf.load_official_state_dict(dict(sd, **{"lm_head.weight": torch.zeros(3, 96)}))
    partial = {k: v for k, v in sd.items() if not k.startswith("head.")}
    with pytest.raises(KeyError, match=r"missing keys \['head\.bias', 'head\.weight'\]"):
        clf.load_official_state_dict(partial)
    head = clf.head.weight.detach().clone()
    with pytest.warns(UserWarning, match="lacks 2 keys"):
        dropped = clf.load_official_state_dict(dict(partial, extra=torch.ones(1)), strict=False)
    assert dropped == ["blocks.*.attn.relative_position_index", "extra"]
    assert torch.equal(clf.head.weight, head)
    imagenet = dict(sd, **{"head.weight": torch.zeros(1000, 96), "head.bias": torch.zeros(1000)})
    with pytest.raises(ValueError, match=r"'head\.weight'.*\(10, 96\), got \(1000, 96\).*num_classes=1000"):
        clf.load_official_state_dict(imagenet)
    with pytest.warns(UserWarning, match="head"):
        dropped = clf.load_official_state_dict(imagenet, strict=False)
    assert dropped == ["blocks.*.attn.relative_position_index", "head.*"]
    assert torch.equal(clf.head.weight, head)
    cls_pool = official_checkpoint("timm", ViTClassifierConfig(**{**vars(tiny().config), "global_pool": False}))
    with pytest.raises(KeyError, match="build with global_pool=False"):
        tiny().load_official_state_dict(cls_pool)
    mage = tiny(**TOKENS)
    msd = official_checkpoint("mage", mage.config)
    with pytest.raises(ValueError, match=r"position_ids.*arange"):
        mage.load_official_state_dict(dict(msd, **{"token_emb.position_ids": torch.arange(65).flip(0)[None]}))
    with pytest.raises(TypeError, match="dict of tensors"):
        clf.load_official_state_dict([1, 2])


def test_official_pretraining_checkpoints_load_with_strict_false():
    """BEiT's shared pretraining table goes into every block; CAE's encoder.* prefix is removed and its norm becomes
    fc_norm (CAE's loader); BEiT's final norm is dropped under global pool."""
    clf = tiny(**BEIT_LIKE)
    sd = {k: v for k, v in official_checkpoint("beit", clf.config).items() if not k.startswith(("head", "fc_norm"))}
    table = torch.randn(sd["blocks.0.attn.relative_position_bias_table"].shape)
    sd = {k: v for k, v in sd.items() if ".relative_position_" not in k}
    sd.update({"rel_pos_bias.relative_position_bias_table": table, "mask_token": torch.zeros(1, 1, 96),
               "rel_pos_bias.relative_position_index": official_rel_index(8),
               "norm.weight": torch.ones(96)})  # fmt: skip
    with pytest.warns(UserWarning, match="lacks 4 keys"):
        dropped = clf.load_official_state_dict(sd, strict=False)
    assert dropped == ["mask_token", "norm.*", "rel_pos_bias.relative_position_index"]
    assert all(torch.equal(b.rel_pos_bias.relative_position_bias_table, table) for b in clf.blocks)
    with pytest.raises(ValueError, match="rel_pos_bias=True"):
        tiny(qkv_bias="qv", init_values=0.1).load_official_state_dict(sd, strict=False)
    cae = tiny(**dict(BEIT_LIKE, pos_embed="fixed"))
    enc = {f"encoder.{k}": v for k, v in official_checkpoint("beit", cae.config).items()
           if not k.startswith(("head", "fc_norm")) and ".relative_position_" not in k}  # fmt: skip
    enc.update({"encoder.norm.weight": torch.full((96,), 3.0), "encoder.norm.bias": torch.ones(96),
                "decoder.head.weight": torch.zeros(2, 2)})  # fmt: skip
    with pytest.warns(UserWarning, match="lacks 6 keys"):  # the head and the 4 zero relative position tables
        dropped = cae.load_official_state_dict(enc, strict=False)
    assert dropped == ["decoder.*"]
    assert torch.equal(cae.fc_norm.weight, torch.full((96,), 3.0))


# ---------------------------------------------------------------------------------------------- init / FLOPs
def test_initialisation():
    m = tiny(**dict(BEIT_LIKE, pos_embed="fixed"), seed=3)
    assert m.head.weight.std() < 1e-4 and m.head.weight.abs().max() > 0 and torch.equal(m.head.bias, torch.zeros(10))
    assert torch.equal(m.fc_norm.weight, torch.ones(96)) and torch.equal(m.blocks[2].attn.q_bias, torch.zeros(96))
    assert all(torch.equal(b.ls1.gamma, torch.full((96,), 0.1)) for b in m.blocks)
    assert all(not b.rel_pos_bias.relative_position_bias_table.any() for b in m.blocks)
    assert torch.equal(m.blocks[1].rel_pos_bias.relative_position_index, official_rel_index(8))
    assert not m.pos_embed.requires_grad and m.pos_embed[0, 0].abs().sum() == 0 and m.pos_embed.abs().max() == 1.0
    w = m.blocks[0].mlp.fc1.weight
    assert 0.015 < w.std() < 0.025 and torch.equal(m.blocks[0].mlp.fc1.bias, torch.zeros(384))
    learned = tiny(seed=3)
    assert learned.pos_embed.requires_grad and 0.01 < learned.pos_embed.std() < 0.03
    assert not torch.equal(tiny(seed=4).head.weight, learned.head.weight)


def test_flops_per_image():
    with torch.device("meta"):
        m = create_model("vit_base_patch16_224_cls")
    n, d = 197, 768
    fwd = 12 * (2 * n * d * d * 12 + 4 * n * n * d) + 2 * 196 * 768 * 768 + 2 * 768 * 1000
    assert m.flops_per_image(training=False) == fwd and m.flops_per_image() == 3 * fwd
    assert 34e9 < fwd < 36e9
    t = tiny(**TOKENS)
    assert t.flops_per_image(training=False) == tiny().flops_per_image(training=False) - 2 * 64 * 48 * 96

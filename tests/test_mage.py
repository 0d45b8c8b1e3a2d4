"""MAGE / MAGE-C: fused path vs the official-code twin, masking and padding semantics, the detached tied head, label
smoothing over the codes only, the generation forward, the official checkpoint layout, configs and errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import mimfast.models.mage  # noqa: F401  (registers the MAGE models until mimfast.models imports them)
from conftest import DEVICE
from mimfast.models import create_model, list_models
from mimfast.models.mage import MAGE, MAGEConfig
from mimfast.ops.masking import mage_masking

DEBUG = "mage_tiny_patch4_debug"
L = 64  # 8 x 8 tokens
CB = 128  # debug codebook

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the CE kernel's masked lanes under the interpreter


def official_mage_layout(cfg: MAGEConfig, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official ``MaskedGenerativeEncoderViT`` (models_mage.py, timm 0.3.2 blocks), written out
    from its ``__init__``, at this config's size (the official code hard-codes 256 + 1 positions: L + 1 here)."""
    d, dd, p, n, v = cfg.embed_dim, cfg.decoder_embed_dim, cfg.patch_size, cfg.num_tokens, cfg.vocab_size

    def block(prefix, w):
        h = int(w * cfg.mlp_ratio)
        return {
            f"{prefix}.norm1.weight": (w,), f"{prefix}.norm1.bias": (w,),
            f"{prefix}.attn.qkv.weight": (3 * w, w), f"{prefix}.attn.qkv.bias": (3 * w,),
            f"{prefix}.attn.proj.weight": (w, w), f"{prefix}.attn.proj.bias": (w,),
            f"{prefix}.norm2.weight": (w,), f"{prefix}.norm2.bias": (w,),
            f"{prefix}.mlp.fc1.weight": (h, w), f"{prefix}.mlp.fc1.bias": (h,),
            f"{prefix}.mlp.fc2.weight": (w, h), f"{prefix}.mlp.fc2.bias": (w,),
        }  # fmt: skip

    keys = {
        "token_emb.word_embeddings.weight": (v, d), "token_emb.position_embeddings.weight": (n + 1, d),
        "token_emb.LayerNorm.weight": (d,), "token_emb.LayerNorm.bias": (d,), "token_emb.position_ids": (1, n + 1),
        "patch_embed.proj.weight": (d, in_chans, p, p), "patch_embed.proj.bias": (d,),
        "cls_token": (1, 1, d), "pos_embed": (1, n + 1, d),
    }  # fmt: skip
    for i in range(cfg.depth):
        keys.update(block(f"blocks.{i}", d))
    keys.update({"norm.weight": (d,), "norm.bias": (d,), "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,),
                 "mask_token": (1, 1, dd), "decoder_pos_embed": (1, n + 1, dd),
                 "decoder_pos_embed_learned": (1, n + 1, dd)})  # fmt: skip
    for i in range(cfg.decoder_depth):
        keys.update(block(f"decoder_blocks.{i}", dd))
    keys.update({"decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
                 "decoder_pred.weight": (p * p * in_chans, dd), "decoder_pred.bias": (p * p * in_chans,),
                 "mlm_layer.fc.weight": (d, dd), "mlm_layer.fc.bias": (d,), "mlm_layer.ln.weight": (d,),
                 "mlm_layer.ln.bias": (d,), "mlm_layer.bias": (1, 1, v)})  # fmt: skip
    return keys


UNUSED = {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "mask_token",
          "decoder_pos_embed", "decoder_pred.weight", "decoder_pred.bias", "token_emb.position_ids"}  # fmt: skip


def official_checkpoint(cfg: MAGEConfig, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in official_mage_layout(cfg).items()}
    sd["token_emb.position_ids"] = torch.arange(cfg.num_tokens + 1).unsqueeze(0)
    sd["vqgan.quantize.embedding.weight"] = torch.randn(cfg.codebook_size, 4, generator=g)
    sd["vqgan.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3, generator=g)
    return {"model": sd}


def twins(seed=0, **kw):
    kw = {"dropout": 0.0, "attn_dropout": 0.0, **kw}
    torch.manual_seed(seed)
    fused = create_model(DEBUG, **kw).to(DEVICE)
    eager = create_model(DEBUG, fused=False, **kw).to(DEVICE)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


def tokens(bsz=3, seed=1, hi=CB):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hi, (bsz, L), generator=g).to(DEVICE)


def fixed_mask(n, ratio=0.8, seed=3):
    return mage_masking(n, L, ratio=ratio, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed),
                        index_dtype=torch.int32)  # fmt: skip


# ---------------------------------------------------------------------------------------------- fused == eager
@pytest.mark.parametrize("contrastive,conditional", [(False, False), (False, True), (True, True)])
def test_fused_equals_official_twin(contrastive, conditional):
    fused, eager = twins(contrastive=contrastive)
    ids = tokens()
    kw = {"class_ids": torch.tensor([0, 4, 9], device=DEVICE)} if conditional else {}
    if contrastive:
        kw["token_ids_view2"] = tokens(seed=2)
    m = fixed_mask(6 if contrastive else 3, ratio=0.8)  # 0.8: 32 dropped + 20 kept-but-masked of 64
    lf, mf = fused(ids, mask=m, **kw)
    le, me = eager(ids, mask=m, **kw)
    torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-6)
    assert mf.keys() == me.keys() == ({"loss_mlm", "mask_ratio"} | ({"loss_contrastive"} if contrastive else set()))
    for k in mf:
        torch.testing.assert_close(mf[k], me[k], rtol=1e-5, atol=1e-6)
    lf.backward()
    le.backward()
    ge = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None and ge[name].grad is not None, name
        scale = ge[name].grad.abs().max().item() + 1e-3
        torch.testing.assert_close(p.grad, ge[name].grad, rtol=1e-4, atol=2e-5 * scale, msg=name)


def test_twins_agree_under_bf16_autocast():
    fused, eager = twins()
    ids, m = tokens(), fixed_mask(3)
    with torch.no_grad():
        l32 = fused(ids, mask=m)[0]
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            lf, le = fused(ids, mask=m)[0], eager(ids, mask=m)[0]
    assert lf.dtype == le.dtype == torch.float32
    torch.testing.assert_close(lf, le, rtol=2e-2, atol=0)
    torch.testing.assert_close(lf, l32, rtol=2e-2, atol=0)


def test_masking_counts_and_one_ratio_per_batch():
    model = create_model(DEBUG)
    for seed in range(20):
        m = model.sample_mask(5, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed))
        assert m.ratio.dim() == 0 and 0.5 <= float(m.ratio) <= 1.0  # one draw for the whole batch
        assert (m.drop_mask.sum(1) == math.ceil(L * 0.5)).all()
        assert (m.token_all_mask.sum(1) == math.ceil(L * float(m.ratio))).all()
        assert (m.token_all_mask | ~m.drop_mask).all()  # dropped tokens are masked
        assert m.ids_keep.shape == (5, L - 32) and m.ids_keep.dtype == torch.int32
    ratios = [float(model.sample_mask(2, generator=torch.Generator().manual_seed(s)).ratio) for s in range(200)]
    assert 0.6 < sum(ratios) / len(ratios) < 0.75  # truncated N(0.55, 0.25) on [0.5, 1]: mean ~ 0.68


def test_encoder_and_decoder_inputs_follow_mage():
    """Hooked inputs: the class token is first and never masked or dropped; the encoder sees cls + the kept tokens
    (mask id where masked) in order; every masked decoder slot holds the class-token feature."""
    model = create_model(DEBUG).to(DEVICE).eval()
    ids = tokens(bsz=2)
    m = fixed_mask(2, ratio=0.75)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda mod, a: seen.setdefault("enc", a[0].detach()))
    model.decoder_blocks[0].register_forward_pre_hook(lambda mod, a: seen.setdefault("dec", a[0].detach()))
    model.decoder_embed.register_forward_hook(lambda mod, a, out: seen.setdefault("y", out.detach()))
    with torch.no_grad():
        _, metrics = model(ids, mask=m)
    assert float(metrics["mask_ratio"]) == pytest.approx(0.75)
    emb, dpos = model.token_emb, model.decoder_pos_embed_learned[0].detach()
    enc, dec, y = seen["enc"], seen["dec"], seen["y"]
    assert enc.shape == (2, 1 + L - 32, 96) and dec.shape == (2, 1 + L, 64)
    for b in range(2):
        keep = (~m.drop_mask[b]).nonzero().flatten()
        inp = torch.where(m.token_all_mask[b], model.mask_token_id, ids[b])
        full = torch.cat([torch.tensor([model.fake_class_label], device=DEVICE), inp])
        want = emb.LayerNorm(emb.word_embeddings(full) + emb.position_embeddings.weight)[
            torch.cat([keep.new_zeros(1), keep + 1])
        ]
        torch.testing.assert_close(enc[b], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dec[b, 0], y[b, 0] + dpos[0], rtol=1e-5, atol=1e-6)
        masked = m.token_all_mask[b].nonzero().flatten()
        torch.testing.assert_close(dec[b, 1 + masked], y[b, :1] + dpos[1 + masked], rtol=1e-5, atol=1e-6)
        visible = (~m.token_all_mask[b]).nonzero().flatten()
        slot = 1 + torch.searchsorted(keep, visible)  # kept rows are in position order
        torch.testing.assert_close(dec[b, 1 + visible], y[b, slot] + dpos[1 + visible], rtol=1e-5, atol=1e-6)


def test_tied_embedding_gets_no_gradient_through_the_head():
    fused, eager = twins()
    ids = tokens(hi=16)  # codes 16 .. 127 never enter the encoder
    m = fixed_mask(3, ratio=0.8)
    for model in (fused, eager):
        loss, _ = model(ids, mask=m)
        loss.backward()
        g = model.token_emb.word_embeddings.weight.grad
        used = torch.unique(torch.where(m.token_all_mask, -1, ids))
        used = used[used >= 0]
        rows = (CB + g[CB:].abs().sum(1).nonzero().flatten()).tolist()
        assert rows == sorted([model.fake_class_label, model.mask_token_id])
        assert (g[used].abs().sum(1) > 0).all()
        unused = torch.ones(CB, dtype=torch.bool)
        unused[used.cpu()] = False
        assert (g[:CB][unused.to(g.device)] == 0).all()  # the head's gradient would reach every code row
        bias_g = model.mlm_layer.bias.grad.reshape(-1)
        assert (bias_g[CB:] == 0).all() and bias_g[:CB].abs().sum() > 0


def test_label_smoothing_over_the_codes_only():
    fused, eager = twins()
    ids, m = tokens(), fixed_mask(3, ratio=0.7)
    with torch.no_grad():
        latent, logits = eager._forward_official(ids, None, m)
        logp = F.log_softmax(logits[:, 1:, :CB].double(), dim=-1)  # MAGE's LabelSmoothingCrossEntropy, by hand
        nll = -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        want = (0.9 * nll + 0.1 * -logp.mean(-1))[m.token_all_mask].mean()
        torch.testing.assert_close(eager(ids, mask=m)[0].double(), want, rtol=1e-5, atol=1e-6)
        before = fused(ids, mask=m)[0]
        torch.testing.assert_close(before.double(), want, rtol=1e-5, atol=1e-6)
        fused.mlm_layer.bias[..., CB:] += 5.0  # class / mask logits: not scored
        torch.testing.assert_close(fused(ids, mask=m)[0], before, rtol=1e-6, atol=1e-6)
        fused.mlm_layer.bias[..., :1] += 5.0
        assert not torch.allclose(fused(ids, mask=m)[0], before)
    f0, _ = twins(label_smoothing=0.0)  # same seed, same weights: the config field is what the head uses
    with torch.no_grad():
        torch.testing.assert_close(f0(ids, mask=m)[0].double(), nll[m.token_all_mask].mean(), rtol=1e-5, atol=1e-6)


def test_generator_reproducible_and_dropout_trains():
    model = create_model(DEBUG, fused=False).to(DEVICE)  # default dropout 0.1, train mode
    ids = tokens()
    a = model(ids, generator=torch.Generator(DEVICE).manual_seed(0))[1]["mask_ratio"]
    b = model(ids, generator=torch.Generator(DEVICE).manual_seed(0))[1]["mask_ratio"]
    c = model.sample_mask(3, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0)).ratio
    assert a == b == c.float()
    model.eval()
    m = fixed_mask(3)
    torch.testing.assert_close(model(ids, mask=m)[0], model(ids, mask=m)[0], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- generation / probe
def test_predict_logits_and_features():
    fused, eager = twins()
    fused.eval(), eager.eval()
    ids = tokens()
    unknown = torch.zeros_like(ids, dtype=torch.bool)
    unknown[0] = True  # all unknown (the sampler's first step)
    unknown[1, ::3] = True
    partial = torch.where(unknown, fused.mask_token_id, ids)
    with torch.no_grad():
        lf, le = fused.predict_logits(partial), eager.predict_logits(partial)
        assert lf.shape == (3, L, CB) and lf.dtype == torch.float32
        torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-5)
        cond = fused.predict_logits(partial, torch.tensor([1, 2, 3], device=DEVICE))
        torch.testing.assert_close(cond, eager.predict_logits(partial, torch.tensor([1, 2, 3], device=DEVICE)),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        assert not torch.allclose(cond, lf, atol=1e-4)  # the class token conditions the prediction
        # a known token is an input (unknown ones all carry the mask id): changing one changes the prediction
        other = partial.clone()
        other[2, 5] = (ids[2, 5] + 1) % CB
        assert not torch.allclose(fused.predict_logits(other)[2], lf[2], atol=1e-5)
        feats = fused.forward_features(ids)
        assert feats.shape == (3, 1 + L, 96)
        torch.testing.assert_close(feats, eager.forward_features(ids), rtol=1e-5, atol=1e-5)
    assert fused.mask_token_id == CB + 10 and fused.config.num_classes == 10 and fused.grid_size == 8


# -------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ["mage_vit_base_patch16", "mage_vit_large_patch16", DEBUG])
def test_parameter_names_and_shapes_are_the_official_ones(name):
    with torch.device("meta"):
        model = create_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = official_mage_layout(model.config)
    assert ours == {k: s for k, s in official.items() if k not in UNUSED}
    if name == "mage_vit_base_patch16":
        assert official["token_emb.word_embeddings.weight"] == (2025, 768)
        assert official["token_emb.position_embeddings.weight"] == (257, 768)
        assert (model.mask_token_id, model.fake_class_label, model.vocab_size) == (2024, 1100, 2025)


def test_loads_an_official_state_dict_and_round_trips():
    model = create_model(DEBUG, fused=False)
    ckpt = official_checkpoint(model.config)
    out = model.load_official_state_dict(ckpt)
    assert out["missing"] == []
    assert set(out["ignored"]) == UNUSED | {"vqgan.quantize.embedding.weight", "vqgan.encoder.conv_in.weight"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    back = model.official_state_dict()
    assert set(back) == set(official_mage_layout(model.config)) - (UNUSED - {"token_emb.position_ids"})
    other = create_model(DEBUG, fused=False)
    assert other.load_official_state_dict({"module." + k: v for k, v in back.items()})["missing"] == []
    ids = tokens()
    m = fixed_mask(3)
    model.eval(), other.eval()
    torch.testing.assert_close(model(ids, mask=m)[0], other(ids, mask=m)[0], rtol=0, atol=0)


def test_mage_c_checkpoints():
    cfg_c = create_model(DEBUG, contrastive=True)
    sd = official_checkpoint(cfg_c.config)
    with pytest.warns(UserWarning, match="projection head"):
        out = cfg_c.load_official_state_dict(sd)  # a MAGE checkpoint into MAGE-C: the head keeps its init
    assert out["missing"] == ["projector.fc1.bias", "projector.fc1.weight", "projector.fc2.bias",
                              "projector.fc2.weight"]  # fmt: skip
    ours_c = cfg_c.official_state_dict()
    plain = create_model(DEBUG)
    out = plain.load_official_state_dict(ours_c)  # MAGE-C weights into plain MAGE: the head is ignored
    assert {"projector.fc1.weight", "projector.fc2.bias"} <= set(out["ignored"]) and out["missing"] == []
    sd["model"]["head.proj.weight"] = torch.zeros(3, 3)  # a converted checkpoint's unknown head names
    with pytest.raises(KeyError, match="head.proj.weight"):
        plain.load_official_state_dict(sd)
    assert "head.proj.weight" in plain.load_official_state_dict(sd, strict=False)["ignored"]


def test_bad_checkpoints_raise():
    model = create_model(DEBUG)
    sd = official_checkpoint(model.config)["model"]
    bad = dict(sd, **{"mlm_layer.bias": torch.zeros(1, 1, 2025)})
    with pytest.raises(ValueError, match="mlm_layer.bias"):
        model.load_official_state_dict(bad)
    missing = {k: v for k, v in sd.items() if k != "norm.weight"}
    with pytest.raises(KeyError, match="norm.weight"):
        model.load_official_state_dict(missing)
    with pytest.raises(ValueError, match="position_ids"):
        model.load_official_state_dict(dict(sd, **{"token_emb.position_ids": torch.arange(257).unsqueeze(0)}))
    with pytest.raises(TypeError, match="state_dict"):
        model.load_official_state_dict([1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert model.load_official_state_dict(missing, strict=False)["missing"] == ["norm.weight"]


# ------------------------------------------------------------------------------------------ registry / errors
def test_registry_and_flops():
    assert {"mage_vit_base_patch16", "mage_vit_large_patch16", DEBUG} <= set(list_models("mage"))
    with torch.device("meta"):
        base = create_model("mage_vit_base_patch16")
        large = create_model("mage_vit_large_patch16")
    c = base.config
    assert (c.embed_dim, c.depth, c.num_heads, c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads) == (
        768, 12, 12, 768, 8, 16)  # fmt: skip
    assert (c.grid_size, c.num_tokens, c.num_dropped, c.codebook_size) == (16, 256, 128, 1024)
    assert (c.mask_ratio_min, c.mask_ratio_max, c.mask_ratio_mu, c.mask_ratio_std) == (0.5, 1.0, 0.55, 0.25)
    assert (c.dropout, c.attn_dropout, c.label_smoothing, c.fake_class_id) == (0.1, 0.1, 0.1, 76)
    assert base.task == "mage" and isinstance(base, MAGE)
    assert 150e9 < base.flops_per_image() < 175e9
    assert base.flops_per_image() == pytest.approx(3 * base.flops_per_image(training=False))
    assert large.flops_per_image() > 2 * base.flops_per_image()
    with torch.device("meta"):
        mc = create_model("mage_vit_base_patch16", contrastive=True)
    assert mc.flops_per_image() > 2 * base.flops_per_image()
    assert MAGE(MAGEConfig(num_classes=50)).fake_class_label == 1024 + 49
    assert MAGE(img_size=32, patch_size=4, codebook_size=8, num_classes=3, embed_dim=12, depth=1, num_heads=2,
                decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2).vocab_size == 12  # fmt: skip


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (lambda m: m(torch.zeros(2, L)), TypeError, "token_ids"),
        (lambda m: m(torch.zeros(2, L - 1, dtype=torch.long)), ValueError, r"token_ids: expected shape \(B, 64\)"),
        (lambda m: m(torch.zeros(0, L, dtype=torch.long)), ValueError, "empty"),
        (lambda m: m(torch.full((2, L), CB, dtype=torch.long)), ValueError, r"codebook_size=128"),
        (lambda m: m(torch.full((2, L), -1, dtype=torch.long)), ValueError, "token_ids"),
        (lambda m: m(torch.full((2, L), m.mask_token_id)), ValueError, "token_ids"),  # forward takes codes only
        (lambda m: m(torch.zeros(2, L, dtype=torch.long), class_ids=torch.tensor([0, 10])), ValueError, "class_ids"),
        (lambda m: m(torch.zeros(2, L, dtype=torch.long), class_ids=torch.tensor([-1, 0])), ValueError, "class_ids"),
        (lambda m: m(torch.zeros(2, L, dtype=torch.long), class_ids=torch.tensor([0])), ValueError, "class_ids"),
        (lambda m: m(torch.zeros(2, L, dtype=torch.long), class_ids=torch.zeros(2)), TypeError, "class_ids"),
        (lambda m: m(torch.zeros(2, L, dtype=torch.long), token_ids_view2=torch.zeros(2, L, dtype=torch.long)),
         ValueError, "contrastive is False"),
        (lambda m: m(torch.zeros(2, L, dtype=torch.long), mask=mage_masking(3, L)), ValueError, "mask.drop_mask"),
        (lambda m: m(torch.zeros(2, L, dtype=torch.long), mask="x"), TypeError, "mask"),
        (lambda m: m.predict_logits(torch.full((2, L), CB + 3)), ValueError, "mask id 138"),
        (lambda m: m.forward_features(torch.zeros(2, 8, 8, dtype=torch.long)), ValueError, "token_ids"),
        (lambda m: m(torch.zeros(1, L, dtype=torch.long), class_ids=torch.tensor([10])), ValueError, "num_classes=10"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_clear_errors(call, exc, msg):
    model = create_model(DEBUG)
    with pytest.raises(exc, match=msg):
        call(model)


def test_mage_c_needs_the_second_view():
    model = create_model(DEBUG, contrastive=True)
    ids = torch.zeros(2, L, dtype=torch.long)
    with pytest.raises(ValueError, match="token_ids_view2: MAGE-C"):
        model(ids)
    with pytest.raises(ValueError, match="token_ids_view2: expected shape"):
        model(ids, token_ids_view2=torch.zeros(3, L, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask.drop_mask: expected shape \(4, 64\)"):
        model(ids, token_ids_view2=ids, mask=mage_masking(2, L))


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(img_size=30), "img_size"),
        (dict(embed_dim=100), "embed_dim"),
        (dict(decoder_num_heads=5), "decoder_embed_dim"),
        (dict(codebook_size=0), "codebook_size"),
        (dict(num_classes=0), "num_classes"),
        (dict(fake_class_id=10), "fake_class_id"),
        (dict(mask_ratio_min=0.0), "mask_ratio_min"),
        (dict(mask_ratio_min=0.6, mask_ratio_max=0.5), "mask_ratio_max"),
        (dict(mask_ratio_std=-1.0), "mask_ratio_std"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(dropout=1.5), "dropout"),
        (dict(attn_dropout=1.0), "attn_dropout"),
        (dict(contrastive_temperature=0.0), "contrastive_temperature"),
        (dict(contrastive_weight=float("nan")), "contrastive_weight"),
        (dict(contrastive=1), "contrastive"),
        (dict(proj_dim=0), "proj_dim"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(layer_norm_eps=0), "layer_norm_eps"),
    ],
)
def test_bad_configs_raise(kwargs, msg):
    with pytest.raises(ValueError, match=f"MAGEConfig.{msg}"):
        create_model(DEBUG, **kwargs)

"""The VQGAN tokenizer: shapes of the token API, taming-transformers key names, the quantizer plug, clear errors."""

from __future__ import annotations

import pytest
import torch

from mimfast.models import VQGAN, VQGANConfig, create_model


def taming_keys(ch_mult, num_res_blocks, attn_levels_enc, attn_levels_dec, shortcut_enc, shortcut_dec) -> set[str]:
    """The parameter names of taming-transformers' ``VQModel`` (taming/models/vqgan.py with
    taming/modules/diffusionmodules/model.py), written out from its naming scheme, independently of mimfast's code.
    ``attn_levels_*``: levels with attention; ``shortcut_*``: {(level, block)} whose width changes (nin_shortcut)."""
    keys = set()

    def wb(prefix):
        keys.update({f"{prefix}.weight", f"{prefix}.bias"})

    def resblock(p, shortcut):
        for n in ("norm1", "conv1", "norm2", "conv2"):
            wb(f"{p}.{n}")
        if shortcut:
            wb(f"{p}.nin_shortcut")

    def attn(p):
        for n in ("norm", "q", "k", "v", "proj_out"):
            wb(f"{p}.{n}")

    n = len(ch_mult)
    for part in ("encoder", "decoder"):
        wb(f"{part}.conv_in")
        wb(f"{part}.norm_out")
        wb(f"{part}.conv_out")
        resblock(f"{part}.mid.block_1", False)
        attn(f"{part}.mid.attn_1")
        resblock(f"{part}.mid.block_2", False)
    for i in range(n):
        for j in range(num_res_blocks):
            resblock(f"encoder.down.{i}.block.{j}", (i, j) in shortcut_enc)
            if i in attn_levels_enc:
                attn(f"encoder.down.{i}.attn.{j}")
        if i != n - 1:
            wb(f"encoder.down.{i}.downsample.conv")
        for j in range(num_res_blocks + 1):
            resblock(f"decoder.up.{i}.block.{j}", (i, j) in shortcut_dec)
            if i in attn_levels_dec:
                attn(f"decoder.up.{i}.attn.{j}")
        if i != 0:
            wb(f"decoder.up.{i}.upsample.conv")
    wb("quant_conv")
    wb("post_quant_conv")
    keys.add("quantize.embedding.weight")
    return keys


def _taming_state_dict(model: VQGAN, keys: set[str]) -> dict:
    """A state dict under taming's names with the shapes of ``model``'s tensors (random values) plus loss keys."""
    own = model.state_dict()
    sd = {}
    for k in keys:
        mine = "quantize.embed" if k == "quantize.embedding.weight" else k
        assert mine in own, f"taming key {k} has no counterpart in mimfast's VQGAN"
        sd[k] = torch.randn_like(own[mine])
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    return sd


def test_taming_f16_key_names_and_loading():
    m = create_model("vqgan_f16_k1024")
    # ImageNet f16: ch_mult (1, 1, 2, 2, 4), attention at 16x16 (level 4 in the encoder, level 4 in the decoder)
    enc_short = {(2, 0), (4, 0)}  # 128 -> 256 at level 2, 256 -> 512 at level 4
    dec_short = {(3, 0), (1, 0)}  # decoder level 3 (512 -> 256) and level 1 (256 -> 128)
    keys = taming_keys((1, 1, 2, 2, 4), 2, {4}, {4}, enc_short, dec_short)
    mine = {k for k in m.state_dict() if not k.startswith("quantize.")} | {"quantize.embedding.weight"}
    assert keys == mine, f"only taming: {sorted(keys - mine)[:5]}, only mimfast: {sorted(mine - keys)[:5]}"
    sd = _taming_state_dict(m, keys)
    ignored = m.load_taming_state_dict({"state_dict": sd})
    assert sorted(ignored) == ["loss.discriminator.main.0.weight", "loss.perceptual_loss.net.slice1.0.weight"]
    assert torch.equal(m.quantize.embed, sd["quantize.embedding.weight"])
    assert torch.equal(m.decoder.up[4].attn[2].proj_out.weight, sd["decoder.up.4.attn.2.proj_out.weight"])
    with pytest.raises(ValueError, match="not a taming VQModel of this architecture"):
        create_model("vqgan_f4_k128_debug").load_taming_state_dict(sd)
    with pytest.raises(ValueError, match="quantizer='vq'"):
        create_model("vqgan_f16_k1024", quantizer="ema").load_taming_state_dict(sd)


def test_debug_tokenizer_token_api_and_gradients():
    torch.manual_seed(0)
    m = create_model("vqgan_f4_k128_debug")
    x = torch.randn(3, 3, 32, 32)
    rec, qloss, ids = m(x)
    assert rec.shape == x.shape and ids.shape == (3, 8, 8) and qloss.ndim == 0
    (rec - x).abs().mean().add(qloss).backward()
    assert m.encoder.conv_in.weight.grad is not None and m.quantize.embed.grad is not None
    assert m.decoder.last_layer is m.decoder.conv_out.weight
    m.eval()
    tok = m.encode(x)
    assert tok.dtype == torch.int64 and torch.equal(tok, ids)
    z = m.get_codebook_entry(tok)
    assert z.shape == (3, 32, 8, 8) and torch.equal(z[1, :, 2, 5], m.quantize.embed[tok[1, 2, 5]])
    assert torch.allclose(m.decode(tok), rec, atol=1e-5)
    assert m.flops_per_image() == 3 * m.flops_per_image(training=False) > 0


def test_ema_tokenizer_updates_its_codebook_only_in_training():
    torch.manual_seed(0)
    m = create_model("vqgan_f4_k128_debug", quantizer="ema", ema_decay=0.5)
    before = m.quantize.embed.clone()
    m.encode(torch.randn(2, 3, 32, 32))  # eval-style encode: no update
    assert torch.equal(before, m.quantize.embed)
    m.train()
    m(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, m.quantize.embed)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_size=30), r"img_size: expected a multiple of the downsampling factor 4"),
        (dict(quantizer="fsq"), r"quantizer: expected one of vq, ema"),
        (dict(ch=30), r"num_groups: expected a divisor"),
        (dict(ch_mult=()), r"ch_mult: expected a non-empty tuple"),
        (dict(codebook_size=0), r"codebook_size: expected an int >= 1"),
        (dict(dropout=1.0), r"dropout: expected a float in \[0, 1\)"),
    ],
)
def test_bad_configs(kwargs, match):
    base = dict(img_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=32,
                embed_dim=32, codebook_size=128, num_groups=8)  # fmt: skip
    with pytest.raises(ValueError, match=match):
        VQGANConfig(**{**base, **kwargs})


def test_bad_inputs():
    m = create_model("vqgan_f4_k128_debug")
    with pytest.raises(ValueError, match=r"images: expected \(B, 3, 32, 32\)"):
        m(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 128\)"):
        m.decode(torch.full((1, 8, 8), 128))
    with pytest.raises(ValueError, match=r"ids: expected \(B, h, w\)"):
        m.decode(torch.zeros(8, 8, dtype=torch.long))


def test_stochastic_quantizers_plug_in():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    reg = create_model("vqgan_f4_k128_debug", quantizer="regvq").train()
    rec, qloss, ids, info = reg(x, return_info=True)
    assert rec.shape == x.shape and ids.shape == (2, 8, 8) and info["pcl_weights"].shape == (2, 8, 8)
    assert bool((info["pcl_weights"][~info["mask"]] == 0).all())  # argmax positions: w_i = 0
    assert float(info["mask"].float().mean()) == pytest.approx(0.4, abs=0.02)  # 40% Gumbel-sampled
    qloss.backward()
    gum = create_model("vqgan_f4_k128_debug", quantizer="gumbel").train()
    rec, qloss, ids = gum(x)
    assert hasattr(gum.quantize, "tau") and ids.shape == (2, 8, 8)
    (rec.abs().mean() + qloss).backward()
    assert gum.quantize.proj.weight.grad is not None
    gum.eval()
    assert torch.equal(gum.encode(x), gum.encode(x))  # eval: deterministic argmax


def test_taming_gumbel_keys_load():
    m = create_model("vqgan_f4_k128_debug", quantizer="gumbel")
    sd = {k: torch.randn_like(v) for k, v in m.state_dict().items()}
    assert {"quantize.proj.weight", "quantize.proj.bias", "quantize.embed.weight"} <= set(sd)  # taming's GumbelQuantize
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    assert m.load_taming_state_dict(sd) == ["loss.discriminator.main.0.weight"]
    assert torch.equal(m.quantize.embed.weight, sd["quantize.embed.weight"])
    with pytest.raises(ValueError, match="quantizer='vq' or 'gumbel'"):
        create_model("vqgan_f4_k128_debug", quantizer="regvq").load_taming_state_dict(sd)

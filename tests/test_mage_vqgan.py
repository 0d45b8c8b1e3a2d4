"""MAGE's released VQGAN tokenizer: official key names and shapes, key-map round trip, an independent functional
reference of the official forward, the nearest-code search, the input-normalisation adapter, the loader, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mimfast.models.mage_vqgan  # noqa: F401  (registers the models)
from mimfast.models import create_model
from mimfast.models.mage_vqgan import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAGEVQGAN,
    MAGEVQGANConfig,
    load_mage_vqgan,
)

TINY = dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, z=32, n_embed=64)  # mage_vqgan_tiny_debug
RELEASED = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z=256, n_embed=1024)  # config/vqgan.yaml


def official_keys(ch, ch_mult, num_res_blocks, z, n_embed, in_channels=3, out_ch=3) -> dict[str, tuple]:
    """Parameter names and shapes of MAGE's ``VQModel`` (LTH14/mage taming/models/vqgan.py with
    taming/modules/diffusionmodules/model.py and taming/modules/vqvae/quantize.py's ``VectorQuantizer2``), written
    out from the official constructors, independently of mimfast's code. ResnetBlock: bias-free conv1 / conv2,
    ``nin_shortcut`` (out, out, 1, 1) without bias when the width changes, no ``temb_proj`` (temb_ch = 0); encoder
    ``conv_in`` without bias, 1x1 ``conv_out``; average-pool downsampling (no parameters); no attention; no
    quant_conv / post_quant_conv."""
    keys: dict[str, tuple] = {}

    def norm(p, c):
        keys[f"{p}.weight"], keys[f"{p}.bias"] = (c,), (c,)

    def resblock(p, cin, cout):
        norm(f"{p}.norm1", cin)
        keys[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
        norm(f"{p}.norm2", cout)
        keys[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
        if cin != cout:
            keys[f"{p}.nin_shortcut.weight"] = (cout, cout, 1, 1)

    n = len(ch_mult)
    in_ch_mult = (1, *ch_mult)
    keys["encoder.conv_in.weight"] = (ch, in_channels, 3, 3)
    for i in range(n):
        block_in, block_out = ch * in_ch_mult[i], ch * ch_mult[i]
        for j in range(num_res_blocks):
            resblock(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
    for b in ("block_1", "block_2"):
        resblock(f"encoder.mid.{b}", block_in, block_in)
    norm("encoder.norm_out", block_in)
    keys["encoder.conv_out.weight"], keys["encoder.conv_out.bias"] = (z, block_in, 1, 1), (z,)

    block_in = ch * ch_mult[-1]
    keys["decoder.conv_in.weight"], keys["decoder.conv_in.bias"] = (block_in, z, 3, 3), (block_in,)
    for b in ("block_1", "block_2"):
        resblock(f"decoder.mid.{b}", block_in, block_in)
    for i in reversed(range(n)):
        block_out = ch * ch_mult[i]
        for j in range(num_res_blocks):
            resblock(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != 0:
            keys[f"decoder.up.{i}.upsample.conv.weight"] = (block_in, block_in, 3, 3)
            keys[f"decoder.up.{i}.upsample.conv.bias"] = (block_in,)
    norm("decoder.norm_out", block_in)
    keys["decoder.conv_out.weight"], keys["decoder.conv_out.bias"] = (out_ch, block_in, 3, 3), (out_ch,)
    keys["quantize.embedding.weight"] = (n_embed, z)
    return keys


def official_state_dict(spec: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official names and shapes; norms near 1 and small convs so activations stay sane."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_keys(**spec).items():
        t = torch.randn(shape, generator=g)
        if ".norm" in k and k.endswith(".weight"):
            t = 1.0 + 0.1 * t
        elif ".norm" in k or k.endswith(".bias"):
            t = 0.1 * t
        elif k != "quantize.embedding.weight":
            t = t * (1.0 / shape[1] / shape[2] / shape[3]) ** 0.5
        sd[k] = t
    return sd


# --------------------------------------------------------------- an independent reference of the official forward
def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _resblock(x, sd, p):
    h = F.conv2d(F.silu(_gn(x, sd, f"{p}.norm1")), sd[f"{p}.conv1.weight"], padding=1)
    h = F.conv2d(F.silu(_gn(h, sd, f"{p}.norm2")), sd[f"{p}.conv2.weight"], padding=1)
    if f"{p}.nin_shortcut.weight" in sd:
        x = F.conv2d(h, sd[f"{p}.nin_shortcut.weight"])  # the official block: x = nin_shortcut(h)
    return x + h


def ref_encoder(sd, x, n_levels, num_res_blocks):
    h = F.conv2d(x, sd["encoder.conv_in.weight"], padding=1)
    for i in range(n_levels):
        for j in range(num_res_blocks):
            h = _resblock(h, sd, f"encoder.down.{i}.block.{j}")
        if i != n_levels - 1:
            h = F.avg_pool2d(h, kernel_size=2, stride=2)
    h = _resblock(_resblock(h, sd, "encoder.mid.block_1"), sd, "encoder.mid.block_2")
    h = F.silu(_gn(h, sd, "encoder.norm_out"))
    return F.conv2d(h, sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"])


def ref_decoder(sd, z, n_levels, num_res_blocks):
    h = F.conv2d(z, sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"], padding=1)
    h = _resblock(_resblock(h, sd, "decoder.mid.block_1"), sd, "decoder.mid.block_2")
    for i in reversed(range(n_levels)):
        for j in range(num_res_blocks):
            h = _resblock(h, sd, f"decoder.up.{i}.block.{j}")
        if i != 0:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = F.conv2d(h, sd[f"decoder.up.{i}.upsample.conv.weight"], sd[f"decoder.up.{i}.upsample.conv.bias"],
                         padding=1)  # fmt: skip
    h = F.silu(_gn(h, sd, "decoder.norm_out"))
    return F.conv2d(h, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"], padding=1)


def assert_nearest(ids: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor) -> None:
    """ids (B, h, w) pick the nearest codes of latents z (B, D, h, w): against a float64 brute-force distance
    argmin where the top-2 margin exceeds the fp32 rounding of the distances, else by distance."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    e = codebook.double()
    d = ((flat[:, None, :] - e[None]) ** 2).sum(-1)  # (N, K), no expansion trick
    top2 = d.topk(2, dim=1, largest=False).values
    scale = flat.pow(2).sum(1) + e.pow(2).sum(1).max()
    tol = 1e-5 * scale
    chosen = d.gather(1, ids.reshape(-1, 1).long())[:, 0]
    assert (chosen - top2[:, 0] <= tol).all(), "a chosen code is farther than the nearest one"
    clear = top2[:, 1] - top2[:, 0] > tol
    assert clear.float().mean() > 0.9, "the test has too few clear margins to mean anything"
    assert torch.equal(ids.reshape(-1)[clear], d.argmin(1)[clear])


def _tiny_loaded(seed: int = 0, **kwargs) -> tuple[MAGEVQGAN, dict]:
    m = create_model("mage_vqgan_tiny_debug", **kwargs)
    sd = official_state_dict(TINY, seed)
    m.load_official_state_dict(sd)
    return m.eval(), sd


# ------------------------------------------------------------------------------------------------------ tests
def test_released_architecture_has_the_official_keys_and_shapes():
    with torch.device("meta"):
        m = create_model("mage_vqgan_f16_k1024")
    mine = {k: tuple(v.shape) for k, v in m.official_state_dict().items()}
    want = official_keys(**RELEASED)
    assert mine.keys() == want.keys(), f"only official: {sorted(want.keys() - mine.keys())[:5]}, only mimfast: " \
                                       f"{sorted(mine.keys() - want.keys())[:5]}"  # fmt: skip
    bad = {k: (mine[k], want[k]) for k in want if mine[k] != want[k]}
    assert not bad, f"shape mismatches (mine, official): {list(bad.items())[:5]}"
    c = m.config
    assert (c.codebook_size, c.embed_dim, c.img_size, c.grid_size) == (1024, 256, 256, 16)
    assert m.task is None and m.codebook_size == 1024 and m.grid_size == 16 and m.img_size == 256


def test_tiny_state_dict_round_trip_lands_every_tensor():
    m = create_model("mage_vqgan_tiny_debug")
    sd = official_state_dict(TINY)
    assert m.official_state_dict().keys() == sd.keys()
    report = m.load_official_state_dict({"state_dict": sd})  # the Lightning layout init_from_ckpt reads
    assert report.missing_keys == [] and report.unexpected_keys == []
    back = m.official_state_dict()
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    # spot checks of where tensors land (the map is identity except the codebook)
    assert torch.equal(m.codebook, sd["quantize.embedding.weight"])
    assert torch.equal(m.encoder.down[2].block[0].nin_shortcut.weight, sd["encoder.down.2.block.0.nin_shortcut.weight"])
    assert torch.equal(m.decoder.up[1].block[0].nin_shortcut.weight, sd["decoder.up.1.block.0.nin_shortcut.weight"])
    assert torch.equal(m.decoder.up[2].upsample.conv.bias, sd["decoder.up.2.upsample.conv.bias"])
    assert m.encoder.conv_in.bias is None and m.encoder.down[0].block[0].conv1.bias is None
    # the other accepted layouts load the same tensors
    other = official_state_dict(TINY, seed=1)
    mage_ckpt = {"model": {**{f"vqgan.{k}": v for k, v in other.items()}, "token_emb.word_embeddings.weight": 0}}
    for layout in (other, {"model": other}, {f"module.{k}": v for k, v in other.items()}, mage_ckpt):
        m2 = create_model("mage_vqgan_tiny_debug")
        report = m2.load_official_state_dict(layout)
        assert all(torch.equal(m2.official_state_dict()[k], v) for k, v in other.items())
    assert report.unexpected_keys == ["token_emb.word_embeddings.weight"]


def test_matches_an_independent_reference_of_the_official_forward():
    torch.manual_seed(0)
    m, sd = _tiny_loaded()
    x = torch.rand(2, 3, 32, 32)
    z = m.encode_latent(x)
    with torch.no_grad():
        z_ref = ref_encoder(sd, x, 3, 2)
        torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)
        ids = m.encode(x)
        assert_nearest(ids, z_ref, sd["quantize.embedding.weight"])
        codes = sd["quantize.embedding.weight"][ids].permute(0, 3, 1, 2)
        torch.testing.assert_close(m.get_codebook_entry(ids), codes, rtol=0, atol=0)
        torch.testing.assert_close(m.decode(ids), ref_decoder(sd, codes, 3, 2), rtol=1e-4, atol=1e-4)


def test_encode_decode_shapes_dtypes_and_ties():
    torch.manual_seed(0)
    m, sd = _tiny_loaded()
    x = torch.rand(3, 3, 32, 32)
    ids = m.encode(x)
    assert ids.shape == (3, 8, 8) and ids.dtype == torch.int64 and not ids.requires_grad
    assert ids.min() >= 0 and ids.max() < 64 and len(ids.unique()) > 1
    rec = m.decode(ids)
    assert rec.shape == (3, 3, 32, 32) and rec.dtype == torch.float32
    assert torch.equal(m.decode(ids.reshape(3, 64)), rec)  # MAGE's flat (B, 256) ids are accepted
    rec2, ids2 = m(x)
    assert torch.equal(ids2, ids) and torch.equal(rec2, rec)
    assert torch.equal(m.encode(x), ids)  # deterministic
    assert m.get_codebook_entry(ids).shape == (3, 32, 8, 8)
    # exact duplicate codes: the lowest index wins
    with torch.no_grad():
        m.codebook.copy_(torch.cat([sd["quantize.embedding.weight"][:32]] * 2))
    dup = m.encode(x)
    assert dup.max() < 32
    with torch.no_grad():
        m.codebook.copy_(torch.randn(1, 32).expand(64, 32))
    assert (m.encode(x) == 0).all()


def test_normalisation_adapter():
    torch.manual_seed(0)
    raw, sd = _tiny_loaded()
    norm, _ = _tiny_loaded(input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD)
    assert "input_mean" not in norm.state_dict()  # not a checkpoint tensor
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    xn = (x - mean) / std
    ids = norm.encode(xn)
    z_raw = raw.encode_latent(x)
    torch.testing.assert_close(norm.encode_latent(xn), z_raw, rtol=1e-4, atol=1e-4)
    assert_nearest(ids, z_raw, sd["quantize.embedding.weight"])
    assert (ids == raw.encode(x)).float().mean() > 0.99
    with torch.no_grad():
        torch.testing.assert_close(norm.decode(ids), (raw.decode(ids) - mean) / std, rtol=1e-5, atol=1e-5)
    import mimfast.data as data

    assert (IMAGENET_MEAN, IMAGENET_STD) == (tuple(data.IMAGENET_MEAN), tuple(data.IMAGENET_STD))


def test_from_official_and_load_mage_vqgan(tmp_path):
    sd = official_state_dict(RELEASED)
    path = tmp_path / "vqgan_jax_strongaug.ckpt"
    torch.save({"state_dict": sd}, path)
    tok = load_mage_vqgan(path)
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    assert tok.config.input_mean == IMAGENET_MEAN and tok.config.input_std == IMAGENET_STD
    assert torch.equal(tok.codebook, sd["quantize.embedding.weight"])
    raw = MAGEVQGAN.from_official(path)
    assert raw.config.input_mean is None and not raw.training
    with pytest.raises(FileNotFoundError, match="path: no MAGE VQGAN checkpoint"):
        load_mage_vqgan(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="path: cannot read"):
        load_mage_vqgan(tmp_path / "junk.ckpt")
    torch.save(official_state_dict(TINY), tmp_path / "tiny.ckpt")
    with pytest.raises(ValueError, match=r"is not MAGE's VQGAN: state_dict: .*missing keys \['decoder.up.3.block"):
        load_mage_vqgan(tmp_path / "tiny.ckpt")  # a different configuration: the key sets differ first
    torch.save({"state_dict": official_state_dict(TINY)}, tmp_path / "tiny.ckpt")
    tiny = MAGEVQGAN.from_official(tmp_path / "tiny.ckpt", img_size=32, ch=32, ch_mult=(1, 1, 2), embed_dim=32,
                                   codebook_size=64)  # fmt: skip
    assert tiny.grid_size == 8


def test_bad_state_dicts_name_the_key():
    m = create_model("mage_vqgan_tiny_debug")
    sd = official_state_dict(TINY)
    with pytest.raises(KeyError, match=r"unexpected keys \['encoder.extra.weight'\]"):
        m.load_official_state_dict({**sd, "encoder.extra.weight": torch.zeros(1)})
    partial = {k: v for k, v in sd.items() if k != "quantize.embedding.weight"}
    with pytest.raises(KeyError, match=r"missing keys \['quantize.embedding.weight'\]"):
        m.load_official_state_dict(partial)
    with pytest.raises(ValueError, match=r"state_dict\['decoder.conv_out.bias'\]: expected shape \(3,\), got \(4,\)"):
        m.load_official_state_dict({**sd, "decoder.conv_out.bias": torch.zeros(4)})
    with pytest.raises(TypeError, match=r"state_dict\['decoder.conv_out.bias'\]: expected a tensor"):
        m.load_official_state_dict({**sd, "decoder.conv_out.bias": [0.0, 0.0, 0.0]})
    with pytest.raises(TypeError, match="state_dict: expected a dict"):
        m.load_official_state_dict([1, 2])
    # taming's VQGAN (attention, quant_conv) is a different architecture
    with pytest.raises(KeyError, match="unexpected keys"):
        m.load_official_state_dict(create_model("vqgan_f4_k128_debug").state_dict())
    before = m.codebook.detach().clone()
    report = m.load_official_state_dict({**partial, "loss.x": torch.zeros(1)}, strict=False)
    assert report == (["quantize.embedding.weight"], ["loss.x"]) and torch.equal(m.codebook, before)


def test_bad_inputs_and_configs():
    m = create_model("mage_vqgan_tiny_debug").eval()
    with pytest.raises(ValueError, match=r"images: expected \(B, 3, 32, 32\), got \(1, 3, 64, 64\)"):
        m.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"images: expected \(B, 3, 32, 32\)"):
        m.encode(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="images: expected a float tensor"):
        m.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 64\), got \[64, 64\]"):
        m.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 64\), got \[-1, 0\]"):
        m.decode(torch.cat([torch.full((1, 1, 8), -1), torch.zeros(1, 7, 8, dtype=torch.long)], 1))
    with pytest.raises(ValueError, match=r"ids: expected \(B, 8, 8\) or \(B, 64\), got \(1, 4, 4\)"):
        m.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="ids: expected an integer tensor"):
        m.get_codebook_entry(torch.zeros(1, 8, 8))
    for kwargs, match in [
        (dict(img_size=30), r"img_size: expected a multiple of the downsampling factor 4"),
        (dict(ch=24), r"num_groups: expected a divisor"),
        (dict(ch_mult=()), r"ch_mult: expected a non-empty tuple"),
        (dict(codebook_size=0), r"codebook_size: expected an int >= 1"),
        (dict(input_mean=IMAGENET_MEAN), r"input_mean / input_std: give both or neither"),
        (dict(input_mean=(0.5, 0.5), input_std=(1, 1)), r"input_mean: expected 3 finite floats"),
        (dict(input_mean=IMAGENET_MEAN, input_std=(1, 0, 1)), r"input_std: expected positive values"),
        (dict(precision="fp8"), r"precision: expected None, 'ieee'"),
    ]:
        with pytest.raises(ValueError, match=match):
            MAGEVQGANConfig(**{**dict(img_size=32, ch=32, ch_mult=(1, 1, 2), embed_dim=32), **kwargs})


def test_flops_per_image():
    m = create_model("mage_vqgan_tiny_debug")
    enc, both = m.flops_per_image(), m.flops_per_image(decode=True)
    assert 0 < enc < both
    # conv_in alone: 2 * (32 * 3 * 9) MACs per pixel over 32 x 32 pixels; the search: 2 K D per token
    assert enc > 2 * 32 * 3 * 9 * 32 * 32 + 2 * 64 * 32 * 64

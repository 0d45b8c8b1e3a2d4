"""BEiT and CAE through the training loop: token targets from a frozen tokenizer run, block masks on the device, the
config checks around the tokenizer, exact resume, the probe of the pretrained encoder.

The tokenizer is a short run of the ``regvq_debug`` preset (the 128-code, 8 x 8-token debug tokenizer) trained once
per module; the README's figures come from the full presets (``regvq_debug``, then ``beit_debug`` / ``cae_debug``).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from test_train import needs_dali

from mimfast.train import ConfigError, get_config, load_checkpoint, pretrain

pytestmark = needs_dali


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")
    out = tmp_path_factory.mktemp("tok") / "regvq"
    try:
        pretrain(get_config("regvq_debug", [f"train.out_dir={out}", "train.max_steps=40", "model.loss.disc=false",
                                            "train.ckpt_every=0"]))  # fmt: skip
    finally:
        mp.undo()
    return out


def _cfg(preset, out, tok, *extra):
    return get_config(preset, [f"train.out_dir={out}", f"model.loss.tokenizer={tok}", "train.progress=lines",
                               "train.log_every=10", *extra])  # fmt: skip


def _losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, [r["loss"] for r in rows]


class ToyTokenizer(nn.Module):
    """A fixed tokenizer for the pkg.module:factory form: the patch's mean brightness in 128 bins (8 x 8 tokens)."""

    codebook_size = 128

    def encode(self, images):
        m = nn.functional.avg_pool2d(images.mean(dim=1, keepdim=True), 4)[:, 0]  # (B, 8, 8)
        return ((torch.tanh(m) + 1) * 64).long().clamp(0, 127)


def toy_tokenizer():
    return ToyTokenizer()


@pytest.mark.parametrize("preset", ["beit_debug", "cae_debug"])
def test_token_prediction_trains_and_resumes_exactly(tmp_path, monkeypatch, tokenizer_run, preset):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    straight = tmp_path / "straight"
    pretrain(_cfg(preset, straight, tokenizer_run, "train.max_steps=40", "train.ckpt_every=0"))
    rows, losses = _losses(straight)
    assert len(losses) == 40 and all(x == x for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    ce = [r.get("loss_ce", r["loss"]) for r in rows[:5]]
    assert 3.0 < sum(ce) / 5 < 5.5, ce  # CE over 128 codes starts near ln(128) = 4.85
    if preset == "cae_debug":
        assert {"loss_ce", "loss_align"} <= set(rows[-1])
    resumed = tmp_path / "resumed"
    pretrain(_cfg(preset, resumed, tokenizer_run, "train.max_steps=3"))
    pretrain(_cfg(preset, resumed, tokenizer_run, "train.max_steps=5", "train.resume=auto"))
    short = tmp_path / "short"
    pretrain(_cfg(preset, short, tokenizer_run, "train.max_steps=5"))
    a, b = load_checkpoint(short), load_checkpoint(resumed)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not any("tokenizer" in k for k in a["model"])  # the frozen tokenizer is not part of the checkpoint


def test_probe_reads_the_encoder_features(tmp_path, monkeypatch, tokenizer_run, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from mimfast.cli import main

    out = tmp_path / "beit"
    pretrain(_cfg("beit_debug", out, tokenizer_run, "train.max_steps=2"))
    capsys.readouterr()
    assert main(["probe", "--checkpoint", str(out), "--steps", "5"]) == 0
    assert "%" in capsys.readouterr().out


def test_a_tokenizer_factory_gives_the_targets(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "f"
    pretrain(_cfg("beit_debug", out, "test_token_tasks:toy_tokenizer", "train.max_steps=3"))
    _, losses = _losses(out)
    assert len(losses) == 3


def test_tokenizer_config_errors(tmp_path, tokenizer_run):
    with pytest.raises(ConfigError, match=r"model\.loss\.tokenizer: no tokenizer checkpoint at .*nowhere.*regvq_debug"):
        pretrain(_cfg("beit_debug", tmp_path / "a", tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"model\.loss\.tokenizer is not set"):
        pretrain(get_config("cae_debug", [f"train.out_dir={tmp_path / 'b'}", "model.loss.tokenizer="]))
    with pytest.raises(ConfigError, match=r"has 128 codes but beit_tiny_patch4_debug predicts vocab_size=64"):
        pretrain(_cfg("beit_debug", tmp_path / "c", tokenizer_run, "model.overrides.vocab_size=64"))
    with pytest.raises(ConfigError, match=r"data\.tokenizer_size=None but .* takes 32 px images"):
        pretrain(_cfg("cae_debug", tmp_path / "d", tokenizer_run, "data.tokenizer_size=none"))
    with pytest.raises(ConfigError, match=r"gives 8x8 tokens but .* has a 4x4 patch grid"):
        pretrain(
            _cfg(
                "beit_debug",
                tmp_path / "e",
                tokenizer_run,
                "model.overrides.patch_size=8",
                "model.overrides.num_mask_patches=6",
                "model.overrides.min_mask_patches=2",
            )
        )
    with pytest.raises(ConfigError, match=r"cannot import it"):
        pretrain(_cfg("beit_debug", tmp_path / "f", "no_such_module_xyz:factory"))
    with pytest.raises(ConfigError, match=r"model\.loss\.tokeniser: unknown option of the beit task"):
        pretrain(get_config("beit_debug", [f"train.out_dir={tmp_path / 'g'}", "model.loss.tokeniser=x"]))


def test_a_non_tokenizer_run_is_refused(tmp_path, monkeypatch, tokenizer_run):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    mae = tmp_path / "mae"
    pretrain(get_config("mae_debug", [f"train.out_dir={mae}", "train.max_steps=1"]))
    with pytest.raises(ConfigError, match=r"that run trained mae_vit_tiny_patch4_dec64d2b_debug .*not a tokenizer"):
        pretrain(_cfg("beit_debug", tmp_path / "x", mae))


# ------------------------------------------------------------------------------------------------------------ MAGE
def test_mage_trains_resumes_exactly_and_generates(tmp_path, monkeypatch, tokenizer_run, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from mimfast.cli import main
    from mimfast.train.evaluate import load_pretrained

    straight = tmp_path / "straight"
    pretrain(_cfg("mage_debug", straight, tokenizer_run, "train.max_steps=60", "train.ckpt_every=0"))
    rows, losses = _losses(straight)
    assert len(losses) == 60 and {"loss_mlm", "mask_ratio"} <= set(rows[-1])
    assert all(0.5 <= r["mask_ratio"] <= 1.0 for r in rows)  # MAGE's truncated normal on [0.5, 1]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.95 * first, (first, last)
    resumed, short = tmp_path / "resumed", tmp_path / "short"
    pretrain(_cfg("mage_debug", resumed, tokenizer_run, "train.max_steps=3"))
    pretrain(_cfg("mage_debug", resumed, tokenizer_run, "train.max_steps=5", "train.resume=auto"))
    pretrain(_cfg("mage_debug", short, tokenizer_run, "train.max_steps=5"))
    a, b = load_checkpoint(short), load_checkpoint(resumed)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the Python API: seeded generation is reproducible and decodes through the run's tokenizer
    model, _, _ = load_pretrained(straight)
    ids = [model.generate(3, steps=5, generator=torch.Generator().manual_seed(7), tokenizer=False) for _ in range(2)]
    assert ids[0].shape == (3, 8, 8) and torch.equal(ids[0], ids[1]) and int(ids[0].max()) < 128
    imgs = model.generate(2, steps=5, generator=torch.Generator().manual_seed(7))
    assert imgs.shape == (2, 3, 32, 32) and torch.isfinite(imgs).all()
    # the command
    capsys.readouterr()
    png = tmp_path / "gen.png"
    assert (
        main(["generate", "--checkpoint", str(straight), "--num-images", "4", "--steps", "3", "--out", str(png)]) == 0
    )
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "images/s" in out
    assert main(["generate", "--checkpoint", str(straight), "--steps", "0"]) == 2
    assert "--steps: expected an int >= 1" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(straight), "--class-id", "10"]) == 2
    assert "--class-id: 10 is not a class" in capsys.readouterr().err


def test_mage_contrastive_and_class_conditional(tmp_path, monkeypatch, tokenizer_run):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "c"
    pretrain(_cfg("mage_debug", out, tokenizer_run, "train.max_steps=3", "model.overrides.contrastive=true",
                  "model.loss.class_conditional=true"))  # fmt: skip
    rows, _ = _losses(out)
    assert rows[-1]["loss_contrastive"] > 0


def test_mage_tokenizer_errors(tmp_path, tokenizer_run):
    with pytest.raises(ConfigError, match=r"has 128 codes but mage_tiny_patch4_debug has codebook_size=64"):
        pretrain(_cfg("mage_debug", tmp_path / "a", tokenizer_run, "model.overrides.codebook_size=64"))
    with pytest.raises(ConfigError, match=r"data\.img_size=64 but .* takes 32 px images"):
        pretrain(_cfg("mage_debug", tmp_path / "b", tokenizer_run, "data.img_size=64",
                      "model.overrides.img_size=64", "model.overrides.patch_size=8"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.loss\.tokenizer=.*mage_vqgan:/no/such.ckpt.*no such checkpoint"):
        pretrain(_cfg("mage_debug", tmp_path / "c", "mage_vqgan:/no/such.ckpt"))

"""mimfast probe / mimfast reconstruct (mimfast.train.evaluate): the linear-probe mechanics, a probe and a
reconstruction grid of a real (tiny) pretraining checkpoint, and their errors.

Whether pretraining *beats* a random encoder is a claim about the debug recipe, checked by the main job in CI
(``.ci/run``) and stated in the README; here the machinery is checked on a 3-step run over a 4-class dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="the probe and reconstruction read data through DALI ('.[train]')")
PIL = pytest.importorskip("PIL.Image", reason="reconstruction PNGs need Pillow ('.[train]')")

from mimfast.cli import main  # noqa: E402
from mimfast.data import make_builtin_dataset  # noqa: E402
from mimfast.train import get_config, load_checkpoint, pretrain  # noqa: E402
from mimfast.train.evaluate import (  # noqa: E402
    fit_linear_probe,
    linear_probe,
    linear_probes,
    load_pretrained,
    reconstruct,
)

NUM_CLASSES, VAL_PER_CLASS = 4, 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 3-step mae_debug run over a small generated dataset (plain-torch CPU kernels, not the interpreter)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")
    root = tmp_path_factory.mktemp("data") / "shapes"
    make_builtin_dataset(root, num_classes=NUM_CLASSES, train_per_class=16, val_per_class=VAL_PER_CLASS, size=40,
                         progress=False)  # fmt: skip
    out = tmp_path_factory.mktemp("run") / "mae"
    cfg = get_config("mae_debug", [f"train.out_dir={out}", f"data.root={root}", "train.max_steps=3",
                                   "train.batch_size=8", "train.log_every=1"])  # fmt: skip
    pretrain(cfg)
    yield out
    mp.undo()


def test_fit_linear_probe_learns_separable_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 3
    ty, vy = torch.randint(0, 5, (400,), generator=g), torch.randint(0, 5, (200,), generator=g)
    tx = centres[ty] + torch.randn(400, 16, generator=g)
    vx = centres[vy] + torch.randn(200, 16, generator=g)
    top1, train_top1 = fit_linear_probe(tx, ty, vx, vy, num_classes=5)
    assert top1 > 0.95 and train_top1 > 0.95
    # labels unrelated to the features: the probe may memorise the training set but must be at chance on val
    noise_top1, _ = fit_linear_probe(tx, ty[torch.randperm(400, generator=g)], vx, vy, num_classes=5)
    assert noise_top1 < 0.4
    with pytest.raises(ValueError, match="features"):
        fit_linear_probe(tx, ty, vx[:, :3], vy, num_classes=5)


def test_load_pretrained_restores_weights_and_random_init_is_seeded(run_dir):
    model, cfg, step = load_pretrained(run_dir)
    ck = load_checkpoint(run_dir)
    assert step == 3 == ck["step"] and cfg.model.name == "mae_vit_tiny_patch4_dec64d2b_debug"
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck["model"][k]), k
    r1, _, s1 = load_pretrained(run_dir, random_init=True, seed=1)
    r2, _, _ = load_pretrained(run_dir, random_init=True, seed=1)
    r3, _, _ = load_pretrained(run_dir, random_init=True, seed=2)
    w = "blocks.0.attn.qkv.weight"
    assert s1 == 0 and torch.equal(r1.state_dict()[w], r2.state_dict()[w])
    assert not torch.equal(r1.state_dict()[w], r3.state_dict()[w])
    assert not torch.equal(r1.state_dict()[w], model.state_dict()[w])


def test_probe_scores_every_validation_image_once(run_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    r = linear_probe(run_dir, steps=50, progress=False)
    assert r.num_val == NUM_CLASSES * VAL_PER_CLASS and r.num_train == NUM_CLASSES * 16
    assert r.num_classes == NUM_CLASSES and r.feature_dim == 96 and not r.random_init
    assert 0.0 <= r.top1 <= 1.0 and r.train_top1 > 1.0 / NUM_CLASSES  # 96-d features separate 64 images well
    rm = linear_probe(run_dir, steps=50, progress=False, random_init=True, pool="mean")
    assert rm.random_init and rm.pool == "mean" and rm.num_val == r.num_val


def test_probe_cli_prints_both_numbers(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    js = tmp_path / "probe.json"
    argv = ["probe", "--checkpoint", str(run_dir), "--compare-random", "--random-seeds", "2", "--steps", "30"]
    assert main([*argv, "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "pretrained (step 3)" in out and "random init (seed 0)" in out and "random init (seed 1)" in out
    assert "random init (seed 2)" not in out and "class token" in out and "mean of patches" in out
    assert out.count("points over the best random init") == 2
    rec = json.loads(js.read_text())
    assert rec["step"] == 3 and rec["num_val"] == NUM_CLASSES * VAL_PER_CLASS
    assert [(r["encoder"], r["seed"]) for r in rec["runs"]] == [("pretrained", 0), ("random", 0), ("random", 1)]
    for pool in ("cls", "mean"):
        s = rec["summary"][pool]
        rnd = [r[pool]["top1"] for r in rec["runs"][1:]]
        assert s["pretrained"] == rec["runs"][0][pool]["top1"] and s["random_best"] == max(rnd)
        assert s["margin_over_best_random"] == pytest.approx(s["pretrained"] - max(rnd))
        assert f"{100 * s['pretrained']:.1f}%" in out
    # the same probe through the API gives the same numbers (one extraction pass serves both poolings)
    api = linear_probes(run_dir, steps=30, progress=False)
    assert {p: r.top1 for p, r in api.items()} == {p: rec["runs"][0][p]["top1"] for p in ("cls", "mean")}
    assert main([*argv[:3], "--pool", "mean"]) == 0
    out = capsys.readouterr().out
    assert "mean of patches" in out and "class token" not in out
    assert main([*argv[:3], "--random-seeds", "0"]) == 2
    assert "--random-seeds" in capsys.readouterr().err


def test_reconstruction_grid(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    n = 6
    png = reconstruct(run_dir, tmp_path / "grid.png", num_images=n, scale=1, seed=3)
    img = np.asarray(PIL.open(png).convert("RGB")).astype(np.int16)
    tile, pad = 32, 2
    assert img.shape == (n * (tile + pad) + pad, 4 * (tile + pad) + pad, 3)

    def cell(i, j):
        y, x = pad + i * (tile + pad), pad + j * (tile + pad)
        return img[y : y + tile, x : x + tile]

    p = 4  # debug model patch size
    grey_fracs, classes_seen = [], set()
    for i in range(n):
        orig, masked, recon, pasted = (cell(i, j) for j in range(4))
        grey = np.all(masked == 128, axis=-1)  # removed patches are drawn mid-grey (0.5)
        removed = grey.reshape(tile // p, p, tile // p, p).all(axis=(1, 3))  # whole patches only
        grey_fracs.append(removed.mean())
        keep = ~np.repeat(np.repeat(removed, p, 0), p, 1)
        # visible patches: the masked input and the pasted reconstruction show the original pixels
        assert np.abs(masked[keep] - orig[keep]).max() <= 1 and np.abs(pasted[keep] - orig[keep]).max() <= 1
        # removed patches of the pasted column are the reconstruction's
        assert np.abs(pasted[~keep] - recon[~keep]).max() <= 1
        classes_seen.add(orig.tobytes())
    assert np.mean(grey_fracs) == pytest.approx(0.75, abs=0.02)  # the run's mask ratio, 48 of 64 patches
    assert len(classes_seen) == n  # distinct images (spread over the split, not one repeated)


def test_reconstruct_cli_and_errors(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "r.png"
    assert main(["reconstruct", "--checkpoint", str(run_dir), "--out", str(out), "--num-images", "2"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["reconstruct", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["probe", "--checkpoint", str(tmp_path / "nope")]) == 2
    with pytest.raises(ValueError, match="num_images"):
        reconstruct(run_dir, out, num_images=0)
    with pytest.raises(ValueError, match="mask_ratio"):
        reconstruct(run_dir, out, mask_ratio=1.0)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["probe", "--checkpoint", str(empty)]) == 2
    assert "no valid checkpoint" in capsys.readouterr().err
    assert not Path(str(out) + ".tmp").exists()

"""mimfast.data: the built-in dataset, the DALI loaders (CPU pipeline, ``device_id=None``), webdataset, the validator.

Everything runs on a tiny generated dataset (4 classes, 12 train + 4 val images each, 56x44 JPEGs) built once per
session. Sample ``i`` of a split has label ``i // per_class`` (classes sorted by name, files sorted within a class),
which lets the tests check labels and indices against ground truth rather than against the loader itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mimfast.data import (
    BUILTIN_CLASSES,
    DataConfig,
    add_validate_arguments,
    build_loader,
    cmd_validate,
    denormalize,
    list_folder_split,
    make_builtin_dataset,
    make_webdataset_shards,
    validate_dataset,
)
from mimfast.data import builtin as builtin_mod

HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")

NC, NTRAIN, NVAL, SIZE = 4, 12, 4, (56, 44)  # 48 train, 16 val samples


@pytest.fixture(scope="session")
def ds(tmp_path_factory):
    return make_builtin_dataset(tmp_path_factory.mktemp("data") / "builtin", num_classes=NC, train_per_class=NTRAIN,
                                val_per_class=NVAL, size=SIZE, progress=False)  # fmt: skip


@pytest.fixture(scope="session")
def wds_root(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("wds")
    for split in ("train", "val"):
        make_webdataset_shards(ds / split, out / split, samples_per_shard=5, progress=False)
    return out


def cfg_for(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), **{"img_size": 32, "num_threads": 2, **kw})


def epoch(loader) -> list:
    return list(loader)


def cat(batches, field: str) -> torch.Tensor:
    return torch.cat([getattr(b, field) for b in batches])


def same_batches(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        for f in x._fields:
            u, v = getattr(x, f), getattr(y, f)
            if (u is None) != (v is None) or (u is not None and not torch.equal(u, v)):
                return False
    return True


# ------------------------------------------------------------------------------------------------ built-in dataset
def test_builtin_layout_and_valid_jpegs(ds):
    man = json.loads((ds / "MANIFEST.json").read_text())
    assert man["classes"] == list(BUILTIN_CLASSES[:NC]) and man["counts"] == {"train": NC * NTRAIN, "val": NC * NVAL}
    for split, per in (("train", NTRAIN), ("val", NVAL)):
        classes = sorted(p.name for p in (ds / split).iterdir())
        assert classes == sorted(BUILTIN_CLASSES[:NC])
        for c in classes:
            files = sorted((ds / split / c).iterdir())
            assert len(files) == per and all(f.suffix == ".JPEG" for f in files)
            for f in files:
                assert f.read_bytes()[:3] == b"\xff\xd8\xff"
                with Image.open(f) as im:
                    assert im.format == "JPEG" and im.size == SIZE and im.mode == "RGB"
                    im.verify()
    # not blank, and images of one class differ from each other
    a = [np.asarray(Image.open(f), dtype=np.float32) for f in sorted((ds / "train" / "circle").iterdir())[:3]]
    assert all(x.std() > 10 for x in a) and np.abs(a[0] - a[1]).mean() > 10


def test_builtin_deterministic_bytes(tmp_path):
    kw = dict(num_classes=3, train_per_class=2, val_per_class=1, size=32, seed=5, progress=False)
    a, b = make_builtin_dataset(tmp_path / "a", **kw), make_builtin_dataset(tmp_path / "b", workers=2, **kw)
    c = make_builtin_dataset(tmp_path / "c", **{**kw, "seed": 6})
    files = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert len(files) == 9 and files == sorted(p.relative_to(b) for p in b.rglob("*.JPEG"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)  # same seed: same bytes, any workers
    assert sum((a / f).read_bytes() != (c / f).read_bytes() for f in files) == 9  # another seed: other images


def test_builtin_reuse_mismatch_force(tmp_path, capsys):
    kw = dict(num_classes=2, train_per_class=2, val_per_class=1, size=24)
    root = make_builtin_dataset(tmp_path / "d", **kw)
    probe = root / "train" / "circle" / "00000.JPEG"
    stamp = probe.stat().st_mtime_ns
    capsys.readouterr()
    assert make_builtin_dataset(tmp_path / "d", **kw) == root
    assert "reusing" in capsys.readouterr().out and probe.stat().st_mtime_ns == stamp  # nothing rewritten
    with pytest.raises(FileExistsError, match="other parameters.*force=True"):
        make_builtin_dataset(tmp_path / "d", **{**kw, "train_per_class": 3})
    make_builtin_dataset(tmp_path / "d", **{**kw, "train_per_class": 3}, force=True, progress=False)
    assert len(list((root / "train" / "circle").iterdir())) == 3
    assert json.loads((root / "MANIFEST.json").read_text())["params"]["train_per_class"] == 3
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the old tree and the temp dir are gone


def test_builtin_atomic_on_crash(tmp_path, monkeypatch):
    kw = dict(num_classes=2, train_per_class=3, val_per_class=1, size=24, progress=False)
    real, calls = builtin_mod._render, []

    def crash_after_3(job):
        calls.append(job)
        if len(calls) > 3:
            raise KeyboardInterrupt("simulated crash mid-build")
        real(job)

    monkeypatch.setattr(builtin_mod, "_render", crash_after_3)
    with pytest.raises(KeyboardInterrupt):
        make_builtin_dataset(tmp_path / "d", **kw)
    assert not (tmp_path / "d").exists()  # nothing that could be taken for a complete dataset
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # a half-written tree at the target (no manifest) is refused, never reused
    (tmp_path / "d" / "train" / "circle").mkdir(parents=True)
    shutil.copy(__file__, tmp_path / "d" / "train" / "circle" / "00000.JPEG")
    monkeypatch.setattr(builtin_mod, "_render", real)
    with pytest.raises(FileExistsError, match="no readable MANIFEST.json"):
        make_builtin_dataset(tmp_path / "d", **kw)
    root = make_builtin_dataset(tmp_path / "d", force=True, **kw)
    assert len(list(root.rglob("*.JPEG"))) == 8 and (root / "MANIFEST.json").exists()


@pytest.mark.parametrize(
    "kw,match",
    [(dict(num_classes=11), "num_classes"), (dict(num_classes=1), "num_classes"), (dict(train_per_class=0),
     "train_per_class"), (dict(size=4), "size"), (dict(size=(32, 32, 3)), "size"), (dict(seed=-1), "seed")],
)  # fmt: skip
def test_builtin_bad_args(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        make_builtin_dataset(tmp_path / "x", progress=False, **kw)


def test_webdataset_shards(ds, wds_root):
    tars = sorted((wds_root / "val").glob("*.tar"))
    assert [t.name for t in tars] == [f"shard-{i:06d}.tar" for i in range(4)]  # 16 samples, 5 per shard
    _, files, labels = list_folder_split(ds / "val")
    with tarfile.open(tars[1]) as tf:
        names = tf.getnames()
        assert names[:2] == ["00000005.jpg", "00000005.cls"]
        assert tf.extractfile("00000005.jpg").read() == open(files[5], "rb").read()
        assert int(tf.extractfile("00000005.cls").read()) == labels[5] == 5 // NVAL
    idx = (wds_root / "val" / "shard-000001.idx").read_text().splitlines()
    assert idx[0] == "v1.2 5" and idx[1].startswith("jpg 512 ")


# ------------------------------------------------------------------------------------------------ train / eval
@needs_dali
def test_train_batches_values(ds):
    cfg = cfg_for(ds)
    loader = build_loader(cfg, batch_size=8, return_index=True)
    assert len(loader) == 6 and loader.num_samples == 48 and loader.num_classes == NC
    assert loader.class_names == sorted(BUILTIN_CLASSES[:NC]) and loader.batch_size == 8
    e0, e1 = epoch(loader), epoch(loader)
    assert len(e0) == 6 and loader.epoch == 2
    b = e0[0]
    assert b.images.shape == (8, 3, 32, 32) and b.images.dtype == torch.float32 and b.images.is_contiguous()
    assert b.labels.dtype == torch.int64 and b.index.dtype == torch.int64 and b.valid.all()
    assert b.images_small is None
    for e in (e0, e1):
        idx = cat(e, "index")
        assert sorted(idx.tolist()) == list(range(48))  # 6 batches x 8 = the whole split, each sample once
        assert torch.equal(cat(e, "labels"), idx // NTRAIN)  # label of sample i is i // 12
    assert not torch.equal(cat(e0, "index"), cat(e1, "index"))  # reshuffled every epoch
    x = cat(e0, "images")
    px = denormalize(x, cfg)
    assert px.min() >= -1e-5 and px.max() <= 1 + 1e-5 and px.max() > 0.9 and px.min() < 0.1
    assert x.mean().abs() < 1.0 and 0.3 < x.std() < 3.0 and (x.flatten(1).std(1) > 0.05).all()
    # random crops: the same sample looks different in two epochs
    pos0, pos1 = cat(e0, "index").argsort(), cat(e1, "index").argsort()
    assert (x[pos0] - cat(e1, "images")[pos1]).abs().flatten(1).mean(1).gt(1e-3).float().mean() > 0.9


def _pil_center_crop(path, cfg) -> torch.Tensor:
    """Reference eval transform: bicubic antialiased resize of the shorter side to floor(S / crop_pct), centre crop."""
    im = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    h, w = im.shape[-2:]
    s, out = int(cfg.img_size / cfg.crop_pct), cfg.img_size
    nh, nw = (s, round(w * s / h)) if h <= w else (round(h * s / w), s)
    r = F.interpolate(im, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return r, (nh - out) // 2, (nw - out) // 2


@needs_dali
def test_eval_center_crop_deterministic(ds):
    cfg = cfg_for(ds)
    a = epoch(build_loader(cfg, batch_size=4, split="val", return_index=True))
    b = epoch(build_loader(cfg_for(ds, num_threads=1), batch_size=4, split="val", return_index=True))
    assert same_batches(a, b)  # deterministic, and independent of the thread count
    assert torch.equal(cat(a, "index"), torch.arange(16)) and torch.equal(cat(a, "labels"), torch.arange(16) // NVAL)
    _, files, _ = list_folder_split(ds / "val")
    px = denormalize(cat(a, "images"), cfg)
    for i in (0, 7, 13):
        ref, top, left = _pil_center_crop(files[i], cfg)
        err = (ref[0, :, top : top + 32, left : left + 32] - px[i]).abs().mean()
        shifted = (ref[0, :, top : top + 32, left + 1 : left + 33] - px[i]).abs().mean()
        assert err < 0.006 and shifted > 2 * err, (i, err, shifted)  # the centre window, not one pixel off


@needs_dali
@pytest.mark.parametrize("split", ["train", "val"])
def test_two_views_same_crop_and_flip(ds, split):
    cfg = cfg_for(ds, tokenizer_size=16)
    batches = epoch(build_loader(cfg, batch_size=8, split=split))
    big, small = denormalize(cat(batches, "images"), cfg), denormalize(cat(batches, "images_small"), cfg)
    assert small.shape == (len(big), 3, 16, 16)
    pooled = F.avg_pool2d(big, 2)
    same = (pooled - small).abs().flatten(1).mean(1)
    other = (pooled.roll(1, 0) - small).abs().flatten(1).mean(1)  # another sample's view
    flipped = (pooled.flip(-1) - small).abs().flatten(1).mean(1)  # the same crop, the other flip
    assert same.max() < 0.05, same
    assert (other > 2 * same).float().mean() > 0.9
    assert flipped.mean() > 2 * same.mean()  # both views got the same flip


@needs_dali
@pytest.mark.parametrize("world,batch", [(2, 5), (3, 4)])
def test_ranks_shard_disjointly(ds, world, batch):
    loaders = [build_loader(cfg_for(ds), batch_size=batch, rank=r, world_size=world, return_index=True)
               for r in range(world)]  # fmt: skip
    assert len({len(ld) for ld in loaders}) == 1 and len(loaders[0]) == 48 // (world * batch)
    for _ in range(2):  # two epochs
        idx = [cat(epoch(ld), "index") for ld in loaders]
        allidx = torch.cat(idx)
        assert all(len(i) == len(loaders[0]) * batch for i in idx)
        assert len(set(allidx.tolist())) == len(allidx)  # disjoint across ranks
        assert allidx.min() >= 0 and allidx.max() < 48
        if 48 % (world * batch) == 0:
            assert sorted(allidx.tolist()) == list(range(48))  # together they cover the split


@needs_dali
@pytest.mark.parametrize("fmt", ["folder", "wds"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_covers_every_sample_once(ds, wds_root, fmt, world):
    root = ds if fmt == "folder" else wds_root
    loaders = [build_loader(cfg_for(root, format=fmt), batch_size=3, split="val", rank=r, world_size=world,
                            return_index=True) for r in range(world)]  # fmt: skip
    n = -(-16 // (3 * world))
    assert [len(ld) for ld in loaders] == [n] * world
    batches = [b for ld in loaders for b in epoch(ld)]
    valid = cat(batches, "valid")
    idx, labels = cat(batches, "index")[valid], cat(batches, "labels")[valid]
    assert sorted(idx.tolist()) == list(range(16))  # every sample exactly once
    assert torch.equal(labels, idx // NVAL)
    assert int((~valid).sum()) == n * 3 * world - 16  # the padding is flagged


# ------------------------------------------------------------------------------------------------ exact resume
@needs_dali
@pytest.mark.parametrize("fmt", ["folder", "wds"])
def test_exact_resume(ds, wds_root, fmt):
    root = ds if fmt == "folder" else wds_root
    cfg = cfg_for(root, format=fmt, tokenizer_size=16)
    kw = dict(batch_size=8, return_index=True)
    if fmt == "wds":
        kw.update(rank=1, world_size=2)
    ref_loader = build_loader(cfg, **kw)
    nb = len(ref_loader)
    ref = epoch(ref_loader) + epoch(ref_loader)  # two uninterrupted epochs
    assert not same_batches(ref[:nb], ref[nb:])
    # interrupted after k batches: mid epoch 0, after the last batch of epoch 0, mid epoch 1
    for k in (2, nb, nb + 1):
        first = build_loader(cfg, **kw)
        got = []
        while len(got) < k:
            for b in first:
                got.append(b)
                if len(got) == k:
                    break
        state = pickle.loads(pickle.dumps(first.state_dict()))
        del first
        assert state["epoch"] == k // nb and state["step"] == k % nb
        assert (state["dali_checkpoint"] is not None) == (k % nb != 0)
        # other threads / prefetch depth: neither changes the outputs
        resumed = build_loader(cfg_for(root, format=fmt, tokenizer_size=16, num_threads=1, prefetch=3), state=state,
                               **kw)  # fmt: skip
        while len(got) < 2 * nb:
            got += epoch(resumed)
        assert same_batches(got, ref), k
    # a resumed loader's own state resumes exactly too (resume twice within one epoch)
    first = build_loader(cfg, **kw)
    got = [next(iter(first))]
    second = build_loader(cfg, state=first.state_dict(), **kw)
    got.append(next(iter(second)))
    got += epoch(build_loader(cfg, state=second.state_dict(), **kw))
    assert same_batches(got, ref[:nb])
    # without DALI's checkpoint the epoch is replayed from its derived seed: still exact
    first = build_loader(cfg, **kw)
    it = iter(first)
    head = [next(it), next(it)]
    state = first.state_dict()
    state["dali_checkpoint"] = None
    assert same_batches(head + epoch(build_loader(cfg, state=state, **kw)), ref[:nb])


@needs_dali
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (DALI mixed decode, outputs on the GPU)")
@pytest.mark.parametrize("decode", ["mixed", "cpu"])
def test_gpu_pipeline_and_exact_resume(ds, decode):
    cfg = cfg_for(ds, tokenizer_size=16, decode=decode)
    kw = dict(batch_size=8, return_index=True, device_id=0)
    ref_loader = build_loader(cfg, **kw)
    ref = epoch(ref_loader) + epoch(ref_loader)
    b = ref[0]
    assert b.images.device.type == "cuda" and b.labels.device.type == "cuda" and b.images.shape == (8, 3, 32, 32)
    assert torch.equal(cat(ref[:6], "index").sort().values.cpu(), torch.arange(48))
    assert torch.equal(cat(ref, "labels"), cat(ref, "index") // NTRAIN)
    first = build_loader(cfg, **kw)
    it = iter(first)
    got = [next(it), next(it), next(it)]
    resumed = build_loader(cfg, state=pickle.loads(pickle.dumps(first.state_dict())), **kw)
    got += epoch(resumed) + epoch(resumed)
    assert same_batches(got, ref)  # bit-identical on the GPU too
    # eval: the GPU decode matches the CPU pipeline up to decoder rounding
    gpu = cat(epoch(build_loader(cfg, batch_size=4, split="val", device_id=0)), "images").cpu()
    cpu = cat(epoch(build_loader(cfg_for(ds), batch_size=4, split="val")), "images")
    assert (denormalize(gpu, cfg) - denormalize(cpu, cfg)).abs().mean() < 0.01


@needs_dali
def test_break_and_continue_same_epoch(ds):
    cfg = cfg_for(ds)
    ref = epoch(build_loader(cfg, batch_size=8))
    loader = build_loader(cfg, batch_size=8)
    got = []
    for b in loader:
        got.append(b)
        if len(got) == 2:
            break
    assert loader.epoch == 0 and loader.step == 2
    got += epoch(loader)  # continues the same epoch
    assert same_batches(got, ref) and loader.epoch == 1


@needs_dali
def test_resume_refuses_other_setup(ds):
    loader = build_loader(cfg_for(ds), batch_size=8)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="batch_size: saved 8 vs now 4"):
        build_loader(cfg_for(ds), batch_size=4, state=state)
    with pytest.raises(ValueError, match="seed"):
        build_loader(cfg_for(ds, seed=1), batch_size=8, state=state)
    with pytest.raises(ValueError, match="state must be a dict"):
        build_loader(cfg_for(ds), batch_size=8, state={"epoch": 0})


# ------------------------------------------------------------------------------------------------ webdataset
@needs_dali
def test_wds_same_samples_as_folder(ds, wds_root, tmp_path):
    def by_index(root, fmt):
        out = {}
        for r in range(2):
            for b in build_loader(cfg_for(root, format=fmt), batch_size=3, split="val", rank=r, world_size=2,
                                  return_index=True):  # fmt: skip
                for i in torch.nonzero(b.valid).flatten().tolist():
                    out[int(b.index[i])] = (b.images[i], int(b.labels[i]))
        return out

    f, w = by_index(ds, "folder"), by_index(wds_root, "wds")
    assert sorted(f) == sorted(w) == list(range(16))
    assert all(torch.equal(f[i][0], w[i][0]) and f[i][1] == w[i][1] for i in f)  # same pixels, same labels
    noidx = tmp_path / "noidx"  # tars without DALI index files: DALI indexes them itself, same samples
    shutil.copytree(wds_root / "val", noidx / "val", ignore=shutil.ignore_patterns("*.idx"))
    w2 = by_index(noidx, "wds")
    assert sorted(w2) == list(range(16)) and all(torch.equal(f[i][0], w2[i][0]) for i in f)
    loaders = [build_loader(cfg_for(wds_root, format="wds"), batch_size=4, rank=r, world_size=2, return_index=True)
               for r in range(2)]  # fmt: skip
    assert [len(ld) for ld in loaders] == [6, 6] and loaders[0].class_names == sorted(BUILTIN_CLASSES[:NC])
    idx = [cat(epoch(ld), "index") for ld in loaders]
    labels = [cat(epoch(ld), "labels") for ld in loaders]
    assert not set(idx[0].tolist()) & set(idx[1].tolist())  # the ranks read disjoint shards
    assert all(len(set(i.tolist())) == len(i) for i in idx)  # no sample twice within a rank's epoch
    assert all(i.max() < 48 for i in idx) and all(len(lab) == 24 for lab in labels)


# ------------------------------------------------------------------------------------------------ validator
def _plant(tmp_path, ds):
    root = tmp_path / "v"
    shutil.copytree(ds / "val", root)
    good = (ds / "val" / "circle" / "00000.JPEG").read_bytes()
    rng = np.random.default_rng(0)
    bad = {
        root / "circle" / "truncated.JPEG": good[: len(good) // 2],
        root / "circle" / "garbage.JPEG": rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        root / "cross" / "empty.JPEG": b"",
        # a JPEG header and end marker around garbage: only the decoder itself can tell
        root / "square" / "scrambled.JPEG": good[:600] + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
        + b"\xff\xd9",
    }  # fmt: skip
    for p, data in bad.items():
        p.write_bytes(data)
    (root / "cross" / "notes.txt").write_text("not an image, and not read by the loader")
    return root, bad


@needs_dali
def test_validator_flags_corrupt_files(ds, tmp_path, capsys):
    root, bad = _plant(tmp_path, ds)
    rep = validate_dataset(root, num_threads=2, batch_size=8, progress=False)
    reasons = dict(rep.bad)
    assert set(reasons) == {str(p) for p in bad} and not rep.ok and rep.checked == 16 + len(bad)
    assert "truncated" in reasons[str(root / "circle" / "truncated.JPEG")]
    assert "not an image" in reasons[str(root / "circle" / "garbage.JPEG")]
    assert "empty" in reasons[str(root / "cross" / "empty.JPEG")]
    assert "DALI cannot decode" in reasons[str(root / "square" / "scrambled.JPEG")]
    assert rep.ignored == [str(root / "cross" / "notes.txt")]
    assert all(str(p) in rep.format_report() for p in bad)
    clean = validate_dataset(ds, num_threads=2, progress=False)
    assert clean.ok and clean.checked == 64 and "OK" in clean.format_report()
    # the CLI contract: 0 clean, 1 corrupt files listed, 2 bad path
    parser = add_validate_arguments(argparse.ArgumentParser())
    assert cmd_validate(parser.parse_args([str(ds), "--quiet", "--threads", "2"])) == 0
    capsys.readouterr()
    assert cmd_validate(parser.parse_args([str(root), "--quiet", "--threads", "2"])) == 1
    assert str(root / "square" / "scrambled.JPEG") in capsys.readouterr().out
    assert cmd_validate(parser.parse_args([str(tmp_path / "nope"), "--quiet"])) == 2
    assert "does not exist" in capsys.readouterr().err
    # the same through the installed command line: `mimfast validate-data PATH`
    from mimfast.cli import main

    assert main(["validate-data", str(root), "--quiet", "--threads", "2"]) == 1
    out = capsys.readouterr().out
    assert all(str(p) in out for p in bad)
    assert main(["validate-data", str(ds), "--quiet", "--threads", "2"]) == 0


@needs_dali
def test_loader_names_the_validator_on_a_corrupt_file(ds, tmp_path):
    root, _ = _plant(tmp_path, ds)
    (tmp_path / "d").mkdir()
    os.symlink(root, tmp_path / "d" / "val")
    with pytest.raises(RuntimeError, match="validate-data"):
        epoch(build_loader(cfg_for(tmp_path / "d"), batch_size=4, split="val"))


@needs_dali
def test_validator_webdataset(ds, tmp_path):
    root, bad = _plant(tmp_path, ds)
    make_webdataset_shards(root, tmp_path / "w", samples_per_shard=7, progress=False)
    folder_view = validate_dataset(tmp_path / "w", num_threads=2, progress=False)  # wrong format: nothing checked
    assert folder_view.checked == 0 and "--format wds" in folder_view.format_report()
    parser = add_validate_arguments(argparse.ArgumentParser())
    assert cmd_validate(parser.parse_args([str(tmp_path / "w"), "--quiet"])) == 2
    rep = validate_dataset(tmp_path / "w", format="wds", num_threads=2, progress=False)
    assert rep.checked == 16 + len(bad) and len(rep.bad) == len(bad)
    assert all(":" in p and p.split(":")[0].endswith(".tar") for p, _ in rep.bad)
    _, files, _ = list_folder_split(root)
    planted = sorted(f"{i:08d}.jpg" for i, f in enumerate(files) if f in {str(p) for p in bad})
    assert sorted(p.rsplit(":", 1)[1] for p, _ in rep.bad) == planted


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(format="tfrecord"), "DataConfig.format"),
        (dict(img_size=0), "DataConfig.img_size"),
        (dict(img_size=32.0), "DataConfig.img_size"),
        (dict(tokenizer_size=0), "DataConfig.tokenizer_size"),
        (dict(scale=(0.5, 0.2)), "DataConfig.scale"),
        (dict(scale=(0.0, 1.0)), "DataConfig.scale"),
        (dict(scale=(0.2, 1.5)), "DataConfig.scale"),
        (dict(ratio=(1.3, 0.7)), "DataConfig.ratio"),
        (dict(ratio=3), "DataConfig.ratio"),
        (dict(hflip="yes"), "DataConfig.hflip"),
        (dict(mean=(0.5, 0.5)), "DataConfig.mean"),
        (dict(std=(0.2, 0.0, 0.2)), "DataConfig.std"),
        (dict(num_threads=0), "DataConfig.num_threads"),
        (dict(prefetch=0), "DataConfig.prefetch"),
        (dict(seed=-1), "DataConfig.seed"),
        (dict(interp="bicubic"), "DataConfig.interp"),
        (dict(decode="gpu"), "DataConfig.decode"),
        (dict(crop_pct=1.5), "DataConfig.crop_pct"),
        (dict(root=""), "DataConfig.root"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kw)


@needs_dali
def test_build_loader_errors(ds, wds_root, tmp_path):
    cfg = cfg_for(ds)
    with pytest.raises(FileNotFoundError, match="DataConfig.root: .*does not exist"):
        build_loader(cfg_for(tmp_path / "missing"), batch_size=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="split='train'.*does not exist"):
        build_loader(cfg_for(tmp_path / "empty"), batch_size=4)
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    (tmp_path / "noclass" / "train" / "a.JPEG").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(ValueError, match="no class folders"):
        build_loader(cfg_for(tmp_path / "noclass"), batch_size=4)
    (tmp_path / "noimg" / "train" / "dog").mkdir(parents=True)
    (tmp_path / "noimg" / "train" / "dog" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="hold no image files"):
        build_loader(cfg_for(tmp_path / "noimg"), batch_size=4)
    with pytest.raises(ValueError, match="no .tar shards"):
        build_loader(cfg_for(ds, format="wds"), batch_size=4)
    for kw, match in [
        (dict(batch_size=0), "batch_size must be"),
        (dict(batch_size=4, rank=2, world_size=2), "rank must be"),
        (dict(batch_size=4, rank=-1), "rank must be"),
        (dict(batch_size=4, world_size=0), "world_size must be"),
        (dict(batch_size=25, world_size=2), r"batch_size \* world_size = 25 \* 2 = 50 exceeds the 48 samples"),
        (dict(batch_size=1, split="val", rank=0, world_size=17), "world_size = 17 exceeds the 16 samples"),
        (dict(batch_size=4, split="test"), "split='test'"),
        (dict(batch_size=4, mode="shuffle"), "mode must be"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            build_loader(cfg, **kw)
    with pytest.raises(ValueError, match="decode='mixed'.*device_id"):
        build_loader(cfg_for(ds, decode="mixed"), batch_size=4)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device_id=0"):
            build_loader(cfg, batch_size=4, device_id=0)
    # eval pads instead of refusing: 16 samples, 3 ranks of 8 -> 1 batch each, 8 padding slots in all
    assert len(build_loader(cfg, batch_size=8, split="val", rank=2, world_size=3)) == 1
    assert os.path.isdir(wds_root)

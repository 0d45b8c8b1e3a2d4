"""mimfast.data fine-tuning augmentations in the DALI train pipeline: RandAugment (timm ``rand-m9-mstd0.5-inc1``) and
random erasing (timm ``RandomErasing``), on the CPU pipeline (``device_id=None``) over a tiny generated dataset.

Oracles: the plain train graph rebuilt here by hand (augmentations off must be it, bit for bit), Pillow for each
RandAugment operation at a given magnitude (timm's level -> parameter maps written out independently), and the same
pipeline with erasing off (erasing may change one axis-aligned rectangle per image and nothing else).
"""

from __future__ import annotations

import importlib.util
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from mimfast.data import DataConfig, build_loader, denormalize, list_folder_split, make_builtin_dataset

HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
pytestmark = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")

NC, NTRAIN, NVAL, SIZE = 4, 12, 4, (56, 44)  # 48 train, 16 val samples (as tests/test_data.py)
NEW_FIELDS = ("rand_n", "rand_m", "rand_mstd", "reprob", "remode")
MAE_FT = dict(rand_n=2, rand_m=9.0, rand_mstd=0.5, reprob=0.25, remode="pixel")
RESUME = dict(MAE_FT, reprob=0.5)  # more erasing draws that matter
EXACT_OPS = ("Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd")
WARP_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_builtin_dataset(tmp_path_factory.mktemp("data") / "builtin", num_classes=NC, train_per_class=NTRAIN,
                                val_per_class=NVAL, size=SIZE, progress=False)  # fmt: skip


def cfg_for(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), **{"img_size": 32, "num_threads": 2, **kw})


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


# ------------------------------------------------------------------------------------------------ config
def test_config_fields_defaults_off():
    c = DataConfig()
    assert (c.rand_n, c.rand_m, c.rand_mstd, c.reprob, c.remode) == (0, 9.0, 0.5, 0.0, "pixel")
    c = DataConfig(rand_n=2, rand_m=9, rand_mstd=0, reprob=1, remode="const")
    assert isinstance(c.rand_m, float) and isinstance(c.rand_mstd, float) and isinstance(c.reprob, float)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(rand_n=-1), "DataConfig.rand_n"),
        (dict(rand_n=1.5), "DataConfig.rand_n"),
        (dict(rand_n=True), "DataConfig.rand_n"),
        (dict(rand_m=10.5), r"DataConfig.rand_m must be a number in \[0, 10\]"),
        (dict(rand_m=-1), "DataConfig.rand_m"),
        (dict(rand_m="9"), "DataConfig.rand_m"),
        (dict(rand_mstd=-0.5), "DataConfig.rand_mstd"),
        (dict(rand_mstd=math.inf), "DataConfig.rand_mstd"),
        (dict(reprob=1.25), r"DataConfig.reprob must be a number in \[0, 1\]"),
        (dict(reprob=math.nan), "DataConfig.reprob"),
        (dict(remode="rand"), "DataConfig.remode"),
        (dict(rand_n=2, tokenizer_size=16), "DataConfig.rand_n: .*tokenizer_size"),
        (dict(reprob=0.25, tokenizer_size=16), "DataConfig.reprob: .*tokenizer_size"),
    ],
)
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kw)


# ------------------------------------------------------------------------------------------------ off = plain
def test_defaults_are_the_plain_train_graph(ds):
    """Augmentations off: batches bit-identical to the pretraining graph (random crop, resize, flip, normalise)."""
    import nvidia.dali as dali
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    from mimfast.data.pipeline import _derive_seed

    cfg = cfg_for(ds, rand_m=3.0, rand_mstd=0.0, remode="const")  # parameters of disabled augmentations: ignored
    got = list(build_loader(cfg, batch_size=8, return_index=True))
    _, files, labels = list_folder_split(ds / "train")
    order = cat(got, "index").tolist()  # the epoch's file order, as the loader read it

    def graph():
        jpegs, lab = fn.readers.file(name="reader", files=[files[i] for i in order], labels=[labels[i] for i in order],
                                     random_shuffle=False)  # fmt: skip
        crop = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, random_area=[0.2, 1.0],
                                             random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)  # fmt: skip
        img = fn.resize(crop, resize_x=32, resize_y=32, interp_type=types.INTERP_CUBIC, antialias=True)
        mirror = fn.random.coin_flip(probability=0.5)
        out = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                       mean=[255 * m for m in cfg.mean], std=[255 * s for s in cfg.std])  # fmt: skip
        return out, lab

    pipe = dali.pipeline_def(graph, batch_size=8, num_threads=1, device_id=None, seed=_derive_seed(0, 0, 0, 1))()
    pipe.build()
    for b in got:
        out, lab = pipe.run()
        assert torch.equal(b.images, torch.from_numpy(out.as_array()))
        assert b.labels.tolist() == lab.as_array().ravel().tolist()
    # explicitly off (reprob 0, rand_n 0) with other knobs changed: still the same batches
    off = list(build_loader(cfg_for(ds, reprob=0.0, rand_n=0, rand_mstd=2.0), batch_size=8, return_index=True))
    assert same_batches(off, got)


# ------------------------------------------------------------------------------------------------ RandAugment
def _pil_ops(fill: int) -> dict:
    """timm's inc1 operations in Pillow (bilinear, grey fill), from the level -> parameter maps of timm's docs."""
    bil = Image.Resampling.BILINEAR

    def affine(im, data):
        return im.transform(im.size, Image.Transform.AFFINE, data, bil, fillcolor=(fill,) * 3)

    def enhance(cls):
        return lambda im, lv, s: cls(im).enhance(1 + 0.09 * lv * s)

    lut_add = lambda add: [min(255, i + add) if i < 128 else i for i in range(256)] * 3  # noqa: E731
    return {
        "AutoContrast": lambda im, lv, s: ImageOps.autocontrast(im),
        "Invert": lambda im, lv, s: ImageOps.invert(im),
        "Rotate": lambda im, lv, s: im.rotate(3 * lv * s, bil, fillcolor=(fill,) * 3),
        "PosterizeIncreasing": lambda im, lv, s: ImageOps.posterize(im, max(1, 4 - int(lv / 10 * 4))),
        "SolarizeIncreasing": lambda im, lv, s: ImageOps.solarize(im, 256 - int(lv / 10 * 256)),
        "SolarizeAdd": lambda im, lv, s: im.point(lut_add(int(lv / 10 * 110))),
        "ColorIncreasing": enhance(ImageEnhance.Color),
        "ContrastIncreasing": enhance(ImageEnhance.Contrast),
        "BrightnessIncreasing": enhance(ImageEnhance.Brightness),
        "ShearX": lambda im, lv, s: affine(im, (1, 0.03 * lv * s, 0, 0, 1, 0)),
        "ShearY": lambda im, lv, s: affine(im, (1, 0, 0, 0.03 * lv * s, 1, 0)),
        "TranslateXRel": lambda im, lv, s: affine(im, (1, 0, 0.045 * lv * s * im.size[0], 0, 1, 0)),
        "TranslateYRel": lambda im, lv, s: affine(im, (1, 0, 0, 0, 1, 0.045 * lv * s * im.size[1])),
    }


def test_randaugment_ops_match_pillow(ds):
    """Each operation at fixed magnitudes against Pillow (either sign: timm negates at random)."""
    import nvidia.dali as dali
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    from mimfast.data.augment import RA_OPS, _ops

    s, fill = 48, 115
    _, files, _ = list_folder_split(ds / "train")
    imgs = [np.asarray(Image.open(f).convert("RGB").resize((s, s), Image.Resampling.BICUBIC)) for f in files[::7]]
    b = len(imgs)
    ref_ops = _pil_ops(fill)
    assert len(_ops(fill, s, False)) == len(RA_OPS) + 1 and set(ref_ops) <= set(RA_OPS)

    def run(i: int, level: float, sign: float) -> list[np.ndarray]:
        def graph():
            x = fn.external_source(source=lambda: imgs, batch=True, layout="HWC", dtype=types.UINT8)
            lv = fn.external_source(source=lambda: [np.float32(level)] * b, batch=True)
            sg = fn.external_source(source=lambda: [np.float32(sign)] * b, batch=True)
            return _ops(fill, s, False)[i](x, lv, sg)

        pipe = dali.pipeline_def(graph, batch_size=b, num_threads=1, device_id=None)()
        pipe.build()
        return [np.asarray(t).astype(np.float64) for t in pipe.run()[0]]

    def err(xs, ys):
        return float(np.mean([np.abs(x - np.asarray(y, np.float64)).mean() for x, y in zip(xs, ys, strict=True)]))

    for i, name in enumerate(RA_OPS):
        for level in (4.4, 9.0, 10.0):
            ours = run(i, level, -1.0)
            moved = err(ours, imgs)  # how much the operation changed the images
            if name == "Equalize":  # DALI follows OpenCV's histogram formula, Pillow its own
                assert 0 < err(ours, [ImageOps.equalize(Image.fromarray(x)) for x in imgs]) < 0.2 * moved
                continue
            if name == "SharpnessIncreasing":  # Pillow leaves a 1-pixel border unfiltered: compare the inside
                for sign in (-1.0, 1.0):
                    ours_s = run(i, level, sign)
                    ref = [np.asarray(ImageEnhance.Sharpness(Image.fromarray(x)).enhance(1 + 0.09 * level * sign))
                           for x in imgs]  # fmt: skip
                    inner = err([o[1:-1, 1:-1] for o in ours_s], [r[1:-1, 1:-1] for r in ref])
                    assert inner < 0.6 and err(ours_s, imgs) > 2 * inner, (level, sign, inner)
                continue
            e = min(err(ours, [ref_ops[name](Image.fromarray(x), level, sg) for x in imgs]) for sg in (1, -1))
            # lookup-table operations are exact; blends round differently; warps interpolate a little differently
            tol = 0.0 if name in EXACT_OPS else 1.5 if name in WARP_OPS else 1.0
            assert e <= tol and (moved > 5 * e or name == "AutoContrast"), (name, level, e, moved)


def test_randaugment_in_the_loader(ds):
    plain = list(build_loader(cfg_for(ds), batch_size=8, return_index=True))
    cfg = cfg_for(ds, rand_n=2)
    loader = build_loader(cfg, batch_size=8, return_index=True)
    e0, e1 = list(loader), list(loader)
    assert len(e0) == len(plain) == 6
    assert torch.equal(cat(e0, "index"), cat(plain, "index")) and torch.equal(cat(e0, "labels"), cat(plain, "labels"))
    x, p = cat(e0, "images"), cat(plain, "images")
    assert x.shape == p.shape == (48, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    px = denormalize(x, cfg)
    assert px.min() >= -1e-5 and px.max() <= 1 + 1e-5  # uint8 images, normalised: still pixels in [0, 1]
    changed = (x - p).abs().flatten(1).mean(1) > 1e-3
    assert changed.float().mean() > 0.75  # same crops, most images visibly transformed
    assert not torch.equal(cat(e0, "images"), cat(e1, "images"))
    again = build_loader(cfg, batch_size=8, return_index=True)
    assert same_batches(list(again), e0) and same_batches(list(again), e1)  # same seed: same epochs


def test_randaugment_probability_half(ds):
    """n=1, m=0, mstd=0: at level 0 only AutoContrast (a no-op on full-range images), Equalize, Invert and
    PosterizeIncreasing (4 bits) change an image visibly, and half the draws are "not applied": 10-13% change."""
    cfg_plain, cfg = cfg_for(ds, hflip=False), cfg_for(ds, hflip=False, rand_n=1, rand_m=0.0, rand_mstd=0.0)
    p, x = [], []
    for e in range(4):
        for c, out in ((cfg_plain, p), (cfg, x)):
            ld = build_loader(c, batch_size=8)
            ld.set_epoch(e)
            out.append(cat(list(ld), "images"))
    d = (denormalize(torch.cat(x), cfg) - denormalize(torch.cat(p), cfg)).abs().flatten(1).mean(1) * 255
    big = (d > 3).float().mean().item()  # (every operation applied: 20-27%)
    assert 0.05 < big < 0.2, big


# ------------------------------------------------------------------------------------------------ random erasing
def _boxes(x: torch.Tensor, ref: torch.Tensor):
    """Per image: the (top, left, h, w) bounding box of the pixels that differ, and whether they fill it exactly."""
    out = []
    for a, b in zip(x, ref, strict=True):
        d = (a != b).any(0)
        if not d.any():
            out.append(None)
            continue
        rows, cols = d.any(1).nonzero().ravel(), d.any(0).nonzero().ravel()
        top, left = int(rows[0]), int(cols[0])
        h, w = int(rows[-1]) - top + 1, int(cols[-1]) - left + 1
        out.append((top, left, h, w, bool(d[top : top + h, left : left + w].all()) and int(d.sum()) == h * w))
    return out


@pytest.mark.parametrize("mode", ["pixel", "const"])
def test_random_erasing_one_box(ds, mode):
    s = 32
    ref_loader, loader = build_loader(cfg_for(ds), batch_size=8), build_loader(cfg_for(ds, reprob=1.0, remode=mode),
                                                                               batch_size=8)  # fmt: skip
    ref = torch.cat([cat(list(ref_loader), "images") for _ in range(2)])
    x = torch.cat([cat(list(loader), "images") for _ in range(2)])
    assert torch.isfinite(x).all()
    inside, area, log_ratio = [], [], []
    for img, box in zip(x, _boxes(x, ref), strict=True):
        assert box is not None  # probability 1: every image has a rectangle
        top, left, h, w, full = box
        assert full, box  # the differing pixels are exactly one axis-aligned rectangle
        assert h < s and w < s and top + h <= s and left + w <= s
        slack = 0.5 * (h + w) + 0.25  # side lengths are rounded
        assert 0.02 * s * s - slack <= h * w <= s * s / 3 + slack, box
        assert (h + 0.5) / max(w - 0.5, 1e-9) >= 0.3 and (h - 0.5) / (w + 0.5) <= 1 / 0.3, box
        inside.append(img[:, top : top + h, left : left + w].ravel())
        area.append(h * w / s**2)
        log_ratio.append(math.log(h / w))
    # the spread of U(0.02, 1/3) areas and log-uniform ratios in [0.3, 3.3] over 96 boxes
    assert 0.12 < np.mean(area) < 0.23 and min(area) < 0.06 and max(area) > 0.28, (np.mean(area), min(area), max(area))
    assert min(log_ratio) < -0.8 and max(log_ratio) > 0.8, (min(log_ratio), max(log_ratio))
    inside = torch.cat(inside)
    if mode == "const":
        assert (inside == 0).all()
    else:  # per-pixel N(0, 1) in the normalised space
        assert inside.numel() > 5000 and abs(inside.mean()) < 0.05 and 0.95 < inside.std() < 1.05
        assert (inside == 0).float().mean() < 1e-3
    # reprob 0.25: about a quarter of the images get a rectangle; the others are untouched
    part = torch.cat([cat(list(build_loader(cfg_for(ds, reprob=0.25), batch_size=8)), "images")])
    n = sum(b is not None for b in _boxes(part, ref[:48]))
    assert 3 <= n <= 22, n


# ------------------------------------------------------------------------------------------------ exact resume
def test_exact_resume_with_augmentations(ds):
    cfg = cfg_for(ds, **RESUME)
    kw = dict(batch_size=8, return_index=True)
    ref_loader = build_loader(cfg, **kw)
    nb = len(ref_loader)
    ref = list(ref_loader) + list(ref_loader)
    assert not same_batches(ref[:nb], ref[nb:])
    for k in (2, nb + 1):  # mid epoch 0, mid epoch 1
        first = build_loader(cfg, **kw)
        got = []
        while len(got) < k:
            for b in first:
                got.append(b)
                if len(got) == k:
                    break
        state = pickle.loads(pickle.dumps(first.state_dict()))
        assert state["dali_checkpoint"] is not None and state["fingerprint"]["rand_n"] == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # DALI accepts the checkpoint: no replay fallback
            resumed = build_loader(cfg_for(ds, **RESUME, num_threads=1, prefetch=3), state=state, **kw)
            while len(got) < 2 * nb:
                got += list(resumed)
        assert same_batches(got, ref), k
    # without DALI's checkpoint: the epoch is replayed from its derived seed, equally exact
    first = build_loader(cfg, **kw)
    it = iter(first)
    head = [next(it), next(it), next(it)]
    state = first.state_dict()
    state["dali_checkpoint"] = None
    assert same_batches(head + list(build_loader(cfg, state=state, **kw)), ref[:nb])


def test_states_before_the_new_fields_still_resume(ds):
    """A loader state written before rand_* / reprob / remode existed lacks their keys: it resumes while they hold
    their defaults, and is refused (naming the field) when they do not."""
    kw = dict(batch_size=8)
    ref = list(build_loader(cfg_for(ds), **kw))
    first = build_loader(cfg_for(ds), **kw)
    it = iter(first)
    head = [next(it), next(it)]
    state = first.state_dict()
    assert set(NEW_FIELDS) <= set(state["fingerprint"])
    for key in NEW_FIELDS:
        del state["fingerprint"][key]
    assert same_batches(head + list(build_loader(cfg_for(ds), state=state, **kw)), ref)
    with pytest.raises(ValueError, match="rand_n: saved 0 vs now 2"):
        build_loader(cfg_for(ds, rand_n=2), state=state, **kw)
    with pytest.raises(ValueError, match="reprob: saved 0.0 vs now 0.25"):
        build_loader(cfg_for(ds, reprob=0.25), state=state, **kw)
    # and a state of an augmented run is refused by a plain loader
    aug = build_loader(cfg_for(ds, rand_n=2), **kw)
    next(iter(aug))
    with pytest.raises(ValueError, match="rand_n: saved 2 vs now 0"):
        build_loader(cfg_for(ds), state=aug.state_dict(), **kw)


# ------------------------------------------------------------------------------------------------ eval, GPU
def test_eval_is_unaffected(ds):
    plain = list(build_loader(cfg_for(ds), batch_size=4, split="val", return_index=True))
    aug = list(build_loader(cfg_for(ds, **dict(MAE_FT, reprob=1.0)), batch_size=4, split="val", return_index=True))
    assert same_batches(aug, plain)
    on_train = build_loader(cfg_for(ds, **MAE_FT), batch_size=8, mode="eval")
    assert same_batches(list(on_train), list(build_loader(cfg_for(ds), batch_size=8, mode="eval")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (DALI GPU operators)")
def test_gpu_augmentations_and_exact_resume(ds):
    cfg = cfg_for(ds, **RESUME)
    kw = dict(batch_size=8, return_index=True, device_id=0)
    ref_loader = build_loader(cfg, **kw)
    ref = list(ref_loader) + list(ref_loader)
    x = cat(ref, "images")
    assert x.device.type == "cuda" and x.shape == (96, 3, 32, 32) and torch.isfinite(x).all()
    first = build_loader(cfg, **kw)
    it = iter(first)
    got = [next(it), next(it), next(it)]
    resumed = build_loader(cfg, state=pickle.loads(pickle.dumps(first.state_dict())), **kw)
    got += list(resumed) + list(resumed)
    assert same_batches(got, ref)
    plain = cat(list(build_loader(cfg_for(ds, reprob=1.0, remode="const"), **kw)), "images")
    boxes = _boxes(plain, cat(list(build_loader(cfg_for(ds), **kw)), "images"))
    assert all(b is not None and b[4] for b in boxes)

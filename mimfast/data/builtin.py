"""A built-in image-classification dataset, drawn procedurally: no download, real JPEG files, ImageNet folder layout.

:func:`make_builtin_dataset` writes ``root/{train,val}/<class_name>/<nnnnn>.JPEG``. Each class is a shape or a
pattern (circle, square, triangle, cross, ring, horizontal / vertical stripes, checkerboard, star, diamond) drawn with
a random colour, size, position and rotation on a tinted gradient background with clutter and sensor-like noise, then
JPEG-encoded at a random quality. A learned encoder separates the classes far better than a random one, but pixel
statistics alone (colour, brightness) carry no label information, so the task is not trivial.

Every image is drawn from its own generator seeded by ``(seed, split, class, n)``: the files are byte-identical
across builds (same Pillow / libjpeg), across ``num_classes`` (class c is the same images whether 4 or 10 classes are
built) and across ``workers``.

Builds are atomic and idempotent: the tree is written into a temporary directory beside ``root``, ``MANIFEST.json``
(parameters, counts, version) is written last, then the directory is renamed onto ``root``. A complete tree with the
same parameters is reused; a tree without a manifest (a crashed build from elsewhere, a user directory) or with
different parameters is an error unless ``force=True``. Concurrent builders (every rank of a job on first use) are
serialised by a lock file beside ``root``.

:func:`make_webdataset_shards` packs a folder split into webdataset tars (``<key>.jpg`` + ``<key>.cls``) with DALI
index files, so the webdataset reader path can be exercised on the same images.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import shutil
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "BUILTIN_CLASSES",
    "BUILTIN_VERSION",
    "IMAGE_EXTENSIONS",
    "default_builtin_root",
    "make_builtin_dataset",
    "make_webdataset_shards",
]

BUILTIN_VERSION = 1
BUILTIN_CLASSES = ("circle", "square", "triangle", "cross", "ring", "stripes_h", "stripes_v", "checker", "star",
                   "diamond")  # fmt: skip
MANIFEST = "MANIFEST.json"
# Extensions the folder reader and the validator treat as images (DALI's default image filters), lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pnm", ".ppm", ".pgm", ".pbm", ".jp2", ".webp")
_SPLIT_CODE = {"train": 0, "val": 1}
_TMP_MARK = ".tmp-"


def default_builtin_root() -> Path:
    """``$MIMFAST_DATA_DIR`` if set, else ``~/.cache/mimfast/builtin-v1``."""
    env = os.environ.get("MIMFAST_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mimfast" / f"builtin-v{BUILTIN_VERSION}"


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[mimfast.data] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ drawing
def _rot(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def _polygon(pts: np.ndarray, centre: tuple[float, float], theta: float) -> list[tuple[float, float]]:
    """``pts`` (P, 2) around the origin, rotated by ``theta`` and moved to ``centre``."""
    q = pts @ _rot(theta).T + np.asarray(centre)
    return [tuple(p) for p in q.tolist()]


def _star(r: float, points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = np.arange(2 * points) * math.pi / points - math.pi / 2
    rad = np.where(np.arange(2 * points) % 2 == 0, r, r * inner)
    return np.stack([rad * np.cos(a), rad * np.sin(a)], 1)


def _pil():
    """Pillow, imported on first use so that ``import mimfast.data`` needs neither Pillow nor DALI."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as e:  # pragma: no cover - exercised only without Pillow
        raise ImportError("the built-in dataset needs Pillow to write JPEGs: pip install pillow") from e
    return Image, ImageDraw


def _shape_mask(cls: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (h, w) mask of one class instance: random centre, size and rotation (limited where a rotation would
    turn one class into another, e.g. a square at 45 degrees is a diamond, horizontal stripes at 90 are vertical)."""
    m = min(w, h)
    cx, cy = rng.uniform(0.28, 0.72) * w, rng.uniform(0.28, 0.72) * h
    r = rng.uniform(0.15, 0.34) * m
    deg = math.radians
    if cls in ("stripes_h", "stripes_v", "checker"):
        theta = deg(rng.uniform(-15, 15)) + (math.pi / 2 if cls == "stripes_v" else 0.0)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)  # along the stripes
        v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)  # across the stripes
        half_u, half_v = r * rng.uniform(1.0, 1.3), r * rng.uniform(0.8, 1.1)
        region = (np.abs(u) <= half_u) & (np.abs(v) <= half_v)
        period = max(3.0, r * rng.uniform(0.3, 0.5))
        phase = rng.uniform(0, period)
        if cls == "checker":
            pattern = (np.floor((u + phase) / period) + np.floor((v + phase) / period)) % 2 == 0
        else:
            pattern = ((v + phase) % period) < period / 2
        return region & pattern
    Image, ImageDraw = _pil()
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    if cls == "circle":
        rx, ry = r * rng.uniform(0.9, 1.1), r * rng.uniform(0.9, 1.1)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    elif cls == "ring":
        rx, ry = r * rng.uniform(0.9, 1.1), r * rng.uniform(0.9, 1.1)
        k = rng.uniform(0.5, 0.68)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        draw.ellipse([cx - k * rx, cy - k * ry, cx + k * rx, cy + k * ry], fill=0)
    elif cls == "square":
        s = r * 0.85
        pts = np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
        draw.polygon(_polygon(pts, (cx, cy), deg(rng.uniform(-20, 20))), fill=255)
    elif cls == "diamond":
        a, b = r * rng.uniform(0.5, 0.65), r * rng.uniform(1.05, 1.25)  # tall rhombus, never square
        pts = np.array([[0, -b], [a, 0], [0, b], [-a, 0]])
        draw.polygon(_polygon(pts, (cx, cy), deg(rng.uniform(-20, 20))), fill=255)
    elif cls == "triangle":
        a = np.arange(3) * 2 * math.pi / 3 - math.pi / 2
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
        draw.polygon(_polygon(pts, (cx, cy), deg(rng.uniform(0, 360))), fill=255)
    elif cls == "star":
        draw.polygon(_polygon(_star(r * 1.1), (cx, cy), deg(rng.uniform(0, 360))), fill=255)
    elif cls == "cross":
        t = r * rng.uniform(0.28, 0.38)
        theta = deg(rng.uniform(-25, 25))
        for pts in (np.array([[-r, -t], [r, -t], [r, t], [-r, t]]), np.array([[-t, -r], [t, -r], [t, r], [-t, r]])):
            draw.polygon(_polygon(pts, (cx, cy), theta), fill=255)
    else:  # pragma: no cover - guarded by BUILTIN_CLASSES
        raise AssertionError(cls)
    return np.asarray(img) > 127


def _colour(rng: np.random.Generator, avoid: np.ndarray | None = None, min_dist: float = 90.0) -> np.ndarray:
    """A random RGB colour, at least ``min_dist`` (Euclidean, 0..255 units) away from ``avoid`` when given."""
    for _ in range(32):
        c = rng.uniform(0, 255, 3)
        if avoid is None or np.linalg.norm(c - avoid) >= min_dist:
            return c
    return 255.0 - avoid  # the complement is always far enough


def _draw_image(cls: str, size: tuple[int, int], rng: np.random.Generator):
    """One (w, h) RGB PIL image of class ``cls``; small images are drawn at 2x and downsampled (antialiased edges)."""
    Image, ImageDraw = _pil()
    w0, h0 = size
    ss = 2 if max(w0, h0) <= 160 else 1
    w, h = w0 * ss, h0 * ss
    # background: a tinted linear gradient between two colours
    c1 = _colour(rng)
    c2 = np.clip(c1 + rng.normal(0, 40, 3), 0, 255)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = ((xx / w - 0.5) * math.cos(theta) + (yy / h - 0.5) * math.sin(theta) + 0.75) / 1.5
    img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    fg = _colour(rng, avoid=(c1 + c2) / 2)
    img[_shape_mask(cls, w, h, rng)] = fg
    # clutter: a few small blobs and strokes in random colours, never large enough to read as a class
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    m = min(w, h)
    for _ in range(int(rng.integers(0, 4))):
        col = tuple(int(v) for v in _colour(rng))
        x, y, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.08) * m
        if rng.uniform() < 0.5:
            draw.ellipse([x - s, y - s * rng.uniform(0.5, 1), x + s, y + s], fill=col)
        else:
            a = rng.uniform(0, 2 * math.pi)
            draw.line([x, y, x + 2.5 * s * math.cos(a), y + 2.5 * s * math.sin(a)], fill=col, width=max(1, int(s / 3)))
    if ss > 1:
        pil = pil.resize((w0, h0), Image.Resampling.LANCZOS)
    arr = np.asarray(pil).astype(np.float32) + rng.normal(0, rng.uniform(2, 16), (h0, w0, 3)).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def _render(job: tuple[int, str, int, str, int, tuple[int, int], str]) -> None:
    seed, split, ci, cls, n, size, path = job
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], ci, n])
    img = _draw_image(cls, size, rng)
    img.save(path, format="JPEG", quality=int(rng.integers(75, 96)))


# ------------------------------------------------------------------------------------------------ build
def _params(num_classes: int, train_per_class: int, val_per_class: int, size: tuple[int, int], seed: int) -> dict:
    return dict(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
                size=list(size), seed=seed)  # fmt: skip


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _complete_and_matching(root: Path, params: dict) -> tuple[bool, str]:
    """(ok, why not): a manifest with these params and version, and the file counts it promises."""
    man = _read_manifest(root)
    if man is None:
        return False, f"{root} exists but has no readable {MANIFEST} (an incomplete build or another directory)"
    if man.get("version") != BUILTIN_VERSION or man.get("params") != params:
        return False, (f"{root} holds a built-in dataset with other parameters: {man.get('params')} "
                       f"(version {man.get('version')}), asked for {params} (version {BUILTIN_VERSION})")  # fmt: skip
    for split, per in (("train", params["train_per_class"]), ("val", params["val_per_class"])):
        for cls in man["classes"]:
            d = root / split / cls
            n = len(list(d.glob("*.JPEG"))) if d.is_dir() else 0
            if n != per:
                return False, f"{d} has {n} images, its manifest promises {per}"
    return True, ""


def _remove_stale_tmp(parent: Path, name: str) -> None:
    """Temporary build directories of builders that are no longer running (crashed mid-build)."""
    for p in parent.glob(f".{name}{_TMP_MARK}*"):
        try:
            pid = int(p.name.split(_TMP_MARK, 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
            continue  # that builder is alive
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _locked(parent: Path, name: str) -> Iterator[None]:
    with open(parent / f".{name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def make_builtin_dataset(
    root: str | os.PathLike | None = None,
    *,
    num_classes: int = 10,
    train_per_class: int = 200,
    val_per_class: int = 50,
    size: int | Sequence[int] = 64,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> Path:
    """Write (or reuse) the built-in dataset and return its root.

    Args:
        root: target directory; ``None`` means :func:`default_builtin_root`.
        num_classes: how many of :data:`BUILTIN_CLASSES` (the first ``num_classes``), 2..10.
        train_per_class, val_per_class: images per class in ``train/`` and ``val/`` (val may be 0).
        size: image size, an int (square) or ``(width, height)``, e.g. ``(500, 375)`` like a typical ImageNet JPEG.
        seed: base seed; the same seed gives byte-identical files.
        force: rebuild even if ``root`` exists (incomplete, other parameters, or complete).
        progress: print what happens (reuse, progress every ~10%, done).
        workers: processes drawing images (the output does not depend on it).

    Returns:
        ``root`` as a :class:`pathlib.Path`, holding ``train/``, ``val/`` and ``MANIFEST.json``.
    """
    _check_int("num_classes", num_classes, 2)
    if num_classes > len(BUILTIN_CLASSES):
        raise ValueError(f"num_classes must be <= {len(BUILTIN_CLASSES)} (the built-in classes), got {num_classes}")
    _check_int("train_per_class", train_per_class, 1)
    _check_int("val_per_class", val_per_class, 0)
    _check_int("seed", seed, 0)
    _check_int("workers", workers, 1)
    wh = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
    if len(wh) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 8 for v in wh):
        raise ValueError(f"size must be an int >= 8 or a (width, height) pair of ints >= 8, got {size!r}")
    root = Path(root).expanduser() if root is not None else default_builtin_root()
    root = root.absolute()
    params = _params(num_classes, train_per_class, val_per_class, wh, seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent, root.name):
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # an empty directory (made by hand) is as good as none
        if root.exists():
            ok, why = _complete_and_matching(root, params)
            if ok and not force:
                _log(f"reusing the built-in dataset at {root} ({params})", progress)
                return root
            if not force:
                raise FileExistsError(f"{why}; pass force=True to rebuild it (or choose another root)")
        _remove_stale_tmp(root.parent, root.name)
        tmp = root.parent / f".{root.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _build_into(tmp, params, wh, progress, workers)
            if root.exists():  # force: move the old tree aside, then swap (rename cannot replace a non-empty dir)
                trash = root.parent / f".{root.name}{_TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
                os.replace(root, trash)
                os.replace(tmp, root)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root


def _build_into(tmp: Path, params: dict, wh: tuple[int, int], progress: bool, workers: int) -> None:
    classes = list(BUILTIN_CLASSES[: params["num_classes"]])
    jobs = []
    for split, per in (("train", params["train_per_class"]), ("val", params["val_per_class"])):
        for ci, cls in enumerate(classes):
            d = tmp / split / cls
            d.mkdir(parents=True, exist_ok=True)
            jobs += [(params["seed"], split, ci, cls, n, wh, str(d / f"{n:05d}.JPEG")) for n in range(per)]
    total = len(jobs)
    _log(f"building the built-in dataset ({total} JPEGs of {wh[0]}x{wh[1]}, {len(classes)} classes) in {tmp}",
         progress)  # fmt: skip
    t0 = last = time.perf_counter()
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        ex = ProcessPoolExecutor(workers, mp_context=ctx)
        done = ex.map(_render, jobs, chunksize=16)
    else:
        ex, done = None, map(_render, jobs)
    try:
        for i, _ in enumerate(done, 1):
            if time.perf_counter() - last > 2.0:  # progress at most every 2 s
                last = time.perf_counter()
                _log(f"  {i}/{total} images ({last - t0:.1f} s)", progress)
    finally:
        if ex is not None:
            ex.shutdown(cancel_futures=True)
    counts = {"train": params["train_per_class"] * len(classes), "val": params["val_per_class"] * len(classes)}
    man = dict(version=BUILTIN_VERSION, generator="mimfast.data.builtin", params=params, classes=classes,
               counts=counts, created=time.strftime("%Y-%m-%dT%H:%M:%S"))  # fmt: skip
    # the manifest is written last and atomically: its presence means every image above is complete on disk
    (tmp / (MANIFEST + ".part")).write_text(json.dumps(man, indent=1))
    os.replace(tmp / (MANIFEST + ".part"), tmp / MANIFEST)
    _log(f"built {total} images in {time.perf_counter() - t0:.1f} s", progress)


# ------------------------------------------------------------------------------------------------ webdataset
def list_folder_split(split_dir: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """(class_names, files, labels) of a folder split ``split_dir/<class>/**/<image>``: classes sorted by name
    (label = position), files sorted within each class, only :data:`IMAGE_EXTENSIONS` (case-insensitive), hidden
    entries skipped. This order defines the global sample index everywhere in :mod:`mimfast.data`."""
    split_dir = Path(split_dir)
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    files: list[str] = []
    labels: list[int] = []
    for ci, cls in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(split_dir / cls):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.join(dirpath, f) for f in filenames
                      if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]  # fmt: skip
        found.sort()
        files += found
        labels += [ci] * len(found)
    return classes, files, labels


def _wds_ext(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if ext in ("jpeg", "jpg") else ext


def make_webdataset_shards(
    src_split_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    progress: bool = True,
) -> list[Path]:
    """Pack a folder split into webdataset tars ``out_dir/shard-NNNNNN.tar`` with DALI index files beside them.

    Sample ``i`` (the folder order of :func:`list_folder_split`) becomes ``{i:08d}.jpg`` (the image bytes unchanged;
    ``.png`` etc. keep their extension) and ``{i:08d}.cls`` (the label as ASCII decimal, the webdataset convention).
    ``out_dir/MANIFEST.json`` records the class names and counts. Each tar is written to a temporary name and renamed,
    the manifest last.

    Returns:
        the tar paths, in order.
    """
    _check_int("samples_per_shard", samples_per_shard, 1)
    src = Path(src_split_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"src_split_dir: {src} is not a directory")
    classes, files, labels = list_folder_split(src)
    if not files:
        raise ValueError(f"src_split_dir: {src} has no images in class folders (expected {src}/<class>/<image>)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    nshards = math.ceil(len(files) / samples_per_shard)
    for s in range(nshards):
        path = out / f"shard-{s:06d}.tar"
        part = out / f".{path.name}.part"
        lo, hi = s * samples_per_shard, min(len(files), (s + 1) * samples_per_shard)
        with tarfile.open(part, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(lo, hi):
                for name, data in ((f"{i:08d}.{_wds_ext(files[i])}", Path(files[i]).read_bytes()),
                                   (f"{i:08d}.cls", str(labels[i]).encode())):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tf.addfile(info, io.BytesIO(data))
        _write_wds_index(part, out / f".{path.stem}.idx.part")
        os.replace(part, path)
        os.replace(out / f".{path.stem}.idx.part", out / f"{path.stem}.idx")
        shards.append(path)
        if progress and (s % max(1, nshards // 10) == 0 or s == nshards - 1):
            _log(f"  wrote {path.name} ({hi}/{len(files)} samples)", progress)
    man = dict(format="wds", generator="mimfast.data.builtin", classes=classes, num_samples=len(files),
               shards=[p.name for p in shards], samples_per_shard=samples_per_shard)  # fmt: skip
    (out / (MANIFEST + ".part")).write_text(json.dumps(man, indent=1))
    os.replace(out / (MANIFEST + ".part"), out / MANIFEST)
    return shards


def _wds_key_ext(name: str) -> tuple[str, str]:
    """webdataset (and DALI) split a member name at the first dot of its basename: key, extension."""
    d, b = os.path.split(name)
    key, _, ext = b.partition(".")
    return os.path.join(d, key), ext


def _write_wds_index(tar_path: Path, idx_path: Path) -> None:
    """DALI's webdataset index (format v1.2): a header line, then one line per sample listing each component as
    ``ext data_offset size name``."""
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path, "r") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, ext = _wds_key_ext(m.name)
            comp = f"{ext} {m.offset_data} {m.size} {m.name}"
            if key == last_key:
                samples[-1].append(comp)
            else:
                samples.append([comp])
                last_key = key
    idx_path.write_text(f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples))

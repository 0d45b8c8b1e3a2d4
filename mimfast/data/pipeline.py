"""DALI input pipelines for masked image modeling: train (RandomResizedCrop + flip, optionally RandAugment and random
erasing for fine-tuning) and eval (resize + centre crop).

``build_loader(cfg, batch_size=..., split=..., rank=..., world_size=...)`` returns a :class:`MIMLoader`; iterating it
yields one epoch of :class:`Batch` es (normalised float32 CHW images, int64 labels, an optional second view of the
same crop at ``tokenizer_size`` for BEiT/CAE tokenizers, optional global sample indices, eval padding flags).

Design (what DALI gives us, and where we take control)
------------------------------------------------------
* **One DALI pipeline per epoch.** The epoch's sample order is computed here, in NumPy, from ``(seed, epoch)``: a full
  uniform permutation of the split, identical on every rank without communication. Rank ``r`` takes the positions
  ``k * world_size + r``. The folder reader gets exactly that list (``fn.readers.file(files=..., labels=...)``, no
  reader-side shuffling), so epoch boundaries, shard disjointness and the epoch length are exact by construction.
  DALI's own ``random_shuffle`` only shuffles inside a small buffer (1024 samples by default) and its shards rotate
  between epochs; on an ImageNet folder (files sorted by class) that gives batches of one or two classes. The
  pipeline's seed is derived from ``(seed, epoch, rank)``, so epoch ``e`` is reproducible from scratch.
* **Webdataset** tars cannot be read in an arbitrary order, so the wds path uses DALI's sharding of the concatenated
  tars (``shard_id = rank``, ``stick_to_shard``) with the tar order permuted per epoch from ``(seed, epoch)`` and
  DALI's buffer shuffle (``DataConfig.shuffle_buffer``) seeded per ``(seed, epoch, rank)``: ranks are disjoint and
  a rank's shard changes every epoch, but the mixing is only as global as the buffer (DALI 2.4 drew no sample twice
  within an epoch in our tests). The eval split reads in order and is exact.
* **Last batch.** Train: ``len(loader) = N // (batch_size * world_size)`` on every rank; the ragged tail is dropped
  (a different tail each epoch, since the order is reshuffled). Eval: ``len(loader) = ceil(N / (batch_size *
  world_size))``; every sample appears exactly once across ranks, the remaining slots repeat a real image and carry
  ``valid = False`` so metrics can ignore them.
* **Exact resume.** ``state_dict()`` holds ``(epoch, step)`` and, mid-epoch, DALI's pipeline checkpoint
  (``Pipeline(enable_checkpointing=True)``, ``pipe.checkpoint()``): the reader position and the state of every random
  operator (crop, flip, and the draws of RandAugment and random erasing, which are DALI random operators too; the
  per-sample dispatch of RandAugment is stateless DALI conditionals). Facts checked on DALI 2.4: the checkpoint
  reflects the batches *returned* to the caller, not the ones prefetched (``prefetch_queue_depth`` does not matter),
  and CPU outputs do not depend on ``num_threads``. Restoring gives bit-identical batches. When a checkpoint cannot
  be used (absent, written by another DALI version, rejected) the epoch's pipeline is rebuilt from its derived seed
  and ``step`` batches are replayed and discarded: slower, equally exact. At an epoch boundary nothing but the epoch
  number is needed. A state saved before a :class:`DataConfig` field existed resumes while that field is default.
* **Fine-tuning augmentations** (train only, off by default: the graph is then exactly the pretraining one).
  ``DataConfig.rand_n`` > 0 runs timm's RandAugment (``rand-m9-mstd0.5-inc1`` for MAE / BEiT fine-tuning) on the
  uint8 crop after the resize, before normalisation; ``DataConfig.reprob`` > 0 erases one random rectangle per image
  after normalisation (timm's ``RandomErasing``). Both are DALI operators (GPU ones when ``device_id`` is set); see
  :mod:`mimfast.data.augment` for the exact semantics and the differences from timm.
* **Decode.** ``decoders.image_random_crop`` decodes only the crop window (fused ROI decode) for train; eval decodes
  the full image. With ``device_id`` the JPEG decode is DALI's ``mixed`` (nvJPEG / hardware decoder) and every output
  lives on that GPU; with ``device_id=None`` the same graph runs on the CPU (CI).

A file DALI cannot decode aborts the pipeline mid-epoch: run :func:`mimfast.data.validate_dataset` first. When it
happens anyway, the loader finds the file among the batch that failed and the ones DALI had prefetched (folder
format: the exact file list of the epoch is known) and raises :class:`UndecodableImageError` naming it.

Errors about the dataset or the loader's arguments are :class:`DataError` s whose ``key`` names the
:class:`DataConfig` field or :func:`build_loader` argument at fault, so a launcher can name its own config key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .augment import RA_LEVEL_MAX, REMODES, rand_augment, random_erasing
from .builtin import MANIFEST, _wds_key_ext, default_builtin_root, list_folder_split, make_builtin_dataset
from .errors import DataError, DataPathError, DataValueError, UndecodableImageError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Batch",
    "DataConfig",
    "DataError",
    "DataPathError",
    "DataValueError",
    "MIMLoader",
    "UndecodableImageError",
    "build_loader",
    "denormalize",
]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMATS = ("folder", "wds")
INTERPS = {"nearest": "INTERP_NN", "linear": "INTERP_LINEAR", "cubic": "INTERP_CUBIC", "lanczos": "INTERP_LANCZOS3",
           "triangular": "INTERP_TRIANGULAR"}  # fmt: skip
DECODES = ("auto", "cpu", "mixed")
MODES = ("train", "eval")
STATE_VERSION = 1
_WDS_IMAGE_EXT = "jpg;jpeg;png;webp"
# nvJPEG scratch sizes from DALI's ImageNet examples: allocate once instead of growing during the first epoch
_MIXED_DECODER_KW = dict(device_memory_padding=211025920, host_memory_padding=140544512)


def _dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as e:  # pragma: no cover - exercised only without DALI
        raise ImportError(
            "mimfast.data pipelines need NVIDIA DALI: pip install nvidia-dali-cuda130 (or pip install 'mimfast[dali]')"
        ) from e
    return dali, fn, types, feed_ndarray


# ------------------------------------------------------------------------------------------------ config
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _pair(name: str, v, lo: float, hi: float | None) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"DataConfig.{name} must be a pair (low, high) of numbers, got {v!r}") from None
    if not (lo < a <= b) or (hi is not None and b > hi) or not math.isfinite(b):
        bound = f"{lo} < low <= high" + (f" <= {hi}" if hi is not None else "")
        raise ValueError(f"DataConfig.{name} must satisfy {bound}, got {v!r}")
    return a, b


def _triple(name: str, v, positive: bool) -> tuple[float, float, float]:
    try:
        t = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"DataConfig.{name} must be 3 numbers (R, G, B) in [0, 1] units, got {v!r}") from None
    if len(t) != 3 or not all(math.isfinite(x) for x in t) or (positive and min(t) <= 0):
        what = "3 positive numbers" if positive else "3 finite numbers"
        raise ValueError(f"DataConfig.{name} must be {what} (R, G, B) in [0, 1] units, got {v!r}")
    return t


def _number(name: str, v, lo: float, hi: float, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not lo <= v <= hi or not math.isfinite(v):
        raise ValueError(f"DataConfig.{name} must be a number {what}, got {v!r}")
    return float(v)


@dataclass
class DataConfig:
    """What to read and how to augment it. Every field is validated on construction (errors name the field)."""

    root: str = "builtin"
    """Dataset root holding ``train/`` and ``val/``; ``"builtin"`` means the built-in procedural dataset at
    :func:`mimfast.data.default_builtin_root` (generated on first use). Folder format: ``root/<split>/<class>/<img>``
    (ImageNet layout, classes sorted by name). wds format: ``root/<split>/*.tar`` (``.jpg`` + ``.cls`` per sample)."""
    format: str = "folder"
    """``"folder"`` (class sub-directories of image files) or ``"wds"`` (webdataset tar shards)."""
    img_size: int = 224
    """Output side in pixels of the main view (square)."""
    tokenizer_size: int | None = None
    """If set, also yield ``images_small``: the same crop (same flip) resized to this side, e.g. 112 for BEiT / CAE
    visual tokenizers. Normalised with ``mean`` / ``std`` like the main view (see :func:`denormalize`)."""
    scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range, a fraction of the image area (MAE: 0.2-1.0)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio (width / height) range."""
    hflip: bool = True
    """Random horizontal flip with probability 0.5 (train only)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted after scaling pixels to [0, 1]."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation divided by after subtracting ``mean``."""
    num_threads: int = 4
    """DALI CPU worker threads per pipeline (per rank). Outputs do not depend on it."""
    prefetch: int = 2
    """DALI prefetch queue depth (batches prepared ahead). Outputs and checkpoints do not depend on it."""
    seed: int = 0
    """Base seed: the epoch order comes from ``(seed, epoch)``, augmentations from ``(seed, epoch, rank)``."""
    interp: str = "cubic"
    """Resize filter for the main view: ``"cubic"`` (MAE's bicubic), ``"linear"``, ``"lanczos"``, ``"triangular"``,
    ``"nearest"``. Always antialiased when downscaling."""
    tokenizer_interp: str = "lanczos"
    """Resize filter for the tokenizer view (BEiT resizes it with Lanczos)."""
    crop_pct: float = 0.875
    """Eval: resize the shorter side to ``floor(img_size / crop_pct)`` (256 for 224), then centre-crop ``img_size``."""
    decode: str = "auto"
    """JPEG decode: ``"cpu"``, ``"mixed"`` (GPU, needs ``device_id``), ``"auto"`` (mixed when a device is given)."""
    shuffle_buffer: int = 4096
    """wds train only: DALI's shuffle buffer in samples (the folder format shuffles globally and ignores it)."""
    rand_n: int = 0
    """Train only: RandAugment operations per image (timm's ``n``; MAE / BEiT fine-tuning: 2); 0 turns it off. Each
    is drawn from timm's 15 ``inc1`` operations and applied with probability 0.5 (:mod:`mimfast.data.augment`)."""
    rand_m: float = 9.0
    """RandAugment magnitude on timm's level scale [0, 10] (``rand-m9``)."""
    rand_mstd: float = 0.5
    """Standard deviation of the per-operation RandAugment magnitude noise, N(rand_m, rand_mstd) clipped to [0, 10]
    (``mstd0.5``); 0 uses ``rand_m`` exactly."""
    reprob: float = 0.0
    """Train only: random-erasing probability per image (MAE fine-tuning: 0.25); 0 turns it off. One rectangle of
    2-33% of the area, aspect ratio 0.3-3.3, filled after normalisation according to ``remode``."""
    remode: str = "pixel"
    """Random-erasing fill: ``"pixel"`` (per-pixel N(0, 1) noise in the normalised space, MAE) or ``"const"`` (0,
    i.e. the mean colour)."""

    def __post_init__(self) -> None:
        if isinstance(self.root, os.PathLike):
            self.root = os.fspath(self.root)
        if not isinstance(self.root, str) or not self.root:
            raise ValueError(f"DataConfig.root must be a non-empty path string or 'builtin', got {self.root!r}")
        if self.format not in FORMATS:
            raise ValueError(f"DataConfig.format must be one of {FORMATS}, got {self.format!r}")
        if not _is_int(self.img_size) or self.img_size < 8:
            raise ValueError(f"DataConfig.img_size must be an int >= 8, got {self.img_size!r}")
        if self.tokenizer_size is not None and (not _is_int(self.tokenizer_size) or self.tokenizer_size < 1):
            raise ValueError(f"DataConfig.tokenizer_size must be None or an int >= 1, got {self.tokenizer_size!r}")
        self.scale = _pair("scale", self.scale, 0.0, 1.0)
        self.ratio = _pair("ratio", self.ratio, 0.0, None)
        if not isinstance(self.hflip, bool):
            raise ValueError(f"DataConfig.hflip must be a bool, got {self.hflip!r}")
        self.mean = _triple("mean", self.mean, positive=False)
        self.std = _triple("std", self.std, positive=True)
        if not _is_int(self.num_threads) or self.num_threads < 1:
            raise ValueError(f"DataConfig.num_threads must be an int >= 1, got {self.num_threads!r}")
        if not _is_int(self.prefetch) or self.prefetch < 1:
            raise ValueError(f"DataConfig.prefetch must be an int >= 1, got {self.prefetch!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"DataConfig.seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.interp not in INTERPS:
            raise ValueError(f"DataConfig.interp must be one of {tuple(INTERPS)}, got {self.interp!r}")
        if self.tokenizer_interp not in INTERPS:
            raise ValueError(f"DataConfig.tokenizer_interp must be one of {tuple(INTERPS)}, "
                             f"got {self.tokenizer_interp!r}")  # fmt: skip
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, numbers.Real) or not 0 < self.crop_pct <= 1:
            raise ValueError(f"DataConfig.crop_pct must be a number in (0, 1], got {self.crop_pct!r}")
        if self.decode not in DECODES:
            raise ValueError(f"DataConfig.decode must be one of {DECODES}, got {self.decode!r}")
        if not _is_int(self.shuffle_buffer) or self.shuffle_buffer < 1:
            raise ValueError(f"DataConfig.shuffle_buffer must be an int >= 1, got {self.shuffle_buffer!r}")
        if not _is_int(self.rand_n) or self.rand_n < 0:
            raise ValueError(f"DataConfig.rand_n must be an int >= 0 (0: no RandAugment), got {self.rand_n!r}")
        self.rand_m = _number("rand_m", self.rand_m, 0.0, RA_LEVEL_MAX, "in [0, 10] (timm's level scale)")
        self.rand_mstd = _number("rand_mstd", self.rand_mstd, 0.0, math.inf, ">= 0")
        self.reprob = _number("reprob", self.reprob, 0.0, 1.0, "in [0, 1]")
        if self.remode not in REMODES:
            raise ValueError(f"DataConfig.remode must be one of {REMODES}, got {self.remode!r}")
        for name, on in (("rand_n", self.rand_n > 0), ("reprob", self.reprob > 0)):
            if on and self.tokenizer_size is not None:
                raise ValueError(f"DataConfig.{name}: fine-tuning augmentations cannot be combined with tokenizer_size "
                                 f"(the tokenizer view would not show the augmented image); set {name} to 0 or "
                                 "tokenizer_size to None")  # fmt: skip


class Batch(NamedTuple):
    """One batch of B samples; every tensor on the loader's device."""

    images: torch.Tensor
    """(B, 3, img_size, img_size) float32, normalised with ``mean`` / ``std``."""
    labels: torch.Tensor
    """(B,) int64 class ids (class folders sorted by name)."""
    images_small: torch.Tensor | None
    """(B, 3, t, t) float32, the same crop and flip at ``tokenizer_size`` t; None when that is None."""
    index: torch.Tensor | None
    """(B,) int64 global sample index (position in the split's canonical order) if ``return_index``, else None."""
    valid: torch.Tensor
    """(B,) bool; False marks eval padding (a repeated sample that metrics must ignore). All True in train."""


def denormalize(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Undo the normalisation: (B, 3, H, W) normalised -> pixels in [0, 1]."""
    mean = torch.tensor(cfg.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images * std + mean


def _derive_seed(*parts: int) -> int:
    """A 31-bit DALI seed from integers (SeedSequence mixing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint32)[0]) & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------ sources
class _EpochPlan(NamedTuple):
    reader_kwargs: dict  # arguments of the DALI reader for this (epoch, rank)
    valid: np.ndarray  # (len * B,) bool


class _FolderSource:
    """``split_dir/<class>/**/<image>``; sample i = i-th file in :func:`list_folder_split` order."""

    format = "folder"

    def __init__(self, split_dir: Path) -> None:
        self.path = split_dir
        classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
        tars = any(p.suffix == ".tar" for p in split_dir.iterdir())
        hint = " (it holds .tar shards: use format='wds')" if tars else ""
        if not classes:
            raise DataValueError("root" if not tars else "format", f"DataConfig.root: {split_dir} has no class folders "
                                 f"(expected {split_dir}/<class>/<image>){hint}")  # fmt: skip
        self.class_names, self.files, labels = list_folder_split(split_dir)
        if not self.files:
            raise DataValueError("root", f"DataConfig.root: the class folders of {split_dir} hold no image files "
                                 f"(.jpg/.jpeg/.png/...); expected {split_dir}/<class>/<image>")  # fmt: skip
        self.labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        empty = [self.class_names[i] for i in np.flatnonzero(counts == 0).tolist()]
        if empty:
            shown = ", ".join(empty[:5]) + (f", ... ({len(empty)} in all)" if len(empty) > 5 else "")
            warnings.warn(f"DataConfig.root: {len(empty)} class folder(s) of {split_dir} hold no image: {shown}; "
                          "each still takes a label id (classes are numbered by sorted folder name); "
                          "`mimfast validate-data` lists them", stacklevel=3)  # fmt: skip
        self.num_samples = len(self.files)
        self._index_of: dict[str, int] | None = None

    def plan(self, order: np.ndarray, nb: int, batch: int, rank: int, world: int, train: bool, **_) -> _EpochPlan:
        pos = np.arange(nb * batch, dtype=np.int64) * world + rank  # this rank's slots in the global order
        valid = pos < self.num_samples
        idx = order[np.where(valid, pos, self.num_samples - 1)]  # eval padding repeats the last sample
        kw = dict(files=[self.files[i] for i in idx.tolist()], labels=self.labels[idx].tolist(), random_shuffle=False)
        return _EpochPlan(kw, valid)

    def read(self, fn, kw: dict):
        jpegs, labels = fn.readers.file(name="reader", **kw)
        return jpegs, labels

    def index_of(self, source_info: str) -> int:
        if self._index_of is None:
            self._index_of = {f: i for i, f in enumerate(self.files)}
        return self._index_of[source_info]


class _WdsSource:
    """``split_dir/*.tar`` (sorted by name); sample i = i-th sample of the concatenated tars; labels from ``.cls``."""

    format = "wds"

    def __init__(self, split_dir: Path) -> None:
        self.path = split_dir
        self.tars = sorted(str(p.absolute()) for p in split_dir.glob("*.tar"))
        if not self.tars:
            folders = any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(split_dir))
            hint = " (it holds class folders: use format='folder')" if folders else ""
            raise DataValueError("format" if folders else "root", f"DataConfig.root: {split_dir} has no .tar shards "
                                 f"(format='wds' expects {split_dir}/*.tar with <key>.jpg + <key>.cls samples)"
                                 f"{hint}")  # fmt: skip
        idx = [os.path.splitext(t)[0] + ".idx" for t in self.tars]
        self.index_paths = idx if all(os.path.isfile(p) for p in idx) else None
        self.offsets: dict[tuple[str, int], int] = {}
        self.tar_sizes: list[int] = []
        labels: list[int] = []
        for t in self.tars:
            n0 = len(labels)
            for key, img_offset, label in _scan_tar(t):
                if img_offset is None or label is None:
                    raise DataValueError("root", f"DataConfig.root: sample {key!r} of {t} lacks an image (.jpg/.png) "
                                         "or a .cls component")  # fmt: skip
                self.offsets[(t, img_offset)] = len(labels)
                labels.append(label)
            self.tar_sizes.append(len(labels) - n0)
        if not labels:
            raise DataValueError("root", f"DataConfig.root: the tars in {split_dir} hold no samples")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_samples = len(labels)
        man = _read_json(split_dir / MANIFEST) or _read_json(split_dir.parent / MANIFEST) or {}
        names = man.get("classes")
        if not names or len(names) <= int(self.labels.max()):
            names = [str(i) for i in range(int(self.labels.max()) + 1)]
        self.class_names = list(names)

    def plan(self, order: np.ndarray, nb: int, batch: int, rank: int, world: int, train: bool, *, shuffle_seed: int,
             shuffle_buffer: int) -> _EpochPlan:  # fmt: skip
        # ``order`` is a permutation of the tars (train) or the identity (eval); DALI shards their concatenation: rank
        # r reads samples [N r / W, N (r + 1) / W) (integer division) and sticks to that shard. Eval pads each shard
        # to nb * batch by repeating its last sample; train leaves padding off (a shuffle buffer would mix padding in).
        kw = dict(paths=[self.tars[i] for i in order.tolist()], shard_id=rank, num_shards=world, stick_to_shard=True,
                  random_shuffle=train, pad_last_batch=not train, ext=[_WDS_IMAGE_EXT, "cls"],
                  missing_component_behavior="error", case_sensitive_extensions=False)  # fmt: skip
        if train:
            kw.update(initial_fill=shuffle_buffer, seed=shuffle_seed)
        if self.index_paths is not None:
            kw["index_paths"] = [self.index_paths[i] for i in order.tolist()]
        valid = np.ones(nb * batch, bool) if train else np.arange(nb * batch) < n_shard(self.num_samples, rank, world)
        return _EpochPlan(kw, valid)

    def read(self, fn, kw: dict):
        jpegs, cls = fn.readers.webdataset(name="reader", **kw)
        return jpegs, cls

    def index_of(self, source_info: str) -> int:
        path, offset, _name = source_info.rsplit(":", 2)
        return self.offsets[(path, int(offset))]


def n_shard(n: int, rank: int, world: int) -> int:
    """Samples in DALI's shard ``rank`` of ``world`` over ``n`` samples: [n r / W, n (r + 1) / W)."""
    return n * (rank + 1) // world - n * rank // world


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _scan_tar(path: str):
    """(key, image data offset, label) per sample, in tar order (DALI groups consecutive members by key)."""
    last = None
    cur: list = []
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile() or os.path.basename(m.name).startswith("."):
                continue
            key, ext = _wds_key_ext(m.name)
            if key != last:
                if cur:
                    yield tuple(cur)
                cur, last = [key, None, None], key
            ext = ext.lower()
            if ext in _WDS_IMAGE_EXT.split(";"):
                cur[1] = m.offset_data
            elif ext == "cls":
                raw = tf.extractfile(m).read()
                try:
                    cur[2] = int(raw.decode().strip())
                except (UnicodeDecodeError, ValueError):
                    raise ValueError(f"DataConfig.root: {path}: {m.name} is not an ASCII integer label "
                                     f"({raw[:20]!r})") from None  # fmt: skip
        if cur:
            yield tuple(cur)


# ------------------------------------------------------------------------------------------------ loader
class MIMLoader:
    """An epoch-exact, resumable DALI loader (build it with :func:`build_loader`).

    ``for batch in loader`` covers one epoch (``len(loader)`` batches, equal on every rank); the next ``iter()``
    continues with the next epoch. Breaking out mid-epoch and iterating again continues where it stopped.

    Attributes: ``epoch`` (the epoch being or next to be iterated), ``step`` (batches of it already returned),
    ``num_samples`` (samples in the split, all ranks), ``num_classes``, ``class_names``, ``batch_size``, ``split``,
    ``mode`` ("train" / "eval"), ``rank``, ``world_size``, ``device`` (where batches live).
    """

    def __init__(self, cfg: DataConfig, source, *, batch_size: int, split: str, mode: str, rank: int,
                 world_size: int, device_id: int | None, return_index: bool) -> None:  # fmt: skip
        self.cfg, self._source = cfg, source
        self.batch_size, self.split, self.mode = batch_size, split, mode
        self.rank, self.world_size, self.device_id = rank, world_size, device_id
        self.return_index = return_index
        self.num_samples = source.num_samples
        self.class_names = list(source.class_names)
        self.num_classes = len(self.class_names)
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self._gpu_decode = device_id is not None and cfg.decode in ("auto", "mixed")
        per_epoch = batch_size * world_size
        self._nb = self.num_samples // per_epoch if mode == "train" else -(-self.num_samples // per_epoch)
        self.epoch = 0
        self.step = 0
        self._pipe = None
        self._pipe_epoch = -1
        self._pending_ckpt: bytes | None = None
        self._valid: np.ndarray | None = None
        self._generation = 0
        self._copy_stream = None
        self._reader_kw: dict = {}

    # -- public ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._nb

    def __iter__(self):
        self._generation += 1
        return self._epoch_iter(self._generation)

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch`` (drops any progress in the current one)."""
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._close_pipe()
        self.epoch, self.step, self._pending_ckpt = int(epoch), 0, None

    def state_dict(self) -> dict[str, Any]:
        """A plain picklable dict: pass it as ``build_loader(..., state=...)`` to continue bit-identically."""
        epoch, step, ckpt = self.epoch, self.step, None
        if step >= self._nb:  # the last batch was returned: the next one is the next epoch's first
            epoch, step = epoch + 1, 0
        elif step > 0:
            if self._pipe is not None and self._pipe_epoch == epoch:
                ckpt = bytes(self._pipe.checkpoint())
            else:
                ckpt = self._pending_ckpt  # restored but not iterated since
        return dict(version=STATE_VERSION, epoch=epoch, step=step, dali_checkpoint=ckpt,
                    dali_version=_dali_version(), fingerprint=self._fingerprint())  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (see :meth:`state_dict`); raises if it was written by a different setup."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else None
            raise ValueError(f"state must be a dict from MIMLoader.state_dict() (version {STATE_VERSION}), got "
                             f"{type(state).__name__} with version {got!r}")  # fmt: skip
        # a state written before a DataConfig field existed (e.g. rand_n, reprob) lacks its key: read it as the default
        fp, mine = {**_config_defaults(), **state.get("fingerprint", {})}, self._fingerprint()
        diff = {k: (fp.get(k), v) for k, v in mine.items() if fp.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise DataValueError("state", f"state: cannot resume, it was saved by a loader set up differently "
                                 f"({detail})")  # fmt: skip
        epoch, step = state["epoch"], state["step"]
        if not (_is_int(epoch) and epoch >= 0 and _is_int(step) and 0 <= step < max(self._nb, 1)):
            raise ValueError(f"state: epoch={epoch!r} step={step!r} out of range (len(loader) = {self._nb})")
        ckpt = state.get("dali_checkpoint")
        if ckpt is not None and state.get("dali_version") != _dali_version():
            msg = (f"state: DALI checkpoint from DALI {state.get('dali_version')} ignored under {_dali_version()}; "
                   f"replaying {step} batches instead (same result, slower)")  # fmt: skip
            warnings.warn(msg, stacklevel=2)
            ckpt = None
        self._close_pipe()
        self.epoch, self.step, self._pending_ckpt = int(epoch), int(step), ckpt

    def close(self) -> None:
        """Release the DALI pipeline (threads, buffers); iterating again rebuilds it."""
        self._close_pipe()

    def __repr__(self) -> str:
        return (f"MIMLoader({self.cfg.format} {self.split!r} {self.mode}, {self.num_samples} samples, "
                f"{self.num_classes} classes, batch {self.batch_size}, rank {self.rank}/{self.world_size}, "
                f"{len(self)} batches/epoch, epoch {self.epoch} step {self.step}, device {self.device})")  # fmt: skip

    # -- internals ---------------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        c = self.cfg
        keep = {k: v for k, v in dataclasses.asdict(c).items() if k not in ("root", "num_threads", "prefetch")}
        keep = {k: _plain(v) for k, v in keep.items()}
        return dict(keep, num_samples=self.num_samples, batch_size=self.batch_size, split=self.split,
                    mode=self.mode, rank=self.rank, world_size=self.world_size, gpu=self.device_id is not None,
                    gpu_decode=self._gpu_decode, return_index=self.return_index)  # fmt: skip

    def _close_pipe(self) -> None:
        self._pipe, self._pipe_epoch = None, -1

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's global order: of samples (folder) or of tars (wds); identity when not training."""
        n = self.num_samples if self._source.format == "folder" else len(self._source.tars)
        if self.mode != "train":
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.cfg.seed, epoch, 0x5EED]).permutation(n).astype(np.int64)

    def _epoch_iter(self, generation: int):
        if self.step >= self._nb:  # a previous iterator returned the last batch but was not exhausted
            self._close_pipe()
            self.epoch, self.step = self.epoch + 1, 0
        pipe = self._ensure_pipe()
        while self.step < self._nb:
            if generation != self._generation:
                raise RuntimeError("this MIMLoader iterator was superseded by a newer iter(loader)")
            try:
                outs = pipe.run()
            except RuntimeError as e:
                self._close_pipe()  # DALI invalidates a pipeline that raised
                raise self._decode_failure(e) from None
            batch = self._to_batch(outs, self.step)
            self.step += 1
            yield batch
        if generation == self._generation:
            self._close_pipe()
            self.epoch, self.step = self.epoch + 1, 0

    def _decode_failure(self, err: RuntimeError) -> UndecodableImageError:
        """The error to raise when ``pipe.run()`` failed at batch ``self.step``: for the folder format, the files of
        that batch and of the ones DALI may have prefetched are checked one by one (host checks, then DALI's decoder,
        bisected) to name the culprit; webdataset samples cannot be mapped back cheaply, so their shards are named."""
        from .validate import find_undecodable

        fmt = " --format wds" if self._source.format == "wds" else ""
        hint = f"`mimfast validate-data {self._source.path}{fmt}` lists every such file; remove or replace them"
        where = f"epoch {self.epoch}, batch {self.step} of {self._source.path}"
        said = " ".join(ln.strip() for ln in str(err).splitlines() if ln.strip() and "encountered" not in ln
                        and "no longer valid" not in ln and "Critical error" not in ln)[-300:]  # fmt: skip
        bad: list[tuple[str, str]] = []
        if self._source.format == "folder":
            b = self.batch_size
            files = self._reader_kw.get("files", [])
            window = files[self.step * b : (self.step + 1 + max(1, self.cfg.prefetch)) * b]
            bad = find_undecodable(window, device_id=self.device_id)
        if bad:
            named = "; ".join(f"{p} ({why})" for p, why in bad[:3]) + (f"; ... ({len(bad)} in all)" if len(bad) > 3
                                                                        else "")  # fmt: skip
            return UndecodableImageError(f"cannot decode {named}, in {where}; {hint}", [p for p, _ in bad])
        return UndecodableImageError(f"DALI failed to decode a sample in {where} and the file could not be singled "
                                     f"out; {hint}. DALI said: {said}", [])  # fmt: skip

    def _ensure_pipe(self):
        if self._pipe is not None and self._pipe_epoch == self.epoch:
            return self._pipe
        self._close_pipe()
        seed = _derive_seed(self.cfg.seed, self.epoch, self.rank, 1)
        shuffle_seed = _derive_seed(self.cfg.seed, self.epoch, self.rank, 2)
        plan = self._source.plan(self._order(self.epoch), self._nb, self.batch_size, self.rank, self.world_size,
                                 self.mode == "train", shuffle_seed=shuffle_seed,
                                 shuffle_buffer=self.cfg.shuffle_buffer)  # fmt: skip
        kw = plan.reader_kwargs
        ckpt = self._pending_ckpt if self.step > 0 else None
        pipe = None
        if ckpt is not None:
            try:
                pipe = self._build_pipe(kw, seed, checkpoint=ckpt)
            except RuntimeError as e:
                warnings.warn(f"DALI rejected the saved checkpoint ({str(e).splitlines()[0]}); replaying "
                              f"{self.step} batches instead (same result, slower)", stacklevel=3)  # fmt: skip
                pipe = None
        if pipe is None:
            pipe = self._build_pipe(kw, seed, checkpoint=None)
            for _ in range(self.step):  # exact: the epoch's pipeline is a pure function of its derived seed
                pipe.run()
        self._pending_ckpt = None
        self._valid = plan.valid
        self._reader_kw = kw
        self._pipe, self._pipe_epoch = pipe, self.epoch
        return pipe

    def _build_pipe(self, reader_kw: dict, seed: int, checkpoint: bytes | None):
        dali, fn, types, _ = _dali()
        c = self.cfg
        train = self.mode == "train"
        gpu, dec_dev = self.device_id is not None, ("mixed" if self._gpu_decode else "cpu")
        dec_kw = dict(_MIXED_DECODER_KW) if self._gpu_decode else {}
        s, t = c.img_size, c.tokenizer_size
        interp, t_interp = getattr(types, INTERPS[c.interp]), getattr(types, INTERPS[c.tokenizer_interp])

        def graph():
            jpegs, labels = self._source.read(fn, reader_kw)
            outs = []
            if train:
                crop = fn.decoders.image_random_crop(jpegs, device=dec_dev, output_type=types.RGB,
                                                     random_area=list(c.scale), random_aspect_ratio=list(c.ratio),
                                                     num_attempts=10, **dec_kw)  # fmt: skip
                if gpu and not self._gpu_decode:
                    crop = crop.gpu()
                big = fn.resize(crop, resize_x=s, resize_y=s, interp_type=interp, antialias=True)
                small = fn.resize(crop, resize_x=t, resize_y=t, interp_type=t_interp, antialias=True) if t else None
                mirror = fn.random.coin_flip(probability=0.5) if c.hflip else None
                if c.rand_n > 0:  # uint8 HWC, like timm's PIL image (DataConfig refuses it with a tokenizer view)
                    fill = round(255 * sum(c.mean) / 3)
                    big = rand_augment(big, n=c.rand_n, m=c.rand_m, mstd=c.rand_mstd, size=s, fill=fill)
            else:
                img = fn.decoders.image(jpegs, device=dec_dev, output_type=types.RGB, **dec_kw)
                if gpu and not self._gpu_decode:
                    img = img.gpu()
                img = fn.resize(img, resize_shorter=math.floor(s / c.crop_pct), interp_type=interp, antialias=True)
                big = fn.crop(img, crop=(s, s), crop_pos_x=0.5, crop_pos_y=0.5)
                small = fn.resize(big, resize_x=t, resize_y=t, interp_type=t_interp, antialias=True) if t else None
                mirror = None
            norm = dict(dtype=types.FLOAT, output_layout="CHW", mean=[255.0 * m for m in c.mean],
                        std=[255.0 * v for v in c.std])  # fmt: skip
            if mirror is not None:
                norm["mirror"] = mirror
            images = fn.crop_mirror_normalize(big, **norm)
            if train and c.reprob > 0:
                images = random_erasing(images, prob=c.reprob, mode=c.remode, size=s)
            outs += [images, labels]
            if small is not None:
                outs.append(fn.crop_mirror_normalize(small, **norm))
            if self.return_index:
                outs.append(fn.get_property(jpegs, key="source_info"))
            return tuple(outs)

        # RandAugment dispatches its operations per sample with DALI conditionals (``if`` on data nodes)
        conditionals = train and c.rand_n > 0
        pipe = dali.pipeline_def(graph, enable_conditionals=conditionals, batch_size=self.batch_size,
                                 num_threads=c.num_threads, device_id=self.device_id, seed=seed,
                                 prefetch_queue_depth=c.prefetch, enable_checkpointing=True,
                                 checkpoint=checkpoint)()  # fmt: skip
        pipe.build()
        return pipe

    def _to_batch(self, outs, step: int) -> Batch:
        feed_ndarray = _dali()[3]
        b, s, t = self.batch_size, self.cfg.img_size, self.cfg.tokenizer_size
        # GPU: copy DALI's outputs on a private stream and wait for that copy alone (~0.1 ms for 256x3x224x224 fp32)
        # before DALI may recycle its buffers; the caller's stream and its queued work are never waited on.
        stream = None
        if self.device.type == "cuda":
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            stream = self._copy_stream

        def to_torch(tl, shape):
            out = torch.empty(shape, dtype=torch.float32, device=self.device)
            feed_ndarray(tl.as_tensor(), out, cuda_stream=stream)
            return out

        images = to_torch(outs[0], (b, 3, s, s))
        if self._source.format == "folder":
            labels = torch.from_numpy(outs[1].as_array().reshape(b).astype(np.int64))
        else:
            labels = torch.tensor([int(bytes(np.asarray(outs[1][i])).decode()) for i in range(b)], dtype=torch.int64)
        k = 2
        small = None
        if t:
            small = to_torch(outs[2], (b, 3, t, t))
            k = 3
        index = None
        if self.return_index:
            info = outs[k]
            index = torch.tensor([self._source.index_of(bytes(np.asarray(info[i])).decode()) for i in range(b)],
                                 dtype=torch.int64)  # fmt: skip
        valid = torch.from_numpy(self._valid[step * b : (step + 1) * b].copy())
        if stream is not None:
            stream.synchronize()
        if self.device.type == "cuda":
            labels, valid = labels.to(self.device, non_blocking=True), valid.to(self.device, non_blocking=True)
            index = index.to(self.device, non_blocking=True) if index is not None else None
        return Batch(images, labels, small, index, valid)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _config_defaults() -> dict:
    """Every :class:`DataConfig` field's default, as it appears in a loader fingerprint."""
    return {f.name: _plain(f.default) for f in dataclasses.fields(DataConfig)}


def _dali_version() -> str:
    dali, *_ = _dali()
    return str(dali.__version__)


# ------------------------------------------------------------------------------------------------ factory
def build_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    device_id: int | None = None,
    state: dict | None = None,
    return_index: bool = False,
    mode: str | None = None,
) -> MIMLoader:
    """A :class:`MIMLoader` over ``cfg.root/<split>`` for ``rank`` of ``world_size``.

    Args:
        cfg: the :class:`DataConfig`.
        batch_size: samples per batch on this rank (B).
        split: sub-directory of the root, ``"train"`` or ``"val"`` (any existing name works).
        rank, world_size: this process's shard; ``0 <= rank < world_size``.
        device_id: CUDA device for decode and outputs; ``None`` runs the whole pipeline on the CPU.
        state: a :meth:`MIMLoader.state_dict` to continue from (bit-identical batches).
        return_index: also yield each sample's global index (``Batch.index``), read from DALI's ``source_info``.
        mode: ``"train"`` (random crop + flip, shuffled, ragged tail dropped) or ``"eval"`` (resize + centre crop,
            in order, every sample exactly once with padding); default: ``"train"`` for split "train", else "eval".

    Returns:
        the loader; ``len(loader)`` batches per epoch on every rank.
    """
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"cfg must be a DataConfig, got {type(cfg).__name__}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(split, str) or not split or os.sep in split:
        raise ValueError(f"split must be a split directory name such as 'train' or 'val', got {split!r}")
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if mode is None:
        mode = "train" if split == "train" else "eval"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    if device_id is not None:
        if not _is_int(device_id) or device_id < 0:
            raise ValueError(f"device_id must be None (CPU pipeline) or a CUDA device index >= 0, got {device_id!r}")
        if not torch.cuda.is_available() or device_id >= torch.cuda.device_count():
            raise ValueError(f"device_id={device_id} but torch sees {torch.cuda.device_count()} CUDA device(s); "
                             "pass device_id=None for the CPU pipeline")  # fmt: skip
    elif cfg.decode == "mixed":
        raise ValueError("DataConfig.decode='mixed' decodes on a GPU and needs device_id; use decode='cpu' or 'auto' "
                         "for the CPU pipeline")  # fmt: skip
    _dali()  # a clear ImportError before touching the dataset

    if cfg.root == "builtin":
        if cfg.format != "folder":
            raise DataValueError("format", "DataConfig.root='builtin' is a folder dataset: use format='folder' (or "
                                 "make wds shards with mimfast.data.make_webdataset_shards and point root at "
                                 "them)")  # fmt: skip
        root = make_builtin_dataset(default_builtin_root(), progress=rank == 0)
    else:
        root = Path(cfg.root).expanduser()
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "does not exist"
        raise DataPathError("root", f"DataConfig.root: {root} {what} (expected a dataset directory holding "
                            "train/<class>/<image> or train/*.tar)")  # fmt: skip
    split_dir = root / split
    if not split_dir.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        have = have[:5] + ["..."] * (len(have) > 5)
        raise DataPathError("root", f"split={split!r}: {split_dir} does not exist (DataConfig.root must hold "
                            f"<split>/<class>/<image> or <split>/*.tar; found sub-directories {have})")  # fmt: skip
    source = _FolderSource(split_dir) if cfg.format == "folder" else _WdsSource(split_dir)

    n, per = source.num_samples, batch_size * world_size
    if mode == "train" and n < per:
        raise DataValueError("batch_size", f"batch_size * world_size = {batch_size} * {world_size} = {per} exceeds "
                             f"the {n} samples of split {split!r}: with the ragged tail dropped no rank would get a "
                             "batch; lower batch_size or world_size")  # fmt: skip
    if mode == "eval" and n < world_size:
        raise DataValueError("world_size", f"world_size = {world_size} exceeds the {n} samples of split {split!r}: "
                             "some ranks would hold no sample at all; evaluate on fewer ranks")  # fmt: skip
    loader = MIMLoader(cfg, source, batch_size=batch_size, split=split, mode=mode, rank=rank, world_size=world_size,
                       device_id=device_id, return_index=return_index)  # fmt: skip
    if state is not None:
        loader.load_state_dict(state)
    return loader

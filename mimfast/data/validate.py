"""Find the images DALI cannot decode before they abort a training run mid-epoch.

:func:`validate_dataset` checks every image of a folder dataset (``root[/split]/**/<image>``) or a webdataset
(``root[/split]/**/*.tar``) with cheap host-side checks first (unreadable, empty, not an image by its signature, JPEG
without its end-of-image marker) and then with DALI's own decoder, the one that would abort the run: files go
through ``fn.external_source`` -> ``fn.decoders.image`` in batches; when a batch fails (DALI invalidates the whole
pipeline on a decode error), it is bisected with fresh pipelines until each culprit is named, with the decoder's own
message. ``mimfast validate-data PATH`` wraps it (:func:`add_validate_arguments`, :func:`cmd_validate`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .builtin import IMAGE_EXTENSIONS, _wds_key_ext

__all__ = ["ValidationReport", "add_validate_arguments", "cmd_validate", "find_undecodable", "validate_dataset"]

_SIGNATURES = (  # (prefix, offset, format): what DALI's decoders accept
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
    (b"WEBP", 8, "webp"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0, "jp2"),
    (b"\xff\x4f\xff\x51", 0, "j2k"),
)
_PNM = (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")


@dataclass
class ValidationReport:
    """What :func:`validate_dataset` found. ``bad`` lists ``(path, reason)``; tar members read ``tar:member``."""

    root: str
    checked: int = 0
    """Images checked (files with an image extension, or wds samples)."""
    bad: list[tuple[str, str]] = field(default_factory=list)
    """Images a training run would fail on or that are certainly corrupt, with the reason."""
    ignored: list[str] = field(default_factory=list)
    """Files skipped because the loader never reads them (no image extension)."""
    empty_dirs: list[str] = field(default_factory=list)
    """Folders with no image anywhere below them (folder format): as a class folder each still takes a label id."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.bad and not self.empty_dirs

    def format_report(self, limit: int = 100) -> str:
        empty = f", {len(self.empty_dirs)} empty folders" if self.empty_dirs else ""
        head = (f"{self.root}: {self.checked} images checked in {self.seconds:.1f} s, {len(self.bad)} bad{empty}, "
                f"{len(self.ignored)} other files ignored")  # fmt: skip
        lines = [head]
        for path, reason in self.bad[:limit]:
            lines.append(f"  BAD {path}: {reason}")
        if len(self.bad) > limit:
            lines.append(f"  ... and {len(self.bad) - limit} more")
        for d in self.empty_dirs[:limit]:
            lines.append(f"  EMPTY {d}: no image in this folder; as a class folder it still takes a label id")
        if len(self.empty_dirs) > limit:
            lines.append(f"  ... and {len(self.empty_dirs) - limit} more empty folders")
        if self.checked == 0:
            tars = sum(p.endswith(".tar") for p in self.ignored)
            hint = " (it holds .tar files: use format='wds' / --format wds)" if tars else ""
            lines.append(f"  NOTHING CHECKED: no image files found{hint}")
        elif self.ok:
            lines.append("  OK: every image decodes with DALI")
        return "\n".join(lines)


def _sniff(data: bytes) -> str | None:
    for sig, off, fmt in _SIGNATURES:
        if data[off : off + len(sig)] == sig and (fmt != "webp" or data[:4] == b"RIFF"):
            return fmt
    if data[:2] in _PNM and len(data) > 2 and data[2:3].isspace():
        return "pnm"
    return None


def _host_check(data: bytes) -> str | None:
    """Reason the bytes are not a usable image, from the bytes alone (None: looks fine, DALI decides)."""
    if not data:
        return "empty file (0 bytes)"
    fmt = _sniff(data)
    if fmt is None:
        return f"not an image: no known image signature (starts with {data[:12]!r})"
    if fmt == "jpeg":
        # Entropy-coded data stuffs every 0xFF byte, so FFD9 near the end is the real end-of-image marker; bytes
        # after it (camera padding) are tolerated by decoders. A file cut short has none.
        if b"\xff\xd9" not in data[-4096:]:
            return "truncated JPEG: no end-of-image marker (the file was cut short)"
    elif fmt == "png" and b"IEND" not in data[-64:]:
        return "truncated PNG: no IEND chunk at the end"
    return None


@contextlib.contextmanager
def _stderr_to(buf: list[str]) -> Iterator[None]:
    """Capture what native code writes to file descriptor 2 (DALI's decoders log their reason there)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.append(tmp.read().decode(errors="replace"))


class _Decoder:
    """DALI's image decoder on batches fed from Python; rebuilt after every failure (DALI invalidates a pipeline
    that raised)."""

    def __init__(self, batch_size: int, num_threads: int, device_id: int | None) -> None:
        from .pipeline import _dali

        self._dali, self._fn, self._types, _ = _dali()
        self.batch_size, self.num_threads, self.device_id = batch_size, num_threads, device_id
        self._pipe = None

    def _build(self):
        pipe = self._dali.Pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                                   prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)  # fmt: skip
        with pipe:
            enc = self._fn.external_source(name="enc", dtype=self._types.UINT8, ndim=1)
            dev = "mixed" if self.device_id is not None else "cpu"
            pipe.set_outputs(self._fn.decoders.image(enc, device=dev, output_type=self._types.RGB))
        pipe.build()
        return pipe

    def decode(self, arrays: list[np.ndarray]) -> str | None:
        """None when every array decodes, else DALI's error text."""
        if self._pipe is None:
            self._pipe = self._build()
        logs: list[str] = []  # the decoders' own messages (kept only to explain a single failing file)
        try:
            with _stderr_to(logs):
                self._pipe.feed_input("enc", arrays)
                self._pipe.run()
            return None
        except Exception as e:  # DALI raises RuntimeError; anything else is as fatal for a training run
            self._pipe = None
            msg = str(e)
            if "encountered:" in msg:
                msg = msg.split("encountered:", 1)[1]
            msg = " ".join(line.strip() for line in msg.splitlines() if line.strip()
                           and "no longer valid" not in line)  # fmt: skip
            native = ""
            if len(arrays) == 1:
                native = " ".join(ln.split("]")[-1].strip() for ln in "".join(logs).splitlines() if ln.strip())
            return "; ".join(x for x in (native, msg) if x) or type(e).__name__

    def find_bad(self, items: list[tuple[str, np.ndarray]]) -> list[tuple[str, str]]:
        """Names and reasons of the items DALI cannot decode: one run when all are fine, bisection otherwise."""
        if not items:
            return []
        err = self.decode([a for _, a in items])
        if err is None:
            return []
        if len(items) == 1:
            return [(items[0][0], f"DALI cannot decode it: {err}")]
        mid = len(items) // 2
        return self.find_bad(items[:mid]) + self.find_bad(items[mid:])


def _iter_folder(root: Path, report: ValidationReport) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(path, bytes or None, reason or None) for every image-extension file under ``root``; leaf folders without an
    image file go to ``report.empty_dirs``."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if (
            not dirnames
            and dirpath != str(root)
            and not any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in filenames if not f.startswith("."))
        ):
            report.empty_dirs.append(dirpath)
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            p = os.path.join(dirpath, f)
            if os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS or not os.path.isfile(p):
                report.ignored.append(p)
                continue
            try:
                with open(p, "rb") as fh:
                    yield p, fh.read(), None
            except PermissionError:
                yield p, None, "unreadable: permission denied"
            except OSError as e:
                yield p, None, f"unreadable: {e.strerror or e}"


def _iter_wds(root: Path, report: ValidationReport) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(tar:member, bytes or None, reason or None) for every sample of every tar under ``root``."""
    tars = sorted(Path(dp) / f for dp, _, fs in os.walk(root) for f in fs if f.endswith(".tar"))
    img_exts = {e.lstrip(".") for e in IMAGE_EXTENSIONS}
    for t in tars:
        try:
            tf = tarfile.open(t, "r:")
        except (OSError, tarfile.TarError) as e:
            yield str(t), None, f"unreadable tar: {e}"
            continue
        with tf:
            sample: dict[str, tarfile.TarInfo] = {}
            key = None
            try:
                members = [m for m in tf if m.isfile() and not os.path.basename(m.name).startswith(".")]
            except (OSError, tarfile.TarError) as e:
                yield str(t), None, f"corrupt tar (reading stops there, the samples after it are lost): {e}"
                members = []
            groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
            for m in members:
                k, ext = _wds_key_ext(m.name)
                if k != key:
                    sample, key = {}, k
                    groups.append((k, sample))
                sample[ext.lower()] = m
            for k, comps in groups:
                name = f"{t}:{k}"
                img = next((comps[e] for e in comps if e in img_exts), None)
                if img is None:
                    yield name, None, f"sample has no image component (has {sorted(comps)})"
                    continue
                if "cls" not in comps:
                    yield name, None, "sample has no .cls label"
                    continue
                try:
                    int(tf.extractfile(comps["cls"]).read().decode().strip())
                except (ValueError, UnicodeDecodeError):
                    yield name, None, "the .cls label is not an integer"
                    continue
                yield f"{t}:{img.name}", tf.extractfile(img).read(), None


def find_undecodable(paths: list[str], *, device_id: int | None = None, batch_size: int = 64) -> list[tuple[str, str]]:
    """``(path, reason)`` for each file of ``paths`` that is unreadable, not an image, truncated or that DALI's decoder
    rejects (what :func:`validate_dataset` does, for a given list: the loader uses it to name the file that aborted a
    pipeline)."""
    bad: list[tuple[str, str]] = []
    pending: list[tuple[str, np.ndarray]] = []
    dec = _Decoder(batch_size, 1, device_id)
    for p in dict.fromkeys(paths):  # unique, in order
        try:
            with open(p, "rb") as fh:
                data = fh.read()
        except OSError as e:
            bad.append((p, f"unreadable: {e.strerror or e}"))
            continue
        reason = _host_check(data)
        if reason is not None:
            bad.append((p, reason))
        else:
            pending.append((p, np.frombuffer(data, dtype=np.uint8)))
        if len(pending) == batch_size:
            bad += dec.find_bad(pending)
            pending = []
    return bad + dec.find_bad(pending)


def validate_dataset(
    root: str | os.PathLike,
    *,
    split: str | None = None,
    format: str = "folder",
    num_threads: int = max(1, min(8, os.cpu_count() or 1)),
    batch_size: int = 64,
    device_id: int | None = None,
    progress: bool = True,
) -> ValidationReport:
    """Check every image under ``root`` (or ``root/split``) with DALI's decoder; see the module docstring.

    Args:
        root: a dataset root, a split directory, or any directory of images (searched recursively).
        split: a sub-directory of ``root`` to check alone (e.g. "train"); None checks everything under ``root``.
        format: ``"folder"`` (image files) or ``"wds"`` (webdataset ``.tar`` shards).
        num_threads: DALI decoding threads.
        batch_size: images decoded per DALI run.
        device_id: decode with DALI's GPU (``mixed``) decoder on this device, as a GPU training run would; None: CPU.
        progress: print progress every few seconds.

    Returns:
        a :class:`ValidationReport` (``report.ok``, ``report.bad``, ``report.format_report()``).
    """
    if format not in ("folder", "wds"):
        raise ValueError(f"format must be 'folder' or 'wds', got {format!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"root: {base} does not exist or is not a directory")
    if split is not None:
        base = base / split
        if not base.is_dir():
            raise FileNotFoundError(f"split={split!r}: {base} does not exist")
    report = ValidationReport(root=str(base))
    dec = _Decoder(batch_size, num_threads, device_id)
    t0 = last = time.perf_counter()
    pending: list[tuple[str, np.ndarray]] = []
    items = _iter_folder(base, report) if format == "folder" else _iter_wds(base, report)
    for path, data, reason in items:
        report.checked += 1
        if reason is None:
            reason = _host_check(data)
        if reason is not None:
            report.bad.append((path, reason))
        else:
            pending.append((path, np.frombuffer(data, dtype=np.uint8)))
        if len(pending) == batch_size:
            report.bad += dec.find_bad(pending)
            pending = []
        if progress and time.perf_counter() - last > 5.0:
            last = time.perf_counter()
            print(f"[mimfast.data] validate: {report.checked} images checked, {len(report.bad)} bad "
                  f"({report.checked / (last - t0):.0f} img/s)", flush=True)  # fmt: skip
    report.bad += dec.find_bad(pending)
    report.bad.sort()
    report.seconds = time.perf_counter() - t0
    return report


# ------------------------------------------------------------------------------------------------ CLI
def add_validate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``mimfast validate-data PATH``."""
    parser.add_argument("path", help="dataset root, split directory or any directory of images / .tar shards")
    parser.add_argument("--split", default=None, help="check only this sub-directory of PATH (e.g. train)")
    parser.add_argument("--format", choices=("folder", "wds"), default="folder", help="image files or webdataset tars")
    parser.add_argument("--threads", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="DALI threads")
    parser.add_argument("--batch-size", type=int, default=64, help="images per DALI decode run")
    parser.add_argument("--device-id", type=int, default=None, help="decode on this GPU (DALI mixed) like training")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    """Exit code: 0 clean, 1 bad images found (listed), 2 bad arguments / path / environment, or no image found."""
    try:
        report = validate_dataset(args.path, split=args.split, format=args.format, num_threads=args.threads,
                                  batch_size=args.batch_size, device_id=args.device_id,
                                  progress=not args.quiet)  # fmt: skip
    except (FileNotFoundError, NotADirectoryError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format_report())
    if report.checked == 0:
        return 2
    return 0 if report.ok else 1

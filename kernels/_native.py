"""mimfast's native CPU kernels: locate, build and load ``libmimfast_ops`` (C++ kernels of the ``mimfast::`` ops).

What it is: the top-level ``CMakeLists.txt`` builds ``csrc/`` (C++17, ``find_package(Torch)`` of the installed torch,
per-ISA kernel objects picked at run time) into one shared library. Loaded into Python it registers the ops' C++ CPU
kernels as ``torch.ops.mimfast_native.*``; the CPU kernels of the public ops (``torch.ops.mimfast.*``, still the only
entry points) call them for fp32 / bf16 / fp16 CPU tensors, and fall back to the plain-torch references (the spec)
when the library is absent, stale, disabled (``MIMFAST_NATIVE=0``) or the inputs are float64. Under
``TRITON_INTERPRET=1`` the Triton kernels keep running on CPU tensors (``use_triton`` decides first).

Why the build is triggered where it is (the design):

* It must compile against the torch the user *already installed*, with the exact same ABI, and ``pip install``'s
  default build isolation hides that torch (putting torch in ``[build-system] requires`` would download a multi-GB
  CUDA wheel into the isolated environment, and could pick a torch other than the one installed). So the C++ build is
  not a setuptools extension. Instead ``setup.py``'s ``build_py`` step runs ``python kernels/_native.py build`` with
  the *target* interpreter (the one running pip) and pip's isolation variables removed, so the subprocess sees the
  installed torch; CMake then builds with ``torch.utils.cmake_prefix_path``. This is best effort and never fails an
  install: no torch yet, no CMake / compiler, a failed compile or ``MIMFAST_NATIVE=0`` print a one-line notice (pip
  shows it with ``-v``) and the reference paths run. ``mimfast info`` says which backend is active and why.
* The same builder is the explicit command: ``python -m mimfast.kernels._native build`` (after a torch upgrade, or
  where the install-time build could not run). Builds are incremental (``build/native-*`` CMake trees), keyed by the
  torch version and a hash of the sources (an up-to-date library is not rebuilt: the second ``pip install -e``
  costs nothing), serialized by a file lock, and the library is swapped in atomically.
* Nothing is compiled lazily at import or first use: a first call never stalls for a compile, and test runs never
  race to build. A library whose torch version (or, in a source checkout, source hash) does not match is not loaded.

Where the library lives: ``<package>/_native/`` (in a source checkout that is ``kernels/_native/``, git-ignored; in a
wheel, inside the package), else ``$MIMFAST_CACHE_DIR`` or ``~/.cache/mimfast/native/<torch>-<sources>/``;
``MIMFAST_NATIVE_LIB`` names a library file explicitly.

This file must stay runnable as a plain script (``setup.py`` runs it before the package is installed): standard
library and torch only at module level.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

LIB_NAME = "libmimfast_ops.dylib" if sys.platform == "darwin" else "libmimfast_ops.so"
PKG_DIR = Path(__file__).resolve().parent
_ROOT = PKG_DIR.parent
SOURCE_ROOT = _ROOT if (_ROOT / "CMakeLists.txt").is_file() and (_ROOT / "csrc" / "ops.cpp").is_file() else None
PKG_LIB_DIR = PKG_DIR / "_native"
INFO_NAME = "build_info.json"
NOTICE = "mimfast: native CPU kernels"

_lock = threading.Lock()
_state: dict = {"tried": False, "loaded": False, "path": None, "reason": "not loaded yet"}


def enabled() -> bool:
    """False when ``MIMFAST_NATIVE`` is 0 / false / off / no: the reference paths run, exactly as without a build."""
    return os.environ.get("MIMFAST_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def source_hash(root: Path | None = SOURCE_ROOT) -> str | None:
    """Hash of everything the library is built from (CMakeLists.txt and csrc/), or None without sources."""
    if root is None:
        return None
    h = hashlib.sha256()
    files = [root / "CMakeLists.txt"] + sorted(p for p in (root / "csrc").rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_dir(torch_version: str, src: str | None) -> Path:
    base = os.environ.get("MIMFAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mimfast"
    )
    return Path(base) / "native" / f"torch{torch_version}-{src or 'wheel'}".replace("+", "_")


def _read_info(lib_dir: Path) -> dict | None:
    try:
        return json.loads((lib_dir / INFO_NAME).read_text())
    except (OSError, ValueError):
        return None


def find_library() -> tuple[Path | None, str]:
    """(path of a loadable library or None, why not)."""
    explicit = os.environ.get("MIMFAST_NATIVE_LIB")
    if explicit:
        p = Path(explicit)
        return (p, "MIMFAST_NATIVE_LIB") if p.is_file() else (None, f"MIMFAST_NATIVE_LIB={explicit} does not exist")
    import torch

    src = source_hash()
    reasons = []
    for d in (PKG_LIB_DIR, cache_dir(torch.__version__, src)):
        if not (d / LIB_NAME).is_file():
            continue
        info = _read_info(d) or {}
        if info.get("torch") != torch.__version__:
            reasons.append(f"{d / LIB_NAME} was built for torch {info.get('torch')}, this is {torch.__version__}")
        elif src is not None and info.get("source") != src:
            reasons.append(f"{d / LIB_NAME} is stale (csrc/ changed since it was built)")
        else:
            return d / LIB_NAME, ""
    if not reasons:
        reasons.append("not built")
    return None, "; ".join(reasons) + " (build: python -m mimfast.kernels._native build)"


def load() -> bool:
    """Load the library once (thread-safe); True when its kernels are registered. Never raises."""
    if _state["tried"]:
        return _state["loaded"]
    with _lock:
        if _state["tried"]:
            return _state["loaded"]
        try:
            if not enabled():
                _state["reason"] = "disabled (MIMFAST_NATIVE=0)"
            else:
                import torch

                # The Python package owns the mimfast:: names: define them before the library looks for them.
                from . import gumbel_softmax, token_gather, vq_search  # noqa: F401

                path, why = find_library()
                if path is None:
                    _state["reason"] = why
                else:
                    torch.ops.load_library(str(path))
                    _state.update(loaded=True, path=str(path), reason="")
        except Exception as e:  # a broken library must never break the reference paths
            _state["reason"] = f"failed to load: {type(e).__name__}: {e}"
        _state["tried"] = True
    return _state["loaded"]


def available() -> bool:
    return load()


def op(name: str, *tensors, dtypes=()):
    """``torch.ops.mimfast_native.<name>`` when the library is loaded and no tensor (or dtype) is float64; else
    None (the caller runs its reference)."""
    import torch

    if any(t is not None and t.dtype == torch.float64 for t in tensors) or torch.float64 in dtypes:
        return None
    if not load():
        return None
    return getattr(torch.ops.mimfast_native, name)


def info() -> str:
    """One line: the loaded library (ISA, BLAS path, threads) or why the references run."""
    if load():
        import torch

        return f"{torch.ops.mimfast_native.info()} ({_state['path']})"
    return f"off: {_state['reason']}"


def describe() -> str:
    """``mimfast info``: the version and which backend each op family uses on this machine."""
    import torch

    from . import _common

    try:
        from mimfast import __version__
    except ImportError:  # pragma: no cover
        __version__ = "?"
    triton = f"triton {_common.triton.__version__}" if _common.HAS_TRITON else "triton not importable"
    cuda = f"CUDA ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "no CUDA device"
    cpu = "Triton interpreter (TRITON_INTERPRET=1)" if _common.interpret_mode() and _common.HAS_TRITON else None
    native = info()
    if cpu is None:
        cpu = "native C++ kernels" if load() else "PyTorch references"
    return "\n".join([
        f"mimfast {__version__}, torch {torch.__version__}, {triton}, {cuda}",
        f"CUDA tensors: {'Triton kernels' if _common.HAS_TRITON else 'PyTorch references'}",
        f"CPU tensors: {cpu} (float64: PyTorch references)",
        f"native CPU kernels: {native}",
    ])  # fmt: skip


# --------------------------------------------------------------------------------------------------- building
@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: no lock
            pass
        yield


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def default_out_dir() -> Path:
    """Where a build puts the library: the package's _native/ when writable, else the user cache."""
    import torch

    try:
        PKG_LIB_DIR.mkdir(exist_ok=True)
        if os.access(PKG_LIB_DIR, os.W_OK):
            return PKG_LIB_DIR
    except OSError:
        pass
    return cache_dir(torch.__version__, source_hash())


def build(out_dir: str | Path | None = None, *, jobs: int | None = None, verbose: bool = False) -> Path:
    """Configure and build the library with CMake against the installed torch; returns its path. Raises
    RuntimeError with the reason when it cannot (no sources, no CMake / compiler, a failed compile)."""
    import torch

    if SOURCE_ROOT is None:
        raise RuntimeError("no CMakeLists.txt / csrc/ next to the package (install from a source checkout)")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("CMake is not on PATH")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++ / g++ / clang++ / $CXX) on PATH")
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    key = {"torch": torch.__version__, "source": source_hash(), "cxx": cxx, "python": sys.executable}
    with _file_lock(out / ".build.lock"):
        info = _read_info(out)
        if (out / LIB_NAME).is_file() and info is not None and all(info.get(k) == v for k, v in key.items()):
            return out / LIB_NAME  # up to date
        ninja = shutil.which("ninja")
        tree = SOURCE_ROOT / "build" / ("native-ninja" if ninja else "native-make")
        configure = [cmake, "-S", str(SOURCE_ROOT), "-B", str(tree), "-DCMAKE_BUILD_TYPE=Release",
                     "-DBUILD_TESTING=OFF", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                     f"-DCMAKE_CXX_COMPILER={cxx}", "-Wno-dev"]  # fmt: skip
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        compile_ = [cmake, "--build", str(tree), "--target", "mimfast_ops", "-j", str(jobs or os.cpu_count() or 2)]
        for cmd in (configure, compile_):
            r = subprocess.run(cmd, capture_output=not verbose, text=True)
            if r.returncode != 0:
                tail = "\n".join(((r.stdout or "") + (r.stderr or "")).strip().splitlines()[-25:])
                raise RuntimeError(f"'{' '.join(cmd[:2])} ...' failed (exit {r.returncode}):\n{tail}")
        tmp = out / (LIB_NAME + ".tmp")
        shutil.copy2(tree / LIB_NAME, tmp)
        os.replace(tmp, out / LIB_NAME)  # atomic: a process that already loaded the old file keeps its mapping
        (out / INFO_NAME).write_text(json.dumps({**key, "machine": platform.machine()}, indent=1) + "\n")
    return out / LIB_NAME


def main(argv: list[str] | None = None) -> int:
    """``python -m mimfast.kernels._native build [--out DIR] [-j N] [-v] [--best-effort]`` | ``info``."""
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m mimfast.kernels._native", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build libmimfast_ops with CMake against the installed torch")
    b.add_argument("--out", default=None, help="directory of the library (default: the package's _native/)")
    b.add_argument("-j", "--jobs", type=int, default=None)
    b.add_argument("-v", "--verbose", action="store_true", help="show CMake's output")
    b.add_argument("--best-effort", action="store_true", help="never fail: print a one-line notice instead")
    sub.add_parser("info", help="print whether the native kernels are loaded, or why not")
    args = p.parse_args(argv)
    if args.cmd == "info":
        print(info())
        return 0
    if not enabled():
        print(f"{NOTICE}: skipped (MIMFAST_NATIVE=0); the PyTorch reference paths run on CPU", file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    try:
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise RuntimeError("torch is not installed yet (install torch, then rerun this build)") from e
        path = build(args.out, jobs=args.jobs, verbose=args.verbose)
    except Exception as e:
        if not args.best_effort:
            raise
        reason = str(e).splitlines()[0]
        print(f"{NOTICE}: not built ({reason}); the PyTorch reference paths run on CPU. Build later with: "
              "python -m mimfast.kernels._native build", file=sys.stderr)  # fmt: skip
        return 0
    print(f"{NOTICE}: {path} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

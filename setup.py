"""mimfast: fast kernels and systems for masked image modeling and VQ tokenizers.

``kernels/`` is installed as ``mimfast.kernels`` (a top-level ``kernels`` package would clash with an existing PyPI
package), hence the explicit ``package_dir`` mapping below.

The native CPU kernels (top-level CMakeLists.txt, csrc/) are built by ``build_py`` below, best effort: the target
interpreter (the one running pip, with pip's build-isolation variables removed so it sees the torch already installed)
runs ``kernels/_native.py build --best-effort``. No torch yet, no CMake / compiler, a failed compile or
``MIMFAST_NATIVE=0`` print a one-line notice and the install goes on (the reference paths run). Why it is not a
setuptools extension: kernels/_native.py's docstring.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithNative(build_py):
    """build_py, then the native library into the package's _native/ (the source tree's for editable installs)."""

    def run(self):
        super().run()
        if os.environ.get("MIMFAST_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
            print("mimfast: native CPU kernels: skipped (MIMFAST_NATIVE=0); the PyTorch reference paths run on CPU")
            return
        editable = getattr(self, "editable_mode", False)
        out = HERE / "kernels" / "_native" if editable else Path(self.build_lib) / "mimfast" / "kernels" / "_native"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
        cmd = [sys.executable, str(HERE / "kernels" / "_native.py"), "build", "--best-effort", "--out", str(out)]
        try:
            subprocess.run(cmd, env=env, cwd=str(HERE), check=False, timeout=1800)
        except Exception as e:  # never fail an install over the optional native part
            print(f"mimfast: native CPU kernels: not built ({type(e).__name__}: {e}); the reference paths run")


DALI = "nvidia-dali-cuda130; platform_system == 'Linux'"
TRAIN = [DALI, "pillow>=9.1", "tensorboard"]

setup(
    name="mimfast",
    version="0.1.0",
    description="Triton kernels and a lean model layer for masked image modeling and VQ tokenizers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "mimfast",
        "mimfast.kernels",
        "mimfast.ops",
        "mimfast.layers",
        "mimfast.models",
        "mimfast.data",
        "mimfast.train",
    ],
    package_dir={"mimfast": "mimfast", "mimfast.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",  # torch.library.custom_op / register_fake / register_autograd
        # Compiled kernels: triton 3.2 and later (the compile gate, bench/compile_report.py, is run with 3.6 and 3.9).
        # The CPU interpreter of triton <= 3.6 fails under NumPy >= 2.4 ("only 0-dimensional arrays can be converted
        # to Python scalars" on a range over a kernel argument; checked: 3.5.1 and 3.6.0 fail, 3.6.0 + NumPy 2.3.5 and
        # 3.7.0 / 3.9.0 + NumPy 2.4 pass). Pinning either side here would break installs next to a CUDA torch that
        # pins triton 3.6, so the interpreter pairing lives in the [dev] extra (the test-suite is what runs the
        # interpreter: NumPy < 2.4 there) and mimfast.kernels raises a clear error for the broken pair at the first
        # interpreted launch.
        "triton>=3.2; platform_system == 'Linux'",
        "numpy>=1.24",
    ],
    extras_require={
        # the pretraining launcher: DALI pipelines (CPU-only pipelines work without a GPU), Pillow for the built-in
        # dataset's JPEGs and the reconstruction PNGs, TensorBoard for the scalars
        "train": TRAIN,
        # the test-suite runs the Triton interpreter on CPU: NumPy < 2.4 keeps every triton >= 3.2 working there
        # (asking for triton >= 3.7 instead would conflict with CUDA builds of torch that pin triton 3.6)
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ruff", "numpy>=1.24,<2.4", *TRAIN],
        "bench": ["pytest-benchmark>=4", "vector-quantize-pytorch", *TRAIN],
        "dali": [DALI],
        # flash-attn has no PyPI wheel and builds from source against CUDA; it stays optional and is never required.
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["mimfast=mimfast.cli:main"]},
    cmdclass={"build_py": BuildPyWithNative},
)

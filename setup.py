"""mimfast: fast kernels and systems for masked image modeling and VQ tokenizers.

``kernels/`` is installed as ``mimfast.kernels`` (a top-level ``kernels`` package would clash with an existing PyPI
package), hence the explicit ``package_dir`` mapping below.
"""

from setuptools import setup

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
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        # the pretraining launcher: DALI pipelines (CPU-only pipelines work without a GPU), Pillow for the built-in
        # dataset's JPEGs and the reconstruction PNGs, TensorBoard for the scalars
        "train": TRAIN,
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ruff", *TRAIN],
        "bench": ["pytest-benchmark>=4", "vector-quantize-pytorch", *TRAIN],
        "dali": [DALI],
        # flash-attn has no PyPI wheel and builds from source against CUDA; it stays optional and is never required.
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["mimfast=mimfast.cli:main"]},
)

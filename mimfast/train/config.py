"""Typed run configuration of ``mimfast pretrain``: four sections, named presets, dotted ``key=value`` overrides.

A run is a :class:`RunConfig` of four dataclasses::

    model  ModelConfig     which registered model, its mask ratio and constructor overrides
    data   DataConfig      mimfast.data's own config (reused, not copied): dataset root, crop, threads...
    optim  OptimConfig     AdamW and MAE's learning-rate recipe (blr scaling, warm-up + half-cycle cosine)
    train  TrainConfig     epochs / steps, batch, precision, distribution, checkpoints, logging

Every field carries a docstring and every section validates itself in ``__post_init__``, so a bad value fails when
the config is built (``ValueError`` naming ``section.field``), long before a job is queued on a cluster.

Presets (:func:`get_config`): ``mae_vit_base``, ``mae_vit_large``, ``mae_vit_huge`` (MAE's recipe: 800 epochs, 40
warm-up, 4096 images per optimizer step) and ``mae_debug`` (the tiny debug model on the built-in dataset, CPU-sized).
Overrides (:func:`apply_overrides`) are ``section.field=value`` strings coerced to the field's annotated type, e.g.
``optim.blr=1e-4 train.epochs=3 data.root=/data/imagenet optim.betas=0.9,0.95 model.overrides.norm_pix_loss=false``.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import math
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from mimfast.data import DataConfig

from ..models import list_models

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "flatten_config",
    "get_config",
    "list_configs",
    "lr_at",
    "scaled_lr",
]

SECTIONS = ("model", "data", "optim", "train")
ALIASES = {"out": "train.out_dir", "resume": "train.resume"}
"""Short keys accepted by :func:`apply_overrides` (``out=/runs/x`` is ``train.out_dir=/runs/x``)."""


class ConfigError(ValueError):
    """A config value, override key or path is invalid; the message names the key and what was expected."""


def _fail(section: str, name: str, expected: str, got: Any) -> typing.NoReturn:
    raise ConfigError(f"{section}.{name}: expected {expected}, got {got!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    """A finite real number (inf / nan never pass a config check: ``warmup_epochs=inf`` would train at lr 0)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """The model: a registered name (``mimfast.list_models()``), its mask ratio and constructor overrides."""

    name: str = "mae_vit_base_patch16_dec512d8b"
    """Registered model name, spelling its architecture (``mimfast.create_model(name, **overrides)``)."""
    mask_ratio: float = 0.75
    """Fraction of patches removed per image (MAE: 0.75), in [0, 1)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Keyword overrides for the model's constructor / config, e.g. ``{"norm_pix_loss": False, "fused": False}``;
    set one on the command line with ``model.overrides.norm_pix_loss=false``."""
    loss: dict[str, Any] = field(default_factory=dict)
    """Options of the training objective, checked by the model's task (``mimfast.train.tasks``): e.g. for a
    tokenizer ``model.loss.disc_start=2000 model.loss.perceptual=self``; MAE takes none."""

    def __post_init__(self):
        known = list_models()
        if not isinstance(self.name, str) or self.name not in known:
            _fail("model", "name", f"a registered model name ({', '.join(known)})", self.name)
        if not (_is_num(self.mask_ratio) and 0.0 <= self.mask_ratio < 1.0):
            _fail("model", "mask_ratio", "a float in [0, 1)", self.mask_ratio)
        for name in ("overrides", "loss"):
            v = getattr(self, name)
            if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
                _fail("model", name, "a dict with str keys", v)


@dataclass
class OptimConfig:
    """AdamW with MAE's learning-rate recipe: ``lr = blr * effective_batch / 256``, linear warm-up over
    ``warmup_epochs``, then a half-cycle cosine to ``min_lr``, set every optimizer step."""

    blr: float = 1.5e-4
    """Base learning rate per 256 images; the absolute lr is ``blr * effective_batch / 256`` unless ``lr`` is set."""
    lr: float | None = None
    """Absolute peak learning rate; None derives it from ``blr`` and the effective batch (MAE's linear scaling)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2); MAE pretraining uses (0.9, 0.95)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.05
    """Decoupled weight decay of the weight matrices; biases and norm weights (every 1-D parameter) never decay."""
    no_decay_tokens: bool = True
    """Also exempt the class / mask tokens and position embeddings from weight decay (timm's ``no_weight_decay``
    list and mmselfsup's MAE recipe). False reproduces the official MAE script exactly, which exempts only 1-D
    parameters and biases and so decays ``cls_token`` / ``mask_token``."""
    warmup_epochs: float = 40.0
    """Epochs of linear warm-up from 0 to the peak lr (fractional epochs allowed)."""
    min_lr: float = 0.0
    """Floor of the cosine decay."""
    clip_grad: float | None = None
    """Clip the global gradient norm to this value; None (MAE's pretraining default) disables clipping."""
    accum_steps: int | None = None
    """Micro-batches accumulated per optimizer step. None derives it from ``train.global_batch_size`` (or 1 when
    that is unset); gradients are all-reduced on the last micro-batch only (``no_sync`` before it)."""
    fused: bool | None = None
    """``torch.optim.AdamW(fused=True)``; None = fused on CUDA, the foreach implementation elsewhere."""
    apex: bool = False
    """Use ``apex.optimizers.FusedAdam(adam_w_mode=True)`` instead of torch's AdamW when apex is importable and the
    run is on CUDA; otherwise a printed note says so and torch's AdamW is used (apex is not on PyPI)."""

    def __post_init__(self):
        s = "optim"
        for name in ("blr", "eps"):
            if not (_is_num(getattr(self, name)) and getattr(self, name) > 0):
                _fail(s, name, "a finite float > 0", getattr(self, name))
        if self.lr is not None and not (_is_num(self.lr) and self.lr > 0):
            _fail(s, "lr", "None or a finite float > 0", self.lr)
        betas = self.betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_num(b) and 0 <= b < 1 for b in betas)):
            _fail(s, "betas", "two floats in [0, 1)", betas)
        self.betas = tuple(float(b) for b in betas)
        for name in ("weight_decay", "warmup_epochs", "min_lr"):
            if not (_is_num(getattr(self, name)) and getattr(self, name) >= 0):
                _fail(s, name, "a finite float >= 0", getattr(self, name))
        if self.clip_grad is not None and not (_is_num(self.clip_grad) and self.clip_grad > 0):
            _fail(s, "clip_grad", "None or a finite float > 0", self.clip_grad)
        if self.accum_steps is not None and not (_is_int(self.accum_steps) and self.accum_steps >= 1):
            _fail(s, "accum_steps", "None or an int >= 1", self.accum_steps)
        for name in ("no_decay_tokens", "apex"):
            if not isinstance(getattr(self, name), bool):
                _fail(s, name, "a bool", getattr(self, name))
        if self.fused is not None and not isinstance(self.fused, bool):
            _fail(s, "fused", "None or a bool", self.fused)


Precision = Literal["bf16", "fp16", "fp32"]
DistMode = Literal["ddp", "fsdp2"]
NanPolicy = Literal["stop", "skip"]
Device = Literal["auto", "cuda", "cpu"]
Progress = Literal["auto", "bar", "lines"]


@dataclass
class TrainConfig:
    """Length, batch, precision, distribution, checkpoints and logging of the run."""

    epochs: int = 800
    """Epochs of the schedule (the cosine ends after ``epochs``); the run stops there unless ``max_steps`` is less."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (the lr schedule still spans ``epochs``); None = run all epochs."""
    batch_size: int = 256
    """Images per rank per micro-batch."""
    global_batch_size: int | None = None
    """Images per optimizer step over all ranks; when set and ``optim.accum_steps`` is None, accumulation is
    ``global_batch_size / (batch_size * world_size)`` (must divide). MAE's recipe is 4096."""
    precision: Precision = "bf16"
    """``bf16`` (autocast, fp32 master weights), ``fp16`` (autocast + GradScaler) or ``fp32``. On the CPU bf16
    autocast runs (usually slower than fp32); fp16 there falls back to fp32 with a message."""
    compile: bool = False
    """``torch.compile`` each transformer block in place (keeps parameter names; composes with DDP and FSDP2)."""
    dist: DistMode = "ddp"
    """Data parallelism under torchrun: ``ddp`` (replicated) or ``fsdp2`` (``torch.distributed.fsdp.fully_shard``
    per block, then the root). Ignored in a single process."""
    device: Device = "auto"
    """``auto`` = CUDA when available (one GPU per rank, ``LOCAL_RANK``), else the CPU."""
    out_dir: str = "runs/mae"
    """Directory for checkpoints, ``metrics.jsonl``, ``config.json`` and TensorBoard logs (``tb/``). All ranks
    must see the same directory (a shared filesystem on multi-node runs)."""
    ckpt_every: int = 1000
    """Write a checkpoint every this many optimizer steps (and always after the last); 0 = only after the last."""
    keep_last: int = 2
    """Checkpoints kept in ``out_dir``; older ones are deleted after a newer one is complete."""
    log_every: int = 20
    """Print one progress line (and TensorBoard scalars) every this many steps; metrics.jsonl gets every step."""
    progress: Progress = "auto"
    """``bar``: also a live progress bar (step, loss, lr, img/s, MFU, elapsed<remaining), redrawn in place on
    stderr between the progress lines; ``lines``: the lines alone (logs, torchrun, clusters); ``auto``: the bar when
    stderr is a terminal."""
    seed: int = 0
    """Seed of the model initialisation (same on every rank) and of each rank's masking noise (seed + rank)."""
    nan_policy: NanPolicy = "stop"
    """On a non-finite loss (decided on all ranks together): ``stop`` raises an error naming the step; ``skip``
    drops that step's update (no optimizer or schedule step), counts it and continues."""
    max_consecutive_skips: int = 10
    """With ``nan_policy=skip``: stop with an error once this many steps in a row were skipped (the run has
    diverged; skipping forever would burn the allocation); 0 = no limit."""
    tensorboard: bool = True
    """Write TensorBoard scalars (loss, lr, img/s, mfu) to ``out_dir/tb`` on rank 0 (needs ``tensorboard``)."""
    resume: str | None = None
    """None = start fresh (refuses an out_dir that already holds checkpoints); ``auto`` = the newest valid
    checkpoint in ``out_dir`` if any, else fresh; or a checkpoint file / run directory to resume from."""
    num_threads: int | None = None
    """``torch.set_num_threads`` per process; None leaves torch's default (torchrun sets OMP_NUM_THREADS=1)."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms(True)`` (+ cuDNN deterministic): bit-exact resume, slower kernels."""

    def __post_init__(self):
        s = "train"
        for name in ("epochs", "batch_size", "log_every"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 1):
                _fail(s, name, "an int >= 1", getattr(self, name))
        for name in ("ckpt_every", "seed", "max_consecutive_skips"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 0):
                _fail(s, name, "an int >= 0", getattr(self, name))
        if not (_is_int(self.keep_last) and self.keep_last >= 1):
            _fail(s, "keep_last", "an int >= 1", self.keep_last)
        for name in ("max_steps", "global_batch_size", "num_threads"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v >= 1):
                _fail(s, name, "None or an int >= 1", v)
        for name, tp in (("precision", Precision), ("dist", DistMode), ("nan_policy", NanPolicy), ("device", Device),
                         ("progress", Progress)):  # fmt: skip
            choices = typing.get_args(tp)
            if getattr(self, name) not in choices:
                _fail(s, name, f"one of {', '.join(choices)}", getattr(self, name))
        for name in ("compile", "tensorboard", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                _fail(s, name, "a bool", getattr(self, name))
        if not (isinstance(self.out_dir, str) and self.out_dir):
            _fail(s, "out_dir", "a non-empty path", self.out_dir)
        if self.resume is not None and not (isinstance(self.resume, str) and self.resume):
            _fail(s, "resume", "None, 'auto' or a checkpoint path", self.resume)


@dataclass
class RunConfig:
    """One pretraining run: the four sections plus the preset it started from."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model section."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data section (``mimfast.data.DataConfig``)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer / schedule section."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The run section."""
    preset: str = ""
    """Name of the preset the run was built from (informational)."""

    def __post_init__(self):
        for name, cls in (("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig), ("train", TrainConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name}: expected a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        self.validate()

    def validate(self) -> None:
        """Checks across fields and sections. Run on construction and again after all overrides are applied (in
        between, one override may be waiting for the next, e.g. ``train.batch_size`` then ``global_batch_size``)."""
        t = self.train
        if t.global_batch_size is not None and t.global_batch_size % t.batch_size:
            raise ConfigError(
                f"train.global_batch_size: expected a multiple of train.batch_size={t.batch_size}, got "
                f"{t.global_batch_size}"
            )
        if self.train.global_batch_size is not None and self.optim.accum_steps is not None:
            per_rank = self.train.batch_size * self.optim.accum_steps
            if self.train.global_batch_size % per_rank:
                raise ConfigError(
                    f"train.global_batch_size={self.train.global_batch_size} is not a multiple of train.batch_size * "
                    f"optim.accum_steps = {per_rank}; set only one of optim.accum_steps / train.global_batch_size"
                )

    def check_paths(self) -> None:
        """Filesystem checks done at launch (not at construction, so a cluster config can be built anywhere)."""
        root = getattr(self.data, "root", None)
        if isinstance(root, str) and root != "builtin" and not os.path.exists(root):
            raise ConfigError(
                f"data.root: no such file or directory {root!r} (an ImageFolder / webdataset root, or "
                "data.root=builtin for the generated offline dataset)"
            )
        if os.path.exists(self.train.out_dir) and not os.path.isdir(self.train.out_dir):
            raise ConfigError(f"train.out_dir: {self.train.out_dir!r} exists and is not a directory")
        r = self.train.resume
        if r not in (None, "auto") and not os.path.exists(r):
            raise ConfigError(f"train.resume: no such checkpoint file or run directory {r!r} (or use 'auto')")


# -------------------------------------------------------------------------------------------- lr recipe (MAE)
def scaled_lr(optim: OptimConfig, effective_batch: int) -> float:
    """Peak lr: ``optim.lr`` if set, else MAE's linear scaling ``blr * effective_batch / 256``."""
    if optim.lr is not None:
        return float(optim.lr)
    return optim.blr * effective_batch / 256.0


def lr_at(step: float, *, peak: float, min_lr: float, warmup_steps: float, total_steps: float) -> float:
    """MAE's per-iteration schedule at optimizer step ``step`` (0-based, fractional allowed).

    Linear warm-up ``peak * step / warmup_steps`` for ``step < warmup_steps``, then the half-cycle cosine
    ``min_lr + (peak - min_lr) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2``. Like MAE, the first
    update (step 0) uses lr 0 when there is a warm-up, and steps past ``total_steps`` stay at ``min_lr``.
    """
    if step < warmup_steps:
        return peak * step / warmup_steps
    if total_steps <= warmup_steps:
        return peak
    t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------------------- presets
def _mae_preset(name: str, model: str, batch_size: int) -> RunConfig:
    # MAE's recipe (main_pretrain.py / the paper): 800 epochs, 40 warm-up, effective batch 4096, blr 1.5e-4,
    # AdamW(0.9, 0.95), wd 0.05, norm-pix loss, RandomResizedCrop(224, 0.2-1, bicubic) + flip. The per-GPU batch is
    # sized for 80 GB GPUs in bf16 (an estimate, not measured here: lower it if it does not fit); accumulation makes up
    # the rest of 4096 at launch (8 GPUs, ViT-B: 256 x 8 ranks x 2 micro-batches).
    return RunConfig(
        model=ModelConfig(name=model, mask_ratio=0.75),
        data=DataConfig(root="/data/imagenet", img_size=224),  # set data.root=... to your ImageNet
        optim=OptimConfig(blr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup_epochs=40.0),
        train=TrainConfig(
            epochs=800,
            batch_size=batch_size,
            global_batch_size=4096,
            precision="bf16",
            out_dir=f"runs/{name}",
            ckpt_every=1000,
            log_every=20,
        ),
        preset=name,
    )


def _mae_debug() -> RunConfig:
    # The README's main job: the tiny debug model on mimfast.data's built-in dataset (2000 generated 64 px JPEGs,
    # 32 px crops), 45 epochs of 62 steps, about 3-5 min on 2 CPU cores, deterministic so that resume is bit-exact.
    # The blr is large because the effective batch is tiny: lr = 0.04 * 32 / 256 = 5e-3. Measured (CPU, torch 2.13,
    # linear probe vs random encoders): below them after 10 epochs, above with the class token only after 30, above
    # with both poolings after 45 (README). Tests shorten the run with train.max_steps.
    return RunConfig(
        model=ModelConfig(name="mae_vit_tiny_patch4_dec64d2b_debug", mask_ratio=0.75),
        data=DataConfig(root="builtin", img_size=32, num_threads=1),
        optim=OptimConfig(blr=0.04, warmup_epochs=0.25, min_lr=1e-5, weight_decay=0.05),
        train=_cpu_train("runs/mae_debug", 45),
        preset="mae_debug",
    )


def _cpu_train(out_dir: str, epochs: int, *, ckpt_every: int = 124) -> TrainConfig:
    """The debug presets' run section: batch 32 in fp32 on one CPU thread, deterministic (bit-exact resume)."""
    return TrainConfig(epochs=epochs, batch_size=32, precision="fp32", out_dir=out_dir, ckpt_every=ckpt_every,
                       keep_last=2, log_every=31, tensorboard=False, num_threads=1, deterministic=True)  # fmt: skip


def _tokenizer_debug(name: str, quantizer: str, epochs: int, **loss) -> RunConfig:
    # The debug tokenizers of the stochastic-quantization issue: vqgan_f4_k128_debug (1M params, 32 px -> 8x8 tokens
    # of 128 codes) on the built-in dataset, CPU-sized and deterministic. Adam(0.5, 0.9) without weight decay as
    # taming; the discriminator joins for the second half of the run.
    steps = epochs * 62
    return RunConfig(
        model=ModelConfig(
            name="vqgan_f4_k128_debug",
            overrides={"quantizer": quantizer},
            loss={"disc_start": steps // 2, "disc_ndf": 32, "disc_layers": 2, **loss},
        ),
        data=DataConfig(root="builtin", img_size=32, num_threads=1),
        optim=OptimConfig(blr=0.04, betas=(0.5, 0.9), weight_decay=0.0, warmup_epochs=0.5, min_lr=1e-4),
        train=_cpu_train(f"runs/{name}", epochs, ckpt_every=4 * 62),
        preset=name,
    )


def _vqgan_f16_imagenet() -> RunConfig:
    # taming-transformers' ImageNet VQGAN (configs/imagenet_vqgan.yaml): f16, 1024 codes of dim 256, 256 px, Adam
    # (0.5, 0.9) at base lr 4.5e-6 per image (blr 4.5e-6 * 256 here), disc_start 250001, disc_weight 0.8, codebook
    # weight 1. Its LPIPS perceptual term needs VGG weights that mimfast cannot download: pass your own extractor with
    # model.loss.perceptual=pkg.module:factory. Epochs and the per-GPU batch are estimates, not measured here.
    return RunConfig(
        model=ModelConfig(name="vqgan_f16_k1024", loss={"disc_start": 250001, "disc_weight": 0.8}),
        data=DataConfig(root="/data/imagenet", img_size=256),
        optim=OptimConfig(blr=4.5e-6 * 256, betas=(0.5, 0.9), weight_decay=0.0, warmup_epochs=0.0, min_lr=4.5e-6 * 96),
        train=TrainConfig(
            epochs=40, batch_size=12, precision="bf16", out_dir="runs/vqgan_f16_imagenet", ckpt_every=5000, log_every=50
        ),
        preset="vqgan_f16_imagenet",
    )


def _token_preset(name: str, model: str, batch_size: int) -> RunConfig:
    # BEiT (unilm/beit README, ImageNet-1k: 16 x 128 = 2048 images, lr 1.5e-3 not scaled by the batch, 10 warm-up
    # epochs of 800, clip 3.0, drop path 0.1, LayerScale 0.1, min lr 1e-5, wd 0.05, AdamW betas (0.9, 0.98) as
    # SPEC.md gives them) and CAE (Atten4Vis/CAE scripts/cae_base_800e.sh: 32 x 64 = 2048, lr 1.5e-3, 20 warm-up
    # epochs of 800, the same clip / drop path / LayerScale, betas left at AdamW's (0.9, 0.999)). Both crop
    # RandomResizedCrop(224, 0.08-1, bicubic) + flip with a 112 px Lanczos second view of the same crop for the
    # tokenizer; BEiT's 0.4 colour jitter is not applied (CAE's script sets it to 0). The tokenizer is mimfast's
    # 8192-code f8 tokenizer (vqgan_f8_k8192, 112 px -> 14 x 14) from `mimfast pretrain --config regvq_f8_imagenet`.
    # The per-GPU batch is an estimate for 80 GB GPUs in bf16, not measured here.
    cae = model.startswith("cae")
    return RunConfig(
        model=ModelConfig(name=model, loss={"tokenizer": "runs/regvq_f8_imagenet"}),
        data=DataConfig(root="/data/imagenet", img_size=224, tokenizer_size=112, scale=(0.08, 1.0)),
        optim=OptimConfig(
            lr=1.5e-3,
            betas=(0.9, 0.999) if cae else (0.9, 0.98),
            weight_decay=0.05,
            warmup_epochs=20.0 if cae else 10.0,
            min_lr=1e-5,
            clip_grad=3.0,
        ),
        train=TrainConfig(
            epochs=800,
            batch_size=batch_size,
            global_batch_size=2048,
            precision="bf16",
            out_dir=f"runs/{name}",
            ckpt_every=1000,
            log_every=20,
        ),
        preset=name,
    )


def _token_debug(name: str, model: str, epochs: int) -> RunConfig:
    # The CPU-sized BEiT / CAE of the BEiT/CAE issue on the built-in dataset: 32 px crops, 8 x 8 patches, targets from
    # the 128-code debug tokenizer of `mimfast pretrain --config regvq_debug` (train it first; it sees the same 32 px
    # view), deterministic so that resume is bit-exact. Measured figures: README.
    return RunConfig(
        model=ModelConfig(name=model, overrides={"drop_path_rate": 0.0}, loss={"tokenizer": "runs/regvq_debug"}),
        data=DataConfig(root="builtin", img_size=32, tokenizer_size=32, num_threads=1),
        optim=OptimConfig(lr=2e-3, betas=(0.9, 0.98), weight_decay=0.05, warmup_epochs=0.5, min_lr=1e-5, clip_grad=3.0),
        train=_cpu_train(f"runs/{name}", epochs),
        preset=name,
    )


def _regvq_f8_imagenet() -> RunConfig:
    # The 8192-code tokenizer BEiT / CAE use by default: Regularized VQ on vqgan_f8_k8192 (112 px -> 14 x 14, the
    # token grid of a ViT-B/16 at 224), trained on the 112 px view as taming trains its VQGANs (Adam (0.5, 0.9),
    # disc_weight 0.8); PCL on the tokenizer's own detached features. Epochs, batch and disc_start are estimates,
    # not measured here.
    return RunConfig(
        model=ModelConfig(
            name="vqgan_f8_k8192",
            overrides={"quantizer": "regvq"},
            loss={
                "disc_start": 100000,
                "disc_weight": 0.8,
                "perceptual": "self",
                "contrastive": "pcl",
                "contrastive_weight": 0.1,
            },
        ),
        data=DataConfig(root="/data/imagenet", img_size=112, scale=(0.08, 1.0), interp="lanczos"),
        optim=OptimConfig(blr=4.5e-6 * 256, betas=(0.5, 0.9), weight_decay=0.0, warmup_epochs=0.0, min_lr=4.5e-6 * 96),
        train=TrainConfig(
            epochs=20, batch_size=64, precision="bf16", out_dir="runs/regvq_f8_imagenet", ckpt_every=5000, log_every=50
        ),
        preset="regvq_f8_imagenet",
    )


def _mage_preset(name: str, model: str, batch_size: int) -> RunConfig:
    # MAGE's recipe (LTH14/mage README + main_pretrain.py): 1600 epochs, 40 warm-up, batch 4096 (64 x 64 GPUs), blr
    # 1.5e-4 scaled by batch / 256, AdamW (0.9, 0.95), wd 0.05, grad clip 3.0, RandomResizedCrop(256, 0.2-1, bicubic) +
    # flip; the mask-ratio distribution (truncated normal 0.55 / 0.25 on [0.5, 1]) and label smoothing 0.1 are in the
    # model config. The tokenizer is mimfast's f16 1024-code VQGAN (`mimfast pretrain --config vqgan_f16_imagenet`);
    # `model.loss.tokenizer=mage_vqgan:/path/vqgan_jax_strongaug.ckpt` uses MAGE's released one. The per-GPU batch is an
    # estimate for 80 GB GPUs in bf16, not measured here.
    return RunConfig(
        model=ModelConfig(name=model, loss={"tokenizer": "runs/vqgan_f16_imagenet"}),
        data=DataConfig(root="/data/imagenet", img_size=256, scale=(0.2, 1.0)),
        optim=OptimConfig(blr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup_epochs=40.0, clip_grad=3.0),
        train=TrainConfig(
            epochs=1600,
            batch_size=batch_size,
            global_batch_size=4096,
            precision="bf16",
            out_dir=f"runs/{name}",
            ckpt_every=1000,
            log_every=20,
        ),
        preset=name,
    )


def _mage_debug() -> RunConfig:
    # The CPU-sized MAGE of the MAGE issue: 32 px images tokenized by the 128-code debug tokenizer of `mimfast
    # pretrain --config regvq_debug` (8 x 8 tokens), deterministic. Measured figures: README.
    # Dropout off (the 0.1 of ViT-B slows this 0.5M-parameter model down) and blr 0.01 (lr 1.25e-3): measured to
    # probe better than MAGE's dropout 0.1 or blr 0.02 / 0.04 in the same 20 epochs.
    cfg = _token_debug("mage_debug", "mage_tiny_patch4_debug", 20)
    cfg.model.overrides = {"dropout": 0.0}
    cfg.data.tokenizer_size = None
    cfg.optim = OptimConfig(blr=0.01, betas=(0.9, 0.95), weight_decay=0.05, warmup_epochs=0.5, min_lr=1e-5,
                            clip_grad=3.0)  # fmt: skip
    return cfg


def _finetune_preset(name: str, model: str, *, family: str, epochs: int, batch_size: int, global_batch: int,
                     layer_decay: float, drop_path: float, warmup: float, blr: float | None = None,
                     lr: float | None = None, img_size: int = 224, reprob: float = 0.25, randaug: bool = True,
                     overrides: dict | None = None, loss: dict | None = None) -> RunConfig:  # fmt: skip
    # The fine-tuning recipes of the seed papers (sources beside PRESETS); AdamW (0.9, 0.999), wd 0.05, label
    # smoothing 0.1, Mixup 0.8 + CutMix 1.0 (switch 0.5), RandomResizedCrop(0.08-1, bicubic) + flip + RandAugment
    # m9 n2 (mstd 0.5) + random erasing, eval at crop_pct 0.875, cosine to 1e-6. The per-GPU batch is an estimate for
    # 80 GB GPUs in bf16, not measured here.
    return RunConfig(
        model=ModelConfig(
            name=model,
            overrides={"drop_path_rate": drop_path, **(overrides or {})},
            loss={
                "pretrained": f"runs/{family}",
                "layer_decay": layer_decay,
                "mixup": 0.8,
                "cutmix": 1.0,
                "smoothing": 0.1,
                **(loss or {}),
            },  # fmt: skip
        ),
        data=DataConfig(
            root="/data/imagenet", img_size=img_size, scale=(0.08, 1.0), **_augment_fields(randaug, reprob)
        ),  # fmt: skip
        optim=OptimConfig(
            blr=blr if blr is not None else 1e-3,
            lr=lr,
            betas=(0.9, 0.999),
            weight_decay=0.05,
            warmup_epochs=warmup,
            min_lr=1e-6,
        ),  # fmt: skip
        train=TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            global_batch_size=global_batch,
            precision="bf16",
            out_dir=f"runs/{name}",
            ckpt_every=1000,
            log_every=20,
        ),  # fmt: skip
        preset=name,
    )


def _augment_fields(randaug: bool, reprob: float) -> dict:
    """DataConfig fields of the fine-tuning augmentations (RandAugment m9 n2 mstd 0.5, random erasing)."""
    return {"rand_n": 2 if randaug else 0, "rand_m": 9.0, "rand_mstd": 0.5, "reprob": reprob}


def _finetune_debug(name: str, pretrained: str, *, epochs: int = 10, overrides: dict | None = None,
                    loss: dict | None = None) -> RunConfig:  # fmt: skip
    # The CPU-sized fine-tuning of the fine-tuning issue on the built-in dataset: the tiny classifier over the encoder
    # of a debug pretraining run (train it first), 32 px crops, deterministic so that resume is bit-exact; Mixup 0.8 +
    # CutMix 1.0, label smoothing 0.1, layer decay 0.75, drop path 0.1 as the recipes, lr 0.02 * 32 / 256 = 2.5e-3.
    # RandAugment and random erasing are off: measured from the main job's MAE, 10 epochs reach 23.8% val top-1
    # without them and 18.4% with the recipe's (m9 n2 + erasing 0.25); erasing alone 14-15% (a 32 px image loses its
    # shape to the box), RandAugment m5 alone 20.6% (23.6% after 20 epochs). Figures: README.
    return RunConfig(
        model=ModelConfig(
            name="vit_tiny_patch4_32_cls_debug",
            overrides={"drop_path_rate": 0.1, **(overrides or {})},
            loss={
                "pretrained": pretrained,
                "layer_decay": 0.75,
                "mixup": 0.8,
                "cutmix": 1.0,
                "smoothing": 0.1,
                **(loss or {}),
            },  # fmt: skip
        ),
        data=DataConfig(root="builtin", img_size=32, scale=(0.2, 1.0), num_threads=1, **_augment_fields(False, 0.0)),
        optim=OptimConfig(blr=0.02, betas=(0.9, 0.999), weight_decay=0.05, warmup_epochs=1.0, min_lr=1e-5),
        train=_cpu_train(f"runs/{name}", epochs),
        preset=name,
    )


def _mage_finetune(name: str, model: str, size: dict) -> RunConfig:
    return _finetune_preset(name, model, family=name.replace("_finetune", ""), blr=2.5e-4, img_size=256, reprob=0.0,
                            **size, overrides=_MAGE_FT(256, 16, 1024, 1000),
                            loss={"tokenizer": "runs/vqgan_f16_imagenet"})  # fmt: skip


_FT_B = dict(epochs=100, batch_size=128, global_batch=1024, layer_decay=0.65, drop_path=0.1, warmup=5.0)
_FT_L = dict(epochs=50, batch_size=64, global_batch=1024, layer_decay=0.75, drop_path=0.2, warmup=5.0)
# the classifier settings each family's encoder implies (mimfast.models.vit_classifier.classifier_overrides)
_BEIT_FT = dict(qkv_bias="qv", init_values=0.1, pos_embed="none", rel_pos_bias=True)
_CAE_FT = dict(qkv_bias="qv", init_values=0.1, pos_embed="fixed", rel_pos_bias=True)


def _MAGE_FT(img_size: int, patch_size: int, codebook: int, num_classes: int) -> dict:  # noqa: N802
    # MAGE's vocabulary: codes + class ids + the mask id; position 0 holds the fake class id (models/mage.py)
    from ..models.mage import MAGEConfig

    fake = MAGEConfig(img_size=img_size, patch_size=patch_size, codebook_size=codebook, num_classes=num_classes)
    return dict(input="tokens", img_size=img_size, patch_size=patch_size, vocab_size=fake.vocab_size,
                fake_class_id=codebook + fake.fake_class_id, codebook_size=codebook)  # fmt: skip


PRESETS = {
    "mae_vit_base": lambda: _mae_preset("mae_vit_base", "mae_vit_base_patch16_dec512d8b", 256),
    "mae_vit_large": lambda: _mae_preset("mae_vit_large", "mae_vit_large_patch16_dec512d8b", 128),
    "mae_vit_huge": lambda: _mae_preset("mae_vit_huge", "mae_vit_huge_patch14_dec512d8b", 64),
    "mae_debug": _mae_debug,
    "vqgan_debug": lambda: _tokenizer_debug("vqgan_debug", "vq", 8),
    # Regularized VQ: the usage prior and the 40% Gumbel mask are in the quantizer; PCL on the tokenizer's own
    # (detached) encoder features, weighted by w_i = ||z_sampled - z_best||^2
    "regvq_debug": lambda: _tokenizer_debug(
        "regvq_debug", "regvq", 8, perceptual="self", perceptual_weight=0.0, contrastive="pcl", contrastive_weight=0.1
    ),
    # taming's Gumbel VQGAN: temperature 0.9 annealed by a cosine to 1e-6, here over the whole (short) run
    "gumbel_debug": lambda: _tokenizer_debug("gumbel_debug", "gumbel", 8, tau_decay_steps=8 * 62),
    "vqgan_f16_imagenet": _vqgan_f16_imagenet,
    "regvq_f8_imagenet": _regvq_f8_imagenet,
    "beit_vit_base": lambda: _token_preset("beit_vit_base", "beit_base_patch16_224", 128),
    "beit_vit_large": lambda: _token_preset("beit_vit_large", "beit_large_patch16_224", 64),
    "cae_vit_base": lambda: _token_preset("cae_vit_base", "cae_base_patch16_224", 128),
    "beit_debug": lambda: _token_debug("beit_debug", "beit_tiny_patch4_debug", 20),
    "cae_debug": lambda: _token_debug("cae_debug", "cae_tiny_patch4_debug", 20),
    "mage_vit_base": lambda: _mage_preset("mage_vit_base", "mage_vit_base_patch16", 64),
    "mage_vit_large": lambda: _mage_preset("mage_vit_large", "mage_vit_large_patch16", 64),
    "mage_debug": _mage_debug,
    # fine-tuning (`mimfast finetune`). MAE (FINETUNE.md): ViT-B 100 epochs, blr 5e-4, layer decay 0.65, drop path
    # 0.1; ViT-L 50 epochs, blr 1e-3, 0.75, 0.2; ViT-H 50 epochs, blr 1e-3, 0.75, 0.3; batch 1024, 5 warm-up epochs,
    # reprob 0.25, global pool.
    "mae_finetune_vit_base": lambda: _finetune_preset(
        "mae_finetune_vit_base", "vit_base_patch16_224_cls", family="mae_vit_base", blr=5e-4, **_FT_B
    ),
    "mae_finetune_vit_large": lambda: _finetune_preset(
        "mae_finetune_vit_large", "vit_large_patch16_224_cls", family="mae_vit_large", blr=1e-3, **_FT_L
    ),
    "mae_finetune_vit_huge": lambda: _finetune_preset(
        "mae_finetune_vit_huge",
        "vit_huge_patch14_224_cls",
        family="mae_vit_huge",
        blr=1e-3,
        **{**_FT_L, "batch_size": 32, "drop_path": 0.3},
    ),
    # BEiT (unilm/beit README, ImageNet-1k): lr 4e-3 set directly (not scaled by the batch), batch 1024, 100 epochs,
    # 20 warm-up, layer decay 0.65, drop path 0.1, LayerScale 0.1, relative position bias per block, mean pooling.
    "beit_finetune_vit_base": lambda: _finetune_preset(
        "beit_finetune_vit_base",
        "vit_base_patch16_224_cls",
        family="beit_vit_base",
        lr=4e-3,
        **{**_FT_B, "warmup": 20.0},
        overrides=_BEIT_FT,
    ),
    # CAE (Atten4Vis/CAE scripts/cae_base_finetune.sh): lr 8e-3 set directly, 4 x 8 x 128 = 4096 images, 100 epochs,
    # 5 warm-up, layer decay 0.65, drop path 0.1, LayerScale, relative position bias per block (zero init), mean
    # pooling, the fixed sin-cos table of --sin_pos_emb.
    "cae_finetune_vit_base": lambda: _finetune_preset(
        "cae_finetune_vit_base",
        "vit_base_patch16_224_cls",
        family="cae_vit_base",
        lr=8e-3,
        **{**_FT_B, "global_batch": 4096},
        overrides=_CAE_FT,
    ),
    # MAGE (LTH14/mage README): 4 x 8 x 32 = 1024 images of 256 px, blr 2.5e-4, 100 epochs (ViT-L: 50, layer decay
    # 0.75, drop path 0.2), layer decay 0.65, drop path 0.1, reprob 0, global pool; token input through the tokenizer.
    "mage_finetune_vit_base": lambda: _mage_finetune("mage_finetune_vit_base", "vit_base_patch16_224_cls", _FT_B),
    "mage_finetune_vit_large": lambda: _mage_finetune("mage_finetune_vit_large", "vit_large_patch16_224_cls", _FT_L),
    # CPU-sized: the tiny classifier from each debug pretraining run
    "mae_finetune_debug": lambda: _finetune_debug("mae_finetune_debug", "runs/mae_debug"),
    "beit_finetune_debug": lambda: _finetune_debug("beit_finetune_debug", "runs/beit_debug", overrides=_BEIT_FT),
    "cae_finetune_debug": lambda: _finetune_debug("cae_finetune_debug", "runs/cae_debug", overrides=_CAE_FT),
    "mage_finetune_debug": lambda: _finetune_debug(
        "mage_finetune_debug",
        "runs/mage_debug",
        overrides=_MAGE_FT(32, 4, 128, 10),
        loss={"tokenizer": "runs/regvq_debug", "mixup": 0.0, "cutmix": 0.0},
    ),
}


def list_configs() -> list[str]:
    """Names of the presets."""
    return sorted(PRESETS)


def get_config(name: str, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """A fresh copy of preset ``name`` with ``overrides`` (``"section.field=value"`` strings) applied."""
    if name not in PRESETS:
        raise ConfigError(f"config: unknown preset {name!r}; presets: {', '.join(list_configs())}")
    return apply_overrides(PRESETS[name](), overrides)


# ----------------------------------------------------------------------------------------------- introspection
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the attribute docstrings of dataclass ``cls`` (empty if the source is absent)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for prev, node in zip(body, body[1:], strict=False):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _section_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def valid_keys(cfg: RunConfig) -> list[str]:
    """Every dotted key :func:`apply_overrides` accepts (``model.overrides.<name>`` stands for any constructor
    keyword)."""
    keys = []
    for sec in SECTIONS:
        keys += [f"{sec}.{f.name}" for f in dataclasses.fields(getattr(cfg, sec))]
    keys += ["model.overrides.<name>", "model.loss.<name>"]
    return keys


# -------------------------------------------------------------------------------------------------- coercion
_NONE = ("none", "null", "~")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(raw: str, tp: Any) -> Any:
    """Parse the command-line string ``raw`` as type ``tp`` (int, float, bool, str, Optional, Literal, tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.strip().lower() in _NONE:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(raw, a)
            except (ValueError, TypeError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        if raw not in args:
            raise ValueError(f"expected one of {', '.join(map(str, args))}")
        return raw
    if tp is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("expected a bool (true/false, 1/0, yes/no)")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            pass
        try:
            f = float(raw)  # accept 1e4 when it is integral
        except ValueError:
            f = math.nan
        if not f.is_integer():
            raise ValueError("expected an int")
        return int(f)
    if tp is float:
        try:
            v = float(raw)
        except ValueError:
            raise ValueError("expected a float") from None
        if not math.isfinite(v):
            raise ValueError("expected a finite float")
        return v
    if tp is str:
        return raw
    if origin is tuple:
        parts = [p.strip() for p in raw.strip().strip("()[]").split(",") if p.strip()]
        elem = list(args)
        if len(elem) == 2 and elem[1] is Ellipsis:
            elem = [elem[0]] * len(parts)
        if len(parts) != len(elem):
            raise ValueError(f"expected {len(elem)} comma-separated values")
        return tuple(_coerce(p, t) for p, t in zip(parts, elem, strict=True))
    if tp is Any or origin is dict:
        return _literal(raw)
    raise ValueError(f"cannot parse a {tp} from the command line")


def _literal(raw: str) -> Any:
    """A Python literal if ``raw`` is one (with true/false/none accepted), else the string itself."""
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in _NONE:
        return None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def apply_overrides(cfg: RunConfig, overrides: typing.Sequence[str]) -> RunConfig:
    """A new :class:`RunConfig` with each ``"section.field=value"`` applied in order, coerced to the field's type
    and validated by the section's ``__post_init__``. Raises :class:`ConfigError` naming the key, with the list of
    valid keys for an unknown one."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.blr=1e-4")
        key, raw = item.split("=", 1)
        key = ALIASES.get(key.strip(), key.strip())
        parts = key.split(".")
        if parts[0] not in SECTIONS or len(parts) < 2:
            raise ConfigError(f"override {key!r}: unknown key; valid keys: {', '.join(valid_keys(cfg))}")
        sec_name, name = parts[0], parts[1]
        section = getattr(cfg, sec_name)
        if sec_name == "model" and name in ("overrides", "loss") and len(parts) == 3:
            value = {**getattr(section, name), parts[2]: _literal(raw)}
        elif len(parts) == 2 and name in {f.name for f in dataclasses.fields(section)}:
            tp = _section_types(type(section))[name]
            try:
                value = _coerce(raw, tp)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"override {key}={raw!r}: {e}") from None
        else:
            raise ConfigError(f"override {key!r}: unknown key; valid keys: {', '.join(valid_keys(cfg))}")
        try:
            new_section = dataclasses.replace(section, **{name: value})
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:  # DataConfig's own validation
            raise ConfigError(f"override {key}={raw!r}: {e}") from None
        cfg = copy.copy(cfg)  # no RunConfig.__post_init__ here: cross-field checks wait for the last override
        setattr(cfg, sec_name, new_section)
    cfg.validate()
    return cfg


# -------------------------------------------------------------------------------------------------- dict views
def config_to_dict(cfg: RunConfig) -> dict:
    """``dataclasses.asdict`` of the run config (plain types: what checkpoints and config.json store)."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> RunConfig:
    """Inverse of :func:`config_to_dict` (unknown keys are an error: a checkpoint from a newer mimfast)."""
    kinds = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
    kwargs = {}
    for sec, cls in kinds.items():
        sub = dict(d.get(sec, {}))
        types_ = _section_types(cls)
        for k, v in list(sub.items()):
            if k not in types_:
                raise ConfigError(f"config {sec}.{k}: unknown key (saved by a different mimfast version?)")
            if isinstance(v, list) and typing.get_origin(types_[k]) in (tuple, typing.Union, types.UnionType):
                sub[k] = tuple(v)
        kwargs[sec] = cls(**sub)
    return RunConfig(**kwargs, preset=d.get("preset", ""))


def flatten_config_dict(d: dict) -> dict[str, Any]:
    """``{dotted key: value}`` of a :func:`config_to_dict` dict (tuples as lists, model.overrides kept whole)."""
    flat = {}
    for sec, sub in d.items():
        if isinstance(sub, dict):
            for k, v in sub.items():
                flat[f"{sec}.{k}"] = list(v) if isinstance(v, tuple) else v
        else:
            flat[sec] = sub
    return flat


def flatten_config(cfg: RunConfig) -> list[tuple[str, Any, str]]:
    """``[(dotted key, value, docstring)]`` in field order: what ``--print-config`` shows."""
    rows = []
    for sec in SECTIONS:
        obj = getattr(cfg, sec)
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            rows.append((f"{sec}.{f.name}", getattr(obj, f.name), docs.get(f.name, "")))
    return rows


def print_config(cfg: RunConfig, command: str) -> None:
    """``--print-config``: every key of ``cfg`` with its value and meaning, as ``key=value`` override lines."""
    print(f"# {command}: every key, as a key=value override")
    for key, value, doc in flatten_config(cfg):
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        print(f"{key}={shown}" + (f"    # {doc}" if doc else ""))

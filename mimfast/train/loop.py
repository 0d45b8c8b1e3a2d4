"""The pretraining loop: ``pretrain(cfg) -> RunResult``, in one process or one rank of a torchrun job.

One optimizer step = ``accum_steps`` micro-batches per rank (gradient all-reduce on the last one only), bf16 / fp16
autocast, an optional global-norm clip, AdamW with MAE's per-step lr (linear warm-up + half-cycle cosine, set before
every update). Each step's loss is averaged over micro-batches and ranks; its finiteness is all-reduced with MIN, so
every rank takes the same stop / skip decision and no rank is left waiting in a collective.

Per step, rank 0 appends ``{"step", "epoch", "loss", "lr", "skipped"}`` to ``out_dir/metrics.jsonl``; every
``log_every`` steps it prints a progress line (step/total, loss, lr, img/s, MFU, elapsed<remaining) and, when
enabled, writes the same scalars to TensorBoard (``out_dir/tb``). On a terminal (``train.progress``) a live bar on
stderr shows the same between the lines (:mod:`mimfast.train.progress`). Checkpoints
(:mod:`mimfast.train.checkpoint`) go to ``out_dir`` every ``ckpt_every`` steps and after the last step.

Exact resume: a checkpoint is written only at a step boundary and holds the model, optimizer, scaler, counters,
every rank's RNG states and every rank's data-loader position. A resumed run therefore replays the remaining steps
bit for bit, given the same world size, thread counts and ``train.deterministic=true`` (the debug preset's setting).
A resume that rolls back to an older checkpoint moves the abandoned timeline aside (:func:`~mimfast.train.checkpoint.
plan_resume`); SIGTERM / SIGINT / SIGUSR1 write a final checkpoint at the next step boundary on every rank and raise
:class:`~mimfast.train.signals.TrainingInterrupted` (:mod:`mimfast.train.signals`).

Every mistake in the config, the data or the resume target is a :class:`ConfigError` raised during setup, before
anything in ``out_dir`` changes; a file that DALI cannot decode mid-epoch is an ``UndecodableImageError`` naming it,
raised before the step it belongs to changes anything.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mimfast.data import DataError, build_loader

from ..models import create_model
from . import checkpoint as ckpt_mod
from . import resume as resume_mod
from .config import ConfigError, RunConfig, config_to_dict, lr_at, scaled_lr
from .distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup_distributed,
    compile_blocks,
    grad_sync,
    init_distributed,
    wrap_model,
)
from .optim import build_optimizer, param_groups, peak_flops
from .progress import ProgressBar, format_duration
from .signals import STOP_SIGNALS, StopSignals, TrainingInterrupted
from .tasks import task_for

BEST = "best.pt"
"""The best in-training evaluation's weights, in ``out_dir`` (a loadable checkpoint without optimizer state)."""

__all__ = ["NonFiniteLossError", "RunResult", "TrainingInterrupted", "param_groups", "peak_flops", "pretrain"]


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN/inf on some rank and ``train.nan_policy`` is ``stop``, or more than
    ``train.max_consecutive_skips`` steps in a row were skipped under ``skip``."""


@dataclass
class RunResult:
    """What :func:`pretrain` returns (the same on every rank, except the paths are rank 0's)."""

    step: int
    """Optimizer steps completed in total (including those before a resume)."""
    start_step: int
    """Step the run started from (0, or the resumed checkpoint's step)."""
    losses: list[float | None] = field(default_factory=list)
    """Rank-averaged loss of each step run by this call (``losses[i]`` is step ``start_step + i + 1``); None for a
    skipped non-finite step."""
    skipped: int = 0
    """Non-finite steps skipped over the whole run (``nan_policy=skip``)."""
    skipped_steps: list[int] = field(default_factory=list)
    """Their step numbers."""
    checkpoint: str | None = None
    """The last checkpoint written (or resumed from, when nothing was left to do)."""
    resumed_from: str | None = None
    """The checkpoint this call resumed from, if any."""
    out_dir: str = ""
    """The run directory."""
    metrics: str = ""
    """``out_dir/metrics.jsonl``."""
    tensorboard: str | None = None
    """TensorBoard log directory, when enabled."""
    images_per_sec: float = 0.0
    """Global training throughput of this call (all ranks, excluding the first step's warm-up)."""
    world_size: int = 1
    """Ranks in the job."""
    evals: list[dict] = field(default_factory=list)
    """In-training evaluations of this call (tasks with one, e.g. fine-tuning): ``{"step", "epoch", metric: value}``."""
    best: dict | None = None
    """The best evaluation so far over the whole run (``{"step", "epoch", "metric", "value", "path"}``), or None."""


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _dsd():
    from torch.distributed.checkpoint import state_dict as dsd

    return dsd


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a torn last line from a killed run
                rows.append(json.loads(line))
    return rows


def _checkpoint_step_of(path: Path) -> int | None:
    """The step of a checkpoint-format file (``best.pt``), None when absent or unreadable."""
    if not path.exists():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:
        return None


def _fmt_lr(x: float) -> str:
    return f"{x:.3e}"


# -------------------------------------------------------------------------------------------------------- run
class _Run:
    def __init__(self, cfg: RunConfig, info: DistInfo, on_step: Callable | None):
        self.cfg, self.info, self.on_step = cfg, info, on_step
        self.main = info.is_main
        self.out = Path(cfg.train.out_dir)
        self.progress: ProgressBar | None = None  # while the steps run: lines go through it (erasing the bar)

    def log(self, msg: str) -> None:
        if self.main:
            if self.progress is not None:
                self.progress.line(msg)
            else:
                print(msg, flush=True)

    # -------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, t, info = self.cfg, self.cfg.train, self.info
        dev = info.device
        if t.tensorboard:  # fail before building anything (every rank checks: no rank waits on a dead one)
            try:
                importlib.import_module("torch.utils.tensorboard")
            except ImportError as e:
                raise ConfigError(
                    "train.tensorboard=true needs the tensorboard package: `pip install tensorboard` (or "
                    f"`pip install -e '.[train]'`), or set train.tensorboard=false ({e})"
                ) from None
        if t.num_threads is not None:
            torch.set_num_threads(t.num_threads)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        precision = t.precision
        if dev.type == "cpu" and precision == "fp16":
            self.log("note: train.precision=fp16 is not supported on the CPU; running fp32 (use bf16 or fp32 there)")
            precision = "fp32"
        self.precision = precision
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

        # the model: same initialisation on every rank (DDP also broadcasts rank 0's parameters)
        _seed_all(t.seed)
        try:
            model = create_model(cfg.model.name, **cfg.model.overrides)
        except (TypeError, ValueError) as e:  # unknown keyword, or the model config's own validation
            raise ConfigError(
                f"model.overrides={cfg.model.overrides!r}: not accepted by {cfg.model.name}: {e}"
            ) from None
        try:
            self.task = task_for(model, cfg)
        except TypeError as e:
            raise ConfigError(f"model.name={cfg.model.name!r}: {e}") from None
        model = self.task.prepare_model(model)
        self.task.check_model(model)
        self.flops_per_image = self.task.flops_per_image(model)
        self.n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

        # the checkpoint to resume from: rank 0 decides (nothing on disk changes before setup succeeds), every rank
        # reads the same file (memory-mapped)
        ckpt = None
        self._plan: ckpt_mod.ResumePlan | None = None
        decision = broadcast_object(self._resolve_resume() if self.main else None, info)
        if isinstance(decision, str) and decision.startswith("error:"):
            raise ConfigError(decision[len("error:") :])
        self.resumed_from = decision
        if decision is None:
            self.task.initialize(model, self.log)  # fresh run: outside weights (fine-tuning's pretrained encoder)
        else:
            try:
                ckpt = ckpt_mod.load_checkpoint(decision, mmap=True)
            except ckpt_mod.CheckpointError as e:
                raise ConfigError(f"train.resume: {e}") from None
            resume_mod.check_resumable(ckpt, cfg, info.world_size)
            try:
                ckpt_mod.load_model_state(model, ckpt["model"], source=f"train.resume: checkpoint {decision}")
            except ckpt_mod.CheckpointError as e:
                saved = ckpt["config"].get("model", {})
                raise ConfigError(
                    f"{e}: it was written with model.name={saved.get('name')!r}, model.overrides="
                    f"{saved.get('overrides')!r}; this run builds model.name={cfg.model.name!r}, model.overrides="
                    f"{cfg.model.overrides!r}. Resume with the same model settings, or start a new run in another "
                    "train.out_dir"
                ) from None
        model.to(dev)
        if t.compile:
            compile_blocks(model)
        self.module = model
        self.model = wrap_model(model, t.dist, info)

        # batch arithmetic and MAE's lr scaling
        accum = cfg.optim.accum_steps
        if accum is None:
            accum = 1
            if t.global_batch_size is not None:
                per_step = t.batch_size * info.world_size
                if t.global_batch_size % per_step:
                    raise ConfigError(
                        f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                        f"batch_size * world_size = {per_step}"
                    )
                accum = t.global_batch_size // per_step
        self.accum = accum
        self.eff_batch = t.batch_size * accum * info.world_size
        if t.global_batch_size is not None and self.eff_batch != t.global_batch_size:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} but batch_size * accum_steps * "
                f"world_size = {self.eff_batch}"
            )
        self.peak_lr = scaled_lr(cfg.optim, self.eff_batch)
        self.opt_specs = self.task.optimizer_specs(self.module)
        self.optimizers = [
            build_optimizer(sp.groups, cfg, self.peak_lr * sp.lr_scale, dev, self.log, betas=sp.betas)
            for sp in self.opt_specs
        ]
        self.scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None

        # data
        loader_state = None
        if ckpt is not None:  # check_resumable made sure it holds one loader state per rank
            loader_state = ckpt_mod.decode_object(ckpt["loader"][info.rank])
        try:
            self.loader = build_loader(
                cfg.data,
                batch_size=t.batch_size,
                split="train",
                rank=info.rank,
                world_size=info.world_size,
                device_id=dev.index if dev.type == "cuda" else None,
                state=loader_state,
            )
        except DataError as e:
            raise resume_mod.data_config_error(e, cfg, self.resumed_from) from None
        self.task.check_data(self.module, self.loader)
        self.val_loader = None
        if self.task.best_metric is not None:
            try:
                self.val_loader = build_loader(cfg.data, batch_size=t.batch_size, split="val", mode="eval",
                                               rank=info.rank, world_size=info.world_size,
                                               device_id=dev.index if dev.type == "cuda" else None)  # fmt: skip
            except DataError as e:
                raise resume_mod.data_config_error(e, cfg, self.resumed_from) from None
        self.best: dict | None = None
        n_batches = len(self.loader)
        self.steps_per_epoch = n_batches // accum
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"data: {n_batches} batches of {t.batch_size} per rank per epoch, fewer than "
                f"accum_steps={accum}; use a smaller train.batch_size or more data"
            )
        self.total_steps = t.epochs * self.steps_per_epoch
        self.stop = min(self.total_steps, t.max_steps) if t.max_steps is not None else self.total_steps
        self.warmup_steps = cfg.optim.warmup_epochs * self.steps_per_epoch

        # counters, optimizer / scaler state and, last of all (setup draws random numbers), every RNG
        self.step = self.sched_step = self.skipped = 0
        self.skipped_steps: list[int] = []
        self._rng_to_restore: dict | None = None
        if ckpt is not None:
            self._load_state(ckpt)
        self.start_step = self.step

        # rank 0 owns the run directory; a failure there (permissions, no tensorboard) stops every rank, not just 0
        failure = None
        if self.main:
            try:
                self._setup_outputs()
            except Exception as e:
                failure = e
        if broadcast_object(None if failure is None else repr(failure), info) is not None:
            raise failure if failure is not None else RuntimeError("rank 0 failed to set up train.out_dir")
        self._print_header()

    def _resolve_resume(self) -> str | None:
        """Rank 0: the checkpoint path to resume from, None, or ``"error:<message>"`` (broadcast to all ranks)."""
        try:
            self._plan = resume_mod.plan(self.cfg.train, self.out)
        except ConfigError as e:
            return f"error:{e}"
        if self._plan.path is None:
            if self.cfg.train.resume is not None:
                self.log(f"resume=auto: no checkpoint in {str(self.out)!r}; starting fresh")
            return None
        return str(self._plan.path)

    def _load_state(self, ckpt: dict) -> None:
        info, tr = self.info, ckpt.get("train", {})
        saved_shape = (tr.get("steps_per_epoch", self.steps_per_epoch), tr.get("accum_steps", self.accum))
        if saved_shape != (self.steps_per_epoch, self.accum):
            raise ConfigError(
                f"train.resume: checkpoint has {tr.get('steps_per_epoch')} steps/epoch x {tr.get('accum_steps')} "
                f"micro-batches, this run {self.steps_per_epoch} x {self.accum}: optim.accum_steps / "
                "train.global_batch_size (or the dataset) changed; exact resume needs the same"
            )
        changed = resume_mod.config_changes(ckpt, self.cfg)
        if changed and self.main:
            warnings.warn(
                "resuming with a different config (the resumed run will not replay the original exactly): "
                + ", ".join(changed),
                stacklevel=3,
            )
        dsd = _dsd()
        dsd.set_optimizer_state_dict(
            self.module, self.optimizers, ckpt["optimizer"], options=dsd.StateDictOptions(full_state_dict=True)
        )
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.sched_step = int(tr.get("sched_step", self.step))
        self.skipped = int(tr.get("skipped", 0))
        self.skipped_steps = list(tr.get("skipped_steps", []))
        rngs = ckpt.get("rng") or []
        if len(rngs) != info.world_size:
            raise ConfigError(
                f"train.resume: checkpoint holds RNG states of {len(rngs)} rank(s), job has {info.world_size}"
            )
        self._rng_to_restore = rngs[info.rank]
        self.best = tr.get("best")
        self.task.load_state_dict(ckpt.get("task"), self.model)

    def _setup_outputs(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        rows = _read_jsonl(self.metrics_path)
        plan = self._plan
        if plan is not None and plan.set_aside:
            # a rollback (or a resume from another directory, or past unreadable files): the checkpoints of the
            # abandoned timeline, and the metrics they logged, move to out_dir/abandoned/ instead of being pruned
            foreign = plan.path is not None and plan.path.parent.resolve() != self.out.resolve()
            gone = [r for r in rows if foreign or r.get("step", 0) > self.start_step]
            dest = ckpt_mod.set_aside(self.out, plan.set_aside, from_step=self.start_step, why=plan.why,
                                      metrics=[json.dumps(r) for r in gone])  # fmt: skip
            rows = [] if foreign else rows
            names = ", ".join(p.name for p in plan.set_aside) or "none"
            self.log(f"note: {plan.why.strip()} Moved {len(plan.set_aside)} checkpoint(s) ({names}) and "
                     f"{len(gone)} metrics line(s) to {dest}: nothing was deleted, and no newer checkpoint can shadow "
                     "this run.")  # fmt: skip
        ckpt_mod.atomic_save_json(config_to_dict(self.cfg), self.out / "config.json")
        # metrics.jsonl reflects the steps that count: drop records past the resumed step (a killed run's tail)
        rows = [r for r in rows if r.get("step", 0) <= self.start_step]
        ckpt_mod.atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        self.metrics_file = open(self.metrics_path, "a", buffering=1)
        # eval.jsonl (in-training evaluations) and best.pt follow the same timeline
        eval_path = self.out / "eval.jsonl"
        erows = _read_jsonl(eval_path)
        later = [r for r in erows if r.get("step", 0) > self.start_step]
        best_path = self.out / BEST
        best_step = _checkpoint_step_of(best_path)
        if later or (best_step is not None and best_step > self.start_step):
            dest = self.out / ckpt_mod.ABANDONED / f"eval-after-step-{self.start_step}"
            dest.mkdir(parents=True, exist_ok=True)
            if later:
                ckpt_mod.atomic_write_text(dest / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in later))
            if best_step is not None and best_step > self.start_step:
                best_path.replace(dest / BEST)
            self.log(f"note: evaluations / best.pt written after step {self.start_step} by an abandoned timeline "
                     f"moved to {dest}")  # fmt: skip
        erows = [r for r in erows if r.get("step", 0) <= self.start_step]
        ckpt_mod.atomic_write_text(eval_path, "".join(json.dumps(r) + "\n" for r in erows))
        self.eval_file = open(eval_path, "a", buffering=1)
        self.tb = None
        self.tb_dir = None
        if self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = self.out / "tb"
            self.tb = SummaryWriter(str(self.tb_dir), purge_step=self.start_step + 1)

    def _print_header(self) -> None:
        c, t, info = self.cfg, self.cfg.train, self.info
        where = f"{info.world_size} x {info.device.type}" + (f" ({t.dist}, {info.backend})" if info.distributed else "")
        cmd = "finetune" if self.task.name == "finetune" else "pretrain"
        self.log(
            f"mimfast {cmd} | {c.preset or 'custom'} | {c.model.name} ({self.n_params / 1e6:.1f}M params) | "
            f"{where} | {self.precision}"
        )
        self.log(
            f"  data {c.data.root} at {c.data.img_size}px: {len(self.loader)} batches x {t.batch_size}/rank per "
            f"epoch -> {self.steps_per_epoch} steps/epoch; effective batch {self.eff_batch} "
            f"({t.batch_size} x {self.accum} accum x {info.world_size} ranks)"
        )
        self.log(
            f"  lr {_fmt_lr(self.peak_lr)} (blr {c.optim.blr:g} x {self.eff_batch}/256"
            f"{', set directly' if c.optim.lr is not None else ''}), warm-up {self.warmup_steps:g} steps, "
            f"cosine to step {self.total_steps}; running steps {self.start_step + 1}..{self.stop}"
        )
        if self.resumed_from:
            self.log(f"  resumed from {self.resumed_from} (step {self.start_step})")

    # ------------------------------------------------------------------------------------------------- state
    def _checkpoint(self) -> str | None:
        """Gather the full state (collective: every rank calls this) and write it on rank 0."""
        info = self.info
        dsd = _dsd()
        opts = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = dsd.get_model_state_dict(self.module, options=opts)
        optim_sd = dsd.get_optimizer_state_dict(self.module, self.optimizers, options=opts)
        rngs = all_gather_object(ckpt_mod.capture_rng_state(info.device), info)
        loaders = all_gather_object(self.loader.state_dict(), info)
        if not self.main:
            return None
        state = {
            "step": self.step,
            "model": model_sd,
            "optimizer": optim_sd,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "train": {
                "sched_step": self.sched_step,
                "epoch": self.step / self.steps_per_epoch,
                "skipped": self.skipped,
                "skipped_steps": list(self.skipped_steps),
                "steps_per_epoch": self.steps_per_epoch,
                "accum_steps": self.accum,
                "world_size": info.world_size,
                "peak_lr": self.peak_lr,
                "best": self.best,
            },
            "task": self.task.state_dict(),
            "rng": rngs,
            "loader": [ckpt_mod.encode_object(s) for s in loaders],
            "config": config_to_dict(self.cfg),
        }
        protect = (self.resumed_from,) if self.resumed_from else ()
        return str(ckpt_mod.save_checkpoint(self.out, state, keep_last=self.cfg.train.keep_last, protect=protect))

    # -------------------------------------------------------------------------------------------------- train
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def _train_step(self, it) -> tuple[float | None, dict, bool, float, int | None]:
        """One optimizer step (of every optimizer of the task) over ``accum`` micro-batches.

        Returns (rank-mean loss or None, rank-mean metrics, applied, lr, stop); stop is the stop signal some rank
        received, or None. Finiteness, stop requests, losses and metrics travel in one all-reduce, so every rank takes
        the same decisions.
        """
        info, dev, accum = self.info, self.info.device, self.accum
        sums: torch.Tensor | None = None  # [loss of each optimizer ..., metric ...] summed over micro-batches
        metric_keys: list[str] = []
        for a in range(accum):
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(
                    f"data loader ended after fewer batches than len(loader)={len(self.loader)} promised "
                    f"(step {self.step + 1}, micro-batch {a})"
                ) from None
            with grad_sync(self.model, a == accum - 1):
                with self._autocast():
                    losses, metrics = self.task.losses(self.model, batch, dev, self.step)
                total = sum(losses[sp.name] for sp in self.opt_specs) / accum
                (self.scaler.scale(total) if self.scaler is not None else total).backward()
            metric_keys = sorted(metrics)
            vals = [losses[sp.name].detach().float().reshape(()) for sp in self.opt_specs]
            vals += [torch.as_tensor(metrics[k], device=dev).detach().float().reshape(()) for k in metric_keys]
            sums = torch.stack(vals) if sums is None else sums + torch.stack(vals)
        n_loss = len(self.opt_specs)
        # [ranks with a non-finite loss, ranks that got each stop signal, losses and metrics summed over ranks]
        head = torch.zeros(1 + len(STOP_SIGNALS), device=dev)
        head[0] = (~torch.isfinite(sums[:n_loss]).all()).to(torch.float32)
        if self.signals.signum is not None:
            head[1 + STOP_SIGNALS.index(self.signals.signum)] = 1.0
        packed = all_reduce_sum(torch.cat([head, sums / accum]), info).tolist()
        n_bad, got, rest = packed[0], packed[1 : len(head)], [v / info.world_size for v in packed[len(head) :]]
        ok, loss_val = n_bad == 0, rest[0]
        metrics_out = {sp.name: v for sp, v in zip(self.opt_specs[1:], rest[1:n_loss], strict=True)}
        metrics_out.update(zip(metric_keys, rest[n_loss:], strict=True))
        stop = next((s for s, n in zip(STOP_SIGNALS, got, strict=True) if n > 0), None)
        lr = lr_at(
            self.sched_step,
            peak=self.peak_lr,
            min_lr=self.cfg.optim.min_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
        )
        applied = False
        if ok:
            active = list(zip(self.opt_specs, self.optimizers, strict=True))
            for sp, o in active:
                for g in o.param_groups:  # a group's own lr_scale: layer-wise lr decay
                    g["lr"] = lr * sp.lr_scale * g.get("lr_scale", 1.0)
                if self.scaler is not None:
                    self.scaler.unscale_(o)
                if self.cfg.optim.clip_grad is not None:
                    params = [p for g in o.param_groups for p in g["params"]]
                    nn.utils.clip_grad_norm_(params, self.cfg.optim.clip_grad)
            if self.scaler is not None:
                scale = self.scaler.get_scale()
                for _, o in active:
                    self.scaler.step(o)
                self.scaler.update()
                applied = self.scaler.get_scale() >= scale  # the scaler skips steps with inf/nan gradients
            else:
                for _, o in active:
                    o.step()
                applied = True
            if applied:
                self.sched_step += 1
                self.task.after_step(self.model)
        elif self.cfg.train.nan_policy == "stop":
            raise NonFiniteLossError(
                f"step {self.step + 1}: the loss is not finite ({loss_val}) on at least one rank; stopping "
                f"(train.nan_policy=stop). {self._last_checkpoint_note()} Lower optim.blr / set optim.clip_grad, or "
                "pass train.nan_policy=skip to drop such steps and continue."
            )
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        return (loss_val if ok else None), metrics_out, applied, lr, stop

    def _last_checkpoint_note(self) -> str:
        if self.last_checkpoint is None:
            return "No checkpoint has been written yet (the run started from scratch): nothing to resume from."
        return f"The last checkpoint is {self.last_checkpoint} (resume from it with train.resume=auto)."

    def run(self) -> RunResult:
        self.setup()
        t, info = self.cfg.train, self.info
        result = RunResult(
            step=self.step,
            start_step=self.start_step,
            out_dir=str(self.out),
            resumed_from=self.resumed_from,
            world_size=info.world_size,
            metrics=str(self.out / "metrics.jsonl"),
        )
        result.checkpoint = self.resumed_from
        if self._rng_to_restore is not None:
            ckpt_mod.restore_rng_state(self._rng_to_restore, info.device)
        else:
            _seed_all(t.seed + 1000003 * info.rank)  # each rank its own masking noise
        self.model.train()
        if self.step >= self.stop:
            self.log(f"nothing to do: step {self.step} >= {self.stop}")
        self.progress = ProgressBar(self.start_step, self.stop, live=self.main and ProgressBar.wanted(t.progress))
        self.last_checkpoint = self.resumed_from
        try:
            with StopSignals() as self.signals:
                self._loop(result)
        finally:  # on any error too: what was logged is flushed and closed; no checkpoint of a half-done step
            self.progress.close()
            self.progress = None
            if self.main:
                self.metrics_file.close()
                self.eval_file.close()
                if self.tb is not None:
                    self.tb.close()
        result.step, result.skipped, result.skipped_steps = self.step, self.skipped, list(self.skipped_steps)
        if self.main:
            if self.tb is not None:
                result.tensorboard = str(self.tb_dir)
            self.log(f"done: step {self.step}/{self.stop}, {self.skipped} skipped step(s)")
            self.log(f"  checkpoint : {result.checkpoint}")
            self.log(f"  metrics    : {result.metrics}")
            self.log(f"  tensorboard: {'tensorboard --logdir ' + str(self.tb_dir) if self.tb_dir else 'off'}")
        return result

    def _loop(self, result: RunResult) -> None:
        t, info, bar = self.cfg.train, self.info, self.progress
        peak = peak_flops(info.device)
        t_window, steps_window = time.perf_counter(), 0  # img/s and MFU over the steps since the last line
        in_a_row = 0  # consecutive skipped (non-finite) steps
        while self.step < self.stop:
            epoch = self.step // self.steps_per_epoch
            it = iter(self.loader)
            while self.step < self.stop and self.step // self.steps_per_epoch == epoch:
                loss, metrics, applied, lr, stop = self._train_step(it)
                self.step += 1
                if loss is None:
                    self.skipped += 1
                    self.skipped_steps.append(self.step)
                    in_a_row += 1
                    self.log(
                        f"warning: step {self.step}: non-finite loss, update skipped (train.nan_policy=skip; "
                        f"{self.skipped} skipped so far, {in_a_row} in a row)"
                    )
                else:
                    in_a_row = 0
                result.losses.append(loss)
                if self.step % self.steps_per_epoch == 0:
                    for _ in it:  # the epoch's leftover micro-batches (< accum_steps): the next iter() is a new epoch
                        pass
                now = time.perf_counter()
                steps_window += 1
                ips = steps_window * self.eff_batch / max(now - t_window, 1e-9)
                mfu = self._mfu(ips, peak)
                bar.update(self.step, loss, lr, ips, mfu)  # every rank keeps the timing; rank 0 draws
                if self.main:
                    rec = {
                        "step": self.step,
                        "epoch": round(self.step / self.steps_per_epoch, 6),
                        "loss": loss,
                        "lr": lr,
                        "skipped": loss is None or not applied,
                        **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()},
                    }
                    self.metrics_file.write(json.dumps(rec) + "\n")
                if self.step % t.log_every == 0 or self.step == self.stop:
                    shown = "nan (skipped)" if loss is None else f"{loss:.4f}"
                    extra = "".join(f" | {k} {v:.4g}" for k, v in metrics.items())
                    self.log(
                        f"step {self.step:>6}/{self.stop} | epoch {self.step / self.steps_per_epoch:6.2f} | "
                        f"loss {shown}{extra} | lr {_fmt_lr(lr)} | {ips:8.1f} img/s | "
                        f"mfu {'n/a' if mfu is None else f'{mfu:.1%}'} | "
                        f"{format_duration(bar.elapsed(now))}<{format_duration(bar.eta(self.step, now))}"
                    )
                    if self.main and self.tb is not None:
                        if loss is not None:
                            self.tb.add_scalar("train/loss", loss, self.step)
                        self.tb.add_scalar("train/lr", lr, self.step)
                        for k, v in metrics.items():
                            self.tb.add_scalar(f"train/{k}", v, self.step)
                        self.tb.add_scalar("perf/img_per_sec", ips, self.step)
                        if mfu is not None:
                            self.tb.add_scalar("perf/mfu", mfu, self.step)
                        self.tb.flush()
                    t_window, steps_window = time.perf_counter(), 0
                if self.val_loader is not None and (self.step == self.stop or (
                        self.step % self.steps_per_epoch == 0
                        and (self.step // self.steps_per_epoch) % self.task.eval_every() == 0)):  # fmt: skip
                    result.evals.append(self._evaluate())
                    result.best = self.best
                if (t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == self.stop or stop is not None:
                    path = self._checkpoint()
                    self.last_checkpoint = str(ckpt_mod.checkpoint_path(self.out, self.step))
                    if path:
                        result.checkpoint = path
                if self.on_step is not None:
                    self.on_step(self.step, self.module, {"loss": loss, "lr": lr, "skipped": loss is None})
                if stop is not None and self.step < self.stop:  # (a signal during the last step: the run is done)
                    raise TrainingInterrupted(int(stop), self.step, self.last_checkpoint, str(self.out))
                if t.max_consecutive_skips and in_a_row >= t.max_consecutive_skips:
                    raise NonFiniteLossError(
                        f"step {self.step}: {in_a_row} steps in a row had a non-finite loss and were skipped "
                        f"(train.max_consecutive_skips={t.max_consecutive_skips}): the run has diverged. "
                        f"{self._last_checkpoint_note()} Lower optim.blr / set optim.clip_grad, or raise the limit "
                        "(0 = no limit)."
                    )
        rate = bar.steps_per_sec()
        if rate:
            result.images_per_sec = rate * self.eff_batch

    def _evaluate(self) -> dict:
        """The task's evaluation on every rank's share of the val split (collective), logged on rank 0; a new best
        of ``task.best_metric`` writes ``out_dir/best.pt`` (model weights + config + these metrics)."""
        info, t0 = self.info, time.perf_counter()
        sums = self.task.evaluate(self.model, self.val_loader, info.device, self._autocast)
        keys = sorted(sums)
        flat = all_reduce_sum(torch.cat([sums[k].double().reshape(-1) for k in keys]), info).cpu()
        sizes = [sums[k].numel() for k in keys]
        reduced = dict(zip(keys, flat.split(sizes), strict=True))
        metrics = self.task.eval_metrics(reduced)
        epoch = self.step / self.steps_per_epoch
        rec = {"step": self.step, "epoch": round(epoch, 6), **metrics}
        name = self.task.best_metric
        value = metrics[name]
        improved = self.best is None or value > self.best["value"]
        if improved:
            self.best = {"step": self.step, "epoch": round(epoch, 6), "metric": name, "value": value,
                         "path": str(self.out / BEST)}  # fmt: skip
            self._save_best(metrics)
        if self.main:
            self.eval_file.write(json.dumps(rec) + "\n")
            shown = " | ".join(f"{k} {100 * v:.2f}%" if "top" in k else f"{k} {v:.4f}" for k, v in metrics.items())
            self.log(f"eval  step {self.step:>6} | epoch {epoch:6.2f} | {shown} | best {name} "
                     f"{100 * self.best['value']:.2f}% (epoch {self.best['epoch']:g})"
                     f"{' -> ' + BEST if improved else ''} | {time.perf_counter() - t0:.1f} s")  # fmt: skip
            if self.tb is not None:
                for k, v in metrics.items():
                    self.tb.add_scalar(f"eval/{k}", v, self.step)
                self.tb.flush()
        return rec

    def _save_best(self, metrics: dict) -> None:
        """Collective (the full state dict is gathered on every rank); rank 0 writes ``best.pt`` atomically."""
        dsd = _dsd()
        opts = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = dsd.get_model_state_dict(self.module, options=opts)
        if self.main:
            state = {"format": ckpt_mod.FORMAT, "step": self.step, "model": model_sd,
                     "config": config_to_dict(self.cfg), "eval": metrics, "kind": "best", "complete": True}  # fmt: skip
            ckpt_mod.atomic_save(state, self.out / BEST)

    def _mfu(self, ips: float | None, peak: float | None) -> float | None:
        """Model FLOP utilisation at ``ips`` images/s over all ranks (None without a known peak or FLOP count)."""
        if ips is None or not peak or not self.flops_per_image:
            return None
        return self.flops_per_image * ips / (peak * self.info.world_size)


def pretrain(cfg: RunConfig, *, on_step: Callable[[int, nn.Module, dict], None] | None = None) -> RunResult:
    """Run (or resume) pretraining as configured; in one process or as one rank of a ``torchrun`` job.

    Args:
        cfg: the run config (:func:`mimfast.train.get_config`).
        on_step: optional ``on_step(step, model, metrics)`` called on every rank after each optimizer step (and
            after that step's checkpoint), with the unwrapped model and ``{"loss", "lr", "skipped"}``.

    Raises:
        ConfigError: bad config / paths / resume target (before any training).
        NonFiniteLossError: a non-finite loss under ``train.nan_policy=stop``.
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg: expected a RunConfig, got {type(cfg).__name__}")
    cfg.check_paths()
    # process-wide torch settings the run changes (threads, determinism) are restored afterwards
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    info = init_distributed(cfg.train.device)
    try:
        result = _Run(cfg, info, on_step).run()
        barrier(info)  # every rank is past its last collective before the group goes away
        return result
    finally:
        cleanup_distributed(info)
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        sys.stdout.flush()

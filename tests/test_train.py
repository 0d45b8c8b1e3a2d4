"""mimfast.train: configs and overrides, MAE's lr recipe, the debug pretraining run, exact resume after SIGKILL,
crash-safe checkpoints, 2-process gloo DDP (and FSDP2) with the collective NaN guard.

Training runs use the ``mae_debug`` preset (tiny MAE, built-in dataset at 32 px, CPU) with a few steps. The Triton
interpreter is switched off for them (``TRITON_INTERPRET=0``): the model then runs its registered CPU kernels, the
plain-torch references, which the kernel tests cover separately; through the interpreter a step takes ~20x longer.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from conftest import free_port, run_spawned_ranks
from mimfast.models import create_model
from mimfast.train import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    get_config,
    list_configs,
    load_checkpoint,
    lr_at,
    param_groups,
    pretrain,
    scaled_lr,
)
from mimfast.train import checkpoint as ckpt_mod
from mimfast.train import progress as progress_mod
from mimfast.train.progress import ProgressBar, format_duration

REPO = Path(__file__).resolve().parents[1]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# training reads data through mimfast.data's DALI pipelines: `pip install -e ".[train]"` (CI installs it)
needs_dali = pytest.mark.skipif(not _importable("nvidia.dali"), reason="needs nvidia-dali-cuda130 (the [train] extra)")
HAS_TENSORBOARD = _importable("tensorboard")


@pytest.fixture
def no_interpreter(monkeypatch):
    """Registered CPU kernels (plain torch) instead of the Triton interpreter for whole training runs."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _debug(out: Path, *overrides: str) -> RunConfig:
    return get_config("mae_debug", [f"train.out_dir={out}", *overrides])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(TRITON_INTERPRET="0", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# ------------------------------------------------------------------------------------------------------ configs
def test_presets_are_valid_and_match_their_models():
    assert set(list_configs()) >= {"mae_vit_base", "mae_vit_large", "mae_vit_huge", "mae_debug"}
    for name in list_configs():
        cfg = get_config(name)
        assert cfg.preset == name
        with torch.device("meta"):
            model = create_model(cfg.model.name, **cfg.model.overrides)
        assert model.config.img_size == cfg.data.img_size, name
        assert config_from_dict(config_to_dict(cfg)) == cfg, name  # what checkpoints store round-trips
    for name in ("mae_vit_base", "mae_vit_large", "mae_vit_huge"):
        cfg = get_config(name)
        # MAE's recipe: 800 epochs, 40 warm-up, 4096 images per step, blr 1.5e-4, AdamW(0.9, 0.95), wd 0.05
        assert (cfg.train.epochs, cfg.optim.warmup_epochs, cfg.train.global_batch_size) == (800, 40.0, 4096)
        assert (cfg.optim.blr, cfg.optim.betas, cfg.optim.weight_decay) == (1.5e-4, (0.9, 0.95), 0.05)
        assert cfg.model.mask_ratio == 0.75 and cfg.train.precision == "bf16"
        assert 4096 % cfg.train.batch_size == 0
    debug = get_config("mae_debug")
    assert debug.model.name == "mae_vit_tiny_patch4_dec64d2b_debug" and debug.data.root == "builtin"
    assert debug.train.deterministic and debug.train.precision == "fp32"


def test_overrides_coerce_to_the_field_types():
    base = get_config("mae_debug")
    cfg = apply_overrides(base, ["optim.blr=1e-4", "train.epochs=3", "train.tensorboard=false", "optim.clip_grad=1",
                                 "train.max_steps=none", "optim.betas=0.8,0.99", "data.root=/data/imagenet",
                                 "model.overrides.norm_pix_loss=false", "train.global_batch_size=2.048e3",
                                 "out=/tmp/somewhere", "resume=auto", "train.precision=bf16"])  # fmt: skip
    assert cfg.optim.blr == 1e-4 and isinstance(cfg.optim.blr, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.tensorboard is False and cfg.train.max_steps is None
    assert cfg.optim.clip_grad == 1.0 and isinstance(cfg.optim.clip_grad, float)
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.data.root == "/data/imagenet"
    assert cfg.model.overrides == {"norm_pix_loss": False}
    assert cfg.train.global_batch_size == 2048 and isinstance(cfg.train.global_batch_size, int)
    assert cfg.train.out_dir == "/tmp/somewhere" and cfg.train.resume == "auto" and cfg.train.precision == "bf16"
    # presets are fresh copies: nothing leaked into the preset or into `base`
    assert get_config("mae_debug") == base and base.optim.blr == 0.04 and base.model.overrides == {}


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.epoch=3", r"'train\.epoch': unknown key; valid keys: .*train\.epochs"),
        ("foo.bar=1", r"unknown key; valid keys: model\.name"),
        ("optim=1", r"unknown key"),
        ("train.epochs", r"expected key=value"),
        ("train.epochs=three", r"train\.epochs='three': expected an int"),
        ("train.epochs=2.5", r"train\.epochs='2\.5': expected an int"),
        ("optim.blr=fast", r"optim\.blr='fast': expected a float"),
        ("train.tensorboard=maybe", r"expected a bool"),
        ("train.precision=fp8", r"expected one of bf16, fp16, fp32"),
        ("train.batch_size=0", r"train\.batch_size: expected an int >= 1, got 0"),
        ("model.mask_ratio=1.0", r"model\.mask_ratio: expected a float in \[0, 1\)"),
        ("model.name=vit_b", r"model\.name: expected a registered model name \(beit_base_patch16_224, .*mae_vit_base"),
        ("optim.betas=0.9", r"optim\.betas.*expected 2 comma-separated values"),
        ("optim.betas=0.9,1.5", r"optim\.betas: expected two floats in \[0, 1\)"),
        ("train.global_batch_size=100", r"train\.global_batch_size: expected a multiple of train\.batch_size=32"),
        ("optim.accum_steps=0", r"optim\.accum_steps: expected None or an int >= 1, got 0"),
        ("train.dist=zero3", r"train\.dist=.zero3.: expected one of ddp, fsdp2"),
        ("train.nan_policy=ignore", r"expected one of stop, skip"),
        ("train.progress=fancy", r"train\.progress=.fancy.: expected one of auto, bar, lines"),
    ],
)
def test_bad_overrides_give_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        get_config("mae_debug", [override])


def test_bad_paths_and_names_give_clear_errors(tmp_path, capsys, no_interpreter):
    with pytest.raises(ConfigError, match=r"config: unknown preset 'mae_tiny'; presets: .*mae_debug"):
        get_config("mae_tiny")
    with pytest.raises(ConfigError, match=r"data\.root: no such file or directory '/nonexistent/imagenet'"):
        pretrain(_debug(tmp_path, "data.root=/nonexistent/imagenet"))
    with pytest.raises(ConfigError, match=r"train\.resume: no such checkpoint file or run directory"):
        pretrain(_debug(tmp_path, f"train.resume={tmp_path / 'nope.pt'}"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"train\.out_dir: .* exists and is not a directory"):
        pretrain(_debug(tmp_path / "file"))
    with pytest.raises(ConfigError, match=r"model\.overrides=\{'bogus': 1\}: not accepted by mae_vit_tiny"):
        pretrain(_debug(tmp_path / "run", "model.overrides.bogus=1"))
    with pytest.raises(ConfigError, match=r"data\.img_size=64 but model mae_vit_tiny_patch4_dec64d2b_debug takes 32"):
        pretrain(_debug(tmp_path / "run", "data.img_size=64"))
    # the command line reports the same errors with exit status 2 and lists the valid keys
    from mimfast.cli import main

    assert main(["pretrain", "--config", "mae_debug", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key" in err and "train.epochs" in err and "optim.blr" in err and "data.root" in err


def test_cli_print_config_lists_every_key(capsys):
    from mimfast.cli import main

    assert main(["pretrain", "--config", "mae_vit_base", "optim.blr=2e-4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "optim.blr=0.0002" in out and "train.epochs=800" in out and "optim.betas=0.9,0.95" in out
    assert "model.name=mae_vit_base_patch16_dec512d8b" in out and "# Base learning rate per 256 images" in out
    assert main(["pretrain", "--list-configs"]) == 0
    assert capsys.readouterr().out.split() == list_configs()


def test_lr_scaling_and_schedule():
    base = get_config("mae_vit_base")
    assert scaled_lr(base.optim, 4096) == pytest.approx(1.5e-4 * 16)  # MAE: lr = blr * eff_batch / 256 = 2.4e-3
    assert scaled_lr(base.optim, 256) == pytest.approx(1.5e-4)
    assert scaled_lr(apply_overrides(base, ["optim.lr=1e-3"]).optim, 4096) == 1e-3  # an absolute lr wins
    peak, lo, warm, total = 2.4e-3, 1e-6, 40.0, 800.0
    at = lambda s: lr_at(s, peak=peak, min_lr=lo, warmup_steps=warm, total_steps=total)  # noqa: E731
    assert at(0) == 0.0  # MAE's first update runs at lr 0
    assert at(10) == pytest.approx(peak / 4) and at(20) == pytest.approx(peak / 2)
    assert at(40) == pytest.approx(peak)  # end of warm-up = start of the cosine
    assert at(420) == pytest.approx((peak + lo) / 2)  # half-way through the cosine
    assert at(40 + 760 / 4) == pytest.approx(lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert at(800) == pytest.approx(lo) and at(900) == pytest.approx(lo)
    assert all(at(s) >= at(s + 1) for s in range(40, 800))  # monotone decay
    assert lr_at(3, peak=1.0, min_lr=0.0, warmup_steps=0, total_steps=10) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.3))
    )


def test_weight_decay_groups_follow_mae():
    model = create_model("mae_vit_tiny_patch4_dec64d2b_debug")
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay, decay = ({names[id(p)] for p in g["params"]} for g in param_groups(model, 0.05))
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= decay
    assert not any(n.endswith(".bias") or "norm" in n for n in decay)
    assert "pos_embed" not in no_decay | decay and "decoder_pos_embed" not in no_decay | decay  # frozen sin-cos
    # the official script's grouping (only 1-D / bias exempt): the tokens decay
    no_decay_off, decay_off = (
        {names[id(p)] for p in g["params"]} for g in param_groups(model, 0.05, no_decay_tokens=False)
    )
    assert {"cls_token", "mask_token"} <= decay_off and "cls_token" not in no_decay_off


# ------------------------------------------------------------------------------------------------ training run
def test_progress_bar_draws_in_place_and_yields_to_lines(monkeypatch, capsys):
    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: clock[0])
    err = io.StringIO()
    bar = ProgressBar(10, 20, live=True, stream=err, max_hz=1.0)
    assert bar.eta(10) is None
    bar.update(11, 0.5, 1e-3, None, None)  # the first step: start-up, not in the rate
    first = "step 11/20 [##......................]  10% | loss 0.5000 | lr 1.00e-03 | ? img/s | mfu n/a | 0:00<?"
    assert err.getvalue() == "\r\x1b[K" + first
    clock[0] += 0.5
    bar.update(12, 0.4, 1e-3, 64.0, 0.25)  # within 1 / max_hz of the last draw: not redrawn
    assert err.getvalue().count("\r") == 1
    clock[0] += 1.5  # 2 s for 2 steps after the first: 1 s per step, 7 steps left
    bar.update(13, None, 2e-3, 1234.5, 0.25)
    assert bar.eta(13) == pytest.approx(7.0)
    third = "step 13/20 [#######.................]  30% | loss nan | lr 2.00e-03 | 1,234 img/s | mfu 25.0% | 0:02<0:07"
    assert err.getvalue().endswith(third)
    n = len(err.getvalue())
    bar.line("step     13/20 | a permanent line")
    assert capsys.readouterr().out == "step     13/20 | a permanent line\n"
    assert err.getvalue()[n:] == "\r\x1b[K" + bar.text  # erased before the line, redrawn after
    clock[0] += 0.01
    bar.update(20, 0.3, 0.0, 1000.0, None)  # the last step is always drawn
    assert "step 20/20 [########################] 100%" in err.getvalue()[n:]
    bar.close()
    assert err.getvalue().endswith("\r\x1b[K")
    quiet = io.StringIO()
    lines_only = ProgressBar(0, 5, live=False, stream=quiet)
    lines_only.update(1, 0.5, 1e-3, 10.0, None)
    lines_only.line("x")
    lines_only.close()
    assert quiet.getvalue() == "" and capsys.readouterr().out == "x\n"


def test_progress_mode_and_durations():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert ProgressBar.wanted("bar", io.StringIO()) and not ProgressBar.wanted("lines", Tty())
    assert ProgressBar.wanted("auto", Tty()) and not ProgressBar.wanted("auto", io.StringIO())
    assert [format_duration(x) for x in (None, -1.0, float("nan"), 0, 59.6, 61, 3600 * 2 + 65)] == [
        "?", "?", "?", "0:00", "1:00", "1:01", "2:01:05"]  # fmt: skip


@needs_dali
def test_debug_pretraining_lowers_the_loss(tmp_path, capsys, no_interpreter):
    out = tmp_path / "run"
    cfg = _debug(out, "train.max_steps=30", "train.ckpt_every=10", "train.log_every=10", "train.tensorboard=true",
                 "train.progress=bar")  # fmt: skip
    if not HAS_TENSORBOARD:  # the clear error, then the same run without TensorBoard
        with pytest.raises(ConfigError, match=r"train\.tensorboard=true needs the tensorboard package"):
            pretrain(cfg)
        cfg = apply_overrides(cfg, ["train.tensorboard=false"])
    res = pretrain(cfg)
    assert res.step == 30 and res.start_step == 0 and len(res.losses) == 30 and res.skipped == 0
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert all(math.isfinite(x) for x in res.losses)
    assert last < 0.8 * first, f"loss did not drop: first 5 steps {first:.4f}, last 5 {last:.4f}"

    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert [r["loss"] for r in rows] == res.losses
    ck = load_checkpoint(out)
    spe = ck["train"]["steps_per_epoch"]
    assert rows[-1]["epoch"] == pytest.approx(30 / spe)
    peak, warm = ck["train"]["peak_lr"], cfg.optim.warmup_epochs * spe
    assert peak == pytest.approx(cfg.optim.blr * cfg.train.batch_size / 256)
    for r in rows:  # the lr each update used is MAE's schedule at that step
        want = lr_at(r["step"] - 1, peak=peak, min_lr=cfg.optim.min_lr, warmup_steps=warm,
                     total_steps=cfg.train.epochs * spe)  # fmt: skip
        assert r["lr"] == pytest.approx(want, rel=1e-12)

    # checkpoint: final step, unwrapped model weights, config, kept-last policy, latest pointer
    assert ck["step"] == 30 and Path(ck["path"]).name == "ckpt_00000030.pt" == res.checkpoint.split("/")[-1]
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_00000020.pt", "ckpt_00000030.pt"]  # keep_last=2
    assert (out / "latest").read_text().strip() == "ckpt_00000030.pt"
    assert config_from_dict(ck["config"]) == cfg
    model = create_model(cfg.model.name)
    model.load_state_dict(ck["model"])  # strict: every key of the unwrapped model, no "module." prefix
    assert set(ck["model"]) == set(model.state_dict())
    assert len(ck["rng"]) == 1 and len(ck["loader"]) == 1
    if HAS_TENSORBOARD:
        assert list(Path(res.tensorboard).glob("events.out.tfevents.*"))
    captured = capsys.readouterr()
    text = captured.out
    assert "step     30/30" in text and "mfu n/a" in text and "img/s" in text
    assert "\r" not in text and "step 30/30 [########################] 100% | loss" in captured.err  # bar on stderr
    assert (
        f"checkpoint : {res.checkpoint}" in text
        and "metrics    :" in text
        and ("tensorboard --logdir" in text) == HAS_TENSORBOARD
    )

    # a second fresh run must not silently overwrite the first one's checkpoints
    with pytest.raises(ConfigError, match=r"already holds checkpoints .*train\.resume=auto"):
        pretrain(cfg)


def _nan_from_call(monkeypatch, bad_calls: set[int]):
    """Make MAE's loss NaN on the given forward calls (1-based) of this process."""
    from mimfast.models.mae import MaskedAutoencoderViT

    real = MaskedAutoencoderViT.forward_loss
    calls = [0]

    def forward_loss(self, imgs, pred, mask):
        calls[0] += 1
        loss = real(self, imgs, pred, mask)
        return loss * float("nan") if calls[0] in bad_calls else loss

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", forward_loss)


@needs_dali
def test_nan_guard_stop_raises_a_clear_error(tmp_path, monkeypatch, no_interpreter):
    _nan_from_call(monkeypatch, {3})
    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is not finite .*train\.nan_policy=skip"):
        pretrain(_debug(tmp_path, "train.max_steps=5", "train.ckpt_every=2"))
    assert ckpt_mod.list_checkpoints(tmp_path)[0].name == "ckpt_00000002.pt"  # nothing written after the bad step


@needs_dali
def test_nan_guard_skip_drops_the_update_and_continues(tmp_path, monkeypatch, no_interpreter):
    _nan_from_call(monkeypatch, {3})
    snaps = {}

    def on_step(step, model, m):
        snaps[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    res = pretrain(_debug(tmp_path, "train.max_steps=5", "train.nan_policy=skip"), on_step=on_step)
    assert res.step == 5 and res.skipped == 1 and res.skipped_steps == [3]
    assert res.losses[2] is None and all(math.isfinite(x) for i, x in enumerate(res.losses) if i != 2)
    for k in snaps[2]:
        assert torch.equal(snaps[3][k], snaps[2][k]), f"{k} changed by the skipped step"
        assert torch.isfinite(snaps[5][k]).all(), k
    assert any(not torch.equal(snaps[4][k], snaps[3][k]) for k in snaps[3])  # training went on
    rows = _metrics(tmp_path)
    assert rows[2]["step"] == 3 and rows[2]["loss"] is None and rows[2]["skipped"] is True
    ck = load_checkpoint(tmp_path)
    assert ck["train"]["skipped"] == 1 and ck["train"]["sched_step"] == 4  # the schedule did not advance either
    assert all(int(s["step"]) == 4 for s in ck["optimizer"]["state"].values())  # AdamW stepped 4 times, not 5


@needs_dali
def test_resume_across_an_epoch_end_with_accumulation(tmp_path, no_interpreter):
    # 125 batches of 16 per epoch, 4 micro-batches per step -> 31 steps per epoch and 1 leftover micro-batch that
    # is drained; stop exactly at the epoch end (step 31), resume in-process and cross into epoch 2
    common = ["train.batch_size=16", "optim.accum_steps=4", "train.ckpt_every=31", "train.log_every=100"]
    full = pretrain(_debug(tmp_path / "full", *common, "train.max_steps=33"))
    first = pretrain(_debug(tmp_path / "split", *common, "train.max_steps=31"))
    rest = pretrain(_debug(tmp_path / "split", *common, "train.max_steps=33", "train.resume=auto"))
    assert load_checkpoint(tmp_path / "full")["train"]["steps_per_epoch"] == 31
    assert (first.step, rest.start_step, rest.step) == (31, 31, 33)
    assert rest.resumed_from.endswith("ckpt_00000031.pt")
    assert first.losses + rest.losses == full.losses  # bit-identical, across the epoch boundary
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "split")
    assert _metrics(tmp_path / "full")[30]["epoch"] == 1.0


@needs_dali
def test_cpu_precisions(tmp_path, capsys, no_interpreter):
    res = pretrain(_debug(tmp_path / "bf16", "train.max_steps=3", "train.batch_size=8", "train.precision=bf16"))
    assert res.step == 3 and all(math.isfinite(x) for x in res.losses)
    assert "| bf16" in capsys.readouterr().out
    res = pretrain(_debug(tmp_path / "fp16", "train.max_steps=2", "train.batch_size=8", "train.precision=fp16"))
    out = capsys.readouterr().out
    assert "fp16 is not supported on the CPU; running fp32" in out and "| fp32" in out
    assert load_checkpoint(tmp_path / "fp16")["scaler"] is None


@pytest.mark.gpu
@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 / fp16 + GradScaler, fused AdamW, MFU)")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_precisions_fused_adamw_mfu_and_exact_resume(tmp_path, capsys, precision):
    # the Triton kernels on the GPU, the `mixed` decoder feeding them, fused AdamW, fp16's GradScaler in the
    # checkpoint, an MFU figure in the progress line, and a resume that replays the uninterrupted run bit for bit
    common = ["train.device=cuda", f"train.precision={precision}", "train.batch_size=32", "train.log_every=1",
              "data.decode=mixed"]  # fmt: skip
    full = pretrain(_debug(tmp_path / "full", *common, "train.max_steps=6"))
    out = capsys.readouterr().out
    assert f"1 x cuda | {precision}" in out, out
    assert "mfu n/a" not in out or not any(k in torch.cuda.get_device_name() for k in ("H100", "H200", "A100"))
    first = pretrain(_debug(tmp_path / "split", *common, "train.max_steps=3"))
    rest = pretrain(_debug(tmp_path / "split", *common, "train.max_steps=6", "train.resume=auto"))
    assert all(math.isfinite(x) for x in full.losses) and len(full.losses) == 6
    assert first.losses + rest.losses == full.losses
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(g.get("fused") for g in a["optimizer"]["param_groups"])  # torch's fused AdamW on CUDA
    if precision == "fp16":
        assert a["scaler"] is not None and a["scaler"]["scale"] > 0 and a["scaler"] == b["scaler"]
    else:
        assert a["scaler"] is None


@needs_dali
def test_compile_matches_eager_and_keeps_checkpoints_portable(tmp_path, no_interpreter):
    common = ["train.max_steps=2", "train.batch_size=8", "train.log_every=1"]
    eager = pretrain(_debug(tmp_path / "eager", *common))
    compiled = pretrain(_debug(tmp_path / "compiled", *common, "train.compile=true"))
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    a, b = load_checkpoint(tmp_path / "eager"), load_checkpoint(tmp_path / "compiled")
    assert set(a["model"]) == set(b["model"])  # no "_orig_mod." prefixes: loads into a plain model
    model = create_model(get_config("mae_debug").model.name)
    model.load_state_dict(b["model"])
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-3, atol=1e-5), k


# ------------------------------------------------------------------------------------------------- checkpoints
def _tiny_state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((4,), float(step))}, "config": {"preset": "x"}}


def test_interrupted_checkpoint_write_never_yields_a_valid_checkpoint(tmp_path, monkeypatch):
    ckpt_mod.save_checkpoint(tmp_path, _tiny_state(4), keep_last=3)
    real = ckpt_mod._serialize

    def dies_half_way(obj, f):  # write half of the real bytes, then fail like a full disk
        import io

        buf = io.BytesIO()
        real(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "_serialize", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        ckpt_mod.save_checkpoint(tmp_path, _tiny_state(8), keep_last=3)
    monkeypatch.setattr(ckpt_mod, "_serialize", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000004.pt", "latest"]  # no final, no .tmp left
    assert (tmp_path / "latest").read_text().strip() == "ckpt_00000004.pt"
    assert ckpt_mod.find_resume_checkpoint("auto", tmp_path).name == "ckpt_00000004.pt"

    # SIGKILL in the middle of the write (a real crash: no exception handler runs)
    script = (
        "import io, os, signal, sys, torch\n"
        "from mimfast.train import checkpoint as c\n"
        "def w(obj, f):\n"
        "    b = io.BytesIO(); torch.save(obj, b); f.write(b.getvalue()[:len(b.getvalue()) // 2]); f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "c._serialize = w\n"
        "c.save_checkpoint(sys.argv[1], {'step': 8, 'model': {'w': torch.ones(1000)}, 'config': {}})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=_subprocess_env(), capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert (tmp_path / "ckpt_00000008.pt.tmp").exists() and not (tmp_path / "ckpt_00000008.pt").exists()
    assert [p.name for p in ckpt_mod.list_checkpoints(tmp_path)] == ["ckpt_00000004.pt"]  # .tmp is never listed
    assert ckpt_mod.find_resume_checkpoint("auto", tmp_path).name == "ckpt_00000004.pt"

    # a truncated or foreign file under a checkpoint name is rejected; resume=auto falls back to the good one
    good = (tmp_path / "ckpt_00000004.pt").read_bytes()
    (tmp_path / "ckpt_00000012.pt").write_bytes(good[: len(good) // 2])
    torch.save({"model": {}}, tmp_path / "ckpt_00000016.pt")  # loads, but is no mimfast.train checkpoint
    with pytest.raises(CheckpointError, match="does not load"):
        load_checkpoint(tmp_path / "ckpt_00000012.pt")
    with pytest.raises(CheckpointError, match="is not a mimfast.train checkpoint"):
        load_checkpoint(tmp_path / "ckpt_00000016.pt")
    with pytest.warns(UserWarning, match="skipping invalid checkpoint"):
        assert ckpt_mod.find_resume_checkpoint("auto", tmp_path).name == "ckpt_00000004.pt"
    with pytest.warns(UserWarning, match="skipping invalid checkpoint"):
        ck = load_checkpoint(tmp_path)
    assert ck["step"] == 4 and torch.equal(ck["model"]["w"], torch.full((4,), 4.0))
    assert ckpt_mod.remove_stale_tmp(tmp_path) == [tmp_path / "ckpt_00000008.pt.tmp"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        load_checkpoint(tmp_path / "empty")


@needs_dali
def test_exact_resume_after_sigkill(tmp_path):
    n_steps, every = 12, 3
    cmd = [sys.executable, "-m", "mimfast.cli", "pretrain", "--config", "mae_debug", f"train.max_steps={n_steps}",
           f"train.ckpt_every={every}", "train.log_every=3", "train.keep_last=10"]  # fmt: skip
    env = _subprocess_env()

    ref = tmp_path / "uninterrupted"
    done = subprocess.run([*cmd, f"out={ref}"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, f"out={run}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while not (run / "ckpt_00000003.pt").exists():  # os.replace makes the name appear only when complete
            assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stdout.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    m = int(ckpt_mod.find_resume_checkpoint("auto", run).name[5:13])
    assert 0 < m < n_steps, m

    resumed = subprocess.run([*cmd, f"out={run}", "--resume", "auto"], env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"(step {m})" in resumed.stdout and f"running steps {m + 1}..{n_steps}" in resumed.stdout

    a, b = load_checkpoint(ref), load_checkpoint(run)
    assert a["step"] == b["step"] == n_steps
    assert set(a["model"]) == set(b["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs after resume"
    for fqn, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][fqn][k]), f"optimizer {fqn}.{k} differs after resume"
    la, lb = _metrics(ref), _metrics(run)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, n_steps + 1))
    after = [(r["step"], r["loss"]) for r in la if r["step"] > m]
    assert after == [(r["step"], r["loss"]) for r in lb if r["step"] > m]  # bit-identical floats
    assert la == lb  # steps <= m too (written by the killed process), lr and epoch included


# ----------------------------------------------------------------------------------------------- distributed
def _dist_worker(rank: int, ports: list[int], tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      TRITON_INTERPRET="0")  # fmt: skip
    ports = iter(ports)

    def run(cfg, **kw):  # a fresh rendezvous port per job: a reused one races with the previous job's teardown
        os.environ["MASTER_PORT"] = str(next(ports))
        return pretrain(cfg, **kw)

    out = Path(tmp)
    try:
        from mimfast.models.mae import MaskedAutoencoderViT

        real, calls = MaskedAutoencoderViT.forward_loss, [0]

        def forward_loss(self, imgs, pred, mask):  # NaN on rank 1 only, at step 3 of the DDP run
            calls[0] += 1
            loss = real(self, imgs, pred, mask)
            return loss * float("nan") if rank == 1 and calls[0] == 3 else loss

        MaskedAutoencoderViT.forward_loss = forward_loss
        snaps = {}

        def on_step(step, model, m):
            snaps[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        common = [
            "train.max_steps=5",
            "train.batch_size=8",
            "train.log_every=1",
            "train.ckpt_every=0",
            "optim.clip_grad=1.0",
        ]
        sys.stdout = open(out / f"stdout_ddp{rank}.txt", "w", buffering=1)
        res = run(get_config("mae_debug", [f"out={out / 'ddp'}", "train.nan_policy=skip", *common]),
                       on_step=on_step)  # fmt: skip
        MaskedAutoencoderViT.forward_loss = real
        torch.save({"snaps": snaps, "result": res.__dict__}, out / f"ddp{rank}.pt")

        def on_step_fsdp(step, model, m):  # the full parameters of this rank's shards, gathered
            if step == 5:
                snaps["fsdp"] = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}

        sys.stdout = open(out / f"stdout_fsdp{rank}.txt", "w", buffering=1)
        res = run(get_config("mae_debug", [f"out={out / 'fsdp'}", "train.dist=fsdp2", *common]),
                       on_step=on_step_fsdp)  # fmt: skip
        torch.save({"params": snaps["fsdp"], "result": res.__dict__}, out / f"fsdp{rank}.pt")
        # FSDP2 exact resume: 3 steps, then resume to 5 from the gathered full checkpoint (resharded on load)
        sys.stdout = open(out / f"stdout_fsdp_split{rank}.txt", "w", buffering=1)
        split = [f"out={out / 'fsdp_split'}", "train.dist=fsdp2", *common]
        first = run(get_config("mae_debug", [*split, "train.max_steps=3"]))
        rest = run(get_config("mae_debug", [*split, "train.resume=auto"]))
        torch.save({"losses": first.losses + rest.losses, "start": rest.start_step}, out / f"fsdp_split{rank}.pt")
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        sys.stdout.flush()


@needs_dali
def test_two_process_gloo_ddp_nan_guard_and_fsdp2(tmp_path):
    ports = [free_port() for _ in range(4)]
    run_spawned_ranks(_dist_worker, lambda r: (r, ports, str(tmp_path)), tmp_path)
    d0, d1 = (torch.load(tmp_path / f"ddp{r}.pt", weights_only=False) for r in range(2))

    # DDP: replicas identical after every step, finite, and the NaN on rank 1 alone was skipped by both ranks
    for step in range(1, 6):
        for k, v in d0["snaps"][step].items():
            assert torch.equal(v, d1["snaps"][step][k]), f"rank 0 / rank 1 differ in {k} after step {step}"
            assert torch.isfinite(v).all(), k
    assert d0["result"]["skipped_steps"] == d1["result"]["skipped_steps"] == [3]
    assert all(torch.equal(d0["snaps"][3][k], d0["snaps"][2][k]) for k in d0["snaps"][2])
    assert d0["result"]["losses"] == d1["result"]["losses"]  # the logged loss is the rank average, same everywhere
    losses = [x for x in d0["result"]["losses"] if x is not None]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)

    # logged once: rank 0 alone writes metrics.jsonl and prints progress lines
    rows = _metrics(tmp_path / "ddp")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[2]["loss"] is None
    out0, out1 = ((tmp_path / f"stdout_ddp{r}.txt").read_text() for r in range(2))
    assert out0.count("step      1/5") == 1 and "2 x cpu (ddp, gloo)" in out0
    assert "step " not in out1 and "checkpoint" not in out1
    ck = load_checkpoint(tmp_path / "ddp")
    assert len(ck["loader"]) == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # each rank draws its own masks
    for k, v in d0["snaps"][5].items():
        assert torch.equal(ck["model"][k], v), k

    # FSDP2 on CPU/gloo: runs, writes a full (unsharded) checkpoint equal to the gathered shards
    f0, f1 = (torch.load(tmp_path / f"fsdp{r}.pt", weights_only=False) for r in range(2))
    fck = load_checkpoint(tmp_path / "fsdp")
    assert "2 x cpu (fsdp2, gloo)" in (tmp_path / "stdout_fsdp0.txt").read_text()
    assert f0["result"]["losses"] == f1["result"]["losses"] and all(math.isfinite(x) for x in f0["result"]["losses"])
    for k, v in f0["params"].items():
        assert torch.equal(v, f1["params"][k]) and torch.equal(fck["model"][k], v), k
    s0 = torch.load(tmp_path / "fsdp_split0.pt")
    assert s0["start"] == 3 and s0["losses"] == f0["result"]["losses"]  # bit-identical after an FSDP2 resume
    sck = load_checkpoint(tmp_path / "fsdp_split")
    assert all(torch.equal(sck["model"][k], v) for k, v in fck["model"].items())
    for fqn, st in fck["optimizer"]["state"].items():
        assert all(torch.equal(v, sck["optimizer"]["state"][fqn][k]) for k, v in st.items()), fqn


@needs_dali
def test_torchrun_cli_launch_one_node_and_two_nodes(tmp_path):
    job = ["-m", "mimfast.cli", "pretrain", "--config", "mae_debug", "train.max_steps=3", "train.batch_size=8",
           "train.log_every=1"]  # fmt: skip
    run = [sys.executable, "-m", "torch.distributed.run"]
    one = tmp_path / "one_node"
    done = subprocess.run([*run, "--standalone", "--nproc_per_node", "2", *job, f"out={one}"], env=_subprocess_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 x cpu (ddp, gloo)" in done.stdout
    assert [done.stdout.count(f"step      {s}/3") for s in (1, 2, 3)] == [1, 1, 1]  # rank 0 only
    assert [r["step"] for r in _metrics(one)] == [1, 2, 3]
    ck = load_checkpoint(one)
    assert ck["step"] == 3 and len(ck["loader"]) == 2 and ck["train"]["world_size"] == 2

    # the same job as 2 nodes x 1 process (static rendezvous on this host, as on a cluster): both ranks have
    # LOCAL_RANK=0, so anything keyed on the local rank instead of RANK (data shards, who logs, who writes the
    # checkpoint) would change the losses or duplicate the output
    two = tmp_path / "two_nodes"
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                *run,
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(n),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                *job,
                f"out={two}",
            ],
            env=_subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for n in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(outs)
    assert "2 x cpu (ddp, gloo)" in outs[0] and [outs[0].count(f"step      {s}/3") for s in (1, 2, 3)] == [1, 1, 1]
    assert "step " not in outs[1] and "checkpoint" not in outs[1]
    assert _metrics(two) == _metrics(one)  # bit-identical losses and lrs
    ck2 = load_checkpoint(two)
    assert all(torch.equal(ck2["model"][k], v) for k, v in ck["model"].items())
    assert [ckpt_mod.decode_object(x) for x in ck2["loader"]] == [ckpt_mod.decode_object(x) for x in ck["loader"]]

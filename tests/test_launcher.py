"""Launcher hardening: checkpoint timelines that cannot lose data, no silent restart, preemption-safe signals, and
the small guards (non-finite config values, skipped-step limit, empty class folders, capped ``--num-images``).

Runs use the ``mae_debug`` preset with the Triton interpreter off (the plain-torch kernels; see test_train.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import _subprocess_env as _env
from test_train import needs_dali

from mimfast.train import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    get_config,
    load_checkpoint,
    pretrain,
)
from mimfast.train import checkpoint as ckpt_mod


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    """Whole training runs use the registered plain-torch kernels (the kernels are tested on their own)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _debug(out: Path, *overrides: str):
    return get_config("mae_debug", [f"train.out_dir={out}", "train.progress=lines", *overrides])


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("ckpt_*.pt"))


# ------------------------------------------------------------------------------------------------ timelines
@needs_dali
def test_rollback_keeps_every_checkpoint_of_the_timeline_it_continues(tmp_path):
    """The issue's scenario: checkpoints at 20, 30, 40; resume from 20 to step 28 (ckpt_every 4, keep_last 2)."""
    run = tmp_path / "run"
    pretrain(_debug(run, "train.max_steps=40", "train.ckpt_every=10", "train.keep_last=3"))
    assert _names(run) == ["ckpt_00000020.pt", "ckpt_00000030.pt", "ckpt_00000040.pt"]
    abandoned_40 = (run / "ckpt_00000040.pt").read_bytes()
    res = pretrain(_debug(run, "train.max_steps=28", "train.ckpt_every=4", f"train.resume={run}/ckpt_00000020.pt"))
    assert res.step == 28 and res.checkpoint == str(run / "ckpt_00000028.pt")
    # the continued timeline 20 -> 24 -> 28 is whole: the written files and the resume source survive keep_last=2
    assert _names(run) == ["ckpt_00000020.pt", "ckpt_00000024.pt", "ckpt_00000028.pt"]
    assert (run / "latest").read_text().strip() == "ckpt_00000028.pt"
    assert _steps(run) == list(range(1, 29))
    # the abandoned timeline is kept aside, with the metrics it logged, never deleted
    (aside,) = (run / "abandoned").iterdir()
    assert aside.name.endswith("-from-step-20")
    assert sorted(p.name for p in aside.iterdir()) == ["WHY.txt", "ckpt_00000030.pt", "ckpt_00000040.pt",
                                                       "metrics.jsonl"]  # fmt: skip
    assert (aside / "ckpt_00000040.pt").read_bytes() == abandoned_40
    assert [json.loads(x)["step"] for x in (aside / "metrics.jsonl").read_text().splitlines()] == list(range(21, 41))
    assert "rolled the run" in (aside / "WHY.txt").read_text()
    # every reader agrees on "latest"
    assert load_checkpoint(run)["step"] == 28
    assert ckpt_mod.find_resume_checkpoint("auto", run) == run / "ckpt_00000028.pt"
    from mimfast.train.evaluate import load_pretrained

    assert load_pretrained(run)[2] == 28
    # and --resume auto continues the new timeline
    res = pretrain(_debug(run, "train.max_steps=30", "train.ckpt_every=4", "train.resume=auto"))
    assert res.start_step == 28 and _steps(run) == list(range(1, 31))


@needs_dali
def test_resume_from_another_directory_sets_the_old_timeline_aside(tmp_path):
    src, run = tmp_path / "src", tmp_path / "run"
    pretrain(_debug(src, "train.max_steps=4", "train.ckpt_every=2"))
    pretrain(_debug(run, "train.max_steps=6", "train.ckpt_every=3"))
    pretrain(_debug(run, "train.max_steps=5", f"train.resume={src}/ckpt_00000002.pt", "train.ckpt_every=0"))
    assert _names(run) == ["ckpt_00000005.pt"] and _steps(run) == [3, 4, 5]
    (aside,) = (run / "abandoned").iterdir()
    assert sorted(p.name for p in aside.glob("ckpt_*")) == ["ckpt_00000003.pt", "ckpt_00000006.pt"]
    assert _names(src) == ["ckpt_00000002.pt", "ckpt_00000004.pt"]  # the source run is never touched


def test_pruning_never_deletes_the_new_file_the_source_or_a_newer_timeline(tmp_path):
    def state(step):
        return {"step": step, "model": {"w": torch.full((2,), float(step))}, "config": {}}

    for s in (10, 20, 30, 40):
        ckpt_mod.save_checkpoint(tmp_path, state(s), keep_last=10)
    ckpt_mod.save_checkpoint(tmp_path, state(24), keep_last=2, protect=(tmp_path / "ckpt_00000010.pt",))
    # older than 24: 20 is the one kept, 10 is protected; 30 and 40 are newer: not pruning's business
    assert _names(tmp_path) == [f"ckpt_{s:08d}.pt" for s in (10, 20, 24, 30, 40)]
    ckpt_mod.save_checkpoint(tmp_path, state(50), keep_last=1)
    assert _names(tmp_path) == ["ckpt_00000050.pt"]
    with pytest.raises(ValueError, match="keep_last"):
        ckpt_mod.save_checkpoint(tmp_path, state(60), keep_last=0)


@needs_dali
def test_resume_auto_never_restarts_silently(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt_00000008.pt").write_bytes(b"PK\x03\x04 cut short by a full disk")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 9)))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(ConfigError, match=r"holds 1 checkpoint\(s\) but none loads.*nothing was changed"):
        pretrain(_debug(run, "train.max_steps=2", "train.resume=auto"))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # no rename, metrics untouched
    with pytest.raises(CheckpointError, match="none loads"):
        ckpt_mod.plan_resume("auto", run)
    # an empty directory (or one without checkpoints) starts fresh
    res = pretrain(_debug(tmp_path / "fresh", "train.max_steps=2", "train.resume=auto"))
    assert res.start_step == 0 and res.step == 2
    # a broken newest file next to a good older one: resume from the good one, the broken one is moved aside
    good = tmp_path / "fresh"
    (good / "ckpt_00000009.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping invalid checkpoint"):
        res = pretrain(_debug(good, "train.max_steps=3", "train.resume=auto"))
    assert res.start_step == 2 and _names(good) == ["ckpt_00000002.pt", "ckpt_00000003.pt"]
    assert [p.name for p in (good / "abandoned").rglob("ckpt_*")] == ["ckpt_00000009.pt"]


def test_latest_pointer_disagreement_warns(tmp_path):
    ckpt_mod.save_checkpoint(tmp_path, {"step": 5, "model": {}, "config": {}})
    ckpt_mod.save_checkpoint(tmp_path, {"step": 7, "model": {}, "config": {}})
    (tmp_path / "latest").write_text("ckpt_00000005.pt\n")  # a run that died between the rename and the pointer
    with pytest.warns(UserWarning, match="names ckpt_00000005.pt but the newest valid checkpoint is ckpt_00000007"):
        assert load_checkpoint(tmp_path)["step"] == 7


# ------------------------------------------------------------------------------------------------- signals
def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, f"the run ended early:\n{proc.communicate()[0]}"
        assert time.monotonic() < deadline, "the run did not reach its first steps in time"
        time.sleep(0.02)


@needs_dali
def test_sigterm_writes_a_final_checkpoint_and_resumes_bit_identically(tmp_path):
    cmd = [sys.executable, "-m", "mimfast.cli", "pretrain", "--config", "mae_debug", "train.max_steps=400",
           "train.ckpt_every=0", "train.log_every=1000", "train.progress=lines"]  # fmt: skip
    run = tmp_path / "run"
    proc = subprocess.Popen([*cmd, "--out", str(run)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        _wait_for_steps(run, 3, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    (ck,) = _names(run)
    m = int(ck[5:13])
    assert 3 <= m < 400 and _steps(run) == list(range(1, m + 1))
    assert f"stopped by SIGTERM at step {m}: checkpoint {run}/{ck} written" in out
    assert "resume with: mimfast pretrain --config mae_debug train.max_steps=400" in out and "--resume auto" in out
    # resume to m + 3, against an uninterrupted run of the same length: bit-identical
    n = m + 3
    env = _env()
    done = subprocess.run([*cmd, f"train.max_steps={n}", "--out", str(run), "--resume", "auto"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    ref = tmp_path / "ref"
    done = subprocess.run([*cmd, f"train.max_steps={n}", "--out", str(ref)], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    a, b = load_checkpoint(ref), load_checkpoint(run)
    assert a["step"] == b["step"] == n
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs after a SIGTERM + resume"
    la = (ref / "metrics.jsonl").read_text().splitlines()
    assert la == (run / "metrics.jsonl").read_text().splitlines()


def test_second_signal_exits_at_once_and_handlers_are_restored(tmp_path):
    script = (
        "import os, signal, sys, time\n"
        "from mimfast.train.signals import StopSignals\n"
        "before = signal.getsignal(signal.SIGUSR1)\n"
        "with StopSignals() as s:\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    time.sleep(0.05)\n"
        "    assert s.requested and s.signum == signal.SIGUSR1\n"
        "assert signal.getsignal(signal.SIGUSR1) is before\n"
        "print('first: flag only', flush=True)\n"
        "with StopSignals() as s:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.05)\n"
        "    print('after one SIGINT: still running', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "    print('NOT REACHED', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGINT, proc.stdout + proc.stderr
    assert "first: flag only" in proc.stdout and "after one SIGINT: still running" in proc.stdout
    assert "NOT REACHED" not in proc.stdout
    assert "second SIGINT: exiting now, without a checkpoint" in proc.stderr


@needs_dali
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Two ranks launched like torchrun's static rendezvous; SIGUSR1 (Slurm's time-limit warning) to rank 1 only."""
    from conftest import free_port

    run = tmp_path / "run"
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = _env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        cmd = [sys.executable, "-m", "mimfast.cli", "pretrain", "--config", "mae_debug", "train.max_steps=400",
               "train.ckpt_every=0", "train.batch_size=16", "train.log_every=1000", "--out", str(run)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        _wait_for_steps(run, 3, procs[0])
        procs[1].send_signal(signal.SIGUSR1)
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [128 + signal.SIGUSR1] * 2, outs
    (ck,) = _names(run)
    m = int(ck[5:13])
    assert "stopped by SIGUSR1" in outs[0] and "rerun the same torchrun command with --resume auto" in outs[0]
    assert "stopped by" not in outs[1].split("SIGUSR1 received")[-1]  # only rank 0 prints the summary
    c = load_checkpoint(run / ck)
    assert c["step"] == m and len(c["loader"]) == 2 and len(c["rng"]) == 2 and _steps(run) == list(range(1, m + 1))


# --------------------------------------------------------------------------------------------- small guards
NON_FINITE = ["optim.warmup_epochs=inf", "optim.blr=nan", "optim.lr=-inf", "optim.clip_grad=inf",
              "model.mask_ratio=nan", "optim.betas=0.9,nan"]  # fmt: skip


@pytest.mark.parametrize("override", NON_FINITE)
def test_non_finite_config_values_are_rejected(override):
    with pytest.raises(ConfigError, match="finite|expected"):
        get_config("mae_debug", [override])
    from mimfast.train import OptimConfig

    with pytest.raises(ConfigError, match=r"optim\.warmup_epochs: expected a finite float >= 0, got inf"):
        OptimConfig(warmup_epochs=float("inf"))


def _nan_always(monkeypatch):
    from mimfast.models import mae as mae_mod

    real = mae_mod.MaskedAutoencoderViT.forward_loss

    def forward_loss(self, imgs, pred, mask):
        return real(self, imgs, pred, mask) * float("nan")

    monkeypatch.setattr(mae_mod.MaskedAutoencoderViT, "forward_loss", forward_loss)


@needs_dali
def test_skip_policy_stops_after_too_many_skips_in_a_row(tmp_path, monkeypatch):
    _nan_always(monkeypatch)
    with pytest.raises(NonFiniteLossError, match=r"step 4: 4 steps in a row .*max_consecutive_skips=4.*No checkpoint"):
        pretrain(_debug(tmp_path / "a", "train.max_steps=50", "train.nan_policy=skip", "train.max_consecutive_skips=4"))
    res = pretrain(_debug(tmp_path / "b", "train.max_steps=6", "train.nan_policy=skip",
                          "train.max_consecutive_skips=0"))  # fmt: skip
    assert res.skipped == 6  # 0 = no limit


@needs_dali
def test_nan_stop_names_the_last_checkpoint_or_says_there_is_none(tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(_debug(run, "train.max_steps=2"))
    _nan_always(monkeypatch)
    with pytest.raises(NonFiniteLossError, match=rf"The last checkpoint is {run}/ckpt_00000002.pt"):
        pretrain(_debug(run, "train.max_steps=4", "train.resume=auto"))
    with pytest.raises(NonFiniteLossError, match="No checkpoint has been written yet"):
        pretrain(_debug(tmp_path / "fresh", "train.max_steps=4"))


@needs_dali
def test_empty_class_folders_are_reported(tmp_path, capsys):
    from test_cli_errors import small_dataset

    from mimfast.cli import main
    from mimfast.data import DataConfig, build_loader, validate_dataset

    ds = small_dataset(tmp_path / "ds", train_per_class=4, val_per_class=2)
    (ds / "train" / "zz_empty").mkdir()
    with pytest.warns(UserWarning, match=r"1 class folder\(s\) of .*train hold no image: zz_empty"):
        loader = build_loader(DataConfig(root=str(ds), img_size=32, num_threads=1), batch_size=2)
    assert loader.num_classes == 3
    report = validate_dataset(ds, progress=False)
    assert not report.ok and report.empty_dirs == [str(ds / "train" / "zz_empty")] and not report.bad
    assert main(["validate-data", str(ds), "--quiet"]) == 1
    assert f"EMPTY {ds / 'train' / 'zz_empty'}" in capsys.readouterr().out


@needs_dali
def test_reconstruct_caps_num_images_with_a_warning(tmp_path, capsys):
    from test_cli_errors import small_dataset

    from mimfast.cli import main

    ds = small_dataset(tmp_path / "ds", train_per_class=16, val_per_class=3)
    run = tmp_path / "run"
    pretrain(_debug(run, f"data.root={ds}", "train.batch_size=8", "train.max_steps=1"))
    out = tmp_path / "grid.png"
    assert main(["reconstruct", "--checkpoint", str(run), "--num-images", "50", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: num_images=50 but the val split" in err and "holds 6 images: showing 6" in err
    from PIL import Image

    assert Image.open(out).size[1] == 6 * (128 + 2) + 2  # six rows of 128 px tiles

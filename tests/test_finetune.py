"""`mimfast finetune`: the fine-tuning task through the launcher (mimfast.train.tasks.finetune).

A module fixture pretrains the tiny debug MAE for a few steps on a small generated dataset; the tests fine-tune the
tiny classifier from it: per-epoch evaluation, best.pt, layer-wise lr decay as applied by the launcher, EMA, exact
resume after SIGKILL, --eval-only, features for probe / k-NN, and the one-line errors. Training runs use the
registered CPU kernels (``TRITON_INTERPRET=0``), as tests/test_train.py explains.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mimfast.data import make_builtin_dataset
from mimfast.train import ConfigError, get_config, load_checkpoint, lr_at, pretrain
from mimfast.train.finetune import evaluate_classifier, finetune

needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="NVIDIA DALI not installed")
pytestmark = needs_dali

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(TRITON_INTERPRET="0", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(data root, a 6-step mae_debug run) on 10 classes x 16 train / 4 val images."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")
    root = tmp_path_factory.mktemp("data") / "shapes"
    make_builtin_dataset(root, num_classes=NUM_CLASSES, train_per_class=16, val_per_class=4, size=40, progress=False)
    pre = tmp_path_factory.mktemp("pre") / "mae"
    pretrain(get_config("mae_debug", [f"out={pre}", f"data.root={root}", "train.max_steps=6", "train.batch_size=16",
                                      "train.log_every=3"]))  # fmt: skip
    yield root, pre
    mp.undo()


def _ft(setup, out, *extra):
    root, pre = setup
    return get_config("mae_finetune_debug", [f"out={out}", f"data.root={root}", f"model.loss.pretrained={pre}",
                                             "train.batch_size=16", "train.log_every=5", *extra])  # fmt: skip


def test_finetune_evaluates_each_epoch_and_keeps_the_best(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    res = finetune(_ft(setup, tmp_path / "ft", "train.epochs=2"))
    assert res.step == 20  # 160 images / 16 = 10 steps per epoch
    assert [e["step"] for e in res.evals] == [10, 20]
    for e in res.evals:
        assert 0 <= e["top1"] <= e["top5"] <= 1 and e["loss"] > 0
    rows = [json.loads(x) for x in (tmp_path / "ft" / "eval.jsonl").read_text().splitlines()]
    assert rows == res.evals
    best = max(res.evals, key=lambda e: e["top1"])
    assert res.best["value"] == best["top1"] and res.best["step"] == min(
        e["step"] for e in res.evals if e["top1"] == best["top1"]
    )
    b = load_checkpoint(tmp_path / "ft" / "best.pt")  # a loadable checkpoint: evaluation tools take it
    assert b["step"] == res.best["step"] and b["kind"] == "best" and b["eval"]["top1"] == res.best["value"]
    last = load_checkpoint(tmp_path / "ft")
    assert last["train"]["best"] == res.best


def test_launcher_applies_layer_decayed_lr_per_block(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    decay = 0.5
    cfg = _ft(setup, tmp_path / "ld", "train.max_steps=3", f"model.loss.layer_decay={decay}")
    res = finetune(cfg)
    ck = load_checkpoint(res.checkpoint)
    from mimfast.models import create_model

    model = create_model(cfg.model.name, **cfg.model.overrides)
    depth = model.config.depth
    peak, spe = ck["train"]["peak_lr"], ck["train"]["steps_per_epoch"]
    # the lr set before the 3rd update
    lr = lr_at(2, peak=peak, min_lr=cfg.optim.min_lr, warmup_steps=cfg.optim.warmup_epochs * spe,
               total_steps=cfg.train.epochs * spe)  # fmt: skip
    seen = set()
    for g in ck["optimizer"]["param_groups"]:
        for name in g["params"]:
            if name.startswith("blocks."):
                layer = int(name.split(".")[1]) + 1
            elif name.startswith(("patch_embed", "cls_token", "pos_embed")):
                layer = 0
            else:
                layer = depth + 1
            want = decay ** (depth + 1 - layer)
            assert g["lr_scale"] == pytest.approx(want), name
            assert g["lr"] == pytest.approx(lr * want, rel=1e-12), name
            seen.add(layer)
            if name.endswith(".bias") or "norm" in name or name in ("cls_token", "pos_embed"):
                assert g["weight_decay"] == 0.0, name
    assert seen == set(range(depth + 2))


def test_random_init_ema_and_augmentations(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # with the recipe's augmentations in the DALI pipeline (RandAugment m9 n2, random erasing)
    res = finetune(_ft(setup, tmp_path / "ema", "train.max_steps=4", "model.loss.pretrained=", "model.loss.ema=0.5",
                       "data.rand_n=2", "data.reprob=0.25"))  # fmt: skip
    e = res.evals[-1]
    assert {"top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss"} <= set(e)
    ck = load_checkpoint(res.checkpoint)
    ema = ck["task"]["ema"]
    assert set(ema) == set(ck["model"])
    assert any(not torch.equal(ema[k], ck["model"][k]) for k in ema if ema[k].is_floating_point())


def test_pretrained_encoder_is_loaded(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _, pre = setup
    res = finetune(_ft(setup, tmp_path / "p", "train.max_steps=1", "optim.blr=1e-12", "optim.warmup_epochs=0",
                       "model.overrides.drop_path_rate=0"))  # fmt: skip
    ft, mae = load_checkpoint(res.checkpoint)["model"], load_checkpoint(pre)["model"]
    # after one step at lr ~0 the classifier's blocks are the pretrained encoder's
    for k, v in mae.items():
        if k.startswith("blocks."):
            torch.testing.assert_close(ft[k], v, rtol=0, atol=1e-8)


def test_eval_only_and_features(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    res = finetune(_ft(setup, tmp_path / "ev", "train.epochs=1"))
    cfg = _ft(setup, tmp_path / "unused", f"model.loss.pretrained={tmp_path / 'ev' / 'best.pt'}")
    out = evaluate_classifier(cfg, device="cpu")
    assert out["num_val"] == NUM_CLASSES * 4
    assert out["top1"] == pytest.approx(res.best["value"])
    from mimfast.train.evaluate import linear_probes

    probes = linear_probes(tmp_path / "ev", pools=("mean",), steps=20, progress=False)
    assert probes["mean"].feature_dim == 96
    # the same weights under the official (timm / MAE fine-tuned) names, as a bare .pth: the key map loads them
    from mimfast.models import create_model

    clf = create_model(cfg.model.name, **cfg.model.overrides)
    clf.load_state_dict(load_checkpoint(tmp_path / "ev" / "best.pt")["model"])
    official = clf.official_state_dict()
    assert "fc_norm.weight" in official and "head.weight" in official
    torch.save({"model": official}, tmp_path / "official_finetuned.pth")
    cfg = _ft(setup, tmp_path / "unused", f"model.loss.pretrained={tmp_path / 'official_finetuned.pth'}")
    off = evaluate_classifier(cfg, device="cpu")
    assert off["top1"] == out["top1"] and off["loss"] == pytest.approx(out["loss"], rel=1e-6)
    assert "official checkpoint official_finetuned.pth" in off["weights"]


def test_cli_eval_only_and_default_preset(setup, tmp_path):
    root, pre = setup
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "mimfast.cli", "finetune", "--checkpoint", str(pre), f"data.root={root}",
           "train.max_steps=2", "train.batch_size=16", f"out={out}"]  # fmt: skip
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "--config mae_finetune_debug" in p.stdout and "mimfast finetune | mae_finetune_debug" in p.stdout
    assert "eval  step      2" in p.stdout and "best.pt" in p.stdout
    js = tmp_path / "ev.json"
    p = subprocess.run([sys.executable, "-m", "mimfast.cli", "finetune", "--config", "mae_finetune_debug",
                        "--checkpoint", str(out / "best.pt"), f"data.root={root}", "--eval-only", "--json", str(js)],
                       env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "top-1" in p.stdout and json.loads(js.read_text())["num_val"] == NUM_CLASSES * 4


def _run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mimfast.cli", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_errors_are_one_line(setup, tmp_path):
    root, pre = setup
    base = ["finetune", "--config", "mae_finetune_debug", f"data.root={root}", "train.max_steps=1"]
    tok = tmp_path / "tok"
    pretrain(get_config("vqgan_debug", [f"out={tok}", f"data.root={root}", "train.max_steps=1",
                                        "train.batch_size=8"]))  # fmt: skip
    cases = [
        (["--checkpoint", str(tok), f"out={tmp_path / 'a'}"], "not a ViT encoder"),
        (["--checkpoint", str(pre), "model.overrides.num_classes=5", f"out={tmp_path / 'b'}"], "has 10 classes"),
        (["--checkpoint", str(tmp_path / "missing"), f"out={tmp_path / 'c'}"], "no such checkpoint"),
        (["--config", "mae_debug", "--checkpoint", str(pre), f"out={tmp_path / 'd'}"], "pretraining model"),
        (["--checkpoint", str(pre), "model.loss.layer_decay=1.5", f"out={tmp_path / 'e'}"], "model.loss.layer_decay"),
    ]
    for extra, msg in cases:
        args = base + extra
        if "--config" in extra:
            args = ["finetune", f"data.root={root}", "train.max_steps=1", *extra]
        p = _run_cli(*args)
        assert p.returncode == 2, (extra, p.stdout, p.stderr)
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and msg in lines[0], (extra, p.stderr)
        assert "Traceback" not in p.stderr
    # an official fine-tuned head of another class count: the key and both shapes are named
    off = tmp_path / "official.pth"
    b = load_checkpoint(pre)
    sd = {k: v for k, v in b["model"].items() if not k.startswith(("decoder", "mask_token"))}
    sd.update({"head.weight": torch.zeros(1000, 96), "head.bias": torch.zeros(1000), "fc_norm.weight": torch.ones(96),
               "fc_norm.bias": torch.zeros(96)})  # fmt: skip
    torch.save({"model": sd}, off)
    p = _run_cli(*base, "--checkpoint", str(off), "--eval-only")
    assert p.returncode == 2 and "head.weight" in p.stderr and "1000" in p.stderr, p.stderr


def test_exact_resume_after_sigkill(setup, tmp_path):
    root, pre = setup
    n_steps = 16
    cmd = [sys.executable, "-m", "mimfast.cli", "finetune", "--config", "mae_finetune_debug", "--checkpoint", str(pre),
           f"data.root={root}", "train.batch_size=16", f"train.max_steps={n_steps}", "train.ckpt_every=3",
           "train.log_every=4", "train.keep_last=10", "model.loss.ema=0.9"]  # fmt: skip
    ref = tmp_path / "uninterrupted"
    done = subprocess.run([*cmd, f"out={ref}"], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, f"out={run}"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while not (run / "ckpt_00000006.pt").exists():
            assert proc.poll() is None, f"run ended before its checkpoint: {proc.stdout.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run([*cmd, f"out={run}", "--resume", "auto"], env=_env(), capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a, b = load_checkpoint(ref), load_checkpoint(run)
    assert a["step"] == b["step"] == n_steps
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs after resume"
    for k in a["task"]["ema"]:
        assert torch.equal(a["task"]["ema"][k], b["task"]["ema"][k]), f"EMA {k} differs after resume"
    for name in ("metrics.jsonl", "eval.jsonl"):
        ra, rb = ((d / name).read_text().splitlines() for d in (ref, run))
        assert ra == rb, name  # bit-identical losses and evaluations
    assert a["train"]["best"]["value"] == b["train"]["best"]["value"]
    assert torch.equal(load_checkpoint(ref / "best.pt")["model"]["head.weight"],
                       load_checkpoint(run / "best.pt")["model"]["head.weight"])  # fmt: skip


@pytest.mark.parametrize("bad,key", [("model.loss.mixup=-1", "model.loss.mixup"),
                                     ("model.loss.eval_every=0", "model.loss.eval_every"),
                                     ("model.loss.ema=1.0", "model.loss.ema"),
                                     ("model.loss.warmup=3", "model.loss.warmup")])  # fmt: skip
def test_option_errors_name_the_key(bad, key):
    from mimfast.train.tasks.finetune import FinetuneTask

    with pytest.raises(ConfigError, match=key):
        FinetuneTask(get_config("mae_finetune_debug", [bad]))


@pytest.mark.gpu
def test_finetune_on_cuda_bf16(setup, tmp_path):
    """The launcher on the GPU: bf16 autocast, DALI on the device (RandAugment + erasing), evaluation and best.pt."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    res = finetune(_ft(setup, tmp_path / "gpu", "train.max_steps=6", "train.precision=bf16", "train.device=cuda",
                       "train.deterministic=false", "model.loss.ema=0.9"))  # fmt: skip
    assert res.step == 6 and all(v is not None for v in res.losses)
    assert res.evals and 0 <= res.evals[-1]["top1"] <= 1 and "ema_top1" in res.evals[-1]
    assert load_checkpoint(tmp_path / "gpu" / "best.pt")["step"] == res.best["step"]


@pytest.mark.parametrize("family", ["beit", "cae", "mage"])
def test_every_family_fine_tunes_with_its_preset(setup, tmp_path, monkeypatch, family):
    """A 1-step BEiT / CAE / MAGE pretraining run (1-step tokenizer) fine-tunes with its debug preset: the preset's
    classifier settings fit the family's encoder (a mismatch is an error), MAGE reads token ids."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    root, _ = setup
    tok = tmp_path / "tok"
    pretrain(get_config("regvq_debug", [f"out={tok}", f"data.root={root}", "train.max_steps=1", "train.batch_size=8"]))
    pre = tmp_path / family
    pretrain(get_config(f"{family}_debug", [f"out={pre}", f"data.root={root}", "train.max_steps=1",
                                            "train.batch_size=8", f"model.loss.tokenizer={tok}"]))  # fmt: skip
    extra = [f"model.loss.tokenizer={tok}"] if family == "mage" else []
    cfg = get_config(f"{family}_finetune_debug", [f"out={tmp_path / 'ft'}", f"data.root={root}",
                                                   f"model.loss.pretrained={pre}", "train.max_steps=2",
                                                   "train.batch_size=16", *extra])  # fmt: skip
    res = finetune(cfg)
    assert res.step == 2 and res.evals and all(v is not None for v in res.losses)
    ft, enc = load_checkpoint(res.checkpoint)["model"], load_checkpoint(pre)["model"]
    assert any(k.startswith("blocks.0.") for k in ft)
    if family == "mage":
        assert {"token_emb.word_embeddings.weight"} <= set(ft) and "patch_embed.proj.weight" not in ft
    if family == "beit":  # each block's relative position table starts from the shared pretrained one
        assert ft["blocks.0.rel_pos_bias.relative_position_bias_table"].shape == \
            enc["rel_pos_bias.relative_position_bias_table"].shape  # fmt: skip


def _dist_worker(rank: int, port_ddp: int, port_fsdp: int, root: str, pre: str, tmp: str) -> None:
    import sys
    import traceback

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      TRITON_INTERPRET="0")  # fmt: skip
    out = Path(tmp)
    try:
        common = [f"data.root={root}", f"model.loss.pretrained={pre}", "train.batch_size=8", "train.max_steps=12",
                  "train.log_every=4", "train.ckpt_every=0", "model.loss.eval_every=1"]  # fmt: skip
        for mode, port, extra in (("ddp", port_ddp, ["model.loss.ema=0.9"]), ("fsdp2", port_fsdp, [])):
            os.environ["MASTER_PORT"] = str(port)
            sys.stdout = open(out / f"stdout_{mode}{rank}.txt", "w", buffering=1)
            res = finetune(get_config("mae_finetune_debug", [f"out={out / mode}", f"train.dist={mode}", *common,
                                                             *extra]))  # fmt: skip
            torch.save({"evals": res.evals, "best": res.best, "losses": res.losses}, out / f"{mode}{rank}.pt")
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


def test_two_process_ddp_and_fsdp2_evaluate_on_every_rank(setup, tmp_path):
    """2-process gloo DDP (with EMA) and FSDP2: every rank sees the same all-reduced evaluation, each val image is
    counted once across the ranks' shards, rank 0 writes best.pt from the gathered weights."""
    from conftest import free_port, run_spawned_ranks

    root, pre = setup
    ports = (free_port(), free_port())
    run_spawned_ranks(_dist_worker, lambda r: (r, *ports, str(root), str(pre), str(tmp_path)), tmp_path)
    for mode in ("ddp", "fsdp2"):
        r0, r1 = (torch.load(tmp_path / f"{mode}{r}.pt", weights_only=False) for r in range(2))
        assert r0["evals"] == r1["evals"] and r0["best"] == r1["best"] and r0["losses"] == r1["losses"]
        # 160 train images / (8 x 2 ranks) = 10 steps per epoch: evaluations after epoch 1 and after the last step
        assert [e["step"] for e in r0["evals"]] == [10, 12]
        best = load_checkpoint(tmp_path / mode / "best.pt")
        # the val split (40 images) evaluated across 2 ranks = the same classifier evaluated in one process
        cfg = get_config(
            "mae_finetune_debug", [f"data.root={root}", f"model.loss.pretrained={tmp_path / mode}/best.pt"]
        )
        one = evaluate_classifier(cfg, device="cpu")
        assert one["top1"] == pytest.approx(best["eval"]["top1"]) and one["num_val"] == NUM_CLASSES * 4
        assert one["loss"] == pytest.approx(best["eval"]["loss"], rel=1e-5)
        assert "ema_top1" in r0["evals"][-1] if mode == "ddp" else "ema_top1" not in r0["evals"][-1]
        log0, log1 = ((tmp_path / f"stdout_{mode}{r}.txt").read_text() for r in range(2))
        assert log0.count("eval  step") == 2 and "eval" not in log1


def test_official_recipe_presets():
    """The issue's MAE ViT-B recipe and the other papers' settings, as the presets give them."""
    from mimfast.train import scaled_lr

    c = get_config("mae_finetune_vit_base")
    lo = c.model.loss
    assert (c.train.epochs, c.optim.warmup_epochs, c.train.global_batch_size, c.optim.blr) == (100, 5.0, 1024, 5e-4)
    assert scaled_lr(c.optim, 1024) == pytest.approx(2e-3)
    assert (lo["layer_decay"], lo["mixup"], lo["cutmix"], lo["smoothing"]) == (0.65, 0.8, 1.0, 0.1)
    assert c.model.overrides["drop_path_rate"] == 0.1
    assert (c.data.rand_n, c.data.rand_m, c.data.rand_mstd) == (2, 9, 0.5)
    assert c.data.reprob == 0.25 and c.data.scale == (0.08, 1.0) and c.optim.betas == (0.9, 0.999)
    for name, ld, dp, ep in (("mae_finetune_vit_large", 0.75, 0.2, 50), ("mae_finetune_vit_huge", 0.75, 0.3, 50)):
        c = get_config(name)
        assert (c.model.loss["layer_decay"], c.model.overrides["drop_path_rate"], c.train.epochs) == (ld, dp, ep)
        assert c.optim.blr == 1e-3
    c = get_config("beit_finetune_vit_base")
    assert (c.optim.lr, c.optim.warmup_epochs, c.model.overrides["init_values"]) == (4e-3, 20.0, 0.1)
    c = get_config("cae_finetune_vit_base")
    assert (c.optim.lr, c.train.global_batch_size, c.model.overrides["pos_embed"]) == (8e-3, 4096, "fixed")
    c = get_config("mage_finetune_vit_base")
    assert (c.optim.blr, c.data.img_size, c.data.reprob, c.model.overrides["input"]) == (2.5e-4, 256, 0.0, "tokens")

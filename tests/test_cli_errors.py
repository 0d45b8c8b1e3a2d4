"""The command line's error policy: every user mistake is one ``error:`` line naming the key or file, exit status 2,
no traceback (``--debug`` / ``MIMFAST_DEBUG=1`` show it); options and overrides in any order.

``test_readme_error_table`` runs every row of the README's error table (between the ``cli-errors`` markers) and
checks the message the README shows, so the table cannot drift from what users see.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import _importable, needs_dali

from mimfast.cli import main, parse_args
from mimfast.train import get_config, pretrain

REPO = Path(__file__).resolve().parents[1]

HAS_DALI = _importable("nvidia.dali")


# ------------------------------------------------------------------------------------------------ fixtures
def small_dataset(dst: Path, train_per_class: int = 20, val_per_class: int = 4) -> Path:
    """Two classes of the built-in dataset: ``dst/{train,val}/<class>/*.JPEG``."""
    from mimfast.data import default_builtin_root, make_builtin_dataset

    src = make_builtin_dataset(default_builtin_root(), progress=False)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in sorted(p for p in (src / split).iterdir() if p.is_dir())[:2]:
            (dst / split / c.name).mkdir(parents=True)
            for f in sorted(c.iterdir())[:n]:
                shutil.copy(f, dst / split / c.name / f.name)
    return dst


def corrupt_jpeg(path: Path) -> None:
    """Keep the JPEG header and end marker, scramble the entropy-coded data: passes a signature check, fails decode."""
    b = bytearray(path.read_bytes())
    for i in range(200, len(b) - 10):
        b[i] = (b[i] * 7 + 13) % 256
    path.write_bytes(bytes(b))


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """The README table's placeholders: RUN (a finished 2-step mae_debug run), TOK (a 1-step tokenizer run), DATA, BAD,
    FILE, CORRUPT, MISMATCH."""
    if not HAS_DALI:
        pytest.skip("needs nvidia-dali-cuda130 (the [train] extra)")
    base = tmp_path_factory.mktemp("cli_errors")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # plain-torch kernels for whole runs (the kernels are tested elsewhere)
    try:
        run = base / "run"
        pretrain(get_config("mae_debug", [f"train.out_dir={run}", "train.max_steps=2", "train.progress=lines"]))
        pretrain(get_config("vqgan_debug", [f"train.out_dir={base / 'tok'}", "train.max_steps=1",
                                            "train.batch_size=8", "train.progress=lines"]))  # fmt: skip
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old
    data = small_dataset(base / "data")
    bad = small_dataset(base / "bad")
    corrupt_jpeg(sorted((bad / "train").iterdir())[1] / "00005.JPEG")
    (base / "file.txt").write_text("not a dataset\n")
    (base / "corrupt").mkdir()
    (base / "corrupt" / "ckpt_00000004.pt").write_bytes(b"PK\x03\x04 truncated")
    mismatch = base / "mismatch"
    mismatch.mkdir()
    ck = torch.load(run / "ckpt_00000002.pt", weights_only=True)
    ck["config"]["model"]["overrides"] = {"depth": 1}
    torch.save(ck, mismatch / "ckpt_00000002.pt")
    return {"RUN": str(run), "TOK": str(base / "tok"), "DATA": str(data), "BAD": str(bad),
            "FILE": str(base / "file.txt"), "CORRUPT": str(base / "corrupt"), "MISMATCH": str(mismatch)}  # fmt: skip


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _cell(text: str) -> str:
    """The content of a Markdown code span (single or double backticks)."""
    text = text.strip()
    n = len(text) - len(text.lstrip("`"))
    return text[n : len(text) - n].strip() if n else text


def readme_error_rows() -> list[tuple[str, str, str, int]]:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- cli-errors:begin -->", 1)[1].split("<!-- cli-errors:end -->", 1)[0]
    rows = []
    for line in block.strip().splitlines()[2:]:  # skip the header and the |---| line
        cells = [c for c in re.split(r"\s\|\s|^\|\s|\s\|$", line.strip()) if c != ""]
        assert len(cells) == 4, f"README error table row does not have 4 cells: {line}"
        rows.append((cells[0].strip(), _cell(cells[1]), _cell(cells[2]), int(cells[3])))
    return rows


def _fill(text: str, places: dict) -> str:
    for k in sorted(places, key=len, reverse=True):
        text = re.sub(rf"\b{k}\b", places[k], text)
    return text


ROWS = readme_error_rows()


# ----------------------------------------------------------------------------------------------------- tests
def test_readme_error_table_is_there_and_covers_the_launcher():
    assert len(ROWS) >= 20
    commands = " ".join(r[1] for r in ROWS)
    for word in ("pretrain", "probe", "reconstruct", "validate-data", "--resume auto", "data.format=wds", "finetune",
                 "knn"):  # fmt: skip
        assert word in commands


@needs_dali
@pytest.mark.parametrize("mistake, command, message, status", ROWS, ids=[r[0] for r in ROWS])
def test_readme_error_table(mistake, command, message, status, places, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.chdir(tmp_path)  # the default train.out_dir (runs/mae_debug) lands here, fresh for each row
    run_before = _snapshot(Path(places["RUN"]))
    argv = [_fill(a, places) for a in shlex.split(command)]
    assert argv[0] == "mimfast"
    rc = main(argv[1:])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got:\n{err}"
    assert rc == status, (rc, err)
    pos = 0
    for fragment in _fill(message, places).split("…"):
        found = lines[0].find(fragment, pos)
        assert found >= 0, f"README says {message!r};\n  missing {fragment!r} (in order) in\n  {lines[0]}"
        pos = found + len(fragment)
    assert _snapshot(Path(places["RUN"])) == run_before, "a failed command changed the run directory"


@needs_dali
def test_bad_image_mid_epoch_names_the_file_and_writes_nothing_half_done(places, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "run"
    rc = main(["pretrain", f"data.root={places['BAD']}", "train.batch_size=4", "--out", str(out), "train.ckpt_every=1"])
    err = capsys.readouterr().err
    bad = sorted((Path(places["BAD"]) / "train").iterdir())[1] / "00005.JPEG"
    assert rc == 2 and f"cannot decode {bad}" in err and "validate-data" in err, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    k = len(steps)
    assert steps == list(range(1, k + 1)) and k < 10, steps  # the corrupt file is in the first epoch (10 steps)
    # every step that completed has its metrics line and (ckpt_every=1, keep_last=2) its checkpoint; the failing
    # step has neither, and no half-written file is left
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == [f"ckpt_{i:08d}.pt" for i in range(max(1, k - 1), k + 1)]
    assert not list(out.glob("*.tmp"))


def test_options_and_overrides_in_any_order():
    a = parse_args(["pretrain", "--config", "mae_debug", "--out", "runs/x", "train.epochs=3", "--resume", "auto",
                    "optim.blr=1e-3"])  # fmt: skip
    assert a.overrides == ["train.epochs=3", "optim.blr=1e-3"] and a.out == "runs/x" and a.resume == "auto"
    b = parse_args(["pretrain", "train.epochs=3", "--out", "runs/x", "optim.blr=1e-3", "--config", "mae_debug"])
    assert b.overrides == a.overrides and b.config == "mae_debug"
    c = parse_args(["probe", "--device", "cpu", "--checkpoint", "runs/x", "--pool", "cls"])
    assert c.checkpoint == "runs/x" and c.device == "cpu" and c.pool == "cls"
    d = parse_args(["validate-data", "--quiet", "/data", "--format", "wds"])
    assert d.path == "/data" and d.format == "wds" and d.quiet
    e = parse_args(["--debug", "reconstruct", "--num-images", "3", "--checkpoint", "r"])
    assert e.debug and e.num_images == 3


def test_print_config_with_overrides_after_options(capsys):
    assert main(["pretrain", "--config", "mae_debug", "--out", "runs/x", "train.epochs=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "train.epochs=3" in out and "train.out_dir=runs/x" in out


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MIMFAST_DEBUG"}
    env.update(TRITON_INTERPRET="0", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "mimfast.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip


def test_debug_flag_and_env_show_the_traceback():
    plain = _cli("pretrain", "train.epoch=3")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("error: override 'train.epoch': unknown key")
    for proc in (_cli("pretrain", "train.epoch=3", "--debug"), _cli("--debug", "pretrain", "train.epoch=3"),
                 _cli("pretrain", "train.epoch=3", env_extra={"MIMFAST_DEBUG": "1"})):  # fmt: skip
        assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr, proc.stderr
        assert "ConfigError: override 'train.epoch': unknown key" in proc.stderr


def test_unexpected_errors_are_one_line_and_say_so(monkeypatch, capsys):
    import mimfast.demo as demo

    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(demo, "cmd_demo", boom)
    monkeypatch.delenv("MIMFAST_DEBUG", raising=False)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: internal error, ZeroDivisionError: division by zero")
    assert "--debug" in err[0]

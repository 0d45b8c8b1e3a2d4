"""The `mimfast` command: the README's main job on a tiny built-in batch, and clear errors on bad arguments."""

from __future__ import annotations

import re
import subprocess
import sys

from mimfast.cli import main


def test_demo_runs_and_reports(capsys):
    rc = main(["demo", "--n", "2048", "--dim", "16", "--codebook-size", "64", "--clusters", "32", "--steps", "4",
               "--batch", "512", "--reps", "1", "--compare-steps", "30"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    table = re.findall(r"^  (vq \(no restart\)|gumbel|regularized)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%$", out, re.M)
    assert [r[0] for r in table] == ["vq (no restart)", "gumbel", "regularized"], out
    assert "index agreement 100.0000%" in out, out
    before, after = map(float, re.search(r"commitment loss ([\d.]+) \(was ([\d.]+)\)", out).groups()[::-1])
    assert after < before, f"training did not lower the commitment loss: {before} -> {after}"
    assert re.search(r"perplexity [\d.]+ of 64, codes used [\d.]+%", out)


def test_bad_arguments_give_clear_errors(capsys):
    assert main(["demo", "--dim", "0"]) == 2
    assert "--dim must be >= 1" in capsys.readouterr().err


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "mimfast.cli", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--codebook-size" in out.stdout

"""The sm_90 compile gate (``bench/compile_report.py``) in CI: every launch the launchers make at PERF.md's benchmark
shapes (and the awkward test shapes) compiles for Hopper (GPUTarget("cuda", 90, 32)) without a GPU, with the wheel's
ptxas, and the gate's rules hold: vq_search, token gather / restore, block masks and the Gumbel-softmax kernels.

The report runs in a subprocess without ``TRITON_INTERPRET`` (the kernels must be real JIT functions). Results are
cached per specialization under ``~/.cache/mimfast/compile-gate`` (``MIMFAST_COMPILE_CACHE``): about a minute on
2 cores when nothing is cached, seconds afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SM90_SMEM_PER_CTA = 232448  # 227 KB opt-in maximum per CTA
SM86_SMEM_PER_CTA = 101376  # 99 KB
SMS = 132


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia import compiler as nvc

        return Path(nvc.get_ptxas(90).path).is_file()
    except Exception:  # noqa: BLE001 - no triton / no NVIDIA backend: the gate cannot run here
        return False


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="needs triton's NVIDIA backend and its ptxas")


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MIMFAST_POISON_OUTPUTS")}
    cmd = [sys.executable, str(ROOT / "bench" / "compile_report.py"), "--check", "--quiet",
           "--json", str(out / "rows.json"), "--out", str(out / "report.md")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    rows = json.loads((out / "rows.json").read_text()) if (out / "rows.json").is_file() else []
    return proc, rows, (out / "report.md").read_text() if (out / "report.md").is_file() else ""


def _rows(rows, op=None, kernel=None, arch="sm_90", bench=None, has=None):
    sel = [r for r in rows if r["arch"] == arch and (op is None or r["op"] == op)]
    sel = [r for r in sel if kernel is None or r["kernel"] == kernel]
    sel = [r for r in sel if bench is None or r["bench"] == bench]
    return [r for r in sel if has is None or has in r["case"]]


def test_gate_passes(gate):
    proc, rows, report = gate
    failures = report.split("## Gate failures", 1)[1] if "## Gate failures" in report else proc.stderr[-4000:]
    assert proc.returncode == 0, failures
    assert rows and all("error" not in r for r in rows)
    assert {r["op"] for r in rows} == {"vq_search", "gather_tokens", "restore_tokens", "block_mask", "gumbel_softmax",
                                       "linear_cross_entropy"}  # fmt: skip


def test_no_spills_and_smem_within_limits_at_benchmark_shapes(gate):
    _, rows, _ = gate
    bench = [r for r in rows if r["bench"]]
    assert len(bench) > 300
    spilled = [(r["case"], r["kernel"], r["config"]) for r in bench if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled
    for r in bench:
        limit = SM90_SMEM_PER_CTA if r["arch"] == "sm_90" else SM86_SMEM_PER_CTA
        assert r["shared"] <= limit, (r["case"], r["kernel"], r["config"], r["shared"])
    # the fallback tile set of a ~99 KB part is really compiled for it (tensor-core rows on mma, not wgmma)
    sm86 = _rows(rows, "vq_search", "_vq_search_fwd_kernel", arch="sm_86", bench=True)
    assert sm86 and {r["path"] for r in sm86 if "float32 D" not in r["case"]} <= {"mma", "FMA"}


def test_autocast_search_runs_on_tensor_cores(gate):
    """bf16 activations + fp32 codebook under autocast (the common training call): wgmma, every autotune candidate."""
    _, rows, _ = gate
    auto = _rows(rows, "vq_search", "_vq_search_fwd_kernel", bench=True, has="autocast(bf16)")
    assert len(auto) >= 9 * 3 and {r["path"] for r in auto} == {"wgmma"}
    bf16 = _rows(rows, "vq_search", "_vq_search_fwd_kernel", bench=True, has=" bfloat16")
    assert bf16 and {r["path"] for r in bf16} == {"wgmma"}
    tf32 = _rows(rows, "vq_search", "_vq_search_fwd_kernel", bench=True, has=" tf32")
    assert tf32 and {r["path"] for r in tf32} == {"wgmma"}


def test_cosine_math_is_correctly_rounded(gate):
    """The cosine metric's norms use sqrt.rn / div.rn: no sqrt.approx or div.full anywhere in its kernels."""
    _, rows, _ = gate
    cos = [r for r in rows if r["op"] == "vq_search" and r["case"].startswith("cosine")]
    assert cos and not [(r["case"], r["kernel"], r["approx"]) for r in cos if r["approx"]]


def test_every_autotune_candidate_is_gated(gate):
    """The search is autotuned over a pruned candidate set; every candidate at every benchmark shape is compiled."""
    _, rows, _ = gate
    fwd = _rows(rows, "vq_search", "_vq_search_fwd_kernel", bench=True)
    tuned = [r for r in fwd if r["candidate"]]
    assert tuned and all(1 <= r["candidate"][1] <= 4 for r in tuned)
    counts = {}
    for r in tuned:
        counts.setdefault((r["case"], r["arch"]), set()).add(r["candidate"][0])
    assert any(len(c) > 1 for c in counts.values())
    assert all(c == set(range(len(c))) for c in counts.values())


def test_gumbel_kernels_are_gated(gate):
    """Every Gumbel-softmax launch at PERF.md's shapes (16384 x 1024, 65536 x 8192; bf16 and fp32): the forward in
    each mode (soft, hard, indices-only, Regularized VQ's per-row flags + best match) and the backward with and
    without row flags, one row tile in registers (SINGLE), no spills, at least two CTAs per SM of grid."""
    _, rows, _ = gate
    g = _rows(rows, "gumbel_softmax", bench=True)
    modes = ("fwd soft", "fwd hard", "fwd indices-only", "fwd hard, sample_rows + best (Reg-VQ)", "bwd",
             "bwd, sample_rows")  # fmt: skip
    for shape in ("16384x1024", "65536x8192"):
        for dt in ("bfloat16", "float32"):
            for mode in modes:
                sel = [r for r in g if r["shape"] == shape and r["group"] == f"{mode} {dt}"]
                assert len(sel) == 1, (shape, dt, mode, len(sel))
                r = sel[0]
                want = "_gumbel_softmax_bwd_kernel" if mode.startswith("bwd") else "_gumbel_softmax_fwd_kernel"
                assert r["kernel"] == want and "SINGLE=True" in r["config"], (r["kernel"], r["config"])
                assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["grid"] >= 2 * SMS
                assert r["ctas_per_sm"] >= 2, (r["case"], r["regs"], r["ctas_per_sm"])
    # K past one tile (the two-pass path) compiles too (test shapes, reported)
    tiled = _rows(rows, "gumbel_softmax", bench=False, has="x8193")
    assert tiled and all("SINGLE=False" in r["config"] and "error" not in r for r in tiled)


def test_grids_fill_the_gpu_at_benchmark_shapes(gate):
    """132 SMs: the search (split over K where rows are few), gather / restore and the restore's backward launch at
    least one CTA per SM at every benchmark shape. Exceptions, where the work is smaller than the GPU: the per-code
    norm pass at K = 1024 (a K x D pass of a few microseconds) and block masks at B < 132 (one program per sample)."""
    _, rows, _ = gate
    for r in rows:
        if not r["bench"] or r["arch"] != "sm_90":
            continue
        if r["kernel"] == "_vq_code_stats_kernel" and "x1024" in r["shape"]:
            continue
        if r["op"] == "block_mask" and int(r["shape"].split("=")[1]) < SMS:
            continue
        assert r["grid"] >= SMS, (r["op"], r["case"], r["kernel"], r["grid"])

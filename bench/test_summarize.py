"""bench/summarize.py on hand-written pytest-benchmark records (a sanity test, not a benchmark: run with
``pytest bench/ --benchmark-skip``)."""

from __future__ import annotations

import json

import summarize


def _rec(group: str, median: float, **info) -> dict:
    return {"group": group, "name": f"test[{info.get('provider', '?')}]", "stats": {"median": median},
            "extra_info": info}  # fmt: skip


def _write(tmp_path, name: str, records: list[dict]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"machine_info": {"node": "gpu0"}, "benchmarks": records}))
    return str(path)


def test_loader_vs_step_verdict_and_tables(tmp_path, capsys):
    step = "mae_step mae_vit_base_patch16_dec512d8b cuda B=256"
    loader = "loader train cuda 224px B=256 500x375 JPEGs"
    a = _write(tmp_path, "mae.json", [
        _rec(step, 0.060, provider="mimfast", model="vit_b", batch=256, device="cuda", img_per_s=4266.7, mfu=0.31,
             gpu="NVIDIA H200", torch="2.11"),
        _rec(step, 0.120, provider="eager", model="vit_b", batch=256, device="cuda", img_per_s=2133.3, mfu=0.15),
    ])  # fmt: skip
    b = _write(tmp_path, "loader.json", [
        _rec(loader, 0.5, provider="dali-mixed-decode", device="cuda", num_threads=16, img_per_s=10240.0,
             img_per_s_steady=12000.0),
        _rec(loader, 2.0, provider="dali-cpu-decode", device="cuda", num_threads=16, img_per_s=2560.0,
             img_per_s_steady=3000.0),
    ])  # fmt: skip
    assert summarize.main([a, b]) == 0
    out = capsys.readouterr().out
    assert f"### {step}" in out and f"### {loader}" in out
    assert "| mimfast | 60.000 ms | 4,267 | 31.0% |" in out  # fastest first, only the columns the group has
    assert "fastest MAE step: mimfast on vit_b, batch 256: 4,267 img/s" in out
    assert "| dali-mixed-decode (16 threads) | 10,240 | 12,000 | 2.81x | yes |" in out
    assert "| dali-cpu-decode (16 threads) | 2,560 | 3,000 | 0.70x | NO: the loader is the bottleneck |" in out


def test_cpu_only_or_broken_input_is_reported(tmp_path, capsys):
    cpu = _write(tmp_path, "cpu.json", [_rec("mae_step debug cpu B=16", 0.05, provider="mimfast", device="cpu",
                                             img_per_s=320.0, batch=16, model="debug")])  # fmt: skip
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    assert summarize.main([cpu, str(bad)]) == 0
    captured = capsys.readouterr()
    assert "issue 4's comparison needs both" in captured.out and "bad.json: not a pytest-benchmark JSON" in captured.err
    assert summarize.main([str(bad)]) == 1


def test_finetune_launcher_vs_step(tmp_path, capsys):
    step = "finetune_step vit_base_patch16_224_cls cuda B=256"
    run = "finetune launcher vit_b16 cuda B=256 (DALI, RandAugment + erasing)"
    a = _write(tmp_path, "ft.json", [
        _rec(step, 0.1, provider="mimfast", model="vit_b", batch=256, device="cuda", img_per_s=2560.0),
        _rec(run, 9.0, provider="mimfast launcher + DALI", device="cuda", batch=256, num_threads=16, img_per_s=2500.0),
    ])  # fmt: skip
    b = _write(tmp_path, "slow.json", [
        _rec(run, 9.0, provider="mimfast launcher + DALI", device="cuda", batch=256, num_threads=4, img_per_s=1200.0),
    ])  # fmt: skip
    assert summarize.main([a, b]) == 0
    out = capsys.readouterr().out
    assert "fastest fine-tuning step: mimfast on vit_b, batch 256: 2,560 img/s" in out
    assert "| mimfast launcher + DALI (16 threads) | 2,500 | 0.98x | yes |" in out
    assert "| mimfast launcher + DALI (4 threads) | 1,200 | 0.47x | NO: " in out

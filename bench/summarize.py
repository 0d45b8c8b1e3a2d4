"""Print the short table PERF.md asks for at the end of a benchmark run, from pytest-benchmark JSON files.

    python bench/summarize.py bench/results/h200.json [more.json ...]

One markdown table per benchmark group (median time and the figures each suite puts in ``extra_info``: img/s, MFU,
TB/s, TFLOP/s, floor ratio), then issue 4's check: the DALI train loader's img/s against the MAE step's img/s on the
same machine (the loader must not be the bottleneck), and issue 16's: the fine-tuning launcher fed by DALI against the
fine-tuning step alone. Reads only what the JSON holds; nothing is computed twice.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

# extra_info keys shown, in this order, when a group has them
COLUMNS = [
    ("img_per_s", "img/s", "{:,.0f}"),
    ("img_per_s_steady", "img/s steady", "{:,.0f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("effective_tb_s", "TB/s", "{:.3g}"),
    ("tflops", "TFLOP/s", "{:.3g}"),
    ("floor_ratio", "x floor", "{:.2f}"),
    ("peak_fraction", "of bf16 peak", "{:.1%}"),
    ("extra_mem_ratio_logits", "extra mem / logits", "{:.2%}"),
    ("speedup_vs_official", "x official", "{:.2f}"),
    ("peak_mem_gib", "peak GiB", "{:.1f}"),
    ("index_agreement_fp64", "idx agree", "{:.4f}"),
]


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return spec.format(value)
    except (TypeError, ValueError):
        return str(value)


def load(paths: list[str]) -> tuple[list[dict], list[str]]:
    """Every benchmark record of ``paths`` (files that are not pytest-benchmark JSON are reported, not fatal)."""
    records, problems = [], []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
            benches = data["benchmarks"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{p}: not a pytest-benchmark JSON file ({type(e).__name__}: {e})")
            continue
        machine = data.get("machine_info", {}).get("node", "?")
        for b in benches:
            b = dict(b)
            b["_file"], b["_machine"] = p, machine
            records.append(b)
    return records, problems


def tables(records: list[dict]) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r.get("group") or r["name"]].append(r)
    out = []
    for group in sorted(groups):
        rows = groups[group]
        cols = [c for c in COLUMNS if any(r.get("extra_info", {}).get(c[0]) is not None for r in rows)]
        out.append(f"### {group}\n")
        out.append("| provider | median | " + " | ".join(c[1] for c in cols) + " |")
        out.append("|---|---|" + "---|" * len(cols))
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            info = r.get("extra_info", {})
            name = info.get("provider") or r["name"]
            med = r["stats"]["median"]
            med_s = f"{med * 1e3:.3f} ms" if med < 1 else f"{med:.2f} s"
            out.append(f"| {name} | {med_s} | " + " | ".join(_fmt(info.get(k), f) for k, _, f in cols) + " |")
        gpu = next((r["extra_info"].get("gpu") for r in rows if r.get("extra_info", {}).get("gpu")), None)
        out.append(f"\n{gpu or 'CPU'}; torch {rows[0].get('extra_info', {}).get('torch', '?')}\n")
    return "\n".join(out)


def loader_vs_step(records: list[dict]) -> str | None:
    """Issue 4: the `mixed` loader's img/s over the fastest MAE step's img/s on the GPU (None if either is missing)."""
    loaders = [r for r in records if r.get("extra_info", {}).get("provider", "").startswith("dali-")]
    steps = [r for r in records if "mae_step" in (r.get("group") or "") and r.get("extra_info", {}).get("img_per_s")]
    cuda_loaders = [r for r in loaders if r["extra_info"].get("device") == "cuda"]
    cuda_steps = [r for r in steps if r["extra_info"].get("device") == "cuda"]
    if not cuda_loaders or not cuda_steps:
        return None
    fastest = max(cuda_steps, key=lambda r: r["extra_info"]["img_per_s"])
    step_ips = fastest["extra_info"]["img_per_s"]
    lines = [
        "### issue 4: input pipeline vs training step (GPU)\n",
        f"fastest MAE step: {fastest['extra_info']['provider']} on {fastest['extra_info']['model']}, batch "
        f"{fastest['extra_info']['batch']}: {step_ips:,.0f} img/s\n",
        "| loader | img/s (epoch, start-up included) | img/s steady | / step img/s | keeps up |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(cuda_loaders, key=lambda r: r["extra_info"]["provider"]):
        i = r["extra_info"]
        steady = i.get("img_per_s_steady") or i["img_per_s"]
        ok = "yes" if steady >= step_ips else "NO: the loader is the bottleneck"
        lines.append(
            f"| {i['provider']} ({i['num_threads']} threads) | {i['img_per_s']:,.0f} | {steady:,.0f} | "
            f"{steady / step_ips:.2f}x | {ok} |"
        )
    return "\n".join(lines)


def finetune_launcher_vs_step(records: list[dict]) -> str | None:
    """Issue 16: the fine-tuning launcher fed by DALI (RandAugment + erasing on the GPU) against the fine-tuning step
    alone on the GPU, same model and batch (None if either is missing). Within 5% = the loader keeps up."""
    runs = [r for r in records if r.get("extra_info", {}).get("provider", "").startswith("mimfast launcher")]
    steps = [r for r in records if "finetune_step" in (r.get("group") or "")
             and r.get("extra_info", {}).get("device") == "cuda" and r["extra_info"].get("img_per_s")]  # fmt: skip
    if not runs or not steps:
        return None
    fastest = max(steps, key=lambda r: r["extra_info"]["img_per_s"])
    step_ips = fastest["extra_info"]["img_per_s"]
    lines = [
        "### issue 16: fine-tuning launcher + DALI vs the fine-tuning step (GPU)\n",
        f"fastest fine-tuning step: {fastest['extra_info']['provider']} on {fastest['extra_info']['model']}, batch "
        f"{fastest['extra_info']['batch']}: {step_ips:,.0f} img/s\n",
        "| run | img/s (steps 11-40) | / step img/s | loader keeps up |",
        "|---|---|---|---|",
    ]
    for r in runs:
        i = r["extra_info"]
        keeps_up = i["img_per_s"] >= 0.95 * step_ips
        ok = "yes" if keeps_up else "NO: the input pipeline (or the launcher) is the bottleneck"
        lines.append(f"| {i['provider']} ({i.get('num_threads', '?')} threads) | {i['img_per_s']:,.0f} | "
                     f"{i['img_per_s'] / step_ips:.2f}x | {ok} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json output)")
    args = ap.parse_args(argv)
    records, problems = load(args.json)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if not records:
        print("no benchmark records in " + ", ".join(args.json), file=sys.stderr)
        return 1
    print(tables(records))
    verdict = loader_vs_step(records)
    print(verdict if verdict else "(no GPU loader and GPU MAE-step records together: issue 4's comparison needs both)")
    ft = finetune_launcher_vs_step(records)
    if ft:
        print(ft)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

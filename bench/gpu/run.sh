#!/usr/bin/env bash
# On the lent GPU machine (the device tool runs this in the repo root; $OUT comes back). See bench/results/README.md.
# A lent session runs the kit in this order (DEVELOPERS: the GPU backlog comes first):
#
#   bash bench/gpu/run.sh core      call 1, nothing carried: the ceilings (HBM copy, bf16 matmul) measured first and
#                                   used for every floor ratio, then every kernel and model-step suite of bench/ at
#                                   PERF.md's shapes, the must-shows first (codebook search and Gumbel at 65536 x 8192,
#                                   gather / restore TB/s, the MAE ViT-B/16 step, linear + CE at 55% of peak, the BEiT
#                                   and CAE ViT-B/16 steps vs their eager twins, the MAGE step and MaskGIT generation
#                                   vs the host-noise sampler, the ViT-B/16 fine-tuning step), `pytest -m gpu` plus the
#                                   kernel and model test
#                                   files on the GPU, then the remaining suites and the torch.compile providers as time
#                                   allows (BUDGET_S, default 420 s for the whole command)
#   bash bench/gpu/run.sh stash     calls 2-3: keep the .gpu/site.tar.xz.part* this call carried (outside the tree)
#   bash bench/gpu/run.sh dali      call 4, carrying the last part: install DALI from the parts, then the DALI
#                                   `mixed` loader's img/s against the MAE step's img/s (both in this call), the
#                                   fine-tuning launcher fed by DALI (RandAugment + erasing) against the fine-tuning
#                                   step alone, and the DALI-dependent GPU tests (`tests/test_data.py
#                                   tests/test_train.py tests/test_augment.py tests/test_finetune.py -m gpu`)
#
# (`kernels` and `issue4` are the old names of `core` and `dali`.)
# Everything is written under $OUT: bench JSON (pytest-benchmark), one log, summary.md (printed last).
set -uo pipefail
cd "$(dirname "$0")/../.."
STASH="${STASH:-/tmp/mimfast-gpu-parts}"
OUT="${OUT:-/tmp/mimfast-gpu-out}"
BUDGET_S="${BUDGET_S:-420}"
T0=$SECONDS
mkdir -p "$STASH" "$OUT"
LOG="$OUT/run.log"

say() { echo "[run.sh +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - (SECONDS - T0))); }

stash() {
  local p
  for p in .gpu/site.tar.xz.part* .gpu/SHA256SUMS .gpu/MANIFEST; do
    [ -f "$p" ] && cp "$p" "$STASH/"
  done
  say "stash $STASH now holds: $(cd "$STASH" && ls | tr '\n' ' ')"
}

install_dali() {
  if python3 -c "import nvidia.dali" 2>/dev/null; then
    say "DALI already importable: $(python3 -c 'import nvidia.dali as d; print(d.__version__)')"
    return 0
  fi
  [ -f "$STASH/SHA256SUMS" ] || { say "missing $STASH/SHA256SUMS: carry .gpu/SHA256SUMS with the last part"; return 1; }
  (cd "$STASH" && sha256sum -c --quiet SHA256SUMS) || {
    say "parts missing or corrupt (a machine given back between calls loses the stash): carry every part again"
    return 1
  }
  local site
  site="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  if [ ! -w "$site" ]; then
    site=/tmp/mimfast-site
    mkdir -p "$site"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  say "unpacking DALI into $site"
  local unxz=(xz -dc -T0)
  command -v xz >/dev/null || unxz=(python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)")
  cat "$STASH"/site.tar.xz.part* | "${unxz[@]}" | tar -C "$site" -xf - || return 1
  python3 -c "import nvidia.dali as d; print('DALI', d.__version__)" 2>&1 | tee -a "$LOG"
}

bench() {  # bench NAME TIMEOUT_S PYTEST_ARGS...: one pytest-benchmark run into $OUT/NAME.json
  local name=$1 t=$2
  shift 2
  if [ "$(left)" -lt 30 ]; then
    say "skipping $name: under 30 s of the budget left"
    return 0
  fi
  [ "$t" -gt "$(left)" ] && t=$(left)
  say "pytest $* (timeout ${t}s)"
  timeout -k 10 "$t" python3 -m pytest "$@" --benchmark-only --benchmark-json="$OUT/$name.json" -q -rs \
    -p no:cacheprovider 2>&1 | tee -a "$LOG"
  say "$name: exit ${PIPESTATUS[0]}"
}

header() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$LOG"
  export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS for the exact-resume tests
  say "measuring the ceilings (every floor ratio below uses them)"
  if timeout -k 10 60 python3 bench/gpu/ceilings.py --out "$OUT/ceilings.json" 2>&1 | tee -a "$LOG"; then
    export MIMFAST_CEILINGS="$OUT/ceilings.json"
  else
    say "ceilings not measured: floor ratios fall back to the H100 datasheet (PERF.md)"
  fi
}

summary() {
  {
    [ -f "$OUT/ceilings.json" ] && python3 bench/gpu/ceilings.py --show "$OUT/ceilings.json"
    python3 bench/summarize.py $(ls "$OUT"/*.json | grep -v '/ceilings\.json$')
  } >"$OUT/summary.md" 2>&1
  say "done in $((SECONDS - T0)) s; summary:"
  cat "$OUT/summary.md"
}

gpu_tests() {  # gpu_tests TIMEOUT_S PYTEST_ARGS...
  local t=$1
  shift
  [ "$t" -gt "$(left)" ] && t=$(left)
  say "pytest $* (timeout ${t}s)"
  timeout -k 10 "$t" python3 -m pytest "$@" -q -rs -p no:cacheprovider 2>&1 | tee -a "$LOG"
  say "tests: exit ${PIPESTATUS[0]}"
}

core() {
  header
  # the must-shows first, one JSON per pytest run (a run cut by its timeout writes none)
  bench vq_65536x8192 150 bench/test_vq.py -k "65536x8192 and (mimfast or eager)"
  bench gumbel_65536x8192 100 bench/test_gumbel.py -k "65536x8192 and not compile"
  bench masking 120 bench/test_masking.py -k "mimfast or mae_ref"
  bench mae_step 150 bench/test_mae_step.py -k "not compile"
  bench cross_entropy 120 bench/test_cross_entropy.py -k "not compile"
  bench beit_cae_step 150 bench/test_beit_step.py bench/test_cae_step.py -k "not compile"
  bench mage_step 90 bench/test_mage_step.py -k "not compile"
  bench generate 150 bench/test_generate.py
  bench finetune_step 90 bench/test_finetune_step.py -k "not launcher and not compile"
  gpu_tests 150 tests/ -m gpu
  gpu_tests 150 tests/test_vq_search.py tests/test_quantize.py tests/test_token_gather.py tests/test_mask_generators.py \
    tests/test_gumbel.py tests/test_gumbel_quantizers.py tests/test_cross_entropy.py tests/test_beit.py \
    tests/test_cae.py tests/test_mage.py tests/test_maskgit.py tests/test_vit_classifier.py tests/test_mixup.py \
    tests/test_lars_knn.py -x
  # every other suite, most informative first, then the slow torch.compile providers
  bench attention 90 bench/test_attention.py
  bench vq_rest 120 bench/test_vq.py -k "not 65536x8192 and not compile"
  bench gumbel_rest 60 bench/test_gumbel.py -k "not 65536x8192 and not compile"
  bench block_masking 60 bench/test_block_masking.py
  bench masking_rest 60 bench/test_masking.py -k "not (mimfast or mae_ref) and not compile"
  bench mae_step_compile 200 bench/test_mae_step.py -k compile
  bench cross_entropy_compile 90 bench/test_cross_entropy.py -k compile
  bench beit_cae_step_compile 200 bench/test_beit_step.py bench/test_cae_step.py bench/test_mage_step.py \
    bench/test_finetune_step.py -k compile
  bench kernels_compile 120 bench/test_vq.py bench/test_masking.py bench/test_gumbel.py -k compile
  summary
}

dali() {
  stash
  install_dali || say "DALI NOT INSTALLED: the loader bench and the DALI GPU tests will skip"
  header
  bench loader 120 bench/test_loader.py
  bench mae_step 150 bench/test_mae_step.py -k "not compile"  # the step the loader must keep up with, same run
  # fine-tuning: the launcher with the DALI loader (RandAugment + erasing on the GPU) vs the step alone, same run
  bench finetune_launcher 180 bench/test_finetune_step.py -k "launcher or (cuda and mimfast and not compile)"
  gpu_tests 200 tests/test_data.py tests/test_train.py tests/test_augment.py tests/test_finetune.py -m gpu
  summary
}

case "${1:-}" in
  core | kernels) core ;;
  stash) stash ;;
  dali | issue4) dali ;;
  *)
    echo "usage: bash bench/gpu/run.sh core|stash|dali" >&2
    exit 2
    ;;
esac

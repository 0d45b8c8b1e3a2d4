#!/usr/bin/env bash
# On the lent GPU machine (the device tool runs this in the repo root; $OUT comes back). See bench/results/README.md.
#
#   bash bench/gpu/run.sh stash     keep the .gpu/site.tar.xz.part* this call carried (outside the tree, in $STASH)
#   bash bench/gpu/run.sh issue4    stash, install DALI from the parts, then issue 4's measurement: the DALI `mixed`
#                                   loader's img/s against the MAE ViT-B/16 training step's img/s at batch 256, the
#                                   GPU data tests and a short CUDA pretraining run; then the rest of bench/ as time
#                                   allows (BUDGET_S, default 420 s for the whole command)
#   bash bench/gpu/run.sh kernels   issues 12 and 13's measurement, no DALI needed (one call): the codebook search at
#                                   65536 x 8192 (bf16, autocast bf16 + fp32 codebook, fp32) against the eager path and
#                                   the floor, the Gumbel-softmax (straight-through, fwd and fwd+bwd, 65536 x 8192, bf16
#                                   and fp32) against F.gumbel_softmax and the floor, gather / restore (fwd, fwd+bwd;
#                                   B = 32 ... 1024) in TB/s, the kernel test files on the GPU, then every kernel suite
#                                   (vq, gumbel, masking, block masks) in what time is left
#
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

issue4() {
  stash
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"
  install_dali || say "DALI NOT INSTALLED: the loader bench and GPU data tests will skip"
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$LOG"
  export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS for the exact-resume test

  # the must-show: loader vs step. One JSON per pytest run: a run cut by its timeout writes none, so the slow
  # torch.compile providers go last, on their own
  bench loader 120 bench/test_loader.py
  bench mae_step 150 bench/test_mae_step.py -k "not compile"
  say "pytest tests/test_data.py tests/test_train.py -m gpu"
  timeout -k 10 "$(($(left) < 150 ? $(left) : 150))" python3 -m pytest tests/test_data.py tests/test_train.py -m gpu \
    -q -rs -p no:cacheprovider 2>&1 | tee -a "$LOG"
  say "gpu tests: exit ${PIPESTATUS[0]}"
  bench mae_step_compile 200 bench/test_mae_step.py -k compile
  # the rest of the suite, most informative first, in what time is left
  bench kernels 200 bench/test_masking.py bench/test_vq.py
  bench others 120 bench/test_attention.py bench/test_block_masking.py
  python3 bench/summarize.py "$OUT"/*.json >"$OUT/summary.md" 2>&1
  say "done in $((SECONDS - T0)) s; summary:"
  cat "$OUT/summary.md"
}

kernels() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$LOG"
  export PYTHONUNBUFFERED=1
  # the must-show first: search at the issue's shape (mimfast vs eager, floor ratio in extra_info), gather/restore
  bench vq_65536x8192 150 bench/test_vq.py -k "65536x8192 and (mimfast or eager)"
  bench gumbel_65536x8192 100 bench/test_gumbel.py -k "65536x8192 and not compile"
  bench masking 150 bench/test_masking.py -k "mimfast or mae_ref"
  say "pytest kernel tests on the GPU"
  timeout -k 10 "$(($(left) < 150 ? $(left) : 150))" python3 -m pytest tests/test_vq_search.py tests/test_quantize.py \
    tests/test_token_gather.py tests/test_mask_generators.py tests/test_gumbel.py tests/test_gumbel_quantizers.py \
    -q -x -rs -p no:cacheprovider 2>&1 | tee -a "$LOG"
  say "kernel tests: exit ${PIPESTATUS[0]}"
  # every kernel suite, in what time is left (torch.compile providers last: they compile for minutes)
  bench vq_rest 150 bench/test_vq.py -k "not 65536x8192 and not compile"
  bench gumbel_rest 60 bench/test_gumbel.py -k "not 65536x8192 and not compile"
  bench block_masking 60 bench/test_block_masking.py
  bench kernels_compile 120 bench/test_vq.py bench/test_masking.py bench/test_gumbel.py -k compile
  python3 bench/summarize.py "$OUT"/*.json >"$OUT/summary.md" 2>&1
  say "done in $((SECONDS - T0)) s; summary:"
  cat "$OUT/summary.md"
}

case "${1:-}" in
  stash) stash ;;
  issue4) issue4 ;;
  kernels) kernels ;;
  *)
    echo "usage: bash bench/gpu/run.sh stash|issue4|kernels" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# One prepared GPU run for issue #30 (about 5 minutes on one H200): LLaVA-1.5-7B-shaped random configs in bf16.
#
#   capture / plain generate and capture vs eager peak memory at 576 image tokens   (bench_capture.py)
#   capture vs eager at 2,916 and 4,624 image tokens (~2,880 / 4,608)             (bench_scaling.py)
#   16-frame video-sized sequences: 8 temporal slots of 448x448 and 672x672       (bench_video.py)
#   FastV K=2 R=50 %: theory vs measured latency saving                           (bench_pruning.py)
#
# On the device machine (its image has an older transformers: carry the pinned wheel in .whl/,
#   pip download transformers==5.25.0 --no-deps -d .whl):
#   bash benchmarks/gpu_7b.sh "$OUT"           # each script writes its section of BENCHMARKS.md there;
#                                              # the file and the logs are copied into $OUT
# (through the device tool: command "bash benchmarks/gpu_7b.sh $OUT", carry [".whl"], timeout_s 420), then here:
#   python benchmarks/_report.py FILES_AT/BENCHMARKS.md 7b_cuda   # copies the GPU sections into BENCHMARKS.md
# Here, to check the plumbing on CPU in a minute (small preset, nothing written):
#   DRY=1 bash benchmarks/gpu_7b.sh /tmp/gpu-dry
set -u
OUT=${1:-${OUT:-gpu-results}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${DRY:-0}" = 1 ]; then
  ARGS=(--preset small --device cpu --dtype float32 --no-write); SIDES=8,12; VIDEO=112x112; LIMIT=300
else
  ARGS=(--preset 7b --device cuda --dtype bfloat16); SIDES=54,68; VIDEO=448x448,672x672; LIMIT=150
  if ! "$PY" -c 'import sys, transformers; sys.exit(transformers.__version__ != "5.25.0")'; then
    WHEEL=.whl/transformers-5.25.0-py3-none-any.whl
    if [ ! -f "$WHEEL" ]; then
      echo "this machine's transformers is not 5.25.0 and $WHEEL is missing: run" \
           "'pip download transformers==5.25.0 --no-deps -d .whl' where packages can be fetched, and carry .whl" \
        | tee "$OUT/summary.txt"
      exit 2
    fi
    "$PY" -m pip install -q --no-deps --no-index "$WHEEL" || exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
  export VLMLENS_BENCH_MACHINE="the device machine: $(head -1 "$OUT/gpu.txt" | cut -d, -f1)"
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee "$OUT/versions.txt"
bench() {   # name, seconds, script arguments...: one script, its log in $OUT, never longer than its limit
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$PY" "$@" "${ARGS[@]}" > "$OUT/$name.log" 2>&1
  echo "$name: rc $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}
bench capture "$LIMIT" benchmarks/bench_capture.py --repeats 3 --new-tokens 8
bench scaling $((LIMIT * 3 / 2)) benchmarks/bench_scaling.py --sides "$SIDES" --new-tokens 4 --timeout 120
bench video "$LIMIT" benchmarks/bench_video.py --sizes "$VIDEO" --new-tokens 4 --timeout 120
bench pruning "$LIMIT" benchmarks/bench_pruning.py --repeats 3 --steps 8
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"

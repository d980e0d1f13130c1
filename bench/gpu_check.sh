#!/usr/bin/env bash
# Every GPU check and GPU benchmark in one bounded run, for a machine with an NVIDIA GPU (CI has none).
#
#   bench/gpu_check.sh [OUT_DIR]          (default $OUT, else /tmp/quantcore-gpu)
#
# Environment:
#   STEPS                the steps to run, space separated (default: all, in the order below)
#   DEADLINE_S           wall seconds the whole run may take (default 500): each step gets what is left,
#                        minus a reserve for packing the results
#   PY                   python with torch + CUDA (default python3)
#   WHEELS               a folder of wheels installed first with --no-deps into /tmp/qc-site, for an image
#                        that lacks some of quantcore's dependencies (pydantic, nvidia-modelopt ...)
#   QAT_COMPILED_MODELS  models of the qat_compiled step (default vit_small_patch16_224; resnet50's
#                        compilation took over 150 s on an H200 host)
#
# Steps, most important first (a step that fails or runs out of time does not stop the next):
#   env          nvidia-smi, torch/CUDA versions, quantcore imports
#   tests        tests/test_gpu.py + the nvJPEG test of tests/test_decode.py (GPU paths vs the CPU)
#   qat_compiled bench.qat: QAT step / FP32 step, every model under torch.compile (qat.compile: true),
#                learned ranges, bf16 autocast (the loop's default on a GPU)
#   qat          the same, eager, ViT-S and ResNet-50, learned and frozen ranges (with profiles)
#   calibration  bench.calibration: calibration overhead per calibrator vs FP32 inference, ModelOpt beside
#   decode       bench.decode: batched nvJPEG decode (+ transform on the GPU) vs the CPU paths, pixel agreement
#   variants     bench.variants: cost per extra variant evaluated in one pass, on the GPU
#   qat_fp32     bench.qat eager without autocast (printed in its log only)
# Results, packed after every step (so a run killed from outside keeps what finished):
# OUT_DIR/summary.txt and OUT_DIR/gpu-results.tgz (this run's logs, the bench/results/*cuda*.json files
# this run wrote, and docs/benchmarks.md with the *-gpu sections). Exit status 1 when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ALL="env tests qat_compiled qat calibration decode variants qat_fp32"
STEPS=${STEPS:-$ALL}
for s in $STEPS; do
  case " $ALL " in *" $s "*) ;; *) echo "unknown step '$s' in STEPS (steps: $ALL)" >&2; exit 2;; esac
done
out=${1:-${OUT:-/tmp/quantcore-gpu}}
rm -rf "$out/logs" "$out/summary.txt" "$out/gpu-results.tgz"
mkdir -p "$out/logs" || exit 2
PY=${PY:-python3}
deadline=$(( $(date +%s) + ${DEADLINE_S:-500} ))
reserve=15
stamp="$out/logs/.start"
touch "$stamp"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qc-site \
    "$WHEELS"/*.whl > "$out/logs/wheels.log" 2>&1 || echo "wheel install failed: see logs/wheels.log"
  export PYTHONPATH="/tmp/qc-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$out/summary.txt"
: > "$summary"
failed=0

pack() {  # this run's results only: JSON files written after the start stamp
  local fresh
  fresh=$(find bench/results -name '*cuda*.json' -newer "$stamp" 2>/dev/null)
  # shellcheck disable=SC2086
  tar czf "$out/gpu-results.tgz" docs/benchmarks.md $fresh -C "$out" logs || echo "packing the results failed"
}

step() {  # step NAME LIMIT_S CMD...: run with a timeout bounded by the deadline; log, summarize, pack
  local name=$1 limit=$2 left t0 rc
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return;; esac
  left=$(( deadline - $(date +%s) - reserve ))
  if [ "$left" -lt 20 ]; then
    echo "$name: not run (deadline)" | tee -a "$summary"
    failed=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$out/logs/$name.log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && failed=1
  echo "$name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$summary"
  tail -n 4 "$out/logs/$name.log"
  pack
}

step env 60 bash -c 'nvidia-smi && "$0" -c "import torch, torchvision, timm; print(torch.__version__, torch.version.cuda, \
torchvision.__version__, timm.__version__, torch.cuda.get_device_name(0)); import quantcore, pydantic; print(\"quantcore ok\")"' "$PY"
step tests 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py \
  "tests/test_decode.py::test_nvjpeg_batch_agrees_with_pil_path"
step qat_compiled 300 "$PY" -m bench.qat --device cuda --skip ddp --amp bf16 --batch 64 --steps 5 --warmup 3 --reps 3 \
  --compile --variants learned --profile never --models "${QAT_COMPILED_MODELS:-vit_small_patch16_224}"
step qat 150 "$PY" -m bench.qat --device cuda --skip ddp --amp bf16 --batch 64 --steps 5 --warmup 2 --reps 3
step calibration 200 "$PY" -m bench.calibration --device cuda --images 256 --batch 64 --reps 3
step decode 120 "$PY" -m bench.decode --device cuda --images 256 --reps 3 --batch 64 --no-fmnist
step variants 120 "$PY" -m bench.variants --device cuda --images 256 --batch 64
step qat_fp32 90 "$PY" -m bench.qat --device cuda --skip ddp --batch 64 --steps 5 --warmup 2 --reps 3 --no-write
[ -f "$out/logs/tests.log" ] && grep -h "passed\|failed\|error" "$out/logs/tests.log" | tail -n 3 >> "$summary"
pack
cat "$summary"
exit "$failed"

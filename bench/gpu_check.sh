#!/usr/bin/env bash
# Every GPU check and GPU benchmark in one bounded run, for a machine with an NVIDIA GPU (CI has none).
#
#   bench/gpu_check.sh [OUT_DIR]          (default $OUT, else /tmp/quantcore-gpu)
#
# Environment: STEPS (the steps to run, space separated; default all), PY (python with torch+CUDA, default python3), DEADLINE_S (wall seconds the whole run may
# take, default 500: each step gets what is left, minus a reserve for packing the results), WHEELS (a
# folder of wheels to install first with --no-deps into /tmp/qc-site, for an image that lacks some of
# quantcore's dependencies, e.g. pydantic or nvidia-modelopt).
#
# Steps, most important first (a step that fails or runs out of time does not stop the next):
#   env          nvidia-smi, torch/CUDA versions
#   tests        tests/test_gpu.py + the nvJPEG test of tests/test_decode.py (GPU paths vs the CPU)
#   qat_compiled bench.qat: QAT step / FP32 step on the GPU, every model under torch.compile (qat.compile:
#                true), learned ranges, bf16 autocast (the loop's default); QAT_COMPILED_MODELS picks the models
#   qat          the same, eager, ViT-S and ResNet-50, learned and frozen ranges (with profiles)
#   calibration  bench.calibration: calibration overhead per calibrator vs FP32 inference, ModelOpt beside
#   decode       bench.decode: batched nvJPEG decode (+ transform on the GPU) vs the CPU paths, pixel agreement
#   variants     bench.variants: cost per extra variant evaluated in one pass, on the GPU
#   qat_fp32     bench.qat again without autocast (printed only)
# Results: OUT_DIR/summary.txt and OUT_DIR/gpu-results.tgz (logs, bench/results/*-cuda*.json, and
# docs/benchmarks.md with the *-gpu sections the benchmarks wrote).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/quantcore-gpu}}
mkdir -p "$out/logs"
PY=${PY:-python3}
deadline=$(( $(date +%s) + ${DEADLINE_S:-500} ))
reserve=15
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qc-site \
    "$WHEELS"/*.whl > "$out/logs/wheels.log" 2>&1 || echo "wheel install failed: see logs/wheels.log"
  export PYTHONPATH="/tmp/qc-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$out/summary.txt"
: > "$summary"

pack() {
  tar czf "$out/gpu-results.tgz" -C "$PWD" docs/benchmarks.md $(ls bench/results/*cuda*.json 2>/dev/null) \
    -C "$out" logs 2>/dev/null
}
trap pack EXIT

step() {  # step NAME LIMIT_S CMD...: run with a timeout bounded by the deadline; log and summarize
  local name=$1 limit=$2 left t0 rc
  shift 2
  left=$(( deadline - $(date +%s) - reserve ))
  if [ "$left" -lt 20 ]; then
    echo "$name: not run (deadline)" | tee -a "$summary"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$out/logs/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$summary"
  tail -n 4 "$out/logs/$name.log"
}

want() { case " ${STEPS:-env tests qat qat_compiled calibration decode variants qat_fp32} " in *" $1 "*) return 0;; esac; return 1; }
want env && step env 60 sh -c "nvidia-smi; $PY -c 'import torch, torchvision, timm; print(torch.__version__, torch.version.cuda, \
torchvision.__version__, timm.__version__, torch.cuda.get_device_name(0)); import quantcore, pydantic; print(\"quantcore ok\")'"
want tests && step tests 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py \
  "tests/test_decode.py::test_nvjpeg_batch_agrees_with_pil_path"
want qat_compiled && step qat_compiled 300 "$PY" -m bench.qat --device cuda --skip ddp --amp bf16 --batch 64 --steps 5 \
  --warmup 3 --reps 3 --compile --variants learned --profile never --models "${QAT_COMPILED_MODELS:-vit_small_patch16_224,resnet50}"
want qat && step qat 150 "$PY" -m bench.qat --device cuda --skip ddp --amp bf16 --batch 64 --steps 5 --warmup 2 --reps 3
want calibration && step calibration 200 "$PY" -m bench.calibration --device cuda --images 256 --batch 64 --reps 3
want decode && step decode 120 "$PY" -m bench.decode --device cuda --images 256 --reps 3 --batch 64 --no-fmnist
want variants && step variants 120 "$PY" -m bench.variants --device cuda --images 256 --batch 64
want qat_fp32 && step qat_fp32 90 "$PY" -m bench.qat --device cuda --skip ddp --batch 64 --steps 5 --warmup 2 --reps 3 --no-write
grep -h "passed\|failed\|error" "$out/logs/tests.log" | tail -n 3 >> "$summary"
cat "$summary"

#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent GPU machine with a short budget (about 10 min
# on an H100/H200 once started). Needs torch with CUDA, torchvision, numpy, pyarrow, pillow,
# scikit-learn, scikit-image, safetensors, pyyaml, pytest, and torchdata (the trainer's loader): a
# machine without it gets the wheel from .whl/ (git-ignored; fill it here with
# `pip download --no-deps -d .whl torchdata==0.11.0` and carry it). Ray, DuckDB and faiss are not needed.
# Each step has its own time limit and a failing step does not stop the others. $OUT receives at
# most 7 files (a lent machine returns 8): each benchmark's JSON, gpu.txt and session.log (all logs).
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh            # everything
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh tests lloyd # some steps: tests lloyd train_s train_l embed
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
out="${OUT:-/tmp/gpu}"
logs="$(mktemp -d)"
mkdir -p "$out"
steps="${*:-tests lloyd train_s train_l embed}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CURATE_PROGRESS=0
if ! "$py" -c "import torchdata.stateful_dataloader" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log it, print the log's tail
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  tail -n 14 "$logs/$name.log"
  { echo "===== $name (exit $rc)"; cat "$logs/$name.log"; } >>"$out/session.log"
}

for s in $steps; do
  case "$s" in
    # the device-capable unit tests: k-means and its fused Triton kernel, Sinkhorn-Knopp, the bf16 step
    tests) step tests 120 "$py" -m pytest -q -p no:cacheprovider --device cuda \
             tests/test_kmeans.py tests/test_fused_nearest.py tests/test_mixed_precision.py tests/test_losses.py \
             -k "not faiss" ;;
    # issue 4: one Lloyd iteration, N=8M d=768 k=65,536 bf16, against the plain matmul in the same run
    # (scoring is the fused Triton kernel on CUDA; the kernel alone is also timed with other tile shapes)
    lloyd) step lloyd 240 "$py" -m benchmarks.build_lvd --lloyd-bench --n 8000000 --d 768 --k 65536 \
             --dtype bf16 --device cuda --tiles 128,256,64,8,3 64,256,64,4,4 128,128,64,4,4 \
             --out "$out/lloyd_bf16.json" ;;
    # issue 7: ViT-S/16 batch 256 and ViT-L/16 batch 64, compiled, bf16 (one rank: not sharded, autocast)
    train_s) step train_s 150 "$py" benchmarks/train_step.py --device cuda --size dinov3_vits16 \
               --batch 256 --compile --steps 8 --warmup 3 --profile --out "$out/train_vits16_b256.json" ;;
    train_l) step train_l 150 "$py" benchmarks/train_step.py --device cuda --size dinov3_vitl16 \
               --batch 64 --compile --steps 6 --warmup 3 --out "$out/train_vitl16_b64.json" ;;
    # issue 3: ViT-L/16 model-only vs JPEG files -> GPU decode -> model -> Parquet
    embed) step embed 150 "$py" -m benchmarks.embed --device cuda --model dinov3_vitl16 --images 32768 \
             --batch 256 --out "$out/embed_vitl16.json" ;;
    *) echo "unknown step $s" >&2 ;;
  esac
done

#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent GPU machine with a short budget (under 10 min on
# an H100/H200 once started; each step has its own limit, 590 s together). Every figure is the product's
# own code: the embed stage's load/setup/process/commit (benchmarks/embed.py --driver direct), one Lloyd
# iteration of `curate cluster` at the stage's defaults, and `curate train`'s step (SSLRecipe.step) with
# the shipped ViT-S/16 recipe config; each prints its ratio against a reference measured in the same run
# (model only, the plain matmul, the backbone alone and the matmul rate) and the issue's target.
#
# Needs python3 with torch (CUDA), torchvision, triton, numpy, pyarrow, pillow, fsspec, tqdm, scikit-learn,
# safetensors, pyyaml, pytest, and torchdata (the trainer's loader): a machine without torchdata gets the
# wheel from .whl/ (git-ignored; fill it here with `pip download --no-deps -d .whl torchdata==0.11.0` and
# carry it). Ray, DuckDB and faiss are not needed (nothing here imports them). A failing step does not
# stop the others. $OUT receives at most 7 files (a lent machine returns 8): gpu.txt, session.log (every
# step's whole log) and one JSON per benchmark (lloyd_bf16, train_vits16_b256, train_vitl16_b64, embed_vitl16).
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh              # everything
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh tests lloyd  # some steps: tests lloyd train_s train_l embed
#   OUT=/tmp/cpu bash benchmarks/gpu_session.sh --cpu        # the same commands at toy sizes on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
cpu=""
if [[ "${1:-}" == "--cpu" ]]; then cpu=1; shift; fi
py="${PYTHON:-python3}"
out="${OUT:-/tmp/gpu}"
logs="$(mktemp -d)"
mkdir -p "$out"
steps="${*:-tests lloyd train_s train_l embed}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CURATE_PROGRESS=0 PYTHONUNBUFFERED=1
if ! "$py" -c "import torchdata.stateful_dataloader" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [[ -n "$cpu" ]]; then
  dev=cpu
  echo "cpu dry run: $(nproc) cores" | tee "$out/gpu.txt"
  # toy sizes: the tiny test backbone, small crops and heads, compile off (its CUDA path is checked on CUDA only)
  train_small=(--size vit_test --steps 2 --warmup 1 --set compile=false crops.global_size=32 crops.local_size=16
               model.dino_head.n_prototypes=1024 model.ibot_head.n_prototypes=1024)
else
  dev=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit (x4 on a --cpu dry run), log it, print the log's tail
  local name=$1 limit=$2
  [[ -z "$cpu" ]] || limit=$((limit * 4))
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  tail -n 14 "$logs/$name.log"
  { echo "===== $name (exit $rc): $*"; cat "$logs/$name.log"; } >>"$out/session.log"
}

for s in $steps; do
  case "$s" in
    # the device-capable unit tests: k-means, its fused Triton kernel and rows on the device, the embed
    # stage's device decoding against the CPU path (nvJPEG vs libjpeg), Sinkhorn-Knopp, the bf16 step
    tests) step tests 90 "$py" -m pytest -q -p no:cacheprovider --device "$dev" -k "not faiss" \
             tests/curation/test_kmeans.py tests/curation/test_fused_nearest.py tests/curation/test_device_decode.py \
             tests/training/test_mixed_precision.py tests/training/test_losses.py ;;
    # issue 4: one Lloyd iteration, N=8M d=768 k=65,536, at the cluster stage's defaults (cosine; bf16
    # search = the fused Triton kernel on CUDA), against the plain matmul in the same run; the kernel
    # alone is also timed with other tile shapes
    lloyd) if [[ -n "$cpu" ]]; then
             step lloyd 150 "$py" -m benchmarks.build_lvd --lloyd-bench --n 20000 --d 64 --k 256 --device cpu \
               --out "$out/lloyd_bf16.json"
           else
             step lloyd 150 "$py" -m benchmarks.build_lvd --lloyd-bench --n 8000000 --d 768 --k 65536 --device cuda \
               --tiles 128,256,64,8,3 64,256,64,4,4 128,128,64,4,4 --out "$out/lloyd_bf16.json"
           fi ;;
    # issue 7: the shipped ViT-S/16 recipe (compile, bf16, 65,536 prototypes, 2x224 + 8x96) at batch 256,
    # and the same recipe with ViT-L/16 at batch 64; batches come from pinned host memory every step
    train_s) if [[ -n "$cpu" ]]; then
               step train_s 100 "$py" -m benchmarks.train_step --device cpu --batch 4 --target 2000 --profile \
                 "${train_small[@]}" --out "$out/train_vits16_b256.json"
             else
               step train_s 100 "$py" -m benchmarks.train_step --device cuda --batch 256 --target 2000 --steps 8 \
                 --warmup 3 --profile --out "$out/train_vits16_b256.json"
             fi ;;
    train_l) if [[ -n "$cpu" ]]; then
               step train_l 100 "$py" -m benchmarks.train_step --device cpu --batch 2 --target 350 \
                 "${train_small[@]}" --out "$out/train_vitl16_b64.json"
             else
               step train_l 100 "$py" -m benchmarks.train_step --device cuda --size dinov3_vitl16 --batch 64 \
                 --target 350 --steps 6 --warmup 3 --out "$out/train_vitl16_b64.json"
             fi ;;
    # issue 3: ViT-L/16 at 224, model only vs the embed stage's own code over 30,720 JPEGs, both decode
    # paths (device: nvJPEG in the worker; host: decode tasks), two units in flight per worker
    embed) if [[ -n "$cpu" ]]; then
             step embed 150 "$py" -m benchmarks.embed --driver direct --device cpu --model vit_test --size 32 \
               --images 256 --batch 32 --decode device host --out "$out/embed_vitl16.json"
           else
             step embed 150 "$py" -m benchmarks.embed --driver direct --device cuda --model dinov3_vitl16 \
               --images 30720 --batch 256 --decode device host --out "$out/embed_vitl16.json"
           fi ;;
    *) echo "unknown step $s" >&2 ;;
  esac
done

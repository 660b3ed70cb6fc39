#!/usr/bin/env bash
# Device check on a CUDA host, run as one prepared script: what the worker sees
# (`worker doctor`), one training step of ResNet-50 ours vs timm (same batch,
# resolution, channels_last, bf16, same libtorch), and a short real training
# run of the A2 recipe on real photos, then `worker eval` of its checkpoint.
#
#   bench/gpu_check.sh WORKER_BINARY PHOTO_FOLDER OUT_DIR
#
# The coordinator binary (no libtorch) is looked up next to the worker binary
# for the last part: one worker joined over gRPC, NCCL with world size 1.
#
# The worker binary is built on a CPU machine against the PyPI torch wheel and
# runs here against this host's own torch: LD_LIBRARY_PATH points the loader at
# that torch's lib/ and its nvidia/*/lib folders.
set -uo pipefail
worker=$1 photos=$2 out=$3
mkdir -p "$out"
torch_dir=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
site=$(dirname "$torch_dir")
export LD_LIBRARY_PATH="$torch_dir/lib:$(ls -d "$site"/nvidia/*/lib | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, timm; print("host torch", torch.__version__, "timm", timm.__version__)'

echo "== worker doctor"
"$worker" doctor

echo "== train step, resnet50, batch 256, 224 px, channels_last, bf16 (ours, timm, ours, timm)"
for round in 1 2; do
  "$worker" bench step --model resnet50 --batch 256 --size 224 --num-classes 1000 --steps 30 --warmup 10 \
    --channels-last --bf16 --device cuda:0
  python3 bench/timm/step_bench.py --model resnet50 --batch 256 --size 224 --num-classes 1000 \
    --steps 30 --warmup 10 --channels-last --device cuda --precision bf16 2>/dev/null
done

echo "== worker train: A2 recipe (ResNet-50, LAMB, BCE, Mixup/CutMix, RandAugment m7, RA off for 256 images) on real photos"
"$worker" train --recipe recipes/resnet50_a2.yaml --out "$out/a2" --device cuda:0 \
  --set data.root="$photos" --set model.num_classes=8 --set batch.global_size=128 --set batch.micro_size=128 \
  --set batch.repeated_augmentation=1 --set schedule.cosine.epochs=4 --set schedule.cosine.warmup_epochs=1 \
  --set eval.batch_size=64 --set runtime.log_every_steps=1 --set data.loader_threads=14 2>&1 | grep -v "^\s*$"
tail -n 3 "$out/a2/metrics.jsonl"

echo "== worker eval of the last checkpoint on the GPU"
"$worker" eval --model resnet50 --weights "$out/a2/checkpoints/epoch-0004/model.safetensors" --data "$photos" \
  --input-size 224 --crop-pct 0.95 --device cuda:0

coordinator="$(dirname "$worker")/coordinator"
if [ -x "$coordinator" ]; then
  echo "== coordinator up --local --nodes 1 --devices 0: NCCL all-reduce (world size 1), ResNet-50, 8 updates"
  timeout 300 "$coordinator" up --local --nodes 1 --devices 0 --recipe recipes/resnet50_a2.yaml --out "$out/nccl" \
    --set data.root="$photos" --set model.num_classes=8 --set batch.global_size=128 --set batch.micro_size=64 \
    --set batch.repeated_augmentation=1 --set schedule.cosine.epochs=4 --set schedule.cosine.warmup_epochs=1 \
    --set eval.batch_size=64 --set runtime.log_every_steps=1 --set data.loader_threads=14 2>&1 | grep -v "^\s*$" | tail -n 20
  tail -n 2 "$out/nccl/metrics.jsonl"
else
  echo "== no coordinator binary next to $worker: NCCL check skipped"
fi

#!/usr/bin/env bash
# On the GPU machine with one GPU: the multi-device code paths on a single H200.
# - Expert-parallel generation with each MoE layer's experts split in two groups on GPU 0
#   (`--devices 0,0`) against transformers' greedy tokens, beside the ordinary placement.
# - Data-parallel training of the "block" shapes (bf16, 4 x 1024 tokens per step) with two
#   replicas on GPU 0 (burn-collective's all-reduce on CUDA) against one replica: same losses
#   within bf16 noise. Two replicas on one GPU measure the code path, not scaling.
# - The "block" decode rows at batch 1, 8 and 32 with the final MoE path.
# Usage: scripts/device_parallel.sh BIN_DIR OUT_DIR
set -uo pipefail
bin=$1; out=$2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
echo "NCCL: $(ldconfig -p | grep -o 'libnccl.so[.0-9]*' | head -1) $(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null)"
echo "== fixtures: cached greedy decoding on CUDA (f32), one placement, then experts in two groups"
bash scripts/device_generate_check.sh "$bin/jamba" /tmp/g1
EXTRA="--devices 0,0" bash scripts/device_generate_check.sh "$bin/jamba" /tmp/g2
echo "== data parallel, block shapes, bf16, batch 4 x 1024: one replica, then two on GPU 0"
for d in 1 0,0; do
  timeout 200 "$bin/train" --backend cuda-unfused --dtype bf16 --config benches/configs/block.json \
      --out /tmp/dp-$d --seq-len 1024 --batch 4 --steps 6 --warmup 1 --lr 3e-4 --no-save \
      --max-corpus-bytes 3000000 --devices $d 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -2 | cut -c1-300
  cp /tmp/dp-$d/metrics.csv "$out/dp-$d.csv" 2>/dev/null
  cat /tmp/dp-$d/metrics.csv
done
echo "== block decode rows, bf16 (final MoE path)"
"$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 --prompt 512 \
    --batches 1,8,32 --steps 16 --warmup 4
"$bin/bench" --config benches/configs/block.json --backend cuda-unfused --dtype bf16 --prompt 512 \
    --batches 1,8,32 --steps 16 --warmup 4 2>&1 | grep decode
echo "== block model spread as two expert groups on GPU 0 (expert-parallel path), decode, bf16"
"$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 --prompt 512 \
    --batches 1,8 --steps 16 --warmup 4 --devices 0,0

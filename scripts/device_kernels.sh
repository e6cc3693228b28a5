#!/usr/bin/env bash
# On the GPU machine: the Mamba kernels against the reference on CUDA (unfused and fused), the
# selective-scan timings at the shapes of benches/ANCHORS.md, the "block" model's prefill and
# decode rows with the peak GPU memory, and training steps of the "block" model at batch 8 x 2048.
# Usage: scripts/device_kernels.sh BIN_DIR OUT_DIR
set -uo pipefail
bin=$1; out=$2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
echo "== kernel checks, CUDA without fusion"
"$bin/bench" --backend cuda-unfused --check-kernels --no-model 2>&1 | tee "$out/check-cuda-unfused.txt" | grep -v " ok$"
echo "== kernel checks, CUDA with fusion"
"$bin/bench" --backend cuda --check-kernels --no-model 2>&1 | tee "$out/check-cuda.txt" | grep -v " ok$"
echo "== selective scan, bf16, mamba-ssm's layout"
"$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --scan 1x8192x4096,1x8192x16384,8x8192x2048,4x4096x8192
echo "== block model, bf16"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$out/mem-model.log" &
smi=$!
"$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 --prompt 512 \
    --batches 1,8,32 --steps 16 --warmup 4 --prefill 4096,16384,8x2048 --chunk 4096 2>&1 | tee "$out/model.txt"
kill $smi
echo "peak GPU memory (nvidia-smi, MiB): $(sort -n "$out/mem-model.log" | tail -1)"
echo "== block model, training steps, batch 8 x 2048, bf16"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$out/mem-train.log" &
smi=$!
timeout 300 "$bin/train" --backend cuda-unfused --dtype bf16 --config benches/configs/block.json --out /tmp/block \
    --seq-len 2048 --batch 8 --steps 6 --warmup 1 --no-save --max-corpus-bytes 3000000 2>&1 \
    | tr '\r' '\n' | grep -v '^\s*$' | tail -5 | cut -c1-300
kill $smi
cat /tmp/block/metrics.csv
echo "peak GPU memory in training (nvidia-smi, MiB): $(sort -n "$out/mem-train.log" | tail -1)"

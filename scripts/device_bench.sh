#!/usr/bin/env bash
# On the GPU machine: CUDA correctness of `jamba forward` (f32, bf16) against the fixtures, the same
# for transformers' bf16/f16 as a floor, then the bench rows of the "block" model (bf16).
# Usage: scripts/device_bench.sh BIN_DIR OUT_DIR
set -uo pipefail
bin=$1; out=$2
mkdir -p "$out/w"
bash scripts/device_forward_check.sh "$bin/jamba" "$out/w" 2>&1 | grep -v "^loaded\|^forward of"
python3 scripts/hf_reduced_precision.py cuda 2>&1 | grep -v Warning
rm -f "$out"/w/*.safetensors
"$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 --prompt 512 --batches 1,8,32 --steps 16 --warmup 4
nvidia-smi --query-gpu=memory.used,memory.total --format=csv

#!/usr/bin/env bash
# On the GPU machine: `jamba forward` on CUDA (f32 and bf16) for every fixture, compared with
# transformers' logits. Usage: scripts/device_forward_check.sh PATH/TO/jamba OUT_DIR
set -euo pipefail
bin=$1; out=$2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for case in tiny-a tiny-b v01-shape; do
    python3 - "$case" "$out" <<'PY'
import sys
from safetensors.numpy import load_file, save_file
case, out = sys.argv[1], sys.argv[2]
e = load_file(f"tests/fixtures/{case}/expected.safetensors")
t = {"input_ids": e["input_ids"]}
if (e["attention_mask"] == 0).any():
    t["attention_mask"] = e["attention_mask"]
save_file(t, f"{out}/{case}-input.safetensors")
PY
    for dtype in f32 bf16; do
        "$bin" forward --model tests/fixtures/$case --input $out/$case-input.safetensors \
            --output $out/$case-$dtype.safetensors --backend cuda --dtype $dtype
        echo -n "$case cuda $dtype: "
        python3 scripts/compare_logits.py tests/fixtures/$case/expected.safetensors $out/$case-$dtype.safetensors
    done
done

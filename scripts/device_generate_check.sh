#!/usr/bin/env bash
# On the GPU machine: cached greedy decoding with `jamba generate` on CUDA, fused and unfused (f32, through the
# decoding kernels) for every fixture, against transformers' 12 generated tokens and their logits.
# EXTRA adds arguments to `jamba generate` (e.g. EXTRA="--devices 0,0": experts split in two groups).
# Usage: scripts/device_generate_check.sh PATH/TO/jamba OUT_DIR
set -uo pipefail
bin=$1; out=$2
mkdir -p "$out"
for case in tiny-a tiny-b v01-shape; do
    python3 - "$case" "$out" <<'PY'
import sys
from safetensors.numpy import load_file, save_file
case, out = sys.argv[1], sys.argv[2]
e = load_file(f"tests/fixtures/{case}/expected.safetensors")
save_file({"input_ids": e["generate.prompt"]}, f"{out}/{case}-prompt.safetensors")
PY
    for backend in cuda cuda-unfused; do
        "$bin" generate --model tests/fixtures/$case --input $out/$case-prompt.safetensors \
            --output $out/$case-gen.safetensors --max-new-tokens 12 --temperature 0 --ignore-eos \
            --backend $backend --dtype f32 ${EXTRA:-} > /dev/null 2>&1 || { echo "$case $backend: generate failed"; continue; }
        python3 - "$case" "$out" "$backend" "${EXTRA:-}" <<'PY'
import sys
import numpy as np
from safetensors.numpy import load_file
case, out, backend, extra = sys.argv[1:5]
e = load_file(f"tests/fixtures/{case}/expected.safetensors")
g = load_file(f"{out}/{case}-gen.safetensors")
same = np.array_equal(g["tokens"], e["generate.tokens"])
ref = e["generate.scores"].astype(np.float32)
err = np.abs(g["scores"] - ref).max() / max(1.0, np.abs(ref).max())
print(f"{case} {backend} {extra} f32 greedy decode: tokens {'equal' if same else 'DIFFER'}, scores max rel error {err:.1e}")
PY
    done
done

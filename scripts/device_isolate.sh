#!/usr/bin/env bash
# On the GPU machine: `jamba forward` (CUDA, f32) on the fixtures with each kernel switched to
# its reference in turn (JAMBA_REFERENCE), to find which one changes the result.
# Usage: scripts/device_isolate.sh PATH/TO/jamba
set -uo pipefail
bin=$1; out=/tmp/iso; mkdir -p $out
for case in tiny-a tiny-b; do
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
done
run() {
  for case in tiny-a tiny-b; do
    rm -f $out/$case-out.safetensors
    env "$@" "$bin" forward --model tests/fixtures/$case --input $out/$case-input.safetensors \
        --output $out/$case-out.safetensors --backend cuda --dtype f32 > $out/err.txt 2>&1 \
      && echo "$* $case: $(python3 scripts/compare_logits.py tests/fixtures/$case/expected.safetensors $out/$case-out.safetensors)" \
      || echo "$* $case: FAILED $(grep -o 'ILLEGAL_ADDRESS' $out/err.txt | head -1)"
  done
}
run JAMBA_REFERENCE=
run JAMBA_REFERENCE=all
run JAMBA_REFERENCE=scan
run JAMBA_REFERENCE=conv
run JAMBA_REFERENCE=rms_norm
run JAMBA_REFERENCE=linear,moe,step
run JAMBA_DECODE_MAX_ROWS=0
run JAMBA_REFERENCE=all JAMBA_DECODE_MAX_ROWS=0

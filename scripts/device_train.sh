#!/usr/bin/env bash
# On the GPU machine: train the shipped model (bf16, f32 optimizer state) on the KJV corpus, check
# that transformers loads the result with our logits, and time training steps of the "block" model.
# Usage: scripts/device_train.sh BIN_DIR OUT_DIR
set -uo pipefail
bin=$1; out=$2
run=/tmp/run
"$bin/train" --backend cuda --dtype bf16 --out $run --seq-len 128 --batch 128 --steps 300 \
    --lr 3e-3 --min-lr 3e-4 --warmup 20 --eval-every 50 --save-every 100 --time-limit 420 2>&1 \
    | tr '\r' '\n' | grep -v '^\s*$' | awk 'NR % 20 == 1 || /loss [0-9]|final|trained|corpus|model:|error|time/' | tail -40
python3 scripts/hf_check_checkpoint.py $run/final "$bin/jamba" 2>&1 | grep -v "Loading weights\|falling back"
tar cf - -C $run final metrics.csv loss.png | split -b 15M - "$out/model.tar.part-"
"$bin/train" --backend cuda --dtype bf16 --config benches/configs/block.json --out /tmp/block --seq-len 2048 \
    --batch 8 --steps 3 --warmup 1 --no-save --max-corpus-bytes 3000000 --time-limit 200 2>&1 | grep -v '^\s*$' | tail -3
cat /tmp/block/metrics.csv

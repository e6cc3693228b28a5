#!/usr/bin/env bash
# On the GPU machine: train the shipped model (bf16 weights, f32 optimizer state) on the KJV corpus,
# check that transformers loads the result with our logits, and time training steps of the "block"
# model. Usage: scripts/device_train.sh BIN_DIR OUT_DIR [BACKEND] [TRAIN_SECONDS]
set -uo pipefail
bin=$1; out=$2; backend=${3:-cuda-unfused}; seconds=${4:-330}
run=/tmp/run
show() { tr '\r' '\n' | grep -v '^\s*$' | grep -v 'No backtrace\|^Backtrace' | head -${1:-20} | cut -c1-300; }
echo "== sanity: 3 steps, $backend bf16, batch 128 x 128"
"$bin/train" --backend $backend --dtype bf16 --out /tmp/sanity --seq-len 128 --batch 128 --steps 3 \
    --warmup 1 --no-save 2>&1 | show 8
cat /tmp/sanity/metrics.csv
dtype=bf16
grep -q NaN /tmp/sanity/metrics.csv && dtype=f32
echo "== training the shipped model in $dtype for up to $seconds s"
"$bin/train" --backend $backend --dtype $dtype --out $run --seq-len 128 --batch 128 --steps 250 \
    --lr 3e-3 --min-lr 3e-4 --warmup 15 --eval-every 50 --save-every 1000 --time-limit $seconds 2>&1 | show 30
awk -F, 'NR == 1 || NR % 10 == 2 || $8 != ""' $run/metrics.csv | tail -40
echo "== transformers loads the checkpoint"
python3 scripts/hf_check_checkpoint.py $run/final "$bin/jamba" 2>&1 | grep -v "Loading weights\|falling back" | tail -3
# The model (without the optimizer state) comes back in pieces of at most 15 MB.
tar cf - -C $run final/config.json final/model.safetensors final/tokenizer.json final/trainer_state.json \
    final/validation_loss.txt metrics.csv loss.png | split -b 15M - "$out/model.tar.part-"
[ "${SKIP_BLOCK:-0}" = 1 ] && exit 0
echo "== block model: training steps, batch 8 x 2048"
timeout 240 "$bin/train" --backend $backend --dtype bf16 --config benches/configs/block.json --out /tmp/block \
    --seq-len 2048 --batch 8 --steps 3 --warmup 1 --no-save --max-corpus-bytes 3000000 2>&1 | show 5
cat /tmp/block/metrics.csv

#!/usr/bin/env bash
# On the GPU machine: the Mamba kernels against the reference on CUDA (unfused and fused), the
# selective-scan timings at the shapes of benches/ANCHORS.md, the "block" model's prefill and
# decode rows with the peak GPU memory, training steps of the "block" model at batch 8 x 2048,
# and (with PROFILE=1) the GPU time per kernel of decode steps and of a prefill under ncu.
# MATMUL=1 times cubek's matmul routines and runs the prefill again with the fastest.
# SCAN_KERNELS times the other scan kernels (JAMBA_SCAN_FWD, JAMBA_SCAN_BWD), SCAN_BLOCKS other cube
# sizes of the chunked ones, SCAN_PROFILE=1 profiles those under ncu.
# DECODE_PROFILE=1 gives the GPU time and launches per decode step under ncu (scripts/ncu_per_step.py),
# PREFILL_PROFILE=1 those of a 16384-token prefill and a profile of the flash attention kernel.
# LAUNCH=1 (default) times what a launch costs the host (bench --launch-overhead).
# TMA=1 times cubek's TMA matmul routines (TMA_ROUTINES) on the block model's products (or
# TMA_SHAPES), one process per routine and shape (a failed TMA launch poisons the process's stream).
# CUBLAS=1 compares the cuBLAS routine with cubek's TMA routine (products, checks, prefill);
# CUBLAS_CHECKS=1 runs only its checks (everything through cuBLAS) and the attention's timings.
# PREFILL_UNFUSED=1 gives the block model's prefill rows without fusion too.
# PERSIST=1 compares decoding and memory with the small weights made under the persistent
# allocation mode (the default), none (bench --persistent-max-bytes 0) and all.
# COMPOSITE=1 times decoding with one composite operation per layer against operation by
# operation (bench --separate-decode-ops), COMPOSITE_REPS processes per backend.
# STAGING=1 compares decoding with and without the pinned staging ring of vendor/cubecl-cuda
# (CUBECL_CUDA_STAGING_RING=0), STAGING_REPS rounds; RING_STRESS=1 runs the checks with a ring of
# 1 KiB, which changes halves every few launches.
# HOST_PROFILE=1 samples the host during decoding steps at batch 1 (bench --host-profile; needs a
# build with --features host-profile and an unstripped bench).
# SCAN=0, SCAN_KERNELS=0, SCAN_BLOCKS=0, ATTENTION=0, TRAIN=0, MOE=0, MATMUL=0, UNFUSED_DECODE=0, LAUNCH=0,
# CHUNKED=0, CHECKS=0 (the fixtures and kernel checks), MODEL=0 (the block model's rows) skip those parts. Usage: scripts/device_kernels.sh BIN_DIR OUT_DIR
set -uo pipefail
bin=$1; out=$2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
# cuBLAS is loaded at run time (libcublas.so.N): where the loader does not know it, the CUDA
# toolkit's directory or PyTorch's wheel is searched for it.
if ! ldconfig -p | grep -q "libcublas\.so"; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
      $(python3 -c "import nvidia.cublas, os; print(os.path.join(nvidia.cublas.__path__[0], 'lib'))" 2>/dev/null); do
    if ls "$d"/libcublas.so* > /dev/null 2>&1; then export LD_LIBRARY_PATH=$d:${LD_LIBRARY_PATH:-}; break; fi
  done
fi
echo "cuBLAS: $(ldconfig -p | grep -o 'libcublas\.so[.0-9]*' | sort -u | tr '\n' ' ') LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
if [ "${CUBLAS:-0}" = 1 ]; then
echo "== matmul, bf16, the block model's products: cuBLAS (the default routine) against cubek's TMA routine, checked against Burn's matmul"
timeout 200 "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --matmul \
    16384x2048x8192,16384x4096x2048,16384x2048x7168,16384x7168x2048,2048x2048x14336,2048x7168x2048,16384x4096x160,16384x128x4096,16384x2048x2048,4099x2048x2048,600x2048x2048 \
    --matmul-routines cublas,specialized_tma_mma 2>&1 | grep -E "^\||best|panicked|rror"
fi
if [ "${CUBLAS:-0}" = 1 ] || [ "${CUBLAS_CHECKS:-0}" = 1 ]; then
echo "== kernel checks with every routine product and every attention through cuBLAS (JAMBA_CUBLAS_MIN_ROWS=1 JAMBA_CUBLAS_ATTENTION_MIN_QUERIES=1), unfused then fused"
for be in cuda-unfused cuda; do
  JAMBA_CUBLAS_MIN_ROWS=1 JAMBA_CUBLAS_ATTENTION_MIN_QUERIES=1 JAMBA_FLASH_MIN_SCORES=0 "$bin/bench" --backend $be --check-kernels --no-model 2>&1 | tee /tmp/check-cublas-$be.txt | grep -v " ok$"
  grep "attention" /tmp/check-cublas-$be.txt | tail -4
done
if [ -x "$bin/jamba" ]; then
  echo "== the fixtures in bf16 with every routine product and attention through cuBLAS"
  mkdir -p /tmp/w3
  JAMBA_CUBLAS_MIN_ROWS=1 JAMBA_CUBLAS_ATTENTION_MIN_QUERIES=1 bash scripts/device_forward_check.sh "$bin/jamba" /tmp/w3 2>&1 | grep -v "^loaded\|^forward of"
fi
echo "== causal attention alone, bf16, 16 heads of 128 over 4 KV heads: through cuBLAS (JAMBA_CUBLAS_ATTENTION_MIN_QUERIES=1), then the flash kernel (JAMBA_REFERENCE=attention_cublas)"
JAMBA_CUBLAS_ATTENTION_MIN_QUERIES=1 "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --attention 1024,4096,16384 2>&1 | grep -i "attention"
fi
if [ "${CUBLAS:-0}" = 1 ]; then
JAMBA_REFERENCE=attention_cublas "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --attention 1024,4096,16384 2>&1 | grep -i "attention"
echo "== MoE experts of one block layer alone: per-expert products through cuBLAS, then through cubek's TMA routine"
"$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --moe 4096,16384 2>&1 | grep "^|"
JAMBA_MATMUL=specialized_tma_mma "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --moe 4096,16384 2>&1 | grep "^|"
echo "== block model, bf16, prefill with the flash attention kernel instead (JAMBA_REFERENCE=attention_cublas)"
JAMBA_REFERENCE=attention_cublas "$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 \
    --batches 0 --prefill 4096,16384,8x2048 --chunk 16384
echo "== block model, bf16, prefill with cubek's TMA routine instead (JAMBA_MATMUL=specialized_tma_mma)"
JAMBA_MATMUL=specialized_tma_mma "$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 \
    --batches 0 --prefill 4096,16384,8x2048 --chunk 16384
echo "== block model, bf16, decode at batch 32 with its products through cuBLAS too (JAMBA_CUBLAS_MIN_ROWS=1)"
JAMBA_CUBLAS_MIN_ROWS=1 "$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 --prompt 512 \
    --batches 32 --steps 16 --warmup 4 2>&1 | grep decode
fi
if [ "${CHECKS:-1}" = 1 ]; then
if [ -x "$bin/jamba" ]; then
  echo "== the fixtures on CUDA: jamba forward (f32, bf16) and greedy decoding (f32)"
  mkdir -p /tmp/w
  bash scripts/device_forward_check.sh "$bin/jamba" /tmp/w 2>&1 | grep -v "^loaded\|^forward of"
  bash scripts/device_generate_check.sh "$bin/jamba" /tmp/g
fi
echo "== kernel checks, CUDA without fusion"
JAMBA_FLASH_MIN_SCORES=0 "$bin/bench" --backend cuda-unfused --check-kernels --no-model 2>&1 | tee /tmp/check-cuda-unfused.txt | grep -v " ok$"
echo "== kernel checks, CUDA with fusion"
JAMBA_FLASH_MIN_SCORES=0 "$bin/bench" --backend cuda --check-kernels --no-model 2>&1 | tee /tmp/check-cuda.txt | grep -v " ok$"
fi
if [ "${RING_STRESS:-0}" = 1 ]; then
echo "== with a staging ring of 1 KiB (CUBECL_CUDA_STAGING_RING_BYTES=1024: it changes halves every few launches): kernel checks, the fixtures' greedy decoding, a decode row"
for be in cuda-unfused cuda; do
  CUBECL_CUDA_STAGING_RING_BYTES=1024 JAMBA_FLASH_MIN_SCORES=0 "$bin/bench" --backend $be --check-kernels --no-model 2>&1 | grep -v " ok$"
done
[ -x "$bin/jamba" ] && CUBECL_CUDA_STAGING_RING_BYTES=1024 bash scripts/device_generate_check.sh "$bin/jamba" /tmp/g-ring
CUBECL_CUDA_STAGING_RING_BYTES=1024 "$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 --prompt 512 \
    --batches 1,8 --steps 16 --warmup 4 2>&1 | grep -E "^\| decode|panicked|rror"
fi
if [ "${SCAN:-1}" = 1 ]; then
echo "== selective scan, bf16, mamba-ssm's layout"
"$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --scan 1x8192x4096,1x8192x16384,8x8192x2048,4x4096x8192,1x2048x4096,1x1024x16384
fi
shapes=1x8192x4096,1x8192x16384,8x8192x2048,4x4096x8192,1x2048x4096,1x1024x16384
if [ "${SCAN_KERNELS:-1}" = 1 ]; then
echo "== the other forward kernels of the selective scan (JAMBA_SCAN_FWD) and the other backward (JAMBA_SCAN_BWD); bf16, same layout: checks, then timings"
for k in chunked one_pass split; do
  echo "-- JAMBA_SCAN_FWD=$k"
  JAMBA_SCAN_FWD=$k "$bin/bench" --backend cuda-unfused --check-kernels --no-model 2>&1 | grep -v " ok$" | grep -iv "attention"
  JAMBA_SCAN_FWD=$k "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --scan $shapes
done
echo "-- JAMBA_REFERENCE=scan_direct (the chunked kernels stage every activation through shared memory)"
JAMBA_REFERENCE=scan_direct "$bin/bench" --backend cuda-unfused --check-kernels --no-model 2>&1 | grep -v " ok$" | grep -iv "attention"
JAMBA_REFERENCE=scan_direct "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --scan $shapes
echo "-- JAMBA_SCAN_BWD=one_pass"
JAMBA_SCAN_BWD=one_pass "$bin/bench" --backend cuda-unfused --check-kernels --no-model 2>&1 | grep -v " ok$" | grep -iv "attention"
JAMBA_SCAN_BWD=one_pass "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --scan $shapes
fi
if [ "${SCAN_BLOCKS:-1}" = 1 ]; then
echo "== the chunked scan kernels with other cube sizes (channels per cube: JAMBA_SCAN_CHUNK_BLOCK forward, JAMBA_SCAN_BWD_BLOCK backward; by default 32 and 16 on CUDA)"
for blk in "16 8" "32 32"; do
  set -- $blk
  echo "-- JAMBA_SCAN_CHUNK_BLOCK=$1 JAMBA_SCAN_BWD_BLOCK=$2"
  JAMBA_SCAN_CHUNK_BLOCK=$1 JAMBA_SCAN_BWD_BLOCK=$2 "$bin/bench" --backend cuda-unfused --check-kernels --no-model 2>&1 | grep "scan" | grep -v " ok$"
  JAMBA_SCAN_CHUNK_BLOCK=$1 JAMBA_SCAN_BWD_BLOCK=$2 "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --scan $shapes
done
fi
if [ "${SCAN_PROFILE:-0}" = 1 ]; then
echo "== ncu: the chunked scan kernels at 1 x 8192 x 4096 (bf16)"
# The full set of sections and the SASS with its per-instruction counts and stall samples
# (ncu-KERNEL-sass.csv), from which scripts/sass_summary.py sums them by opcode and by region.
for k in scan_fwd_chunk scan_bwd_chunk; do
  timeout 200 ncu --clock-control none -k regex:$k --launch-count 1 --set full --import-source yes \
      -o "/tmp/ncu-$k" "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --scan 1x8192x4096 > /dev/null 2>&1
  ncu -i "/tmp/ncu-$k.ncu-rep" --print-details all > "$out/ncu-$k.txt" 2>&1
  ncu -i "/tmp/ncu-$k.ncu-rep" --page source --print-source sass --csv > "$out/ncu-$k-sass.csv" 2>&1
  grep -E "Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Executed Ipc Active|Local Memory Spilling Requests " "$out/ncu-$k.txt" | sort -u
  python3 scripts/sass_summary.py "$out/ncu-$k-sass.csv" 10
done
fi
best=
if [ "${MATMUL:-1}" = 1 ]; then
echo "== matmul routines (all but TMA), bf16: the block model's products at 16384 tokens (in_proj, out_proj, dense MLP, experts at 2048 rows, x_proj (Burn's matmul: 160 is not a multiple of 64), dt_proj, q), and an odd row count"
timeout 240 "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --matmul \
    16384x2048x8192,16384x4096x2048,16384x2048x7168,16384x7168x2048,2048x2048x14336,2048x7168x2048,16384x4096x160,16384x128x4096,16384x2048x2048,4099x2048x2048 \
    2>&1 | tee /tmp/matmul.txt
best=$(grep -o 'best matmul routine: [a-z0-9_]*' /tmp/matmul.txt | cut -d' ' -f4)
[ "$best" = none ] && best=
# The default routine is measured by the sections below; the fastest only where it differs.
[ "$best" = double_cyclic_mma ] && best=
if [ -n "$best" ] && [ -x "$bin/jamba" ]; then
  echo "== the fixtures in bf16 with it (JAMBA_MATMUL=$best)"
  mkdir -p /tmp/w2
  JAMBA_MATMUL=$best bash scripts/device_forward_check.sh "$bin/jamba" /tmp/w2 2>&1 | grep bf16
fi
fi
if [ "${TMA:-0}" = 1 ]; then
echo "== TMA matmul routines, bf16, the block model's products, one process per routine and shape"
for r in ${TMA_ROUTINES:-specialized_tma_mma double_tma_mma}; do
  for s in ${TMA_SHAPES:-16384x2048x8192 16384x4096x2048 16384x2048x7168 16384x7168x2048 2048x2048x14336 2048x7168x2048 16384x128x4096 16384x2048x2048 4099x2048x2048 1000x2048x14336}; do
    timeout 60 "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --matmul $s --matmul-routines $r 2>&1 \
        | grep -E "^\| matmul|panicked|rror" | head -4
  done
done
fi
if [ "${HOST_PROFILE:-0}" = 1 ]; then
echo "== where the host's time goes in decoding steps (block model, bf16, batch 1): unfused, then fused"
for be in cuda-unfused cuda; do
  echo "-- $be"
  "$bin/bench" --config benches/configs/block.json --backend $be --dtype bf16 --prompt 512 \
      --batches 1 --steps 16 --warmup 4 --host-profile 600 > "$out/host-profile-$be.txt" 2>&1
  grep -E "decode|host profile|^   \`|^== thread" "$out/host-profile-$be.txt"
done
fi
if [ "${ATTENTION:-1}" = 1 ]; then
if [ -f /tmp/check-cuda-unfused.txt ]; then
  echo "== causal attention checks of the default kernels, from the kernel checks above (CUDA without fusion)"
  grep "attention" /tmp/check-cuda-unfused.txt
fi
echo "== causal attention alone, bf16, 16 heads of 128 over 4 KV heads: the flash kernel that runs by default (tensor cores) against the reference"
"$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --attention 1024,4096,16384
echo "== same, two passes over the keys instead of one (JAMBA_REFERENCE=attention_one_pass): checks, then timings"
JAMBA_REFERENCE=attention_one_pass "$bin/bench" --backend cuda-unfused --check-kernels --no-model 2>&1 | grep "attention" \
    | awk '/ ok$/ { ok++; next } { print } END { print ok + 0 " attention checks ok" }'
JAMBA_REFERENCE=attention_one_pass "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --attention 1024,4096,16384
echo "== same, the tensor-core kernel from staged tiles (JAMBA_REFERENCE=attention_direct): checks, then timings"
JAMBA_REFERENCE=attention_direct "$bin/bench" --backend cuda-unfused --check-kernels --no-model 2>&1 | grep "attention" \
    | awk '/ ok$/ { ok++; next } { print } END { print ok + 0 " attention checks ok" }'
JAMBA_REFERENCE=attention_direct "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --attention 1024,4096,16384
echo "== same, the portable flash kernel (JAMBA_REFERENCE=attention_mma, forced at every size: JAMBA_FLASH_MIN_SCORES=0)"
JAMBA_REFERENCE=attention_mma JAMBA_FLASH_MIN_SCORES=0 timeout 120 "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --attention 1024,4096 2>&1 | tail -2
fi
if [ "${MOE:-1}" = 1 ]; then
echo "== MoE experts of one block layer alone, bf16: as released (per-expert matmuls from 2048 pairs)"
"$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --moe 512,4096,16384,32768
echo "== same, the grouped kernels at every size: tensor cores, then the portable ones (JAMBA_REFERENCE=moe_mma)"
JAMBA_MOE_PER_EXPERT_PAIRS=100000000 "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --moe 512,4096,16384
JAMBA_MOE_PER_EXPERT_PAIRS=100000000 JAMBA_REFERENCE=moe_mma "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --moe 512,4096
echo "== same, the per-expert matmuls at every size"
JAMBA_MOE_PER_EXPERT_PAIRS=0 "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --moe 512
fi
if [ "${LAUNCH:-1}" = 1 ]; then
echo "== launch overhead: 1000 tiny operations in a row, the host's time to issue each and the time until the device has run it"
for be in cuda-unfused cuda; do
  echo "-- $be"
  "$bin/bench" --backend $be --no-model --launch-overhead 2>&1 | grep "launch overhead"
done
fi
if [ "${MODEL:-1}" = 1 ]; then
echo "== block model, bf16"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > /tmp/mem-model.log &
smi=$!
"$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 --prompt 512 \
    --batches 1,8,32 --steps 16 --warmup 4 --prefill 4096,16384,8x2048 --chunk 16384
kill $smi
echo "peak GPU memory (nvidia-smi, MiB): $(sort -n /tmp/mem-model.log | tail -1)"
fi
if [ "${PREFILL_UNFUSED:-0}" = 1 ]; then
echo "== block model, bf16, prefill without fusion (--backend cuda-unfused)"
"$bin/bench" --config benches/configs/block.json --backend cuda-unfused --dtype bf16 \
    --batches 0 --prefill 4096,16384,8x2048 --chunk 16384
fi
if [ "${CHUNKED:-1}" = 1 ]; then
echo "== block model, bf16, prefill in chunks of 4096 (each chunk's queries over the cached keys)"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > /tmp/mem-chunk.log &
smi=$!
"$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 \
    --batches 0 --prefill 4096,16384,8x2048 --chunk 4096
kill $smi
echo "peak GPU memory (nvidia-smi, MiB): $(sort -n /tmp/mem-chunk.log | tail -1)"
fi
if [ "${MATMUL:-1}" = 1 ]; then
echo "== block model, bf16, prefill with Burn's matmul instead of the default routine (JAMBA_MATMUL=burn)"
JAMBA_MATMUL=burn "$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 \
    --batches 0 --prefill 4096,16384,8x2048 --chunk 16384
fi
if [ "${MOE:-1}" = 1 ]; then
echo "== MoE experts of one block layer alone (per-expert matmuls through the default routine)"
"$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --moe 4096,16384
fi
if [ -n "$best" ]; then
echo "== block model, bf16, prefill with the fastest matmul routine (JAMBA_MATMUL=$best)"
JAMBA_MATMUL=$best "$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 \
    --batches 1 --steps 16 --warmup 4 --prompt 512 --prefill 4096,16384,8x2048 --chunk 16384
echo "== MoE experts of one block layer alone with it (JAMBA_MATMUL=$best)"
JAMBA_MATMUL=$best "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --moe 4096,16384
fi
if [ "${PERSIST:-0}" = 1 ]; then
echo "== block model, bf16, decode at batch 1 and 8 with the weights of at most 8 MiB made under the persistent allocation mode (the default), with none (--persistent-max-bytes 0) and with all, alternating"
for be in cuda-unfused cuda; do
  for rep in $(seq ${PERSIST_REPS:-3}); do
    for max in default 0 all; do
      flag=; [ $max = 0 ] && flag="--persistent-max-bytes 0"; [ $max = all ] && flag="--persistent-max-bytes 18446744073709551615"
      echo "-- $be $max $rep: $("$bin/bench" --config benches/configs/block.json --backend $be --dtype bf16 --prompt 512 \
          --batches 1,8 --steps 16 --warmup 4 $flag 2>&1 | grep -E "^\| decode|panicked|rror" | cut -d'|' -f2,3,4 | tr '\n' ' ')"
    done
  done
done
for max in ${PERSIST_ROWS-0 18446744073709551615}; do
echo "== block model, bf16, the rows of MODEL=1 with --persistent-max-bytes $max: memory to compare with the default's"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > /tmp/mem-pooled.log &
smi=$!
"$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 --persistent-max-bytes $max --prompt 512 \
    --batches 1,8,32 --steps 16 --warmup 4 --prefill 4096,16384,8x2048 --chunk 16384
kill $smi
echo "peak GPU memory (nvidia-smi, MiB): $(sort -n /tmp/mem-pooled.log | tail -1)"
done
fi
if [ "${COMPOSITE:-0}" = 1 ]; then
echo "== block model, bf16, decode with one composite operation per layer and operation by operation (bench --separate-decode-ops: the two alternate step by step)"
for rep in $(seq ${COMPOSITE_REPS:-3}); do
  for be in cuda cuda-unfused; do
    echo "-- $be $rep"
    "$bin/bench" --config benches/configs/block.json --backend $be --dtype bf16 --prompt 512 \
        --batches 1,8,32 --steps 16 --warmup 4 --separate-decode-ops 2>&1 | grep -E "^\| decode|panicked|rror" | cut -d'|' -f2,3,4
  done
done
fi
if [ "${STAGING:-0}" = 1 ]; then
echo "== block model, bf16, decode with the launches' metadata staged in the pinned ring (vendor/cubecl-cuda, the default) and through the pinned pool (CUBECL_CUDA_STAGING_RING=0), alternating processes"
for rep in $(seq ${STAGING_REPS:-2}); do
  for be in cuda cuda-unfused; do
    for ring in 1 0; do
      echo "-- $be ring=$ring $rep: $(CUBECL_CUDA_STAGING_RING=$ring "$bin/bench" --config benches/configs/block.json --backend $be --dtype bf16 --prompt 512 \
          --batches 1,8,32 --steps 16 --warmup 4 2>&1 | grep -E "^\| decode|panicked|rror" | cut -d'|' -f2,3 | tr '\n' ' ')"
    done
  done
done
fi
if [ "${UNFUSED_DECODE:-1}" = 1 ]; then
echo "== block model, decode without fusion"
"$bin/bench" --config benches/configs/block.json --backend cuda-unfused --dtype bf16 --prompt 512 \
    --batches 1,8,32 --steps 16 --warmup 4 2>&1 | grep decode
fi
[ "${TRAIN:-1}" = 1 ] && {
echo "== block model, training steps, batch 8 x 2048, bf16"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > /tmp/mem-train.log &
smi=$!
timeout 200 "$bin/train" --backend cuda-unfused --dtype bf16 --config benches/configs/block.json --out /tmp/block \
    --seq-len 2048 --batch 8 --steps 6 --warmup 1 --lr 3e-4 --no-save --max-corpus-bytes 3000000 2>&1 \
    | tr '\r' '\n' | grep -v '^\s*$' | tail -3 | cut -c1-300
kill $smi
cat /tmp/block/metrics.csv
echo "peak GPU memory in training (nvidia-smi, MiB): $(sort -n /tmp/mem-train.log | tail -1)"
}
if [ "${DECODE_PROFILE:-0}" = 1 ]; then
echo "== ncu: GPU time and launches per decode step (block model, bf16, batch 1, prompt 64, 8 steps), fused and unfused"
for be in cuda cuda-unfused; do
  for steps in 8 0; do
    timeout 150 ncu --clock-control none --print-summary per-kernel --metrics gpu__time_duration.sum \
        "$bin/bench" --config benches/configs/block.json --backend $be --dtype bf16 --prompt 64 \
        --batches 1 --steps $steps --warmup 0 > "$out/ncu-$be-decode$steps.txt" 2>&1
  done
  echo "-- $be"
  python3 scripts/ncu_per_step.py "$out/ncu-$be-decode8.txt" "$out/ncu-$be-decode0.txt" 8 | head -25
done
fi
if [ "${PREFILL_PROFILE:-0}" = 1 ]; then
# PREFILL_PROFILE_BACKENDS (default cuda-unfused) names the backends profiled; with fusion the
# fused element-wise kernels appear under Burn's names.
for be in ${PREFILL_PROFILE_BACKENDS:-cuda-unfused}; do
echo "== ncu: GPU time per kernel of one prefill of 16384 tokens in one chunk (block model, bf16, --backend $be)"
for n in 16384 0; do
  args="--prefill 16384 --chunk 16384 --reps 1"
  [ $n = 0 ] && args=""
  timeout 200 ncu --clock-control none --print-summary per-kernel --metrics gpu__time_duration.sum \
      "$bin/bench" --config benches/configs/block.json --backend $be --dtype bf16 --batches 0 \
      $args > "$out/ncu-$be-prefill$n.txt" 2>&1
done
# Two prefills ran (one untimed, one timed); the model's set-up is subtracted.
python3 scripts/ncu_per_step.py "$out/ncu-$be-prefill16384.txt" "$out/ncu-$be-prefill0.txt" 2 | head -30
done
echo "== ncu: the causal softmax of the attention through cuBLAS at 16384 tokens (16 heads of 128 over 4 KV heads, bf16; the last block of queries)"
timeout 120 ncu --clock-control none -k regex:causal_softmax --launch-skip 15 --launch-count 1 --section SpeedOfLight --section LaunchStats \
    --section Occupancy --section WarpStateStats "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model \
    --attention 16384 > "$out/ncu-attention.txt" 2>&1
grep -E "Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Block Limit Registers|Block Limit Shared|Compute \(SM\) Throughput|Memory Throughput" "$out/ncu-attention.txt"
fi
[ "${PROFILE:-0}" = 1 ] || exit 0
echo "== ncu: kernel time, model set-up + prompt of 64 with and without 8 decode steps (batch 1)"
prof() { timeout 100 ncu --clock-control none --print-summary per-kernel --metrics gpu__time_duration.sum "$@"; }
prof "$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 --prompt 64 \
    --batches 1 --steps 8 --warmup 0 > "$out/ncu-decode8.txt" 2>&1
prof "$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 --prompt 64 \
    --batches 1 --steps 0 --warmup 0 > "$out/ncu-decode0.txt" 2>&1
prof "$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 --batches 0 \
    --prefill 4096 --chunk 4096 --reps 1 > "$out/ncu-prefill.txt" 2>&1
prof "$bin/bench" --config benches/configs/block.json --backend cuda --dtype bf16 --batches 0 \
    --prefill 16384 --chunk 16384 --reps 1 > "$out/ncu-prefill16k.txt" 2>&1
echo "== ncu: the scan kernels at 1 x 8192 x 4096 (bf16)"
for k in scan_fwd scan_bwd; do
  timeout 100 ncu --clock-control none -k regex:$k --launch-count 1 --section SpeedOfLight \
      --section LaunchStats --section Occupancy --section WarpStateStats --section SourceCounters \
      "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model --scan 1x8192x4096 > "$out/ncu-$k.txt" 2>&1
done
CUBECL_DEBUG_LOG=/tmp/cubecl.log timeout 60 "$bin/bench" --backend cuda-unfused --dtype bf16 --no-model \
    --scan 1x8192x64 > /dev/null 2>&1
head -c 15000000 /tmp/cubecl.log > "$out/cubecl.log"
ls -la "$out"

#!/usr/bin/env bash
# Reproduces the CPU rows of BENCHMARKS.md: ViT-B/16 at 224 px, batch 8, on this machine.
# Usage: experiments/benchmarks_cpu.sh [OUT_DIR]   (about 25 minutes on a 2-core CPU)
set -euo pipefail
out=${1:-/tmp/vit_jax_benchmarks}
mkdir -p "$out"
py=${PYTHON:-python}
bench() { "$py" -m vit_jax.benchmark --model=ViT-B/16 --batch=8 --resolution=224 --steps=5 --warmup=1 "$@"; }

# The defaults: the train step of the ViT recipes (blocks stacked, scan_layers=True;
# remat_policy='auto'; heads-major attention on CPU). Alone, as vit_jax.main runs it
# (keep_host_memory on), then next to timm in the same process (keep_host_memory off: the
# malloc setting is process-wide and slows PyTorch).
bench --mode=train --dtype=float32 --json="$out/train_fp32_alone.json"
bench --mode=train --dtype=bfloat16 --json="$out/train_bf16_alone.json"
bench --mode=train --dtype=float32 --compare=timm --json="$out/train_fp32.json"
bench --mode=train --dtype=bfloat16 --compare=timm_eager --json="$out/train_bf16.json"
# Host memory: without keep_host_memory, and with glibc's transparent huge pages instead.
bench --mode=train --keep_host_memory=false --json="$out/train_fp32_no_keep.json"
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 bench --mode=train --keep_host_memory=false \
    --json="$out/train_fp32_hugetlb.json"
bench --mode=infer --dtype=float32 --compare=timm --json="$out/infer_fp32.json"
bench --mode=infer --dtype=bfloat16 --compare=timm_eager --json="$out/infer_bf16.json"
# Each fast path switched off (or on) alone, float32 train step.
bench --mode=train --set=scan_layers=False --json="$out/train_layer_loop_scan.json"
bench --mode=train --set=scan_layers=False --set="layer_loop='unroll'" \
    --json="$out/train_unrolled.json"
bench --mode=train --set=scan_layers=False --set="layer_loop='unroll'" --set=remat_policy=None \
    --set="attention_impl='xla'" --json="$out/train_unrolled_no_remat_xla_attention.json"
bench --mode=train --set=remat_policy=None --json="$out/train_no_remat.json"
bench --mode=train --set="attention_impl='xla'" --json="$out/train_xla_attention.json"
bench --mode=train --set="remat_policy='full'" --json="$out/train_remat_full.json"
# ViT-H/14 compile time with scan over layers, against ViT-B/16's (batch 1, 2 timed steps).
"$py" -m vit_jax.benchmark --model=ViT-H/14 --mode=train --batch=1 --steps=2 --warmup=1 \
    --json="$out/compile_h14_scan.json"
"$py" -m vit_jax.benchmark --model=ViT-B/16 --mode=train --batch=1 --steps=2 --warmup=1 \
    --json="$out/compile_b16_scan.json"
# Persistent compilation cache: the second run compiles from the cache.
rm -rf "$out/xla_cache"
for run in cold warm; do
  bench --mode=train --steps=2 --set=scan_layers=False --set="layer_loop='unroll'" \
      --compilation_cache_dir="$out/xla_cache" --json="$out/cache_$run.json"
done

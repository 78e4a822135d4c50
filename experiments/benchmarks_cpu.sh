#!/usr/bin/env bash
# Reproduces the CPU rows of BENCHMARKS.md: ViT-B/16 at 224 px, batch 8, on this machine.
# Usage: experiments/benchmarks_cpu.sh [OUT_DIR]   (about 30 minutes on a 2-core CPU)
set -euo pipefail
out=${1:-/tmp/vit_jax_benchmarks}
mkdir -p "$out"
py=${PYTHON:-python}
bench() { "$py" -m vit_jax.benchmark --model=ViT-B/16 --batch=8 --resolution=224 --steps=5 --warmup=1 "$@"; }

bench --mode=train --dtype=float32 --compare=timm --json="$out/train_fp32.json"
bench --mode=train --dtype=bfloat16 --compare=timm_eager --json="$out/train_bf16.json"
bench --mode=infer --dtype=float32 --compare=timm --json="$out/infer_fp32.json"
bench --mode=infer --dtype=bfloat16 --compare=timm_eager --json="$out/infer_bf16.json"
# Rematerialisation and scan over layers (compile time, step time).
bench --mode=train --set=remat_policy=full --json="$out/train_remat_full.json"
bench --mode=train --set=scan_layers=True --json="$out/train_scan.json"
# ViT-H/14 compile time with scan over layers, against ViT-B/16's (batch 1, 2 timed steps).
"$py" -m vit_jax.benchmark --model=ViT-H/14 --mode=train --batch=1 --steps=2 --warmup=1 \
    --set=scan_layers=True --json="$out/compile_h14_scan.json"
"$py" -m vit_jax.benchmark --model=ViT-B/16 --mode=train --batch=1 --steps=2 --warmup=1 \
    --set=scan_layers=True --json="$out/compile_b16_scan.json"
# Persistent compilation cache: the second run compiles from the cache.
rm -rf "$out/xla_cache"
for run in cold warm; do
  bench --mode=train --steps=2 --compilation_cache_dir="$out/xla_cache" \
      --json="$out/cache_$run.json"
done

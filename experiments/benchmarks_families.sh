#!/usr/bin/env bash
# Throughput of every architecture family next to ViT-B/16 at the same resolution (224 px,
# batch 8, float32), train step and inference, each with timm eager in the same process.
# Usage: experiments/benchmarks_families.sh [OUT_DIR]   (about 25 minutes on a 2-core CPU)
set -euo pipefail
out=${1:-/tmp/vit_jax_benchmarks_families}
mkdir -p "$out"
# shellcheck source=experiments/python.sh
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"  # sets py
for model in ViT-B/16 Swin-T ResNet-50 "ResNeXt-50 32x4d" "Res2Net-50 26w4s" BiT-R50x1; do
  tag=$(echo "$model" | tr -c 'A-Za-z0-9\n' '_')
  for mode in infer train; do
    "$py" -m vit_jax.benchmark --model="$model" --mode=$mode --batch=8 --resolution=224 \
        --steps=5 --warmup=1 --compare=timm_eager --json="$out/${mode}_${tag}.json"
  done
done
"$py" - "$out" <<'PY'
import json, pathlib, sys
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob('*.json')):
  r = json.loads(f.read_text())
  b = r['baselines'][0] if r['baselines'] else None
  rows.append((r['mode'], r['model'], r['images_per_sec'], r['mfu'],
               r['forward_flops_per_image_xla'] / 1e9, r['compile_s'],
               b['images_per_sec'] if b else float('nan')))
print('| mode | model | GFLOPs/img | vit_jax img/s | MFU | timm eager img/s | ratio | compile s |')
print('|---|---|---:|---:|---:|---:|---:|---:|')
for mode, model, ips, mfu, gf, comp, timm_ips in sorted(rows):
  print(f'| {mode} | {model} | {gf:.2f} | {ips:.2f} | {mfu:.2f} | {timm_ips:.2f} | '
        f'{ips / timm_ips:.2f}x | {comp:.1f} |')
PY

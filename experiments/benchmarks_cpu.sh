#!/usr/bin/env bash
# Reproduces the CPU rows of BENCHMARKS.md: ViT-B/16 at 224 px, batch 8, on this machine.
# Usage: experiments/benchmarks_cpu.sh [OUT_DIR]   (about 50 minutes on a 2-core CPU)
# MFU is per step against the float32/bf16 matmul peak probed next to that step (median
# over the steps), and --compare runs the frameworks' steps in turn: this VM's speed
# drifts 10-20% within seconds (vit_jax/benchmark/model_speed.py).
set -euo pipefail
out=${1:-/tmp/vit_jax_benchmarks}
mkdir -p "$out"
# shellcheck source=experiments/python.sh
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"  # sets py
bench() { "$py" -m vit_jax.benchmark --model=ViT-B/16 --batch=8 --resolution=224 --steps=5 --warmup=1 "$@"; }

# The defaults: the train step of the ViT recipes (blocks stacked, scan_layers=True;
# remat_policy='auto'; heads-major attention on CPU). Alone, as vit_jax.main runs it
# (keep_host_memory on), then next to timm in the same process (keep_host_memory off: the
# malloc setting is process-wide and slows PyTorch).
bench --mode=train --dtype=float32 --steps=10 --json="$out/train_fp32_alone.json"
bench --mode=train --dtype=bfloat16 --steps=10 --json="$out/train_bf16_alone.json"
bench --mode=train --dtype=float32 --compare=timm --steps=8 --json="$out/train_fp32.json"
bench --mode=train --dtype=bfloat16 --compare=timm --steps=8 --json="$out/train_bf16.json"
# Host memory: without keep_host_memory, and with glibc's transparent huge pages instead.
bench --mode=train --keep_host_memory=false --json="$out/train_fp32_no_keep.json"
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 bench --mode=train --keep_host_memory=false \
    --json="$out/train_fp32_hugetlb.json"
bench --mode=infer --dtype=float32 --compare=timm --json="$out/infer_fp32.json"
# Where the steps' time goes, next to timm eager (matmul, attention, elementwise, copies).
bench --mode=train --dtype=float32 --compare=timm_eager --steps=6 --profile \
    --json="$out/profile_train_fp32.json"
bench --mode=train --dtype=bfloat16 --compare=timm_eager --steps=6 --profile \
    --json="$out/profile_train_bf16.json"
bench --mode=infer --dtype=bfloat16 --compare=timm --json="$out/infer_bf16.json"
# Each fast path switched off (or on) alone, float32 train step: the default and the named
# variants take one step each per round, and the paired ratio of each variant's step times
# to the default's is printed. Two processes, since each variant holds its own train state.
bench --mode=train --steps=8 --variant=per_block:scan_layers=False \
    --variant=unrolled:scan_layers=False --variant="unrolled:layer_loop='unroll'" \
    --variant=unrolled_original:scan_layers=False \
    --variant="unrolled_original:layer_loop='unroll'" \
    --variant=unrolled_original:remat_policy=None \
    --variant="unrolled_original:attention_impl='xla'" --json="$out/variants_layout.json"
bench --mode=train --steps=8 --variant=no_remat:remat_policy=None \
    --variant="xla_attention:attention_impl='xla'" --variant="remat_full:remat_policy='full'" \
    --variant="remat_dots:remat_policy='dots'" --variant="bf16:dtype='bfloat16'" \
    --json="$out/variants_fast_paths.json"
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

# One line per record: step time, images/s, MFU (per step, median; and against the run's
# best peak), and the ratios to the baselines run in turn with it.
"$py" - "$out" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob('*.json')):
  r = json.loads(f.read_text())
  line = (f"{f.stem:42s} {r['step_time']['median_s']:7.3f} s {r['images_per_sec']:7.2f} img/s "
          f"MFU {r['mfu']:.3f} (best-peak {r['mfu_of_best_peak']:.3f}) compile {r['compile_s']:.1f} s")
  for b in r.get('baselines', []):
    line += f" | {b['framework']} {b['images_per_sec']:.2f} img/s: {r['images_per_sec'] / b['images_per_sec']:.2f}x"
    if b.get('mfu_of_library_peak') is not None:  # timm's MFU against PyTorch's own matmul peak
      line += f" (its MFU {b['mfu_of_library_peak']:.3f} of {b['library_peak_flops_per_sec'] / 1e9:.0f} GFLOP/s)"
  print(line)
  for v in r.get('variants', []):  # --variant: the paired ratio of the step times
    q = v['step_time_vs_vit_jax']
    print(f"{'':42s} {v['name']} {v['variant']}: {q['median']:.3f}x the step time "
          f"({q['min']:.3f} to {q['max']:.3f}, {q['rounds']} rounds)")
  for rec in (r, *r.get('baselines', [])):
    if 'profile' in rec:  # --profile: seconds per step by kind of operation
      parts = ', '.join(f'{k} {v:.2f}' for k, v in rec['profile']['seconds'].items())
      print(f"{'':42s} {rec['framework']}: {parts} (s/step)")
PY

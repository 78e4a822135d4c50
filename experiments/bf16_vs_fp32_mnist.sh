#!/usr/bin/env bash
# The bf16 mixed-precision path trains like float32: 50 steps of configs/demo.py on the
# bundled MNIST in each dtype, same seed and data; prints both losses and evaluations.
# Usage: experiments/bf16_vs_fp32_mnist.sh [WORK]
set -euo pipefail
work=${1:-/tmp/vit_jax_bf16}
mkdir -p "$work"
# shellcheck source=experiments/python.sh
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"  # sets py
for dtype in float32 bfloat16; do
  rm -rf "${work:?}/$dtype"
  "$py" -m vit_jax.main --config=configs/demo.py --workdir="$work/$dtype" \
      --config.model.dtype="$dtype" --config.total_steps=50 --config.schedule.warmup_steps=10 \
      --config.log_every=10 --config.eval_every=0 --config.checkpoint_every=0 \
      --config.input.data_dir="$work/tfds" > "$work/$dtype.log" 2>&1
done
"$py" - "$work" <<'PY'
import json, sys
rows = {d: [json.loads(l) for l in open(f'{sys.argv[1]}/{d}/metrics.jsonl')]
        for d in ('float32', 'bfloat16')}
for d, r in rows.items():
  train = [x for x in r if 'loss' in x]
  ev = [x for x in r if 'eval_loss' in x][-1]
  print(f"{d:9s} train loss (steps 41-50) {train[-1]['loss']:.4f}  eval loss "
        f"{ev['eval_loss']:.4f}  eval top-1 {ev['eval_top1']:.4f}")
f, b = ([x for x in rows[d] if 'loss' in x][-1]['loss'] for d in ('float32', 'bfloat16'))
print(f'relative difference of the final training loss: {abs(b - f) / f:.4%}')
PY

#!/usr/bin/env bash
# Fine-tuning checks on real CIFAR-10 (the numbers in docs/finetuning.md, "Measured"):
#   1. base:      the 32 px hybrid of configs/cifar10_scratch.py, 2 epochs from scratch;
#   2. res48:     fine-tuned from it at 48 px (same head, position embedding resampled
#                 bilinearly), 200 steps, evaluated before the first step and every 100;
#      res48_bicubic: the same start evaluated with bicubic resampling (1 step only:
#                 its step-0 row is the comparison);
#   3. catdog:    a new 2-class head (cat vs dog), all parameters trained, 150 steps;
#      catdog_probe: the same with only the head trained (linear probe).
#
# Usage: experiments/cifar10_finetune.sh WORK [DATA]
#   WORK  output directory (one workdir per run under it; must not hold earlier runs of
#         the same name, or they are resumed instead of started)
#   DATA  CIFAR-10 image folder (train/<class>/*.jpg, test/<class>/*.jpg);
#         default: ../shared/data/cifar10 relative to the repository root
# Environment: PYTHON (default: the active virtualenv's, else .venv/bin/python), extra flags for every run in EXTRA_FLAGS.
# On a machine without an accelerator set JAX_PLATFORMS=cpu.

set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 WORK [DATA]" >&2
  exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(realpath -m -- "$1")"
if [[ $# -eq 2 ]]; then
  data="$(realpath -m -- "$2")"
else
  data="$(realpath -m -- "${repo}/../shared/data/cifar10")"
fi
# shellcheck source=experiments/python.sh
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"  # sets py
python=$py
read -r -a extra <<< "${EXTRA_FLAGS:-}"

for split in train test; do
  if [[ ! -d "${data}/${split}" ]]; then
    echo "no ${data}/${split}: pass the CIFAR-10 image folder as DATA" >&2
    exit 1
  fi
done
mkdir -p "${work}"
cd "${repo}"

# run NAME FLAGS...: one training run in WORK/NAME, its log in WORK/NAME.log, timed.
run() {
  local name="$1"
  shift
  local start end
  start="$(date +%s)"
  "${python}" -m vit_jax.main --config=configs/cifar10_scratch.py \
    --workdir="${work}/${name}" "$@" "${extra[@]}" 2>&1 | tee "${work}/${name}.log"
  end="$(date +%s)"
  echo "${name}: $((end - start)) s" | tee -a "${work}/wall_times.txt"
}

# The eval rows (step, eval_top1) of a run's metrics.jsonl.
show_evals() {
  "${python}" - "$1/metrics.jsonl" <<'EOF'
import json
import sys
for line in open(sys.argv[1]):
  row = json.loads(line)
  if 'eval_top1' in row:
    print(f"  step {row['step']:>4}: eval_top1 {row['eval_top1']:.4f}")
EOF
}

# 1. Base model: 32 px, 2 epochs (780 steps of 128) from scratch.
run base --config.input.folder="${data}" --config.num_epochs=2 \
  --config.eval_every=390 --config.checkpoint_every=390

# 2. Resolution change 32 -> 48 px: same head, position embedding resampled.
pp_train48='decode|random_resized_crop(48, scale=(0.5, 1.0))|flip_lr|value_range(-1, 1)|onehot(10, label_smoothing=0.1)'
pp_eval48='decode|resize(48)|value_range(-1, 1)|onehot(10)'
res48=(--config.input.folder="${data}" --config.init_from="${work}/base"
       --config.init_head=keep --config.model.image_size=48 --config.eval_at_start=True
       --config.input.pp_train="${pp_train48}" --config.input.pp_eval="${pp_eval48}"
       --config.schedule.base_lr=3e-4 --config.log_every=50)
run res48 "${res48[@]}" --config.total_steps=200 --config.schedule.warmup_steps=20 \
  --config.eval_every=100 --config.checkpoint_every=100
run res48_bicubic "${res48[@]}" --config.posemb_resample=bicubic --config.total_steps=1 \
  --config.schedule.warmup_steps=0

# 3. Head swap 10 -> 2 classes (cat, dog): a class-folder of symlinks into DATA.
for split in train test; do
  mkdir -p "${work}/catdog_data/${split}"
  for cls in cat dog; do
    ln -sfn "${data}/${split}/${cls}" "${work}/catdog_data/${split}/${cls}"
  done
done
catdog=(--config.input.folder="${work}/catdog_data" --config.init_from="${work}/base"
        --config.init_head=reset --config.model.num_classes=2 --config.eval_at_start=True
        --config.input.pp_train='decode|random_resized_crop(32, scale=(0.5, 1.0))|flip_lr|value_range(-1, 1)|onehot(2, label_smoothing=0.1)'
        --config.input.pp_eval='decode|resize(32)|value_range(-1, 1)|onehot(2)'
        --config.total_steps=150 --config.schedule.base_lr=3e-4
        --config.schedule.warmup_steps=15 --config.log_every=25 --config.eval_every=75
        --config.checkpoint_every=75)
run catdog "${catdog[@]}"
run catdog_probe "${catdog[@]}" --config.trainable='^head/' --config.schedule.base_lr=1e-3

for name in base res48 res48_bicubic catdog catdog_probe; do
  echo "${name}:"
  show_evals "${work}/${name}"
done
cat "${work}/wall_times.txt"

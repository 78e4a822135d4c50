#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md: ViT-B/16 at 224 px on one GPU, vit_jax next to timm
# (torch.compile, bf16 autocast, SDPA attention, fused AdamW) in the same process.
# Usage: experiments/benchmarks_gpu.sh [OUT_DIR]   (about 5 minutes on an H100/H200)
#
# Needs jax with CUDA, flax, optax, orbax, torch, timm and ml_collections; not TensorFlow
# (the benchmark does not import the input pipeline). On this workplace's device machine
# (no network there; ml_collections missing), once, here in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl ml_collections==1.1.0
# then a run with carry=['.whl'] and the command
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site experiments/benchmarks_gpu.sh $OUT
set -euo pipefail
out=${1:-/tmp/vit_jax_benchmarks_gpu}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the script moves to the repo root next
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
"$py" -c "import jax, torch, timm; print('jax', jax.__version__, jax.devices(), '| torch',
torch.__version__, '| timm', timm.__version__)" | tee -a "$out/gpu.txt"
# A run that fails (cuDNN's fused attention may refuse a shape, say) is reported and the
# next runs still happen: a lent GPU's minutes are few. The script exits 1 at the end if
# any run failed.
failed=()
bench() {
  "$py" -m vit_jax.benchmark --model=ViT-B/16 --resolution=224 --steps=10 --warmup=3 "$@" \
      || { echo "FAILED: vit_jax.benchmark $*" >&2; failed+=("$*"); }
}
# Train step, bf16 mixed precision: MFU of the datasheet's dense bf16 peak (989 TFLOP/s on
# H100 and H200), against timm torch.compile in the same process.
bench --mode=train --dtype=bfloat16 --batch=256 --compare=timm_compile \
    --json="$out/train_bf16_b256.json"
# cuDNN's fused attention asked for explicitly, paired with the default (XLA picks the
# attention kernel): one step of each per round, and the ratio of their step times.
bench --mode=train --dtype=bfloat16 --batch=256 --variant="attention_impl='cudnn'" \
    --json="$out/train_bf16_b256_cudnn.json"
# Inference at batch 256.
bench --mode=infer --dtype=bfloat16 --batch=256 --compare=timm_compile \
    --json="$out/infer_bf16_b256.json"
bench --mode=infer --dtype=float32 --batch=256 --json="$out/infer_fp32_b256.json"
if ((${#failed[@]})); then
  printf 'failed run: %s\n' "${failed[@]}" >&2
  exit 1
fi

#!/usr/bin/env bash
# Submits launch/slurm.sbatch with the node / GPU layout on the command line.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/slurm_submit.sh --config=FILE --workdir=DIR [options] [--] [vit_jax.main flags]

Options (or environment variables):
  --config=FILE        CONFIG (required)
  --workdir=DIR        WORKDIR (required): a file system every node sees, or gs://
  --nodes=N            NODES (default 1)
  --gpus_per_node=G    GPUS_PER_NODE (default 8)
  --per=gpu|node       PER: one process per GPU (default) or one per node driving all
                       its GPUs
  --cpus_per_gpu=C     CPUS_PER_GPU (default 12): data loading runs on these
  --time=HH:MM:SS      TIME (default 48:00:00)
  --partition=P        PARTITION
  --account=A          ACCOUNT
  --qos=Q              QOS
  --restarts=K         RESTARTS (default 1): attempts inside the allocation
  --no_requeue         do not requeue the job when it is preempted
  --dry_run            print the sbatch command instead of running it
  SBATCH_ARGS          more sbatch options, quoted as in a shell:
                       SBATCH_ARGS='--job-name="vit b16" --mail-type=END'
  PYTHON, EXTRA_ARGS   see launch/slurm.sbatch
EOF
}

CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PER=${PER:-gpu}
CPUS_PER_GPU=${CPUS_PER_GPU:-12}
TIME=${TIME:-48:00:00}
PARTITION=${PARTITION:-}
ACCOUNT=${ACCOUNT:-}
QOS=${QOS:-}
RESTARTS=${RESTARTS:-1}
REQUEUE=1
DRY_RUN=${DRY_RUN:-}
main_args=()
while (($#)); do
  case $1 in
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --nodes=*) NODES=${1#*=} ;;
    --gpus_per_node=*) GPUS_PER_NODE=${1#*=} ;;
    --per=*) PER=${1#*=} ;;
    --cpus_per_gpu=*) CPUS_PER_GPU=${1#*=} ;;
    --time=*) TIME=${1#*=} ;;
    --partition=*) PARTITION=${1#*=} ;;
    --account=*) ACCOUNT=${1#*=} ;;
    --qos=*) QOS=${1#*=} ;;
    --restarts=*) RESTARTS=${1#*=} ;;
    --no_requeue) REQUEUE= ;;
    --dry_run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; main_args+=("$@"); break ;;
    --config | --workdir | --nodes | --gpus_per_node | --per | --cpus_per_gpu | --time | \
    --partition | --account | --qos | --restarts)
      # (the value, a word of its own, went to vit_jax.main, which failed in the queue)
      echo "launch/slurm_submit.sh: write $1=VALUE (one word)" >&2; exit 2 ;;
    *)
      name=${1%%=*}
      if [[ $name == --?*-* ]]; then
        # vit_jax.main's flags and this script's options are spelled with '_': a dashed
        # spelling (--dry-run, --gpus-per-node) went to vit_jax.main, so a dry run
        # submitted the job, which failed in the queue on an unknown flag.
        inner=${name#--}
        echo "launch/slurm_submit.sh: unknown option $name: this script's options and" \
          "vit_jax.main's flags are spelled with '_' (--${inner//-/_}); see --help" >&2
        exit 2
      fi
      main_args+=("$1") ;;
  esac
  shift
done

die() { echo "launch/slurm_submit.sh: $*" >&2; exit 2; }
[[ -n $CONFIG && -n $WORKDIR ]] || { usage >&2; die 'give --config and --workdir'; }
case $PER in
  gpu) tasks=$GPUS_PER_NODE; cpus=$CPUS_PER_GPU ;;
  node) tasks=1; cpus=$((CPUS_PER_GPU * GPUS_PER_NODE)) ;;
  *) die "--per=$PER: use gpu or node" ;;
esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
args=(sbatch --nodes="$NODES" --ntasks-per-node="$tasks" --gpus-per-node="$GPUS_PER_NODE"
  --cpus-per-task="$cpus" --time="$TIME" --chdir="$(dirname "$here")")
[[ -z $PARTITION ]] || args+=(--partition="$PARTITION")
[[ -z $ACCOUNT ]] || args+=(--account="$ACCOUNT")
[[ -z $QOS ]] || args+=(--qos="$QOS")
if [[ -n $REQUEUE ]]; then args+=(--requeue); else args+=(--no-requeue); fi
# words STRING: its words as a shell would split them (quoted values kept whole), one
# per line, by xargs (nothing in STRING is run); nothing for a blank STRING; status 1 on
# an unmatched quote.
words() {
  [[ -n ${1//[[:space:]]/} ]] || return 0
  printf '%s' "$1" | xargs -n1 printf '%s\n'
}
list=$(words "${SBATCH_ARGS:-}") || die "SBATCH_ARGS: an unmatched quote in: $SBATCH_ARGS"
more=()
[[ -z $list ]] || while IFS= read -r arg; do more+=("$arg"); done <<<"$list"
args+=(${more[@]+"${more[@]}"} "$here/slurm.sbatch" ${main_args[@]+"${main_args[@]}"})

export CONFIG WORKDIR RESTARTS
export REPO_DIR=${REPO_DIR:-$(dirname "$here")}
if [[ -n $DRY_RUN ]]; then
  printf 'CONFIG=%q WORKDIR=%q RESTARTS=%q REPO_DIR=%q \\\n' "$CONFIG" "$WORKDIR" "$RESTARTS" \
    "$REPO_DIR"  # (quoted: a path with a space can be pasted)
  printf '%q ' "${args[@]}"
  echo
  exit 0
fi
exec "${args[@]}"

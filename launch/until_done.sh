#!/usr/bin/env bash
# Preemptible capacity: run a vit_jax job again and again until its workdir says the run
# reached its final step. Every restart resumes from the newest complete checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/until_done.sh --workdir=DIR [options] -- COMMAND [ARGS ...]

Runs COMMAND (the whole job: e.g. launch/multinode.sh ..., srun ..., or
launch/tpu_vm.sh attempt) until the run is done, at most --max_attempts times, waiting
--backoff seconds before the first restart and twice as long before each next one.
"Done" is read from the workdir, not from COMMAND's exit status (a preempted job can
exit 0, a finished one can be killed while it exits): the newest complete checkpoint is
the run's final step (launch/run_status.py). A run that is already done is not started.

Options:
  --workdir=DIR        the run's workdir, local or gs:// (WORKDIR)
  --total_steps=N      the final step (default: from the newest checkpoint's config;
                       give it when the command raises config.total_steps of a run)
  --done_cmd=CMD       a shell command whose exit status 0 means done, instead of
                       launch/run_status.py (DONE_CMD)
  --max_attempts=N     (MAX_ATTEMPTS, default 20)
  --backoff=SECONDS    wait before the first restart (BACKOFF, default 60)
  --max_backoff=SECS   longest wait (MAX_BACKOFF, default 1800)
  PYTHON               Python that runs launch/run_status.py (default python3)
Exit status: 0 when the run is done, 1 when it is not after --max_attempts attempts.
EOF
}

WORKDIR=${WORKDIR:-}
TOTAL_STEPS=${TOTAL_STEPS:-}
DONE_CMD=${DONE_CMD:-}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-20}
BACKOFF=${BACKOFF:-60}
MAX_BACKOFF=${MAX_BACKOFF:-1800}
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

while (($#)); do
  case $1 in
    --workdir=*) WORKDIR=${1#*=} ;;
    --total_steps=*) TOTAL_STEPS=${1#*=} ;;
    --done_cmd=*) DONE_CMD=${1#*=} ;;
    --max_attempts=*) MAX_ATTEMPTS=${1#*=} ;;
    --backoff=*) BACKOFF=${1#*=} ;;
    --max_backoff=*) MAX_BACKOFF=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
  shift
done

die() { echo "launch/until_done.sh: $*" >&2; exit 2; }
log() { echo "launch/until_done.sh [$(date '+%F %T')]: $*" >&2; }
(($#)) || { usage >&2; die 'no command given'; }
[[ -n $WORKDIR || -n $DONE_CMD ]] || die 'give --workdir (or --done_cmd)'
for v in MAX_ATTEMPTS BACKOFF MAX_BACKOFF; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v=${!v} is not a whole number"
done

is_done() {
  if [[ -n $DONE_CMD ]]; then
    bash -c "$DONE_CMD"
  else
    local args=("$here/run_status.py" "$WORKDIR")
    [[ -z $TOTAL_STEPS ]] || args+=(--total_steps="$TOTAL_STEPS")
    "$PYTHON" "${args[@]}"
  fi
}

if is_done; then
  log 'the run is already done; nothing to start'
  exit 0
fi
delay=$BACKOFF
attempt=0
while :; do
  attempt=$((attempt + 1))
  log "attempt $attempt of $MAX_ATTEMPTS: $*"
  rc=0
  "$@" || rc=$?
  if is_done; then
    log "the run is done (attempt $attempt)"
    exit 0
  fi
  log "attempt $attempt ended with status $rc before the final step"
  if ((attempt >= MAX_ATTEMPTS)); then
    log "giving up after $attempt attempts; start the same command again to continue"
    exit 1
  fi
  log "restarting in $delay s"
  sleep "$delay"
  delay=$((delay * 2 > MAX_BACKOFF ? MAX_BACKOFF : delay * 2))
done

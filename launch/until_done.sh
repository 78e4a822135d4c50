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
  --stop_on=STATUS     an exit status of COMMAND after which no attempt follows, and
                       this script exits with it (STOP_ON; e.g. 143 inside a SLURM job:
                       the run saved on the time limit's SIGTERM, and the allocation
                       ends before another attempt could do anything)
  PYTHON               Python that runs launch/run_status.py (default: the active
                       virtualenv's python, else this checkout's .venv/bin/python,
                       else python3). Any Python 3.7+ reads a local workdir; a gs://
                       workdir needs the one vit_jax is installed in.
Before it starts anything it checks that PYTHON runs launch/run_status.py (--check);
if not, or if the status check fails later (exit status other than 0 done, 1 not
done), it stops at once instead of starting the job again. With --done_cmd, any exit
status other than 0 means "not done".
Exit status: 0 when the run is done, 1 when it is not after --max_attempts attempts,
2 on errors (bad options, a status check that cannot run or cannot read the workdir, a
COMMAND that cannot run: status 126 or 127),
3 when COMMAND exits with status 3 (vit_jax.main's status for an error that a restart
would meet again: a config, data, mesh or checkpoint error; no attempt follows), 130 or
143 after Ctrl-C or SIGTERM to this script (passed on to COMMAND as SIGTERM: it saves
and stops, and no attempt follows).
EOF
}

WORKDIR=${WORKDIR:-}
TOTAL_STEPS=${TOTAL_STEPS:-}
DONE_CMD=${DONE_CMD:-}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-20}
BACKOFF=${BACKOFF:-60}
MAX_BACKOFF=${MAX_BACKOFF:-1800}
STOP_ON=${STOP_ON:-}
PYTHON=${PYTHON:-}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -z $PYTHON ]]; then
  if [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
    PYTHON=$VIRTUAL_ENV/bin/python
  elif [[ -x $here/../.venv/bin/python ]]; then
    PYTHON=$(cd "$here/.." && pwd)/.venv/bin/python
  else
    PYTHON=python3
  fi
fi

while (($#)); do
  case $1 in
    --workdir=*) WORKDIR=${1#*=} ;;
    --total_steps=*) TOTAL_STEPS=${1#*=} ;;
    --done_cmd=*) DONE_CMD=${1#*=} ;;
    --max_attempts=*) MAX_ATTEMPTS=${1#*=} ;;
    --backoff=*) BACKOFF=${1#*=} ;;
    --max_backoff=*) MAX_BACKOFF=${1#*=} ;;
    --stop_on=*) STOP_ON=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "launch/until_done.sh: unknown option $1 (the command goes after --; see --help)" >&2
        exit 2 ;;
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
[[ -z $STOP_ON || $STOP_ON =~ ^[0-9]+$ ]] || die "--stop_on=$STOP_ON is not an exit status"
# (--max_attempts=0 ran one attempt all the same)
((MAX_ATTEMPTS >= 1)) || die "--max_attempts=$MAX_ATTEMPTS: give 1 or more"

status_cmd=("$PYTHON" "$here/run_status.py" "$WORKDIR")
[[ -z $TOTAL_STEPS ]] || status_cmd+=(--total_steps="$TOTAL_STEPS")

# Once, before anything starts: can PYTHON run the status check for this workdir? (A
# Python without the needed modules, or no Python at all, must not read as "not done".)
check_status_python() {
  local out rc=0 where fix
  out=$("$PYTHON" "$here/run_status.py" --check "$WORKDIR" 2>&1) || rc=$?
  [[ $rc -ne 0 || $out != *'run_status.py: ready'* ]] || return 0
  where=$(command -v -- "$PYTHON" || echo 'not found')
  fix='a Python 3.7+ that runs it'
  [[ $WORKDIR != *://* ]] || fix='the Python vit_jax is installed in'
  [[ -z $out ]] || out=$(printf ', saying:\n%s\n' "$out" | sed '2,$s/^/  /')
  die "the workdir status check cannot run under PYTHON=$PYTHON ($where):" \
    "\`$PYTHON launch/run_status.py --check $WORKDIR\` exited with status $rc$out
Nothing was started. Set PYTHON to $fix (PYTHON=/path/to/venv/bin/python $0 ...)," \
    "or give --done_cmd."
}

# 0 when done, 1 when not; exits (status 2) when the status check itself fails.
is_done() {
  if [[ -n $DONE_CMD ]]; then
    bash -c "$DONE_CMD"
    return
  fi
  local rc=0
  "${status_cmd[@]}" || rc=$?
  case $rc in
    0 | 1) return "$rc" ;;
    *) die "cannot tell whether the run is done: \`${status_cmd[*]}\` exited with status" \
      "$rc (its message is above); $1. Fix that, then start the same command again" ;;
  esac
}

# The newest complete checkpoint's step ('' when there is none, or with --done_cmd).
newest_step() {
  [[ -z $DONE_CMD ]] || return 0
  { "${status_cmd[@]}" --json 2>/dev/null || true; } |
    sed -n 's/.*"step": *\([0-9][0-9]*\).*/\1/p'
}

# SIGTERM or Ctrl-C here: the job is told (SIGTERM: vit_jax saves and stops), this script
# waits for it and starts no further attempt. The job runs in a process group of its own
# (set -m), so that a terminal's Ctrl-C reaches this script only and the job gets one
# SIGTERM (a second signal would stop vit_jax.main without saving), and in the
# background, so that the signal is handled at once (a wait is interrupted by it; a
# foreground command would first have to end). The backoff's sleep runs the same way.
stop_signal=''
child=''
on_stop() {
  stop_signal=$1
  log "signal $1: no further attempt; the job saves and stops"
  [[ -z $child ]] || kill -TERM -- "-$child" 2>/dev/null || kill -TERM "$child" 2>/dev/null ||
    true
  # A job stopped by reading the terminal (a background group: ssh or gcloud asking for a
  # passphrase) would take the signal only once continued.
  [[ -z $child ]] || kill -CONT -- "-$child" 2>/dev/null || true
}
trap 'on_stop INT' INT
trap 'on_stop TERM' TERM
stopped() {
  [[ -n $stop_signal ]] || return 0
  log "stopped by $stop_signal after attempt $attempt; start the same command again to continue"
  [[ $stop_signal == INT ]] && exit 130
  exit 143
}
# run_in_group COMMAND...: runs it in a process group of its own (stdin /dev/null) and
# returns its exit status, whatever signals arrive meanwhile.
run_in_group() {
  set -m
  "$@" </dev/null &
  child=$!
  set +m
  # A signal between the start and the line above found no child to pass it on to.
  [[ -z $stop_signal ]] || kill -TERM -- "-$child" 2>/dev/null || true
  local rc
  while :; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break  # else a signal ended the wait, not the job
  done
  rc=0
  wait "$child" || rc=$?  # the job's own status (bash keeps it)
  child=''
  return "$rc"
}

[[ -n $DONE_CMD ]] || check_status_python
if is_done 'nothing started'; then
  log 'the run is already done; nothing to start'
  exit 0
fi
delay=$BACKOFF
attempt=0
while :; do
  stopped  # a signal before this attempt: none starts
  attempt=$((attempt + 1))
  log "attempt $attempt of $MAX_ATTEMPTS: $*"
  rc=0
  before=$(newest_step)
  run_in_group "$@" || rc=$?
  if is_done "not restarting after attempt $attempt (status $rc)"; then
    log "the run is done (attempt $attempt)"
    exit 0
  fi
  log "attempt $attempt ended with status $rc before the final step"
  stopped
  if [[ $rc == 126 || $rc == 127 ]]; then
    die "not restarting: status $rc is the shell's for a command that cannot run (not found" \
      "or not executable: $1); a restart would meet it again"
  fi
  if [[ $rc == 3 ]]; then
    log 'not restarting: status 3 is vit_jax.main'"'"'s for an error that a restart would' \
      'meet again (a config, data, mesh or checkpoint error; its message is above)'
    exit 3
  fi
  if [[ $rc == 0 && -z $DONE_CMD && $WORKDIR != *://* && ! -e $WORKDIR ]]; then
    die "attempt $attempt ended with status 0 and --workdir=$WORKDIR does not exist: the" \
      "job writes elsewhere (its --workdir must be this one); not restarting"
  fi
  if [[ $rc == 0 && -z $DONE_CMD ]] && [[ $(newest_step) == "$before" ]]; then
    # The job ended as a finished run does, and saved nothing new: restarting it would do
    # the same, up to --max_attempts times with the backoff's waits between (hours).
    die "attempt $attempt ended with status 0 (as a job whose run is finished) without" \
      "a new checkpoint (newest step: ${before:-none}), yet the status check says the" \
      "run is not done: this script's --workdir=$WORKDIR${TOTAL_STEPS:+ and --total_steps=$TOTAL_STEPS}" \
      "must be the job's own (its --workdir, and its final step); not restarting"
  fi
  if [[ -n $STOP_ON && $rc == "$STOP_ON" ]]; then
    log "not restarting: status $rc is --stop_on's (the job was told to stop)"
    exit "$rc"
  fi
  if ((attempt >= MAX_ATTEMPTS)); then
    log "giving up after $attempt attempts; start the same command again to continue"
    exit 1
  fi
  log "restarting in $delay s"
  run_in_group sleep "$delay" || true
  stopped
  delay=$((delay * 2 > MAX_BACKOFF ? MAX_BACKOFF : delay * 2))
done

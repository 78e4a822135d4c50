#!/usr/bin/env bash
# Multi-node training without SLURM or Cloud TPU: start process i of n of one vit_jax run,
# or (with --hosts) start all n processes, one per host, over ssh.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/multinode.sh [options] [--] [vit_jax.main flags ...]

One process (run this on every host, with its own --process_id):
  launch/multinode.sh --coordinator=HOST0:PORT --num_processes=N --process_id=I \
      --config=configs/vit_b16.py --workdir=/shared/or/gs/path
  runs  $PYTHON -m vit_jax.main --coordinator_address=HOST0:PORT --num_processes=N
        --process_id=I [flags]  (jax.distributed.initialize with these values).

All processes from one machine, over ssh (process i on the i-th host, coordinator on
the first):
  launch/multinode.sh --hosts=gpu1,gpu2 [--port=PORT] [--log_dir=DIR] --config=... --workdir=...
  Every host needs the code at --remote_dir (default: the path of this script's
  checkout) and the same Python environment; each process starts there, so a relative
  --config or --workdir is relative to --remote_dir (give the workdir absolute). If one process fails, the others are
  stopped (a process preempted on its host, status 143, makes the others save and stop).
  SIGTERM or Ctrl-C to this script reaches every process (over ssh): each saves a
  checkpoint after its current step and exits, and the script waits until none runs;
  a second signal (more than 10 s after the first) stops them at once.

Options (each also read from the environment variable in capitals):
  --coordinator=HOST:PORT  address of process 0 (COORDINATOR)
  --num_processes=N        processes in the run (NUM_PROCESSES)
  --process_id=I           this process, 0..N-1 (PROCESS_ID)
  --local_devices=0,1,..   accelerators this process uses (JAX_LOCAL_DEVICE_IDS; default
                           all of the host's: one process per host)
  --hosts=H0,H1,...        start one process per host over ssh (HOSTS)
  --port=PORT              coordinator port with --hosts (PORT, default 62111)
  --remote_dir=DIR         the code's directory on the hosts (REMOTE_DIR, default the
                           path of this script's checkout)
  --log_dir=DIR            with --hosts: process i's output is appended to
                           DIR/process_i.log, after a line naming the start (LOG_DIR;
                           default: this terminal)
  --python=PATH            Python with vit_jax installed (PYTHON, default python3)
  SSH                      ssh command (default: ssh -o BatchMode=yes); it must not
                           prompt (a passphrase, a host key): it runs in the background
  REMOTE_TMP               where each host keeps its process's PID file (default /tmp)
  REMOTE_ENV               VAR=value pairs set for every process, quoted as in a shell:
                           'NCCL_DEBUG=WARN XLA_FLAGS="--xla_a=1 --xla_b=2"'
  STOP_TIMEOUT             after a stop signal, how long to wait for the processes to
                           save before killing them (seconds, default 900)
  -h, --help               this text
Every other argument is passed to vit_jax.main. The workdir must be reachable by all
processes with the same path (shared file system or gs://).
EOF
}

COORDINATOR=${COORDINATOR:-}
NUM_PROCESSES=${NUM_PROCESSES:-}
PROCESS_ID=${PROCESS_ID:-}
HOSTS=${HOSTS:-}
PORT=${PORT:-62111}
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=${REMOTE_DIR:-$checkout}
LOCAL_DEVICES=${JAX_LOCAL_DEVICE_IDS:-}
LOG_DIR=${LOG_DIR:-}
PYTHON=${PYTHON:-python3}
SSH=${SSH:-ssh -o BatchMode=yes}
REMOTE_ENV=${REMOTE_ENV:-}
STOP_TIMEOUT=${STOP_TIMEOUT:-900}
main_args=()
while (($#)); do
  case $1 in
    --coordinator=*) COORDINATOR=${1#*=} ;;
    --num_processes=*) NUM_PROCESSES=${1#*=} ;;
    --process_id=*) PROCESS_ID=${1#*=} ;;
    --local_devices=*) LOCAL_DEVICES=${1#*=} ;;
    --hosts=*) HOSTS=${1#*=} ;;
    --port=*) PORT=${1#*=} ;;
    --remote_dir=*) REMOTE_DIR=${1#*=} ;;
    --log_dir=*) LOG_DIR=${1#*=} ;;
    --python=*) PYTHON=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    --) shift; main_args+=("$@"); break ;;
    *) main_args+=("$1") ;;
  esac
  shift
done

die() { echo "launch/multinode.sh: $*" >&2; exit 2; }
# words STRING: its words as a shell would split them (quoted values kept whole), one
# per line, by xargs (nothing in STRING is run); nothing for a blank STRING; status 1 on
# an unmatched quote.
words() {
  [[ -n ${1//[[:space:]]/} ]] || return 0
  printf '%s' "$1" | xargs -n1 printf '%s\n'
}

if [[ -z $HOSTS ]]; then
  # One process of the run.
  [[ -n $COORDINATOR && -n $NUM_PROCESSES && -n $PROCESS_ID ]] ||
    { usage >&2; die 'give --coordinator, --num_processes and --process_id (or --hosts)'; }
  [[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die "--num_processes=$NUM_PROCESSES: a positive integer"
  if ! [[ $PROCESS_ID =~ ^[0-9]+$ ]] || ((PROCESS_ID >= NUM_PROCESSES)); then
    die "--process_id=$PROCESS_ID must be in 0..$((NUM_PROCESSES - 1))"
  fi
  list=$(words "$REMOTE_ENV") || die "REMOTE_ENV: an unmatched quote in: $REMOTE_ENV"
  env_pairs=()
  [[ -z $list ]] || while IFS= read -r pair; do env_pairs+=("$pair"); done <<<"$list"
  for pair in ${env_pairs[@]+"${env_pairs[@]}"}; do
    [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
      die "REMOTE_ENV: '$pair' is not NAME=value (quote values with spaces: XLA_FLAGS=\"--a=1 --b=2\")"
    export "${pair?}"
  done
  [[ -z $LOCAL_DEVICES ]] || export JAX_LOCAL_DEVICE_IDS=$LOCAL_DEVICES
  exec "$PYTHON" -m vit_jax.main --coordinator_address="$COORDINATOR" \
    --num_processes="$NUM_PROCESSES" --process_id="$PROCESS_ID" ${main_args[@]+"${main_args[@]}"}
fi

# Fan out: process i on host i, over ssh.
IFS=, read -r -a hosts <<<"$HOSTS"
n=${#hosts[@]}
((n > 0)) || die '--hosts is empty'
# (A user@ prefix is ssh's, not the coordinator's address.)
coordinator=${COORDINATOR:-${hosts[0]##*@}:$PORT}
read -r -a ssh_cmd <<<"$SSH"
[[ -z $LOG_DIR ]] || mkdir -p "$LOG_DIR"
# Each remote process writes its PID here (on its own host), so that a signal to this
# script can reach it: killing the local ssh client does not stop a remote command.
pid_file_of() { printf '%s/vit_jax_multinode.%s.%s.pid' "${REMOTE_TMP:-/tmp}" "$run_id" "$1"; }
run_id="$(date +%s).$$"
pids=()
for i in "${!hosts[@]}"; do
  # The inner shell writes its PID (which exec makes vit_jax.main's) and the outer one
  # removes the file when the process ends. The output reaches ssh through a relay that
  # outlives a lost connection (or a killed ssh client): without it vit_jax.main would
  # die of a broken pipe at its next line of output, before it had saved.
  # shellcheck disable=SC2016  # $$ expands on the remote host
  inner=$(printf 'echo $$ > %q && cd %q && exec > >(trap "" INT TERM HUP PIPE; cat || cat >/dev/null) 2>&1 && PYTHON=%q REMOTE_ENV=%q exec launch/multinode.sh' \
    "$(pid_file_of "$i")" "$REMOTE_DIR" "$PYTHON" "$REMOTE_ENV")
  inner+=$(printf ' %q' --coordinator="$coordinator" --num_processes="$n" \
    --process_id="$i" ${LOCAL_DEVICES:+--local_devices="$LOCAL_DEVICES"} \
    -- ${main_args[@]+"${main_args[@]}"})
  # shellcheck disable=SC2016  # $? and $rc expand on the remote host
  remote=$(printf 'bash -c %q; rc=$?; rm -f %q; exit $rc' "$inner" "$(pid_file_of "$i")")
  echo "launch/multinode.sh: process $i of $n on ${hosts[i]} (coordinator $coordinator)" >&2
  # Each ssh client in a process group of its own (set -m): a signal to this script's
  # group (Ctrl-C, until_done.sh's SIGTERM) must not end them. This script passes the
  # stop on to every process over ssh and waits for the clients to end with them.
  set -m
  if [[ -n $LOG_DIR ]]; then
    # Appended: a restarted run (until_done.sh) keeps the log of the attempt that failed.
    echo "=== launch/multinode.sh: process $i of $n on ${hosts[i]}, started $(date -u +%FT%TZ) ===" \
      >>"$LOG_DIR/process_$i.log"
    "${ssh_cmd[@]}" "${hosts[i]}" "$remote" >>"$LOG_DIR/process_$i.log" 2>&1 </dev/null &
  else
    "${ssh_cmd[@]}" "${hosts[i]}" "$remote" </dev/null &
  fi
  pids+=($!)
  set +m
done

# signal_all SIG: send SIG to every remote process (over ssh, by its PID file).
signal_all() {
  local i file
  for i in "${!hosts[@]}"; do
    file=$(pid_file_of "$i")
    # Only a vit_jax.main process: the file outlives its process, and the PID may have
    # been reused since.
    # shellcheck disable=SC2016  # $pid expands on the remote host
    "${ssh_cmd[@]}" "${hosts[i]}" "$(printf 'pid=$(cat %q 2>/dev/null) && ps -ww -o args= -p "$pid" | grep -q vit_jax.main && kill -%s "$pid"' \
      "$file" "$1")" </dev/null >/dev/null 2>&1 || true
  done
}
# The hosts whose process is still running (by PID file, as signal_all).
remote_running() {
  local i file
  for i in "${!hosts[@]}"; do
    file=$(pid_file_of "$i")
    # shellcheck disable=SC2016  # $pid expands on the remote host
    if "${ssh_cmd[@]}" "${hosts[i]}" "$(printf 'pid=$(cat %q 2>/dev/null) && ps -ww -o args= -p "$pid" | grep -q vit_jax.main' \
      "$file")" </dev/null >/dev/null 2>&1; then
      echo "${hosts[i]}"
    fi
  done
}
stop_all() {  # after a failure: the others cannot finish a collective without it
  signal_all KILL
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
# SIGTERM or Ctrl-C here (a scheduler's notice, until_done.sh, the user): every process
# saves a checkpoint after its current step and exits (vit_jax.main, status 143); this
# script waits for them. A second signal stops them at once.
stopping=0
signalled_at=''
# shellcheck disable=SC2317,SC2329  # called by the trap
on_signal() {
  # A signal within 10 s of the first is the same notice (a shutdown signals every
  # process, and until_done.sh passes its own on), as for vit_jax.main itself.
  if [[ -n $signalled_at ]] && ((SECONDS - signalled_at < 10)); then
    echo 'launch/multinode.sh: signal again, within 10 s of the first: the same notice' >&2
    return
  fi
  if ((stopping)); then
    echo 'launch/multinode.sh: second signal: stopping every process now' >&2
    stop_all
    exit 130
  fi
  stopping=1
  signalled_at=$SECONDS
  echo 'launch/multinode.sh: signal: every process saves a checkpoint and stops' >&2
  signal_all TERM
}
trap on_signal INT TERM

# Wait for all; the first failure stops the others. (Polling: bash 3.2 has no wait -n.)
status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    if ((rc != 0 && status == 0)); then
      status=$rc
      if ((stopping)); then
        :
      elif ((rc == 143 || rc == 130)); then
        # Preempted or interrupted on its host: it saved; the others save the same step
        # and stop (vit_jax.main agrees on the step), so they are told, not killed.
        echo "launch/multinode.sh: a process stopped with status $rc (a stop signal on its" \
          'host); the others are told to save and stop too' >&2
        stopping=1
        signal_all TERM
      else
        echo "launch/multinode.sh: a process exited with status $rc; stopping the others" >&2
        stop_all
      fi
    fi
  done
  running=(${still[@]+"${still[@]}"})
  # A signal to the whole process group (Ctrl-C) ends this sleep too: not an error here.
  if ((${#running[@]})); then sleep 1 || true; fi
done
# The ssh clients may have ended before the remote processes did (a lost connection, a
# client killed on its own; ending a client does not end its remote command):
# after a stop, wait until no remote process runs, so that the checkpoint is complete
# and a next attempt (until_done.sh) does not meet the old processes.
if ((stopping)); then
  since=$SECONDS
  told=-30
  while left=$(remote_running | tr '\n' ' ') && [[ -n $left ]]; do
    if ((SECONDS - since >= STOP_TIMEOUT)); then
      echo "launch/multinode.sh: still running after ${STOP_TIMEOUT} s on: $left" \
        '- stopping them now' >&2
      signal_all KILL
      break
    fi
    if ((SECONDS - told >= 30)); then
      echo "launch/multinode.sh: waiting for the processes on $left to finish saving" >&2
      told=$SECONDS
    fi
    sleep 1 || true
  done
fi
exit "$status"

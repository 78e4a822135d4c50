#!/usr/bin/env bash
# Cloud TPU VMs and pod slices: create, copy the code to every worker, install, train on
# every worker, stream logs, stop, delete; or keep a spot run going until it is done.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh COMMAND [options] [-- vit_jax.main flags]

Commands:
  create      create the TPU VM or pod slice
  setup       copy this checkout (or clone --repo) to every worker and install it with
              its [tpu] extra into ~/vit_env (Python 3.11, through uv)
  train       start `python -m vit_jax.main --distributed` on every worker, detached
              (pid ~/vit_jax.pid); refuses if a run is going. Every start (train, run,
              attempt, resilient) appends the worker's output to ~/vit_jax.log there
  logs        stream the log of worker LOG_WORKER (default 0: process 0 prints progress)
  status      the TPU's state, and the run's newest checkpoint (run_status.py on worker 0)
  done        exit status 0 when the run in the workdir reached its final step
  stop        stop the training processes on every worker
  delete      delete the TPU VM
  up          create, setup, train, logs
  run         train in the foreground on every worker (returns when the run ends)
  attempt     one attempt of a spot run: create (again, if missing or preempted) and set
              up the TPU, stop leftovers, `run`
  resilient   `attempt` until the run is done (launch/until_done.sh): spot TPUs
  ssh         run a shell command on every worker: launch/tpu_vm.sh ssh -- 'ls ~'

Options (or environment variables):
  --project=ID       PROJECT            default: gcloud's configured project
  --zone=ZONE        ZONE               required, e.g. europe-west4-a (v3), us-central2-b (v4)
  --name=NAME        TPU_NAME           default vit-jax
  --type=TYPE        ACCELERATOR_TYPE   default v3-8; v3-32, v3-256, v4-32, v5litepod-16...
  --version=V        RUNTIME_VERSION    default from the type: tpu-ubuntu2204-base (v2-v4),
                                        v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
                                        v2-alpha-tpuv6e (v6e)
  --spot             SPOT=1             spot (preemptible) capacity; use with `resilient`
  --config=FILE      CONFIG             required for train/run/up/attempt/resilient
  --workdir=gs://..  WORKDIR            required for train/run/status/done/...: every worker
                                        writes checkpoints there, so a gs:// bucket
  --repo=URL         REPO_URL           clone this repository (at --ref) on the workers
  --ref=REF          REPO_REF           instead of copying this checkout (default main;
                                        resilient pins it to its commit at the start)
  --max_attempts=N   MAX_ATTEMPTS       for resilient (default 20)
  --backoff=S        BACKOFF            for resilient (default 120 s, doubling)
  EXTRA_ARGS         more vit_jax.main flags (as do the arguments after --), quoted as in
                     a shell: EXTRA_ARGS="--config.input.pp_eval='resize(224)|...'"
  WORKER_ENV         NAME=value pairs set for vit_jax.main on every worker, quoted as in
                     a shell: WORKER_ENV='LIBTPU_INIT_ARGS="--xla_a=1 --xla_b=2"'
  INSTALL_CMD        replaces the install command run on every worker
  GCLOUD             gcloud executable (default gcloud)
  STOP_WAIT          seconds `stop` waits for the run to save its checkpoint and exit
                     after SIGTERM, before SIGKILL (default 600)
  DRY_RUN=1          print the gcloud commands instead of running them
EOF
}

cmd=${1:-}
[[ -n $cmd ]] || { usage >&2; exit 2; }
shift
PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
TPU_NAME=${TPU_NAME:-vit-jax}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v3-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-main}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-20}
BACKOFF=${BACKOFF:-120}
STOP_WAIT=${STOP_WAIT:-600}
LOG_WORKER=${LOG_WORKER:-0}
GCLOUD=${GCLOUD:-gcloud}
DRY_RUN=${DRY_RUN:-}
# words STRING: its words as a shell would split them (quoted values kept whole), one
# per line, by xargs (nothing in STRING is run); nothing for a blank STRING; status 1 on
# an unmatched quote.
words() {
  [[ -n ${1//[[:space:]]/} ]] || return 0
  printf '%s' "$1" | xargs -n1 printf '%s\n'
}
bad_quote() { echo "launch/tpu_vm.sh: $1: an unmatched quote in: $2" >&2; exit 2; }
list=$(words "${EXTRA_ARGS:-}") || bad_quote EXTRA_ARGS "$EXTRA_ARGS"
main_args=()
[[ -z $list ]] || while IFS= read -r arg; do main_args+=("$arg"); done <<<"$list"
ssh_args=()  # `ssh`'s command: the arguments after -- only (not EXTRA_ARGS)
list=$(words "${WORKER_ENV:-}") || bad_quote WORKER_ENV "$WORKER_ENV"
worker_env=()
[[ -z $list ]] || while IFS= read -r pair; do
  [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
    { echo "launch/tpu_vm.sh: WORKER_ENV: '$pair' is not NAME=value" >&2; exit 2; }
  worker_env+=("$pair")
done <<<"$list"
while (($#)); do
  case $1 in
    --project=*) PROJECT=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --name=*) TPU_NAME=${1#*=} ;;
    --type=*) ACCELERATOR_TYPE=${1#*=} ;;
    --version=*) RUNTIME_VERSION=${1#*=} ;;
    --spot) SPOT=1 ;;
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --repo=*) REPO_URL=${1#*=} ;;
    --ref=*) REPO_REF=${1#*=} ;;
    --max_attempts=*) MAX_ATTEMPTS=${1#*=} ;;
    --backoff=*) BACKOFF=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    --) shift; main_args+=("$@"); ssh_args=("$@"); break ;;
    *) echo "launch/tpu_vm.sh: unknown option $1 (vit_jax.main flags go after --)" >&2
       exit 2 ;;
  esac
  shift
done

die() { echo "launch/tpu_vm.sh: $*" >&2; exit 2; }
log() { echo "launch/tpu_vm.sh: $*" >&2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

# Only the commands that create a TPU VM need it (an unknown --type made `help`, `logs`,
# `stop` and `delete` fail).
case $cmd in create | up | attempt | resilient) needs_version=1 ;; *) needs_version= ;; esac
if [[ -z $RUNTIME_VERSION && -n $needs_version ]]; then
  case $ACCELERATOR_TYPE in
    v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime version for --type=$ACCELERATOR_TYPE; give --version" ;;
  esac
fi

# Paths on the workers: expanded there (by the remote shell), not here.
# shellcheck disable=SC2016
R_CODE='"$HOME/vit_jax"' R_VENV='"$HOME/vit_env"' R_LOG='"$HOME/vit_jax.log"' \
  R_PID='"$HOME/vit_jax.pid"' R_PYTHON='"$HOME/vit_env/bin/python"'

run_gcloud() {
  if [[ -n $DRY_RUN ]]; then
    printf '%q ' "$GCLOUD" "$@"
    echo
    return 0
  fi
  "$GCLOUD" "$@"
}

location() {
  [[ -n $ZONE ]] || die 'give --zone (or ZONE)'
  loc=(--zone="$ZONE")
  [[ -z $PROJECT ]] || loc+=(--project="$PROJECT")
}

tpu() { location; run_gcloud compute tpus tpu-vm "$1" "$TPU_NAME" "${loc[@]}" "${@:2}"; }
on_workers() { tpu ssh --worker="$1" --command="$2"; }  # on_workers all|0|... 'command'

need_run_flags() {
  [[ -n $CONFIG ]] || die 'give --config (or CONFIG)'
  [[ -n $WORKDIR ]] || die 'give --workdir (or WORKDIR): a gs:// path every worker can write'
  [[ $WORKDIR == gs://* ]] || log "warning: --workdir=$WORKDIR is not gs://; on a pod slice" \
    'every worker must write the same checkpoint directory'
}

main_command() {  # the vit_jax.main command line, for the remote shell
  if ((${#worker_env[@]})); then
    printf 'env'
    printf ' %q' "${worker_env[@]}"
    printf ' '
  fi
  printf '%s -u -m vit_jax.main --distributed' "$R_PYTHON"
  printf ' %q' --config="$CONFIG" --workdir="$WORKDIR" ${main_args[@]+"${main_args[@]}"}
}

do_create() {
  local extra=()
  [[ -z $SPOT ]] || extra+=(--spot)
  log "creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE"
  tpu create --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
}

do_setup() {
  if [[ -n $REPO_URL ]]; then
    log "cloning $REPO_URL ($REPO_REF) on every worker"
    on_workers all "rm -rf $R_CODE && git clone $(printf '%q' "$REPO_URL") $R_CODE && cd $R_CODE && git checkout $(printf '%q' "$REPO_REF")"
  else
    local tmp tarball
    tmp=$(mktemp -d)
    tarball=$tmp/vit_jax.tar.gz
    log "copying $repo to every worker"
    if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      # Tracked and untracked files, without what .gitignore names (venvs, outputs).
      (cd "$repo" && git ls-files -co --exclude-standard -z |
        while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
        tar --null -czf "$tarball" -T -)
    else
      tar -C "$repo" --exclude=.git -czf "$tarball" .
    fi
    location
    run_gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:vit_jax.tar.gz" --worker=all "${loc[@]}"
    rm -rf "$tmp"
    on_workers all "rm -rf $R_CODE && mkdir -p $R_CODE && tar -xzf \"\$HOME/vit_jax.tar.gz\" -C $R_CODE"
  fi
  log 'installing on every worker'
  on_workers all "${INSTALL_CMD:-set -e; export PATH=\"\$HOME/.local/bin:\$PATH\"; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; uv venv --python 3.11 --allow-existing $R_VENV; uv pip install --python $R_PYTHON -e \"\$HOME/vit_jax[tpu]\"}"
}

do_train() {
  need_run_flags
  log "starting on every worker: $(main_command)"
  on_workers all "if [ -f $R_PID ] && kill -0 \$(cat $R_PID) 2>/dev/null; then echo 'a run is going (launch/tpu_vm.sh stop first)' >&2; exit 1; fi; cd $R_CODE && echo \"=== launch/tpu_vm.sh train: \$(date -u +%FT%TZ) ===\" >>$R_LOG && (setsid nohup $(main_command) >>$R_LOG 2>&1 </dev/null & echo \$! >$R_PID)"
}

do_run() {  # the pid file lets `stop` end a run whose ssh connection was lost
  need_run_flags
  # The output goes to this terminal and is appended to the worker's log (bash: the
  # process substitution), and exec keeps the PID of the shell that wrote the pid file.
  # tee ignores the stop signals and a lost connection (-p): `stop` signals the run's
  # process group, which tee is in (sshd makes the shell a group leader), and vit_jax
  # would die of a broken pipe at its next line of output, before it had saved.
  local inner pid rc stop=''
  inner="cd $R_CODE && echo \"=== launch/tpu_vm.sh run: \$(date -u +%FT%TZ) ===\" >>$R_LOG && exec > >(trap '' INT TERM HUP; exec tee -p -a $R_LOG) 2>&1 && echo \$\$ >$R_PID && exec $(main_command)"
  # SIGTERM or Ctrl-C here (until_done.sh, the user): ending the local gcloud ssh would
  # leave the workers training, so every worker is told to save and stop (`stop`), and
  # this returns once they have (status 143).
  on_workers all "bash -c $(printf '%q' "$inner")" </dev/null &
  pid=$!
  trap 'stop=1' INT TERM
  while :; do
    rc=0
    wait "$pid" || rc=$?
    [[ -z $stop ]] || break
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - INT TERM
  if [[ -n $stop ]]; then
    log 'signal: every worker saves a checkpoint and stops'
    do_stop
    kill "$pid" 2>/dev/null || true
    exit 143
  fi
  rc=0
  wait "$pid" || rc=$?
  return "$rc"
}

do_stop() {
  # SIGTERM: vit_jax.main saves a checkpoint after its current step and exits; wait for
  # that (a new run must not start beside it), then SIGKILL what is left.
  # Only a vit_jax.main process: after a restart of the VM the PID may be another's.
  on_workers all "if [ -f $R_PID ] && ! ps -ww -o args= -p \$(cat $R_PID) 2>/dev/null | grep -q 'vit_jax[.]main'; then rm -f $R_PID; fi; if [ -f $R_PID ]; then p=\$(cat $R_PID); kill -- -\$p 2>/dev/null || kill \$p 2>/dev/null || true; i=0; while { kill -0 -- -\$p || kill -0 \$p; } 2>/dev/null && [ \$i -lt $STOP_WAIT ]; do sleep 1; i=\$((i + 1)); done; kill -9 -- -\$p 2>/dev/null || true; rm -f $R_PID; fi"
}

do_done() {
  [[ -n $WORKDIR ]] || die 'give --workdir (or WORKDIR)'
  on_workers 0 "cd $R_CODE && $R_PYTHON launch/run_status.py $(printf '%q' "$WORKDIR")"
}

tpu_state() {  # READY, CREATING, PREEMPTED, ...; empty when there is no such TPU
  location
  [[ -z $DRY_RUN ]] || { echo READY; return; }
  "$GCLOUD" compute tpus tpu-vm describe "$TPU_NAME" "${loc[@]}" --format='value(state)' \
    2>/dev/null || true
}

pinned_ref() {  # REPO_REF as a commit: every attempt of `resilient` runs the same code
  local lines sha
  if [[ $REPO_REF =~ ^[0-9a-f]{40}$ ]]; then echo "$REPO_REF"; return; fi
  if ! lines=$(GIT_TERMINAL_PROMPT=0 git ls-remote "$REPO_URL" "$REPO_REF" "$REPO_REF^{}" \
    2>/dev/null </dev/null) ||
    [[ -z $lines ]]; then
    # An abbreviated commit (no ref of that name): ls-remote lists refs, not commits.
    if [[ $REPO_REF =~ ^[0-9a-f]{7,39}$ ]]; then echo "$REPO_REF"; return; fi
    log "warning: could not resolve --ref=$REPO_REF of $REPO_URL here (git ls-remote);" \
      "every attempt clones $REPO_REF as it is then: give --ref=<commit> to pin the code"
    echo "$REPO_REF"; return
  fi
  # An annotated tag: its commit (the ^{} line); otherwise one ref must match.
  sha=$(awk '$2 ~ /\^\{\}$/ {print $1; exit}' <<<"$lines")
  if [[ -z $sha ]]; then
    [[ $(awk '{print $1}' <<<"$lines" | sort -u | wc -l) -eq 1 ]] ||
      die "--ref=$REPO_REF names several refs of $REPO_URL ($(awk '{print $2}' <<<"$lines" |
        paste -sd ' ')): give the full ref (refs/heads/..., refs/tags/...) or a commit"
    sha=$(awk '{print $1; exit}' <<<"$lines")
  fi
  log "--ref=$REPO_REF is commit $sha: every attempt runs it"
  echo "$sha"
}

do_attempt() {
  need_run_flags
  local state waited=0
  state=$(tpu_state)
  while [[ $state == CREATING || $state == STARTING || $state == RESTARTING ||
    $state == REPAIRING ]] && ((waited < 1800)); do
    sleep 30; waited=$((waited + 30)); state=$(tpu_state)
  done
  case $state in
    READY)  # set up again: this checkout's code (edits, configs), not what it last had;
      # a run left training by a lost connection is stopped (saved) first
      do_stop; do_setup ;;
    '')
      do_create; do_setup ;;
    *)
      log "$TPU_NAME is $state: deleting and creating it again"
      tpu delete --quiet; do_create; do_setup ;;
  esac
  do_stop
  do_run
}

case $cmd in
  create) do_create ;;
  setup) do_setup ;;
  train) do_train ;;
  logs) on_workers "$LOG_WORKER" "tail -n +1 -F $R_LOG" ;;
  status) log "state: $(tpu_state)"; do_done || true ;;
  done) do_done ;;
  stop) do_stop ;;
  delete) tpu delete --quiet ;;
  up) do_create; do_setup; do_train; on_workers "$LOG_WORKER" "tail -n +1 -F $R_LOG" ;;
  run) do_run ;;
  attempt) do_attempt ;;
  resilient)
    need_run_flags
    self=("$here/tpu_vm.sh")
    opts=(--zone="$ZONE" --name="$TPU_NAME" --type="$ACCELERATOR_TYPE"
      --version="$RUNTIME_VERSION" --config="$CONFIG" --workdir="$WORKDIR")
    [[ -z $PROJECT ]] || opts+=(--project="$PROJECT")
    [[ -z $SPOT ]] || opts+=(--spot)
    if [[ -n $REPO_URL ]]; then
      REPO_REF=$(pinned_ref)
      opts+=(--repo="$REPO_URL" --ref="$REPO_REF")
    fi
    if [[ -n $DRY_RUN ]]; then  # the done check would only be printed: show one attempt
      log "dry run: until_done.sh would repeat the attempt below (at most $MAX_ATTEMPTS" \
        "times) until \`tpu_vm.sh done\` reports the run done"
      do_attempt
      exit 0
    fi
    EXTRA_ARGS='' exec "$here/until_done.sh" --max_attempts="$MAX_ATTEMPTS" \
      --backoff="$BACKOFF" --workdir="$WORKDIR" \
      --done_cmd="$(printf '%q ' "${self[@]}" 'done' "${opts[@]}")" \
      -- "${self[@]}" attempt "${opts[@]}" -- ${main_args[@]+"${main_args[@]}"} ;;
  ssh) on_workers all "${ssh_args[*]}" ;;
  -h | --help | help) usage ;;
  *) usage >&2; die "unknown command $cmd" ;;
esac

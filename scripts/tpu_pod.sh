#!/usr/bin/env bash
# Cloud TPU pod-slice launcher for lvm: queued-resource slices (on-demand or spot), one process per worker
# started on all workers at once, logs that outlive the slice, and recovery after a preemption. See
# docs/multihost.md; `scripts/tpu_pod.sh help` lists the commands and settings.
# Commands on several workers need your key in ssh-agent first (`ssh-add ~/.ssh/google_compute_engine`).
set -euo pipefail
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) || {
  echo "tpu_pod.sh needs bash 4.4 or later (macOS: brew install bash)" >&2
  exit 2
}

TPU_NAME=${TPU_NAME:-lvm-pod}
STATE_DIR=${STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/lvm-tpu-pod}
# Settings `create` and `run` save per slice in STATE_DIR/TPU_NAME.env: `recover` and `watch` recreate the same
# slice and restart the same command. A variable set in the environment wins over its saved value.
SAVED=(QR_NAME ACCELERATOR ZONE RUNTIME PROJECT SPOT SERVICE_ACCOUNT CREATE_FLAGS SSH_FLAGS REMOTE_DIR REPO_URL
  REPO_BRANCH NFS_SHARE SHARED_DIR SETUP_CMD LOG_DIR)

load_settings() {
  local file=$STATE_DIR/$TPU_NAME.env key value
  [[ -f $file ]] || return 0
  SAVED_FROM=$file
  while IFS='=' read -r key value; do
    if [[ " ${SAVED[*]} " == *" $key "* && ! -v $key ]]; then
      printf -v "$key" '%s' "$value"
    fi
  done <"$file"
}
SAVED_FROM=''
load_settings

QR_NAME=${QR_NAME:-$TPU_NAME}    # the queued resource; the slice (node) is TPU_NAME
ACCELERATOR=${ACCELERATOR:-v4-256}
ZONE=${ZONE:-}                   # default: from ACCELERATOR
RUNTIME=${RUNTIME:-}             # default: from ACCELERATOR
PROJECT=${PROJECT:-}
SPOT=${SPOT:-}                   # 1: spot slice (`create --spot`)
SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-}  # the workers' account (needs roles/storage.objectAdmin on the bucket)
CREATE_FLAGS=${CREATE_FLAGS:-}   # extra `queued-resources create` flags, e.g. "--network=NET --subnetwork=SUB"
SSH_FLAGS=${SSH_FLAGS:-}         # extra `tpu-vm ssh/scp` flags, e.g. "--internal-ip" or "--tunnel-through-iap"
REMOTE_DIR=${REMOTE_DIR:-lvm}    # checkout on every worker, relative to the home folder
REPO_URL=${REPO_URL:-}           # `copy` clones this (branch REPO_BRANCH) instead of copying the local tree
REPO_BRANCH=${REPO_BRANCH:-main}
NFS_SHARE=${NFS_SHARE:-}         # SERVER:/share that `setup` mounts on every worker
SHARED_DIR=${SHARED_DIR:-/mnt/shared}
SETUP_CMD=${SETUP_CMD:-}         # replaces the install step of `setup` (run in REMOTE_DIR on every worker)
LOG_DIR=${LOG_DIR:-}             # where `run` puts each host's log; default WORKDIR/logs (gs:// or shared)
LOG_UPLOAD_SECONDS=${LOG_UPLOAD_SECONDS:-60}  # how often a host copies its log to a gs:// LOG_DIR
POLL_SECONDS=${POLL_SECONDS:-30}              # how often `create`, `wait`, `delete`, `watch` ask for the state
ACTIVE_TIMEOUT=${ACTIVE_TIMEOUT:-43200}       # seconds `create`/`wait` wait for ACTIVE (the request stays)
STOP_GRACE=${STOP_GRACE:-900}                 # seconds `stop` gives the run to finish its step and save
MAX_RESTARTS=${MAX_RESTARTS:-3}               # `watch`: restarts of a run that failed on a healthy slice
MAX_FAILURES=${MAX_FAILURES:-10}              # `watch`: failed checks or recoveries in a row before giving up
ZONE_CHECK=${ZONE_CHECK:-1}                   # 0: accept a zone this script does not list for the accelerator
LIBTPU_LOCKFILE=${LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}

# shellcheck disable=SC2016  # expands on the workers
DEFAULT_SETUP='export PATH=$HOME/.local/bin:$PATH; command -v uv >/dev/null ||
  python3 -m pip install --user -q uv || curl -LsSf https://astral.sh/uv/install.sh | sh;
  [ -x .venv/bin/python ] || uv venv --seed --python 3.11 .venv;
  .venv/bin/pip install -q -c requirements.lock -e ".[tpu]";
  .venv/bin/python -c "import jax, libtpu; print(\"jax\", jax.__version__, \"+ libtpu ready\")"'

usage() {
  cat <<EOF
usage: scripts/tpu_pod.sh COMMAND [ARGS]

  create [--spot]   request the slice TPU_NAME (ACCELERATOR, RUNTIME, ZONE) as queued resource QR_NAME and
                    wait until it is ACTIVE; --spot (or SPOT=1) for a spot slice
  wait              wait until the queued resource is ACTIVE (fails on FAILED or SUSPENDED)
  status            states of the queued resource, the slice and the run on worker 0
  copy              put this repository on every worker (tracked + untracked, not ignored, files),
                    or clone REPO_URL there when it is set
  setup             Python 3.11 venv (via uv) + pip install -e '.[tpu]' (jax pinned by requirements.lock)
                    on every worker; mounts NFS_SHARE at SHARED_DIR when set
  clean             kill every process holding the TPU on every worker, remove the libtpu lock file
  run CMD [ARGS]    clean, then start CMD in REMOTE_DIR's venv on every worker, in the background; each host's
                    log goes to LOG_DIR (default WORKDIR/logs, gs:// or shared, so it outlives the slice)
                    e.g. run lvm curriculum --config lwm_text --workdir gs://BUCKET/runs/lwm_text --distributed
  logs [WORKER]     follow the log on worker WORKER (default 0; "all" for every worker)
  stop [--grace S]  SIGTERM to the run on every worker (the trainer saves a checkpoint and exits 143),
                    SIGKILL after S seconds (default STOP_GRACE)
  recover [--force] [CMD [ARGS]]
                    if the slice is preempted or gone (queued resource SUSPENDED or FAILED, slice missing):
                    delete what is left, recreate it, copy, setup and run the last command again (or CMD);
                    the run resumes from its newest checkpoint. --force: recreate a healthy slice too
  watch             every POLL_SECONDS: recover a preempted slice, restart a run that died on a healthy
                    slice (at most MAX_RESTARTS times); return when the run ends, is stopped, or the slice
                    is deleted (by the delete command)
  ssh [WORKER]      interactive shell on worker WORKER (default 0)
  delete            delete the queued resource and its slice

settings (environment; create and run save them in STATE_DIR/TPU_NAME.env for recover and watch):
  TPU_NAME=$TPU_NAME QR_NAME=$QR_NAME ACCELERATOR=$ACCELERATOR ZONE=${ZONE:-<from ACCELERATOR>}
  RUNTIME=${RUNTIME:-<from ACCELERATOR>} PROJECT=${PROJECT:-<gcloud default>} SPOT=$SPOT
  SERVICE_ACCOUNT=$SERVICE_ACCOUNT CREATE_FLAGS=$CREATE_FLAGS SSH_FLAGS=$SSH_FLAGS
  REMOTE_DIR=$REMOTE_DIR REPO_URL=$REPO_URL REPO_BRANCH=$REPO_BRANCH NFS_SHARE=$NFS_SHARE SHARED_DIR=$SHARED_DIR
  LOG_DIR=${LOG_DIR:-<WORKDIR/logs>} LOG_UPLOAD_SECONDS=$LOG_UPLOAD_SECONDS POLL_SECONDS=$POLL_SECONDS
  ACTIVE_TIMEOUT=$ACTIVE_TIMEOUT STOP_GRACE=$STOP_GRACE MAX_RESTARTS=$MAX_RESTARTS MAX_FAILURES=$MAX_FAILURES
  ZONE_CHECK=$ZONE_CHECK STATE_DIR=$STATE_DIR LIBTPU_LOCKFILE=$LIBTPU_LOCKFILE
  LIBTPU_INIT_ARGS (XLA flags for libtpu), when set here, is passed to the run.

accelerators (runtime; zones, the first is the default):
  v4-N         tpu-ubuntu2204-base;  us-central2-b
  v5litepod-N  v2-alpha-tpuv5-lite;  us-west4-a us-central1-a us-south1-a us-west1-c  (v5e-N: v5litepod-N)
  v5p-N        v2-alpha-tpuv5;       us-east5-a us-central1-a
  v6e-N        v2-alpha-tpuv6e;      us-east1-d us-central1-b us-east5-a us-east5-b europe-west4-a
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

resolve_accelerator() {  # check ACCELERATOR, fill in RUNTIME and ZONE, refuse combinations it does not know
  [[ $ACCELERATOR =~ ^(v4|v5litepod|v5e|v5p|v6e)-([0-9]+)$ ]] ||
    die "unknown accelerator type '$ACCELERATOR': this script knows v4-N, v5litepod-N (v5e), v5p-N and v6e-N"
  local family=${BASH_REMATCH[1]} size=${BASH_REMATCH[2]} runtime zones
  if [[ $family == v5e ]]; then
    family=v5litepod
    ACCELERATOR=v5litepod-$size
    echo "tpu_pod.sh: v5e-$size is called $ACCELERATOR in Cloud TPU" >&2
  fi
  case $family in
    v4) runtime=tpu-ubuntu2204-base zones="us-central2-b" ;;
    v5litepod) runtime=v2-alpha-tpuv5-lite zones="us-west4-a us-central1-a us-south1-a us-west1-c" ;;
    v5p) runtime=v2-alpha-tpuv5 zones="us-east5-a us-central1-a" ;;
    v6e) runtime=v2-alpha-tpuv6e zones="us-east1-d us-central1-b us-east5-a us-east5-b europe-west4-a" ;;
  esac
  case ${RUNTIME:-$runtime} in  # each generation has its own runtime
    tpu-ubuntu2204-base | v2-alpha-tpuv5-lite | v2-alpha-tpuv5 | v2-alpha-tpuv6e)
      [[ ${RUNTIME:-$runtime} == "$runtime" ]] ||
        die "runtime $RUNTIME does not fit $ACCELERATOR; its runtime is $runtime (unset RUNTIME to use it)" \
          "${SAVED_FROM:+(settings saved in $SAVED_FROM)}"
      ;;
  esac
  RUNTIME=${RUNTIME:-$runtime}
  ZONE=${ZONE:-${zones%% *}}
  if [[ $ZONE_CHECK != 0 && " $zones " != *" $ZONE "* ]]; then
    die "$family slices are offered in $zones, not in $ZONE (Cloud TPU's regions and zones page);" \
      "set ZONE_CHECK=0 if Google has added $ZONE since${SAVED_FROM:+ (settings saved in $SAVED_FROM)}"
  fi
}

save_settings() {
  mkdir -p "$STATE_DIR"
  local key
  for key in "${SAVED[@]}"; do
    if [[ -n ${!key} ]]; then printf '%s=%s\n' "$key" "${!key}"; fi
  done >"$STATE_DIR/$TPU_NAME.env"
}

spot() { [[ -n $SPOT && $SPOT != 0 ]]; }

tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... with the zone and project
  local sub=$1
  shift
  gcloud compute tpus tpu-vm "$sub" "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

qr() {  # gcloud compute tpus queued-resources SUBCOMMAND ... with the zone and project
  local sub=$1
  shift
  gcloud compute tpus queued-resources "$sub" "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

on_workers() {  # on_workers WORKERS COMMAND: run COMMAND on the given workers concurrently (none: a shell)
  # shellcheck disable=SC2086  # SSH_FLAGS holds several words on purpose
  tpu ssh "$TPU_NAME" --worker="$1" ${2:+--command="$2"} $SSH_FLAGS
}

remote() {  # remote PREFIX FUNCTION ARGS...: a command line that defines FUNCTION on a worker, then runs
  # `PREFIX FUNCTION ARGS` there (PREFIX: shell words such as "cd DIR &&"), each argument quoted
  local prefix=$1
  shift
  printf '%s\n%s %s' "$(declare -f "$1")" "$prefix" "$(printf '%q ' "$@")"
}

describe_state() {  # describe_state KIND NAME FORMAT: the state; MISSING when it does not exist, else ERROR
  local out
  if out=$("$1" describe "$2" --format="$3" 2>"$WORK/err"); then
    echo "${out:-UNKNOWN}"
  elif grep -qiE 'not[_ ]?found' "$WORK/err"; then
    echo MISSING
  else
    cat "$WORK/err" >&2
    echo ERROR
  fi
}

qr_state() { describe_state qr "$QR_NAME" 'value(state.state)'; }
node_state() { describe_state tpu "$TPU_NAME" 'value(state)'; }

wait_active() {
  local state last='' start=$SECONDS
  while :; do
    state=$(qr_state)
    [[ $state == "$last" ]] || echo "queued resource $QR_NAME: $state"
    last=$state
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED)
        die "queued resource $QR_NAME is $state (see: gcloud compute tpus queued-resources describe $QR_NAME" \
          "--zone=$ZONE); \`recover\` recreates it, \`delete\` removes it"
        ;;
      MISSING) die "queued resource $QR_NAME does not exist (\`create\` requests it)" ;;
      ERROR) die "could not read the state of queued resource $QR_NAME" ;;
    esac
    if ((SECONDS - start >= ACTIVE_TIMEOUT)); then
      die "queued resource $QR_NAME is still $state after ${ACTIVE_TIMEOUT}s; it stays queued:" \
        "\`wait\` waits again, \`delete\` gives it up"
    fi
    sleep "$POLL_SECONDS"
  done
}

cmd_create() {
  while (($# > 0)); do
    case $1 in
      --spot) SPOT=1 ;;
      *) die "create takes --spot, not '$1' (other flags go in CREATE_FLAGS)" ;;
    esac
    shift
  done
  [[ " $CREATE_FLAGS " != *" --preemptible "* ]] ||
    die "--preemptible is legacy (slices end after 24 hours); use --spot"
  save_settings
  rm -f "$STATE_DIR/$TPU_NAME.deleted"
  local flags=(--node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME")
  if spot; then flags+=(--spot); fi
  if [[ -n $SERVICE_ACCOUNT ]]; then
    flags+=(--service-account="$SERVICE_ACCOUNT" --scopes=https://www.googleapis.com/auth/cloud-platform)
  fi
  # shellcheck disable=SC2206  # CREATE_FLAGS holds several words on purpose
  flags+=($CREATE_FLAGS)
  qr create "$QR_NAME" "${flags[@]}" || die "could not request queued resource $QR_NAME"
  wait_active
}

cmd_delete() {  # the queued resource (with its slice), or a slice made without one; returns once both are gone
  local state start=$SECONDS
  state=$(qr_state)
  if [[ $state == ERROR ]]; then die "could not read the state of queued resource $QR_NAME"; fi
  if [[ $state != MISSING ]]; then
    qr delete "$QR_NAME" --force --quiet || die "could not delete queued resource $QR_NAME"
    while [[ $(qr_state) != MISSING ]]; do
      ((SECONDS - start < ACTIVE_TIMEOUT)) || die "$QR_NAME is still there after ${ACTIVE_TIMEOUT}s"
      sleep "$POLL_SECONDS"
    done
  fi
  state=$(node_state)
  case $state in
    MISSING) ;;
    ERROR) die "could not read the state of slice $TPU_NAME" ;;
    *) tpu delete "$TPU_NAME" --quiet || die "could not delete slice $TPU_NAME" ;;
  esac
  echo "deleted $QR_NAME / $TPU_NAME"
}

cmd_copy() {
  if [[ -n $REPO_URL ]]; then
    on_workers all "if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR pull --ff-only; \
      else git clone --branch $REPO_BRANCH $REPO_URL $REMOTE_DIR; fi"
    return
  fi
  local repo tarball=$WORK/lvm-src.tar.gz
  repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
  git -C "$repo" ls-files -z --cached --others --exclude-standard |
    tar -C "$repo" --null --ignore-failed-read -T - -czf "$tarball"
  # shellcheck disable=SC2086  # SSH_FLAGS holds several words on purpose
  tpu scp "$tarball" "$TPU_NAME:lvm-src.tar.gz" --worker=all $SSH_FLAGS
  on_workers all "mkdir -p $REMOTE_DIR && tar -xzf lvm-src.tar.gz -C $REMOTE_DIR && rm lvm-src.tar.gz"
}

cmd_setup() {
  local mount=true
  if [[ -n $NFS_SHARE ]]; then
    mount="sudo apt-get -qq update && sudo apt-get -qq install -y nfs-common && sudo mkdir -p $SHARED_DIR \
      && (mountpoint -q $SHARED_DIR || sudo mount -t nfs $NFS_SHARE $SHARED_DIR) \
      && sudo mkdir -p $SHARED_DIR/runs && sudo chown \$(id -u):\$(id -g) $SHARED_DIR/runs"
  fi
  on_workers all "set -e; $mount; \
    command -v lsof >/dev/null || { sudo apt-get -qq update && sudo apt-get -qq install -y lsof; }; \
    cd $REMOTE_DIR; ${SETUP_CMD:-$DEFAULT_SETUP}"
}

# The functions named worker_* run on the workers (`remote` ships them), in REMOTE_DIR.

worker_clean() {  # kill what holds the TPU (/dev/accel* on v4, /dev/vfio/* on v5+), remove libtpu's lock
  local lockfile=$1 holders _
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    # shellcheck disable=SC2086  # the globs expand on the worker
    holders=$(sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | tr '\n' ' ')
    [[ -n ${holders// /} ]] || break
    echo "$(hostname): killing TPU holders $holders"
    # shellcheck disable=SC2086  # one pid a word
    sudo kill -9 $holders 2>/dev/null || true
    sleep 1
  done
  sudo rm -f "$lockfile"
}

worker_start() {  # start "$@" detached from the ssh session; lvm.pid, then lvm.exit (its exit status)
  local dest=$1 stamp=$2 every=$3 host log
  shift 3
  host=$(hostname)
  mkdir -p logs
  log=logs/host-$host-$stamp.log
  if [[ -n $dest && $dest != gs://* ]]; then
    mkdir -p "$dest" && log=$dest/host-$host-$stamp.log
  fi
  rm -f lvm.pid lvm.wrapper lvm.exit lvm.exit.tmp lvm.stopped
  ln -sfn "$log" lvm.log
  echo "== $(date -u '+%F %T') UTC on $host: $*" >>"$log"
  (
    trap '' HUP
    echo "$BASHPID" >lvm.wrapper
    upload() { timeout 600 gcloud storage cp "$log" "$dest/host-$host-$stamp.log" || true; }
    setsid "$@" >>"$log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >lvm.pid
    if [[ $dest == gs://* ]]; then  # a copy every EVERY seconds while the run lasts
      while sleep "$every" && kill -0 "$pid" 2>/dev/null; do upload; done &
      uploader=$!
    fi
    wait "$pid"
    status=$?
    echo "== $(date -u '+%F %T') UTC: exit status $status" >>"$log"
    echo "$status" >lvm.exit.tmp
    if [[ $dest == gs://* ]]; then  # the last copy, after the periodic ones (none may overwrite it)
      wait "$uploader"
      upload
    fi
    mv lvm.exit.tmp lvm.exit  # last: once a run is reported finished, its log is up
  ) >/dev/null 2>&1 </dev/null &
  local _
  for _ in $(seq 100); do
    [[ -s lvm.pid ]] && break
    sleep 0.1
  done
  echo "$host: started pid $(cat lvm.pid), log $log${dest:+ -> $dest}"
}

worker_stop() {  # SIGTERM the run; SIGKILL its process group if it is still there after GRACE seconds
  local grace=$1 pid ticks=0
  touch lvm.stopped
  pid=$(cat lvm.pid 2>/dev/null) || pid=''
  if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then
    echo "$(hostname): no run"
    return 0
  fi
  kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null; do
    if ((ticks >= grace * 5)); then
      echo "$(hostname): still running ${grace}s after SIGTERM: SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"
      return 0
    fi
    sleep 0.2
    ticks=$((ticks + 1))
  done
  echo "$(hostname): stopped"
}

worker_state() {  # "running PID", "exited STATUS [stopped]", "lost" (gone without a status) or "none"
  if [[ -f lvm.exit ]]; then
    echo "exited $(cat lvm.exit)$([[ -f lvm.stopped ]] && echo ' stopped')"
  elif [[ -f lvm.pid ]] && kill -0 "$(cat lvm.pid)" 2>/dev/null; then
    echo "running $(cat lvm.pid)"
  elif [[ -f lvm.exit.tmp ]] && kill -0 "$(cat lvm.wrapper)" 2>/dev/null; then
    echo "running $(cat lvm.pid) (exited $(cat lvm.exit.tmp), copying its log up)"
  elif [[ -f lvm.pid ]]; then
    echo lost
  else
    echo none
  fi
}

workdir_of() {  # the value of --workdir in a command line
  while (($# > 0)); do
    case $1 in
      --workdir=*) echo "${1#--workdir=}" && return ;;
      --workdir) echo "${2:-}" && return ;;
    esac
    shift
  done
}

cmd_clean() {
  on_workers all "$(remote '' worker_clean "$LIBTPU_LOCKFILE")" ||
    die "could not clear the TPU on every worker"
}

cmd_run() {
  (($# > 0)) || die "run needs a command, e.g. run lvm curriculum --config lwm_text --workdir DIR --distributed"
  local cmd=("$@") dest stamp
  if [[ -n ${LIBTPU_INIT_ARGS:-} && $1 != env ]]; then
    cmd=(env "LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS" "${cmd[@]}")
  fi
  dest=${LOG_DIR:-$(workdir_of "${cmd[@]}")}
  if [[ -n $dest && -z $LOG_DIR ]]; then dest=${dest%/}/logs; fi
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  local state
  state=$(run_state)
  [[ $state != running* ]] || die "worker 0 is still running (${state#running }): \`stop\` it first"
  save_settings
  printf '%s\0' "${cmd[@]}" >"$STATE_DIR/$TPU_NAME.cmd"
  cmd_clean
  on_workers all "$(remote "cd $REMOTE_DIR && . .venv/bin/activate &&" worker_start \
    "$dest" "$stamp" "$LOG_UPLOAD_SECONDS" "${cmd[@]}")" ||
    die "could not start the run on every worker (did \`setup\` run?)"
  echo "started on every worker; follow with: scripts/tpu_pod.sh logs [WORKER|all]"
}

load_command() {  # COMMAND=(the command `run` started last)
  [[ -s $STATE_DIR/$TPU_NAME.cmd ]] || die "no command recorded for $TPU_NAME: pass one (recover CMD [ARGS])"
  mapfile -d '' -t COMMAND <"$STATE_DIR/$TPU_NAME.cmd"
}

run_state() {  # the run's state on worker 0 (see worker_state), ERROR when ssh fails
  local out
  out=$(on_workers 0 "$(remote "cd $REMOTE_DIR 2>/dev/null &&" worker_state)") || {
    echo ERROR
    return
  }
  echo "${out##*$'\n'}"
}

slice_verdict() {  # slice_verdict QR_STATE NODE_STATE: healthy, recreate, creating or wait
  case $1/$2 in
    ERROR/* | */ERROR) echo wait ;;
    ACTIVE/READY | MISSING/READY) echo healthy ;;
    SUSPENDING/* | SUSPENDED/* | FAILED/* | MISSING/* | ACTIVE/MISSING) echo recreate ;;
    */PREEMPTED | */TERMINATED) echo recreate ;;
    WAITING_FOR_RESOURCES/* | PROVISIONING/* | ACCEPTED/* | CREATING/*) echo creating ;;
    *) echo wait ;;
  esac
}

cmd_recover() {
  local force='' qr_now node_now
  while (($# > 0)); do
    case $1 in
      --force) force=1 ;;
      --spot) SPOT=1 ;;
      *) break ;;
    esac
    shift
  done
  if (($# > 0)); then COMMAND=("$@"); else load_command; fi
  qr_now=$(qr_state)
  node_now=$(node_state)
  case $(slice_verdict "$qr_now" "$node_now")${force:+-forced} in
    healthy)
      echo "queued resource $QR_NAME is $qr_now, slice $TPU_NAME is $node_now: nothing to recover" \
        "(--force recreates it anyway)"
      return 0
      ;;
    wait)
      echo "queued resource $QR_NAME is $qr_now, slice $TPU_NAME is $node_now: not recovering now" >&2
      return 3
      ;;
    creating)
      echo "queued resource $QR_NAME is $qr_now: waiting for it"
      wait_active
      ;;
    *)
      echo "queued resource $QR_NAME is $qr_now, slice $TPU_NAME is $node_now: recreating"
      cmd_delete
      cmd_create
      ;;
  esac
  cmd_copy
  cmd_setup
  cmd_run "${COMMAND[@]}"
}

again() {  # this script as a new process: a failure ends that process, not `watch`
  "$BASH" "$0" "$@"
}

cmd_watch() {
  local failures=0 restarts=0 qr_now node_now state
  load_command
  while :; do
    if [[ -f $STATE_DIR/$TPU_NAME.deleted ]]; then
      echo "slice $TPU_NAME was deleted with \`delete\`: not recovering it" && return 0
    fi
    qr_now=$(qr_state)
    node_now=$(node_state)
    case $(slice_verdict "$qr_now" "$node_now") in
      healthy)
        state=$(run_state)
        if [[ $state == lost ]]; then  # the status may be on its way: look again before acting
          sleep "$POLL_SECONDS"
          state=$(run_state)
        fi
        case $state in
          running*) failures=0 ;;
          "exited 0") echo "the run finished" && return 0 ;;
          exited*stopped)
            state=${state% stopped}
            echo "the run was stopped ($state)" && return "${state#exited }"
            ;;
          exited* | lost | none)
            if ((restarts >= MAX_RESTARTS)); then
              echo "the run ended ($state) after $restarts restarts: giving up (logs: LOG_DIR)" >&2
              return 1
            fi
            restarts=$((restarts + 1))
            echo "the run ended on a healthy slice ($state): restart $restarts of $MAX_RESTARTS"
            if ! again run "${COMMAND[@]}"; then failures=$((failures + 1)); fi
            ;;
          *) failures=$((failures + 1)) ;;
        esac
        ;;
      recreate | creating)
        if again recover; then failures=0; else failures=$((failures + 1)); fi
        ;;
      *)
        echo "queued resource $QR_NAME is $qr_now, slice $TPU_NAME is $node_now: waiting"
        failures=$((failures + 1))
        ;;
    esac
    if ((failures >= MAX_FAILURES)); then
      echo "$failures checks or recoveries in a row failed: giving up" >&2
      return 1
    fi
    sleep "$POLL_SECONDS"
  done
}

cmd_status() {
  local qr_now node_now
  qr_now=$(qr_state)
  node_now=$(node_state)
  echo "queued resource $QR_NAME: $qr_now"
  echo "slice $TPU_NAME: $node_now ($ACCELERATOR, $RUNTIME, $ZONE$(spot && echo ', spot'))"
  if [[ $(slice_verdict "$qr_now" "$node_now") == healthy ]]; then echo "run on worker 0: $(run_state)"; fi
}

cmd_logs() {
  on_workers "${1:-0}" "tail -n 200 -F $REMOTE_DIR/lvm.log"
}

cmd_stop() {
  local grace=$STOP_GRACE
  if [[ ${1:-} == --grace ]]; then grace=${2:?stop --grace needs seconds}; fi
  on_workers all "$(remote "cd $REMOTE_DIR &&" worker_stop "$grace")"
}

main() {
  local command=${1:-help}
  if (($# > 0)); then shift; fi
  case $command in
    help | -h | --help)
      usage
      return
      ;;
  esac
  resolve_accelerator
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  case $command in
    create) cmd_create "$@" ;;
    wait) wait_active ;;
    status) cmd_status ;;
    copy) cmd_copy ;;
    setup) cmd_setup ;;
    clean) cmd_clean ;;
    run) cmd_run "$@" ;;
    logs) cmd_logs "$@" ;;
    stop) cmd_stop "$@" ;;
    recover) cmd_recover "$@" ;;
    watch) cmd_watch ;;
    ssh) on_workers "${1:-0}" '' ;;
    delete)
      cmd_delete
      mkdir -p "$STATE_DIR" && touch "$STATE_DIR/$TPU_NAME.deleted"  # tells `watch` to leave it deleted
      ;;
    *)
      usage >&2
      die "unknown command: $command"
      ;;
  esac
}

main "$@"

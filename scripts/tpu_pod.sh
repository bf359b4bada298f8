#!/usr/bin/env bash
# Cloud TPU VM pod-slice launcher for lvm: one process per worker, started on all workers at once.
# See docs/multihost.md. Every step is a `gcloud compute tpus tpu-vm` call; run `scripts/tpu_pod.sh help`.
# Commands on several workers need your key in ssh-agent first (`ssh-add ~/.ssh/google_compute_engine`).
set -euo pipefail

TPU_NAME=${TPU_NAME:-lvm-pod}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-256}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
CREATE_FLAGS=${CREATE_FLAGS:-}   # extra `create` flags, e.g. "--spot" or "--preemptible"
REMOTE_DIR=${REMOTE_DIR:-lvm}    # checkout on every worker, relative to the home folder
REPO_URL=${REPO_URL:-}           # `copy` clones this (branch REPO_BRANCH) instead of copying the local tree
REPO_BRANCH=${REPO_BRANCH:-main}
NFS_SHARE=${NFS_SHARE:-}         # SERVER:/share that `setup` mounts on every worker (the shared workdir)
SHARED_DIR=${SHARED_DIR:-/mnt/shared}
LOG=${LOG:-lvm.log}              # `run` writes each worker's output to REMOTE_DIR/LOG

usage() {
  cat <<EOF
usage: scripts/tpu_pod.sh COMMAND [ARGS]

  create            create the pod slice TPU_NAME (ACCELERATOR, RUNTIME) in ZONE
  copy              put this repository on every worker (tracked + untracked, not ignored, files),
                    or clone REPO_URL there when it is set
  setup             Python 3.11 venv (via uv) + pip install -e '.[tpu]' (jax pinned by requirements.lock)
                    on every worker; mounts NFS_SHARE at SHARED_DIR when set
  run CMD [ARGS]    start CMD in REMOTE_DIR's venv on every worker, in the background (nohup), output to LOG;
                    e.g. run lvm curriculum --config lwm_text --workdir $SHARED_DIR/runs/lwm_text --distributed
  logs [WORKER]     follow LOG on worker WORKER (default 0; "all" for every worker)
  stop              send SIGTERM to the run on every worker (the trainer saves a checkpoint and exits 143)
  ssh [WORKER]      interactive shell on worker WORKER (default 0)
  delete            delete the pod slice

environment (current value):
  TPU_NAME=$TPU_NAME ZONE=$ZONE ACCELERATOR=$ACCELERATOR RUNTIME=$RUNTIME PROJECT=${PROJECT:-<gcloud default>}
  CREATE_FLAGS=$CREATE_FLAGS REMOTE_DIR=$REMOTE_DIR REPO_URL=$REPO_URL REPO_BRANCH=$REPO_BRANCH
  NFS_SHARE=$NFS_SHARE SHARED_DIR=$SHARED_DIR LOG=$LOG
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... with the zone and project
  local sub=$1
  shift
  gcloud compute tpus tpu-vm "$sub" "$@" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"}
}

on_workers() {  # on_workers WORKERS COMMAND: run a shell command on the given workers concurrently
  tpu ssh "$TPU_NAME" --worker="$1" --command="$2"
}

cmd_create() {
  # shellcheck disable=SC2086  # CREATE_FLAGS holds several words on purpose
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" $CREATE_FLAGS
}

cmd_copy() {
  if [[ -n $REPO_URL ]]; then
    on_workers all "if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR pull --ff-only; \
      else git clone --branch $REPO_BRANCH $REPO_URL $REMOTE_DIR; fi"
    return
  fi
  local repo
  repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
  TARBALL=$(mktemp --suffix=.tar.gz)
  trap 'rm -f "$TARBALL"' EXIT
  git -C "$repo" ls-files -z --cached --others --exclude-standard |
    tar -C "$repo" --null --ignore-failed-read -T - -czf "$TARBALL"
  tpu scp "$TARBALL" "$TPU_NAME:lvm-src.tar.gz" --worker=all
  on_workers all "mkdir -p $REMOTE_DIR && tar -xzf lvm-src.tar.gz -C $REMOTE_DIR && rm lvm-src.tar.gz"
}

cmd_setup() {
  local mount=true
  if [[ -n $NFS_SHARE ]]; then
    mount="sudo apt-get -qq update && sudo apt-get -qq install -y nfs-common && sudo mkdir -p $SHARED_DIR \
      && (mountpoint -q $SHARED_DIR || sudo mount -t nfs $NFS_SHARE $SHARED_DIR) \
      && sudo mkdir -p $SHARED_DIR/runs && sudo chown \$(id -u):\$(id -g) $SHARED_DIR/runs"
  fi
  on_workers all "set -e; $mount; export PATH=\$HOME/.local/bin:\$PATH; cd $REMOTE_DIR; \
    command -v uv >/dev/null || python3 -m pip install --user -q uv || curl -LsSf https://astral.sh/uv/install.sh | sh; \
    [ -x .venv/bin/python ] || uv venv --seed --python 3.11 .venv; \
    .venv/bin/pip install -q -c requirements.lock -e '.[tpu]'; \
    .venv/bin/python -c 'import jax, libtpu; print(\"jax\", jax.__version__, \"+ libtpu ready\")'"
}

cmd_run() {
  (($# > 0)) || die "run needs a command, e.g. run lvm curriculum --config lwm_text --workdir DIR --distributed"
  local quoted
  quoted=$(printf '%q ' "$@")
  on_workers all "cd $REMOTE_DIR && . .venv/bin/activate && \
    { nohup $quoted > $LOG 2>&1 < /dev/null & echo \$! > lvm.pid; }"
  echo "started on every worker; follow with: scripts/tpu_pod.sh logs [WORKER|all]"
}

cmd_logs() {
  on_workers "${1:-0}" "tail -n 200 -F $REMOTE_DIR/$LOG"
}

cmd_stop() {
  on_workers all "kill -TERM \$(cat $REMOTE_DIR/lvm.pid)"
}

main() {
  local command=${1:-help}
  if (($# > 0)); then shift; fi
  case $command in
    create) cmd_create ;;
    copy) cmd_copy ;;
    setup) cmd_setup ;;
    run) cmd_run "$@" ;;
    logs) cmd_logs "$@" ;;
    stop) cmd_stop ;;
    ssh) tpu ssh "$TPU_NAME" --worker="${1:-0}" ;;
    delete) tpu delete "$TPU_NAME" --quiet ;;
    help | -h | --help) usage ;;
    *)
      usage >&2
      die "unknown command: $command"
      ;;
  esac
}

main "$@"

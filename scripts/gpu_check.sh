#!/usr/bin/env bash
# One-GPU check in at most 6 minutes, on a machine with one NVIDIA H100 or H200: bf16 matmul FLOP/s; attention
# fwd+bwd of cuDNN and of ours (kernel "fused" and kernel "xla") at 8K/32K/128K, causal and full; a training step
# of the 1B model at 32K tokens (tokens/s, MFU); the longest context the 1B model trains at; the issue's targets.
# Writes docs/bench/<card>/gpu_check.json and gpu_check.md (card from the GPU: h100, h200, ...) after every
# measurement, so a run stopped by the time limit keeps what it measured.
#
# Needs only Python with jax (CUDA), flax, optax, orbax-checkpoint, sentencepiece, einops, numpy; no network, no
# install: the package runs from this checkout (PYTHONPATH).
#
#   scripts/gpu_check.sh                              # the real check, ~5.5 minutes
#   scripts/gpu_check.sh --smoke --out /tmp/gpu-smoke # every code path with tiny shapes (any machine, ~1 minute)
#   scripts/gpu_check.sh --sections max_context --budget max_context=500 --deadline 560   # a longer search alone
#                                                     # (then also set GPU_CHECK_LIMIT_S=590)
# Other arguments go to `python -m lvm.bench.gpu` (--help lists them). PYTHON picks the interpreter (python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
# Hard wall-clock limit: the Python side stops starting new work at its own deadline (330 s from its start);
# SIGTERM at LIMIT_S, SIGKILL 10 s later, so the whole command ends within 6 minutes.
LIMIT_S="${GPU_CHECK_LIMIT_S:-345}"

# Let XLA's allocator take 92% of the GPU up front: its limit (memory_stats()["bytes_limit"]) is what the
# max-context search fits the training step into; the rest is left to the CUDA context, cuDNN and cuBLAS.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-true}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

rc=0
timeout --signal=TERM --kill-after=10 "$LIMIT_S" "$PYTHON" -m lvm.bench.gpu "$@" || rc=$?
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
  echo "gpu_check: stopped at the ${LIMIT_S} s limit; docs/bench/<card>/gpu_check.{json,md} hold what was measured" >&2
fi
exit "$rc"

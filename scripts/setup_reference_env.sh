#!/usr/bin/env bash
# Create (or refresh) .venv-ref: a separate environment holding the public reference ring attention
# (PyPI ringattention 0.1.2) on the same jax as this project, for `lvm bench attention --reference`.
# Idempotent: a second run with nothing changed only checks the imports.
#
#   bash scripts/setup_reference_env.sh            # creates .venv-ref in the repository root
#   REF_VENV=/some/path bash scripts/setup_reference_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${REF_VENV:-.venv-ref}"
PACKAGES=(jax==0.10.2 jaxlib==0.10.2 ringattention==0.1.2 flax einops numpy)
STAMP="$VENV/.installed-ringattention-0.1.2"

# Imports the benchmark subprocess needs; on jax 0.10 ringattention reads jax.lib.xla_bridge, gone since 0.8.
CHECK='import jax, jax._src.xla_bridge as xb
jax.lib.xla_bridge = xb
import ringattention, flax, einops
assert jax.__version__ == "0.10.2", jax.__version__
print("reference env ok: jax", jax.__version__, "flax", flax.__version__)'

if [[ -f "$STAMP" && -x "$VENV/bin/python" ]] && JAX_PLATFORMS=cpu "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
  exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# requirements.lock pins the shared dependencies (flax, numpy, einops, ...) to the versions this project uses.
"$VENV/bin/pip" install --quiet -c requirements.lock "${PACKAGES[@]}"
JAX_PLATFORMS=cpu "$VENV/bin/python" -c "$CHECK"
touch "$STAMP"

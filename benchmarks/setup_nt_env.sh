#!/usr/bin/env bash
# Create benchmarks/.nt-venv, a virtual environment with neural-tangents for
# bench_vs_neural_tangents.py.  neural-tangents is never a dependency of
# ntkcompile itself: it only lives in this venv.
#
#   bash benchmarks/setup_nt_env.sh            # create or check (idempotent)
#   bash benchmarks/setup_nt_env.sh --force    # delete and recreate
#   PYTHON=python3.11 bash benchmarks/setup_nt_env.sh
#
# Needs network access to PyPI on the first run, and ~3 GB of disk
# (neural-tangents 0.6.5 requires tensorflow + tf2jax, which it imports at
# import time).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.nt-venv"
PY="${PYTHON:-}"

# The three pins the benchmark is about.
PINS=(jax==0.4.30 jaxlib==0.4.30 neural-tangents==0.6.5)
# Upper caps on the dependencies, at the versions this was verified with
# (Python 3.11, CPU).  jax/jaxlib 0.4.30 import and run fine with numpy 2.x up
# to these; the caps only guard against later releases breaking an old jax.
CAPS=(
  "numpy<=2.4.6"
  "scipy<=1.17.1"
  "ml_dtypes<=0.6.0"
  "opt_einsum<=3.4.0"
  "tensorflow<=2.21.0"
  "tf2jax<=0.3.6"
)

if [[ "${1:-}" == "--force" ]]; then
  echo "setup_nt_env: removing $VENV"
  rm -rf "$VENV"
elif [[ -n "${1:-}" ]]; then
  echo "usage: $0 [--force]" >&2
  exit 2
fi

check_env() {
  # Succeeds iff the venv imports the pinned versions.
  TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/python" - <<'EOF' 2>/dev/null
import sys
import jax, jaxlib, neural_tangents
from neural_tangents import stax  # noqa: F401
want = {"jax": "0.4.30", "jaxlib": "0.4.30", "neural_tangents": "0.6.5"}
have = {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "neural_tangents": neural_tangents.__version__}
if have != want:
    print(f"version mismatch: have {have}, want {want}", file=sys.stderr)
    sys.exit(1)
EOF
}

if [[ -x "$VENV/bin/python" ]] && check_env; then
  echo "setup_nt_env: $VENV is already set up (jax 0.4.30, neural-tangents 0.6.5)"
  exit 0
fi

# Pick an interpreter: jaxlib 0.4.30 has wheels for CPython 3.9-3.12.
if [[ -z "$PY" ]]; then
  for cand in python3.11 python3.12 python3.10 python3.9 python3 python; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
if [[ -z "$PY" ]]; then
  echo "setup_nt_env: no python found; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(0 if (3, 9) <= sys.version_info[:2] <= (3, 12) else 1)'; then
  echo "setup_nt_env: $PY is $("$PY" -V 2>&1); jaxlib 0.4.30 needs Python 3.9-3.12." \
       "Set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if [[ -d "$VENV" ]]; then
  echo "setup_nt_env: $VENV exists but is incomplete or broken; recreating it"
  rm -rf "$VENV"
fi

echo "setup_nt_env: creating $VENV with $("$PY" -V 2>&1)"
"$PY" -m venv "$VENV"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf '%s\n' "${CAPS[@]}" > "$CONSTRAINTS"

"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "${PINS[@]}"

if ! check_env; then
  echo "setup_nt_env: installed, but importing neural_tangents failed:" >&2
  TF_CPP_MIN_LOG_LEVEL=3 "$VENV/bin/python" -c 'import neural_tangents' >&2 || true
  exit 1
fi
echo "setup_nt_env: done."
"$VENV/bin/python" -m pip list 2>/dev/null \
  | grep -iE '^(jax|jaxlib|neural.tangents|numpy|scipy|ml.dtypes|tensorflow|tf2jax) ' || true

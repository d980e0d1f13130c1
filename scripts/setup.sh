#!/usr/bin/env bash
# One-stop set-up for a fresh machine: a venv with the locked dependency set, the package itself,
# and (for the demo) the Fashion-MNIST Debian package. Idempotent: a second run only checks.
#   scripts/setup.sh            -> set up only
#   scripts/setup.sh demo       -> set up, then run the demo
#   scripts/setup.sh test       -> set up, then run the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QUANTCORE_VENV:-.venv}
PY=${PYTHON:-python3}

if ! command -v uv >/dev/null 2>&1; then
  # uv resolves from PyPI only (it ignores local find-links), so torch and torchvision always match.
  "$PY" -m pip install --quiet --disable-pip-version-check uv
fi
UV=$(command -v uv || echo "$PY -m uv")
stamp="$VENV/.quantcore-lock.sha256"
want=$(sha256sum requirements-dev.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  [ -x "$VENV/bin/python" ] || $UV venv --quiet --python "$PY" "$VENV"
  echo "installing the locked dependency set into $VENV (first run: a few minutes, ~5 GB)"
  VIRTUAL_ENV="$VENV" $UV pip sync --quiet requirements-dev.lock
  VIRTUAL_ENV="$VENV" $UV pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi

need_fmnist() { [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; }
if [ "${1:-}" = "demo" ] || [ "${1:-}" = "test" ]; then
  if need_fmnist; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
      apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
      echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist' (tests that need it are skipped)" >&2
    fi
  fi
fi

case "${1:-}" in
  demo) shift; exec "$VENV/bin/python" -m jobs.demo "$@" ;;
  # one pytest-xdist worker per core (at most 4), whole files per worker (module fixtures built once)
  test) shift; exec "$VENV/bin/python" -m pytest -n auto --maxprocesses 4 --dist loadfile "$@" ;;
  "") ;;
  *) echo "usage: scripts/setup.sh [demo|test] [args...]" >&2; exit 2 ;;
esac

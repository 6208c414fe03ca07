#!/usr/bin/env bash
# Make Fashion-MNIST available (used by `make demo` and .ci/run, so the logic lives here once).
#
# 1. Nothing to do when the four IDX .gz files are in $FMD_DATA_DIR (or $FMD_DATA_DIR/
#    fashion-mnist), in the Debian package's directory or in the Keras cache.
# 2. As root with apt-get: install the Debian package dataset-fashion-mnist (when the plain
#    install fails, `apt-get update` first and install again).
# 3. Otherwise fmd_tf's own loader, which downloads through keras.datasets (needs fmd_tf
#    installed, e.g. by `make demo`, and network access).
# 4. Else print what to do and exit 1.
#
# Environment (defaults for real use; the tests point them at fakes):
#   PYTHON          interpreter with fmd_tf installed (default .venv/bin/python, else python3)
#   FMD_DEBIAN_DIR  the Debian package's directory (default /usr/share/datasets/fashion-mnist)
#   APT_GET         the apt-get command (default apt-get)
set -euo pipefail
cd "$(dirname "$0")/.."

FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz
       t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
DEBIAN_DIR="${FMD_DEBIAN_DIR:-/usr/share/datasets/fashion-mnist}"
APT_GET="${APT_GET:-apt-get}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

has_files() {  # has_files DIR: all four IDX files are in DIR
  local f
  for f in "${FILES[@]}"; do [ -f "$1/$f" ] || return 1; done
}

found() {
  echo "get_data: Fashion-MNIST found in $1"
  exit 0
}

# 1. Already there.
dirs=()
if [ -n "${FMD_DATA_DIR:-}" ]; then dirs+=("$FMD_DATA_DIR" "$FMD_DATA_DIR/fashion-mnist"); fi
dirs+=("$DEBIAN_DIR" "${HOME:-/nonexistent}/.keras/datasets/fashion-mnist")
for d in "${dirs[@]}"; do
  if has_files "$d"; then found "$d"; fi
done

# 2. The Debian package.
if [ "$(id -u)" = 0 ] && command -v "$APT_GET" >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  echo "get_data: installing the Debian package dataset-fashion-mnist"
  if "$APT_GET" install -y -q dataset-fashion-mnist \
      || { "$APT_GET" update -q && "$APT_GET" install -y -q dataset-fashion-mnist; }; then
    if has_files "$DEBIAN_DIR"; then found "$DEBIAN_DIR"; fi
    echo "get_data: the package is installed but $DEBIAN_DIR lacks the IDX files" >&2
  else
    echo "get_data: apt-get could not install dataset-fashion-mnist" >&2
  fi
fi

# 3. fmd_tf's loader (its other sources, then the keras.datasets download).
echo "get_data: trying fmd_tf.data.load_dataset('fmnist') (keras.datasets download) with $PYTHON"
if "$PYTHON" - <<'PY'; then
import sys

try:
    from fmd_tf.data import load_dataset
except ImportError as e:
    sys.exit(f"get_data: cannot import fmd_tf ({e}); install it first (make demo does)")
try:
    load_dataset("fmnist")
except Exception as e:  # DataNotAvailableError, or a broken install
    sys.exit(f"get_data: {e}")
PY
  echo "get_data: Fashion-MNIST loaded by fmd_tf.data.load_dataset"
  exit 0
fi

# 4. Nothing worked.
cat >&2 <<EOF
get_data: Fashion-MNIST is not available and could not be fetched. Do one of:
  - Debian, as root: apt-get install dataset-fashion-mnist   (files in $DEBIAN_DIR)
  - put the four official IDX files ${FILES[*]}
    (from github.com/zalandoresearch/fashion-mnist) in a directory and set FMD_DATA_DIR to it
  - with network access: $PYTHON -c "from fmd_tf.data import load_dataset; load_dataset('fmnist')"
    (keras.datasets downloads them into ~/.keras/datasets/fashion-mnist)
EOF
exit 1

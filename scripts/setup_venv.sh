#!/usr/bin/env bash
# Create the project's virtual environment with a Python >= 3.12.
# Looks on PATH first, then in pyenv's versions; says what to install when there is none.
set -euo pipefail
VENV="${1:-.venv}"
MIN_MINOR=12

is_ok() {  # $1: interpreter; succeeds when it runs and is >= 3.12
  "$1" -c "import sys; sys.exit(0 if sys.version_info >= (3, $MIN_MINOR) else 1)" >/dev/null 2>&1
}

find_python() {
  local c
  for c in python3.12 python3.13 python3.14 python3 python; do
    if command -v "$c" >/dev/null 2>&1 && is_ok "$c"; then command -v "$c"; return 0; fi
  done
  local roots=()
  if command -v pyenv >/dev/null 2>&1; then roots+=("$(pyenv root)"); fi
  roots+=("${PYENV_ROOT:-$HOME/.pyenv}")
  local r v
  for r in "${roots[@]}"; do
    [ -d "$r/versions" ] || continue
    # oldest acceptable version first: the pinned wheels are tested on 3.12
    for v in $(ls -1 "$r/versions" | sort -t. -k1,1n -k2,2n -k3,3n); do
      for c in "$r/versions/$v/bin/python3" "$r/versions/$v/bin/python"; do
        if [ -x "$c" ] && is_ok "$c"; then echo "$c"; return 0; fi
      done
    done
  done
  return 1
}

if [ -x "$VENV/bin/python" ] && is_ok "$VENV/bin/python"; then
  PY="$VENV/bin/python"
else
  if ! BASE=$(find_python); then
    cat >&2 <<MSG
error: solq-jax needs Python >= 3.$MIN_MINOR and none was found on PATH or in pyenv's versions.
Install one, then run this again, for example:
  pyenv install 3.12        # with pyenv
  apt-get install python3.12 python3.12-venv   # on Debian/Ubuntu releases that ship it
MSG
    exit 1
  fi
  echo "setup: creating $VENV with $BASE ($("$BASE" --version 2>&1))"
  "$BASE" -m venv "$VENV"
  PY="$VENV/bin/python"
fi
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet -e '.[test]'
echo "setup: $VENV ready ($("$PY" --version 2>&1))"

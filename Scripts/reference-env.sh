#!/usr/bin/env bash
# Sets up the reference environment of the Python tools in Scripts/fixtures/ and Scripts/compare/:
# a venv outside the repository holding the exact numpy, safetensors, torch and transformers of
# Scripts/requirements-reference.txt. Idempotent: when the venv already holds those versions it
# changes nothing (no download, no pip run).
# Usage: Scripts/reference-env.sh [VENV]
#   VENV: the first argument, else $ATTN_REFERENCE_VENV, else ~/.cache/attn/reference-venv.
#   $PYTHON: the interpreter that creates a missing venv (default python3; Python >= 3.11).
# Then run a tool with the venv's python, e.g.
#   "$VENV/bin/python" Scripts/fixtures/make_sdpa_fixtures.py
set -euo pipefail

venv="${1:-${ATTN_REFERENCE_VENV:-$HOME/.cache/attn/reference-venv}}"
python="${PYTHON:-python3}"
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac   # both as given from the caller's folder
case "$python" in /*) ;; */*) python="$PWD/$python" ;; esac      # a command name stays as is
cd "$(dirname "$0")/.."
requirements=Scripts/requirements-reference.txt

if [ ! -x "$venv/bin/python" ]; then
  command -v "$python" >/dev/null ||
    { echo "reference-env: no $python (set PYTHON=...)" >&2; exit 1; }
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "reference-env: $python is $("$python" --version 2>&1); the pinned numpy needs" \
      "Python >= 3.11 (set PYTHON=...)" >&2
    exit 1
  }
  echo "reference-env: creating $venv ($("$python" --version 2>&1))" >&2
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi

# Every "name==version" line of the requirements, installed at exactly that version?
pinned_installed() {
  "$venv/bin/python" - "$requirements" <<'PY'
import sys
from importlib import metadata

wrong = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, version = line.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have != version:
        wrong.append(f"{name} {have or 'missing'} (wants {version})")
if wrong:
    print("reference-env: to install: " + ", ".join(wrong), file=sys.stderr)
sys.exit(1 if wrong else 0)
PY
}

if pinned_installed; then
  echo "reference-env: $venv already holds the pinned versions; nothing to do" >&2
else
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  pinned_installed
  "$venv/bin/python" -m pip check >&2
fi

"$venv/bin/python" -c 'import numpy, safetensors, torch, transformers
print("reference-env: numpy", numpy.__version__, "safetensors", safetensors.__version__,
      "torch", torch.__version__, "transformers", transformers.__version__)' >&2

cat <<USAGE
Reference environment ready: $venv
Run the Python tools with its python, from the repository's root, e.g.
  "$venv/bin/python" Scripts/fixtures/make_sdpa_fixtures.py
  "$venv/bin/python" Scripts/compare/compare_pytorch.py --help
(Scripts/README.md lists them all, as "\$VENV/bin/python" with VENV=$venv.)
USAGE

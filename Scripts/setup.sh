#!/usr/bin/env bash
# Idempotent setup: install the C libraries attn links against (only when missing), then build.
# Usage: Scripts/setup.sh            build the release executable
#        Scripts/setup.sh --no-build only install the system packages
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libopenblas-dev liblapacke-dev pkg-config)
missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing missing packages: ${missing[*]}" >&2
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "setup: installed ${missing[*]}" >&2
fi

# Compiler flags for this CPU (see Scripts/build-flags.sh).
mapfile -t flags < <(Scripts/build-flags.sh)

if [ "${1:-}" != "--no-build" ]; then
  echo "setup: building attn (release; flags: ${flags[*]:-none})" >&2
  swift build -c release --product attn --quiet "${flags[@]}" >&2 ||
    { echo "setup: build failed" >&2; exit 1; }
fi

#!/usr/bin/env bash
# Puts `attn` on the PATH: sets up and builds the release executable (Scripts/setup.sh), then
# copies it to PREFIX/bin (default ~/.local/bin; `Scripts/install.sh /usr/local` as root).
# The binary is built for this machine's CPU (Scripts/build-flags.sh); rebuild on another.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:-$HOME/.local}
Scripts/setup.sh
mkdir -p "$prefix/bin"
install -m 755 .build/release/attn "$prefix/bin/attn"
echo "install: $prefix/bin/attn ($("$prefix/bin/attn" --version))" >&2
case ":$PATH:" in
  *":$prefix/bin:"*) ;;
  *) echo "install: $prefix/bin is not on PATH; add it: export PATH=\"$prefix/bin:\$PATH\"" >&2 ;;
esac

#!/usr/bin/env bash
# Builds AttentionKit's DocC documentation (Sources/AttentionKit/AttentionKit.docc and the doc
# comments) and fails on any warning in the output: DocC's (an unresolved ``Symbol`` link, a
# broken <doc:…> link) and SwiftPM's (a file in a target that is neither a source nor excluded).
# Uses its own build folder, .build-docs, so it never touches .build.
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT

status=0
swift package --scratch-path .build-docs generate-documentation --target AttentionKit \
  >"$log" 2>&1 || status=$?

if [ "$status" -ne 0 ]; then
  cat "$log" >&2
  echo "check-docs: generate-documentation failed (exit $status)" >&2
  exit 1
fi

# A DocC warning spans several lines (the location, then notes and the source); print each one
# from its "warning:" line up to the next diagnostic or a blank line.
if grep -q 'warning:' "$log"; then
  count=$(grep -c 'warning:' "$log")
  awk '
    /warning:/ { show = 1; print; next }
    /^$/ || /^\[[0-9]+\/[0-9]+\]/ || /^(Building|Finished|Generated|Fetch|Comput)/ { show = 0 }
    show
  ' "$log" >&2
  echo "check-docs: $count warning(s) while building AttentionKit's documentation" >&2
  exit 1
fi

archive=.build-docs/plugins/Swift-DocC/outputs/AttentionKit.doccarchive
echo "check-docs: AttentionKit documentation built with no warnings ($archive)"

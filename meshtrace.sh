#!/usr/bin/env bash
# Sets up the machine if needed (apt packages, release build), then runs meshtrace with the given arguments.
# With no arguments it runs the embedded default: `meshtrace lab`, a real ambient pod traced live.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/scripts/setup" >&2
[ $# -eq 0 ] && set -- lab
exec "$here/.build/release/meshtrace" "$@"

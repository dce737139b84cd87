#!/usr/bin/env bash
# Stop the Ray head started by cluster/start-local.sh (and its workers and jobs), with the
# project venv's `ray`, so it matches the version that started it.
# `ray stop` ends every Ray process of this user on this machine.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${root}/.venv"
if [[ ! -x "${venv}/bin/ray" ]]; then
  echo "error: ${venv}/bin/ray not found; nothing started from this checkout" >&2
  exit 2
fi

"${venv}/bin/ray" stop "$@"

#!/usr/bin/env bash
# Stop the Ray nodes started by cluster/start-local.sh (and their workers and jobs): the
# processes whose command line names its temp dirs, and no other Ray on this machine (which
# `ray stop` would end too). SIGTERM first, SIGKILL for what is left after 10 s.
set -euo pipefail

temp_root=/tmp/composeae-ray
if ! pgrep -f -- "${temp_root}/" >/dev/null; then
  echo "no Ray started by cluster/start-local.sh is running"
  exit 0
fi
pkill -TERM -f -- "${temp_root}/" || true
for _ in $(seq 20); do
  pgrep -f -- "${temp_root}/" >/dev/null || break
  sleep 0.5
done
pkill -KILL -f -- "${temp_root}/" || true
echo "stopped the Ray nodes of ${temp_root}"

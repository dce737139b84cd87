#!/usr/bin/env bash
# Start a Ray head on this machine for `ray job submit`, from the project's .venv, with the
# dashboard (and Jobs API) on 127.0.0.1:8265 only; with --nodes N, N-1 more nodes join it, each
# with its own loopback IP (127.0.0.2, ...) so Ray sees N machines. Stop it with
# cluster/stop-local.sh, which stops these processes only.
#
#   cluster/start-local.sh [--nodes N] [extra `ray start` options for the head, e.g. --num-cpus 4]
#
# Every node has a temp dir of its own under /tmp/composeae-ray/: its log monitor then reads
# only its own workers' logs (with one shared folder every console line appears once per node),
# and stop-local.sh finds exactly these processes.
# Token authentication is on: the head and every client use the token in ~/.ray/auth_token
# (generated here if missing), and clients must set RAY_AUTH_MODE=token; without it
# `ray job submit` fails with "AuthenticationError: Missing authentication token".
set -euo pipefail

nodes=1
if [[ "${1:-}" == "--nodes" ]]; then
  nodes="${2:?--nodes needs a number}"
  shift 2
fi
if ! [[ "${nodes}" =~ ^[1-9][0-9]?$ ]]; then
  echo "error: --nodes must be a number from 1 to 99, got ${nodes}" >&2
  exit 2
fi
temp_root=/tmp/composeae-ray

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${root}/.venv"
if [[ ! -x "${venv}/bin/ray" ]]; then
  echo "error: ${venv}/bin/ray not found; create the venv first (make test or make demo)" >&2
  exit 2
fi

# A job's entrypoint `python` is resolved on the PATH the head was started with, so the venv
# goes first: otherwise jobs run the system interpreter and fail with ModuleNotFoundError.
export PATH="${venv}/bin:${PATH}"
export RAY_AUTH_MODE=token
# Ray processes inherit it from `ray start`: the dashboard's Train page then lists the runs of
# every job, also of one submitted without cluster/runtime_env.yaml (which sets it as well).
export RAY_TRAIN_ENABLE_STATE_TRACKING=1

# Creates ~/.ray/auth_token when missing; the token itself is not printed.
ray get-auth-token --generate >/dev/null

ray start --head --port=6379 --node-ip-address=127.0.0.1 --temp-dir="${temp_root}/head" \
  --dashboard-host=127.0.0.1 --dashboard-port=8265 \
  --disable-usage-stats "$@"

# More nodes: their own IP, temp dir and agent ports (Ray's fixed defaults would collide).
for ((i = 1; i < nodes; i++)); do
  ray start --address=127.0.0.1:6379 --node-ip-address="127.0.0.$((i + 1))" \
    --temp-dir="${temp_root}/node-${i}" --disable-usage-stats \
    --dashboard-agent-listen-port=$((52365 + 10 * i)) --dashboard-agent-grpc-port=$((52366 + 10 * i)) \
    --metrics-export-port=$((52367 + 10 * i)) --runtime-env-agent-port=$((52368 + 10 * i))
done

cat <<MSG

Ray is up with ${nodes} node(s); dashboard: http://127.0.0.1:8265
Submit a job from ${root} (a job runs in an uploaded copy of the checkout, so local shards
and runs are given as absolute paths to land in this checkout):

  cd ${root}
  RAY_AUTH_MODE=token ${venv}/bin/ray job submit --address http://127.0.0.1:8265 \\
      --runtime-env cluster/runtime_env.yaml --working-dir . \\
      -- python jobs/train.py --config jobs/configs/demo.yaml \\
      --set data.url=${root}/shards/css-synth-small --set train.storage=${root}/runs

Stop it with: cluster/stop-local.sh
MSG

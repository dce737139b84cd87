#!/usr/bin/env bash
# Start a single-node Ray head on this machine for `ray job submit`, from the project's .venv,
# with the dashboard (and Jobs API) on 127.0.0.1:8265 only. Stop it with cluster/stop-local.sh.
#
#   cluster/start-local.sh [extra `ray start` options, e.g. --num-cpus 4 --num-gpus 1]
#
# Token authentication is on: the head and every client use the token in ~/.ray/auth_token
# (generated here if missing), and clients must set RAY_AUTH_MODE=token; without it
# `ray job submit` fails with "AuthenticationError: Missing authentication token".
set -euo pipefail

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

ray start --head --port=6379 \
  --dashboard-host=127.0.0.1 --dashboard-port=8265 \
  --disable-usage-stats "$@"

cat <<MSG

Ray head is up; dashboard: http://127.0.0.1:8265
Submit a job from ${root} (a job runs in an uploaded copy of the checkout, so local shards
and runs are given as absolute paths to land in this checkout):

  cd ${root}
  RAY_AUTH_MODE=token ${venv}/bin/ray job submit --address http://127.0.0.1:8265 \\
      --runtime-env cluster/runtime_env.yaml --working-dir . \\
      -- python jobs/train.py --config jobs/configs/demo.yaml \\
      --set data.url=${root}/shards/css-synth-small --set train.storage=${root}/runs

Stop it with: cluster/stop-local.sh
MSG

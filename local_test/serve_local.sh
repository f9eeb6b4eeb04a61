#!/usr/bin/env bash
# Run the model server the way the serving image runs it: `serve` (MMS through sagemaker-inference,
# with our handler) against a folder shaped like /opt/ml whose model/ holds a training artifact.
#
#   local_test/serve_local.sh --native [TEST_DIR]   the project's .venv, no container
#
# TEST_DIR defaults to local_test/test_dir (train first: local_test/train_local.sh --native).
# The port is SAGEMAKER_BIND_TO_PORT (default 8080). Stop with Ctrl-C.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

if [ "${1:-}" != "--native" ]; then
  echo "usage: $0 --native [TEST_DIR]  (the container form arrives with the serving image)" >&2
  exit 2
fi
shift
test_dir=$(realpath "${1:-$here/test_dir}")
venv=${VENV:-$root/.venv}
[ -x "$venv/bin/serve" ] || { echo "error: $venv/bin/serve not found: run 'make setup' first" >&2; exit 2; }
[ -f "$test_dir/model/model.json" ] || {
  echo "error: no model in $test_dir/model: train one first (local_test/train_local.sh --native $test_dir)" >&2; exit 2; }

export SAGEMAKER_BASE_DIR="$test_dir"
export SAGEMAKER_BIND_TO_PORT="${SAGEMAKER_BIND_TO_PORT:-8080}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/serve"

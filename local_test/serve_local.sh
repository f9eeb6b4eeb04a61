#!/usr/bin/env bash
# Run the model server the way SageMaker does: `serve` (MMS through sagemaker-inference, with our
# handler) against a folder shaped like /opt/ml whose model/ holds a training artifact.
#
#   local_test/serve_local.sh IMAGE [TEST_DIR]       the serving image (docker run IMAGE serve)
#   local_test/serve_local.sh --native [TEST_DIR]    the project's .venv, no container
#
# TEST_DIR defaults to local_test/test_dir (train first: local_test/train_local.sh). The host port
# is SAGEMAKER_BIND_TO_PORT (default 8080). DOCKER picks the engine; CONTAINER_NAME names the
# container (to stop it from elsewhere); EXTRA_RUN_ARGS adds `run` arguments. Stop with Ctrl-C.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  echo "usage: $0 IMAGE|--native [TEST_DIR]" >&2
  exit 2
fi
mode=$1
shift
test_dir=$(realpath "${1:-$here/test_dir}")
venv=${VENV:-$root/.venv}
if [ ! -f "$test_dir/model/model.json" ] && [ ! -f "$test_dir/model/model.tar.gz" ]; then
  echo "error: no model in $test_dir/model: train one first (local_test/train_local.sh $mode $test_dir)" >&2; exit 2
fi
port=${SAGEMAKER_BIND_TO_PORT:-8080}

if [ "$mode" != "--native" ]; then
  source "$here/container.sh"
  name=()
  [ -n "${CONTAINER_NAME:-}" ] && name=(--name "$CONTAINER_NAME")
  exec "$engine" run --rm ${name[@]+"${name[@]}"} ${gpus[@]+"${gpus[@]}"} -p "$port:8080" ${EXTRA_RUN_ARGS:-} \
    -v "$test_dir/model:/opt/ml/model:ro" "$mode" serve
fi

[ -x "$venv/bin/serve" ] || { echo "error: $venv/bin/serve not found: run 'make setup' first" >&2; exit 2; }

export SAGEMAKER_BASE_DIR="$test_dir"
export SAGEMAKER_BIND_TO_PORT="$port"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/serve"

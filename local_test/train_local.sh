#!/usr/bin/env bash
# Run the training program the way SageMaker does: through the sagemaker-training toolkit's
# `train` entry, against a folder shaped like /opt/ml.
#
#   local_test/train_local.sh IMAGE [TEST_DIR]       the training image (docker run IMAGE train)
#   local_test/train_local.sh --native [TEST_DIR]    the project's .venv, no container
#
# TEST_DIR defaults to local_test/test_dir. If TEST_DIR/input/data/train is missing, a small
# synthetic dataset is generated there. Model, output and code folders are cleared first;
# checkpoints too, unless KEEP_CHECKPOINTS=1 (to try a resume). DOCKER picks the engine (docker;
# podman works); SHM_SIZE the container's /dev/shm (data-loader workers share batches through it);
# EXTRA_RUN_ARGS more `run` arguments (e.g. "-e AWS_REGION=eu-west-1 -v /data:/data").
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
python=$venv/bin/python
[ -x "$python" ] || python=python3
[ -f "$test_dir/input/config/hyperparameters.json" ] || {
  echo "error: $test_dir/input/config/hyperparameters.json not found: TEST_DIR must look like /opt/ml" >&2; exit 2; }

if [ ! -d "$test_dir/input/data/train" ]; then
  echo "generating a synthetic dataset in $test_dir/input/data"
  PYTHONPATH="$root" "$python" -m train.synthetic "$test_dir/input/data" --per-class 80 --test-per-class 15 --size 64
fi
rm -rf "$test_dir/model" "$test_dir/output" "$test_dir/code"
[ "${KEEP_CHECKPOINTS:-0}" = 1 ] || rm -rf "$test_dir/checkpoints"
mkdir -p "$test_dir/model" "$test_dir/output/data" "$test_dir/checkpoints"

if [ "$mode" != "--native" ]; then
  source "$here/container.sh"
  # /opt/ml/code stays the image's (the program lives there); the rest is TEST_DIR's. The host
  # name is resourceconfig.json's current_host, as on SageMaker (algo-2 in a two-host run).
  host=$(sed -n 's/.*"current_host" *: *"\([^"]*\)".*/\1/p' "$test_dir/input/config/resourceconfig.json" 2>/dev/null | head -n 1 || true)
  exec "$engine" run --rm ${gpus[@]+"${gpus[@]}"} --shm-size "${SHM_SIZE:-2g}" --hostname "${host:-algo-1}" ${EXTRA_RUN_ARGS:-} \
    -v "$test_dir/input:/opt/ml/input" -v "$test_dir/model:/opt/ml/model" \
    -v "$test_dir/output:/opt/ml/output" -v "$test_dir/checkpoints:/opt/ml/checkpoints" \
    "$mode" train
fi

[ -x "$venv/bin/train" ] || { echo "error: $venv/bin/train not found: run 'make setup' first" >&2; exit 2; }
mkdir -p "$test_dir/code"
# The toolkit runs SAGEMAKER_PROGRAM from <base>/code, where the image puts it too.
cp "$root/train/entry/train_job.py" "$test_dir/code/"

export SAGEMAKER_BASE_DIR="$test_dir"
export SAGEMAKER_PROGRAM=train_job.py
# Outside SageMaker the host names (algo-1) do not resolve; the toolkit would wait 15 minutes on DNS.
export SM_STUDIO_LOCAL_MODE=true
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/train"

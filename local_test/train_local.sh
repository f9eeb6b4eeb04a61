#!/usr/bin/env bash
# Run the training program the way the training image runs it: through the sagemaker-training
# toolkit's `train` entry, against a folder shaped like /opt/ml.
#
#   local_test/train_local.sh --native [TEST_DIR]   the project's .venv, no container
#
# TEST_DIR defaults to local_test/test_dir. If TEST_DIR/input/data/train is missing, a small
# synthetic dataset is generated there. Model, output and code folders are cleared first;
# checkpoints too, unless KEEP_CHECKPOINTS=1 (to try a resume).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

if [ "${1:-}" != "--native" ]; then
  echo "usage: $0 --native [TEST_DIR]  (the container form arrives with the training image)" >&2
  exit 2
fi
shift
test_dir=$(realpath "${1:-$here/test_dir}")
venv=${VENV:-$root/.venv}
[ -x "$venv/bin/train" ] || { echo "error: $venv/bin/train not found: run 'make setup' first" >&2; exit 2; }
[ -f "$test_dir/input/config/hyperparameters.json" ] || {
  echo "error: $test_dir/input/config/hyperparameters.json not found: TEST_DIR must look like /opt/ml" >&2; exit 2; }

if [ ! -d "$test_dir/input/data/train" ]; then
  echo "generating a synthetic dataset in $test_dir/input/data"
  "$venv/bin/python" -m train.synthetic "$test_dir/input/data" --per-class 80 --test-per-class 15 --size 64
fi
rm -rf "$test_dir/model" "$test_dir/output" "$test_dir/code"
[ "${KEEP_CHECKPOINTS:-0}" = 1 ] || rm -rf "$test_dir/checkpoints"
mkdir -p "$test_dir/model" "$test_dir/output/data" "$test_dir/code"
# The toolkit runs SAGEMAKER_PROGRAM from <base>/code, where the image puts it too.
cp "$root/train/entry/train_job.py" "$test_dir/code/"

export SAGEMAKER_BASE_DIR="$test_dir"
export SAGEMAKER_PROGRAM=train_job.py
# Outside SageMaker the host names (algo-1) do not resolve; the toolkit would wait 15 minutes on DNS.
export SM_STUDIO_LOCAL_MODE=true
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/train"

#!/usr/bin/env bash
# `make demo`: generate a small offline dataset (6 classes of drawn shapes), train resnet18 on it
# through the toolkit's `train` entry exactly as the image does, and show what came out.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
test_dir="$here/test_dir"
venv=${VENV:-$root/.venv}

if [ ! -d "$test_dir/input/data/train" ]; then
  echo "== generating the demo dataset (6 shapes, 150 train + 20 test images each, 64x64)"
  "$venv/bin/python" -m train.synthetic "$test_dir/input/data" --per-class 150 --test-per-class 20 --size 64
fi
echo "== training (chance is 1/6 = 0.17 accuracy)"
"$here/train_local.sh" --native "$test_dir"
echo
echo "== artifacts"
ls -l "$test_dir/model" "$test_dir/output/data"
"$venv/bin/python" - "$test_dir" <<'PY'
import json, sys
from pathlib import Path
base = Path(sys.argv[1])
m = json.loads((base / "output/data/metrics.json").read_text())
h = m["history"]
accs = " ".join(f"{r['valid_acc']:.2f}" for r in h)
print(f"\nvalid accuracy per epoch: {accs}")
print(f"test accuracy {m['final'].get('test_acc', float('nan')):.3f} (best epoch {m['best_epoch']}); chance 0.167")
print(f"learning curves: {base / 'output/data/learning_curves.png'}")
PY

echo
echo "== report: SageMaker Debugger's rules and ours over the run's tensors and profile (launch.py report)"
"$venv/bin/python" "$root/launch.py" report "$test_dir" --out "$test_dir/output/report.html"

echo
echo "== serving the model (MMS through sagemaker-inference) and predicting held-out images"
export SAGEMAKER_BIND_TO_PORT=${SAGEMAKER_BIND_TO_PORT:-8080}
log="$test_dir/serve.log"
"$here/serve_local.sh" --native "$test_dir" >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
until grep -q "serve INFO ready" "$log"; do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "error: the server did not start; its log ($log) ends with:" >&2; tail -5 "$log" >&2; exit 1
  fi
  sleep 0.5
done
grep "serve INFO ready" "$log"
for class_dir in "$test_dir"/input/data/test/*/; do
  file=$(ls "$class_dir" | head -1)
  printf '%s\t' "$(basename "$class_dir")"
  TOP_K=3 "$here/predict.sh" "$class_dir$file"
done | "$venv/bin/python" -c '
import json, sys
print("true label  top-3 from the endpoint")
for line in sys.stdin:
    truth, _, body = line.rstrip("\n").partition("\t")
    top = json.loads(body)["predictions"][0]["top_k"]
    mark = "ok " if top[0]["label"] == truth else "   "
    print(truth.ljust(10), mark + "  ".join("{} {:.2f}".format(t["label"], t["probability"]) for t in top))
'
echo "(server log: $log)"

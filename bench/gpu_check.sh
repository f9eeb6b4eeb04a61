#!/usr/bin/env bash
# Issue 8's GPU target (resnet50 AMP on real JPEGs >= 0.90 x synthetic, data wait < 5%) in one
# command of a device lease: `bash bench/gpu_check.sh`, with the machine's own python3 and torch.
# Three GPU runs so far ended at their limit before printing their table, and a device reply keeps
# only the last 12,000 characters of output, which the stack dumps (--stacks) would fill: so the
# figures go to $OUT/train.log (each round's lines as it ends), the stacks to $OUT/stacks.log, the
# results file to $OUT/train_throughput.json, and only the figures are printed here. A variant that
# fails (pin-thread, uncached, gpu-decode: paths only a GPU runs) is printed as FAILED and the
# others go on; the default's failure ends the run. tests/test_bench.py runs this script without
# the packages the device image lacks (tests/device_image.py).
# Then two real training jobs (bench.job_check: `python -m train` as SageMaker starts it, resnet50
# by default and resnet18 frozen with nvJPEG), and the first one's model served on the GPU and the
# CPU through the endpoint's predictor: no job has run on a GPU before. Their summary is printed,
# each job's log and metrics come back as $OUT/job_*.
# GPU_CHECK_LIMIT: seconds for the benchmark (default 360); GPU_CHECK_JOB_LIMIT: for the jobs and
# the serving (default 180; 75 a job). Both and the start fit a 15-minute lease: timeout_s 560.
# GPU_CHECK_ARGS, GPU_CHECK_JOB_ARGS: more bench.train_throughput / bench.job_check arguments; later
# ones win (the tests run both on a CPU with --quick). PYTHON: the interpreter (default python3).
set -uo pipefail
out=${OUT:-bench/results/gpu}
py=${PYTHON:-python3}
limit=${GPU_CHECK_LIMIT:-360}
job_limit=${GPU_CHECK_JOB_LIMIT:-180}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$py" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__,
               "cuda", torch.cuda.is_available(), "cudnn", torch.backends.cudnn.version())'
    echo "cpus $(nproc)"
} 2>&1 | tee "$out/env.txt"

# 100 steps an epoch: more than the 64 batches a loader holds ahead while the others take turns.
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of arguments
timeout --kill-after=10 "$limit" "$py" -m bench.train_throughput --parts throughput --archs resnet50 \
    --compile-archs "" --freeze full --configs default,pin-thread,uncached,gpu-decode --steps 100 --rounds 2 \
    --stacks 60 --out "$out/train_throughput.json" ${GPU_CHECK_ARGS:-} >"$out/train.log" 2>"$out/stacks.log"
rc=$?

cat "$out/train.log"
if [ "$rc" -ne 0 ]; then
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "bench.train_throughput: its limit of $limit s ended it (exit $rc); the rounds above are what it measured"
    else
        echo "bench.train_throughput failed (exit $rc)"
    fi
    echo "--- the last lines of $out/stacks.log (stderr and the stack dumps):"
    tail -n 40 "$out/stacks.log"
fi

echo "--- real training jobs (bench.job_check)"
# shellcheck disable=SC2086  # GPU_CHECK_JOB_ARGS is a list of arguments
timeout --kill-after=10 "$job_limit" "$py" -m bench.job_check --python "$py" \
    --out "$out/jobs.json" ${GPU_CHECK_JOB_ARGS:-} 2>&1 | tee "$out/jobs.log"
job_rc=${PIPESTATUS[0]}
if [ "$job_rc" -eq 124 ] || [ "$job_rc" -eq 137 ]; then
    echo "bench.job_check: its limit of $job_limit s ended it (exit $job_rc)"
fi
[ "$rc" -ne 0 ] && exit "$rc"
exit "$job_rc"

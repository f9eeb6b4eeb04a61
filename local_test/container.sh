# Sourced by train_local.sh and serve_local.sh for their IMAGE form: sets $engine (DOCKER, default
# docker; podman works) and $gpus (--gpus all only when nvidia-smi sees a GPU).
engine=${DOCKER:-docker}
command -v "$engine" >/dev/null || { echo "error: container engine '$engine' not found (set DOCKER=podman?)" >&2; exit 2; }
gpus=()
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then gpus=(--gpus all); fi

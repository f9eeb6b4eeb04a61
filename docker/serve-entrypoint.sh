#!/bin/sh
# SageMaker starts the container as `docker run IMAGE serve`; anything else runs as a command
# (`docker run IMAGE python -c ...`, `docker run -it IMAGE bash`).
set -e
if [ "${1:-serve}" = "serve" ]; then
  exec serve
fi
exec "$@"

# The training image: the sagemaker-training toolkit's `train` runs our program.
#
#   docker build -f docker/train.Dockerfile -t imgcls-train .
#
# Build arguments:
#   BASE_IMAGE        any Debian or Ubuntu image; default a CUDA 12 runtime (see README: why not CUDA 13)
#   TORCH_INDEX_URL   where torch and torchvision come from; default CUDA 12.6 wheels
#   PRETRAINED_ARCHS  torchvision models whose ImageNet weights are baked in ("" for none), so jobs
#                     with network isolation can fine-tune from them
#   PIP_CERT          a CA bundle for pip, when builds go through an inspecting proxy (mount it with -v)
ARG BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu22.04
# Defaults live here, before FROM, so that the shared lines below are identical in both files.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
FROM ${BASE_IMAGE}

# --- shared with serve.Dockerfile, line for line, so the two images share these layers ---------
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
COPY constraints.txt /opt/imgcls/constraints.txt
ARG TORCH_INDEX_URL
ARG PIP_CERT
RUN pip install ${PIP_CERT:+--cert "$PIP_CERT"} --index-url "$TORCH_INDEX_URL" \
        -c /opt/imgcls/constraints.txt torch torchvision
# --- end of the shared part ----------------------------------------------------------------------

# Dependencies before code: a code change rebuilds only the last layers. smdebug needs
# pyinstrument-cext, published as source only: python3-dev is installed for it and removed again.
# gcc stays: on a CPU instance the job compiles its batch-norm and crop kernels for that CPU (train/native.py).
# README.md (pyproject's readme) comes with the code: a doc edit must not reinstall every dependency.
COPY pyproject.toml /opt/imgcls/
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev python3-dev \
 && cd /opt/imgcls && mkdir -p imgcls train serve && touch README.md imgcls/__init__.py train/__init__.py serve/__init__.py \
 && pip install ${PIP_CERT:+--cert "$PIP_CERT"} -c constraints.txt 'setuptools<81' '.[train]' \
 && pip uninstall -y sagemaker-image-classifier && rm -rf README.md imgcls train serve build *.egg-info \
 && apt-mark manual gcc libc6-dev && apt-get purge -y --auto-remove python3-dev && rm -rf /var/lib/apt/lists/*

ENV TORCH_HOME=/opt/torch
ARG PRETRAINED_ARCHS="resnet18 resnet50"
RUN for arch in $PRETRAINED_ARCHS; do \
      python -c "import sys, torchvision; torchvision.models.get_model(sys.argv[1], weights='DEFAULT')" "$arch" \
      || exit 1; \
    done; mkdir -p "$TORCH_HOME"

COPY imgcls /opt/imgcls/imgcls
COPY train /opt/imgcls/train
COPY serve /opt/imgcls/serve
COPY README.md /opt/imgcls/
RUN pip install --no-deps --no-build-isolation /opt/imgcls \
 && mkdir -p /opt/ml/code && cp /opt/imgcls/train/entry/train_job.py /opt/ml/code/

ENV SAGEMAKER_PROGRAM=train_job.py
WORKDIR /opt/ml/code
# SageMaker runs `docker run IMAGE train`; `train` is the toolkit's entry point, on PATH.
CMD ["train"]

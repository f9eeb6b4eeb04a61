# The serving image: Multi Model Server through sagemaker-inference, with our handler.
#
#   docker build -f docker/serve.Dockerfile -t imgcls-serve .
#   docker run -p 8080:8080 -v $PWD/model:/opt/ml/model imgcls-serve serve
#
# Build arguments:
#   BASE_IMAGE        any Debian or Ubuntu image with openjdk-17 in its archive; default Debian 12 slim
#   TORCH_INDEX_URL   where torch and torchvision come from; default CPU wheels (small)
#   PIP_CERT          a CA bundle for pip, when builds go through an inspecting proxy (mount it with -v)
ARG BASE_IMAGE=debian:bookworm-slim
# Defaults live here, before FROM, so that the shared lines below are identical in both files.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
FROM ${BASE_IMAGE}

# --- shared with train.Dockerfile, line for line, so the two images share these layers ---------
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

# MMS's front end is Java. The man directory is missing from slim images and the JRE's
# post-install script needs it.
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless curl \
 && rm -rf /var/lib/apt/lists/*

# README.md (pyproject's readme) comes with the code: a doc edit must not reinstall every dependency.
COPY pyproject.toml /opt/imgcls/
RUN cd /opt/imgcls && mkdir -p imgcls train serve && touch README.md imgcls/__init__.py train/__init__.py serve/__init__.py \
 && pip install ${PIP_CERT:+--cert "$PIP_CERT"} -c constraints.txt 'setuptools<81' '.[serve]' \
 && pip uninstall -y sagemaker-image-classifier && rm -rf README.md imgcls train serve build *.egg-info

COPY imgcls /opt/imgcls/imgcls
COPY train /opt/imgcls/train
COPY serve /opt/imgcls/serve
COPY README.md /opt/imgcls/
RUN pip install --no-deps --no-build-isolation /opt/imgcls
COPY docker/serve-entrypoint.sh /usr/local/bin/serve-entrypoint

# No SAGEMAKER_MODEL_SERVER_VMARGS here: serve's default (serve/server.py) sizes the JVM's heap from
# the container's memory limit and carries the flags bench/jvm_flags.py measured; an ENV would
# replace all of them.
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true
EXPOSE 8080
WORKDIR /opt/ml
ENTRYPOINT ["/usr/local/bin/serve-entrypoint"]
CMD ["serve"]

# The jobs a person runs. `make setup` creates .venv once from constraints.txt; the rest reuse it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_ARGS ?=

.PHONY: setup demo test test-fast lint bench images clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[train,serve,launch,dev]'
	touch $@

# Train on a generated dataset of drawn shapes through the real toolkit entry, offline; then serve
# the model with MMS and predict held-out images.
demo: setup
	./local_test/demo.sh

test: setup
	$(BIN)/python -m pytest -ra

# Seconds, not minutes: skips the tests that start the toolkit, servers or containers.
# (`make test` includes the container tests: podman builds and runs both images, about 15 minutes.)
test-fast: setup
	$(BIN)/python -m pytest -ra -m "not slow"

lint: setup
	$(BIN)/ruff check .

# Training throughput, serving latency/throughput, the JVM flags side by side, the training data path alone
# against its loader settings, batch norm + ReLU against a copy, one optimizer step three ways;
# BENCH_ARGS=--quick for a smoke run.
bench: setup
	$(BIN)/python -m bench.train_throughput $(BENCH_ARGS)
	$(BIN)/python -m bench.serve_latency $(BENCH_ARGS)
	$(BIN)/python -m bench.jvm_flags $(BENCH_ARGS)
	$(BIN)/python -m bench.loader_probe $(BENCH_ARGS)
	$(BIN)/python -m bench.norm_probe $(BENCH_ARGS)
	$(BIN)/python -m bench.optimizer_probe $(BENCH_ARGS)

# Both images, built only (DOCKER picks the engine; IMAGE_BUILD_ARGS go to every build command).
images:
	./build_and_push.sh --no-push $(if $(IMAGE_BUILD_ARGS),-- $(IMAGE_BUILD_ARGS))

clean:
	rm -rf local_test/test_dir/input/data local_test/test_dir/model local_test/test_dir/output \
	       local_test/test_dir/checkpoints local_test/test_dir/code local_test/test_dir/serve.log bench/results

# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LOCK   := requirements.lock
# pip-tools, in its own venv under build/, resolves requirements/*.in into the lock.
PIP_TOOLS := pip-tools==7.6.2
LOCK_VENV := build/lock-venv

.PHONY: setup lock demo test lint format demo-model bench clean \
        image image-local image-local-unlocked base-local wheelhouse submission bench-container

# The submission image (docs/container.md). TEAM names the image (TEAM:latest) and the
# container, as in the organizers' command; MODEL is the model folder to bake in (under
# models/, relative to CONTEXT); CONTEXT is the build context (the repository).
DOCKER     ?= docker
TEAM       ?= flare24
IMAGE      ?= $(TEAM):latest
MODEL      ?= models/demo
CONTEXT    ?= .
BUILD_ARGS ?=
# The local CPU base (container/base-local.sh) and the wheels for the offline build.
LOCAL_BASE ?= flare24-base-local:torch2.13.0-py3.11
WHEELHOUSE := build/wheelhouse
# Wheels for the image's Python (3.11 on x86_64 Linux), whatever Python runs make.
PIP_TARGET := --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
              --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
SUBMISSION ?= build/$(TEAM).tar.gz

setup: $(STAMP)

# Installs the lock and nothing else: every package, transitive ones included, at its
# locked version (scripts/lock.py; tests/test_lock.py fails when the venv differs). pip, not
# uv: uv installed the same versions in a third of the time, but in its venvs the
# resident-memory test of tests/test_bad_input.py failed 3 times in 7 (0 in 11 with pip).
$(STAMP): $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r $(LOCK)
	touch $@

## lock: resolve requirements/*.in into requirements.lock (and its view requirements.txt), on purpose
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) \
	    && $(LOCK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(PIP_TOOLS); }
	$(PYTHON) -m scripts.lock compile --pip-compile $(LOCK_VENV)/bin/pip-compile

## demo: synthetic CT cases -> predict.sh with models/demo -> timings, findings, overlay PNG
demo: setup
	$(BIN)/python -m scripts.demo --out demo_out

## test: linters, then the CPU test suite (real nnU-Net, real NIfTI files)
test: setup lint
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## demo-model: retrain models/demo from scratch on synthetic data (CPU, about 26 min on 2 cores)
demo-model: setup
	$(BIN)/python -m scripts.build_demo_model --out models/demo

## bench: the benchmark suite (CPU-sized defaults; see benchmarks/README.md)
bench: setup
	$(BIN)/python -m benchmarks

## image: the submission image on the official PyTorch CUDA base (needs an image registry)
image:
	$(DOCKER) build --build-arg MODEL=$(MODEL) $(BUILD_ARGS) -t $(IMAGE) -f Dockerfile $(CONTEXT)

## image-local: the same Dockerfile on the local CPU base, offline (no registry, no GPU)
# One build at a time (flock): a second `make image-local` (the container tests' own, say)
# waits for a build in progress, then finds it all cached.
image-local:
	@mkdir -p build
	flock build/.image-local.lock $(MAKE) --no-print-directory image-local-unlocked

image-local-unlocked: base-local wheelhouse
	$(DOCKER) build --network none --build-arg BASE_IMAGE=$(LOCAL_BASE) --build-arg REQUIRE_CUDA=0 \
	    --build-arg "PIP_INSTALL_ARGS=--no-index --find-links /tmp/deps" \
	    --build-arg MODEL=$(MODEL) $(BUILD_ARGS) -t $(IMAGE) -f Dockerfile $(CONTEXT)

## base-local: Debian bookworm's Python 3.11 at /opt/conda + the CPU torch wheel (once)
base-local:
	PIP="$(PYTHON) -m pip" bash container/base-local.sh $(LOCAL_BASE)

## wheelhouse: the image's requirements as wheels, so the image-local build is offline
wheelhouse: $(WHEELHOUSE)/.complete

$(WHEELHOUSE)/.complete: requirements.txt
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	grep -v '^torch==' requirements.txt > build/requirements-image.txt
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps $(PIP_TARGET) \
	    -r build/requirements-image.txt -d $(WHEELHOUSE)
	touch $@

## submission: IMAGE -> the upload file (docker save | gzip), loaded back and run on a case
submission: setup
	$(BIN)/python -m container.submission --image $(IMAGE) -o $(SUBMISSION)

## bench-container: image sizes, build times, per-case overhead of the organizers' command
bench-container: setup
	$(BIN)/python -m benchmarks.container

print-%:
	@echo '$($*)'

clean:
	rm -rf demo_out bench_out build .pytest_cache .ruff_cache

# -- GPU check (benchmarks/README.md, "GPU check") -------------------------------------------
.PHONY: gpu-wheels gpu-check

## gpu-wheels: the wheels gpu-check carries to a GPU machine without network (.whl/, <= 60 MiB)
gpu-wheels: setup
	$(BIN)/python -m scripts.gpu_wheels --out .whl

## gpu-check: the one GPU run (<= 8 min) that fills the GPU section of benchmarks/RESULTS.md.
## Runs with the machine's own $(PYTHON) (torch with CUDA), no venv and no network; results
## in $OUT when set, else bench_out/gpu_check.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check

# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
REQS   := requirements.txt requirements-training.txt requirements-profiling.txt \
          requirements-dev.txt constraints.txt

.PHONY: setup demo test lint format demo-model bench clean

setup: $(STAMP)

$(STAMP): $(REQS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

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

clean:
	rm -rf demo_out bench_out .pytest_cache .ruff_cache

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

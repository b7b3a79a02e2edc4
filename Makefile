# Two commands do all the set-up: `make demo` and `make test`. Both create or refresh .venv from
# the pinned constraints.txt; that step is a no-op when the environment is already up to date.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.imgclf-installed
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: env demo test lint fmt bench gpu-check lock clean system-deps heldin-data

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/imgclf demo

# The browser tests drive Debian's Chromium, the distributed-sweep tests a real PostgreSQL:
# install them (Debian packages) when they are missing.
system-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
	  && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver postgresql >/dev/null; \
	  else echo "install Debian's chromium, chromium-driver and postgresql (sudo apt-get install ...)"; exit 1; fi; }

test: $(STAMP) system-deps
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

fmt: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/scan.py
	$(BIN)/python benchmarks/train_loop.py

# The held-in development data set for `imgclf fit` (Debian's openclipart-png, 9 classes) into
# $IMGCLF_CACHE/datasets/openclipart9; a no-op when already there (benchmarks/heldin_data.py).
heldin-data: $(STAMP)
	$(BIN)/python benchmarks/heldin_data.py

# Every CUDA code path at small size + throughput, on a GPU machine (benchmarks/gpu_check.py;
# without a GPU it says so and exits 0). Never builds .venv: GPU machines often have no network,
# so without .venv it uses python3 with torch, timm, lightning, … already installed.
gpu-check:
	@if [ -x $(BIN)/python ]; then $(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS); \
	else PYTHONPATH=src $(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS); fi

# Re-pin every package in the environment (run after changing dependencies in pyproject.toml).
lock: $(STAMP)
	{ echo "# Exact versions installed by make (pip install -c constraints.txt). Regenerate with 'make lock'."; \
	  $(BIN)/python -m pip freeze --exclude-editable; } > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

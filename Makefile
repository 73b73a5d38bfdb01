# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both first run `setup`, which is idempotent: it only does what is missing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slipstream-setup
DEB_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-fast lint bundle bundle-check gpu-check clean

setup: $(STAMP)

# FFCV 1.0.2 builds from source against OpenCV and libjpeg-turbo.
$(STAMP): pyproject.toml
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	@# DeepSpeed JIT-compiles its CPU shared-memory comm op on first use (minutes); do it once here.
	DS_ACCELERATOR=cpu $(PY) -m trainer.engine --prebuild
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/slip demo --out runs/demo

test: setup
	$(PY) -m pytest -q

# The unit tier only: seconds, for the edit-test loop.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The import layers (import-linter's contracts in pyproject.toml) and ruff; `make test` runs them too.
lint: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

# The offline bundle for a bare CUDA node (Python 3.12): build/bundle/part-* + manifest.json + install.py.
# Needs a Python 3.12 here (pyenv's, or PYTHON312=...), cmake and a compiler (FFCV's OpenCV, built once).
bundle: setup
	$(PY) tools/bundle.py

# The bundle rehearsed: a Python 3.12 environment like the node's image, the bundle installed with
# --no-index, then imports, `slip --help`, the loss kernels' tests and a training step (minutes).
bundle-check: bundle
	$(PY) tools/bundle_check.py

# The GPU checks and measurements, each step's JSON in OUT (see tools/gpu_check.py). On a node
# without this Makefile's venv: `python3 tools/gpu_check.py --out DIR` after sourcing the bundle's env.sh.
OUT ?= gpu-check
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) tools/gpu_check.py --out $(OUT)

clean:
	rm -rf runs data .pytest_cache

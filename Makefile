# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both first run `setup`, which is idempotent: it only does what is missing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slipstream-setup
DEB_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-fast lint clean

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

clean:
	rm -rf runs data .pytest_cache

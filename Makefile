# The two entry points a newcomer needs: `make demo` and `make test`. Both create .venv when
# missing: `demo` with what the demo runs (the package and its dependencies), `test` with the
# dev extra on top (pytest, moto, Optuna, Ray Serve, Playwright, FAISS).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed-core
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean-venv

$(CORE): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $(CORE)

$(STAMP): $(CORE)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Build CSS-synth `small` shards if missing, train ComposeAE on 2 CPU workers, print the recall table.
demo: $(CORE)
	$(BIN)/python jobs/train.py --config jobs/configs/demo.yaml

# The page's browser test drives Debian's chromium (Playwright's own browser download is not
# used): installed with apt-get when missing, so on another distribution put a Chromium at
# /usr/bin/chromium first.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

test: $(STAMP)
	test -x /usr/bin/chromium || { command -v apt-get >/dev/null || { echo "error: make test \
	    needs /usr/bin/chromium (Debian's chromium package; apt-get not found)" >&2; exit 2; }; \
	    $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium; }
	$(BIN)/python -m pytest -q --durations=25 tests

bench: $(STAMP)
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)

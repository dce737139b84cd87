# The two entry points a newcomer needs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Build CSS-synth `small` shards if missing, train ComposeAE on 2 CPU workers, print the recall table.
demo: $(STAMP)
	$(BIN)/python jobs/train.py --config jobs/configs/demo.yaml

# The page's browser test drives Debian's chromium (Playwright's own browser download is not used).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

test: $(STAMP)
	test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && $(SUDO) env \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }
	$(BIN)/python -m pytest -q --durations=25 tests

bench: $(STAMP)
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)

# Two set-up commands: `make demo` and `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean tools
# Prometheus + promtool for the tests (Debian's package, unpacked here; tools/ops/get_prometheus.sh).
PROM := .tools/prometheus/usr/bin/prometheus

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: on these machines it resolves to a local CPU build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/livemb demo

$(PROM):
	bash tools/ops/get_prometheus.sh .tools/prometheus

tools: $(PROM)

test: $(STAMP) $(PROM)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .tools .pytest_cache build *.egg-info

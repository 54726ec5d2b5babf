# Two set-up commands: `make demo` and `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean tools constraints
# Prometheus + promtool for the tests (Debian's package, unpacked here; tools/ops/get_prometheus.sh).
PROM := .tools/prometheus/usr/bin/prometheus
# The exact versions of a tested build: every install below is constrained by it (README "Install").
CONSTRAINTS := constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, at the version constraints.txt pins: on these machines it resolves to a local CPU build.
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

# Regenerate constraints.txt from the working .venv (after upgrading a package in it and running
# `make test`): every installed distribution but livemb itself, exactly; torch without its local
# build label (+cpu, +cu128), which `==` ignores, so the same file serves the CPU and the CUDA builds.
constraints: $(STAMP)
	{ echo "# The versions of a tested build (make constraints; README \"Install\"). Used with pip install -c."; \
	  $(BIN)/pip freeze --exclude-editable | grep -iv '^livemb==' | sed -E 's/^(torch==[^+]+)[+].*/\1/'; } > $(CONSTRAINTS)

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

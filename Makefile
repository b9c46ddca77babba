# fedtl: every target sets itself up (virtualenv + install) on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export FLWR_TELEMETRY_ENABLED := 0

.PHONY: test demo bench install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# Two pytest-xdist workers, one module per work unit (module-scoped federations start once);
# tests/conftest.py hands out the longest modules first.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

demo: $(STAMP)
	$(VENV)/bin/fedtl simulate --config simulations/configs/demo.toml --out runs/demo --overwrite

bench: $(STAMP)
	$(PY) -m simulations.benchmarks.benchmark --out runs/bench.json

clean:
	rm -rf $(VENV) runs .pytest_cache

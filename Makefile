PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint bench model-table clean

# The environment is (re)built whenever setup.py changes; every install step lives here.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests data_pipeline zeroshot

test: lint
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m crate_alpha.bench
	$(PY) -m data_pipeline bench

model-table: $(STAMP)
	$(PY) -m crate_alpha.model_table

clean:
	rm -rf $(VENV) runs

# ---- data pipeline ------------------------------------------------------------------
DATA_OUT ?= runs/demo/data
METADATA ?= metadata
SHARDS ?= shards
.PHONY: data-demo data-download data-verify bench-data

data-demo: $(STAMP)
	$(PY) -m data_pipeline demo --out $(DATA_OUT)

data-download: $(STAMP)
	$(PY) -m data_pipeline download $(METADATA) --out $(SHARDS)

data-verify: $(STAMP)
	$(PY) -m data_pipeline verify $(SHARDS)

bench-data: $(STAMP)
	$(PY) -m data_pipeline bench

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv venv-xla test test-xla lint bench model-table clean

# The environment is (re)built whenever setup.py or its constraint file changes; every
# install step lives here. Exact versions: constraints/main.txt (setup.py states ranges).
$(STAMP): setup.py constraints/main.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install --no-compile -c constraints/main.txt -e ".[dev,spark]"
	touch $(STAMP)

# The XLA environment: torch 2.9.0 + torch_xla 2.9.0 (constraints/xla.txt), tests on XLA:CPU.
XLA_VENV := .venv-xla
XLA_PY := $(XLA_VENV)/bin/python
XLA_STAMP := $(XLA_VENV)/.installed
$(XLA_STAMP): setup.py constraints/xla.txt
	test -x $(XLA_PY) || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_PY) -m pip install --upgrade pip
	$(XLA_PY) -m pip install --no-compile -c constraints/xla.txt -e ".[dev,tpu]"
	touch $(XLA_STAMP)

venv-xla: $(XLA_STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests data_pipeline zeroshot configs

test: lint
	$(PY) -m pytest -q tests --ignore=tests/xla

# XLA:CPU (PJRT_DEVICE=CPU): both trainers on an XLA device, and the model/open_clip tests
# again on torch 2.9 (the library supports both environments)
test-xla: $(XLA_STAMP)
	PJRT_DEVICE=CPU $(XLA_PY) -m pytest -q tests/xla tests/test_model.py tests/test_open_clip.py

# every target below runs the one command line, crate-alpha (src/crate_alpha/cli.py)
CLI := $(VENV)/bin/crate-alpha

bench: $(STAMP) $(XLA_STAMP)
	$(CLI) bench
	$(CLI) bench --clipa
	$(CLI) bench --optimizer
	PJRT_DEVICE=CPU $(XLA_VENV)/bin/crate-alpha bench --xla
	$(CLI) data bench

model-table: $(STAMP)
	$(CLI) model-table

clean:
	rm -rf $(VENV) $(XLA_VENV) runs

# ---- data pipeline ------------------------------------------------------------------
DATA_OUT ?= runs/demo/data
METADATA ?= metadata
SHARDS ?= shards
.PHONY: data-demo data-download data-verify bench-data

data-demo: $(STAMP)
	$(CLI) data demo --out $(DATA_OUT)

data-download: $(STAMP)
	$(CLI) data download $(METADATA) --out $(SHARDS)

data-verify: $(STAMP)
	$(CLI) data verify $(SHARDS)

bench-data: $(STAMP)
	$(CLI) data bench
	$(CLI) data bench --download 2000

# ---- CLIPA training ----------------------------------------------------------------
# make pretrain DATA='shards/{00000..00099}.tar' NPROC=8 [NNODES=2 TORCHRUN_ARGS='--rdzv-endpoint host:29500'] ARGS='global_batch=4096'
# make pretrain DEVICE=xla DATA=... [ARGS='fsdp=True']   (TPU: one process per chip via torch_xla's launcher)
RECIPE ?= configs/clipa_crate_alpha_L14_84_pretrain.py
FT_RECIPE ?= configs/clipa_crate_alpha_L14_224_finetune.py
DATA ?=
OUT ?= runs/clipa
NPROC ?= 1
NNODES ?= 1
TORCHRUN_ARGS ?=
ARGS ?=
DEVICE ?=
# DEVICE=xla: the XLA environment's python, and torch_xla's launcher instead of torchrun
ON_XLA = $(filter xla,$(DEVICE))
ENV_STAMP = $(if $(ON_XLA),$(XLA_STAMP),$(STAMP))
LAUNCH = $(if $(ON_XLA),$(XLA_PY),$(if $(filter 11,$(NPROC)$(NNODES)),$(PY),$(VENV)/bin/torchrun --nnodes $(NNODES) --nproc_per_node $(NPROC) $(TORCHRUN_ARGS)))
DEVICE_ARG = $(if $(DEVICE),device=$(DEVICE))
RUN = $(LAUNCH) -m crate_alpha.cli
.PHONY: pretrain finetune demo demo-baseline demo-segment

pretrain: $(ENV_STAMP)
	$(RUN) pretrain $(RECIPE) $(if $(DATA),"train_data=$(DATA)") logs=$(OUT) $(DEVICE_ARG) $(ARGS)

finetune: $(ENV_STAMP)
	$(RUN) finetune $(FT_RECIPE) $(if $(DATA),"train_data=$(DATA)") logs=$(OUT) $(DEVICE_ARG) $(ARGS)

demo: $(STAMP)
	$(CLI) demo --fresh

demo-baseline: $(STAMP)
	$(CLI) demo --fresh --baseline

# CRATE-α, CRATE and ViT digit classifiers on photo crops, same wall-clock budget; MaskCut/attention mIoU
demo-segment: $(STAMP)
	$(CLI) demo-segment --out runs/demo-segment

# ---- classification ------------------------------------------------------------------
CLS_RECIPE ?= configs/cls_crate_alpha_B16_in21k_pretrain.py
CLS_FT_RECIPE ?= configs/cls_crate_alpha_B16_in1k_finetune.py
VAL ?=
CKPT ?=
MODEL ?=
EVAL_OUT ?= runs/cls/eval.json
.PHONY: cls-pretrain cls-finetune cls-eval demo-cls

cls-pretrain: $(ENV_STAMP)
	$(RUN) cls-train $(CLS_RECIPE) $(if $(DATA),"train_data=$(DATA)") $(if $(VAL),"val_data=$(VAL)") $(DEVICE_ARG) $(ARGS)

cls-finetune: $(ENV_STAMP)
	$(RUN) cls-train $(CLS_FT_RECIPE) $(if $(DATA),"train_data=$(DATA)") $(if $(VAL),"val_data=$(VAL)") $(DEVICE_ARG) $(ARGS)

# make cls-eval VAL=/data/imagenet/val MODEL=local-dir:out/crate-alpha-L14   (or CKPT=runs/cls/.../latest.pt)
cls-eval: $(STAMP)
	$(CLI) cls-eval --data "$(VAL)" --output $(EVAL_OUT) $(if $(MODEL),--model "$(MODEL)") $(if $(CKPT),--checkpoint "$(CKPT)")

demo-cls: $(STAMP)
	$(CLI) demo-cls --fresh

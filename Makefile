# kfyolo developer commands. `make help` lists them. `make test` and `make demo` bootstrap
# everything they need (uv, then the locked virtual environment) on a machine with only python3.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON     ?= python3
UV_VERSION := 0.13.9
TOOLS      := .tools
UV         := $(TOOLS)/bin/uv
VENV       := .venv
PY         := $(VENV)/bin/python

# demo / train settings (override on the command line: make demo IMGSZ=128 EPOCHS=5)
DATA       ?= data/synthetic/data.yaml
SYN_IMAGES ?= 400
SYN_SEED   ?= 0
IMGSZ      ?= 256
EPOCHS     ?= 30
BATCH      ?= 16
CFG        ?= yolov5n
WEIGHTS    ?=
DEVICE     ?= cpu
RUNS       ?= runs

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: DATA SYN_IMAGES SYN_SEED IMGSZ EPOCHS BATCH CFG WEIGHTS DEVICE RUNS"

$(UV):
	@echo "bootstrapping uv $(UV_VERSION) into $(TOOLS)/"
	@# Ignore any site pip config (some machines point pip at a private CPU-only torch wheel).
	@$(PYTHON) -m venv $(TOOLS) && PIP_CONFIG_FILE=/dev/null $(TOOLS)/bin/pip install --quiet \
	  --disable-pip-version-check uv==$(UV_VERSION) \
	|| (rm -rf $(TOOLS) && PIP_CONFIG_FILE=/dev/null $(PYTHON) -m pip install --quiet \
	  --disable-pip-version-check --target $(TOOLS)/pkgs uv==$(UV_VERSION) \
	  && mkdir -p $(TOOLS)/bin && ln -sf ../pkgs/bin/uv $(UV))

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --python $(PYTHON)
	@touch $@

venv: $(VENV)/.synced ## create or refresh .venv from uv.lock (torch, torchvision, kfp, ...)

test: venv ## run the test suite (CPU; GPU tests skip without CUDA)
	$(PY) -m pytest -q

data/synthetic/data.yaml: | venv
	$(PY) -m trainer.data.synthetic --out data/synthetic --images $(SYN_IMAGES) --seed $(SYN_SEED) --imgsz $(IMGSZ)

synthetic: data/synthetic/data.yaml ## generate the synthetic shapes dataset into data/synthetic

demo: venv data/synthetic/data.yaml ## train yolov5n on the synthetic dataset with image weights (CPU)
	$(PY) -m trainer.train --data $(DATA) --cfg $(CFG) $(if $(WEIGHTS),--weights $(WEIGHTS)) --imgsz $(IMGSZ) \
	  --epochs $(EPOCHS) --batch-size $(BATCH) --image-weights --device $(DEVICE) --project $(RUNS)/train --name demo

train: venv ## train with DATA/CFG/WEIGHTS/IMGSZ/EPOCHS/BATCH/DEVICE (single process)
	$(PY) -m trainer.train --data $(DATA) --cfg $(CFG) $(if $(WEIGHTS),--weights $(WEIGHTS)) --imgsz $(IMGSZ) \
	  --epochs $(EPOCHS) --batch-size $(BATCH) --device $(DEVICE) --project $(RUNS)/train

bench-train: venv data/synthetic/data.yaml ## bench: 30-epoch synthetic run, prints the mAP curve and wall time
	$(PY) bench/bench_train_synthetic.py --data $(DATA) --imgsz $(IMGSZ) --epochs $(EPOCHS)

bench-cocoeval: venv ## bench: kfyolo COCO evaluation vs pycocotools on 5,000 images
	$(PY) bench/bench_cocoeval.py

tensorboard: venv ## serve TensorBoard over the runs folder (RUNS)
	$(VENV)/bin/tensorboard --logdir $(RUNS) --bind_all

clean: ## remove generated data and runs (keeps .venv)
	rm -rf data/synthetic $(RUNS) .pytest_cache

.PHONY: help venv test synthetic demo train bench-train bench-cocoeval tensorboard clean

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
comma      := ,

# demo / train settings (override on the command line: make demo BLOCKS=2 EPB=10)
DATA       ?=
WEIGHTS    ?=
SYN_IMAGES ?= 1500
SYN_SEED   ?= 0
BLOCKS     ?= 3
EPB        ?= 10
WORKERS    ?= 2
IMGSZ      ?= 128
BATCH      ?= 16
EPOCHS     ?= 30
# From scratch on a CPU: AdamW and a nominal batch of 16 (4x YOLOv5's optimizer steps for the same
# images) learn the demo set about twice as fast as SGD at 64 (bench/study_sampling.py's notes).
# The sampler is the study's winner on the long-tail set (README, "Samplers").
OPTIMIZER  ?= AdamW
NBS        ?= 16
HYP        ?= lr0=0.002
SAMPLER    ?= classic
VAL_EVERY  ?= 3
CFG        ?= yolov5n
DEVICE     ?=
RUNS       ?= runs
PORT       ?= 6006
HOST       ?= 0.0.0.0
IMAGE      ?= kfyolo:0.1.0
K8S_VERSION ?= 1.37.0

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: DATA WEIGHTS SYN_IMAGES SYN_SEED BLOCKS EPB WORKERS IMGSZ BATCH EPOCHS CFG DEVICE OPTIMIZER NBS HYP"
	@echo "             SAMPLER VAL_EVERY RUNS IMAGE K8S_VERSION"

$(UV):
	@echo "bootstrapping uv $(UV_VERSION) into $(TOOLS)/"
	@# Ignore any site pip config (some machines point pip at a private CPU-only torch wheel).
	@$(PYTHON) -m venv $(TOOLS) && PIP_CONFIG_FILE=/dev/null $(TOOLS)/bin/pip install --quiet \
	  --disable-pip-version-check uv==$(UV_VERSION) \
	|| (rm -rf $(TOOLS) && PIP_CONFIG_FILE=/dev/null $(PYTHON) -m pip install --quiet \
	  --disable-pip-version-check --target $(TOOLS)/pkgs uv==$(UV_VERSION) \
	  && mkdir -p $(TOOLS)/bin && ln -sf ../pkgs/bin/uv $(UV))

# --compile-bytecode: every step, rank and test subprocess imports torch; without .pyc files (and
# machines with PYTHONDONTWRITEBYTECODE=1 never write them) each import compiles torch, torchvision
# and matplotlib from source again: 13-14 s per process here instead of about 5 s. Compiling once
# at install takes about 22 s on 2 cores.
$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	@# The export extra (onnx, onnxruntime): the ONNX tests and the pipeline's export step need it.
	$(UV) sync --frozen --extra export --compile-bytecode --python $(PYTHON)
	@touch $@

$(VENV)/.synced-run: $(UV) pyproject.toml uv.lock
	@# What running needs, without the test tools (pytest, moto, pycocotools, ...); --inexact keeps them
	@# when `make test` installed them already.
	$(UV) sync --frozen --no-dev --inexact --extra export --compile-bytecode --python $(PYTHON)
	@touch $@

venv: $(VENV)/.synced ## create or refresh .venv from uv.lock with the test tools (torch, torchvision, kfp, pytest, ...)

venv-run: $(VENV)/.synced-run ## create or refresh .venv with what running needs only (demo, train, compile)

test: venv ## run the test suite (CPU; GPU tests skip without CUDA)
	$(PY) -m pytest -q

data/synthetic/data.yaml: | venv-run
	$(PY) -m trainer.data.synthetic --out data/synthetic --images $(SYN_IMAGES) --seed $(SYN_SEED) --imgsz 128 --long-tail

synthetic: data/synthetic/data.yaml ## generate the synthetic shapes dataset into data/synthetic

demo: venv-run ## the whole pipeline locally (kfp.local): synthetic data, 3 blocks, world size 2, image weights (CPU)
	$(PY) -m pipelines run-local --blocks $(BLOCKS) --epochs-per-block $(EPB) --workers $(WORKERS) --imgsz $(IMGSZ) \
	  --batch-size $(BATCH) --synthetic-images $(SYN_IMAGES) --seed $(SYN_SEED) --root $(RUNS)/pipelines \
	  --optimizer $(OPTIMIZER) --nbs $(NBS) --hyp-overrides "$(HYP)" --sampler $(SAMPLER) --val-every $(VAL_EVERY) \
	  $(if $(DATA),--data $(DATA)) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(DEVICE),--device $(DEVICE))

compile: venv-run ## compile the pipeline to pipeline.yaml for the Kubeflow Pipelines UI
	$(PY) -m pipelines compile --out pipeline.yaml --blocks $(BLOCKS)

train: venv-run data/synthetic/data.yaml ## one training run (single process) with DATA/CFG/WEIGHTS/IMGSZ/EPOCHS/BATCH/DEVICE
	$(PY) -m trainer.train --data $(or $(DATA),data/synthetic/data.yaml) --cfg $(CFG) $(if $(WEIGHTS),--weights $(WEIGHTS)) \
	  --imgsz $(IMGSZ) --epochs $(EPOCHS) --batch-size $(BATCH) --sampler $(SAMPLER) --val-every $(VAL_EVERY) \
	  --optimizer $(OPTIMIZER) --nbs $(NBS) $(foreach h,$(subst $(comma), ,$(HYP)),--hyp-override $(h)) $(if $(DEVICE),--device $(DEVICE)) \
	  --project $(RUNS)/train

bench-train: venv-run ## bench: 30-epoch synthetic run at 256 px, prints the mAP curve and wall time
	$(PY) bench/bench_train_synthetic.py

bench-ddp: venv ## bench: training images/s at world size 1 and 2 with the same threads
	$(PY) bench/bench_ddp.py

bench-cocoeval: venv ## bench: kfyolo COCO evaluation vs pycocotools on 5,000 images
	$(PY) bench/bench_cocoeval.py

bench-gpu: venv ## bench: CUDA AMP + channels_last (+ compile) training, DDP/NCCL and val img/s (needs a GPU and ../shared)
	$(PY) bench/bench_gpu.py

bench-step: venv ## bench: the training step alone, fp32/bf16 x NCHW/channels_last, with gradient agreement
	$(PY) bench/bench_train_step.py

bench-predict: venv ## bench: predict img/s at 640, PyTorch vs ONNX Runtime, beside evaluate, on COCO128 (needs ../shared)
	$(PY) bench/bench_predict.py

bench-yolov5: venv $(UV) ## bench: kfyolo vs ultralytics YOLOv5 v7.0 (throw-away venv) on COCO128 (~15 min; needs ../shared)
	$(PY) bench/bench_vs_yolov5.py

study: venv ## the sampler study: every sampler at equal compute, 3 held-out seeds, long-tail set + COCO128 (~2 h)
	$(PY) bench/study_sampling.py

study-quick: venv ## the sampler study's smoke run: one seed, short runs (~15 min)
	$(PY) bench/study_sampling.py --quick --out $(RUNS)/study_sampling_quick

image: ## build the image every step and PyTorchJob pod runs (IMAGE=registry/kfyolo:TAG; needs docker)
	@command -v docker > /dev/null || { echo "make image needs docker, which is not on PATH"; exit 1; }
	@name="$(lastword $(subst /, ,$(IMAGE)))"; tag="$${name##*:}"; \
	if [ "$$tag" = "$$name" ] || [ "$$tag" = latest ]; then echo "IMAGE=$(IMAGE): pin a tag other than latest"; exit 1; fi
	docker build -t $(IMAGE) .

lint-k8s: venv ## validate k8s/*.yaml and the compiled cluster pipelines (kubernetes-validate --strict; PyTorchJob CRD; TrainJob CRD + CEL)
	$(VENV)/bin/kubernetes-validate --strict --quiet -k $(K8S_VERSION) \
	  $(filter-out k8s/kustomization.yaml k8s/pytorchjob.yaml k8s/trainjob.yaml,$(wildcard k8s/*.yaml))
	$(PY) -m pytest -q tests/test_k8s_manifests.py tests/test_trainjob_manifests.py

tensorboard: venv-run ## serve TensorBoard over the runs folder (RUNS) on PORT, on every interface (HOST=localhost to keep it local)
	@echo "TensorBoard on http://$(HOST):$(PORT)/ over $(RUNS)$(if $(filter 0.0.0.0,$(HOST)), (bound to all interfaces: anyone who can reach this machine can read it),)"
	$(VENV)/bin/tensorboard --logdir $(RUNS) --host $(HOST) --port $(PORT)

clean: ## remove generated data and runs (keeps .venv)
	rm -rf data/synthetic $(RUNS) .pytest_cache

.PHONY: help venv venv-run test synthetic demo compile train bench-train bench-ddp bench-cocoeval bench-step bench-gpu bench-predict bench-yolov5 study study-quick image lint-k8s tensorboard clean

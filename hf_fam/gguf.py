# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Reading GGUF files (de-quantized by transformers) into ordinary, serializable models."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from .io_utils import atomic_directory


logger = logging.get_logger(__name__)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, object]:
    """De-quantize a GGUF file into a plain causal LM of `dtype` and its tokenizer.

    transformers marks a GGUF-loaded model as not serializable, so the weights are moved into a model built from the
    same configuration, which `save_pretrained` writes as ordinary safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError("Reading GGUF files needs the `gguf` package: pip install gguf") from error
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(
            f"transformers could not read {path.name} ({error}). The file may be truncated or corrupted, or hold an "
            "architecture or quantization type transformers cannot de-quantize."
        ) from error
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{path.name} lacks weights for {missing[:5]}; the file may be truncated.")
    # Non-persistent buffers (rotary frequencies) are not in the state dict: take them from the loaded model.
    for name, buffer in loaded.named_buffers():
        module_name, _, buffer_name = name.rpartition(".")
        model.get_submodule(module_name)._buffers[buffer_name] = buffer
    model.generation_config = loaded.generation_config
    model.name_or_path = str(path)
    return model.eval(), tokenizer


def export_gguf_to_safetensors(path: str | os.PathLike, output_dir: str | os.PathLike, dtype=torch.float32) -> Path:
    """Write the de-quantized model and tokenizer of a GGUF file to `output_dir` as a plain checkpoint folder."""
    model, tokenizer = load_gguf(path, dtype=dtype)
    with atomic_directory(output_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output_dir)

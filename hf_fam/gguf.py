# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Reading GGUF files (de-quantized by transformers) into ordinary, serializable models."""

from __future__ import annotations

import copy
import os
import struct
from collections.abc import Callable
from pathlib import Path

from transformers.utils import logging

from .io_utils import atomic_directory


logger = logging.get_logger(__name__)

# GGUF metadata value types (gguf spec): type id -> struct format of a scalar; 8 is a string, 9 an array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# llama.cpp architecture names whose transformers model_type is spelled differently
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}


def gguf_string_field(path: str | os.PathLike, key: str) -> str | None:
    """A string field of a GGUF file's metadata (e.g. `general.architecture`), read from the header alone:
    milliseconds, where `gguf.GGUFReader` parses every field (the vocabulary too) for seconds.

    None when the file is not GGUF or the key is not among the first 64 (llama.cpp and gguf-py write the `general.*`
    keys first).
    """

    def read(f, fmt):
        data = f.read(struct.calcsize(fmt))
        if len(data) != struct.calcsize(fmt):
            raise EOFError
        return struct.unpack("<" + fmt, data)[0]

    def read_string(f):
        return f.read(read(f, "Q")).decode("utf-8", errors="replace")

    def skip_value(f, kind):
        if kind == 8:
            f.seek(read(f, "Q"), os.SEEK_CUR)
        elif kind == 9:
            item_kind, count = read(f, "I"), read(f, "Q")
            for _ in range(count):
                skip_value(f, item_kind)
        else:
            f.seek(struct.calcsize(_GGUF_SCALARS[kind]), os.SEEK_CUR)

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or read(f, "I") < 2:
                return None
            read(f, "Q")  # tensor count
            for _ in range(min(read(f, "Q"), 64)):
                name, kind = read_string(f), read(f, "I")
                if name == key and kind == 8:
                    return read_string(f)
                skip_value(f, kind)
    except (EOFError, KeyError, OSError, ValueError):
        return None
    return None


def gguf_model_type(architecture: str) -> str:
    """The transformers model_type of a llama.cpp architecture name."""
    return _GGUF_MODEL_TYPES.get(architecture, architecture)


def load_gguf(path: str | os.PathLike, dtype=None, progress: Callable[[str], None] | None = None):
    """De-quantize a GGUF file into a plain causal LM of `dtype` (default float32) and its tokenizer.

    transformers marks a GGUF-loaded model as not serializable, so the weights are moved into a model built from the
    same configuration, which `save_pretrained` writes as ordinary safetensors. `progress` receives a line per step
    (the steps take seconds to minutes); without it they are logged at info level.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    say = progress or logger.info
    dtype = torch.float32 if dtype is None else dtype
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError("Reading GGUF files needs the `gguf` package: pip install gguf") from error
    try:
        say(f"Reading the metadata of {path.name} ({path.stat().st_size / 2**20:,.0f} MiB) ...")
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        say(f"De-quantizing its weights ({config.model_type}, {config.num_hidden_layers} layers): transformers reads the file again, then shows its progress ...")
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=dtype)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(
            f"transformers could not read {path.name} ({error}). The file may be truncated or corrupted, or hold an "
            "architecture or quantization type transformers cannot de-quantize."
        ) from error
    say("Building the tokenizer from the GGUF vocabulary ...")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    say(f"Moving the de-quantized weights into a plain {type(loaded).__name__} ...")
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


def export_gguf_to_safetensors(path: str | os.PathLike, output_dir: str | os.PathLike, dtype=None) -> Path:
    """Write the de-quantized model and tokenizer of a GGUF file to `output_dir` as a plain checkpoint folder."""
    model, tokenizer = load_gguf(path, dtype=dtype)
    with atomic_directory(output_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output_dir)

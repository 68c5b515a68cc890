# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""hf-fam: TransformerFAM (block sliding window attention + feedback attention memory) for Hugging Face decoders."""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache_fam import FamCache
from .configuration_fam import FamConfig
from .conversion import convert_to_fam, unconvert
from .modeling_fam import SUPPORTED_MODEL_TYPES, FamForCausalLM, FamPrompt, UnsupportedArchitectureError
from .streaming import stream_hidden_states, stream_log_likelihood


__version__ = "0.1.0.dev0"

AutoConfig.register(FamConfig.model_type, FamConfig, exist_ok=True)
AutoModelForCausalLM.register(FamConfig, FamForCausalLM, exist_ok=True)
# save_pretrained copies configuration_fam.py, modeling_fam.py and cache_fam.py next to the weights and writes
# `auto_map`, so `trust_remote_code=True` loads a converted folder where hf_fam is not installed.
FamConfig.register_for_auto_class()
FamForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "FamCache",
    "FamConfig",
    "FamForCausalLM",
    "FamPrompt",
    "UnsupportedArchitectureError",
    "convert_to_fam",
    "stream_hidden_states",
    "stream_log_likelihood",
    "unconvert",
]

# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Turning a pretrained causal LM into a [`FamForCausalLM`] and back."""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging

from .calibration import DEFAULT_STEPS, DEFAULT_WINDOW, calibrate_fam_prompt, calibration_ids
from .configuration_fam import FamConfig, validate_fam_settings
from .modeling_fam import FamForCausalLM, UnsupportedArchitectureError, check_supported_config


logger = logging.get_logger(__name__)


def convert_to_fam(
    model_or_path: PreTrainedModel | str | os.PathLike,
    *,
    block_size: int = 1024,
    memory_segments: int = 3,
    fam_length: int = 64,
    fam_prompt_init: str = "random_tokens",
    fam_prompt_token_ids: list[int] | None = None,
    fam_prompt_seed: int = 0,
    fam_update: str = "gated",
    fam_gate_init: float = 0.1,
    calibration_steps: int = DEFAULT_STEPS,
    calibration_text: str | None = None,
    tokenizer=None,
    **from_pretrained_kwargs,
) -> FamForCausalLM:
    """Turn a pretrained causal LM into a TransformerFAM model.

    Args:
        model_or_path: a loaded causal LM (its modules are shared with the result, not copied) or a Hub id / local
            folder, loaded with `AutoModelForCausalLM.from_pretrained(model_or_path, **from_pretrained_kwargs)`.
        block_size, memory_segments, fam_length: B, M and F (see [`FamConfig`]).
        fam_prompt_init, fam_prompt_token_ids, fam_prompt_seed: how the FAM prompt starts (see [`FamConfig`]).
        fam_update, fam_gate_init: how the FAM state follows a completed block (see [`FamConfig`]); `"replace"` is
            the paper's rule, `"gated"` (the default) keeps an untrained FAM state near its start.
        calibration_steps: steps of [`calibrate_fam_prompt`]: the prompt alone is fitted so that the converted model
            matches BSWA (itself without FAM) on a real text, which removes most of what an untrained FAM costs. 0
            skips it. It needs a tokenizer: `tokenizer`, or the one in the folder / Hub repo of `model_or_path` (or
            of `model.name_or_path`); without one the prompt is left as initialised, with a warning.
        calibration_text: the text to calibrate on (default: the Python documentation that ships with CPython).
        tokenizer: the tokenizer of the model, for the calibration.
        from_pretrained_kwargs: passed to `from_pretrained` when a path is given (`revision`, `dtype`, `gguf_file`,
            `token`, ...).

    Returns:
        [`FamForCausalLM`]: every weight is the base model's; `fam_prompt.weight` (and `fam_gate.weight` for the
        gated update) is new.
    """
    validate_fam_settings(block_size, memory_segments, fam_length)
    if isinstance(model_or_path, (str, os.PathLike)):
        if from_pretrained_kwargs.get("gguf_file") is None:
            # Refuse an unsupported architecture before downloading or reading any weights.
            config_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in ("revision", "token", "trust_remote_code", "cache_dir")}
            check_supported_config(AutoConfig.from_pretrained(model_or_path, **config_kwargs))
        model = AutoModelForCausalLM.from_pretrained(model_or_path, **from_pretrained_kwargs)
    elif isinstance(model_or_path, PreTrainedModel):
        if from_pretrained_kwargs:
            raise TypeError(f"Loading options {sorted(from_pretrained_kwargs)} only apply when a path is given.")
        model = model_or_path
    else:
        raise TypeError(
            "convert_to_fam takes a loaded transformers causal LM or a Hub id / local folder, "
            f"got {type(model_or_path).__name__}."
        )
    if isinstance(model, FamForCausalLM):
        raise ValueError("This model is already a FamForCausalLM; use hf_fam.unconvert(model) to get the base back.")
    if hasattr(model, "peft_config"):
        raise UnsupportedArchitectureError(
            "Convert the base model before adding PEFT adapters, or merge them first (model.merge_and_unload())."
        )
    check_supported_config(model.config)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and block_size > max_positions:
        logger.warning(
            f"block_size={block_size} is larger than the base model's max_position_embeddings={max_positions}: tokens "
            "of one block would sit further apart than any the model was trained on, which usually degrades its "
            f"output. Choose a block_size (--block-size) of at most {max_positions}."
        )
    if not getattr(model.config, "architectures", None):  # e.g. a model built from a config or a GGUF file
        model.config.architectures = [type(model).__name__]
    config = FamConfig(
        text_config=model.config,
        block_size=block_size,
        memory_segments=memory_segments,
        fam_length=fam_length,
        fam_prompt_init=fam_prompt_init,
        fam_prompt_token_ids=fam_prompt_token_ids,
        fam_prompt_seed=fam_prompt_seed,
        fam_update=fam_update,
        fam_gate_init=fam_gate_init,
        dtype=model.dtype,
    )
    fam = FamForCausalLM(config, base_model=model)
    fam.fam_prompt.to(device=model.device, dtype=model.dtype)
    if fam.fam_gate is not None:
        fam.fam_gate.to(device=model.device, dtype=model.dtype)
    if getattr(model, "generation_config", None) is not None:
        fam.generation_config = model.generation_config
    fam.name_or_path = model.name_or_path
    fam.train(model.training)  # the base's mode (from_pretrained gives eval), not a new module's default
    if calibration_steps and fam_length > 0:
        _calibrate(fam, calibration_steps, calibration_text, tokenizer, model_or_path, from_pretrained_kwargs)
    return fam


def _calibrate(fam, steps, text, tokenizer, model_or_path, from_pretrained_kwargs) -> None:
    if tokenizer is None:
        source = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else fam.name_or_path
        tokenizer = _load_tokenizer(source, from_pretrained_kwargs) if source else None
    if tokenizer is None:
        logger.warning(
            "The FAM prompt was not calibrated (no tokenizer found for this model): an untrained FAM then costs "
            "quality even where BSWA does not. Pass tokenizer=... to convert_to_fam, or calibration_steps=0 to silence "
            "this."
        )
        return
    ids = calibration_ids(tokenizer, text)
    if text is None and ids.numel() <= DEFAULT_WINDOW:
        logger.warning(
            f"The FAM prompt was not calibrated: this model's tokenizer turns the calibration text into {ids.numel()} "
            "tokens (is it a real tokenizer?). Pass tokenizer=..., or calibration_steps=0 to silence this."
        )
        return
    record = calibrate_fam_prompt(fam, ids, steps=steps)
    record["text"] = "pydoc_data.topics" if text is None else "user text"
    fam.config.fam_calibration = record


def _load_tokenizer(source, from_pretrained_kwargs):
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in ("revision", "token", "trust_remote_code", "cache_dir", "gguf_file")}
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.info(f"No tokenizer for {source}: {error}")
        return None


def unconvert(fam_model: FamForCausalLM) -> PreTrainedModel:
    """The base model class of `fam_model`, sharing its weights (the FAM prompt is dropped)."""
    if not isinstance(fam_model, FamForCausalLM):
        raise TypeError(f"unconvert takes a FamForCausalLM, got {type(fam_model).__name__}")
    text_config = fam_model.config.text_config
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(text_config)
    base.model = fam_model.model
    base.lm_head = fam_model.lm_head
    base.config = text_config
    left_on_meta = [name for name, p in base.named_parameters() if p.device.type == "meta"]
    left_on_meta += [name for name, b in base.named_buffers() if b.device.type == "meta"]
    if left_on_meta:
        raise UnsupportedArchitectureError(
            f"{type(base).__name__} has modules besides model and lm_head ({left_on_meta[:3]}); cannot unconvert."
        )
    for layer in base.model.layers:
        layer.__dict__.pop("_can_checkpoint_with_cache", None)
    if getattr(fam_model, "generation_config", None) is not None:
        base.generation_config = fam_model.generation_config
    return base

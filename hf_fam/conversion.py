# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Turning a pretrained causal LM into a [`FamForCausalLM`] and back."""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging

from .calibration import DEFAULT_STEPS, DEFAULT_WINDOW, calibrate_fam_prompt, calibration_ids
from .configuration_fam import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_FAM_GATE_INIT,
    DEFAULT_FAM_LENGTH,
    DEFAULT_FAM_UPDATE,
    DEFAULT_MEMORY_SEGMENTS,
    FamConfig,
    validate_fam_settings,
)
from .modeling_fam import (
    REASON_SELF_CHECK,
    SUPPORTED_ATTENTION,
    FamForCausalLM,
    UnsupportedArchitectureError,
    check_supported_config,
)


logger = logging.get_logger(__name__)


def convert_to_fam(
    model_or_path: PreTrainedModel | str | os.PathLike,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    memory_segments: int = DEFAULT_MEMORY_SEGMENTS,
    fam_length: int = DEFAULT_FAM_LENGTH,
    fam_prompt_init: str = "random_tokens",
    fam_prompt_token_ids: list[int] | None = None,
    fam_prompt_seed: int = 0,
    fam_update: str = DEFAULT_FAM_UPDATE,
    fam_gate_init: float = DEFAULT_FAM_GATE_INIT,
    fam_sink_length: int = 0,
    verify: bool = True,
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
        fam_sink_length: K, FAM rows that are never updated: an attention sink of their own for every block (see
            [`FamConfig`]); 0, the default, is the rules as written.
        verify: run the conversion self-check (`verify_conversion`): on a short random input, the converted model in
            the base-model limit (fam_length 0, a window covering the input) must give the base model's logits, or
            the conversion is refused with `UnsupportedArchitectureError`. It costs one forward of a few dozen tokens
            through each; False skips it.
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

    Raises:
        `UnsupportedArchitectureError` (its `reason` says why) for a family that cannot be run as TransformerFAM
        exactly, including one that fails the self-check.
    """
    validate_fam_settings(block_size, memory_segments, fam_length)
    if isinstance(model_or_path, (str, os.PathLike)):
        if from_pretrained_kwargs.get("gguf_file") is None:
            # Refuse an unsupported architecture before downloading or reading any weights.
            config_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k in ("revision", "token", "trust_remote_code", "cache_dir")}
            check_supported_config(AutoConfig.from_pretrained(model_or_path, **config_kwargs), layout=True)
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
    _warn_if_span_exceeds_positions(model.config, block_size, memory_segments)
    fam = _fam_around(
        model,
        block_size=block_size,
        memory_segments=memory_segments,
        fam_length=fam_length,
        fam_prompt_init=fam_prompt_init,
        fam_prompt_token_ids=fam_prompt_token_ids,
        fam_prompt_seed=fam_prompt_seed,
        fam_update=fam_update,
        fam_gate_init=fam_gate_init,
        fam_sink_length=fam_sink_length,
    )
    if verify:
        verify_conversion(fam, model)
    if calibration_steps and fam_length > 0:
        _calibrate(fam, calibration_steps, calibration_text, tokenizer, model_or_path, from_pretrained_kwargs)
    return fam


def _warn_if_span_exceeds_positions(base_config, block_size: int, memory_segments: int) -> None:
    """A block's queries reach keys up to (M + 1) * B - 1 positions back (the oldest memory segment's first token):
    warn when that is further than the base model was trained on."""
    max_positions = getattr(base_config, "max_position_embeddings", None)
    span = (memory_segments + 1) * block_size
    if isinstance(max_positions, int) and span > max_positions:
        fits = max_positions // (memory_segments + 1)
        logger.warning(
            f"block_size={block_size} with memory_segments={memory_segments} lets a block's queries reach keys "
            f"{span - 1} positions back, further than the base model's max_position_embeddings={max_positions}: "
            "attention over distances the model was never trained on usually degrades its output. Choose block_size "
            f"(--block-size) and memory_segments (--memory-segments) with (memory_segments + 1) x block_size <= "
            f"{max_positions}" + (f", e.g. block_size {fits} with memory_segments {memory_segments}." if fits else ".")
        )


def _fam_around(model: PreTrainedModel, **settings) -> FamForCausalLM:
    """A `FamForCausalLM` with `settings` (FamConfig fields) around the loaded base `model`, sharing its modules."""
    if not getattr(model.config, "architectures", None):  # e.g. a model built from a config or a GGUF file
        model.config.architectures = [type(model).__name__]
    fam = FamForCausalLM(FamConfig(text_config=model.config, dtype=model.dtype, **settings), base_model=model)
    fam.fam_prompt.to(device=model.device, dtype=model.dtype)
    if fam.fam_gate is not None:
        fam.fam_gate.to(device=model.device, dtype=model.dtype)
    if getattr(model, "generation_config", None) is not None:
        fam.generation_config = model.generation_config
    fam.name_or_path = model.name_or_path
    fam.train(model.training)  # the base's mode (from_pretrained gives eval), not a new module's default
    return fam


def bswa_twin(fam: FamForCausalLM) -> FamForCausalLM:
    """`fam` without FAM: BSWA with the same B and M (fam_length 0), sharing every weight. No warnings: the
    settings were `fam`'s, and any warning about them was given when it was converted."""
    config = fam.config
    return _fam_around(unconvert(fam), block_size=config.block_size, memory_segments=config.memory_segments, fam_length=0)


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
    if ids.numel() <= DEFAULT_WINDOW:
        raise ValueError(
            f"The calibration text (calibration_text= / --calibration-text) has {ids.numel()} tokens; the calibration "
            f"reads windows of {DEFAULT_WINDOW}. Pass a longer text, or leave it out to use the default text."
        )
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


# The self-check's input: one row of this many tokens, cut into blocks of _CHECK_BLOCK with enough memory segments to
# cover it (a partial last block included): the base-model limit of FAM_SPEC rule 7, through the block machinery.
_CHECK_TOKENS = 21
_CHECK_BLOCK = 8
# max |FAM - base| / max |base| allowed in float32/64; in 16-bit, mean |FAM - base| / mean |base| (measured on
# SmolLM2-135M in bfloat16 with sdpa: up to 0.015, and 0.08 for the largest deviation / largest logit).
_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
_CHECK_TOLERANCE_LOW_PRECISION = 0.1


def _checker(base, text_config, memory_segments: int, fam_length: int) -> FamForCausalLM:
    config = FamConfig(
        text_config=text_config,
        block_size=_CHECK_BLOCK,
        memory_segments=memory_segments,
        fam_length=fam_length,
        fam_update="replace",
        dtype=base.dtype,
    )
    checker = FamForCausalLM(config, base_model=base).eval()
    # the base model picks length-dependent rotary frequencies per call; so does the check (at this length both use
    # the short-sequence ones), and the converted model fixes them again on first use
    checker._length_dependent_rotary_per_call = True
    checker.fam_prompt.to(device=base.device, dtype=base.dtype)
    return checker


def verify_conversion(fam: FamForCausalLM, base: PreTrainedModel, seed: int = 0) -> float:
    """The conversion self-check: `fam`'s decoder, run with fam_length 0 and a window that covers a short random
    input, must reproduce `base`'s logits (FAM_SPEC rule 7). Catches a family whose forward does something between
    the embedding and the head that hf-fam's family adapter does not know of (an embedding multiplier, logit
    scaling, extra inputs to its layers...). It also runs two FAM rows over the same input, whose outputs must be
    finite (the initial FAM state sits at negative positions, which some position-dependent scalings cannot take).

    Returns the relative difference; raises `UnsupportedArchitectureError` (reason `self-check failed`) when it is
    above the tolerance of the models' dtype, or when running the decoder layers the FAM way fails.
    """
    text_config = fam.config.text_config
    model_type = text_config.model_type
    implementation = fam.model.config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        logger.warning(
            f"The conversion self-check was skipped: attn_implementation='{implementation}' cannot run TransformerFAM. "
            f"Switch to one of {SUPPORTED_ATTENTION} (model.set_attn_implementation) and call hf_fam.verify_conversion(fam, base)."
        )
        return float("nan")
    vocab = getattr(text_config, "vocab_size", None) or base.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, _CHECK_TOKENS), generator=generator).to(base.device)
    modes = {module: module.training for module in (*base.modules(), *fam.modules())}
    rotary = fam.rotary_emb
    try:
        base.eval()
        with torch.no_grad():
            expected = base(input_ids=ids).logits.float()
            try:
                # the base-model limit: memory segments covering the input, no FAM
                actual = _checker(base, text_config, -(-_CHECK_TOKENS // _CHECK_BLOCK), 0)(input_ids=ids).logits.float()
                # and with FAM rows (the initial state sits at negative positions, rule 2): finite outputs
                fam_logits = _checker(base, text_config, 1, 2)(input_ids=ids).logits
            except UnsupportedArchitectureError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure of the FAM way of driving the layers
                raise UnsupportedArchitectureError(
                    f"Conversion self-check: running '{model_type}' decoder layers block by block failed "
                    f"({type(error).__name__}: {error}). hf-fam cannot drive this family; report it with the model id.",
                    REASON_SELF_CHECK,
                ) from error
    finally:
        for module, training in modes.items():  # train/eval exactly as before, module by module
            module.training = training
        if rotary is not None and hasattr(rotary, "_fam_frequencies_fixed"):
            rotary._fam_frequencies_fixed = False
    if not torch.isfinite(fam_logits).all():
        raise UnsupportedArchitectureError(
            f"Conversion self-check failed for '{model_type}': with FAM rows (fam_length 2) the converted model gives "
            "non-finite logits. The family computes something from positions that the FAM rows' positions (negative "
            "for the initial state, FAM_SPEC rule 2) break, so hf-fam cannot run it as TransformerFAM.",
            REASON_SELF_CHECK,
        )
    tiny = torch.finfo(torch.float32).tiny
    error = (actual - expected).abs()
    if base.dtype in _CHECK_TOLERANCE:  # exact arithmetic up to rounding: the largest deviation counts
        difference, tolerance = error.max().item() / max(expected.abs().max().item(), tiny), _CHECK_TOLERANCE[base.dtype]
        measure = "of their scale (largest deviation / largest logit)"
    else:  # 16-bit: reordered sums move single logits by percents; an adapter error moves all of them
        difference, tolerance = error.mean().item() / max(expected.abs().mean().item(), tiny), _CHECK_TOLERANCE_LOW_PRECISION
        measure = "on average (mean deviation / mean logit; a float32 conversion is checked more tightly)"
    if not difference <= tolerance:  # NaN fails too
        raise UnsupportedArchitectureError(
            f"Conversion self-check failed for '{model_type}': in the base-model limit (fam_length 0, a window "
            f"covering {_CHECK_TOKENS} random tokens) the converted model's logits differ from the base model's by "
            f"{difference:.3g} {measure}, above the tolerance {tolerance:g}. The family's forward does something "
            "outside its decoder layers that hf-fam's family adapter does not (see hf_fam.modeling_fam.FAMILY_ADAPTERS), "
            "so its FAM outputs would be wrong. Refusing; convert_to_fam(..., verify=False) / --no-verify skips this "
            "check at your own risk.",
            REASON_SELF_CHECK,
        )
    return difference


def unconvert(fam_model: FamForCausalLM) -> PreTrainedModel:
    """The base model class of `fam_model`, sharing its weights (the FAM prompt is dropped)."""
    if not isinstance(fam_model, FamForCausalLM):
        raise TypeError(f"unconvert takes a FamForCausalLM, got {type(fam_model).__name__}")
    text_config = fam_model.config.text_config
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(text_config)
    setattr(base, base.base_model_prefix, fam_model.model)
    base.set_output_embeddings(fam_model.lm_head)
    base.config = text_config
    left_on_meta = [name for name, p in base.named_parameters() if p.device.type == "meta"]
    left_on_meta += [name for name, b in base.named_buffers() if b.device.type == "meta"]
    if left_on_meta:
        raise UnsupportedArchitectureError(
            f"{type(base).__name__} has modules besides model and lm_head ({left_on_meta[:3]}); cannot unconvert."
        )
    for layer in fam_model.decoder_layers:
        layer.__dict__.pop("_can_checkpoint_with_cache", None)
    if getattr(fam_model, "generation_config", None) is not None:
        base.generation_config = fam_model.generation_config
    return base

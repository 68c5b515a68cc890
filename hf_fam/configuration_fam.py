# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""TransformerFAM configuration.

This file travels into converted checkpoints (``trust_remote_code=True``), so it imports
nothing but ``transformers`` and the standard library.
"""

import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


# The paper's settings (B, M, F), the defaults of FamConfig, `convert_to_fam` and `hf-fam convert`.
DEFAULT_BLOCK_SIZE, DEFAULT_MEMORY_SEGMENTS, DEFAULT_FAM_LENGTH = 1024, 3, 64
DEFAULT_FAM_UPDATE, DEFAULT_FAM_GATE_INIT = "gated", 0.1
FAM_PROMPT_INITS = ("random_tokens", "token_ids", "normal")
# How the FAM state S[l] follows a completed block: "replace" is the paper's rule 5 (the layer's output on the FAM
# rows becomes the state); "gated" moves the state towards that output by a learnable per-layer gate g[l]:
# S[l] <- S[l] + g[l] * (output - S[l]). See FamConfig.
FAM_UPDATES = ("gated", "replace")
# A configuration written before `fam_update` existed used rule 5 as written.
_FAM_UPDATE_BEFORE_OPTION = "replace"
# The order of a forward pass over (block, layer) pairs (FAM_SPEC implementation notes: the results are identical).
LOOP_ORDERS = ("auto", "block", "layer")


def _check_int(name: str, value, minimum: int) -> None:
    # bool is an int subclass; `block_size=True` is a mistake, not a block of one token
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")


def validate_fam_settings(block_size, memory_segments, fam_length) -> None:
    """Raise a `ValueError` naming the field when a FAM setting is out of range."""
    _check_int("block_size", block_size, 1)
    _check_int("memory_segments", memory_segments, 0)
    _check_int("fam_length", fam_length, 0)
    if fam_length > block_size:
        raise ValueError(
            f"fam_length must be <= block_size, got fam_length={fam_length} and block_size={block_size}: "
            "the FAM carries the positions of the last fam_length tokens of the block it compressed"
        )


class FamConfig(PreTrainedConfig):
    r"""
    Configuration of a [`FamForCausalLM`]: the base decoder's own configuration plus the FAM settings.

    Attributes of the base configuration (`hidden_size`, `num_hidden_layers`, `vocab_size`, ...) are readable
    directly on this object; they are stored once, in `text_config`.

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            Configuration of the base decoder (a supported `model_type`, e.g. `llama`, `qwen2`, `gemma2`).
        block_size (`int`, defaults to 1024):
            B: tokens per block of block sliding window attention.
        memory_segments (`int`, defaults to 3):
            M: previous blocks whose keys/values each block attends to (the memory segments).
        fam_length (`int`, defaults to 64):
            F: rows of feedback attention memory per layer. 0 gives plain block sliding window attention.
        fam_prompt_init (`str`, defaults to `"random_tokens"`):
            How the FAM prompt P is initialised when it is not loaded from a checkpoint: `"random_tokens"`
            (`embed_tokens` of `fam_length` token ids drawn with `fam_prompt_seed`), `"token_ids"`
            (`embed_tokens(fam_prompt_token_ids)`) or `"normal"` (N(0, initializer_range)).
        fam_prompt_token_ids (`list[int]`, *optional*):
            Token ids for `fam_prompt_init="token_ids"`; exactly `fam_length` of them.
        fam_prompt_seed (`int`, defaults to 0):
            Seed for the `"random_tokens"` and `"normal"` initialisations.
        fam_update (`str`, defaults to `"gated"`):
            How S[l] follows a completed block. `"replace"`: the layer's output on the FAM rows becomes S[l] (the
            paper's rule, FAM_SPEC rule 5). `"gated"`: S[l] <- S[l] + g[l] * (output - S[l]) with one learnable gate
            g[l] per layer (`fam_gate.weight`, shape (num_hidden_layers,)), initialised to `fam_gate_init`: an
            untrained FAM state then drifts 1/g times slower than under rule 5 (each output adds the layer's
            attention and feed-forward updates to the state's residual), what it holds is kept as under rule 5, and
            training may open the gates (g = 1 is rule 5). A saved configuration without this key predates it and
            means `"replace"`.
        fam_gate_init (`float`, defaults to 0.1):
            Initial value of every gate of the `"gated"` update.
        fam_sink_length (`int`, defaults to 0):
            K: the first K of the F FAM rows are never updated; they keep the state's first K rows as they were at
            the start of the stream (S0[l]'s, or a handed-in state's), in every layer, while the other F - K rows
            follow `fam_update`. Every block's queries see them (they are FAM rows), so they give each block an
            attention sink of its own that no block rewrites, and the memory rows need not double as one (a
            converted model's queries park a fifth to two fifths of their attention on the FAM, and training then
            keeps those rows constant, the opposite of what a memory needs). 0 (the default) is the rules as
            written; K = F is a FAM that never changes (no feedback). Not in the paper: an option of this project.
        loop_order (`str`, defaults to `"auto"`):
            The order in which a forward pass runs its (block, layer) pairs; the results are the same either way.
            `"block"`: each block through every layer, then the next block (what streaming and decoding do).
            `"layer"`: every block of the input through layer 0, then through layer 1, ...: each decoder layer's
            calls follow one another, so a layer whose weights are sharded (torch FSDP2's `fully_shard`, DeepSpeed
            ZeRO-3 once its trace is recorded, when one layer fits in `stage3_max_reuse_distance`) or offloaded
            (accelerate's `device_map` with `offload_folder` / CPU offload) is gathered or loaded once per forward
            pass instead of once per block (and an FSDP2 layer once per backward pass too). It keeps the masks of
            the input's blocks while the pass runs (up to 256 MiB of them; a longer input runs in groups of blocks,
            once per layer and group). `"auto"`:
            `"layer"` when some decoder layer is sharded or offloaded, `"block"` otherwise.
        fam_calibration (`dict`, *optional*):
            A record of how the prompt was calibrated at conversion (see `hf_fam.calibration`): steps, window,
            learning rate, seed and the mean KL to BSWA before and after; None if it was not.
    """

    model_type = "fam"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    memory_segments: int = DEFAULT_MEMORY_SEGMENTS
    fam_length: int = DEFAULT_FAM_LENGTH
    fam_prompt_init: str = "random_tokens"
    fam_prompt_token_ids: list[int] | None = None
    fam_prompt_seed: int = 0
    fam_update: str = DEFAULT_FAM_UPDATE
    fam_gate_init: float = DEFAULT_FAM_GATE_INIT
    fam_sink_length: int = 0
    fam_calibration: dict | None = None
    loop_order: str = "auto"

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As for any configuration; the configuration of a base model (e.g. a Llama folder, whose `model_type` is
        `llama`) is read as a FamConfig of that base with the default FAM settings, instead of a FamConfig of the
        wrong type (peft reads `FamConfig.from_pretrained(base)` when it saves an adapter of a converted model)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type not in (None, cls.model_type) and "text_config" not in config_dict:
            config_dict = {"model_type": cls.model_type, "text_config": config_dict, "fam_update": DEFAULT_FAM_UPDATE}
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        if "fam_update" not in config_dict and "fam_update" not in kwargs:
            config_dict = {**config_dict, "fam_update": _FAM_UPDATE_BEFORE_OPTION}
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        # The parent sets the attention and experts implementations recursively, None included; keep the base's own
        # choices (a converted model shares its base configuration object with the decoder layers that read it).
        kept = {}
        for name in ("attn_implementation", "experts_implementation"):
            value = getattr(self.text_config, f"_{name}_internal", None)
            if value is not None and kwargs.get(name) is None:
                kept[f"_{name}_internal"] = value
        super().__post_init__(**kwargs)
        for attribute, value in kept.items():
            setattr(self.text_config, attribute, value)
        validate_fam_settings(self.block_size, self.memory_segments, self.fam_length)
        if self.fam_update not in FAM_UPDATES:
            raise ValueError(f"fam_update must be one of {FAM_UPDATES}, got {self.fam_update!r}")
        if (
            isinstance(self.fam_gate_init, bool)
            or not isinstance(self.fam_gate_init, (int, float))
            or not math.isfinite(self.fam_gate_init)
        ):
            raise ValueError(f"fam_gate_init must be a finite number, got {self.fam_gate_init!r}")
        _check_int("fam_sink_length", self.fam_sink_length, 0)
        if self.fam_sink_length > self.fam_length:
            raise ValueError(
                f"fam_sink_length must be <= fam_length: it counts FAM rows kept constant, got fam_sink_length="
                f"{self.fam_sink_length} and fam_length={self.fam_length}"
            )
        if self.loop_order not in LOOP_ORDERS:
            raise ValueError(f"loop_order must be one of {LOOP_ORDERS}, got {self.loop_order!r}")
        if self.fam_prompt_init not in FAM_PROMPT_INITS:
            raise ValueError(f"fam_prompt_init must be one of {FAM_PROMPT_INITS}, got {self.fam_prompt_init!r}")
        if self.fam_prompt_init == "token_ids":
            ids = self.fam_prompt_token_ids
            if ids is None or len(ids) != self.fam_length:
                raise ValueError(
                    f"fam_prompt_init='token_ids' needs fam_prompt_token_ids with exactly fam_length={self.fam_length} "
                    f"ids, got {ids!r}"
                )

    def to_dict(self):
        output = super().to_dict()
        if isinstance(output.get("text_config"), dict):
            # where the base was loaded from on the converting machine (often a local path): not part of the model
            output["text_config"].pop("_name_or_path", None)
        return output

    def __getattr__(self, name):
        # Only called when normal lookup fails: answer public attributes from the base configuration.
        if name.startswith("_") or name == "text_config":
            raise AttributeError(name)
        text_config = self.__dict__.get("text_config")
        if text_config is None or isinstance(text_config, dict):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        try:
            return getattr(text_config, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}") from None


__all__ = ["FamConfig"]

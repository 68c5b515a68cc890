# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Facts about a converted checkpoint (sizes, receptive field, stream memory) and its model card."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData

from .cache_fam import FamCache
from .configuration_fam import FamConfig
from .io_utils import CONVERTED_FIX, DamagedFileError, damaged_file_message, weight_files


CARD_TEMPLATE = "templates/fam_model_card.md"
# The tensors TransformerFAM adds to the base model: the FAM prompt and (gated update) one gate per layer.
FAM_PARAMETER_KEYS = ("fam_prompt.weight", "fam_gate.weight")
EVAL_RESULTS_FILE = "eval_results.json"


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def human_count(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def stream_memory_bytes(config: FamConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of FamCache per stream (batch row): window of (M+1)B keys/values, FAM keys/values and state, all layers."""
    return FamCache.bytes_per_stream(config, dtype.itemsize)


def bswa_receptive_field(config: FamConfig) -> int:
    """Tokens that can reach a token through block sliding window attention alone: (layers x M + 1) x B, as each layer
    reaches M blocks further back than the one below it (M = 0: the token's own block). On layers that the base model
    runs with a sliding window W (FAM_SPEC rule 4), a query also sees no key W or more positions back, so such a layer
    reaches min(M blocks, W - 1 tokens) further: the reach is followed layer by layer from the last token of a block."""
    B, M = config.block_size, config.memory_segments
    text = config.text_config
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers
    position = B - 1 + config.num_hidden_layers * M * B  # the last token of a block far enough into the stream
    earliest = position
    for kind in reversed(layer_types):  # from the top layer down: the farthest key of the farthest key ...
        reach = (earliest // B - M) * B  # the first token of the oldest memory segment
        if kind == "sliding_attention" and window:
            reach = max(reach, earliest - window + 1)
        earliest = max(reach, 0)
    return position - earliest + 1


def receptive_field_rule(config: FamConfig) -> str:
    """How `bswa_receptive_field` comes about, as `hf-fam info` and the model card state it."""
    window = getattr(config.text_config, "sliding_window", None)
    layer_types = getattr(config.text_config, "layer_types", None)
    windowed = window and (layer_types is None or "sliding_attention" in layer_types)
    if windowed and window - 1 < config.memory_segments * config.block_size:
        return f"(layers x M + 1) x B, less on the layers with the base model's sliding window of {window:,} tokens"
    return "(layers x M + 1) x B"


def checkpoint_parameters(folder: str | Path) -> tuple[int, int]:
    """(total parameters, FAM parameters (prompt and gates)) counted from the safetensors headers, without loading
    weights."""
    from safetensors import SafetensorError, safe_open

    total = fam = 0
    for file in weight_files(folder):
        try:
            handle = safe_open(file, framework="pt")
        except SafetensorError as error:
            raise DamagedFileError(damaged_file_message(file, error, CONVERTED_FIX)) from error
        with handle as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
                if key in FAM_PARAMETER_KEYS:
                    fam += count
    return total, fam


def folder_model_type(folder: str | Path) -> str | None:
    """`model_type` in the config.json of `folder` (None when it has none); raises ValueError for unreadable JSON."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise DamagedFileError(f"{path} is not valid JSON ({error}). {CONVERTED_FIX}") from error


def checkpoint_dtype(config: FamConfig) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config.text_config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def summarize(folder: str | Path) -> dict:
    """Everything `hf-fam info` prints and the model card shows, read from a converted folder."""
    model_type = folder_model_type(folder)
    if model_type != FamConfig.model_type:
        raise ValueError(f"{folder} is not a TransformerFAM checkpoint: its config.json has model_type {model_type!r}.")
    config = FamConfig.from_pretrained(folder)
    total, fam = checkpoint_parameters(folder)
    dtype = checkpoint_dtype(config)
    text = config.text_config
    return {
        "block_size": config.block_size,
        "memory_segments": config.memory_segments,
        "fam_length": config.fam_length,
        "fam_prompt_init": config.fam_prompt_init,
        "fam_update": config.fam_update,
        "fam_sink_length": config.fam_sink_length,
        "fam_calibration": config.fam_calibration,
        "base_model_type": text.model_type,
        "base_architectures": list(getattr(text, "architectures", None) or []),
        "num_hidden_layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size,
        "parameters": total,
        "fam_parameters": fam,
        "base_parameters": total - fam,
        "bswa_receptive_field": bswa_receptive_field(config),
        "bswa_receptive_field_rule": receptive_field_rule(config),
        "stream_memory_bytes": stream_memory_bytes(config, dtype),
        "dtype": str(dtype).replace("torch.", ""),
    }


def read_eval_results(folder: str | Path) -> list[dict]:
    path = Path(folder) / EVAL_RESULTS_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text())


def _model_index_results(rows: list[dict]):
    from .evaluation import model_index_results

    return model_index_results(rows)


def render_model_card(
    folder: str | Path,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    source_description: str | None = None,
    fine_tuned: bool = False,
    training: dict | None = None,
) -> ModelCard:
    """The model card of a converted (or fine-tuned) folder, with Hub metadata, from `model_cards/`' template.

    `training` (name -> value) fills the card's Training section of a fine-tuned model (base, data, steps, settings).
    """
    folder = Path(folder)
    facts = summarize(folder)
    tags = ["fam", "transformerfam", "long-context", "hf-fam", facts["base_model_type"]]
    eval_results = read_eval_results(folder)
    model_name = (repo_id or folder.name).split("/")[-1]
    model_index = _model_index_results(eval_results)
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license or "other",
        tags=tags,
        model_name=model_name if model_index else None,
        eval_results=model_index or None,
    )
    # A GGUF source (the embedded default is a 4-bit Q4_1 file) is not the base model's original weights: say so.
    gguf_file = None
    if source_description and source_description.startswith("GGUF file "):
        gguf_file = Path(source_description[len("GGUF file ") :]).name
    template = resources.files("hf_fam").joinpath(CARD_TEMPLATE)
    with resources.as_file(template) as template_path:
        return ModelCard.from_template(
            card_data,
            template_path=str(template_path),
            model_name=model_name,
            repo_id=repo_id or str(folder),
            base_model=base_model,
            source_description=source_description or "a pretrained decoder",
            gguf_file=gguf_file,
            fine_tuned=fine_tuned,
            training=training or {},
            eval_results=eval_results,
            stream_memory=human_bytes(facts["stream_memory_bytes"]),
            fam_parameters=f"{facts['fam_parameters']:,}",
            base_parameters=f"{facts['base_parameters']:,} ({human_count(facts['base_parameters'])})",
            bswa_receptive_field=f"{facts['bswa_receptive_field']:,}",
            **{k: v for k, v in facts.items() if k not in ("fam_parameters", "base_parameters", "bswa_receptive_field")},
        )


def existing_card_data(folder: str | Path) -> dict:
    """Metadata of the card already in `folder` (README.md), or {}."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return {}
    try:
        return ModelCard.load(path).data.to_dict()
    except Exception:  # an unparsable card is regenerated from scratch
        return {}

# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Folding a fine-tuned LoRA adapter (and its trained FAM parameters) into a plain TransformerFAM checkpoint."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from transformers.utils import logging

from .io_utils import atomic_directory, check_output_folder
from .training import FAM_GATE_MODULE, TRAINING_INFO_FILE, is_fam_checkpoint, load_fam_model, peft_without_deprecation_noise, read_training_info


logger = logging.get_logger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class MergeError(Exception):
    """The adapter cannot be merged; the message says what to change."""


def _trained_steps(adapter_dir: Path) -> int | None:
    state = adapter_dir / "trainer_state.json"
    if state.is_file():
        return json.loads(state.read_text()).get("global_step")
    return None


def card_training_facts(adapter_dir: str | Path, info: dict) -> dict:
    """What the model card's Training section lists: base, data, steps and settings."""
    adapter_dir = Path(adapter_dir)
    adapter = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    settings = dict(info.get("settings") or {})
    lora = settings.pop("lora", None) or {}
    facts = {
        "base model": info.get("base_model") or info.get("model_source") or adapter.get("base_model_name_or_path"),
        "data": info.get("data", "(not recorded)"),
        "optimizer steps": _trained_steps(adapter_dir) if _trained_steps(adapter_dir) is not None else "(not recorded)",
        "LoRA": f"r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}, targets={_targets(adapter, lora)} (merged into the weights)",
        "FAM parameters trained": _fam_parameters_trained(adapter, settings),
    }
    for key, value in settings.items():
        facts[key.replace("_", " ")] = value
    if info.get("recipe"):
        facts["recipe config"] = info["recipe"]
    return facts


def _fam_parameters_trained(adapter: dict, settings: dict) -> str:
    """The FAM modules the run trained: those saved with the adapter (peft `modules_to_save`), unless their learning
    rate was 0 (the recipe's `fam_learning_rate: 0.0` keeps them as converted while LoRA trains; the gates follow
    `fam_gate_learning_rate` when the run set it)."""
    saved = list(adapter.get("modules_to_save") or [])
    gate_lr = settings.get("fam_gate_learning_rate")

    def rate_setting(module: str) -> tuple[str, float | None]:
        if module == FAM_GATE_MODULE and gate_lr is not None:
            return "fam_gate_learning_rate", gate_lr
        return "fam_learning_rate", settings.get("fam_learning_rate")

    frozen = [m for m in saved if rate_setting(m)[1] == 0]
    trained = [m for m in saved if m not in frozen]
    if not frozen:
        return ", ".join(trained) or "none"
    reasons = sorted({f"{rate_setting(m)[0]} 0" for m in frozen})
    kept = f"{', '.join(frozen)} kept as converted: {', '.join(reasons)}"
    if not trained:
        return f"none ({kept})"
    rates = [f"lr {rate_setting(m)[1]:g}" for m in trained if m == FAM_GATE_MODULE and gate_lr is not None]
    return f"{', '.join(trained)} ({'; '.join(rates + [kept])})"


def _targets(adapter: dict, lora: dict) -> str:
    targets = lora.get("target_modules") or adapter.get("target_modules")
    if isinstance(targets, (list, tuple)):
        return ", ".join(sorted({name.rsplit(".", 1)[-1] for name in targets}))  # peft may store full module names
    return str(targets)


def trained_source(info: dict, adapter: dict) -> str | None:
    """Where the run loaded its model: `fam_training.json`'s `model_source` when the run recorded one (None there is
    the embedded default model, e.g. a recipe with `model.path: null`), else the adapter's `base_model_name_or_path`.
    The adapter's path is only a fallback: for the embedded default it is the GGUF file inside the environment the
    run used, which another machine (or a new virtual environment) does not have."""
    if "model_source" in info:
        return info["model_source"]
    return adapter.get("base_model_name_or_path")


def merge_adapter(
    adapter_dir: str | Path,
    output: str | Path,
    *,
    overwrite: bool = False,
    dtype: str = "float32",
    base: str | None = None,
    max_shard_size: str = "2GB",
) -> Path:
    """Fold the LoRA adapter in `adapter_dir` into the weights and write a plain FAM checkpoint to `output`.

    The trained FAM parameters (peft `modules_to_save`, e.g. the FAM prompt) replace the base's. The model comes
    from where the training run loaded it (`fam_training.json`: a FAM checkpoint, or a base model converted with the
    recorded FAM settings), else from the adapter's `base_model_name_or_path`; `base` overrides both (e.g. the same
    model in another folder). The result is written to a temporary folder and renamed into place, with the
    tokenizer and a model card stating the base, data, steps and settings.

    Args:
        adapter_dir: a checkpoint folder (`runs/x/checkpoint-500`) or a run's output folder.
        output: the folder to write; an existing non-empty folder is refused unless `overwrite`.
        dtype: the dtype to merge and save in (`float32` merges exactly; `auto` keeps the checkpoint's).
        base: where to load the model from instead of the recorded source.

    Returns:
        The output folder.
    """
    from peft import PeftModel

    from .hub import write_model_card

    adapter_dir, output = Path(adapter_dir), Path(output)
    if not adapter_dir.exists():
        raise MergeError(f"{adapter_dir} does not exist; pass a checkpoint folder of a fine-tuning run, e.g. runs/x/checkpoint-500.")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        hint = ""
        if is_fam_checkpoint(adapter_dir):
            hint = " It is a plain FAM checkpoint already: there is nothing to merge."
        elif adapter_dir.is_dir() and any(p.name.startswith("checkpoint-") for p in adapter_dir.iterdir()):
            hint = " It holds checkpoint-N folders: pass one of them."
        raise MergeError(f"{adapter_dir} is not a PEFT adapter folder (no {ADAPTER_CONFIG}).{hint}")
    adapter = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if adapter.get("peft_type") != "LORA":
        raise MergeError(f"{adapter_dir} holds a {adapter.get('peft_type')} adapter; hf-fam merge folds LoRA adapters.")
    info = read_training_info(adapter_dir)
    source = base or trained_source(info, adapter)
    if source is not None and not Path(source).exists():
        from .sources import SourceError, check_hub_model

        try:
            check_hub_model(str(source))
        except SourceError as error:
            if base:
                raise MergeError(f"--base {error}") from None
            raise MergeError(
                f"The model {adapter_dir} was trained on cannot be found: {error} Pass --base with where that model is now."
            ) from None
    # before minutes of loading: OUTPUT must be writable, and --overwrite must not delete what is being read
    check_output_folder(output, overwrite=overwrite, sources=[adapter_dir] + ([source] if source and Path(source).exists() else []))
    fam_settings = dict(info.get("fam_settings") or {})
    fam_settings.pop("fam_calibration", None)  # a record of the conversion, not a setting (load_fam_model reads it)
    # how the training run looped over blocks and layers: a run-time choice with identical results (FAM_SPEC
    # implementation notes), not a conversion option; the merged model gets the default
    fam_settings.pop("loop_order", None)
    if not is_fam_checkpoint(source):
        if not fam_settings:
            raise MergeError(
                f"The adapter's model {source!r} is not a FAM checkpoint and {adapter_dir} has no {TRAINING_INFO_FILE} "
                "with the FAM settings it was trained with; pass --base with the converted FAM checkpoint it was trained on."
            )
        from .conversion import convert_to_fam

        accepted = set(inspect.signature(convert_to_fam).parameters)
        dropped = sorted(k for k in fam_settings if k not in accepted)
        if dropped:
            logger.warning(f"FAM settings {dropped} are not options of convert_to_fam; they are left at their defaults.")
        fam_settings = {k: v for k, v in fam_settings.items() if k in accepted}
    else:
        # A FAM checkpoint carries its settings; the recorded ones only matter where the run overrode them.
        fam_settings = {k: v for k, v in fam_settings.items() if k in ("block_size", "memory_segments", "fam_sink_length")}
    logger.info(f"Loading {source or 'the embedded default model'} ...")
    # the adapter carries the trained prompt: no calibration at conversion
    model, tokenizer, base_model = load_fam_model(source, fam_settings, dtype=dtype, trained_from=adapter_dir)
    try:
        with peft_without_deprecation_noise():
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, RuntimeError, KeyError) as error:
        raise MergeError(f"The adapter in {adapter_dir} does not fit the model from {source}: {error}") from error
    merged = peft_model.merge_and_unload()
    merged.name_or_path = str(output)
    facts = card_training_facts(adapter_dir, info)
    base_model = info.get("base_model") or base_model
    with atomic_directory(output, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        if any((adapter_dir / name).is_file() for name in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in ("eval_results.json",):
            if (adapter_dir / name).is_file():
                (tmp / name).write_bytes((adapter_dir / name).read_bytes())
        write_model_card(tmp, repo_id=output.name, base_model=base_model, fine_tuned=True, training=facts)
    return output


__all__ = ["MergeError", "card_training_facts", "merge_adapter", "read_training_info"]

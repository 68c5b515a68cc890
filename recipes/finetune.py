#!/usr/bin/env python
# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Fine-tune a TransformerFAM model with LoRA and the paper's training method, on one CPU or many GPUs.

    python recipes/finetune.py --config recipes/configs/smollm2_135m_passkey_cpu.yaml [key=value ...]
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/finetune.py \\
        --config recipes/configs/llama32_1b_long_documents.yaml output_dir=runs/x max_steps=5000
    hf-fam merge runs/x/checkpoint-500 merged-model     # LoRA folded in: a plain FAM checkpoint with its card

Any config key can be overridden as key=value: `max_steps=100` (a key found once in the config), `lora.r=8` (a full
path), `trainer.warmup_steps=10` (any TrainingArguments field), `resume_from_checkpoint=true` (the last checkpoint
in output_dir) or `resume_from_checkpoint=runs/x/checkpoint-500` (or a slim copy of one, recipes/slim_checkpoint.py).

What it does, top to bottom:
1. reads the config and the overrides;
2. loads the model: a converted FAM checkpoint, or a base model (Hub id, folder, .gguf; null: the embedded
   SmolLM2-135M-Instruct) converted on the fly with `model.fam`'s settings;
3. adds LoRA adapters (attention and feed-forward projections by default) and trains the FAM parameters with them
   (peft `modules_to_save`: saved with the adapter in every checkpoint);
4. builds the data: a synthetic memory task (passkey, key-value recall) with a curriculum over filler lengths, or
   local files / a Hub data set (text, chat, prompt/completion) packed into rows without per-document masks;
5. trains with `hf_fam.training.FamTrainer`: per-token loss weights normalised over the accumulated global batch,
   random state passing, random position offset, the FAM parameters' own learning rate, activation checkpointing;
   logs (loss, learning rate, grad norm, tokens/s, peak memory) go to the progress bar, `log.csv` and the
   reporters in `trainer.report_to` (e.g. tensorboard);
6. saves the final adapter (and FAM prompt) in output_dir; checkpoints in output_dir/checkpoint-N resume exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import yaml
from peft import LoraConfig, get_peft_model
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from hf_fam.recipe_config import ConfigError, load_config, parse_recipe_args
from hf_fam.training import (
    CSVLoggerCallback,
    FamTrainer,
    FamTrainingArguments,
    fam_module_names,
    is_fam_checkpoint,
    load_fam_model,
    peft_without_deprecation_noise,
)
from hf_fam.training_data import CurriculumStage, FamDataCollator, SyntheticTaskDataset, load_text_dataset


logger = logging.get_logger("hf_fam.recipes.finetune")
TRAINER_FIELDS = {f.name for f in dataclasses.fields(FamTrainingArguments) if f.init}


def resumed_checkpoint(resume_from_checkpoint, output_dir: Path) -> Path | None:
    """The checkpoint folder a run resumes from (`true`: the last one in output_dir, as the Trainer picks it), or None."""
    if resume_from_checkpoint in (None, False, "", "false", "False"):
        return None
    if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "true":
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise ConfigError(f"resume_from_checkpoint=true, but {output_dir} holds no checkpoint-N folder to resume from.")
        return Path(last)
    folder = Path(resume_from_checkpoint)
    if not (folder / "trainer_state.json").is_file():
        raise ConfigError(
            f"resume_from_checkpoint={folder} is not a checkpoint folder (no trainer_state.json there): pass a "
            "runs/<name>/checkpoint-N folder, or true for the last one in output_dir."
        )
    return folder


def build_model(model_config: dict, lora_config: dict, resume_from: Path | None = None):
    """The FAM model with LoRA adapters; the FAM parameters are trained and saved with them.

    When the run resumes from `resume_from` and converts its base model on the fly, the prompt calibration is skipped
    (the checkpoint holds the trained prompt, which replaces whatever the conversion computed) and the calibration's
    record is taken from the checkpoint's `fam_training.json`."""
    if resume_from is not None and not is_fam_checkpoint(model_config.get("path")):
        logger.info(f"Resuming from {resume_from}: the FAM prompt comes from the checkpoint, so it is not calibrated again.")
    model, tokenizer, base_model = load_fam_model(
        model_config.get("path"),
        fam_settings=dict(model_config.get("fam") or {}),
        dtype=model_config.get("dtype", "auto"),
        attn_implementation=model_config.get("attn_implementation"),
        trained_from=resume_from,
    )
    for name, value in (model_config.get("text_config") or {}).items():
        # base configuration switches read at run time, e.g. mixtral's output_router_logits (router aux loss)
        setattr(model.config.text_config, name, value)
    lora_config = dict(lora_config)
    modules_to_save = list(lora_config.pop("modules_to_save", None) or [])
    modules_to_save += [m for m in fam_module_names(model) if m not in modules_to_save]
    lora = LoraConfig(task_type="CAUSAL_LM", modules_to_save=modules_to_save, **lora_config)
    with peft_without_deprecation_noise():
        model = get_peft_model(model, lora)
    return model, tokenizer, base_model


def build_dataset(data_config: dict, tokenizer, args: FamTrainingArguments):
    """The training data set and a one-line description of it (for the model card)."""
    data_config = dict(data_config)
    source = data_config.pop("source", "synthetic")
    repeat = {k: data_config.pop(k) for k in ("repeat_segment_length", "repeat_segment_weight") if k in data_config}
    if source == "synthetic":
        if args.max_steps is None or args.max_steps <= 0:
            raise ConfigError("Synthetic tasks are generated for max_steps steps: set trainer.max_steps (e.g. max_steps=1000).")
        task = data_config.pop("task", "passkey")
        try:
            stages = [CurriculumStage(**stage) for stage in data_config.pop("curriculum")]
        except TypeError as error:
            fields = ", ".join(f.name for f in dataclasses.fields(CurriculumStage))
            raise ConfigError(f"A data.curriculum stage takes {fields}: {error}") from None
        options = data_config.pop("task_options", None) or {}
        if data_config:
            raise ConfigError(f"Unknown data key(s) for synthetic data: {sorted(data_config)}.")
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        try:
            dataset = SyntheticTaskDataset(
                tokenizer, task, args.max_steps * global_batch, stages, seed=args.data_seed or args.seed,
                task_options=options, **repeat,
            )
        except (TypeError, ValueError) as error:  # TypeError: a stage value of the wrong type ('0.5' for 0.5)
            raise ConfigError(f"data: {error}") from None
        return dataset, f"synthetic {task} task ({dataset.describe_curriculum()}), {json.dumps(options)}"
    if source not in ("files", "hub"):
        raise ConfigError(f"data.source must be synthetic, files or hub, got {source!r}.")
    if source == "files" and not data_config.get("data_files"):
        raise ConfigError("data.source: files needs data.data_files (a list of .txt/.jsonl/.parquet paths or globs).")
    if source == "hub" and not data_config.get("hub_name"):
        raise ConfigError("data.source: hub needs data.hub_name (a Hub data set id).")
    try:
        dataset = load_text_dataset(tokenizer, seed=args.data_seed or args.seed, **data_config, **repeat)
    except TypeError as error:
        raise ConfigError(f"Unknown data key: {error}") from None
    where = data_config.get("hub_name") or ", ".join(map(str, data_config.get("data_files") or []))
    return dataset, f"{where} ({data_config.get('format', 'text')}, {len(dataset)} rows)"


def main(argv=None) -> int:
    # 1. configuration
    config_path, overrides = parse_recipe_args(argv, description=__doc__)
    config = load_config(config_path, overrides, fallback_section="trainer", fallback_keys=TRAINER_FIELDS)
    trainer_config = dict(config.get("trainer") or {})
    output_dir = Path(config.get("output_dir") or trainer_config.pop("output_dir", None) or "runs/finetune")
    unknown = sorted(set(trainer_config) - TRAINER_FIELDS)
    if unknown:
        raise ConfigError(f"Unknown trainer key(s) {unknown}: the trainer section takes TrainingArguments fields plus the fam_* options.")
    args = FamTrainingArguments(output_dir=str(output_dir), seed=config.get("seed", 42), **trainer_config)
    set_seed(args.seed)

    # 2.-3. model with LoRA adapters and trainable FAM parameters
    resume_from = resumed_checkpoint(args.resume_from_checkpoint, output_dir)
    if resume_from is not None and not (resume_from / "optimizer.pt").is_file():
        logger.warning(
            f"{resume_from} holds no optimizer state (a slim copy, recipes/slim_checkpoint.py): the run goes on from its "
            "step with its weights and data, but with a fresh optimizer and the learning-rate schedule from step 0 "
            "(warm-up included), not the exact resume a full checkpoint gives."
        )
    model, tokenizer, base_model = build_model(config.get("model") or {}, config.get("lora") or {}, resume_from)
    if args.should_log:
        model.print_trainable_parameters()

    # 4. data
    dataset, data_description = build_dataset(config.get("data") or {}, tokenizer, args)

    # 5. training
    fam_config = model.get_base_model().config
    training_info = {
        "model_source": (config.get("model") or {}).get("path"),
        "base_model": base_model,
        "data": data_description,
        "recipe": Path(config_path).name,
        "settings": {
            "block_size": fam_config.block_size,
            "memory_segments": fam_config.memory_segments,
            "fam_length": fam_config.fam_length,
            "lora": {k: v for k, v in (config.get("lora") or {}).items()},
            "learning_rate": args.learning_rate,
            # 0.0 freezes the FAM prompt and gates (the sixth passkey config): recorded as 0, not as the LoRA rate
            "fam_learning_rate": args.fam_learning_rate if args.fam_learning_rate is not None else args.learning_rate,
            "fam_gate_learning_rate": args.fam_gate_learning_rate,  # None: the same as fam_learning_rate
            "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            "random_state_passing": args.fam_state_passing_probability,
            "random_position_offset": args.fam_position_offset_probability,
            "activation_checkpointing": args.activation_checkpointing,
        },
    }
    trainer = FamTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=FamDataCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[CSVLoggerCallback(output_dir / "log.csv")],
        training_info=training_info,
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        logger.warning(
            "An FSDP config was given, but accelerate runs these processes without FSDP (on CPU it falls back to DDP): "
            "every process holds the whole model."
        )
    if args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))

    # 6. the final adapter, FAM parameters and training state, next to the checkpoints
    trainer.save_model(str(output_dir))
    if args.should_save:
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
        logger.warning(f"Saved the adapter and FAM parameters to {output_dir}; merge with `hf-fam merge {output_dir} OUTPUT`.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as error:
        print(f"finetune.py: config error: {error}", file=sys.stderr)
        sys.exit(2)

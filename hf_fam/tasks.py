# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Synthetic memory tasks at the token level: passkey retrieval and key-value recall.

Each generator takes a tokenizer and a `random.Random` and returns a [`TaskExample`]: the token ids of one example,
built piece by piece so that the filler has an exact length in tokens, with per-token loss weights (0 on the prompt,
1 on the answer) and the prompt and answer ids kept apart, so that a training recipe can weight the loss and an
evaluation can score the answer (teacher-forced with [`answer_is_correct`], or by greedy generation from
`prompt_ids`). The same seed gives the same example.

Passkey retrieval follows the format of Landmark attention's `run_test.py` (and LongLoRA's passkey test): an
instruction, filler sentences, "The pass key is N. Remember it. N is the pass key." at a chosen depth of the filler,
more filler, and "What is the pass key? The pass key is" at the end; the answer is " N".
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass, field

import torch


PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

KV_INTRO = "Below is a list of keys and their values, hidden in irrelevant text. Memorize every pair."
KV_PAIR = "The value of key {key} is {value}."
KV_QUESTION = "What is the value of key {key}? The value of key {key} is"


@dataclass
class TaskExample:
    """One example of a synthetic task.

    Attributes:
        input_ids: the prompt followed by the answer, `prompt_ids + answer_ids`.
        loss_weights: one weight per token of `input_ids`, the weight of the loss of predicting that token from the
            tokens before it: 0 on the prompt, 1 on the answer (the first token never has a loss).
        prompt_ids: everything up to and including the question.
        answer_ids: the tokens to predict (e.g. the pass key with its leading space).
        answer: the answer as text.
        info: what the example is made of (filler tokens, depth, needle position in tokens, ...).
    """

    input_ids: list[int]
    loss_weights: list[float]
    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str
    info: dict = field(default_factory=dict)

    def as_features(self) -> dict:
        """The example as a data-set row: `input_ids` and `loss_weights` (what the training collator reads)."""
        return {"input_ids": list(self.input_ids), "loss_weights": list(self.loss_weights)}


class _Pieces:
    """Token ids of text pieces, encoded once per tokenizer and reused (examples are concatenations of pieces)."""

    def __init__(self, tokenizer):
        self._tokenizer = weakref.ref(tokenizer)  # the cache is keyed weakly by the tokenizer: do not keep it alive
        self._cache: dict[str, list[int]] = {}
        # What the tokenizer puts in front of a text by itself (e.g. Llama's and Gemma's BOS), kept in front of the
        # whole example only.
        with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
        plain = tokenizer("x", add_special_tokens=False)["input_ids"]
        self.prefix = with_special[: len(with_special) - len(plain)] if with_special[-len(plain) :] == plain else []

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self._tokenizer()(text, add_special_tokens=False)["input_ids"])
        return self._cache[text]

    def filler(self, n_tokens: int, sentences: list[str]) -> tuple[list[int], list[int]]:
        """Exactly `n_tokens` tokens of the sentences repeated (each with a leading space), and the token offsets at
        which a sentence starts (where a needle may go)."""
        units = [self.ids(" " + sentence) for sentence in sentences]
        if not all(units):
            raise ValueError("The tokenizer encodes a filler sentence to no tokens.")
        ids, starts, i = [], [], 0
        while len(ids) < n_tokens:
            starts.append(len(ids))
            ids.extend(units[i % len(units)])
            i += 1
        starts.append(len(ids))
        return ids[:n_tokens], [s for s in starts if s <= n_tokens]


_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pieces(tokenizer) -> _Pieces:
    if tokenizer not in _PIECES:
        _PIECES[tokenizer] = _Pieces(tokenizer)
    return _PIECES[tokenizer]


def _filler_sentences() -> list[str]:
    return [s.strip() + "." for s in PASSKEY_FILLER.split(".") if s.strip()]


def _random_number(rng: random.Random, digits: int) -> str:
    if digits < 1:
        raise ValueError(f"digits must be at least 1, got {digits}")
    return str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits))


def _check_depth(depth: float) -> float:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1] (0: right after the instruction, 1: right before the question), got {depth}")
    return depth


def _nearest(starts: list[int], target: float) -> int:
    return min(starts, key=lambda s: (abs(s - target), s))


def _assemble(pieces: _Pieces, prompt_parts: list[list[int]], answer_ids: list[int], answer: str, info: dict) -> TaskExample:
    prompt_ids = list(pieces.prefix)
    for part in prompt_parts:
        prompt_ids.extend(part)
    return TaskExample(
        input_ids=prompt_ids + answer_ids,
        loss_weights=[0.0] * len(prompt_ids) + [1.0] * len(answer_ids),
        prompt_ids=prompt_ids,
        answer_ids=list(answer_ids),
        answer=answer,
        info=info,
    )


def passkey_example(
    tokenizer,
    rng: random.Random,
    filler_tokens: int,
    depth: float | None = None,
    key_digits: int = 5,
    key: str | int | None = None,
) -> TaskExample:
    """A passkey-retrieval example in the Landmark-attention format.

    Args:
        tokenizer: a Hugging Face tokenizer.
        rng: the source of randomness (the key, and the depth when `depth` is None).
        filler_tokens: the exact number of filler tokens (the needle sentence comes on top of them).
        depth: where the needle goes in the filler, from 0 (right after the instruction) to 1 (right before the
            question); it is placed at the filler sentence boundary nearest to `depth * filler_tokens`. None draws
            it uniformly.
        key_digits: digits of the random key (ignored when `key` is given).
        key: a fixed key instead of a random one.

    Returns:
        [`TaskExample`] whose answer is " KEY"; `info` holds `filler_tokens`, `depth`, `needle_start` (the needle's
        first token index in `input_ids`) and `key`.
    """
    if filler_tokens < 0:
        raise ValueError(f"filler_tokens must be >= 0, got {filler_tokens}")
    depth = rng.random() if depth is None else _check_depth(depth)
    key = _random_number(rng, key_digits) if key is None else str(key)
    pieces = _pieces(tokenizer)
    filler, starts = pieces.filler(filler_tokens, _filler_sentences())
    cut = _nearest(starts, depth * filler_tokens)
    intro = pieces.ids(PASSKEY_INTRO)
    needle = pieces.ids(" " + PASSKEY_NEEDLE.format(key=key))
    question = pieces.ids(" " + PASSKEY_QUESTION)
    answer_ids = pieces.ids(" " + key)
    info = {
        "task": "passkey",
        "filler_tokens": filler_tokens,
        "depth": depth,
        "needle_start": len(pieces.prefix) + len(intro) + cut,
        "key": key,
    }
    return _assemble(pieces, [intro, filler[:cut], needle, filler[cut:], question], answer_ids, key, info)


def key_value_example(
    tokenizer,
    rng: random.Random,
    filler_tokens: int,
    num_pairs: int = 4,
    key_digits: int = 4,
    value_digits: int = 4,
) -> TaskExample:
    """A key-value recall example: `num_pairs` sentences "The value of key K is V." spread evenly through the
    filler (at sentence boundaries), then a question about one of them, chosen at random.

    Args:
        tokenizer: a Hugging Face tokenizer.
        rng: the source of randomness (keys, values, which pair is asked).
        filler_tokens: the exact number of filler tokens around the pairs.
        num_pairs: how many pairs the text holds (distinct keys).
        key_digits, value_digits: digits of the random keys and values.

    Returns:
        [`TaskExample`] whose answer is " V" for the key asked; `info` holds `filler_tokens`, `pairs`, `asked` (its
        index) and `needle_start` (the first token of the asked pair's sentence in `input_ids`).
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be at least 1, got {num_pairs}")
    if filler_tokens < 0:
        raise ValueError(f"filler_tokens must be >= 0, got {filler_tokens}")
    if 9 * 10 ** (key_digits - 1) < num_pairs:
        raise ValueError(f"{key_digits}-digit keys cannot give {num_pairs} distinct keys; raise key_digits")
    keys: list[str] = []
    while len(keys) < num_pairs:
        candidate = _random_number(rng, key_digits)
        if candidate not in keys:
            keys.append(candidate)
    values = [_random_number(rng, value_digits) for _ in keys]
    asked = rng.randrange(num_pairs)
    pieces = _pieces(tokenizer)
    filler, starts = pieces.filler(filler_tokens, _filler_sentences())
    cuts = sorted(_nearest(starts, (i + 0.5) / num_pairs * filler_tokens) for i in range(num_pairs))
    parts = [pieces.ids(KV_INTRO)]
    position = len(pieces.prefix) + len(parts[0])
    previous, needle_start = 0, None
    for i, cut in enumerate(cuts):
        parts.append(filler[previous:cut])
        position += cut - previous
        if i == asked:
            needle_start = position
        pair = pieces.ids(" " + KV_PAIR.format(key=keys[i], value=values[i]))
        parts.append(pair)
        position += len(pair)
        previous = cut
    parts.append(filler[previous:])
    parts.append(pieces.ids(" " + KV_QUESTION.format(key=keys[asked])))
    info = {
        "task": "key_value",
        "filler_tokens": filler_tokens,
        "pairs": list(zip(keys, values)),
        "asked": asked,
        "needle_start": needle_start,
    }
    return _assemble(pieces, parts, pieces.ids(" " + values[asked]), values[asked], info)


TASKS = {"passkey": passkey_example, "key_value": key_value_example}


def make_example(task: str, tokenizer, rng: random.Random, filler_tokens: int, **options) -> TaskExample:
    """`TASKS[task](tokenizer, rng, filler_tokens, **options)`, with an error naming the tasks for an unknown name."""
    if task not in TASKS:
        raise ValueError(f"Unknown synthetic task {task!r}; choose one of {sorted(TASKS)}.")
    return TASKS[task](tokenizer, rng, filler_tokens, **options)


@torch.no_grad()
def answer_is_correct(model, example: TaskExample, **forward_kwargs) -> tuple[bool, float]:
    """Teacher-forced scoring: run `example.input_ids` once and compare the greedy prediction of every answer token
    (from the tokens before it) with the answer.

    Returns:
        (exact, token_accuracy): whether every answer token is predicted, and the fraction that is.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([example.input_ids], device=device)
    n = len(example.answer_ids)
    logits = model(ids, logits_to_keep=n + 1, **forward_kwargs).logits[0, :-1]  # predictions of the answer tokens
    predicted = logits.argmax(-1).tolist()
    hits = [p == a for p, a in zip(predicted, example.answer_ids)]
    return all(hits), sum(hits) / n


__all__ = [
    "PASSKEY_FILLER",
    "PASSKEY_INTRO",
    "PASSKEY_NEEDLE",
    "PASSKEY_QUESTION",
    "TASKS",
    "TaskExample",
    "answer_is_correct",
    "key_value_example",
    "make_example",
    "passkey_example",
]

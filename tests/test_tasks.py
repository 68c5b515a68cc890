"""The synthetic memory tasks: exact filler lengths, needle depth, weights, determinism, teacher-forced scoring."""

import random

import pytest
import torch
from conftest import tiny_base

import hf_fam
from hf_fam import tasks


@pytest.mark.parametrize("filler_tokens", [0, 1, 37, 300])
def test_passkey_example_has_the_exact_filler_length_and_the_landmark_format(tiny_tokenizer, filler_tokens):
    example = tasks.passkey_example(tiny_tokenizer, random.Random(3), filler_tokens, depth=0.5, key_digits=5)
    pieces = [tasks.PASSKEY_INTRO, " " + tasks.PASSKEY_NEEDLE.format(key=example.answer), " " + tasks.PASSKEY_QUESTION]
    fixed = sum(len(tiny_tokenizer(p, add_special_tokens=False).input_ids) for p in pieces)
    assert len(example.prompt_ids) == fixed + filler_tokens
    assert example.input_ids == example.prompt_ids + example.answer_ids
    assert len(example.answer) == 5 and example.answer.isdigit()
    text = tiny_tokenizer.decode(example.input_ids)
    assert text.startswith(tasks.PASSKEY_INTRO)
    assert f"The pass key is {example.answer}. Remember it. {example.answer} is the pass key." in text
    assert text.endswith(f"{tasks.PASSKEY_QUESTION} {example.answer}")
    assert example.loss_weights == [0.0] * len(example.prompt_ids) + [1.0] * len(example.answer_ids)


def test_passkey_depth_moves_the_needle_from_the_start_to_the_end_of_the_filler(tiny_tokenizer):
    starts = [
        tasks.passkey_example(tiny_tokenizer, random.Random(0), 400, depth=d).info["needle_start"]
        for d in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    intro = len(tiny_tokenizer(tasks.PASSKEY_INTRO, add_special_tokens=False).input_ids)
    assert starts[0] == intro  # depth 0: right after the instruction
    assert starts == sorted(starts) and len(set(starts)) == 5
    for depth, start in zip((0.25, 0.5, 0.75, 1.0), starts[1:]):
        assert abs(start - intro - depth * 400) <= 20  # snapped to a sentence boundary (sentences are < 20 tokens)
    with pytest.raises(ValueError, match="depth must be in"):
        tasks.passkey_example(tiny_tokenizer, random.Random(0), 10, depth=1.5)


def test_examples_are_deterministic_given_the_seed(tiny_tokenizer):
    for task in tasks.TASKS:
        a = tasks.make_example(task, tiny_tokenizer, random.Random(7), 120)
        b = tasks.make_example(task, tiny_tokenizer, random.Random(7), 120)
        c = tasks.make_example(task, tiny_tokenizer, random.Random(8), 120)
        assert a == b
        assert a.input_ids != c.input_ids
    with pytest.raises(ValueError, match="Unknown synthetic task 'nope'; choose one of"):
        tasks.make_example("nope", tiny_tokenizer, random.Random(0), 10)


def test_key_value_example_asks_for_one_of_its_pairs(tiny_tokenizer):
    example = tasks.key_value_example(tiny_tokenizer, random.Random(5), 200, num_pairs=4)
    text = tiny_tokenizer.decode(example.input_ids)
    keys = [key for key, _ in example.info["pairs"]]
    assert len(set(keys)) == 4
    for key, value in example.info["pairs"]:
        assert f"The value of key {key} is {value}." in text
    key, value = example.info["pairs"][example.info["asked"]]
    assert example.answer == value
    assert text.endswith(f"What is the value of key {key}? The value of key {key} is {value}")
    needle = tiny_tokenizer.decode(example.input_ids[example.info["needle_start"] :])
    assert needle.startswith(f" The value of key {key} is {value}.")
    fixed = len(example.prompt_ids) - 200
    assert fixed == len(tiny_tokenizer(tasks.KV_INTRO, add_special_tokens=False).input_ids) + sum(
        len(tiny_tokenizer(" " + tasks.KV_PAIR.format(key=k, value=v), add_special_tokens=False).input_ids)
        for k, v in example.info["pairs"]
    ) + len(tiny_tokenizer(" " + tasks.KV_QUESTION.format(key=key), add_special_tokens=False).input_ids)


def test_answer_is_correct_scores_the_answer_tokens_teacher_forced(tiny_tokenizer):
    model = hf_fam.convert_to_fam(tiny_base("llama"), block_size=16, memory_segments=1, fam_length=2).eval()
    example = tasks.passkey_example(tiny_tokenizer, random.Random(0), 40, depth=0.5)
    with torch.no_grad():
        logits = model(torch.tensor([example.input_ids])).logits[0]
    n = len(example.answer_ids)
    predicted = logits[-n - 1 : -1].argmax(-1).tolist()
    expected_accuracy = sum(p == a for p, a in zip(predicted, example.answer_ids)) / n
    exact, accuracy = tasks.answer_is_correct(model, example)
    assert accuracy == expected_accuracy and exact == (expected_accuracy == 1.0)
    # an answer equal to the model's own teacher-forced predictions scores 1 (checks the alignment of the slice)
    forced = tasks.TaskExample(example.input_ids, example.loss_weights, example.prompt_ids, [int(p) for p in predicted], "")
    assert tasks.answer_is_correct(model, forced) == (True, 1.0)

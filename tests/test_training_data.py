"""Training data: collator, "[repeat random segment]:" augmentation, packing, chat weights, files, synthetic tasks."""

import json
import random

import pytest
import torch

from hf_fam.training_data import (
    REPEAT_SEGMENT_PROMPT,
    CurriculumStage,
    FamDataCollator,
    SyntheticTaskDataset,
    load_text_dataset,
    pack_sequences,
    repeat_random_segment,
    tokenize_chat,
)


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def test_collator_pads_on_the_right_and_labels_only_weighted_tokens():
    collate = FamDataCollator(pad_token_id=0)
    batch = collate([
        {"input_ids": [5, 6, 7, 8], "loss_weights": [0.0, 0.0, 1.0, 0.1]},
        {"input_ids": [9, 10]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    torch.testing.assert_close(batch["loss_weights"], torch.tensor([[0.0, 0.0, 1.0, 0.1], [1.0, 1.0, 0.0, 0.0]]))
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [9, 10, -100, -100]]
    assert FamDataCollator(0, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3]}])["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match="loss_weights has 1 entries for 2 input_ids"):
        collate([{"input_ids": [1, 2], "loss_weights": [1.0]}])
    with pytest.raises(ValueError, match="needs a pad_token_id"):
        FamDataCollator(None)


def test_repeat_random_segment_appends_a_copy_of_consecutive_tokens_with_weight_0_1():
    ids = list(range(100, 400))
    weights = [0.0] * 290 + [1.0] * 10
    prompt = [7, 8, 9]
    new_ids, new_weights = repeat_random_segment(ids, weights, random.Random(0), prompt, length=256, weight=0.1)
    assert new_ids[:300] == ids and new_weights[:300] == weights
    assert new_ids[300:303] == prompt and new_weights[300:303] == [0.0] * 3
    segment = new_ids[303:]
    assert len(segment) == 256 and new_weights[303:] == [0.1] * 256
    start = segment[0] - 100
    assert segment == ids[start : start + 256]  # consecutive tokens of the example
    starts = {repeat_random_segment(ids, weights, random.Random(s), prompt)[0][303] for s in range(20)}
    assert len(starts) > 5  # the segment's position is random
    short_ids, _ = repeat_random_segment([1, 2, 3], [1.0] * 3, random.Random(0), prompt, length=256)
    assert short_ids == [1, 2, 3, 7, 8, 9, 1, 2, 3]  # shorter than 256: all of it


def test_pack_sequences_concatenates_documents_without_masks_and_cuts_exact_rows():
    batch = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "loss_weights": [[0.0, 1.0, 1.0], [1.0, 0.5], [1.0] * 4]}
    packed = pack_sequences(batch, seq_length=4, separator_id=0)
    assert packed["input_ids"] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert packed["loss_weights"] == [[0.0, 1.0, 1.0, 1.0], [1.0, 0.5, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    assert pack_sequences(batch, seq_length=5)["input_ids"] == [[1, 2, 3, 4, 5]]  # the partial last row is dropped


def test_chat_examples_weight_the_assistant_turns_only(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "A story about a cat."},
        {"role": "user", "content": "What is the pass key?"},
        {"role": "assistant", "content": "The pass key is 42."},
        {"role": "user", "content": "And the dog?"},
        {"role": "assistant", "content": "The dog walks home."},
    ]
    example = tokenize_chat(tokenizer, messages)
    weighted = [i for i, w in zip(example["input_ids"], example["loss_weights"]) if w == 1.0]
    text = tokenizer.decode(weighted)
    assert "The pass key is 42." in text and "The dog walks home." in text
    assert "What is" not in text and "cat" not in text and "user" not in text
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        tokenize_chat(tokenizer, messages)


def test_load_text_dataset_reads_jsonl_text_and_parquet_files(tmp_path, tiny_tokenizer):
    import datasets

    rows = [{"text": "The grass is green. " * (i + 3), "prompt": "What is the pass key?", "completion": f" {i}"} for i in range(6)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "a.txt").write_text("The sky is blue. " * 20)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))

    plain = load_text_dataset(tiny_tokenizer, data_files=[str(jsonl)], format="text", repeat_segment_length=0)
    assert len(plain) == 6 and set(plain.column_names) == {"input_ids", "loss_weights"}
    assert all(w == 1.0 for w in plain[0]["loss_weights"])

    pairs = load_text_dataset(tiny_tokenizer, data_files=str(tmp_path / "data.parquet"), format="prompt_completion", repeat_segment_length=0)
    prompt_length = len(tiny_tokenizer("What is the pass key?")["input_ids"])
    assert pairs[2]["loss_weights"][:prompt_length] == [0.0] * prompt_length
    assert tiny_tokenizer.decode([i for i, w in zip(pairs[2]["input_ids"], pairs[2]["loss_weights"]) if w]) == " 2"

    packed = load_text_dataset(tiny_tokenizer, data_files=[str(tmp_path / "*.txt")], seq_length=16, repeat_segment_length=8)
    assert len(packed) > 1 and all(len(row) == 16 for row in packed["input_ids"])
    assert any(0.1 in row for row in packed["loss_weights"])  # the repeated segment is in there

    with pytest.raises(FileNotFoundError, match="not found"):
        load_text_dataset(tiny_tokenizer, data_files=[str(tmp_path / "missing.jsonl")])
    with pytest.raises(ValueError, match="no field"):
        load_text_dataset(tiny_tokenizer, data_files=[str(jsonl)], format="chat")
    with pytest.raises(ValueError, match="exactly one of them"):
        load_text_dataset(tiny_tokenizer)
    with pytest.raises(ValueError, match="gives no training row"):
        load_text_dataset(tiny_tokenizer, data_files=[str(jsonl)], seq_length=100_000)


def test_synthetic_task_dataset_follows_its_curriculum_deterministically(tiny_tokenizer):
    stages = [CurriculumStage(0.5, 0, 10), CurriculumStage(1.0, 200, 300)]
    data = SyntheticTaskDataset(tiny_tokenizer, "passkey", 40, stages, seed=3, repeat_segment_length=32)
    fillers = [data.example(i).info["filler_tokens"] for i in range(40)]
    assert all(0 <= f <= 10 for f in fillers[:20]) and all(200 <= f <= 300 for f in fillers[20:])
    assert data[7] == SyntheticTaskDataset(tiny_tokenizer, "passkey", 40, stages, seed=3, repeat_segment_length=32)[7]
    assert data[7] != data[8]
    row = data[25]
    repeat = tiny_tokenizer(" " + REPEAT_SEGMENT_PROMPT, add_special_tokens=False)["input_ids"]
    example = data.example(25)
    n = len(example.input_ids)
    assert row["input_ids"][:n] == example.input_ids and row["input_ids"][n : n + len(repeat)] == repeat
    assert row["loss_weights"][-32:] == [0.1] * 32 and row["loss_weights"][:n] == example.loss_weights
    assert sum(w == 1.0 for w in row["loss_weights"]) == len(example.answer_ids)
    with pytest.raises(ValueError, match="choose one of"):
        SyntheticTaskDataset(tiny_tokenizer, "nope", 4, stages)
    with pytest.raises(IndexError):
        data[40]


def test_curriculum_stages_sharing_until_are_a_weighted_mixture_with_their_own_needle_depths(tiny_tokenizer):
    """The far stage's needles sit at depth 0-0.1 of a long filler; the other stage keeps the task's own depths; a
    stage is drawn per example by weight, the same every time; later stages are untouched by the mixture."""
    near = CurriculumStage(0.5, 0, 40)
    far = CurriculumStage(0.5, 200, 300, min_depth=0.0, max_depth=0.1, weight=3.0)
    last = CurriculumStage(1.0, 0, 10)
    data = SyntheticTaskDataset(tiny_tokenizer, "passkey", 400, [near, far, last], seed=1, repeat_segment_length=0)
    drawn = [data.stage(i) for i in range(200)]
    assert set(map(id, drawn)) == {id(near), id(far)} and 0.65 < drawn.count(far) / 200 < 0.85
    assert all(data.stage(i) is last for i in range(200, 400))
    for i in range(0, 200, 7):
        info = data.example(i).info
        if drawn[i] is far:
            assert 200 <= info["filler_tokens"] <= 300 and info["depth"] <= 0.1
        else:
            assert info["filler_tokens"] <= 40
    assert max(data.example(i).info["depth"] for i in range(200) if drawn[i] is near) > 0.5  # uniform [0, 1] there
    again = SyntheticTaskDataset(tiny_tokenizer, "passkey", 400, [near, far, last], seed=1, repeat_segment_length=0)
    assert [again.stage(i) is far for i in range(200)] == [d is far for d in drawn] and again[13] == data[13]
    # a single stage draws exactly what it drew before stages had depths and weights (resumed runs see the same data)
    plain = SyntheticTaskDataset(tiny_tokenizer, "passkey", 40, [CurriculumStage(1.0, 0, 50)], seed=2)
    rng = random.Random("2:5")
    filler = rng.randint(0, 50)
    from hf_fam.tasks import passkey_example

    assert plain.example(5).input_ids == passkey_example(tiny_tokenizer, rng, filler).input_ids

    with pytest.raises(ValueError, match="min_depth <= max_depth"):
        SyntheticTaskDataset(tiny_tokenizer, "passkey", 4, [CurriculumStage(1.0, 0, 4, min_depth=0.5, max_depth=0.2)])
    with pytest.raises(ValueError, match="weight must be positive"):
        SyntheticTaskDataset(tiny_tokenizer, "passkey", 4, [CurriculumStage(1.0, 0, 4, weight=0)])
    with pytest.raises(ValueError, match="the key_value task has none"):
        SyntheticTaskDataset(tiny_tokenizer, "key_value", 4, [CurriculumStage(1.0, 0, 4, max_depth=0.2)])
    with pytest.raises(ValueError, match="drop it"):
        SyntheticTaskDataset(
            tiny_tokenizer, "passkey", 4, [CurriculumStage(1.0, 0, 4, max_depth=0.2)], task_options={"depth": 0.5}
        )

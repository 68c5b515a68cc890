"""generate(): greedy, sampling and beam search match the one-shot forward; batched left-padded generation."""

import pytest
import torch
from conftest import assert_logits_close, random_ids
from test_streaming import fam_model


def check_steps_against_one_call(model, sequences, step_logits, prompt_length, beam_indices=None, row=0):
    """Every generation step's logits equal the one-shot forward's logits at the same position of the final text."""
    with torch.no_grad():
        one_call = model(sequences[row : row + 1]).logits[0]
    for step, logits in enumerate(step_logits):
        source = row if beam_indices is None else int(beam_indices[row, step])
        if source < 0:  # finished beam padding
            break
        assert_logits_close(logits[source], one_call[prompt_length - 1 + step], what=f"step {step}")


@pytest.mark.parametrize("prompt_length", [5, 8, 37])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_greedy_matches_one_call(family, prompt_length):
    model = fam_model(family, 8, 1, 3)
    ids = random_ids(1, prompt_length, seed=prompt_length)
    out = model.generate(ids, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True, min_new_tokens=20)
    assert out.sequences.shape[1] == prompt_length + 20
    check_steps_against_one_call(model, out.sequences, out.logits, prompt_length)


def test_sampling_matches_one_call():
    model = fam_model("qwen3", 6, 2, 2)
    ids = random_ids(1, 15, seed=1)
    torch.manual_seed(0)
    out = model.generate(
        ids, max_new_tokens=25, min_new_tokens=25, do_sample=True, top_k=0, temperature=1.3,
        output_logits=True, return_dict_in_generate=True,
    )
    check_steps_against_one_call(model, out.sequences, out.logits, 15)


def test_beam_search_reorders_the_fam_state():
    """Beams are reordered every step; the FAM state and token counters must follow their beams."""
    model = fam_model("llama", 4, 1, 2)
    ids = random_ids(1, 9, seed=2)
    out = model.generate(
        ids, max_new_tokens=14, min_new_tokens=14, num_beams=3, num_return_sequences=3, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    for row in range(3):
        check_steps_against_one_call(model, out.sequences, out.logits, 9, beam_indices=out.beam_indices, row=row)


def test_batched_left_padded_greedy_equals_each_row_alone():
    model = fam_model("mixtral", 5, 1, 2)
    prompts = [random_ids(1, n, seed=n)[0] for n in (17, 4, 11)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[row, width:], alone[0, len(prompt) :]), f"row {row}"

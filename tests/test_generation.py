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


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("prompt_length", [5, 8, 37])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_greedy_matches_one_call(family, prompt_length, attn):
    model = fam_model(family, 8, 1, 3, attn)
    ids = random_ids(1, prompt_length, seed=prompt_length)
    out = model.generate(ids, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True, min_new_tokens=20)
    assert out.sequences.shape[1] == prompt_length + 20
    check_steps_against_one_call(model, out.sequences, out.logits, prompt_length)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sampling_matches_one_call(attn):
    model = fam_model("qwen3", 6, 2, 2, attn)
    ids = random_ids(1, 15, seed=1)
    torch.manual_seed(0)
    out = model.generate(
        ids, max_new_tokens=25, min_new_tokens=25, do_sample=True, top_k=0, temperature=1.3,
        output_logits=True, return_dict_in_generate=True,
    )
    check_steps_against_one_call(model, out.sequences, out.logits, 15)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_beam_search_reorders_the_fam_state(attn):
    """Beams are reordered every step; the FAM state and token counters must follow their beams."""
    model = fam_model("llama", 4, 1, 2, attn)
    ids = random_ids(1, 9, seed=2)
    out = model.generate(
        ids, max_new_tokens=14, min_new_tokens=14, num_beams=3, num_return_sequences=3, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    for row in range(3):
        check_steps_against_one_call(model, out.sequences, out.logits, 9, beam_indices=out.beam_indices, row=row)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batched_left_padded_greedy_equals_each_row_alone(attn):
    model = fam_model("mixtral", 5, 1, 2, attn)
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


def generate_turn(model, ids, cache):
    """One turn of a conversation over a stream: only the turn's new tokens, plus the cache."""
    return model.generate(
        ids, cache=cache.without_history(), max_new_tokens=6, min_new_tokens=6, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_continues_a_stream_without_its_history(attn):
    """Read a document once, then chat: each turn passes only its new tokens. Every step equals one call over the
    whole conversation; a copy of the cache answers another question about the same document."""
    import copy

    model = fam_model("llama", 4, 1, 2, attn=attn)
    document, first, second = random_ids(1, 13, seed=11), random_ids(1, 3, seed=12), random_ids(1, 5, seed=13)
    cache = model.new_cache()
    with torch.no_grad():
        model(document, cache=cache)
    after_document = copy.deepcopy(cache)
    answer = generate_turn(model, first, cache)
    # generate() never feeds its last token: the next turn's input starts with it
    next_turn = torch.cat([answer.sequences[:, -1:], second], 1)
    reply = generate_turn(model, next_turn, cache)
    conversation = torch.cat([document, answer.sequences, reply.sequences[:, 1:]], 1)
    check_steps_against_one_call(model, conversation, answer.logits, 13 + 3)
    check_steps_against_one_call(model, conversation, reply.logits, 13 + 3 + 6 + 5)
    other = generate_turn(model, second, after_document)
    check_steps_against_one_call(model, torch.cat([document, other.sequences], 1), other.logits, 13 + 5)


def test_generate_with_only_new_tokens_and_a_used_cache_says_what_to_pass():
    model = fam_model("llama", 4, 1, 2)
    cache = model.new_cache()
    with torch.no_grad():
        model(random_ids(1, 13), cache=cache)
    with pytest.raises(ValueError, match=r"consumed 13 column.*cache=cache.without_history\(\)"):
        model.generate(random_ids(1, 3), cache=cache, max_new_tokens=2)


def test_beam_search_continues_a_stream_once_the_cache_is_expanded():
    """generate() expands the input for beams but not a cache it is handed: the error says how, and then the beams
    equal those of the whole history."""
    model = fam_model("llama", 4, 1, 2)
    document, question = random_ids(1, 11, seed=1), random_ids(1, 3, seed=2)
    settings = dict(max_new_tokens=5, min_new_tokens=5, num_beams=3, do_sample=False)
    cache = model.new_cache()
    with torch.no_grad():
        model(document, cache=cache)
    with pytest.raises(ValueError, match=r"cache.batch_repeat_interleave\(3\)"):
        model.generate(question, cache=cache.without_history(), **settings)
    cache.batch_repeat_interleave(3)
    continued = model.generate(question, cache=cache.without_history(), **settings)
    whole = model.generate(torch.cat([document, question], 1), **settings)
    assert torch.equal(continued, whole[:, 11:])

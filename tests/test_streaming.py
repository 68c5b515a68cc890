"""Constant-memory streaming: chunked calls equal one call, the cache stops growing, state save/restore, bad input."""

import pytest
import torch
from conftest import ATTENTION, assert_logits_close, random_ids, tiny_base
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fam_core import randomize_fam

import hf_fam
from hf_fam import FamCache
from hf_fam.modeling_fam import cache_argument_name


_BASES = {}


def fam_model(family, block_size, memory_segments, fam_length, attn="eager"):
    """A converted tiny model; the base is built once per family and shared (conversion copies no weights)."""
    key = (family, attn)
    if key not in _BASES:
        _BASES[key] = tiny_base(family, attn)
    fam = hf_fam.convert_to_fam(_BASES[key], block_size=block_size, memory_segments=memory_segments, fam_length=fam_length)
    return randomize_fam(fam).eval()


def run_chunked(model, ids, chunk_sizes, attention_mask=None):
    """Logits of `ids` fed in consecutive chunks of the given sizes through one cache."""
    cache, outputs, start = None, [], 0
    for size in chunk_sizes:
        end = min(start + size, ids.shape[1])
        if end == start:
            break
        mask = None if attention_mask is None else attention_mask[:, :end]  # generate() passes past + new columns
        out = model(ids[:, start:end], attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        outputs.append(out.logits)
        start = end
    if start < ids.shape[1]:
        mask = None if attention_mask is None else attention_mask
        outputs.append(model(ids[:, start:], attention_mask=mask, past_key_values=cache, use_cache=True).logits)
    return torch.cat(outputs, dim=1)


@st.composite
def stream_cases(draw):
    block_size = draw(st.integers(1, 9))
    memory_segments = draw(st.integers(0, 3))
    fam_length = draw(st.integers(0, min(block_size, 4)))
    length = draw(st.integers(1, 45))
    chunks = draw(st.lists(st.sampled_from([1, 2, 3, 7, block_size - 1, block_size, block_size + 1, 3 * block_size + 5]).filter(lambda n: n > 0), min_size=1, max_size=12))
    return block_size, memory_segments, fam_length, length, chunks


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=stream_cases(), seed=st.integers(0, 1000))
def test_chunked_prefill_equals_one_call_property(attn, case, seed):
    block_size, memory_segments, fam_length, length, chunks = case
    model = fam_model("llama", block_size, memory_segments, fam_length, attn)
    ids = random_ids(2, length, seed=seed)
    with torch.no_grad():
        one_call = model(ids).logits
        chunked = run_chunked(model, ids, chunks)
    assert_logits_close(chunked, one_call, what=f"chunked {chunks} vs one call")


@pytest.mark.parametrize("family, attn", ATTENTION)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=stream_cases())
def test_chunked_prefill_equals_one_call_every_family(family, attn, case):
    block_size, memory_segments, fam_length, length, chunks = case
    model = fam_model(family, block_size, memory_segments, fam_length, attn)
    ids = random_ids(1, length)
    with torch.no_grad():
        assert_logits_close(run_chunked(model, ids, chunks), model(ids).logits)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("chunks", [[1] * 40, [7] * 6, [5, 1, 1, 9, 24], [3, 17, 20]])
def test_chunked_with_left_padding_equals_one_call(chunks, attn):
    """Rows whose blocks complete at different columns each update their FAM at the right moment."""
    model = fam_model("qwen2", 5, 1, 2, attn)
    ids = random_ids(3, 40)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :11] = 0
    with torch.no_grad():
        one_call = model(ids, attention_mask=mask).logits
        chunked = run_chunked(model, ids, chunks, attention_mask=mask)
    keep = mask.bool()
    assert_logits_close(chunked[keep], one_call[keep])


def cache_tensor_sizes(cache: FamCache):
    sizes = {}
    for idx, layer in enumerate(cache.layers):
        for name, tensor in layer.tensors().items():
            sizes[f"{idx}.{name}"] = tuple(tensor.shape)
    for name in ("token_count", "position_offset", "fam_kv_fresh"):
        sizes[name] = tuple(getattr(cache, name).shape)
    return sizes


def test_cache_stops_growing():
    """After 2, 20 and 200 blocks the cache holds tensors of exactly the same sizes: (M+1)B window + FAM state."""
    B, M, F = 4, 2, 2
    model = fam_model("llama", B, M, F)
    ids = random_ids(1, 200 * B, seed=3)
    cache, snapshots, consumed = None, {}, 0
    with torch.no_grad():
        for chunk in (ids[:, i : i + 3] for i in range(0, ids.shape[1], 3)):
            cache = model(chunk, past_key_values=cache, use_cache=True).past_key_values
            consumed += chunk.shape[1]
            for blocks in (2, 20, 200):
                if blocks not in snapshots and consumed >= blocks * B:
                    snapshots[blocks] = cache_tensor_sizes(cache)
    assert snapshots[2] == snapshots[20] == snapshots[200]
    assert snapshots[200]["0.keys"] == (1, 2, F + (M + 1) * B, 16)  # (batch, kv heads, FAM + window slots, head dim)
    assert snapshots[200]["0.fam_state"] == (1, F, 64)
    assert cache.get_seq_length() == 200 * B


@pytest.mark.parametrize("family, attn", [("gemma2", "eager"), ("qwen3", "sdpa")])
def test_fam_state_save_and_restore_continues_the_stream_identically(tmp_path, family, attn):
    model = fam_model(family, 6, 1, 3, attn)
    ids = random_ids(2, 50, seed=5)
    with torch.no_grad():
        first = model(ids[:, :23], use_cache=True)
        first.past_key_values.save(tmp_path / "stream.safetensors")
        expected = model(ids[:, 23:], past_key_values=first.past_key_values, use_cache=True).logits
        restored = FamCache.load(tmp_path / "stream.safetensors")
        actual = model(ids[:, 23:], past_key_values=restored, use_cache=True).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bytes_per_stream_is_what_a_full_cache_holds(family):
    """`FamCache.bytes_per_stream` (what `hf-fam info` and the model card report) against a real cache's tensors."""
    model = fam_model(family, 4, 2, 3)
    cache = model.new_cache()
    with torch.no_grad():
        for _ in range(6):  # 24 tokens: past the window of (M+1)B = 12, so every slot exists
            model(random_ids(2, 4, seed=1), cache=cache)
    held = sum(t.nbytes for layer in cache.layers for t in layer.tensors().values())
    assert held == 2 * FamCache.bytes_per_stream(model.config, torch.float32.itemsize)


def test_a_stream_state_of_an_older_slot_layout_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = fam_model("llama", 4, 1, 2)
    cache = model.new_cache()
    with torch.no_grad():
        model(random_ids(1, 10), cache=cache)
    cache.save(tmp_path / "new.safetensors")
    with safe_open(tmp_path / "new.safetensors", framework="pt") as f:
        metadata = dict(f.metadata())
    save_file(load_file(tmp_path / "new.safetensors"), tmp_path / "old.safetensors", metadata={**metadata, "format": "hf_fam.FamCache"})
    with pytest.raises(ValueError, match="older hf-fam"):
        FamCache.load(tmp_path / "old.safetensors")


def test_cache_and_past_key_values_are_the_same_argument():
    """`cache` (the name from transformers 5.24) and `past_key_values` (before) continue the same stream."""
    model = fam_model("qwen3", 4, 1, 2)
    ids = random_ids(1, 13)
    with torch.no_grad():
        expected = model(ids).logits
        first, second = model.new_cache(), model.new_cache()
        model(ids[:, :6], cache=first)
        model(ids[:, :6], past_key_values=second)
        for cache in (first, second):
            assert_logits_close(model(ids[:, 6:], cache=cache).logits, expected[:, 6:])
        with pytest.raises(ValueError, match="not both"):
            model(ids[:, :1], cache=model.new_cache(), past_key_values=model.new_cache())


@pytest.mark.parametrize(
    "family, attn, cuts",
    [
        ("mistral", "eager", [5, 6, 30]),
        ("mistral", "sdpa", [5, 6, 30]),
        ("gemma2", "eager", [1, 601]),  # final-logit soft-capping; a chunk longer than the helper's logits slice (256)
    ],
)
def test_stream_log_likelihood_equals_one_call(family, attn, cuts):
    model = fam_model(family, 8, 1, 2, attn)
    length = cuts[-1] + 31
    ids = random_ids(2, length, seed=7)
    bounds = [0, *cuts, length]
    chunks = [ids[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    scored = torch.cat(list(hf_fam.stream_log_likelihood(model, chunks)), dim=1)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits.float(), dim=-1)
    expected = log_probs[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    assert scored.shape == (2, length - 1)
    torch.testing.assert_close(scored, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_stream_scored_in_several_calls_loses_no_token(family, tmp_path):
    """Continuing a cache (in memory, after a plain forward call on it, or restored from a file) scores the first
    token of every call: each call dropped it, because the previous call's last logits were not kept."""
    model = fam_model(family, 8, 1, 2)
    ids = random_ids(2, 70, seed=3)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits.float(), dim=-1)
    expected = log_probs[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    cache = model.new_cache()
    first = torch.cat(list(hf_fam.stream_log_likelihood(model, [ids[:, :20]], cache=cache)), dim=1)
    second = torch.cat(list(hf_fam.stream_log_likelihood(model, [ids[:, 20:33], ids[:, 33:41]], cache=cache)), dim=1)
    with torch.no_grad():
        model(ids[:, 41:50], cache=cache)  # a plain call between: its last token predicts the next call's first
    cache.save(tmp_path / "stream.safetensors")
    restored = FamCache.load(tmp_path / "stream.safetensors", model=model)
    third = torch.cat(list(hf_fam.stream_log_likelihood(model, [ids[:, 50:]], cache=restored)), dim=1)
    assert (first.shape[1], second.shape[1], third.shape[1]) == (19, 21, 20)
    torch.testing.assert_close(torch.cat([first, second], 1), expected[:, :40], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(third, expected[:, 49:], rtol=1e-5, atol=1e-5)


def test_a_padded_call_keeps_each_rows_last_real_token():
    """Right padding in a call: the kept hidden state is the row's last real token's, not the padding column's."""
    model = fam_model("llama", 8, 1, 2)
    ids = random_ids(2, 12, seed=4)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    cache = model.new_cache()
    with torch.no_grad():
        hidden, _, _ = model.final_hidden_states(ids, attention_mask=mask, cache=cache)
        alone = model.final_hidden_states(ids[1:, :9], cache=model.new_cache())[0]
    torch.testing.assert_close(cache.last_hidden_state[0], hidden[0, -1])
    assert_logits_close(cache.last_hidden_state[1:], alone[:, -1], what="hidden states")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_stream_hidden_states_equal_one_call(attn):
    model = fam_model("olmo2", 8, 1, 2, attn)
    ids = random_ids(1, 30, seed=9)
    states = torch.cat(list(hf_fam.stream_hidden_states(model, [ids[:, :13], ids[:, 13:]])), dim=1)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[-1]
    assert_logits_close(states, expected, what="hidden states")


def test_cache_of_another_configuration_is_refused():
    model = fam_model("llama", 8, 1, 2)
    other = fam_model("llama", 4, 1, 2)
    with torch.no_grad():
        cache = other(random_ids(1, 10), use_cache=True).past_key_values
        with pytest.raises(ValueError, match="block_size=4 in the cache but 8 in the model"):
            model(random_ids(1, 5), past_key_values=cache)


def test_batch_size_change_mid_stream_is_refused():
    model = fam_model("llama", 8, 1, 2)
    with torch.no_grad():
        cache = model(random_ids(2, 10), use_cache=True).past_key_values
        with pytest.raises(ValueError, match="holds 2 stream"):
            model(random_ids(3, 4), past_key_values=cache)


def test_base_model_refuses_a_fam_cache():
    model = fam_model("llama", 8, 1, 2)
    with torch.no_grad():
        cache = model(random_ids(1, 10), use_cache=True).past_key_values
        with pytest.raises(TypeError, match="FamForCausalLM"):
            base = _BASES[("llama", "eager")]
            base(random_ids(1, 3), **{cache_argument_name(base): cache})  # `cache` from 5.24 on, `past_key_values` before


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("fam_length", [0, 2])
def test_a_call_of_padding_only_leaves_the_stream_untouched(fam_length, attn):
    model = fam_model("llama", 4, 1, fam_length, attn)
    ids = random_ids(2, 15)
    with torch.no_grad():
        expected = model(ids).logits
        cache = model(ids[:, :3], attention_mask=torch.zeros(2, 3, dtype=torch.long), use_cache=True).past_key_values
        assert cache.token_count.tolist() == [0, 0]
        actual = model(ids, past_key_values=cache, attention_mask=torch.ones(2, 18, dtype=torch.long)).logits
    assert torch.isfinite(actual).all()
    assert_logits_close(actual, expected)


def test_streaming_helpers_do_not_change_the_callers_grad_mode():
    model = fam_model("llama", 8, 1, 2)
    ids = random_ids(1, 20)[0]
    for helper in (hf_fam.stream_log_likelihood, hf_fam.stream_hidden_states):
        stream = helper(model, [ids[:7], ids[7:]])
        first = next(stream)
        assert torch.is_grad_enabled() and not first.requires_grad
        next(stream)


def layer_calls(model, run):
    """How many times the first decoder layer is called while `run()` runs: the number of block segments."""
    calls = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with torch.no_grad():
            result = run()
    finally:
        handle.remove()
    return len(calls), result


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_left_padded_batch_runs_in_the_segments_of_an_unpadded_one(attn):
    """Uneven left padding puts the rows' block ends on different columns; the batch still runs in as many segments
    as the same rows unpadded (not one per column where some row completes a block), each row equal to the row alone,
    and so does a continuation in which the rows are at different points of their blocks."""
    model = fam_model("llama", 8, 1, 2, attn)
    ids = random_ids(4, 64, seed=21)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 2, 4, 6)):
        mask[row, :pad] = 0
    unpadded, _ = layer_calls(model, lambda: model(ids))
    padded, out = layer_calls(model, lambda: model(ids, attention_mask=mask, use_cache=True))
    assert unpadded == padded == 8 + 1  # eight blocks, and the FAM prompt's own pass at the start (S0)
    more = random_ids(4, 16, seed=22)
    full_mask = torch.cat([mask, torch.ones_like(more)], 1)
    continued, next_out = layer_calls(model, lambda: model(more, attention_mask=full_mask, cache=out.past_key_values))
    # rows at tokens 64, 62, 60, 58: as they are, a segment ends every 2 columns (8 segments); aligned, 3 segments
    assert continued == 3
    assert out.past_key_values.get_seq_length() == 80
    with torch.no_grad():
        for row in range(4):
            keep = mask[row].bool()
            alone = model(torch.cat([ids[row][keep], more[row]])[None]).logits[0]
            assert_logits_close(out.logits[row][keep], alone[: int(keep.sum())], what=f"row {row}")
            assert_logits_close(next_out.logits[row], alone[int(keep.sum()) :], what=f"row {row}, continued")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=stream_cases(), pads=st.lists(st.integers(0, 12), min_size=3, max_size=3), seed=st.integers(0, 1000))
def test_left_padded_batch_fed_in_chunks_equals_each_row_alone_property(case, pads, seed):
    """Rows of uneven left padding, fed in chunks: whichever layout each call runs in, every row equals the row
    alone in one call."""
    block_size, memory_segments, fam_length, length, chunks = case
    model = fam_model("llama", block_size, memory_segments, fam_length)
    width = length + max(pads)
    ids = random_ids(3, width, seed=seed)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    with torch.no_grad():
        chunked = run_chunked(model, ids, chunks, attention_mask=mask)
        for row in range(3):
            keep = mask[row].bool()
            alone = model(ids[row][keep][None]).logits[0]
            assert_logits_close(chunked[row][keep], alone, what=f"row {row}, pads {pads}, chunks {chunks}")

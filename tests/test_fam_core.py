"""The spec's rule 7 limits and the reference comparison, on a tiny model of every supported family."""

import pytest
import torch
from conftest import ATTENTION, FAMILIES, assert_logits_close, random_ids, tiny_base
from reference_fam import reference_logits

import hf_fam
from hf_fam.card import bswa_receptive_field


def convert(base, **settings):
    fam = hf_fam.convert_to_fam(base, **settings)
    return fam.eval()


def randomize_fam(fam, seed=0, std=1.0):
    """A FAM prompt far from any token embedding, and (gated update) a different gate in every layer, so tests see
    the FAM path do something and a gate applied to the wrong layer shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        scale = fam.get_input_embeddings()(torch.arange(8)).std()
        fam.fam_prompt.weight.copy_(torch.randn(fam.fam_prompt.weight.shape, generator=generator) * scale * std)
        if fam.fam_gate is not None:
            fam.fam_gate.weight.copy_(0.3 + torch.rand(fam.fam_gate.weight.shape, generator=generator))
    return fam


@pytest.mark.parametrize("family,attn", ATTENTION)
def test_bswa_limit_matches_base_model(family, attn):
    base = tiny_base(family, attn)
    ids = random_ids(2, 40)
    with torch.no_grad():
        expected = base(ids).logits
    # F = 0 and (M+1)B >= length: unchanged base model, including partial last block (40 = 4 x 9 + 4)
    fam = convert(base, block_size=9, memory_segments=4, fam_length=0)
    with torch.no_grad():
        actual = fam(ids).logits
    assert_logits_close(actual, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_bswa_limit_with_right_padding_matches_each_row_alone(family):
    base = tiny_base(family)
    ids = random_ids(2, 30)
    mask = torch.ones_like(ids)
    mask[1, 21:] = 0
    fam = convert(base, block_size=8, memory_segments=3, fam_length=0)
    with torch.no_grad():
        batched = fam(ids, attention_mask=mask).logits
        alone = [base(ids[:1]).logits[0], base(ids[1:, :21]).logits[0]]
    assert_logits_close(batched[0], alone[0])
    assert_logits_close(batched[1, :21], alone[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_reference_implementation(family):
    """With F > 0 and a random FAM prompt, the model equals the spec's rules written out in tests/reference_fam.py."""
    base = tiny_base(family)
    fam = randomize_fam(convert(base, block_size=8, memory_segments=1, fam_length=3))
    ids = random_ids(1, 37)  # four full blocks and a partial one
    with torch.no_grad():
        actual = fam(ids).logits[0]
    expected = reference_logits(fam, ids[0])
    assert_logits_close(actual, expected)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
def test_matches_reference_with_padding_in_batch(family):
    """Rows with left and right padding and different lengths each equal the reference on their own tokens."""
    base = tiny_base(family)
    fam = randomize_fam(convert(base, block_size=5, memory_segments=2, fam_length=2))
    ids = random_ids(3, 33)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    mask[2, 26:] = 0  # right padding
    with torch.no_grad():
        batched = fam(ids, attention_mask=mask).logits
    for row in range(3):
        keep = mask[row].bool()
        expected = reference_logits(fam, ids[row][keep])
        assert_logits_close(batched[row][keep], expected, what=f"row {row}")


@pytest.mark.parametrize("family", FAMILIES)
def test_causality(family):
    """Changing token t never changes the logits of earlier tokens."""
    base = tiny_base(family)
    fam = randomize_fam(convert(base, block_size=6, memory_segments=1, fam_length=3))
    ids = random_ids(1, 30)
    for t in (1, 5, 6, 17, 29):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % 256
        with torch.no_grad():
            before, after = fam(ids).logits, fam(changed).logits
        assert_logits_close(after[:, :t], before[:, :t], rtol=1e-6, what=f"logits before token {t}")
        assert not torch.allclose(after[:, t], before[:, t]), f"token {t} does not affect its own logits"


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "mistral"])
def test_fam_reaches_block_tokens_only_from_the_next_block(family):
    """With M = 0 a block sees the past only through the FAM; the FAM rows that read a later token of the block
    must not leak it into the block's earlier tokens, and must reach the next block."""
    base = tiny_base(family)
    fam = randomize_fam(convert(base, block_size=8, memory_segments=0, fam_length=4))
    ids = random_ids(1, 24)
    changed = ids.clone()
    changed[0, 13] += 1  # block 1 (tokens 8..15)
    with torch.no_grad():
        before, after = fam(ids).logits, fam(changed).logits
    assert_logits_close(after[:, :13], before[:, :13], rtol=1e-6)
    assert (after[0, 16:] - before[0, 16:]).abs().max() > 1e-4 * before.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_reach_beyond_bswa_receptive_field(family):
    """Changing token 0 changes logits from (depth x M + 1) x B on (`hf-fam info`'s receptive field) only through the
    FAM; BSWA reaches the last block before that."""
    B, M = 4, 1
    depth = tiny_base(family).config.num_hidden_layers
    receptive_field = (depth * M + 1) * B
    assert receptive_field == bswa_receptive_field(convert(tiny_base(family), block_size=B, memory_segments=M, fam_length=2).config)
    length = receptive_field + 3 * B
    ids = random_ids(1, length)
    changed = ids.clone()
    changed[0, 0] += 1
    for fam_length in (0, 2):
        fam = randomize_fam(convert(tiny_base(family), block_size=B, memory_segments=M, fam_length=fam_length))
        with torch.no_grad():
            before, after = fam(ids).logits, fam(changed).logits
        far = (after[0, receptive_field:] - before[0, receptive_field:]).abs().max().item()
        if fam_length == 0:
            assert far == 0.0, f"BSWA reached {far} beyond its receptive field"
            edge = (after[0, receptive_field - B : receptive_field] - before[0, receptive_field - B : receptive_field]).abs().max()
            assert edge > 0, "BSWA did not reach the last block of its receptive field: the receptive field is overstated"
        else:
            assert far > 1e-4 * before.abs().max().item(), "FAM did not carry token 0 beyond the BSWA receptive field"


@pytest.mark.parametrize("family,window", [("mistral", 6), ("gemma3_text", 5)])
def test_bswa_receptive_field_follows_the_base_models_sliding_window(family, window):
    """Where the base's sliding window is shorter than M blocks, each windowed layer reaches less far back than M
    blocks (rule 4): the stated receptive field is exactly the last position token 0 reaches."""
    B, M = 4, 2
    base = tiny_base(family, sliding_window=window)
    fam = convert(base, block_size=B, memory_segments=M, fam_length=0)
    receptive_field = bswa_receptive_field(fam.config)
    assert receptive_field < (base.config.num_hidden_layers * M + 1) * B
    ids = random_ids(1, receptive_field + 3 * B)
    changed = ids.clone()
    changed[0, 0] += 1
    with torch.no_grad():
        moved = (fam(changed).logits - fam(ids).logits)[0].abs().amax(-1)
    assert int(moved.nonzero().max()) + 1 == receptive_field


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma2"])
def test_eager_and_sdpa_agree(family, monkeypatch):
    """Also with sdpa's FAM queries computed over their own keys (FAM and current block), apart from the block
    queries, and with the kernel sharing each key/value head among its query heads (`_fam_sdpa_attention`): the
    recorded kernel calls show the split and the unrepeated key heads, which must not change a logit."""
    sdpa, query_rows, key_heads = torch.nn.functional.scaled_dot_product_attention, [], set()

    def recorded_sdpa(query, key, *args, **kwargs):
        query_rows.append(query.shape[2])
        if query.shape[2] > 1:
            key_heads.add((query.shape[1], key.shape[1]))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded_sdpa)
    ids = random_ids(2, 29)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    logits = {}
    for attn in ("eager", "sdpa"):
        fam = randomize_fam(convert(tiny_base(family, attn), block_size=7, memory_segments=2, fam_length=3))
        query_rows.clear(), key_heads.clear()  # the FAM model's calls only, not the conversion's check of the base
        with torch.no_grad():
            logits[attn] = fam(ids, attention_mask=mask).logits
        assert fam.config.text_config._attn_implementation == attn
    keep = mask.bool()
    assert_logits_close(logits["sdpa"][keep], logits["eager"][keep])
    assert 3 in query_rows, "the FAM queries of blocks with memory segments ran in a call of their own"
    config = tiny_base(family).config
    grouped = (config.num_attention_heads, config.num_key_value_heads)
    assert key_heads == {grouped}, "the keys and values reach the kernel copied once per query head"


@pytest.mark.parametrize(
    "family,overrides,length",
    [
        # dynamic NTK: below max_position_embeddings the base model keeps its original frequencies
        ("llama", dict(max_position_embeddings=64, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), 40),
        # longrope: past original_max_position_embeddings the base model switches to the long factors, as hf_fam
        # does once for the whole stream
        ("phi3", dict(max_position_embeddings=256, original_max_position_embeddings=32, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 32, "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 3.0, 4.0, 5.0],
        }), 40),
    ],
)
def test_bswa_limit_with_length_dependent_rotary(family, overrides, length):
    base = tiny_base(family, **overrides)
    ids = random_ids(1, length)
    with torch.no_grad():
        expected = base(ids).logits
        fam = convert(base, block_size=8, memory_segments=4, fam_length=0)
        actual = fam(ids).logits
        # the frequencies stay fixed whatever the length of later calls, even past max_position_embeddings
        fam(random_ids(1, 3))
        long = fam(random_ids(1, 3 * 64))
        again = fam(ids).logits
        # fixed frequencies: the long run's first blocks equal a short run on the same tokens (no length effect)
        short = fam(random_ids(1, 3 * 64)[:, :16]).logits
    assert_logits_close(actual, expected)
    assert_logits_close(again, actual, rtol=1e-6)
    assert_logits_close(long.logits[:, :16], short, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_position_offset_matches_reference_with_the_same_offset(family):
    """Rotary attention is relative, so an offset added to every position changes logits only by rounding: the
    reference given the same offset must agree to 1e-5, and the test checks that the offset's effect is larger
    than that (so ignoring the offset would fail)."""
    fam = randomize_fam(convert(tiny_base(family), block_size=8, memory_segments=1, fam_length=3))
    ids = random_ids(1, 37)
    offset = 56_000  # within [0, 2 pi rope_theta): what the training recipe draws
    with torch.no_grad():
        shifted = fam(ids, fam_position_offset=offset).logits[0]
        plain = fam(ids).logits[0]
    expected = reference_logits(fam, ids[0], position_offset=offset)
    assert_logits_close(shifted, expected)
    assert (shifted - plain).abs().max() > 10 * 1e-5 * plain.abs().max(), "the offset had no measurable effect"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fam_update", ["gated", "replace"])
def test_sink_rows_match_reference_and_are_never_updated(family, fam_update):
    """fam_sink_length K: the first K FAM rows keep the stream's initial state (a sink of their own for every block)
    while the others follow the update; the model equals the reference, and the sink rows reach later blocks."""
    fam = randomize_fam(convert(tiny_base(family), block_size=8, memory_segments=1, fam_length=3, fam_update=fam_update, fam_sink_length=2))
    ids = random_ids(2, 37)  # four full blocks and a partial one
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: that row completes its blocks at other columns
    with torch.no_grad():
        out = fam(ids, attention_mask=mask, use_cache=True)
        start = fam(ids[:, :3], use_cache=True)  # no block completed: the state is S0 (computed in that call's kernels)
    for row in range(2):
        keep = mask[row].bool()
        assert_logits_close(out.logits[row][keep], reference_logits(fam, ids[row][keep]), what=f"row {row}")
    for final, initial in zip(out.past_key_values.fam_state(), start.past_key_values.fam_state(), strict=True):
        assert_logits_close(final[:, :2], initial[:, :2], what="the sink rows and S0")  # an update moves them far more
        assert not torch.allclose(final[:, 2:], initial[:, 2:]), "the memory row was not updated"


def test_sink_length_zero_is_the_rules_as_written_and_sink_length_f_is_a_fam_without_feedback():
    base = tiny_base("llama")
    ids = random_ids(1, 29)
    plain = randomize_fam(convert(base, block_size=6, memory_segments=0, fam_length=2))
    zero = randomize_fam(convert(base, block_size=6, memory_segments=0, fam_length=2, fam_sink_length=0))
    frozen = randomize_fam(convert(base, block_size=6, memory_segments=0, fam_length=2, fam_sink_length=2))
    with torch.no_grad():
        assert torch.equal(zero(ids).logits, plain(ids).logits)
        # with every row a sink and M = 0, no block sees another: changing block 1 leaves the later blocks as they were
        changed = ids.clone()
        changed[0, 2] += 1
        moved = (frozen(changed).logits - frozen(ids).logits)[0].abs().amax(-1)
    assert moved[:6].max() > 0 and moved[6:].max() == 0
    for bad in (3, -1, True):
        with pytest.raises(ValueError, match="fam_sink_length"):
            convert(base, block_size=6, memory_segments=0, fam_length=2, fam_sink_length=bad)

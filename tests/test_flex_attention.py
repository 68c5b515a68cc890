"""attn_implementation="flex_attention": the FAM pattern as a flex BlockMask (transformers' flex mask interface on the
same mask functions) gives eager attention's logits, in one call and streamed, and the BSWA limit is the base model.

Two ways of running torch's flex attention on CPU:
- the compiled kernel (what transformers runs: torch.compile of flex_attention, inductor's C++ flex template, which
  skips the blocks the BlockMask leaves out), for llama, with few distinct shapes: each shape costs a compilation
  (about 55 s of CPU for this test with an empty inductor cache, 10 s with a warm one), so it runs only when
  HF_FAM_FLEX_KERNEL=1 (the default suite has a 15-minute budget);
- flex attention with torch.compile forced eager (`torch.compiler.set_stance("force_eager")`): torch's unfused reference,
  which applies the same BlockMask's mask function to the full score matrix. It compiles nothing, so it covers more
  families (sliding windows, soft-capping, grouped-query attention), padding and chunk patterns cheaply.
"""

import os
from contextlib import contextmanager

import pytest
import torch
from conftest import assert_logits_close, random_ids, tiny_base
from test_fam_core import randomize_fam
from test_streaming import run_chunked
from torch.nn.attention.flex_attention import BlockMask
from transformers import AutoModelForCausalLM

import hf_fam


FLEX = "flex_attention"
pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),  # the unfused runs, on purpose
    pytest.mark.filterwarnings("ignore:_compile flag on create_block_mask"),  # transformers' call, not ours
]


def convert(base, block_size, memory_segments, fam_length):
    fam = hf_fam.convert_to_fam(
        base, block_size=block_size, memory_segments=memory_segments, fam_length=fam_length, calibration_steps=0
    )
    return randomize_fam(fam).eval()


@contextmanager
def attention(model, implementation):
    """`model` running `implementation` inside the block, its previous implementation after."""
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def uncompiled():
    """torch.compile off: transformers' flex path then runs torch's unfused flex attention and builds the BlockMask
    without compiling."""
    return torch.compiler.set_stance("force_eager")


@pytest.mark.skipif(
    os.environ.get("HF_FAM_FLEX_KERNEL") != "1",
    reason="compiles torch's CPU flex kernel (about a minute with an empty inductor cache): set HF_FAM_FLEX_KERNEL=1",
)
def test_flex_kernel_equals_eager_one_call_and_streamed():
    """The compiled CPU kernel, GQA (4 query heads, 2 key/value heads), memory segments and FAM: 3 shapes (the S0 pass,
    the first block, the full window), all reused by the block-by-block stream."""
    fam = convert(tiny_base("llama"), block_size=4, memory_segments=1, fam_length=2)
    ids = random_ids(2, 16)
    with torch.no_grad():
        expected = fam(ids).logits
        with attention(fam, FLEX):
            assert fam.model.config._attn_implementation == FLEX
            one_call = fam(ids).logits
            streamed = run_chunked(fam, ids, [4] * 4)
    assert_logits_close(one_call, expected, what="flex kernel vs eager")
    assert_logits_close(streamed, expected, what="flex kernel streamed vs eager")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gemma3_text"])
def test_flex_equals_eager_with_padding_and_chunks(family):
    """Sliding-window layers (qwen2, mistral, gemma2/3: window 8 below the length), attention soft-capping (gemma2),
    left padding (rows whose blocks complete at different columns), and chunks that cut blocks."""
    fam = convert(tiny_base(family), block_size=4, memory_segments=1, fam_length=2)
    ids = random_ids(3, 23)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :9] = 0
    keep = mask.bool()
    with torch.no_grad():
        expected = fam(ids, attention_mask=mask).logits
        with uncompiled(), attention(fam, FLEX):
            one_call = fam(ids, attention_mask=mask).logits
            chunked = run_chunked(fam, ids, [3, 1, 5, 12], attention_mask=mask)
    assert_logits_close(one_call[keep], expected[keep], what="flex vs eager")
    assert_logits_close(chunked[keep], expected[keep], what="flex chunked vs eager")


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_flex_bswa_limit_matches_base_model(family):
    """F = 0 and (M+1)B >= length: the base model (eager), with a partial last block (20 = 2 x 8 + 4)."""
    base = tiny_base(family)
    ids = random_ids(2, 20)
    with torch.no_grad():
        expected = base(ids).logits
    fam = convert(base, block_size=8, memory_segments=2, fam_length=0)
    with torch.no_grad(), uncompiled(), attention(fam, FLEX):
        actual = fam(ids).logits
    assert_logits_close(actual, expected)


def test_flex_through_conversion_and_from_pretrained(tmp_path):
    """A base loaded with flex converts with flex (its self-check runs flex), and a converted folder loads with
    attn_implementation="flex_attention"."""
    ids = random_ids(2, 13)
    with uncompiled():
        fam = convert(tiny_base("llama", FLEX), block_size=4, memory_segments=1, fam_length=2)
        assert fam.model.config._attn_implementation == FLEX
        fam.save_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation=FLEX).eval()
        assert loaded.model.config._attn_implementation == FLEX
        mask = loaded._build_mask(lambda b, h, q, k: k <= q, 1, 3, 3, torch.float32, ids.device)
        assert isinstance(mask, BlockMask)  # what the layers get: no dense mask
        with torch.no_grad():
            actual = loaded(ids).logits
    with torch.no_grad(), attention(fam, "eager"):
        expected = fam(ids).logits
    assert_logits_close(actual, expected)


def test_flex_is_refused_for_a_base_family_without_flex(monkeypatch):
    fam = convert(tiny_base("llama"), block_size=4, memory_segments=0, fam_length=2)
    monkeypatch.setattr(type(fam.model), "_supports_flex_attn", False)
    fam.model.config._attn_implementation_internal = FLEX
    with pytest.raises(ValueError, match="does not support flex attention.*'eager' or 'sdpa'"):
        fam(random_ids(1, 6))


def test_flex_greedy_generation_matches_eager():
    """generate() with flex: every step's logits equal the eager one-shot forward on the final text."""
    fam = convert(tiny_base("llama"), block_size=4, memory_segments=1, fam_length=2)
    ids = random_ids(1, 9, seed=2)
    with uncompiled(), attention(fam, FLEX):
        out = fam.generate(
            ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    with torch.no_grad():
        expected = fam(out.sequences).logits[0]
    for step, logits in enumerate(out.logits):
        assert_logits_close(logits[0], expected[9 - 1 + step], what=f"step {step}")

"""`FamForCausalLM.reuse_initial_state()`: S0 computed once for many new streams, with the results of computing it in
every call, and computed again whenever reusing it could be wrong."""

import pytest
import torch
from conftest import assert_logits_close, random_ids, tiny_base
from test_fam_core import randomize_fam

import hf_fam


def tiny_fam(family="llama", attn="eager", **settings):
    settings = {"block_size": 4, "memory_segments": 1, "fam_length": 2, "calibration_steps": 0, **settings}
    return randomize_fam(hf_fam.convert_to_fam(tiny_base(family, attn), **settings)).eval()


class PromptPasses:
    """Counts the FAM prompt's passes: every computation of S0 starts with one call of the prompt module."""

    def __init__(self, fam):
        self.count = 0
        self.handle = fam.fam_prompt.register_forward_hook(self.seen)

    def seen(self, *_):
        self.count += 1


def batches():
    """Three new streams' inputs: a left-padded batch of two, another, and a single row."""
    first, second = random_ids(2, 11, seed=1), random_ids(2, 9, seed=2)
    first_mask = torch.ones_like(first)
    first_mask[1, :3] = 0
    return [(first, first_mask), (second, torch.ones_like(second)), (random_ids(1, 6, seed=3), None)]


def run(fam, inputs):
    return [fam(ids, attention_mask=mask, use_cache=True) for ids, mask in inputs]


@pytest.mark.parametrize(
    "family, attn, order",
    [("llama", "eager", "block"), ("llama", "sdpa", "layer"), ("gemma3_text", "eager", "block"), ("qwen2", "sdpa", "block")],
)
def test_reused_state_gives_the_outputs_of_computing_it_in_every_call(family, attn, order):
    fam = tiny_fam(family, attn, fam_update="gated")
    fam.config.loop_order = order
    inputs = batches()
    passes = PromptPasses(fam)
    with torch.no_grad():
        expected = run(fam, inputs)
        assert passes.count == 3
        with fam.reuse_initial_state():
            reused = run(fam, inputs)
        assert passes.count == 4  # the first new stream inside the block computed S0, the other two reused it
    # S0 computed in one call's kernels and in another's: equal up to rounding (a stream's first segment computes it
    # next to its own rows where that is cheaper, `_plan_segment`)
    for a, b in zip(reused, expected, strict=True):
        assert_logits_close(a.logits, b.logits)
        for x, y in zip(a.past_key_values.fam_state(), b.past_key_values.fam_state(), strict=True):
            assert_logits_close(x, y, what="FAM states")
    assert fam._reused_initial_states is None  # leaving the block forgets the state


def test_a_changed_weight_or_buffer_computes_the_state_again():
    fam = tiny_fam()
    ids = random_ids(1, 10)
    passes = PromptPasses(fam)
    layer = fam.decoder_layers[0]
    with torch.no_grad(), fam.reuse_initial_state():
        before = fam(ids).logits
        layer.mlp.up_proj.weight.mul_(2.0)  # in place, as an optimizer step
        changed = fam(ids).logits
        assert passes.count == 2
        fam.load_state_dict({**fam.state_dict(), "fam_prompt.weight": fam.fam_prompt.weight * 0.5})
        loaded = fam(ids).logits
        fam.fam_prompt.weight = torch.nn.Parameter(fam.fam_prompt.weight.clone())  # same values, a new tensor
        replaced = fam(ids).logits
        assert passes.count == 4
    with torch.no_grad():
        assert torch.equal(loaded, fam(ids).logits)
        assert torch.equal(replaced, loaded)
        layer.mlp.up_proj.weight.div_(2.0)
        fam.fam_prompt.weight.mul_(2)
        assert torch.equal(before, fam(ids).logits)
    assert not torch.equal(changed, before)


def test_the_state_is_not_reused_where_a_call_needs_its_own():
    fam = tiny_fam()
    ids = random_ids(2, 10)
    passes = PromptPasses(fam)
    with fam.reuse_initial_state():
        # grad mode with trainable parameters: the prompt needs its gradient
        fam(ids).logits.sum().backward()
        fam(ids).logits.sum().backward()
        assert passes.count == 2 and fam.fam_prompt.weight.grad.abs().sum() > 0
        with torch.no_grad():
            fam.train()  # training mode (dropout)
            fam(ids)
            fam(ids)
            assert passes.count == 4
            fam.eval()
            offsets = torch.tensor([0, 3])  # rows starting at different positions
            mixed = [fam(ids, fam_position_offset=offsets).logits for _ in range(2)]
            assert passes.count == 6
            shifted = [fam(ids, fam_position_offset=3).logits for _ in range(2)]  # one offset for all rows: reused
            assert passes.count == 7
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fam(ids)
                fam(ids)
            assert passes.count == 9
            fam.requires_grad_(False)
        frozen = [fam(ids).logits for _ in range(2)]  # grad mode, but nothing to train: reused
        assert passes.count == 10
    with torch.no_grad():
        assert torch.equal(mixed[1], fam(ids, fam_position_offset=offsets).logits)
        assert torch.equal(shifted[1], fam(ids, fam_position_offset=3).logits)
        assert torch.equal(frozen[1], fam(ids).logits)


def test_a_stream_changing_its_state_in_place_leaves_the_kept_one_alone():
    fam = tiny_fam()
    ids = random_ids(1, 3)  # shorter than a block: the cache still holds S0 after the call
    with torch.no_grad():
        expected = fam(ids).logits
        with fam.reuse_initial_state():
            cache = fam(ids, use_cache=True).past_key_values
            for state in cache.fam_state():
                state.add_(1.0)
            again = fam(ids).logits
    assert torch.equal(again, expected)


def test_nested_blocks_keep_the_state_until_the_outermost_ends():
    fam = tiny_fam()
    ids = random_ids(1, 10)
    passes = PromptPasses(fam)
    with torch.no_grad(), fam.reuse_initial_state():
        fam(ids)
        with fam.reuse_initial_state():
            fam(ids)
        fam(ids)
    assert passes.count == 1
    with torch.no_grad():
        fam(ids)
    assert passes.count == 2


def test_an_offloaded_model_loads_each_layer_once_per_forward_inside_the_block(tmp_path):
    """accelerate's disk offload puts new parameter objects in place at every load, so no kept S0 matches them and the
    block computes S0 every call. It must do so in the layer visits of the layer-major pass ("auto" for an offloaded
    model), as outside the block, not in a pass of its own that loads every layer once more."""
    from transformers import AutoModelForCausalLM

    fam = randomize_fam(
        hf_fam.convert_to_fam(tiny_base("llama", num_hidden_layers=3), block_size=4, memory_segments=1, fam_length=2)
    ).eval()
    fam.save_pretrained(tmp_path / "model")
    device_map = {name: "cpu" for name in ("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head", "fam_prompt")}
    device_map.update({"fam_gate": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    hook = model.model.layers[1].self_attn.q_proj._hf_hook
    loads, pre_forward = [], hook.pre_forward

    def counting(module, *args, **kwargs):
        loads.append(hook.offload)  # a call that loaded the weights
        return pre_forward(module, *args, **kwargs)

    hook.pre_forward = counting
    ids = random_ids(1, 10)
    with torch.no_grad():
        expected = fam(ids).logits
        model(ids)
        outside = sum(loads)
        with model.reuse_initial_state():
            for _ in range(2):
                loads.clear()
                assert_logits_close(model(ids).logits, expected)
                assert sum(loads) == outside == 1

"""Layer-major and block-major loop orders (FamConfig.loop_order) give the same results, and layer-major loads an
offloaded layer's weights once per forward pass instead of once per block.

The block-major order is held to the spec's rule-7 limits by the other test files; here the layer-major order is held
to it: exactly the same logits, hidden states, stream state and gradients, and the BSWA limit on its own.
"""

import pytest
import torch
from conftest import assert_logits_close, random_ids, tiny_base
from test_fam_core import randomize_fam
from test_hardware import offloaded, saved_fam

import hf_fam
from hf_fam import modeling_fam


def ordered(fam, order):
    fam.config.loop_order = order
    return fam


def padded_ids(seed=4):
    ids = random_ids(2, 23, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2", "mistral"])
@pytest.mark.parametrize("fam_update,sink", [("gated", 0), ("replace", 0), ("gated", 1)])
def test_layer_major_equals_block_major_in_one_call_and_chunk_by_chunk(family, fam_update, sink):
    fam = randomize_fam(
        hf_fam.convert_to_fam(
            tiny_base(family), block_size=4, memory_segments=1, fam_length=2, fam_update=fam_update, fam_sink_length=sink
        )
    ).eval()
    ids, mask = padded_ids()
    results = {}
    with torch.no_grad():
        for order in ("block", "layer"):
            one = ordered(fam, order)(ids, attention_mask=mask, output_hidden_states=True)
            cache, chunks = None, []
            for start, end in ((0, 5), (5, 6), (6, 17), (17, 23)):
                out = fam(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
                cache = out.past_key_values
                chunks.append(out.logits)
            results[order] = (one, torch.cat(chunks, 1), cache)
    (block, block_chunks, block_cache), (layer, layer_chunks, layer_cache) = results["block"], results["layer"]
    assert torch.equal(layer.logits, block.logits)
    assert all(torch.equal(a, b) for a, b in zip(layer.hidden_states, block.hidden_states, strict=True))
    for a, b in ((layer.past_key_values, block.past_key_values), (layer_cache, block_cache)):
        assert torch.equal(a.token_count, b.token_count) and a.get_seq_length() == b.get_seq_length()
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert torch.equal(la.fam_state, lb.fam_state)
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
    keep = mask.bool()
    assert torch.equal(layer_chunks[keep], block_chunks[keep])
    assert_logits_close(layer_chunks[keep], layer.logits[keep], what="layer-major, chunked vs one call")


def test_layer_major_returns_the_router_logits_and_loss_of_block_major():
    """Mixture of experts: the same load-balancing loss, and the router logits in the same (block-major) order."""
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("mixtral"), block_size=4, memory_segments=1, fam_length=2)).eval()
    ids, mask = padded_ids()
    with torch.no_grad():
        block, layer = (
            ordered(fam, order)(ids, attention_mask=mask, labels=ids, output_router_logits=True)
            for order in ("block", "layer")
        )
    assert torch.equal(layer.loss, block.loss) and torch.equal(layer.aux_loss, block.aux_loss)
    assert len(block.router_logits) == 2 * 6  # 2 layers x 6 block segments
    assert all(torch.equal(a, b) for a, b in zip(layer.router_logits, block.router_logits, strict=True))


def test_layer_major_bswa_limit_is_the_base_model():
    base = tiny_base("llama")
    ids = random_ids(2, 24)
    with torch.no_grad():
        expected = base(ids).logits
        fam = ordered(hf_fam.convert_to_fam(base, block_size=8, memory_segments=2, fam_length=0), "layer")
        assert_logits_close(fam(ids).logits, expected, what="layer-major BSWA limit")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_layer_major_gives_the_gradients_of_block_major(checkpointing):
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("llama"), block_size=4, memory_segments=1, fam_length=2)).train()
    if checkpointing:
        fam.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = padded_ids(seed=5)
    grads = {}
    for order in ("block", "layer"):
        fam.zero_grad()
        loss = ordered(fam, order)(ids, attention_mask=mask, labels=ids, fam_position_offset=7).loss
        loss.backward()
        grads[order] = {name: p.grad.clone() for name, p in fam.named_parameters() if p.grad is not None}
    assert grads["layer"].keys() == grads["block"].keys() and "fam_prompt.weight" in grads["layer"]
    for name, grad in grads["block"].items():
        torch.testing.assert_close(grads["layer"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_layer_major_loads_an_offloaded_layer_once_per_forward(tmp_path):
    """accelerate's disk offload loads layer 1's weights (its q_proj, as the others) for every call of it.
    Block-major calls it once per block segment (and once for the FAM prompt's own pass, S0, but layer 1 is the last
    layer, whose S0 output nobody reads); layer-major, what "auto" picks for an offloaded model, loads them once per
    forward pass, and the logits do not change."""
    plain = saved_fam(tmp_path)
    model = offloaded(tmp_path)
    assert model.config.loop_order == "auto"
    hook = model.model.layers[1].self_attn.q_proj._hf_hook  # accelerate hooks the modules that hold weights
    loads = []
    pre_forward = hook.pre_forward

    def counting(module, *args, **kwargs):
        loads.append(hook.offload)
        return pre_forward(module, *args, **kwargs)

    hook.pre_forward = counting
    ids, mask = padded_ids()
    with torch.no_grad():
        expected = plain(ids, attention_mask=mask).logits
        per_order = {}
        for order in ("block", "auto", "layer"):
            loads.clear()
            assert_logits_close(ordered(model, order)(ids, attention_mask=mask).logits, expected, what=order)
            per_order[order] = sum(loads)  # calls that loaded weights (offload on)
            assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # released afterwards
    segments = 6  # 23 columns, block 4, aligned rows: blocks end at columns 3, 7, 11, 15, 19, then 20..22
    assert per_order == {"block": segments, "auto": 1, "layer": 1}


def test_auto_runs_layer_major_for_zero3_partitioned_layers():
    """DeepSpeed ZeRO-3 marks the parameters it partitions with `ds_id` (tests/zero3_worker.py runs the real thing
    where DeepSpeed is installed): "auto" then runs layer-major, and block-major for the same model unmarked."""
    model = hf_fam.convert_to_fam(tiny_base("llama"), block_size=4, memory_segments=1, fam_length=2)
    assert not model._runs_layer_major()
    model.model.layers[1].mlp.down_proj.weight.ds_id = 7
    assert model._runs_layer_major()


@pytest.mark.parametrize("budget,groups", [(1, 6), (2000, 2)])
def test_layer_major_runs_long_inputs_in_groups_within_the_mask_budget(budget, groups, monkeypatch):
    """Masks beyond the budget: the segments run in groups, each layer gathered once per group, results unchanged.
    (Each segment's mask here: 2 rows x (2 FAM + 4 tokens) queries x (2 FAM + 4 to 8 window) keys in float32, 288 to
    480 bytes, six of them: with 2,000 bytes, two groups.)"""
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("llama"), block_size=4, memory_segments=1, fam_length=2)).eval()
    ids, mask = padded_ids()
    with torch.no_grad():
        expected = ordered(fam, "block")(ids, attention_mask=mask, output_hidden_states=True)
        monkeypatch.setattr(type(fam), "layer_major_mask_budget", budget)
        calls = []
        handle = fam.model.layers[1].register_forward_pre_hook(lambda module, args: calls.append(1))
        visits = []
        kept = modeling_fam._weights_kept

        def counting(layer):
            visits.append(layer)
            return kept(layer)

        monkeypatch.setattr(modeling_fam, "_weights_kept", counting)
        out = ordered(fam, "layer")(ids, attention_mask=mask, output_hidden_states=True)
        handle.remove()
    assert len(calls) == 6 and visits.count(fam.model.layers[1]) == groups
    assert torch.equal(out.logits, expected.logits)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, expected.hidden_states, strict=True))

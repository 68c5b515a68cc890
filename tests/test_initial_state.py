"""A new stream's S0 computed in its first segment's layer calls (`FamForCausalLM._plan_segment`): the results of the
FAM prompt's own pass, without layer calls of its own wherever that costs no more rows (one row, rows at different
position offsets, or a first segment in which no block completes)."""

import pytest
import torch
from conftest import assert_logits_close, random_ids
from test_reuse_initial_state import tiny_fam


class LayerCalls:
    """Counts the calls of every decoder layer (each layer is called as often as layer 0)."""

    def __init__(self, fam):
        self.count = 0
        fam.decoder_layers[0].register_forward_hook(self.seen)

    def seen(self, *_):
        self.count += 1


CASES = {
    # name: (batch, columns, position offset, layer calls: the segments (block size 4), plus one where the prompt's own
    # pass runs)
    "shorter than a block": (1, 3, None, 1),
    "one row": (1, 10, None, 3),
    "rows at different offsets": (2, 10, torch.tensor([0, 3]), 3),
    "rows sharing S0": (2, 10, 2, 4),  # one prompt row for all rows in a pass of its own costs less than one per row
    "rows sharing S0, shorter than a block": (2, 3, None, 1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "family, attn",
    [("llama", "eager"), ("llama", "sdpa"), ("gemma3_text", "sdpa"), ("qwen2", "sdpa"), ("mixtral", "eager")],
)
def test_the_first_segment_computes_s0_as_the_prompts_own_pass_does(family, attn, case):
    batch, columns, offset, calls = CASES[case]
    fam = tiny_fam(family, attn, fam_update="gated")
    ids = random_ids(batch, columns, seed=4)
    # mixture of experts: the prompt's rows are not routed rows (as in its own pass), where the FAM rows' update counts
    routed = {"output_router_logits": True} if family == "mixtral" and columns >= 4 else {}
    counter = LayerCalls(fam)
    results = {}
    with torch.no_grad():
        # the FAM prompt's own pass, its states handed in
        initial = fam.initial_fam_state(batch, None if offset is None else torch.as_tensor(offset).expand(batch))
        start = counter.count
        expected = fam(ids, fam_position_offset=offset, fam_state=initial, use_cache=True, **routed)
        assert counter.count - start == calls - (case == "rows sharing S0")
        for order in ("block", "layer"):
            fam.config.loop_order = order
            start = counter.count
            results[order] = fam(ids, fam_position_offset=offset, use_cache=True, **routed)
            assert counter.count - start == calls, order
    block, layer = results["block"], results["layer"]
    assert torch.equal(block.logits, layer.logits)  # the two loop orders make the same calls
    assert_logits_close(block.logits, expected.logits)
    for got, want in zip(block.past_key_values.fam_state(), expected.past_key_values.fam_state(), strict=True):
        assert_logits_close(got, want, what="FAM states")
    if routed:
        for got, want in zip(block.router_logits, expected.router_logits, strict=True):
            assert got.shape == want.shape
            assert_logits_close(got, want, what="router logits")
        assert_logits_close(block.aux_loss, expected.aux_loss, what="load-balancing loss")
    if columns < 4:  # no block completed: the cache holds S0
        for got, want in zip(block.past_key_values.fam_state(), initial, strict=True):
            assert_logits_close(got, want, what="S0")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_gradients_through_s0_computed_in_the_first_block_are_the_prompts_own_pass_ones(checkpointing):
    """One row computes S0 in its first block's calls; the same row twice (rows sharing S0, the block completing) in the
    prompt's own pass: the same mean loss, so the same gradients, the FAM prompt's included."""
    fam = tiny_fam(fam_update="gated").train()
    if checkpointing:
        fam.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = random_ids(1, 10, seed=6)
    counter = LayerCalls(fam)
    grads = []
    for batch, calls in ((ids, 3), (ids.expand(2, -1), 4)):
        fam.zero_grad()
        start = counter.count
        fam(batch, labels=batch).loss.backward()
        assert checkpointing or counter.count - start == calls
        grads.append({name: p.grad.clone() for name, p in fam.named_parameters() if p.grad is not None})
    joined, own_pass = grads
    assert joined.keys() == own_pass.keys() and "fam_prompt.weight" in joined
    for name, grad in own_pass.items():
        assert_logits_close(joined[name], grad, what=f"gradient of {name}")

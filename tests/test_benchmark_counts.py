"""The multiply-add floor the forward-cost benchmark reports (`benchmarks/forward_cost.py`: FAM / BSWA can get no
cheaper than its count) is what the kernels are handed: torch's own count of the work in every decoder layer, taken
while the model runs one block segment per call, equals the benchmark's formula segment by segment."""

import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_base
from torch.utils.flop_counter import FlopCounterMode

import hf_fam

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from forward_cost import segment_multiply_adds


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """torch's count for its CPU flash-attention kernel, which its table leaves out: 2 flops per multiply-add of q.k
    and of the weighted sum of v, over every query-key pair the call gets (masked or not)."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = value_shape[2], value_shape[3]
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)


def _layer_multiply_adds_per_segment(model, ids, block_size: int) -> list[int]:
    counts, cache = [], None
    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with torch.no_grad():
        for start in range(0, ids.shape[1], block_size):
            with FlopCounterMode(display=False, custom_mapping=custom) as counter:
                output = model(ids[:, start : start + block_size], cache=cache, use_cache=True, logits_to_keep=1)
            cache = output.past_key_values
            per_module = counter.get_flop_counts()
            layers = [name for name in per_module if re.fullmatch(r".*\.layers\.\d+", name)]
            assert len(layers) == model.config.num_hidden_layers, sorted(per_module)
            counts.append(sum(sum(per_module[name].values()) for name in layers) // 2)
    return counts


@pytest.mark.parametrize("fam_length", [2, 0], ids=["fam", "bswa"])
@pytest.mark.parametrize("memory_segments", [2, 0])
def test_multiply_add_floor_counts_what_the_layers_compute(fam_length, memory_segments):
    settings = {"block_size": 8, "memory_segments": memory_segments, "fam_length": fam_length}
    base = tiny_base("llama", attn_implementation="sdpa")
    model = hf_fam.convert_to_fam(base, **settings, calibration_steps=0).eval()
    ids = random_ids(1, 44)  # five full blocks (the memory fills, then slides) and a partial one
    counted = _layer_multiply_adds_per_segment(model, ids, settings["block_size"])
    assert counted == segment_multiply_adds(base, ids.shape[1], **settings)
    with torch.no_grad(), model.reuse_initial_state():  # --reuse-initial-state: S0 computed before the timed streams
        model(ids[:, :1])
        reused = _layer_multiply_adds_per_segment(model, ids, settings["block_size"])
    assert reused == segment_multiply_adds(base, ids.shape[1], **settings, initial_state_pass=False)
    assert (reused[0] < counted[0]) == (fam_length > 0) and reused[1:] == counted[1:]


def test_torch_flop_counter_runs_on_a_fam_model_with_and_without_grad():
    """FlopCounterMode (torch's module tracker) runs through a FAM model's forward, also under no_grad, where a view
    of the FAM prompt taken without grad mode used to stop it, and counts the same work in both modes."""
    base = tiny_base("llama", attn_implementation="sdpa")
    model = hf_fam.convert_to_fam(base, block_size=8, memory_segments=2, fam_length=2, calibration_steps=0).eval()
    assert all(parameter.requires_grad for parameter in model.parameters())
    ids = random_ids(1, 20)
    totals = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
            model(ids)
        totals.append(counter.get_total_flops())
    assert totals[0] == totals[1] > 0

"""Batched prefill with uneven left padding vs the same rows unpadded (issue 14, defect 4), on a small random model.

    python benchmarks/padded_prefill.py
    python benchmarks/padded_prefill.py --rounds 15

For each case, the padded batch (row r left-padded by pads[r]) and the same ids with no padding are timed in turn,
--rounds times; each round's ratio is padded / unpadded (best of 3 passes each), and the median ratio is reported,
with the number of block segments each input runs in (calls of the first decoder layer, the FAM prompt's own pass
excluded). Target: <= 1.10. A small random Llama (no checkpoint needed): the ratio is about the segment layout, not
the weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_fam


# (batch, block_size, fam_length, length, pads): the example, and a batch of 16 with B/F as in the paper / 16
CASES = [(4, 8, 2, 64, [0, 2, 4, 6]), (16, 64, 4, 512, list(range(0, 64, 4)))]


def model(block_size: int, fam_length: int):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096,
    )
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return hf_fam.convert_to_fam(base, block_size=block_size, memory_segments=1, fam_length=fam_length).eval()


def best_time(fam, ids, mask, passes=3) -> float:
    times = []
    with torch.no_grad():
        for _ in range(passes):
            start = time.perf_counter()
            fam(ids, attention_mask=mask)
            times.append(time.perf_counter() - start)
    return min(times)


def segments(fam, ids, mask) -> int:
    calls = []
    handle = fam.model.layers[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    with torch.no_grad():
        fam(ids, attention_mask=mask)
    handle.remove()
    return len(calls) - (1 if fam.config.fam_length else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    for batch, block_size, fam_length, length, pads in CASES:
        fam = model(block_size, fam_length)
        ids = torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(1))
        padded = torch.ones_like(ids)
        for row, pad in enumerate(pads):
            padded[row, :pad] = 0
        unpadded = torch.ones_like(ids)
        best_time(fam, ids, padded, 1)  # warm-up
        ratios = [best_time(fam, ids, padded) / best_time(fam, ids, unpadded) for _ in range(args.rounds)]
        print(
            f"batch {batch}, B={block_size}, F={fam_length}, {length} columns, pads {pads[0]}..{pads[-1]}: "
            f"segments padded {segments(fam, ids, padded)} / unpadded {segments(fam, ids, unpadded)}; "
            f"time padded / unpadded median {statistics.median(ratios):.3f} "
            f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {args.rounds} rounds)"
        )


if __name__ == "__main__":
    main()

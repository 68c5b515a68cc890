"""Peak resident memory while streaming long inputs through SmolLM2-135M: FAM (B=1024, M=3, F=64) vs the base model.

    python benchmarks/stream_memory.py                       # FAM at 8k/32k/64k, base at 8k/32k
    python benchmarks/stream_memory.py --base-lengths 8192 32768 65536

The input is fed in chunks of --chunk tokens and scored with next-token log-likelihoods, as a long-text perplexity
evaluation does: FAM through `hf_fam.stream_log_likelihood` (a FamCache of constant size), the base model with its
default cache (a DynamicCache that keeps every key and value). Each case runs in a fresh process; memory is the
peak resident memory added while streaming (sampled every 5 ms), over a baseline taken after a 16-token warm-up
call (which pages in the weights), plus the bytes held by the cache at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import RESULTS, PeakMemory, load_model, machine, run_child, write_csv


LOGITS_SLICE = 256  # as hf_fam.stream_log_likelihood


def cache_bytes(cache) -> int:
    from hf_fam import FamCache

    if isinstance(cache, FamCache):
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.tensors().values())
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.keys is not None)


def child(mode: str, length: int, chunk: int) -> dict:
    import torch
    from transformers import DynamicCache

    import hf_fam

    model = load_model(mode)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (length,), generator=generator)
    chunks = [ids[i : i + chunk] for i in range(0, length, chunk)]
    total_log_likelihood = 0.0
    with torch.no_grad():  # warm-up: page in the memory-mapped weights so that they do not count as streaming memory
        model(ids[None, :16])
    with torch.no_grad(), PeakMemory() as memory:
        start = time.perf_counter()
        if mode == "fam":
            cache = model.new_cache()
            for scored in hf_fam.stream_log_likelihood(model, chunks, cache=cache):
                total_log_likelihood += scored.sum().item()
        else:  # the same computation as stream_log_likelihood, with the base model's default cache
            cache = DynamicCache(config=model.config)
            last = None
            for piece in chunks:
                hidden = model.model(piece[None], past_key_values=cache, use_cache=True).last_hidden_state[0]
                for first in range(0, len(piece) - 1, LOGITS_SLICE):  # the head a slice at a time, as the helper does
                    end = min(first + LOGITS_SLICE, len(piece) - 1)
                    logits = model.lm_head(hidden[first:end]).float()
                    total_log_likelihood += (logits.gather(-1, piece[first + 1 : end + 1, None])[:, 0] - logits.logsumexp(-1)).sum().item()
                if last is not None:
                    total_log_likelihood += (last[piece[0]] - last.logsumexp(-1)).item()
                last = model.lm_head(hidden[-1]).float()
                del hidden, logits
        seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "tokens": length,
        "peak_added_mib": memory.added / 2**20,
        "cache_mib": cache_bytes(cache) / 2**20,
        "seconds": seconds,
        "mean_nll": -total_log_likelihood / (length - 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536], help="FAM stream lengths")
    parser.add_argument("--base-lengths", type=int, nargs="*", default=[8192, 32768], help="base-model stream lengths")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "LENGTH", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, length, chunk = args.child
        print(json.dumps(child(mode, int(length), int(chunk))))
        return

    rows = []
    for mode, lengths in (("fam", args.lengths), ("base", args.base_lengths)):
        for length in lengths:
            result = run_child(Path(__file__), mode, str(length), str(args.chunk), timeout=4 * 3600)
            rows.append(result)
            print(
                f"{mode:4s} {length:6d} tokens: peak +{result['peak_added_mib']:8.1f} MiB, cache {result['cache_mib']:8.1f} MiB, "
                f"{result['seconds']:7.1f} s",
                flush=True,
            )
    print(f"\nMachine: {machine()}")
    ratios = {}
    for mode in ("fam", "base"):
        by_length = {r["tokens"]: r for r in rows if r["mode"] == mode}
        if len(by_length) >= 2:
            shortest, longest = min(by_length), max(by_length)
            ratio = by_length[longest]["peak_added_mib"] / by_length[shortest]["peak_added_mib"]
            ratios[f"{mode}_peak_{longest}_over_{shortest}"] = ratio
            print(f"{mode}: peak at {longest} / peak at {shortest} = {ratio:.3f}")
    write_csv(RESULTS / "stream_memory.csv", [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    (RESULTS / "stream_memory.json").write_text(json.dumps({"machine": machine(), "chunk": args.chunk, "runs": rows, "ratios": ratios}, indent=2))
    from plot_results import plot_stream_memory

    plot_stream_memory()
    print(f"Wrote {RESULTS / 'stream_memory.csv'}, stream_memory.json and stream_memory.png")


if __name__ == "__main__":
    main()

"""Peak resident memory while streaming long inputs through SmolLM2-135M: FAM (B=1024, M=3, F=64) vs the base model.

    python benchmarks/stream_memory.py                       # FAM at 8k/32k/64k, base at 8k/32k
    python benchmarks/stream_memory.py --base-lengths 8192 32768 65536

The input is fed in chunks of --chunk tokens and scored with next-token log-likelihoods, as a long-text perplexity
evaluation does: FAM through `hf_fam.stream_log_likelihood` (a FamCache of constant size), the base model with its
default cache (a DynamicCache that keeps every key and value). Each model streams once, in a fresh process, to its
longest length; after every chunk the child records the peak resident memory added since the stream began, over a
baseline taken after a 16-token warm-up call (which pages in the weights), the resident memory added at that moment
and the bytes held by the cache. The peak at 8k tokens is the peak over the stream's first 8k tokens, and so on, so
the ratio of two lengths comes from one process: separate processes differ by tens of MiB in where their allocator
happens to settle, which would swamp a 5% bound. The peak is the kernel's high-water mark (VmHWM, reset when the
stream begins), so no transient is missed; where the kernel does not allow the reset, resident memory is sampled every
5 ms instead (the CSV's peak_method says which). stream_memory.csv has the rows at the requested lengths,
stream_memory_curve.csv one row per chunk.

Every child process (base and FAM alike) runs with glibc's allocator pinned (`common.PINNED_ALLOCATOR`:
MALLOC_MMAP_THRESHOLD_=1048576, MALLOC_TRIM_THRESHOLD_=0). Left dynamic, whether a transient buffer (the attention
scores of a block, ~160 MiB) stays resident after use depends on the order of earlier frees: the same 12-chunk stream
gave per-chunk peaks of 434-615 MiB in one run and 309-504 in another; pinned, 293-314 MiB. `--no-pin-allocator`
leaves the thresholds dynamic.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import PINNED_ALLOCATOR, RESULTS, PeakMemory, load_model, machine, rss_bytes, run_child, write_csv, write_json


LOGITS_SLICE = 256  # as hf_fam.stream_log_likelihood


def cache_bytes(cache) -> int:
    from hf_fam import FamCache

    if isinstance(cache, FamCache):
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.tensors().values())
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.keys is not None)


def _scored_sums(mode: str, model, chunks):
    """Yield, per chunk, the sum of the log-likelihoods it adds, and the cache, as a perplexity evaluation does."""
    from transformers import DynamicCache

    import hf_fam
    from hf_fam.modeling_fam import cache_argument_name

    if mode != "base":
        cache = model.new_cache()
        for scored in hf_fam.stream_log_likelihood(model, chunks, cache=cache):
            yield scored.sum().item(), cache
        return
    # the same computation as stream_log_likelihood, with the base model's default cache
    cache = DynamicCache(config=model.config)
    last = None
    for piece in chunks:
        total = 0.0
        hidden = model.model(piece[None], **{cache_argument_name(model.model): cache}, use_cache=True).last_hidden_state[0]
        for first in range(0, len(piece) - 1, LOGITS_SLICE):  # the head a slice at a time, as the helper does
            end = min(first + LOGITS_SLICE, len(piece) - 1)
            logits = model.lm_head(hidden[first:end]).float()
            total += (logits.gather(-1, piece[first + 1 : end + 1, None])[:, 0] - logits.logsumexp(-1)).sum().item()
        if last is not None:
            total += (last[piece[0]] - last.logsumexp(-1)).item()
        last = model.lm_head(hidden[-1]).float()
        del hidden, logits
        yield total, cache


def child(mode: str, length: int, chunk: int) -> list[dict]:
    """Stream `length` tokens in one process; one row per chunk, each with the peak since the stream started."""
    import torch

    model = load_model(mode)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (length,), generator=generator)
    chunks = [ids[i : i + chunk] for i in range(0, length, chunk)]
    rows, total_log_likelihood, tokens = [], 0.0, 0
    with torch.no_grad():  # warm-up: page in the memory-mapped weights so that they do not count as streaming memory
        model(ids[None, :16])
    with torch.no_grad(), PeakMemory() as memory:
        start = time.perf_counter()
        for piece, (log_likelihood, cache) in zip(chunks, _scored_sums(mode, model, chunks)):
            total_log_likelihood += log_likelihood
            tokens += len(piece)
            rows.append({
                "mode": mode,
                "tokens": tokens,
                "peak_added_mib": (memory.peak_so_far() - memory.baseline) / 2**20,
                "resident_added_mib": (rss_bytes() - memory.baseline) / 2**20,
                "cache_mib": cache_bytes(cache) / 2**20,
                "seconds": time.perf_counter() - start,
                "mean_nll": -total_log_likelihood / (tokens - 1),
                "peak_method": memory.method,
            })
    return rows


def _rounded(row: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536], help="FAM stream lengths")
    parser.add_argument("--base-lengths", type=int, nargs="*", default=[8192, 32768], help="base-model stream lengths")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--no-pin-allocator", action="store_true", help="leave glibc's malloc thresholds dynamic")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "LENGTH", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, length, chunk = args.child
        print(json.dumps(child(mode, int(length), int(chunk))))
        return
    if any(n <= 0 or n % args.chunk for n in args.lengths + args.base_lengths):
        parser.error(f"every length must be a positive multiple of --chunk ({args.chunk})")

    env = {} if args.no_pin_allocator else PINNED_ALLOCATOR
    curve, rows, ratios = [], [], {}
    for mode, lengths in (("fam", args.lengths), ("base", args.base_lengths)):
        if not lengths:
            continue
        # one stream to the longest length; the shorter lengths are read off it on the way
        streamed = run_child(Path(__file__), mode, str(max(lengths)), str(args.chunk), timeout=4 * 3600, env=env)
        curve += streamed
        by_length = {r["tokens"]: r for r in streamed if r["tokens"] in lengths}
        for length in sorted(by_length):
            r = by_length[length]
            rows.append(r)
            print(
                f"{mode:4s} after {length:6d} tokens: peak +{r['peak_added_mib']:8.1f} MiB, now +{r['resident_added_mib']:8.1f} MiB, "
                f"cache {r['cache_mib']:8.1f} MiB, {r['seconds']:7.1f} s",
                flush=True,
            )
        if len(by_length) >= 2:
            shortest, longest = min(by_length), max(by_length)
            ratios[f"{mode}_peak_{longest}_over_{shortest}"] = by_length[longest]["peak_added_mib"] / by_length[shortest]["peak_added_mib"]
    print(f"\nMachine: {machine()} (peak: {curve[0]['peak_method']})")
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.3f}")
    write_csv(RESULTS / "stream_memory.csv", [_rounded(r) for r in rows])
    write_csv(RESULTS / "stream_memory_curve.csv", [_rounded(r) for r in curve])
    write_json(RESULTS / "stream_memory.json", {"machine": machine(), "chunk": args.chunk, "allocator_env": env, "runs": rows, "ratios": ratios})
    from plot_results import plot_stream_memory

    plot_stream_memory()
    print(f"Wrote {RESULTS / 'stream_memory.csv'}, stream_memory_curve.csv, stream_memory.json and stream_memory.png")


if __name__ == "__main__":
    main()

"""Generated tokens per second of SmolLM2-135M at contexts of 2k, 8k and 32k tokens: base vs BSWA vs FAM.

    python benchmarks/decode_speed.py
    python benchmarks/decode_speed.py --contexts 2048 8192 --rounds 4

One process holds the three models (BSWA and FAM are conversions sharing the base model's weights) and one prefilled
stream per (model, context): the base model with its default DynamicCache (one forward pass over the context), BSWA
and FAM with their FamCache (prefilled block by block). Then, --rounds times, each stream in turn takes --steps
greedy steps, one token per forward call as `generate()` does, and is timed; the streams take their turns in a new
random order every round, so drift of the machine's speed hits every case alike. A stream's speed is its median
round: decoding a 135M model reads about 0.6 GB per token, so its speed follows the memory bandwidth other tenants of
a shared machine leave, and the median of many short rounds is steadier than the best one (recorded too). --warmup untimed steps
come first (the first step after a prefill that ends on a block boundary also computes the FAM keys of the new
state). "BSWA" is the hf_fam code path with fam_length=0.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from common import PAPER_SETTINGS, RESULTS, load_model, machine, run_child, write_csv, write_json


MODES = ("base", "bswa", "fam")


def child(contexts: list[int], rounds: int, steps: int, warmup: int) -> list[dict]:
    import torch
    from transformers import DynamicCache

    import hf_fam
    from hf_fam.modeling_fam import cache_argument_name

    base = load_model("base")
    models = {
        "base": base,
        "bswa": hf_fam.convert_to_fam(base, **dict(PAPER_SETTINGS, fam_length=0)).eval(),
        "fam": hf_fam.convert_to_fam(base, **PAPER_SETTINGS, calibration_steps=0).eval(),  # speed only
    }
    # `cache` from transformers 5.24 on, `past_key_values` before
    cache_name = {mode: cache_argument_name(model) for mode, model in models.items()}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (1, max(contexts)), generator=generator)
    streams, prefill = {}, {}
    with torch.no_grad():
        for mode, model in models.items():
            for context in contexts:
                start = time.perf_counter()
                if mode == "base":
                    cache = DynamicCache(config=model.config)
                    logits = model(ids[:, :context], **{cache_name[mode]: cache}, use_cache=True, logits_to_keep=1).logits
                else:
                    cache = model.new_cache()
                    block = PAPER_SETTINGS["block_size"]
                    for i in range(0, context, block):
                        chunk = ids[:, i : min(i + block, context)]
                        logits = model(chunk, **{cache_name[mode]: cache}, use_cache=True, logits_to_keep=1).logits
                prefill[(mode, context)] = time.perf_counter() - start
                token = logits[:, -1:].argmax(-1)
                for _ in range(warmup):
                    token = model(token, **{cache_name[mode]: cache}, use_cache=True).logits[:, -1:].argmax(-1)
                streams[(mode, context)] = [cache, token]
        rates = {key: [] for key in streams}
        order = list(streams)
        for round_index in range(rounds):
            random.Random(round_index).shuffle(order)
            for mode, context in order:
                stream = streams[(mode, context)]
                model, (cache, token) = models[mode], stream
                start = time.perf_counter()
                for _ in range(steps):
                    token = model(token, **{cache_name[mode]: cache}, use_cache=True).logits[:, -1:].argmax(-1)
                rates[(mode, context)].append(steps / (time.perf_counter() - start))
                stream[1] = token
    return [
        {
            "mode": mode,
            "context": context,
            "tokens_per_second": statistics.median(rates[(mode, context)]),
            "best_tokens_per_second": max(rates[(mode, context)]),
            "rounds": [round(r, 3) for r in rates[(mode, context)]],
            "prefill_seconds": prefill[(mode, context)],
        }
        for mode, context in streams
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.contexts, args.rounds, args.steps, args.warmup)))
        return

    rows = run_child(
        Path(__file__), "--contexts", *map(str, args.contexts), "--rounds", str(args.rounds), "--steps", str(args.steps),
        "--warmup", str(args.warmup), timeout=6 * 3600,
    )
    for r in rows:
        print(
            f"{r['mode']:5s} context {r['context']:6d}: {r['tokens_per_second']:7.2f} tokens/s median, "
            f"{r['best_tokens_per_second']:7.2f} best (rounds: {r['rounds']}; prefill {r['prefill_seconds']:.1f} s)"
        )
    print(f"\nMachine: {machine()}")
    speed = {(r["mode"], r["context"]): r["tokens_per_second"] for r in rows}
    ratios = {}
    for context in args.contexts:
        ratios[f"fam_over_bswa_at_{context}"] = speed[("fam", context)] / speed[("bswa", context)]
        ratios[f"fam_over_base_at_{context}"] = speed[("fam", context)] / speed[("base", context)]
        print(f"context {context:6d}: FAM/BSWA speed {ratios[f'fam_over_bswa_at_{context}']:.3f}, FAM/base speed {ratios[f'fam_over_base_at_{context}']:.3f}")
    shortest = min(args.contexts)
    for context in sorted(args.contexts)[1:]:
        ratios[f"fam_{context}_over_fam_{shortest}"] = speed[("fam", context)] / speed[("fam", shortest)]
        print(f"FAM speed at {context} / at {shortest}: {ratios[f'fam_{context}_over_fam_{shortest}']:.3f}")
    write_csv(RESULTS / "decode_speed.csv", [{k: v for k, v in r.items() if k != "rounds"} for r in rows])
    write_json(RESULTS / "decode_speed.json", {"machine": machine(), "settings": PAPER_SETTINGS, "runs": rows, "ratios": ratios})
    from plot_results import plot_decode_speed

    plot_decode_speed()
    print(f"Wrote {RESULTS / 'decode_speed.csv'}, decode_speed.json and decode_speed.png")


if __name__ == "__main__":
    main()

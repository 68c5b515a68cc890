"""Generated tokens per second of SmolLM2-135M at contexts of 2k, 8k and 32k tokens: base vs BSWA vs FAM.

    python benchmarks/decode_speed.py
    python benchmarks/decode_speed.py --contexts 2048 8192 --new-tokens 64

Each case runs in a fresh process: the context is prefilled (base: one forward pass with its default DynamicCache;
BSWA and FAM: in chunks of one block, through their FamCache), then --warmup greedy steps are taken and the next
--new-tokens steps are timed, one token per forward call, as `generate()` does. Reported: tokens per second of the
timed steps. "BSWA" is the hf_fam code path with fam_length=0.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import PAPER_SETTINGS, RESULTS, load_model, machine, run_child, write_csv


MODES = ("base", "bswa", "fam")


def child(mode: str, context: int, new_tokens: int, warmup: int) -> dict:
    import torch
    from transformers import DynamicCache

    model = load_model(mode)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=generator)
    with torch.no_grad():
        start = time.perf_counter()
        if mode == "base":
            cache = DynamicCache(config=model.config)
            logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        else:
            cache = model.new_cache()
            block = PAPER_SETTINGS["block_size"]
            for i in range(0, context, block):
                logits = model(ids[:, i : i + block], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        prefill = time.perf_counter() - start
        token = logits[:, -1:].argmax(-1)
        for _ in range(warmup):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        seconds = time.perf_counter() - start
    return {"mode": mode, "context": context, "tokens_per_second": new_tokens / seconds, "prefill_seconds": prefill}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--child", nargs=4, metavar=("MODE", "CONTEXT", "NEW", "WARMUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, context, new, warmup = args.child
        print(json.dumps(child(mode, int(context), int(new), int(warmup))))
        return

    rows = []
    for context in args.contexts:
        for mode in MODES:
            result = run_child(Path(__file__), mode, str(context), str(args.new_tokens), str(args.warmup), timeout=4 * 3600)
            rows.append(result)
            print(f"{mode:5s} context {context:6d}: {result['tokens_per_second']:7.2f} tokens/s (prefill {result['prefill_seconds']:.1f} s)", flush=True)
    print(f"\nMachine: {machine()}")
    speed = {(r["mode"], r["context"]): r["tokens_per_second"] for r in rows}
    ratios = {}
    for context in args.contexts:
        ratios[f"fam_over_bswa_at_{context}"] = speed[("fam", context)] / speed[("bswa", context)]
        ratios[f"fam_over_base_at_{context}"] = speed[("fam", context)] / speed[("base", context)]
        print(f"context {context:6d}: FAM/BSWA speed {ratios[f'fam_over_bswa_at_{context}']:.3f}, FAM/base speed {ratios[f'fam_over_base_at_{context}']:.3f}")
    shortest, longest = min(args.contexts), max(args.contexts)
    ratios[f"fam_{longest}_over_fam_{shortest}"] = speed[("fam", longest)] / speed[("fam", shortest)]
    print(f"FAM speed at {longest} / at {shortest}: {ratios[f'fam_{longest}_over_fam_{shortest}']:.3f}")
    write_csv(RESULTS / "decode_speed.csv", [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    (RESULTS / "decode_speed.json").write_text(json.dumps({"machine": machine(), "runs": rows, "ratios": ratios}, indent=2))
    from plot_results import plot_decode_speed

    plot_decode_speed()
    print(f"Wrote {RESULTS / 'decode_speed.csv'}, decode_speed.json and decode_speed.png")


if __name__ == "__main__":
    main()

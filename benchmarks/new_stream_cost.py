"""A new stream's first call on SmolLM2-135M (B=1024, M=3, F=64): what computing the initial FAM state S0 costs.

    python benchmarks/new_stream_cost.py                      # prompts of 256 and 1,024 tokens, 30 rounds
    python benchmarks/new_stream_cost.py --lengths 64 256 --rounds 15

Every new stream starts from S0, the FAM prompt's F rows through the decoder. hf_fam computes it in the first block's
layer calls (`FamForCausalLM._plan_segment`): for a prompt shorter than a block the FAM rows the call carries anyway
are the prompt's, for a full block F rows more. Three ways to start a stream, timed on the same prompt:

- "bswa": the same code path with fam_length=0 (no S0);
- "fam": `model(ids)`, S0 in the first block's calls (the default);
- "fam_own_pass": `model(ids, fam_state=model.initial_fam_state(1))`, S0 in the FAM prompt's own pass first (what
  every new stream did before, and what a batch of rows sharing S0 whose first block completes still does).

One process holds the models (conversions sharing the base model's weights) and times one call of each per round, in an
order that rotates from round to round, after a warm-up; reported per length: the median seconds of each, the medians
of the per-round ratios to BSWA, the median per-round saving of "fam" against "fam_own_pass", and the multiply-add
floor of FAM / BSWA (`forward_cost.segment_multiply_adds`). Logits are kept for the last position only.
Writes new_stream_cost.{json,csv,png}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import PAPER_SETTINGS, RESULTS, load_model, machine, run_child, write_csv, write_json


MODES = ("bswa", "fam", "fam_own_pass")


def child(lengths: list[int], rounds: int) -> dict:
    import torch

    import hf_fam
    from forward_cost import _inputs, segment_multiply_adds

    base = load_model("base")
    bswa = hf_fam.convert_to_fam(base, **dict(PAPER_SETTINGS, fam_length=0)).eval()
    fam = hf_fam.convert_to_fam(base, **PAPER_SETTINGS, calibration_steps=0).eval()  # speed only
    results = {}
    with torch.no_grad():
        for length in lengths:
            ids = _inputs(base.config.vocab_size, length)
            calls = {
                "bswa": lambda: bswa(ids, logits_to_keep=1),
                "fam": lambda: fam(ids, logits_to_keep=1),
                "fam_own_pass": lambda: fam(ids, fam_state=fam.initial_fam_state(1), logits_to_keep=1),
            }
            for call in calls.values():  # warm-up
                call()
            seconds = {mode: [] for mode in MODES}
            for round_index in range(rounds):
                shift = round_index % len(MODES)
                for mode in MODES[shift:] + MODES[:shift]:
                    start = time.perf_counter()
                    calls[mode]()
                    seconds[mode].append(time.perf_counter() - start)
            floor = segment_multiply_adds(base, length, **PAPER_SETTINGS)
            bswa_count = segment_multiply_adds(base, length, **dict(PAPER_SETTINGS, fam_length=0))
            results[length] = {"seconds": seconds, "fam_over_bswa_multiply_adds": sum(floor) / sum(bswa_count)}
    return results


def summary(length: int, seconds: dict, floor: float) -> dict:
    bswa = seconds["bswa"]

    def median_ratio(mode):
        return statistics.median(t / b for t, b in zip(seconds[mode], bswa))

    return {
        "tokens": length,
        "rounds": len(bswa),
        "median_seconds": {mode: statistics.median(seconds[mode]) for mode in MODES},
        "fam_over_bswa_median_of_rounds": median_ratio("fam"),
        "fam_own_pass_over_bswa_median_of_rounds": median_ratio("fam_own_pass"),
        "own_pass_minus_fam_median_seconds": statistics.median(
            o - f for o, f in zip(seconds["fam_own_pass"], seconds["fam"])
        ),
        "fam_over_bswa_multiply_adds": floor,
        "seconds": seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="prompt lengths (tokens)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(length < 1 for length in args.lengths) or args.rounds < 1:
        parser.error("--lengths and --rounds must be positive")
    if args.child is not None:
        import json

        print(json.dumps(child(args.lengths, args.rounds)))
        return
    timed = run_child(
        Path(__file__), "--lengths", *map(str, args.lengths), "--rounds", str(args.rounds), timeout=6 * 3600
    )
    summaries, rows = [], []
    for length in args.lengths:
        result = timed[str(length)]
        item = summary(length, result["seconds"], result["fam_over_bswa_multiply_adds"])
        summaries.append(item)
        medians = item["median_seconds"]
        print(
            f"{length} tokens, {args.rounds} rounds: median s BSWA {medians['bswa']:.3f}, FAM {medians['fam']:.3f}, "
            f"FAM with S0 in its own pass {medians['fam_own_pass']:.3f}; over BSWA (median of rounds) "
            f"{item['fam_over_bswa_median_of_rounds']:.3f} against {item['fam_own_pass_over_bswa_median_of_rounds']:.3f} "
            f"(multiply-add floor {item['fam_over_bswa_multiply_adds']:.3f}); saved per stream "
            f"{item['own_pass_minus_fam_median_seconds']:.3f} s (median of rounds)",
            flush=True,
        )
        for round_index in range(args.rounds):
            rows.append({"tokens": length, "round": round_index, **{f"{m}_s": round(result["seconds"][m][round_index], 4) for m in MODES}})
    print(f"Machine: {machine()}")
    write_csv(RESULTS / "new_stream_cost.csv", rows)
    write_json(RESULTS / "new_stream_cost.json", {"machine": machine(), "settings": PAPER_SETTINGS, "lengths": summaries})
    from plot_results import plot_new_stream_cost

    plot_new_stream_cost()
    print(f"Wrote {RESULTS}/new_stream_cost.csv, new_stream_cost.json and new_stream_cost.png")


if __name__ == "__main__":
    main()

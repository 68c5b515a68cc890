"""One forward pass of SmolLM2-135M over 8k and 16k tokens: full attention (base) vs BSWA vs FAM (B=1024, M=3, F=64).

    python benchmarks/forward_cost.py            # all cases, then the table, ratios, CSV and plot
    python benchmarks/forward_cost.py --lengths 8192

Every case runs in a fresh process, so its peak memory is its own; the cases are interleaved over --rounds rounds
(base, BSWA, FAM, base, BSWA, FAM, ...) so that drift of the machine's speed hits every mode alike. Time is the
median over rounds of one pass after a warm-up; memory is the largest peak resident memory added by the pass
(sampled every 5 ms). Logits are kept for the last
position only (logits_to_keep=1) so the 49k-entry vocabulary head does not dominate the comparison. "BSWA" is the
same hf_fam code path with fam_length=0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import RESULTS, PeakMemory, load_model, machine, run_child, write_csv


MODES = ("base", "bswa", "fam")


def child(mode: str, length: int) -> dict:
    import torch

    model = load_model(mode)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator)
    with torch.no_grad():
        model(ids[:, :256], logits_to_keep=1)  # warm-up
        with PeakMemory() as memory:
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            seconds = time.perf_counter() - start
    return {"mode": mode, "tokens": length, "seconds": seconds, "peak_added_mib": memory.added / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, length = args.child
        print(json.dumps(child(mode, int(length))))
        return

    rows = []
    for length in args.lengths:
        runs = {mode: [] for mode in MODES}
        for round_ in range(args.rounds):
            for mode in MODES:
                result = run_child(Path(__file__), mode, str(length))
                runs[mode].append(result)
                print(f"round {round_} {mode:5s} {length:6d} tokens: {result['seconds']:8.2f} s, peak +{result['peak_added_mib']:8.1f} MiB", flush=True)
        for mode in MODES:
            seconds = sorted(r["seconds"] for r in runs[mode])
            rows.append({
                "mode": mode,
                "tokens": length,
                "seconds": statistics.median(seconds),
                "seconds_min": seconds[0],
                "seconds_max": seconds[-1],
                "peak_added_mib": max(r["peak_added_mib"] for r in runs[mode]),
            })

    print(f"\nMachine: {machine()}")
    print(f"{'tokens':>7} {'FAM/BSWA time':>14} {'FAM/base time':>14} {'FAM/BSWA mem':>13} {'FAM/base mem':>13}")
    summary = []
    for length in args.lengths:
        by_mode = {r["mode"]: r for r in rows if r["tokens"] == length}
        fam, bswa, base = by_mode["fam"], by_mode["bswa"], by_mode["base"]
        ratios = {
            "tokens": length,
            "fam_over_bswa_time": fam["seconds"] / bswa["seconds"],
            "fam_over_base_time": fam["seconds"] / base["seconds"],
            "fam_over_bswa_memory": fam["peak_added_mib"] / bswa["peak_added_mib"],
            "fam_over_base_memory": fam["peak_added_mib"] / base["peak_added_mib"],
        }
        summary.append(ratios)
        print(
            f"{length:7d} {ratios['fam_over_bswa_time']:14.3f} {ratios['fam_over_base_time']:14.3f} "
            f"{ratios['fam_over_bswa_memory']:13.3f} {ratios['fam_over_base_memory']:13.3f}"
        )
    write_csv(RESULTS / "forward_cost.csv", [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    (RESULTS / "forward_cost.json").write_text(json.dumps({"machine": machine(), "runs": rows, "ratios": summary}, indent=2))
    from plot_results import plot_forward_cost

    plot_forward_cost()
    print(f"Wrote {RESULTS / 'forward_cost.csv'}, forward_cost.json and forward_cost.png")


if __name__ == "__main__":
    main()

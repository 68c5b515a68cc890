"""One forward pass of SmolLM2-135M over 8k and 16k tokens: full attention (base) vs BSWA vs FAM (B=1024, M=3, F=64).

    python benchmarks/forward_cost.py            # both lengths, then the table, ratios, CSV, JSON and plot
    python benchmarks/forward_cost.py --lengths 8192 --rounds 5   # the other lengths keep their earlier results

Time: one process per length holds the three models (BSWA and FAM are conversions sharing the base model's
weights) and times one pass of each in turn, --rounds times (base, BSWA, FAM, base, BSWA, FAM, ...), after a
warm-up; the reported time is the median, so drift of the machine's speed hits every mode alike. Memory: every mode
runs one more pass in a fresh process of its own, with glibc's allocator pinned (`common.PINNED_ALLOCATOR`), whose
peak resident memory above the loaded model is the kernel's high-water mark (`common.PeakMemory`). Logits are kept
for the last position only (logits_to_keep=1) so the 49k-entry vocabulary head does not dominate. "BSWA" is the
same hf_fam code path with fam_length=0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import PAPER_SETTINGS, PINNED_ALLOCATOR, RESULTS, PeakMemory, load_model, machine, run_child, write_csv


MODES = ("base", "bswa", "fam")


def _inputs(vocab_size: int, length: int):
    import torch

    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


def time_child(length: int, rounds: int) -> dict:
    import torch

    import hf_fam

    base = load_model("base")
    models = {
        "base": base,
        "bswa": hf_fam.convert_to_fam(base, **dict(PAPER_SETTINGS, fam_length=0)).eval(),
        "fam": hf_fam.convert_to_fam(base, **PAPER_SETTINGS, calibration_steps=0).eval(),  # speed only
    }
    ids = _inputs(base.config.vocab_size, length)
    seconds = {mode: [] for mode in MODES}
    with torch.no_grad():
        for model in models.values():
            model(ids[:, :256], logits_to_keep=1)  # warm-up
        for _ in range(rounds):
            for mode, model in models.items():
                start = time.perf_counter()
                model(ids, logits_to_keep=1)
                seconds[mode].append(time.perf_counter() - start)
    return seconds


def memory_child(mode: str, length: int) -> float:
    import torch

    model = load_model(mode)
    ids = _inputs(model.config.vocab_size, length)
    with torch.no_grad():
        model(ids[:, :256], logits_to_keep=1)
        with PeakMemory() as memory:
            model(ids, logits_to_keep=1)
    return memory.added / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, mode, length = args.child
        result = time_child(int(length), args.rounds) if kind == "time" else memory_child(mode, int(length))
        print(json.dumps(result))
        return

    rows, summary = [], []
    for length in args.lengths:
        seconds = run_child(Path(__file__), "time", "all", str(length), "--rounds", str(args.rounds), timeout=6 * 3600)
        by_mode = {}
        for mode in MODES:
            peak = run_child(Path(__file__), "memory", mode, str(length), timeout=3600, env=PINNED_ALLOCATOR)
            times = sorted(seconds[mode])
            by_mode[mode] = {
                "mode": mode,
                "tokens": length,
                "seconds": round(statistics.median(times), 3),
                "seconds_min": round(times[0], 3),
                "seconds_max": round(times[-1], 3),
                "peak_added_mib": round(peak, 1),
            }
            rows.append(by_mode[mode])
            print(f"{mode:5s} {length:6d} tokens: {statistics.median(times):8.2f} s (runs: {', '.join(f'{t:.2f}' for t in seconds[mode])}), peak +{peak:8.1f} MiB", flush=True)
        fam, bswa, base = by_mode["fam"], by_mode["bswa"], by_mode["base"]
        per_round = [f / b for f, b in zip(seconds["fam"], seconds["bswa"])]
        summary.append({
            "tokens": length,
            "fam_over_bswa_time": fam["seconds"] / bswa["seconds"],
            "fam_over_bswa_time_per_round": per_round,
            "fam_over_base_time": fam["seconds"] / base["seconds"],
            "fam_over_bswa_memory": fam["peak_added_mib"] / bswa["peak_added_mib"],
            "fam_over_base_memory": fam["peak_added_mib"] / base["peak_added_mib"],
        })

    print(f"\nMachine: {machine()}")
    print(f"{'tokens':>7} {'FAM/BSWA time':>14} {'FAM/base time':>14} {'FAM/BSWA mem':>13} {'FAM/base mem':>13}")
    for r in summary:
        print(
            f"{r['tokens']:7d} {r['fam_over_bswa_time']:14.3f} {r['fam_over_base_time']:14.3f} "
            f"{r['fam_over_bswa_memory']:13.3f} {r['fam_over_base_memory']:13.3f}   "
            f"(FAM/BSWA per round: {', '.join(f'{x:.3f}' for x in r['fam_over_bswa_time_per_round'])})"
        )
    # Lengths this run did not measure keep their earlier rows (the README quotes each length's latest run).
    results_json = RESULTS / "forward_cost.json"
    if results_json.exists():
        earlier = json.loads(results_json.read_text())
        rows += [row for row in earlier["runs"] if row["tokens"] not in args.lengths]
        summary += [ratio for ratio in earlier["ratios"] if ratio["tokens"] not in args.lengths]
        rows.sort(key=lambda row: row["tokens"])
        summary.sort(key=lambda ratio: ratio["tokens"])
    write_csv(RESULTS / "forward_cost.csv", rows)
    results_json.write_text(json.dumps({"machine": machine(), "settings": PAPER_SETTINGS, "runs": rows, "ratios": summary}, indent=2))
    from plot_results import plot_forward_cost

    plot_forward_cost()
    print(f"Wrote {RESULTS / 'forward_cost.csv'}, forward_cost.json and forward_cost.png")


if __name__ == "__main__":
    main()

"""Where a FAM forward pass spends the time that BSWA does not: torch's profiler over one pass of each, by operator.

    python benchmarks/forward_profile.py                 # 8k tokens, SmolLM2-135M, B=1024, M=3, F=64, 1 and 2 threads
    python benchmarks/forward_profile.py --length 4096 --threads 1 --top 25

forward_cost.py measures the ratio FAM / BSWA; this script says where the difference goes. Both models are
conversions of the same base (BSWA: fam_length=0) and run interleaved (BSWA, FAM, BSWA, FAM, ...) after a warm-up;
each operator's self CPU time is summed over the rounds. The table lists the operators by how much more time FAM
spends in them than BSWA, with the share of the total difference. The extra rows are the floor: the F FAM rows add
F/B to every matmul's rows and ~(1 + F/B)(1 + F/W) - 1 to attention (W = (M+1)B keys). It also times torch's
sdpa kernel alone on the shapes of a full segment (as one call, and as hf_fam's two calls), which is where the cost
above the floor turned out to be, and one decoder layer's kernels alone (its linear layers over the call's rows, then
sdpa as hf_fam calls it): the ratio this CPU's kernels set for a full segment before any of hf_fam's own work
(`--kernels-only` times just these, in seconds).
Results go to benchmarks/results/forward_profile.{json,csv}.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from common import (
    PAPER_SETTINGS,
    RESULTS,
    layer_kernels,
    load_model,
    machine,
    print_layer_kernels,
    sdpa_inputs,
    write_csv,
    write_json,
)


def profile(model, ids, rounds_out: dict, key: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        rounds_out[key]["wall"].append(time.perf_counter() - start)
    for event in prof.key_averages():
        rounds_out[key]["ops"][event.key] += event.self_cpu_time_total / 1e6
        rounds_out[key]["calls"][event.key] += event.count


def attention_kernel(B: int, M: int, F: int, threads: int, reps: int = 21) -> dict:
    """torch's sdpa alone on the shapes of one full segment (9 heads of 64, SmolLM2's): BSWA (B queries, (M+1)B keys)
    vs FAM (B+F queries, F+(M+1)B keys) as one call, and as the two calls hf_fam makes with sdpa (F FAM queries
    over F+B keys, then B queries over F+(M+1)B keys), interleaved, with a float mask as the model passes; the median
    time ratio."""
    import statistics

    import torch
    import torch.nn.functional as functional

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)

    def timed(args):
        start = time.perf_counter()
        for call in args:
            functional.scaled_dot_product_attention(*call[:3], attn_mask=call[3])
        return time.perf_counter() - start

    W = (M + 1) * B
    shapes = {
        "bswa": [(B, W)],
        "fam_rows_only": [(B + F, W)],
        "fam": [(B + F, F + W)],
        "fam_two_calls": [(F, F + B), (B, F + W)],  # hf_fam's two sdpa calls
    }
    inputs = {name: [sdpa_inputs(*shape, generator) for shape in calls] for name, calls in shapes.items()}
    for args in inputs.values():
        timed(args)
    times = {name: [] for name in shapes}
    for _ in range(reps):
        for name, args in inputs.items():
            times[name].append(timed(args))
    ratios = {
        name: statistics.median(t / b for t, b in zip(times[name], times["bswa"])) for name in shapes if name != "bswa"
    }
    return {"threads": threads, "shapes": shapes, "median_ratio_to_bswa": ratios}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts, one profile each")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument(
        "--kernels-only",
        action="store_true",
        help="time one decoder layer's kernels alone (no model, no profiler; seconds) and write forward_kernels.json",
    )
    args = parser.parse_args()
    if min(args.threads) < 1 or args.rounds < 1:
        parser.error("--threads and --rounds take counts of 1 or more")

    import torch

    B, M, F = PAPER_SETTINGS["block_size"], PAPER_SETTINGS["memory_segments"], PAPER_SETTINGS["fam_length"]
    if args.kernels_only:
        runs = [layer_kernels(B, M, F, threads, reps=41) for threads in args.threads]
        for kernels in runs:
            print_layer_kernels(kernels)
        RESULTS.mkdir(parents=True, exist_ok=True)
        summary = {"settings": PAPER_SETTINGS, "machine": machine(), "runs": runs}
        write_json(RESULTS / "forward_kernels.json", summary, newline=True)
        print(f"Wrote {RESULTS / 'forward_kernels.json'}")
        return
    floor_rows, floor_attention = F / B, (1 + F / B) * (1 + F / ((M + 1) * B)) - 1
    bswa = load_model("bswa")
    fam = load_model("fam")
    ids = torch.randint(0, fam.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    summary = {"length": args.length, "rounds": args.rounds, "settings": PAPER_SETTINGS, "machine": machine(), "runs": []}
    all_rows = []
    for threads in args.threads:
        kernel = attention_kernel(B, M, F, threads)
        kernels = layer_kernels(B, M, F, threads)
        torch.set_num_threads(threads)
        with torch.no_grad():
            for model in (bswa, fam):
                model(ids[:, :2048], logits_to_keep=1)  # warm-up
        results = {k: {"wall": [], "ops": defaultdict(float), "calls": defaultdict(int)} for k in ("bswa", "fam")}
        for _ in range(args.rounds):
            profile(bswa, ids, results, "bswa")
            profile(fam, ids, results, "fam")
        total = {k: sum(v["ops"].values()) for k, v in results.items()}
        difference = total["fam"] - total["bswa"]
        rows = []
        for name in set(results["fam"]["ops"]) | set(results["bswa"]["ops"]):
            b, f = results["bswa"]["ops"].get(name, 0.0), results["fam"]["ops"].get(name, 0.0)
            rows.append(
                {
                    "threads": threads,
                    "operator": name,
                    "bswa_s": round(b / args.rounds, 4),
                    "fam_s": round(f / args.rounds, 4),
                    "extra_s": round((f - b) / args.rounds, 4),
                    "fam_over_bswa": round(f / b, 3) if b else None,
                    "share_of_difference": round((f - b) / difference, 3) if difference else None,
                    "bswa_calls": results["bswa"]["calls"].get(name, 0) // args.rounds,
                    "fam_calls": results["fam"]["calls"].get(name, 0) // args.rounds,
                }
            )
        rows.sort(key=lambda row: -abs(row["extra_s"]))
        all_rows.extend(rows)
        wall = {k: sum(v["wall"]) / args.rounds for k, v in results.items()}
        print(f"\n{args.length} tokens, B={B} M={M} F={F}, {args.rounds} rounds, {threads} thread(s)")
        print(f"wall per pass: BSWA {wall['bswa']:.2f} s, FAM {wall['fam']:.2f} s, FAM / BSWA {wall['fam'] / wall['bswa']:.3f}")
        print(
            f"profiled self CPU per pass: BSWA {total['bswa'] / args.rounds:.2f} s, FAM {total['fam'] / args.rounds:.2f} s, "
            f"FAM / BSWA {total['fam'] / total['bswa']:.3f} (floor: rows +{floor_rows:.1%}, attention +{floor_attention:.1%})"
        )
        print("sdpa alone, median of 21 interleaved calls, FAM / BSWA shapes: " + ", ".join(
            f"{name} {' + '.join(map(str, kernel['shapes'][name]))} {ratio:.3f}" for name, ratio in kernel["median_ratio_to_bswa"].items()
        ))
        print_layer_kernels(kernels)
        print(f"{'operator':44s} {'BSWA s':>8s} {'FAM s':>8s} {'extra s':>8s} {'ratio':>6s} {'share':>6s} {'calls B/F':>12s}")
        for row in rows[: args.top]:
            ratio = "" if row["fam_over_bswa"] is None else f"{row['fam_over_bswa']:.2f}"
            share = "" if row["share_of_difference"] is None else f"{row['share_of_difference']:.0%}"
            calls = f"{row['bswa_calls']}/{row['fam_calls']}"
            print(
                f"{row['operator'][:44]:44s} {row['bswa_s']:8.3f} {row['fam_s']:8.3f} {row['extra_s']:8.3f} "
                f"{ratio:>6s} {share:>6s} {calls:>12s}"
            )
        summary["runs"].append(
            {
                "threads": threads,
                "wall_s": {k: v["wall"] for k, v in results.items()},
                "fam_over_bswa_wall": wall["fam"] / wall["bswa"],
                "profiled_self_cpu_s_per_pass": {k: v / args.rounds for k, v in total.items()},
                "fam_over_bswa_profiled": total["fam"] / total["bswa"],
                "attention_kernel": kernel,
                "layer_kernels": kernels,
            }
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "forward_profile.json", summary, newline=True)
    write_csv(RESULTS / "forward_profile.csv", all_rows)
    print(f"\nWrote {RESULTS / 'forward_profile.json'} and forward_profile.csv")


if __name__ == "__main__":
    main()

"""One forward pass of SmolLM2-135M over 8k and 16k tokens: full attention (base) vs BSWA vs FAM (B=1024, M=3, F=64).

    python benchmarks/forward_cost.py            # both lengths, then the table, ratios, CSV, JSON and plot
    python benchmarks/forward_cost.py --lengths 8192 --rounds 5   # the other lengths keep their earlier results
    python benchmarks/forward_cost.py --lengths 8192 --rounds 15 --skip-base   # FAM/BSWA only, more rounds
    python benchmarks/forward_cost.py --unit segment --lengths 8192 --rounds 30   # FAM/BSWA, interleaved per segment
    python benchmarks/forward_cost.py --unit segment --lengths 8192 --rounds 30 --reuse-initial-state

Time: one process per length holds the three models (BSWA and FAM are conversions sharing the base model's
weights) and times one pass of each in turn, --rounds times (base, BSWA, FAM, base, BSWA, FAM, ...), after a
warm-up; the reported time is the median, so drift of the machine's speed hits every mode alike. Also reported: the
median of the per-round FAM/BSWA ratios, of the process's CPU time, and the ratio of multiply-adds as the kernels run
them (`multiply_adds`: the floor set by the rules themselves), and what one full segment's layer kernels cost alone
on this CPU (`common.layer_kernels`: matmul and attention kernels are not proportional to rows on every CPU, and
this is the part of the cost above the floor that no code of hf_fam's sets). Memory: every mode
runs one more pass in a fresh process of its own, with glibc's allocator pinned (`common.PINNED_ALLOCATOR`), whose
peak resident memory above the loaded model is the kernel's high-water mark (`common.PeakMemory`). Logits are kept
for the last position only (logits_to_keep=1) so the 49k-entry vocabulary head does not dominate. "BSWA" is the
same hf_fam code path with fam_length=0.

--unit segment times the FAM/BSWA ratio only, with a finer interleaving: each round feeds the same input to both
models one block-sized segment per call (each model continuing its own cache: the same computation as one pass, which
streaming equals), alternating BSWA and FAM segment by segment (which of the two goes first alternates too). A
machine whose speed drifts over seconds then charges the drift to both models alike, where whole passes of ~20 s each
do not cancel it. Reported: per round, the ratio of the two passes' summed segment times; their median over the
rounds, with a bootstrap 95% interval of that median; the median of every per-segment pair's ratio; and the median
pair ratio per segment index (segment 0 has no memory yet). Writes forward_cost_segments.{csv,json,png}.

--reuse-initial-state runs the FAM model inside `model.reuse_initial_state()`: the FAM prompt's pass (S0) is computed
by the warm-up and reused by every timed stream, as in an evaluation or a server starting many streams with the same
weights; its multiply-add floor leaves that pass out. Writes forward_cost_segments_reused.{csv,json,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

from common import (
    PAPER_SETTINGS,
    PINNED_ALLOCATOR,
    RESULTS,
    PeakMemory,
    layer_kernels,
    load_model,
    machine,
    run_child,
    write_csv,
    write_json,
)


MODES = ("base", "bswa", "fam")


def _inputs(vocab_size: int, length: int):
    import torch

    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


def multiply_adds(
    base, length: int, block_size: int, memory_segments: int, fam_length: int, initial_state_pass=True
) -> int:
    """Multiply-adds of one forward pass's decoder layers (logits for one position: left out), counted as the kernels
    run them: every linear layer over every row a layer call gets (block rows, the F FAM rows of each block and the
    F rows of the FAM prompt, which compute S0 in the first segment's calls), and attention as dense over the keys
    of the call's cache span (sdpa with a mask computes masked pairs too): block queries over F + min(t, M) B + B
    keys, FAM queries over their own F + B (the two-call sdpa), the prompt's over the F FAM keys (their own call;
    the prompt's rows left out with `initial_state_pass=False`, for a model reusing S0). The FAM/BSWA ratio of these
    is the floor no implementation of the rules gets under."""
    return sum(segment_multiply_adds(base, length, block_size, memory_segments, fam_length, initial_state_pass))


def segment_multiply_adds(
    base, length: int, block_size: int, memory_segments: int, fam_length: int, initial_state_pass=True
) -> list[int]:
    """`multiply_adds` of each block segment of the pass, for one row (S0, if computed, in the first segment)."""
    layer = base.model.layers[0]
    linear = sum(m.in_features * m.out_features for m in layer.modules() if isinstance(m, __import__("torch").nn.Linear))
    config = base.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_pair = 2 * config.num_attention_heads * head_dim  # q.k and the weighted sum of v
    B, M, F, L = block_size, memory_segments, fam_length, config.num_hidden_layers
    segments = []
    for t, start in enumerate(range(0, length, B)):
        queries = min(B, length - start)
        keys = F + min(t, M) * B + queries
        rows = queries + F
        pairs = queries * keys + F * (F + queries)
        if F and t == 0 and initial_state_pass:
            # S0, computed in this segment's calls (`FamForCausalLM._plan_segment`): F more rows where the block
            # completes; else the FAM rows are the prompt's, seeing only the F FAM keys
            rows, pairs = (rows + F, pairs + F * F) if queries == B else (rows, queries * keys + F * F)
        segments.append(L * (rows * linear + pairs * per_pair))
    return segments


def time_child(length: int, rounds: int, modes: tuple[str, ...]) -> dict:
    import torch

    import hf_fam

    base = load_model("base")
    models = {
        "base": base,
        "bswa": hf_fam.convert_to_fam(base, **dict(PAPER_SETTINGS, fam_length=0)).eval(),
        "fam": hf_fam.convert_to_fam(base, **PAPER_SETTINGS, calibration_steps=0).eval(),  # speed only
    }
    models = {mode: models[mode] for mode in modes}
    ids = _inputs(base.config.vocab_size, length)
    seconds = {mode: [] for mode in modes}
    cpu_seconds = {mode: [] for mode in modes}
    with torch.no_grad():
        for model in models.values():
            model(ids[:, :256], logits_to_keep=1)  # warm-up
        for _ in range(rounds):
            for mode, model in models.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                model(ids, logits_to_keep=1)
                seconds[mode].append(time.perf_counter() - start)
                cpu_seconds[mode].append(time.process_time() - cpu_start)
    floor = multiply_adds(base, length, **PAPER_SETTINGS) / multiply_adds(base, length, **dict(PAPER_SETTINGS, fam_length=0))
    # What this CPU's kernels alone charge for a full segment's extra rows (no hf_fam code): next to the whole pass's
    # ratio, it tells the hardware's share of the cost above the multiply-add floor from hf_fam's.
    B, M, F = (PAPER_SETTINGS[key] for key in ("block_size", "memory_segments", "fam_length"))
    kernels = layer_kernels(B, M, F, torch.get_num_threads(), reps=41)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "fam_over_bswa_multiply_adds": floor,
        "fam_over_bswa_layer_kernels": kernels["median_ratio_fam_over_bswa"],
    }


def segment_child(length: int, rounds: int, reuse_initial_state: bool = False) -> dict:
    """Seconds of each segment call, [round][segment], per model, interleaved per segment (see --unit segment and
    --reuse-initial-state)."""
    import torch

    import hf_fam

    base = load_model("base")
    models = {
        "bswa": hf_fam.convert_to_fam(base, **dict(PAPER_SETTINGS, fam_length=0)).eval(),
        "fam": hf_fam.convert_to_fam(base, **PAPER_SETTINGS, calibration_steps=0).eval(),  # speed only
    }
    ids = _inputs(base.config.vocab_size, length)
    B = PAPER_SETTINGS["block_size"]
    seconds = {mode: [] for mode in models}
    reuse = models["fam"].reuse_initial_state() if reuse_initial_state else nullcontext()
    with torch.no_grad(), reuse:
        for model in models.values():
            model(ids[:, :256], logits_to_keep=1)  # warm-up (and, reusing it, S0)
        for round_index in range(rounds):
            caches = {mode: None for mode in models}
            for mode in models:
                seconds[mode].append([])
            for index, start in enumerate(range(0, length, B)):
                order = list(models) if (round_index + index) % 2 == 0 else list(models)[::-1]
                for mode in order:
                    begin = time.perf_counter()
                    output = models[mode](
                        ids[:, start : start + B], cache=caches[mode], use_cache=True, logits_to_keep=1
                    )
                    seconds[mode][-1].append(time.perf_counter() - begin)
                    caches[mode] = output.past_key_values
    fam = segment_multiply_adds(base, length, **PAPER_SETTINGS, initial_state_pass=not reuse_initial_state)
    bswa = segment_multiply_adds(base, length, **dict(PAPER_SETTINGS, fam_length=0))
    return {
        "seconds": seconds,
        "fam_over_bswa_multiply_adds": sum(fam) / sum(bswa),
        "fam_over_bswa_multiply_adds_by_segment": [f / b for f, b in zip(fam, bswa)],
    }


def bootstrap_median_interval(values: list[float], draws: int = 10000, seed: int = 0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of the median of `values` (resampled with replacement, fixed seed)."""
    import random

    generator = random.Random(seed)
    medians = sorted(statistics.median(generator.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def segment_summary(length: int, seconds: dict) -> dict:
    bswa, fam = seconds["bswa"], seconds["fam"]
    per_round = [sum(f) / sum(b) for f, b in zip(fam, bswa)]
    pairs = [[f / b for f, b in zip(fam_round, bswa_round)] for fam_round, bswa_round in zip(fam, bswa)]
    low, high = bootstrap_median_interval(per_round)
    return {
        "tokens": length,
        "rounds": len(per_round),
        "segments": len(bswa[0]),
        "fam_over_bswa_median_of_rounds": statistics.median(per_round),
        "fam_over_bswa_median_of_rounds_95_interval": [low, high],
        "fam_over_bswa_ratio_of_median_pass_times": statistics.median(map(sum, fam)) / statistics.median(map(sum, bswa)),
        "fam_over_bswa_median_of_segment_pairs": statistics.median(ratio for row in pairs for ratio in row),
        "fam_over_bswa_median_pair_by_segment": [statistics.median(column) for column in zip(*pairs)],
        "fam_over_bswa_per_round": per_round,
        "median_pass_seconds": {"bswa": statistics.median(map(sum, bswa)), "fam": statistics.median(map(sum, fam))},
    }


def run_segments(lengths: list[int], rounds: int, reuse_initial_state: bool = False) -> None:
    name = "forward_cost_segments_reused" if reuse_initial_state else "forward_cost_segments"
    results_json = RESULTS / f"{name}.json"
    initial_state = "reused" if reuse_initial_state else "computed per stream"
    earlier = json.loads(results_json.read_text())["ratios"] if results_json.exists() else []
    summaries, rows = [], []
    for length in lengths:
        flags = ["--reuse-initial-state"] if reuse_initial_state else []
        timed = run_child(
            Path(__file__), "segments", "bswa,fam", str(length), "--rounds", str(rounds), *flags, timeout=6 * 3600
        )
        summary = segment_summary(length, timed["seconds"])
        summary["initial_state"] = initial_state
        summary["fam_over_bswa_multiply_adds"] = timed["fam_over_bswa_multiply_adds"]
        summary["fam_over_bswa_multiply_adds_by_segment"] = timed["fam_over_bswa_multiply_adds_by_segment"]
        summary["seconds"] = timed["seconds"]
        summaries.append(summary)
        low, high = summary["fam_over_bswa_median_of_rounds_95_interval"]
        print(
            f"{length} tokens, {rounds} rounds interleaved per segment, S0 {initial_state}: FAM/BSWA median of rounds "
            f"{summary['fam_over_bswa_median_of_rounds']:.3f} (95% interval {low:.3f}-{high:.3f}), ratio of median "
            f"passes {summary['fam_over_bswa_ratio_of_median_pass_times']:.3f}, median of {rounds * summary['segments']} "
            f"segment pairs {summary['fam_over_bswa_median_of_segment_pairs']:.3f}, multiply-add floor "
            f"{summary['fam_over_bswa_multiply_adds']:.3f}",
            flush=True,
        )
        print(
            "  per segment index (multiply-add floor): "
            + ", ".join(
                f"{ratio:.3f} ({floor:.3f})"
                for ratio, floor in zip(
                    summary["fam_over_bswa_median_pair_by_segment"], summary["fam_over_bswa_multiply_adds_by_segment"]
                )
            )
            + "\n  per round: "
            + ", ".join(f"{ratio:.3f}" for ratio in summary["fam_over_bswa_per_round"]),
            flush=True,
        )
    summaries += [summary for summary in earlier if summary["tokens"] not in lengths]  # other lengths keep their run
    summaries.sort(key=lambda summary: summary["tokens"])
    for summary in summaries:
        for round_index, (bswa, fam) in enumerate(zip(summary["seconds"]["bswa"], summary["seconds"]["fam"])):
            for index, (b, f) in enumerate(zip(bswa, fam)):
                rows.append({"tokens": summary["tokens"], "round": round_index, "segment": index, "bswa_s": round(b, 4), "fam_s": round(f, 4)})
    print(f"Machine: {machine()}")
    write_csv(RESULTS / f"{name}.csv", rows)
    write_json(results_json, {"machine": machine(), "settings": PAPER_SETTINGS, "ratios": summaries})
    from plot_results import plot_forward_cost_segments

    plot_forward_cost_segments(name)
    print(f"Wrote {RESULTS / name}.csv, {name}.json and {name}.png")


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
    parser.add_argument(
        "--skip-base", action="store_true",
        help="time BSWA and FAM only (rounds a third shorter, for the FAM/BSWA ratio; the base rows keep their earlier run)",
    )
    parser.add_argument(
        "--unit", choices=("pass", "segment"), default="pass",
        help="what one timed call is: a whole pass (all three modes, and memory) or one segment (FAM/BSWA only, "
        "interleaved per segment; see above)",
    )
    parser.add_argument(
        "--reuse-initial-state", action="store_true",
        help="--unit segment: run FAM inside model.reuse_initial_state(), S0 computed once (see above)",
    )
    parser.add_argument("--child", nargs=3, metavar=("KIND", "MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or min(args.lengths) < 1:
        parser.error("--rounds and --lengths must be at least 1")
    if args.child:
        kind, mode, length = args.child
        modes = MODES if mode == "all" else tuple(mode.split(","))
        if kind == "time":
            result = time_child(int(length), args.rounds, modes)
        elif kind == "segments":
            result = segment_child(int(length), args.rounds, args.reuse_initial_state)
        else:
            result = memory_child(mode, int(length))
        print(json.dumps(result))
        return
    if args.unit == "segment":
        if args.skip_base:
            parser.error("--skip-base is for --unit pass: --unit segment times BSWA and FAM only")
        run_segments(args.lengths, args.rounds, args.reuse_initial_state)
        return
    if args.reuse_initial_state:
        parser.error("--reuse-initial-state is for --unit segment")

    modes = MODES[1:] if args.skip_base else MODES
    results_json = RESULTS / "forward_cost.json"
    earlier = json.loads(results_json.read_text()) if results_json.exists() else {"runs": [], "ratios": []}
    rows, summary = [], []
    for length in args.lengths:
        timed = run_child(Path(__file__), "time", ",".join(modes), str(length), "--rounds", str(args.rounds), timeout=6 * 3600)
        seconds, cpu_seconds = timed["seconds"], timed["cpu_seconds"]
        by_mode = {}
        for mode in MODES:
            if mode not in modes:  # the earlier run's row
                kept = [row for row in earlier["runs"] if row["tokens"] == length and row["mode"] == mode]
                by_mode[mode] = kept[0] if kept else None
                rows.extend(kept)
                continue
            peak = run_child(Path(__file__), "memory", mode, str(length), timeout=3600, env=PINNED_ALLOCATOR)
            times = sorted(seconds[mode])
            by_mode[mode] = {
                "mode": mode,
                "tokens": length,
                "seconds": round(statistics.median(times), 3),
                "seconds_min": round(times[0], 3),
                "seconds_max": round(times[-1], 3),
                "cpu_seconds": round(statistics.median(cpu_seconds[mode]), 3),
                "peak_added_mib": round(peak, 1),
            }
            rows.append(by_mode[mode])
            print(f"{mode:5s} {length:6d} tokens: {statistics.median(times):8.2f} s (runs: {', '.join(f'{t:.2f}' for t in seconds[mode])}), peak +{peak:8.1f} MiB", flush=True)
        fam, bswa, base = by_mode["fam"], by_mode["bswa"], by_mode["base"]
        per_round = [f / b for f, b in zip(seconds["fam"], seconds["bswa"])]
        cpu_per_round = [f / b for f, b in zip(cpu_seconds["fam"], cpu_seconds["bswa"])]
        summary.append({
            "tokens": length,
            "rounds": args.rounds,
            "fam_over_bswa_time": fam["seconds"] / bswa["seconds"],
            "fam_over_bswa_time_per_round": per_round,
            "fam_over_bswa_time_median_of_rounds": statistics.median(per_round),
            "fam_over_bswa_cpu_time_median_of_rounds": statistics.median(cpu_per_round),
            "fam_over_bswa_multiply_adds": timed["fam_over_bswa_multiply_adds"],
            "fam_over_bswa_layer_kernels": timed["fam_over_bswa_layer_kernels"],
            "fam_over_base_time": fam["seconds"] / base["seconds"] if base else None,
            "fam_over_bswa_memory": fam["peak_added_mib"] / bswa["peak_added_mib"],
            "fam_over_base_memory": fam["peak_added_mib"] / base["peak_added_mib"] if base else None,
        })

    def number(value, width):
        return f"{value:{width}.3f}" if value is not None else f"{'-':>{width}}"

    print(f"\nMachine: {machine()}")
    print(
        f"{'tokens':>7} {'FAM/BSWA time':>14} {'(median of rounds)':>19} {'(CPU time)':>11} {'(multiply-adds)':>16} "
        f"{'FAM/base time':>14} {'FAM/BSWA mem':>13} {'FAM/base mem':>13}"
    )
    for r in summary:
        print(
            f"{r['tokens']:7d} {r['fam_over_bswa_time']:14.3f} {r['fam_over_bswa_time_median_of_rounds']:19.3f} "
            f"{r['fam_over_bswa_cpu_time_median_of_rounds']:11.3f} {r['fam_over_bswa_multiply_adds']:16.3f} "
            f"{number(r['fam_over_base_time'], 14)} {r['fam_over_bswa_memory']:13.3f} {number(r['fam_over_base_memory'], 13)}   "
            f"(FAM/BSWA per round: {', '.join(f'{x:.3f}' for x in r['fam_over_bswa_time_per_round'])})"
        )
        kernels = r.get("fam_over_bswa_layer_kernels")
        if kernels and r["tokens"] in args.lengths:
            print(
                f"{'':7} one full segment's layer kernels alone (this CPU, no hf_fam code), FAM/BSWA: linear layers "
                f"{kernels['linear']:.3f}, sdpa {kernels['sdpa']:.3f}, layer {kernels['layer']:.3f}"
            )
    # Lengths this run did not measure keep their earlier rows (the README quotes each length's latest run).
    rows += [row for row in earlier["runs"] if row["tokens"] not in args.lengths]
    summary += [ratio for ratio in earlier["ratios"] if ratio["tokens"] not in args.lengths]
    rows.sort(key=lambda row: (row["tokens"], MODES.index(row["mode"])))
    summary.sort(key=lambda ratio: ratio["tokens"])
    write_csv(RESULTS / "forward_cost.csv", rows)
    write_json(results_json, {"machine": machine(), "settings": PAPER_SETTINGS, "runs": rows, "ratios": summary})
    from plot_results import plot_forward_cost

    plot_forward_cost()
    print(f"Wrote {RESULTS / 'forward_cost.csv'}, forward_cost.json and forward_cost.png")


if __name__ == "__main__":
    main()

"""Turn the benchmark CSV files in benchmarks/results/ into PNG plots.

    python benchmarks/plot_results.py
"""

from __future__ import annotations

import json

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS, read_csv, save_figure  # noqa: E402


COLORS = {"base": "#888888", "bswa": "#1f77b4", "fam": "#d62728"}
LABELS = {"base": "full attention (base)", "bswa": "BSWA (F=0)", "fam": "FAM (B=1024, M=3, F=64)"}


def _grouped_bars(ax, rows, value, ylabel, title):
    lengths = sorted({int(r["tokens"]) for r in rows})
    modes = [m for m in ("base", "bswa", "fam") if any(r["mode"] == m for r in rows)]
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        # a length a mode was not run at (e.g. `forward_cost.py --skip-base` on a new length) gets no bar
        values = [
            next((float(r[value]) for r in rows if r["mode"] == mode and int(r["tokens"]) == n), float("nan"))
            for n in lengths
        ]
        positions = [x + (i - (len(modes) - 1) / 2) * width for x in range(len(lengths))]
        ax.bar(positions, values, width, label=LABELS[mode], color=COLORS[mode])
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}k tokens" for n in lengths])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def plot_forward_cost():
    rows = read_csv(RESULTS / "forward_cost.csv")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _grouped_bars(axes[0], rows, "seconds", "seconds", "One forward pass, SmolLM2-135M (CPU)")
    _grouped_bars(axes[1], rows, "peak_added_mib", "MiB", "Peak memory added by the pass")
    fig.tight_layout()
    save_figure(fig, RESULTS / "forward_cost.png")
    plt.close(fig)


def plot_forward_cost_segments(name: str = "forward_cost_segments"):
    """Left: each round's FAM/BSWA ratio (passes interleaved per segment), their median, the multiply-add floor and
    the 1.06 target. Middle: the median pair ratio of each segment index against its own floor. Right: every call's
    seconds in the order they ran, the machine's drift both modes share."""
    results = json.loads((RESULTS / f"{name}.json").read_text())
    fig, axes = plt.subplots(len(results["ratios"]), 3, figsize=(15, 4 * len(results["ratios"])), squeeze=False)
    for (left, middle, right), summary in zip(axes, results["ratios"]):
        per_round = summary["fam_over_bswa_per_round"]
        median = summary["fam_over_bswa_median_of_rounds"]
        low, high = summary["fam_over_bswa_median_of_rounds_95_interval"]
        left.plot(range(1, len(per_round) + 1), per_round, "o", color=COLORS["fam"], label="FAM / BSWA, one round")
        left.axhspan(low, high, color=COLORS["fam"], alpha=0.15, label=f"median {median:.3f} (95% interval)")
        left.axhline(median, color=COLORS["fam"])
        left.axhline(summary["fam_over_bswa_multiply_adds"], color="black", linestyle=":", label="multiply-add floor")
        left.axhline(1.06, color="black", linestyle="--", label="target 1.06")
        left.set_xlabel("round (one pass of each model)")
        left.set_ylabel("FAM / BSWA time")
        reused = ", S0 reused" if summary.get("initial_state") == "reused" else ""
        left.set_title(f"{summary['tokens'] // 1024}k tokens, interleaved per segment{reused}")
        left.legend(fontsize=8)
        by_segment = summary["fam_over_bswa_median_pair_by_segment"]
        middle.plot(range(len(by_segment)), by_segment, "o-", color=COLORS["fam"], label="median of the pairs")
        middle.plot(
            range(len(by_segment)), summary["fam_over_bswa_multiply_adds_by_segment"], "k:", label="multiply-add floor"
        )
        middle.axhline(1.06, color="black", linestyle="--", label="target 1.06")
        middle.set_xlabel("segment of the pass (1,024 tokens each)")
        middle.set_ylabel("FAM / BSWA time")
        middle.set_title("By segment (the memory fills over segments 0-3)")
        middle.legend(fontsize=8)
        for mode in ("bswa", "fam"):
            calls = [s for round_ in summary["seconds"][mode] for s in round_]
            right.plot(range(len(calls)), calls, ".", markersize=3, label=LABELS[mode], color=COLORS[mode])
        right.set_xlabel("segment pair (in the order run)")
        right.set_ylabel("seconds")
        right.set_title("Each segment call")
        right.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, RESULTS / f"{name}.png")
    plt.close(fig)


def _lines(ax, rows, x, y, ylabel, title, modes=("base", "bswa", "fam")):
    for mode in modes:
        points = sorted((int(r[x]), float(r[y])) for r in rows if r["mode"] == mode)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=LABELS[mode], color=COLORS[mode])
    ax.set_xscale("log", base=2)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def plot_stream_memory():
    rows = read_csv(RESULTS / "stream_memory_curve.csv")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, value, title in (
        (axes[0], "peak_added_mib", "Peak memory added since the stream began"),
        (axes[1], "cache_mib", "Cache size"),
    ):
        for mode in ("base", "fam"):
            points = sorted((int(r["tokens"]), float(r[value])) for r in rows if r["mode"] == mode)
            if points:
                ax.plot([p[0] / 1024 for p in points], [p[1] for p in points], ".-", label=LABELS[mode], color=COLORS[mode])
        ax.set_xlabel("tokens streamed (thousands)")
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, RESULTS / "stream_memory.png")
    plt.close(fig)


def plot_decode_speed():
    rows = read_csv(RESULTS / "decode_speed.csv")
    fig, ax = plt.subplots(figsize=(6, 4))
    _lines(ax, rows, "context", "tokens_per_second", "tokens / s", "Greedy decoding speed, SmolLM2-135M (CPU)")
    fig.tight_layout()
    save_figure(fig, RESULTS / "decode_speed.png")
    plt.close(fig)


def plot_fam_update(stem: str = "fam_update"):
    rows = read_csv(RESULTS / f"{stem}.csv")
    settings = json.loads((RESULTS / f"{stem}.json").read_text())["settings"]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(dict.fromkeys(r["model"] for r in rows))
    palette = {"base": COLORS["base"], "bswa": COLORS["bswa"], "fam replace": "#ff7f0e"}
    reds = iter(["#d62728", "#9467bd", "#2ca02c", "#8c564b"])
    for name in names:
        points = [(int(r["tokens"]), float(r["perplexity"])) for r in rows if r["model"] == name]
        color = palette.get(name) or next(reds)
        ax.plot([p[0] / 1024 for p in points], [p[1] for p in points], ".-", label=name, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("position in the stream (thousands of tokens)")
    ax.set_ylabel("perplexity of the bucket")
    ax.set_title(f"Untrained conversion, SmolLM2-135M: B={settings['block_size']}, M={settings['memory_segments']}, F={settings['fam_length']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, RESULTS / f"{stem}.png")
    plt.close(fig)


def plot_train_step():
    rows = read_csv(RESULTS / "train_step.csv")
    with_memory = [r for r in rows if r["peak_added_mib"] not in ("", "nan")]
    fig, axes = plt.subplots(1, 2 if with_memory else 1, figsize=(10 if with_memory else 6, 4), squeeze=False)
    _grouped_bars(axes[0][0], rows, "seconds", "seconds", "One training step, SmolLM2-135M + LoRA (CPU)")
    if with_memory:
        _grouped_bars(axes[0][1], with_memory, "peak_added_mib", "MiB", "Peak memory added by the step")
    fig.tight_layout()
    save_figure(fig, RESULTS / "train_step.png")
    plt.close(fig)


def plot_new_stream_cost():
    data = json.loads((RESULTS / "new_stream_cost.json").read_text())
    entries = data["lengths"]
    modes = {"bswa": ("BSWA (F=0)", COLORS["bswa"]), "fam": ("FAM, S0 in the first block's calls", COLORS["fam"]),
             "fam_own_pass": ("FAM, S0 in a pass of its own", "#ff9896")}  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(modes)
    for i, (mode, (label, color)) in enumerate(modes.items()):
        positions = [x + (i - (len(modes) - 1) / 2) * width for x in range(len(entries))]
        ax.bar(positions, [e["median_seconds"][mode] for e in entries], width, label=label, color=color)
    ax.set_xticks(range(len(entries)), [f"{e['tokens']:,} tokens" for e in entries])
    ax.set_ylabel("seconds (median)")
    ax.set_title("A new stream's first call, SmolLM2-135M (CPU), B=1024, F=64")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, RESULTS / "new_stream_cost.png")
    plt.close(fig)


PLOTS = {
    "forward_cost.csv": plot_forward_cost,
    "forward_cost_segments.json": plot_forward_cost_segments,
    "forward_cost_segments_reused.json": lambda: plot_forward_cost_segments("forward_cost_segments_reused"),
    "stream_memory_curve.csv": plot_stream_memory,
    "decode_speed.csv": plot_decode_speed,
    "train_step.csv": plot_train_step,
    "new_stream_cost.json": plot_new_stream_cost,
}


def main():
    for name, plot in PLOTS.items():
        if (RESULTS / name).exists():
            plot()
            print(f"plotted {name}")
    for path in sorted(RESULTS.glob("fam_update*.csv")):
        plot_fam_update(path.stem)
        print(f"plotted {path.name}")


if __name__ == "__main__":
    main()

"""Learning curves of one or more recipe runs: loss, answer accuracy and exact-match, and the mean FAM gate.

    python recipes/plot_training.py runs/passkey_gated runs/passkey_replace --labels gated replace \
        --output recipes/results/smollm2_135m_passkey_cpu/learning_curve

Reads the `log_history` of each run's latest `checkpoint-N/trainer_state.json` (every logged quantity, whatever
version of hf-fam wrote the run) and writes OUTPUT.csv (one row per run and logged step) and OUTPUT.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path


PANELS = [
    ("loss", "training loss (weighted)"),
    ("answer_accuracy", "answer tokens right (per token)"),
    ("answer_exact", "answers right (per sequence)"),
    ("fam_gate_mean", "mean FAM gate (gated update)"),
]
COLUMNS = ["run", "step", "loss", "answer_loss", "answer_accuracy", "answer_exact", "fam_gate_mean", "grad_norm", "learning_rate"]


def latest_trainer_state(run: Path) -> Path:
    """`run`'s latest checkpoint's trainer_state.json (`run` may also be a checkpoint folder itself)."""
    if (run / "trainer_state.json").is_file():
        return run / "trainer_state.json"
    checkpoints = sorted(
        (p for p in run.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.json").is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    if not checkpoints:
        raise SystemExit(f"{run}: no checkpoint-N/trainer_state.json; give a run's output_dir or a checkpoint folder.")
    return checkpoints[-1] / "trainer_state.json"


def history(run: Path) -> list[dict]:
    """The training log rows (those with a loss) of a run, in step order."""
    path = latest_trainer_state(run)
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"{path} is damaged ({error}); pass an earlier checkpoint folder of the run instead.") from None
    return [row for row in state.get("log_history", []) if "loss" in row]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` logged points (the answer metrics of a few rows per log are noisy)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="output_dir of each run (or a checkpoint folder)")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run (default: the folder names)")
    parser.add_argument("--output", type=Path, required=True, help="path without suffix: OUTPUT.csv and OUTPUT.png")
    parser.add_argument("--smooth", type=int, default=4, help="trailing mean over this many logged points in the plot")
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels: {len(labels)} label(s) for {len(args.runs)} run(s)")

    curves = {label: history(run) for label, run in zip(labels, args.runs)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for label, rows in curves.items():
            writer.writerows({"run": label, **row} for row in rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, title) for key, title in PANELS if any(key in row for rows in curves.values() for row in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes[0], panels):
        for index, (label, rows) in enumerate(curves.items()):
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:  # a run that did not log this quantity (a BSWA run has no gates) keeps its colour elsewhere
                steps, values = zip(*points)
                ax.plot(steps, smooth(list(values), args.smooth), label=label, color=colors[index % len(colors)])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output.with_suffix(".png"), dpi=120)
    print(f"wrote {args.output.with_suffix('.csv')} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

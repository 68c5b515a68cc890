"""One training step (forward + backward) of SmolLM2-135M with LoRA, activation checkpointing on: full attention
(base) vs BSWA vs FAM (B=1024, M=3, F=64, the FAM prompt trained too), at 4k and 8k tokens.

    python benchmarks/train_step.py                  # both lengths, then the table, ratios, CSV, JSON and plot
    python benchmarks/train_step.py --lengths 4096 --rounds 5
    python benchmarks/train_step.py --lengths 8192 --no-memory   # adds 8k to what an earlier run recorded

What a step is: the recipe's setting of `recipes/finetune.py`: peft LoRA r=16 on every attention and feed-forward
projection (`all-linear`), the FAM parameters in `modules_to_save` (FAM only), non-reentrant activation
checkpointing of every decoder layer, float32, `loss = model(ids, labels=ids).loss; loss.backward()` on one row,
gradients cleared after each step (no optimizer update: it costs the same in every mode).

Time: one process per length holds the three models (separate copies: LoRA layers are injected into the modules, so
they cannot share them) and times one step of each in turn, --rounds times (base, BSWA, FAM, base, BSWA, FAM, ...),
after a warm-up step on 256 tokens; the reported time is the median, so drift of the machine's speed hits every mode
alike. On a shared machine the wall-clock time of a minutes-long step depends on the other tenants, so the step's
CPU seconds (all threads of the process, with OpenMP's idle threads sleeping instead of spinning:
OMP_WAIT_POLICY=PASSIVE) are recorded too; their ratios are the steadier measure of the work a mode does. Memory: every mode runs one more step in a fresh process of its own, with glibc's allocator pinned
(`common.PINNED_ALLOCATOR`); its peak resident memory above the loaded model is the kernel's high-water mark
(`common.PeakMemory`). "BSWA" is the same hf_fam code path with fam_length=0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import PAPER_SETTINGS, PINNED_ALLOCATOR, RESULTS, PeakMemory, load_model, machine, run_child, write_csv, write_json


MODES = ("base", "bswa", "fam")
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def _inputs(vocab_size: int, length: int):
    import torch

    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


def trainable_model(mode: str):
    """The mode's model with LoRA adapters (and the FAM parameters trainable), checkpointing on, in training mode."""
    from peft import LoraConfig, get_peft_model

    from hf_fam.training import fam_module_names

    model = load_model(mode)
    modules_to_save = fam_module_names(model) if mode == "fam" else None
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", modules_to_save=modules_to_save, **LORA))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def training_step(model, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss)


def time_child(length: int, rounds: int) -> dict:
    """Wall-clock and CPU seconds (this process, all threads) of each mode's step, per round."""
    models = {mode: trainable_model(mode) for mode in MODES}
    ids = _inputs(models["base"].config.vocab_size, length)
    seconds = {mode: [] for mode in MODES}
    cpu = {mode: [] for mode in MODES}
    for model in models.values():
        training_step(model, ids[:, :256])  # warm-up
    for _ in range(rounds):
        for mode, model in models.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            training_step(model, ids)
            seconds[mode].append(time.perf_counter() - start)
            cpu[mode].append(time.process_time() - start_cpu)
    return {"wall": seconds, "cpu": cpu}


def memory_child(mode: str, length: int) -> float:
    model = trainable_model(mode)
    ids = _inputs(model.config.vocab_size, length)
    training_step(model, ids[:, :1024])
    with PeakMemory() as memory:
        training_step(model, ids)
    return memory.added / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-mode memory processes")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, mode, length = args.child
        result = time_child(int(length), args.rounds) if kind == "time" else memory_child(mode, int(length))
        print(json.dumps(result))
        return

    rows, summary = _previous_results(args.lengths)
    for length in args.lengths:
        # OpenMP threads that wait sleep instead of spinning, so CPU seconds count work, not waiting for a busy core
        measured = run_child(Path(__file__), "time", "all", str(length), "--rounds", str(args.rounds), timeout=12 * 3600,
                             env={"OMP_WAIT_POLICY": "PASSIVE"})
        seconds, cpu = measured["wall"], measured["cpu"]
        by_mode = {}
        for mode in MODES:
            peak = float("nan") if args.no_memory else run_child(Path(__file__), "memory", mode, str(length), timeout=3600, env=PINNED_ALLOCATOR)
            times = sorted(seconds[mode])
            by_mode[mode] = {
                "mode": mode,
                "tokens": length,
                "seconds": round(statistics.median(times), 3),
                "seconds_min": round(times[0], 3),
                "seconds_max": round(times[-1], 3),
                "cpu_seconds": round(statistics.median(cpu[mode]), 3),
                "rounds": len(times),
                "peak_added_mib": round(peak, 1),
            }
            rows.append(by_mode[mode])
            print(
                f"{mode:5s} {length:6d} tokens: {statistics.median(times):8.2f} s (runs: {', '.join(f'{t:.2f}' for t in seconds[mode])}), "
                f"CPU {statistics.median(cpu[mode]):8.2f} s (runs: {', '.join(f'{t:.2f}' for t in cpu[mode])}), peak +{peak:8.1f} MiB",
                flush=True,
            )
        fam, bswa, base = by_mode["fam"], by_mode["bswa"], by_mode["base"]
        summary.append({
            "tokens": length,
            "fam_over_bswa_time": fam["seconds"] / bswa["seconds"],
            "fam_over_bswa_time_per_round": [f / b for f, b in zip(seconds["fam"], seconds["bswa"])],
            "fam_over_base_time": fam["seconds"] / base["seconds"],
            "fam_over_bswa_cpu": fam["cpu_seconds"] / bswa["cpu_seconds"],
            "fam_over_bswa_cpu_per_round": [f / b for f, b in zip(cpu["fam"], cpu["bswa"])],
            "fam_over_base_cpu": fam["cpu_seconds"] / base["cpu_seconds"],
            "fam_over_bswa_memory": fam["peak_added_mib"] / bswa["peak_added_mib"],
            "fam_over_base_memory": fam["peak_added_mib"] / base["peak_added_mib"],
        })
        _write(rows, summary)  # after every length, so a long run keeps what it finished

    print(f"\nMachine: {machine()}")
    print(f"{'tokens':>7} {'FAM/BSWA time':>14} {'FAM/BSWA CPU':>13} {'FAM/base time':>14} {'FAM/base CPU':>13} {'FAM/BSWA mem':>13}")
    for r in summary:
        print(
            f"{r['tokens']:7d} {r['fam_over_bswa_time']:14.3f} {r['fam_over_bswa_cpu']:13.3f} {r['fam_over_base_time']:14.3f} "
            f"{r['fam_over_base_cpu']:13.3f} {r['fam_over_bswa_memory']:13.3f}   "
            f"(FAM/BSWA per round, time: {', '.join(f'{x:.3f}' for x in r['fam_over_bswa_time_per_round'])}; "
            f"CPU: {', '.join(f'{x:.3f}' for x in r['fam_over_bswa_cpu_per_round'])})"
        )
    print(f"Wrote {RESULTS / 'train_step.csv'}, train_step.json and train_step.png")


def _previous_results(lengths) -> tuple[list, list]:
    """Rows and ratios recorded earlier for lengths this run does not measure (runs of one length add up)."""
    path = RESULTS / "train_step.json"
    if not path.exists():
        return [], []
    meta = json.loads(path.read_text())
    rows = [r for r in meta["runs"] if int(r["tokens"]) not in lengths]
    summary = [r for r in meta["ratios"] if int(r["tokens"]) not in lengths]
    return rows, summary


def _write(rows, summary) -> None:
    rows = sorted(rows, key=lambda r: (int(r["tokens"]), MODES.index(r["mode"])))
    summary = sorted(summary, key=lambda r: int(r["tokens"]))
    write_csv(RESULTS / "train_step.csv", rows)
    meta = {"machine": machine(), "settings": PAPER_SETTINGS, "lora": LORA, "checkpointing": "non-reentrant", "runs": rows, "ratios": summary}
    write_json(RESULTS / "train_step.json", meta)
    from plot_results import plot_train_step

    plot_train_step()


if __name__ == "__main__":
    main()

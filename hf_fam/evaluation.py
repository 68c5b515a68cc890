# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Evaluation of a FAM checkpoint: passkey retrieval per filler length and depth, and streamed perplexity of a long
text per position bucket, optionally side by side with the base model (full attention) and BSWA (the same B and M,
no FAM) built from the same weights.

Results go to files in an output folder (JSON, CSV, a PNG) and, as rows `{task, metric, value, settings, model}`, to
`eval_results.json`, which `hf_fam.card` puts in the model card. Every file is written to a temporary name and
renamed, after each completed length (passkey) or model (perplexity), so an interrupted run keeps what finished.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .card import EVAL_RESULTS_FILE
from .io_utils import write_atomic
from .tasks import TaskExample, answer_is_correct, passkey_example


FAM, BSWA, BASE = "FAM", "BSWA", "base"
DEFAULT_LENGTHS = "1k,2k,4k,8k,16k,32k"
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"


class EvaluationError(ValueError):
    """A problem with the evaluation's inputs that the user can fix (the message names the value and the fix)."""


# ------------------------------------------------------------------------------------------------ parsing
# The longest passkey filler taken: an example is built as one list of token ids (a few hundred MB at this length).
MAX_FILLER_TOKENS = 10 * 1024 * 1024


def parse_lengths(text: str, flag: str = "--lengths") -> list[int]:
    """'1k,2k,512' -> [1024, 2048, 512] (k = 1024 tokens), each at most `MAX_FILLER_TOKENS`."""
    lengths = []
    for item in (part.strip().lower() for part in str(text).split(",")):
        scale = 1024 if item.endswith("k") else 1
        try:
            value = int(float(item[:-1] if scale > 1 else item) * scale)
        except (ValueError, OverflowError):  # OverflowError: inf
            raise EvaluationError(f"{flag} takes token counts such as 1k,2k,4096; {item!r} is not one.") from None
        if value > MAX_FILLER_TOKENS:
            raise EvaluationError(
                f"{flag} values must be at most {MAX_FILLER_TOKENS // 1024}k tokens ({MAX_FILLER_TOKENS:,}), got {item!r}."
            )
        if value < 0 or (value == 0 and flag != "--lengths"):
            kind = "token counts >= 0" if flag == "--lengths" else "positive token counts"
            raise EvaluationError(f"{flag} values must be {kind}, got {item!r}.")
        lengths.append(value)
    if not lengths:
        raise EvaluationError(f"{flag} is empty; give token counts such as 1k,2k,4k.")
    return lengths


def parse_depths(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0], each in [0, 1]."""
    depths = []
    for item in (part.strip() for part in str(text).split(",")):
        try:
            value = float(item)
        except ValueError:
            raise EvaluationError(f"--depths takes fractions in [0, 1] such as 0,0.5,1; {item!r} is not a number.") from None
        if not 0.0 <= value <= 1.0:
            raise EvaluationError(f"--depths values must be in [0, 1] (0: right after the instruction, 1: right before the question), got {item}.")
        depths.append(value)
    return depths


def length_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


# ------------------------------------------------------------------------------------------- the models
@dataclass
class Variant:
    """One model to evaluate: `name` is FAM, BSWA or base; `streams` says whether it runs through a FamCache."""

    name: str
    model: torch.nn.Module
    streams: bool
    compared: bool = False  # built for the comparison, not the checkpoint itself


def load_fam(path: str | os.PathLike, dtype: str = "auto"):
    """The FamForCausalLM and tokenizer of a converted folder (or Hub id), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hardware import warn_if_slow_on_cpu
    from .io_utils import DamagedFileError, check_model_folder
    from .modeling_fam import FamForCausalLM
    from .sources import resolve_dtype

    try:
        check_model_folder(path)
    except (FileNotFoundError, DamagedFileError) as error:
        raise EvaluationError(str(error)) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as error:
        raise EvaluationError(f"Could not load a model and tokenizer from {path}: {error}") from error
    if not isinstance(model, FamForCausalLM):
        raise EvaluationError(
            f"{path} holds a {type(model).__name__}, not a TransformerFAM checkpoint; convert it first with `hf-fam convert`."
        )
    warn_if_slow_on_cpu(model, "Pass --dtype float32 (dtype='float32').")
    return model.eval(), tokenizer


def comparison_variants(fam, compare: bool) -> list[Variant]:
    """[FAM] or, with `compare`, [base (full attention), BSWA (same B and M, fam_length 0), FAM], all sharing the FAM
    model's weights."""
    from .conversion import bswa_twin, unconvert

    fam_variant = Variant(FAM if fam.config.fam_length > 0 else BSWA, fam, True)
    if not compare:
        return [fam_variant]
    base = unconvert(fam).eval()
    variants = [Variant(BASE, base, False, compared=True)]
    if fam.config.fam_length > 0:
        variants.append(Variant(BSWA, bswa_twin(fam).eval(), True, compared=True))
    return variants + [fam_variant]


def settings_text(fam) -> str:
    c = fam.config
    return f"B={c.block_size}, M={c.memory_segments}, F={c.fam_length}"


def variant_settings(variant: Variant, fam) -> str:
    c = fam.config
    if variant.name == BASE:
        return "base model, full attention"
    if variant.name == BSWA:
        return f"BSWA: B={c.block_size}, M={c.memory_segments}, F=0"
    return f"FAM: {settings_text(fam)}"


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def update_eval_results(folder: str | os.PathLike, rows: list[dict]) -> Path:
    """Merge `rows` into `folder/eval_results.json`: a row replaces an earlier one of the same task, metric and model."""
    path = Path(folder) / EVAL_RESULTS_FILE
    try:
        existing = json.loads(path.read_text()) if path.is_file() else []
    except json.JSONDecodeError as error:
        raise EvaluationError(f"{path} is not valid JSON ({error}); move it away and run again.") from error
    if not isinstance(existing, list):
        raise EvaluationError(f"{path} must hold a list of result rows; move it away and run again.")

    def key(row):
        return row.get("task"), row.get("metric"), row.get("model", FAM)

    new_keys = {key(row) for row in rows}
    merged = [row for row in existing if key(row) not in new_keys] + list(rows)
    return write_atomic(path, json.dumps(merged, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ passkey
def _tail_hidden_states(model, ids: list[int], keep: int, chunk_size: int) -> torch.Tensor:
    """The last `keep` final hidden states (1, keep, hidden) of `ids`, streamed through a FamCache chunk by chunk."""
    from .streaming import stream_hidden_states

    chunks = (ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size))
    tail = None
    for hidden in stream_hidden_states(model, chunks):
        tail = hidden if tail is None else torch.cat([tail, hidden], dim=1)
        tail = tail[:, -keep:]
    return tail


@torch.no_grad()
def score_passkey(variant: Variant, example: TaskExample, chunk_size: int) -> tuple[bool, float]:
    """(exact, token accuracy) of the teacher-forced answer: streamed in chunks through a FAM/BSWA model (constant
    memory), one forward pass for the base model ([`answer_is_correct`])."""
    if not variant.streams:
        return answer_is_correct(variant.model, example)
    n = len(example.answer_ids)
    hidden = _tail_hidden_states(variant.model, example.input_ids, n + 1, chunk_size)
    predicted = variant.model.logits_from_hidden_states(hidden[:, :-1]).argmax(-1)[0].tolist()
    hits = [p == a for p, a in zip(predicted, example.answer_ids)]
    return all(hits), sum(hits) / n


def passkey_examples(tokenizer, length: int, depth: float, trials: int, seed: int, key_digits: int) -> list[TaskExample]:
    """The same `trials` examples for every model (seeded by length, depth and trial)."""
    return [
        passkey_example(tokenizer, random.Random(f"{seed}/{length}/{depth}/{trial}"), length, depth=depth, key_digits=key_digits)
        for trial in range(trials)
    ]


def run_passkey(
    path: str | os.PathLike,
    *,
    lengths: list[int],
    depths: list[float],
    trials: int = 5,
    compare: bool = False,
    output: str | os.PathLike | None = None,
    key_digits: int = 5,
    seed: int = 0,
    dtype: str = "auto",
    chunk_size: int | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Passkey retrieval accuracy of the checkpoint at `path` for each filler length and needle depth.

    Writes `passkey.json`, `passkey.csv`, `passkey_heatmap.png` and rows of `eval_results.json` in `output` (default:
    the model folder) after each length. Returns the JSON document.
    """
    if trials < 1:
        raise EvaluationError(f"--trials must be at least 1, got {trials}.")
    if not lengths or not depths:
        raise EvaluationError("Give at least one length (--lengths) and one depth (--depths).")
    if key_digits < 1:
        raise EvaluationError(f"--key-digits must be at least 1, got {key_digits}.")
    _plt()  # before any model runs: the plot is written after the first length
    output, fam, tokenizer, variants, chunk_size = _prepare(path, output, dtype, compare, chunk_size)
    document = {
        "task": "passkey",
        "model": str(path),
        "settings": {
            "block_size": fam.config.block_size, "memory_segments": fam.config.memory_segments,
            "fam_length": fam.config.fam_length, "trials": trials, "depths": depths, "key_digits": key_digits,
            "seed": seed, "scoring": "teacher-forced greedy prediction of every answer token",
        },
        "models": [v.name for v in variants],
        "results": [],
    }
    total = len(lengths) * len(depths) * trials * len(variants)
    with ExitStack() as reusing, tqdm(total=total, desc="passkey", unit="example", disable=not show_progress) as bar:
        for variant in variants:  # every example starts a stream of the same weights: S0 once, not once per example
            if variant.streams:
                reusing.enter_context(variant.model.reuse_initial_state())
        for length in lengths:
            for depth in depths:
                examples = passkey_examples(tokenizer, length, depth, trials, seed, key_digits)
                for variant in variants:
                    exact, tokens = 0, 0.0
                    for example in examples:
                        hit, accuracy = score_passkey(variant, example, chunk_size)
                        exact += hit
                        tokens += accuracy
                        bar.update(1)
                    document["results"].append({
                        "model": variant.name, "filler_tokens": length, "depth": depth, "trials": trials,
                        "accuracy": exact / trials, "token_accuracy": tokens / trials,
                        "input_tokens": len(examples[0].input_ids),
                    })
            _write_passkey(output, document, fam, variants)
            log(_passkey_line(document, length))
    return document


def _passkey_line(document: dict, length: int) -> str:
    parts = []
    for name in document["models"]:
        rows = [r for r in document["results"] if r["model"] == name and r["filler_tokens"] == length]
        parts.append(f"{name} {sum(r['accuracy'] for r in rows) / len(rows):.0%}")
    return f"filler {length_label(length)}: " + ", ".join(parts)


def passkey_table(document: dict) -> str:
    """Accuracy per filler length (rows) and model x depth (columns), as aligned text."""
    depths = document["settings"]["depths"]
    lengths = sorted({r["filler_tokens"] for r in document["results"]})
    header = ["filler"] + [f"{m} d={d:g}" for m in document["models"] for d in depths] + [f"{m} mean" for m in document["models"]]
    lines = [header]
    index = {(r["model"], r["filler_tokens"], r["depth"]): r["accuracy"] for r in document["results"]}
    for length in lengths:
        cells = [length_label(length)]
        for model in document["models"]:
            cells += [f"{index[model, length, d]:.0%}" if (model, length, d) in index else "-" for d in depths]
        for model in document["models"]:
            values = [index[model, length, d] for d in depths if (model, length, d) in index]
            cells.append(f"{sum(values) / len(values):.0%}" if values else "-")
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in lines)


def _write_passkey(output: Path, document: dict, fam, variants: list[Variant]) -> None:
    write_atomic(output / "passkey.json", json.dumps(document, indent=2) + "\n")
    columns = ["model", "filler_tokens", "depth", "trials", "accuracy", "token_accuracy", "input_tokens"]
    write_atomic(output / "passkey.csv", _csv_text(document["results"], columns))
    _passkey_heatmap(output / "passkey_heatmap.png", document)
    rows = []
    settings = document["settings"]
    for variant in variants:
        for length in sorted({r["filler_tokens"] for r in document["results"]}):
            cells = [r for r in document["results"] if r["model"] == variant.name and r["filler_tokens"] == length]
            rows.append({
                "task": "passkey retrieval",
                "metric": f"accuracy, {length:,} filler tokens",
                "value": round(sum(r["accuracy"] for r in cells) / len(cells), 4),
                "settings": f"{variant_settings(variant, fam)}; depths {', '.join(f'{d:g}' for d in settings['depths'])}; "
                f"{settings['trials']} trials each; {settings['key_digits']}-digit key; teacher-forced",
                "model": variant.name,
                **({"compared": True} if variant.compared else {}),
            })
    update_eval_results(output, rows)


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise EvaluationError(
            "The evaluation's plots need matplotlib, which is not installed: pip install matplotlib (or install "
            "hf-fam with its eval extra)."
        ) from error
    return plt


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, buffer.getvalue())


def _passkey_heatmap(path: Path, document: dict) -> None:
    plt = _plt()
    models, depths = document["models"], document["settings"]["depths"]
    lengths = sorted({r["filler_tokens"] for r in document["results"]})
    index = {(r["model"], r["filler_tokens"], r["depth"]): r["accuracy"] for r in document["results"]}
    fig, axes = plt.subplots(
        1, len(models), figsize=(1.2 + (0.6 + 0.7 * len(lengths)) * len(models), 1.8 + 0.45 * len(depths)), squeeze=False, sharey=True
    )
    for ax, model in zip(axes[0], models):
        grid = [[index.get((model, length, d), float("nan")) for length in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("filler tokens")
        ax.set_title(model)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="passkey accuracy")
    _save_figure(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- perplexity
@torch.no_grad()
def base_stream_log_likelihood(model, ids: list[int], chunk_size: int) -> Iterator[torch.Tensor]:
    """Per-token log-likelihoods (1, n) of `ids` through a plain causal LM with full attention, chunk by chunk over a
    growing key/value cache (memory grows with the length: this is the base model's cost)."""
    from transformers import DynamicCache

    from .streaming import _token_log_likelihoods

    cache = DynamicCache(config=model.config)
    last = None
    for start in range(0, len(ids), chunk_size):
        chunk = torch.tensor([ids[start : start + chunk_size]], device=model.device)
        logits = model(chunk, cache=cache, use_cache=True).logits
        scored = [] if last is None else [_token_log_likelihoods(last, chunk[:, :1])]
        if chunk.shape[1] > 1:
            scored.append(_token_log_likelihoods(logits[:, :-1], chunk[:, 1:]))
        last = logits[:, -1:]
        yield torch.cat(scored, dim=1) if scored else logits.new_zeros(1, 0)


def _read_text(path: Path) -> str:
    """The text of --text `path` (stray bytes replaced: a long book may have a few), or an `EvaluationError` saying
    what to pass."""
    from .io_utils import TextFileError, read_text_file

    try:
        return read_text_file(path, "--text", "pass a long plain-text file (see README: Evaluation)", errors="replace")
    except TextFileError as error:
        raise EvaluationError(str(error)) from None


def read_text_tokens(tokenizer, text: str, name: str, max_tokens: int | None) -> list[int]:
    """The token ids of `text` (the --text file `name`), the first `max_tokens` of them if given."""
    if max_tokens is not None:
        text = text[: max_tokens * 12]  # tokenizing a whole book to keep its start is wasted time (>= 1 char a token)
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise EvaluationError(f"--text {name} has {len(ids)} tokens; perplexity needs at least 2.")
    return ids


def run_perplexity(
    path: str | os.PathLike,
    *,
    text_file: str | os.PathLike,
    max_tokens: int | None = None,
    bucket: int = 1024,
    compare: bool = False,
    output: str | os.PathLike | None = None,
    dtype: str = "auto",
    chunk_size: int | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Streamed perplexity of a long text per position bucket (tokens [0, bucket), [bucket, 2 bucket), ...).

    Writes `perplexity.json`, `perplexity.csv`, `perplexity_curve.png` and rows of `eval_results.json` in `output`
    (default: the model folder) after each bucket (the JSON, CSV and PNG) and each model (`eval_results.json`).
    Returns the JSON document.
    """
    if bucket < 1:
        raise EvaluationError(f"--bucket must be a positive number of tokens, got {bucket}.")
    if max_tokens is not None and max_tokens < 2:
        raise EvaluationError(f"--max-tokens must be at least 2, got {max_tokens}.")
    text = _read_text(Path(text_file))  # before a model is loaded
    _plt()  # before any model runs: the curve is written after the first bucket
    output, fam, tokenizer, variants, chunk_size = _prepare(path, output, dtype, compare, chunk_size)
    text_name = Path(text_file).name
    ids = read_text_tokens(tokenizer, text, text_file, max_tokens)
    document = {
        "task": "perplexity",
        "model": str(path),
        "settings": {
            "block_size": fam.config.block_size, "memory_segments": fam.config.memory_segments,
            "fam_length": fam.config.fam_length, "text": text_name, "tokens": len(ids), "bucket": bucket,
        },
        "models": [v.name for v in variants],
        "results": [],
        "overall": {},
    }
    for variant in variants:
        sums = [0.0] * math.ceil((len(ids) - 1) / bucket)
        counts = [0] * len(sums)
        position = 1  # the token scored next (the first token has no prediction)
        if variant.streams:
            from .streaming import stream_log_likelihood

            chunks = (ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size))
            scored = stream_log_likelihood(variant.model, chunks)
        else:
            scored = base_stream_log_likelihood(variant.model, ids, min(chunk_size, 512))
        with tqdm(total=len(ids) - 1, desc=f"perplexity {variant.name}", unit="tok", disable=not show_progress) as bar:
            written = 0  # buckets of this model already in the document
            for values in scored:
                for value in values[0].tolist():
                    b = (position - 1) // bucket
                    sums[b] -= value
                    counts[b] += 1
                    position += 1
                bar.update(values.shape[1])
                complete = (position - 1) // bucket if position < len(ids) else len(sums)
                if complete > written:  # a bucket finished: keep it on disk (Ctrl-C keeps it)
                    for b in range(written, complete):
                        document["results"].append({
                            "model": variant.name, "bucket_start": b * bucket + 1, "bucket_end": b * bucket + counts[b],
                            "tokens": counts[b], "nll": sums[b] / counts[b], "perplexity": math.exp(sums[b] / counts[b]),
                        })
                    written = complete
                    if complete < len(sums):
                        _write_perplexity(output, document, fam, variants[: variants.index(variant)])
        nll = sum(sums) / sum(counts)
        document["overall"][variant.name] = {"nll": nll, "perplexity": math.exp(nll)}
        _write_perplexity(output, document, fam, variants[: variants.index(variant) + 1])
        log(f"{variant.name}: perplexity {math.exp(nll):.3f} over {sum(counts):,} tokens")
    return document


def perplexity_table(document: dict) -> str:
    models = [m for m in document["models"] if m in document["overall"]]
    index = {(r["model"], r["bucket_start"]): r for r in document["results"]}
    starts = sorted({r["bucket_start"] for r in document["results"]})
    lines = [["tokens"] + models]
    for start in starts:
        end = max(index[m, start]["bucket_end"] for m in models if (m, start) in index)
        lines.append([f"{start:,}-{end:,}"] + [f"{index[m, start]['perplexity']:.3f}" if (m, start) in index else "-" for m in models])
    lines.append(["all"] + [f"{document['overall'][m]['perplexity']:.3f}" for m in models])
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in lines)


def _write_perplexity(output: Path, document: dict, fam, done: list[Variant]) -> None:
    write_atomic(output / "perplexity.json", json.dumps(document, indent=2) + "\n")
    columns = ["model", "bucket_start", "bucket_end", "tokens", "nll", "perplexity"]
    write_atomic(output / "perplexity.csv", _csv_text(document["results"], columns))
    _perplexity_curve(output / "perplexity_curve.png", document)
    settings = document["settings"]
    rows = []
    for variant in done:
        extra = {"compared": True} if variant.compared else {}
        overall = document["overall"][variant.name]
        last = [r for r in document["results"] if r["model"] == variant.name][-1]
        where = f"{settings['text']}, streamed; {variant_settings(variant, fam)}"
        rows.append({
            "task": "perplexity", "metric": f"perplexity, tokens 1-{settings['tokens'] - 1:,}",
            "value": round(overall["perplexity"], 4), "settings": where, "model": variant.name, **extra,
        })
        rows.append({
            "task": "perplexity", "metric": f"perplexity, tokens {last['bucket_start']:,}-{last['bucket_end']:,}",
            "value": round(last["perplexity"], 4), "settings": where, "model": variant.name, **extra,
        })
    update_eval_results(output, rows)


def _perplexity_curve(path: Path, document: dict) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for model in document["models"]:
        rows = [r for r in document["results"] if r["model"] == model]
        if rows:
            ax.plot([(r["bucket_start"] + r["bucket_end"]) / 2 for r in rows], [r["perplexity"] for r in rows], marker="o", label=model)
    ax.set_xlabel("token position")
    ax.set_ylabel(f"perplexity per {document['settings']['bucket']:,} tokens")
    ax.set_title(f"{document['settings']['text']}: streamed perplexity")
    ax.legend()
    ax.grid(alpha=0.3)
    _save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- helpers
def _prepare(path, output, dtype: str, compare: bool, chunk_size: int | None):
    """What both evaluations start from: (output folder, FAM model, tokenizer, the models to run, tokens per call;
    by default one (M+1)B window)."""
    output = _output_folder(path, output)
    fam, tokenizer = load_fam(path, dtype)
    chunk_size = chunk_size or fam.config.block_size * (fam.config.memory_segments + 1)
    return output, fam, tokenizer, comparison_variants(fam, compare), chunk_size


def _output_folder(path, output) -> Path:
    if output is not None:
        folder = Path(output)
    elif Path(path).is_dir():
        folder = Path(path)
    else:
        raise EvaluationError(f"{path} is not a local folder; pass --output DIR to say where the results go.")
    if folder.exists() and not folder.is_dir():
        raise EvaluationError(f"--output {folder} exists and is not a folder; choose another path.")
    return folder  # made when the first result is written


def model_index_results(rows: list[dict]):
    """huggingface_hub `EvalResult`s (the card's model-index) for the rows of the model itself (not the comparisons)."""
    from huggingface_hub import EvalResult

    results = []
    for row in rows:
        if row.get("compared") or not isinstance(row.get("value"), (int, float)):
            continue
        task = str(row.get("task", "evaluation"))
        results.append(EvalResult(
            task_type="text-generation",
            dataset_type=task.replace(" ", "-"),
            dataset_name=task,
            metric_type="perplexity" if "perplexity" in str(row.get("metric", "")) else "accuracy",
            metric_name=str(row.get("metric", task)),
            metric_value=row["value"],
            metric_config=str(row.get("settings", "")) or None,
        ))
    return results


__all__ = [
    "EvaluationError",
    "Variant",
    "comparison_variants",
    "load_fam",
    "model_index_results",
    "parse_depths",
    "parse_lengths",
    "passkey_table",
    "perplexity_table",
    "run_passkey",
    "run_perplexity",
    "score_passkey",
    "update_eval_results",
]

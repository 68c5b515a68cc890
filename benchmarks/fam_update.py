"""Perplexity along a long real text of a fresh (untrained) conversion, per FAM update rule.

    python benchmarks/fam_update.py                                   # B=256, M=1, F=64 over 8k tokens
    python benchmarks/fam_update.py --block-size 1024 --memory-segments 3 --tokens 32768 --tag paper
    python benchmarks/fam_update.py --block-size 1024 --memory-segments 3 --tokens 32768 --chunk 1024 --bucket 1024 \
        --no-base --no-replace --gates 0.1 --calibration-steps 40 --text licenses --tag calibrated_32k

Streams the text through SmolLM2-135M-Instruct 256 tokens at a time and records the perplexity of every bucket of
`--bucket` tokens for: the base model (full attention, DynamicCache), BSWA (hf_fam with fam_length=0), FAM with
the paper's update (`fam_update="replace"`, rule 5), FAM with the gated update at each `--gates` value and, with
`--calibration-steps`, FAM whose prompt was calibrated at conversion (`hf_fam.calibration`, on the pydoc text). Nothing
is trained: this is what a user gets right after `hf-fam convert`. Each model also reads hf_fam/data/sample_long_text.txt
(1,545 tokens) in one call (the short-input check). The long text is the Python reference documentation that ships
with CPython (`pydoc_data.topics`) or, with `--text licenses`, Debian's license texts: no download.

Writes benchmarks/results/fam_update[_TAG].csv (one row per model and bucket) and .json, and plots the curves.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import RESULTS, machine, smollm2_dir, write_csv, write_json


TEXTS = {
    "pydoc": "pydoc_data.topics (CPython reference documentation)",
    "licenses": "/usr/share/common-licenses (Debian's license texts, sorted by name)",
}


def long_text(which: str = "pydoc") -> str:
    if which == "licenses":
        from pathlib import Path

        files = sorted(p for p in Path("/usr/share/common-licenses").iterdir() if p.is_file() and not p.is_symlink())
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def sample_text_perplexity(model, tokenizer) -> float:
    """Perplexity of hf_fam/data/sample_long_text.txt (1,545 tokens) in one call: the short-input check."""
    from common import ROOT

    ids = tokenizer((ROOT / "hf_fam/data/sample_long_text.txt").read_text(), return_tensors="pt").input_ids
    logits = model(ids).logits[0, :-1].float()
    return math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))


def base_nll(model, ids: torch.Tensor, chunk: int) -> list[float]:
    """Next-token NLL of the unmodified model, streamed with its own DynamicCache (full attention)."""
    from transformers import DynamicCache

    import hf_fam.modeling_fam as modeling

    cache, nll, last = DynamicCache(), [], None
    argument = modeling.cache_argument_name(model.model.layers[0])
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start : start + chunk]
        logits = model(piece, use_cache=True, **{argument: cache}).logits[0].float()
        log_probs = logits.log_softmax(-1)
        if last is not None:
            nll.append(-last[piece[0, 0]].item())
        nll += (-log_probs[:-1].gather(1, piece[0, 1:, None])[:, 0]).tolist()
        last = log_probs[-1]
    return nll


def fam_nll(model, ids: torch.Tensor, chunk: int) -> list[float]:
    import hf_fam

    pieces = [ids[:, start : start + chunk] for start in range(0, ids.shape[1], chunk)]
    nll = []
    for log_likelihoods in hf_fam.stream_log_likelihood(model, pieces):
        nll += (-log_likelihoods[0]).tolist()
    return nll


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--memory-segments", type=int, default=1)
    parser.add_argument("--fam-length", type=int, default=64)
    parser.add_argument("--gates", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--bucket", type=int, default=512, help="tokens per perplexity bucket")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per streamed call")
    parser.add_argument("--no-base", action="store_true", help="skip the full-attention base model (slow at 32k)")
    parser.add_argument("--no-replace", action="store_true", help="skip the paper's update (it collapses within a few blocks)")
    parser.add_argument("--calibration-steps", type=int, nargs="*", default=[],
                        help="also FAM gated at the first --gates value with the prompt calibrated for this many steps at conversion")
    parser.add_argument("--text", choices=sorted(TEXTS), default="pydoc",
                        help="the long text (use licenses with --calibration-steps: the calibration reads pydoc)")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()

    import hf_fam
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(long_text(args.text), return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"the {args.text} text has only {ids.shape[1]} tokens; ask for at most that many")
    settings = {"block_size": args.block_size, "memory_segments": args.memory_segments}
    models = ([] if args.no_base else [("base", None)]) + [("bswa", dict(fam_length=0))]
    if not args.no_replace:
        models += [("fam replace", dict(fam_length=args.fam_length, fam_update="replace"))]
    models += [(f"fam gated {g:g}", dict(fam_length=args.fam_length, fam_update="gated", fam_gate_init=g)) for g in args.gates]
    models += [
        (f"fam gated {args.gates[0]:g} calibrated {n}",
         dict(fam_length=args.fam_length, fam_update="gated", fam_gate_init=args.gates[0], calibration_steps=n, tokenizer=tokenizer))
        for n in args.calibration_steps
    ]

    rows, summary = [], {}
    for name, extra in models:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        calibration = None
        if extra is not None:
            extra = {"calibration_steps": 0, **extra}
            model = hf_fam.convert_to_fam(model, **settings, **extra).eval()
            calibration = model.config.fam_calibration
            if calibration:
                calibration["seconds"] = round(time.perf_counter() - start, 1)
        short = sample_text_perplexity(model, tokenizer)
        nll = base_nll(model, ids, args.chunk) if extra is None else fam_nll(model, ids, args.chunk)
        seconds = time.perf_counter() - start
        buckets = []
        for first in range(0, len(nll), args.bucket):
            part = nll[first : first + args.bucket]
            buckets.append(math.exp(sum(part) / len(part)))
            # token index (in the stream) of the bucket's last scored token; the first token is never scored
            rows.append({"model": name, "tokens": first + len(part) + 1, "perplexity": round(buckets[-1], 3)})
        summary[name] = {"perplexity": math.exp(sum(nll) / len(nll)), "buckets": buckets, "seconds": seconds,
                         "sample_text_perplexity": short, "calibration": calibration}
        print(f"{name:16s} sample text (one call) {short:.2f}; perplexity {summary[name]['perplexity']:9.2f} ({seconds:.0f} s) per {args.bucket} tokens: "
              + " ".join(f"{b:.1f}" for b in buckets), flush=True)

    stem = "fam_update" + (f"_{args.tag}" if args.tag else "")
    write_csv(RESULTS / f"{stem}.csv", rows)
    bswa = summary["bswa"]["buckets"]
    for name, result in summary.items():
        result["worst_ratio_to_bswa"] = max(b / ref for b, ref in zip(result["buckets"], bswa))
        result["sample_text_ratio_to_bswa"] = result["sample_text_perplexity"] / summary["bswa"]["sample_text_perplexity"]
    write_json(RESULTS / f"{stem}.json", {
        "machine": machine(), "text": TEXTS[args.text], "tokens": ids.shape[1],
        "settings": {**settings, "fam_length": args.fam_length}, "bucket": args.bucket, "models": summary,
    })
    for name, result in summary.items():
        print(f"{name:16s} worst bucket / BSWA's: {result['worst_ratio_to_bswa']:.3f}; sample text / BSWA's: "
              f"{result['sample_text_ratio_to_bswa']:.3f}")
    from plot_results import plot_fam_update

    plot_fam_update(stem)


if __name__ == "__main__":
    main()

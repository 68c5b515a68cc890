"""Long streams past the base model's trained context: FAM vs BSWA perplexity per position bucket, from two
`hf-fam eval perplexity` runs (absolute rotary positions, as the paper streams them).

Recorded run (2026-11-29, SmolLM2-135M-Instruct, default settings B=1024, M=3, F=64, calibrated prompt; the King
James Bible from Debian's bible-kjv package, 65,536 tokens = 8x SmolLM2's 8k trained context):

    hf-fam convert runs/smollm2_fam_default
    hf-fam convert runs/smollm2_bswa --fam-length 0
    bible gen1:1-rev22:21 > kjv.txt
    hf-fam eval perplexity runs/smollm2_fam_default --text kjv.txt --max-tokens 65536 --bucket 4096 \
        --output benchmarks/results/long_stream/fam
    hf-fam eval perplexity runs/smollm2_bswa --text kjv.txt --max-tokens 65536 --bucket 4096 \
        --output benchmarks/results/long_stream/bswa
    python benchmarks/long_stream.py        # -> results/long_stream/long_stream.{csv,png}
"""

from __future__ import annotations

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS, read_csv, save_figure, write_csv  # noqa: E402


FOLDER = RESULTS / "long_stream"


def main() -> None:
    curves = {name: read_csv(FOLDER / name / "perplexity.csv") for name in ("bswa", "fam")}
    rows = []
    for bswa, fam in zip(curves["bswa"], curves["fam"]):
        assert bswa["bucket_start"] == fam["bucket_start"], "the two runs used different buckets"
        rows.append({
            "bucket_start": int(bswa["bucket_start"]),
            "bucket_end": int(bswa["bucket_end"]),
            "bswa": round(float(bswa["perplexity"]), 3),
            "fam": round(float(fam["perplexity"]), 3),
            "fam_over_bswa": round(float(fam["perplexity"]) / float(bswa["perplexity"]), 3),
        })
    write_csv(FOLDER / "long_stream.csv", rows)
    ends = [r["bucket_end"] / 1024 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(ends, [r["bswa"] for r in rows], "o-", label="BSWA (F=0)", color="#1f77b4")
    axes[0].plot(ends, [r["fam"] for r in rows], "o-", label="FAM, calibrated, untrained", color="#d62728")
    axes[0].set_ylabel("perplexity per 4k tokens")
    axes[1].plot(ends, [r["fam_over_bswa"] for r in rows], "o-", color="#d62728")
    axes[1].axhline(1.0, color="#888888", lw=0.8)
    axes[1].set_ylabel("FAM / BSWA")
    for ax in axes:
        ax.axvline(8, color="#888888", ls="--", lw=0.8)  # SmolLM2's trained context
        ax.set_xlabel("position (k tokens); dashed: trained context")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, B=1024, M=3, F=64, KJV text streamed with absolute positions", fontsize=9)
    fig.tight_layout()
    save_figure(fig, FOLDER / "long_stream.png")
    for r in rows:
        print(f"{r['bucket_start']:>6}-{r['bucket_end']:<6} BSWA {r['bswa']:8.3f}  FAM {r['fam']:8.3f}  FAM/BSWA {r['fam_over_bswa']:.3f}")


if __name__ == "__main__":
    main()

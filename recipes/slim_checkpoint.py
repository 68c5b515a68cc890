#!/usr/bin/env python
# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Copy a fine-tuning checkpoint without its optimizer state, small enough to commit, and resumable.

    python recipes/slim_checkpoint.py runs/x/checkpoint-900 recipes/checkpoints/x/checkpoint-900
    python recipes/finetune.py --config CONFIG resume_from_checkpoint=recipes/checkpoints/x/checkpoint-900

A run's folder is usually git-ignored and can be lost with the machine; a checkpoint of recipes/finetune.py is about
three times the adapter's size (AdamW keeps two moments per trained number) and holds pickled files. The slim copy
keeps what the run needs to go on from the same step with the same data: the adapter (LoRA weights in --dtype,
bfloat16 by default: SmolLM2-135M's r = 16 adapter on every projection is ~10 MB; the FAM parameters keep their
dtype, they are small), `adapter_config.json`, `fam_training.json`, `trainer_state.json` (the step, so the data and
the curriculum continue where they were) and the carried FAM state of random state passing. Left out:
`optimizer.pt`, `scheduler.pt`, `rng_state.pth`, `training_args.bin`. A run resumed from it starts a fresh optimizer
and its learning-rate schedule from step 0 (with a warm-up, a new warm-up), which finetune.py says in its log: not
the exact resume a full checkpoint gives. Written to a temporary folder and renamed, so a failure leaves nothing
half-written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hf_fam.io_utils import atomic_directory, check_weights_folder
from hf_fam.training import CARRIED_STATE_FILE, TRAINING_INFO_FILE


ADAPTER_FILE = "adapter_model.safetensors"
COPIED = ("adapter_config.json", TRAINING_INFO_FILE, "trainer_state.json")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def slim_checkpoint(source: Path, target: Path, dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """Writes the slim copy of checkpoint folder `source` to `target` (which must not exist); returns its files."""
    missing = [name for name in (ADAPTER_FILE, *COPIED) if not (source / name).is_file()]
    if missing:
        raise ValueError(
            f"{source} is not a checkpoint of recipes/finetune.py: it has no {', '.join(missing)}. "
            "Pass a runs/<name>/checkpoint-N folder."
        )
    if target.exists():
        raise ValueError(f"{target} exists already: pass a new folder (nothing was written).")
    check_weights_folder(source, "Pass an intact checkpoint folder (an earlier checkpoint-N of the run).")
    tensors = load_file(str(source / ADAPTER_FILE))
    # LoRA's A and B matrices are cast; the FAM parameters (peft modules_to_save: the prompt, the gates) are not
    slim = {name: t.to(dtype) if ".lora_" in name and t.is_floating_point() else t for name, t in tensors.items()}
    with atomic_directory(target) as staging:
        save_file(slim, str(staging / ADAPTER_FILE), metadata={"format": "pt"})
        for name in COPIED:
            shutil.copy2(source / name, staging / name)
        for carried in source.glob(CARRIED_STATE_FILE.format(suffix="*")):
            shutil.copy2(carried, staging / carried.name)
    return sorted(target.iterdir())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a checkpoint folder of recipes/finetune.py (runs/<name>/checkpoint-N)")
    parser.add_argument("target", type=Path, help="the new folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the LoRA weights")
    args = parser.parse_args(argv)
    try:
        files = slim_checkpoint(args.source, args.target, DTYPES[args.dtype])
    except ValueError as error:
        print(f"slim_checkpoint.py: error: {error}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in files) / 2**20
    print(f"Wrote {args.target} ({size:.1f} MiB): {', '.join(f.name for f in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""What the CPU can do fast: half precision needs instructions that many x86 CPUs lack."""

from __future__ import annotations

import platform

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

HALF_PRECISION = (torch.bfloat16, torch.float16)


def cpu_half_precision_is_slow() -> bool:
    """Whether this CPU lacks the instructions torch's bfloat16/float16 matrix products need to be fast: an x86 CPU
    without AVX-512 or AMX (oneDNN's half-precision kernels need one of them; torch then falls back to a scalar gemm,
    measured ~35-50x slower than float32 on an AVX2 CPU). False where unsure (other CPUs, a torch without the checks)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    cpu = torch.cpu
    try:
        return not (cpu._is_avx512_supported() or cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def warn_if_slow_on_cpu(model: torch.nn.Module, fix: str) -> bool:
    """Log a warning, ending with `fix`, when `model` runs on the CPU in bfloat16/float16 where that is slow (see
    `cpu_half_precision_is_slow`); returns whether it warned."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or parameter.dtype not in HALF_PRECISION:
        return False
    if not cpu_half_precision_is_slow():
        return False
    logger.warning(slow_half_precision_message(f"The model runs in {str(parameter.dtype).removeprefix('torch.')}", fix))
    return True


def slow_half_precision_message(subject: str, fix: str) -> str:
    """The warning for half precision where `cpu_half_precision_is_slow`: `subject` says what runs in it."""
    return (
        f"{subject} on a CPU without half-precision matrix instructions (x86 without AVX-512 or AMX), where torch "
        f"multiplies bfloat16/float16 matrices tens of times slower than float32. {fix}"
    )

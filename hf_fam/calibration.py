# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Calibrating the FAM prompt at conversion, so that an untrained FAM costs (almost) nothing.

A freshly converted model's FAM rows are visible to every block token. Their prompt has never been trained, so they
draw attention and move every output: on SmolLM2-135M (B = 1024, M = 3, F = 64) perplexity is 17-20% above BSWA's on
text that fits in one window. [`calibrate_fam_prompt`] fits the prompt alone (no base weight, no gate is touched) so
that the model's next-token distributions match those of the same model without FAM (BSWA with the same B and M):
a few dozen steps of Adam on the mean KL(BSWA || FAM) over windows of a real text. The base model's own weights are
the reference, so no labels and no data set are needed; by default the text is the Python reference documentation
that ships with CPython (`pydoc_data.topics`), which is English prose with code and is always installed.

Calibration changes nothing the rules fix (FAM_SPEC.md rule 1: the prompt is a free parameter), so every limit of
rule 7 holds for a calibrated model exactly as for an uncalibrated one.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from transformers.utils import logging
from transformers.utils.logging import tqdm


logger = logging.get_logger(__name__)

DEFAULT_STEPS = 40
DEFAULT_WINDOW = 512
DEFAULT_LEARNING_RATE = 3e-3
_TEXT_CHARACTERS = 400_000  # of the default text: enough for DEFAULT_STEPS windows of DEFAULT_WINDOW tokens


def default_calibration_text() -> str:
    """The Python reference documentation's topics (English prose with code), joined in a fixed order."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[name] for name in sorted(topics))[:_TEXT_CHARACTERS]


def calibration_ids(tokenizer, text: str | None = None) -> torch.Tensor:
    """Token ids (1-D) of `text` (default: [`default_calibration_text`]) for [`calibrate_fam_prompt`]."""
    text = default_calibration_text() if text is None else text
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibrate_fam_prompt(
    model,
    input_ids: torch.Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    window: int = DEFAULT_WINDOW,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    seed: int = 0,
    show_progress: bool = True,
) -> dict:
    """Fit `model.fam_prompt` so that the model's next-token distributions match BSWA's (the same model without FAM).

    Each step draws a window of `window` tokens from `input_ids` at random (seeded), runs the model with and without
    FAM and takes one Adam step on the prompt against the mean over tokens of KL(BSWA || FAM). Nothing but the prompt
    changes; the optimisation runs in float32 whatever the model's dtype.

    Args:
        model: a [`FamForCausalLM`] with `fam_length > 0`.
        input_ids: token ids of a text (1-D, or 2-D with one row), at least `window + 1` of them.
        steps: optimizer steps.
        window: tokens per step. Windows longer than one block also calibrate the state that later blocks see.
        learning_rate: Adam's learning rate.
        seed: where the windows are drawn.
        show_progress: a progress bar (tqdm).

    Returns:
        What was done, as recorded in the configuration's `fam_calibration`: `steps`, `window`, `learning_rate`,
        `seed`, `kl_first` (the mean KL of the first 5 steps, before most of the fitting) and `kl_last` (of the last 5;
        fewer when there are fewer than 10 steps).
    """
    if model.config.fam_length <= 0:
        raise ValueError("This model has no FAM (fam_length=0): there is no prompt to calibrate.")
    if steps < 1 or window < 2:
        raise ValueError(f"steps must be >= 1 and window >= 2, got steps={steps}, window={window}")
    ids = torch.as_tensor(input_ids).reshape(-1)
    if ids.numel() <= window:
        raise ValueError(
            f"The calibration text has {ids.numel()} tokens; it needs more than window={window}. Pass a longer text "
            "or a smaller window."
        )
    from .conversion import bswa_twin

    reference = bswa_twin(model)
    prompt = model.fam_prompt.weight
    device = prompt.device
    master = prompt.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([master], lr=learning_rate)
    rng = random.Random(seed)
    was_training = model.training
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    prompt.requires_grad_(True)
    model.eval()
    losses = []
    try:
        for _ in tqdm(range(steps), desc="Calibrating the FAM prompt", disable=not show_progress):
            start = rng.randrange(ids.numel() - window)
            x = ids[start : start + window].unsqueeze(0).to(device)
            with torch.no_grad():
                target = reference(x, use_cache=False).logits.float().log_softmax(-1)
                prompt.copy_(master.to(prompt.dtype))
            with torch.enable_grad():
                output = model(x, use_cache=False).logits.float().log_softmax(-1)
                loss = F.kl_div(output, target, log_target=True, reduction="none").sum(-1).mean()
                (gradient,) = torch.autograd.grad(loss, prompt)
            master.grad = gradient.float()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        with torch.no_grad():
            prompt.copy_(master.detach().to(prompt.dtype))
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
        model.train(was_training)
    k = max(1, min(5, steps // 2))
    head, tail = losses[:k], losses[-k:]
    result = {
        "steps": steps,
        "window": window,
        "learning_rate": learning_rate,
        "seed": seed,
        "kl_first": round(sum(head) / len(head), 5),
        "kl_last": round(sum(tail) / len(tail), 5),
    }
    logger.info(f"FAM prompt calibrated: mean KL to BSWA {result['kl_first']} -> {result['kl_last']} ({steps} steps)")
    return result


__all__ = ["calibrate_fam_prompt", "calibration_ids", "default_calibration_text"]

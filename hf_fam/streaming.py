# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Feeding input that does not fit in memory at once through a FAM model, chunk by chunk, in constant memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .cache_fam import FamCache


def _as_batch(chunk, device) -> torch.Tensor:
    ids = chunk if isinstance(chunk, torch.Tensor) else torch.as_tensor(chunk, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"A chunk must be a sequence of token ids or a (batch, n) tensor, got shape {tuple(ids.shape)}")
    return ids.to(device=device, dtype=torch.long)


def _stream(model, token_chunks, cache, show_progress, desc):
    if cache is None:
        cache = model.new_cache()
    elif not isinstance(cache, FamCache):
        raise TypeError(f"cache must be a FamCache, got {type(cache).__name__}")
    device = model.device
    with torch.no_grad(), tqdm(desc=desc, unit="tok", disable=not show_progress) as bar:
        for chunk in token_chunks:
            ids = _as_batch(chunk, device)
            if ids.shape[1] == 0:
                continue
            yield ids, cache
            bar.update(ids.numel())


def stream_log_likelihood(
    model,
    token_chunks: Iterable[Sequence[int] | torch.Tensor],
    *,
    cache: FamCache | None = None,
    show_progress: bool = False,
) -> Iterator[torch.Tensor]:
    """Per-token log-likelihoods of a stream given chunk by chunk, in constant memory.

    Args:
        model: a [`FamForCausalLM`].
        token_chunks: an iterable of chunks, each a sequence of token ids (one stream) or a (batch, n) tensor (one
            stream per row, batch fixed); chunk sizes are free.
        cache: a [`FamCache`] to continue (e.g. one restored with `FamCache.load`); a new stream by default.

    Yields:
        For each chunk, float32 `log p(token | everything before it)` for its tokens, shape (batch, n), except that
        the first token of a new stream has nothing before it: the first chunk of a new stream yields n - 1 values.
        Results equal those of a single forward pass over the concatenated stream.
    """
    previous_logits = None  # logits of the last token of the previous chunk predict this chunk's first token
    for ids, cache in _stream(model, token_chunks, cache, show_progress, "scoring"):
        logits = model(ids, past_key_values=cache, use_cache=True).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        scored = log_probs[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        if previous_logits is not None:
            first = torch.log_softmax(previous_logits, dim=-1).gather(-1, ids[:, :1])
            scored = torch.cat([first, scored], dim=1)
        previous_logits = logits[:, -1]
        yield scored


def stream_hidden_states(
    model,
    token_chunks: Iterable[Sequence[int] | torch.Tensor],
    *,
    cache: FamCache | None = None,
    show_progress: bool = False,
) -> Iterator[torch.Tensor]:
    """The final (normed) hidden states of each chunk of a stream, (batch, n, hidden_size), in constant memory."""
    for ids, cache in _stream(model, token_chunks, cache, show_progress, "encoding"):
        output = model(ids, past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
        yield output.hidden_states[-1]

# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Feeding input that does not fit in memory at once through a FAM model, chunk by chunk, in constant memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .cache_fam import FamCache

logger = logging.get_logger(__name__)


def _stream_cache(model, cache: FamCache | None) -> FamCache:
    if cache is None:
        return model.new_cache()
    if not isinstance(cache, FamCache):
        raise TypeError(f"cache must be a FamCache, got {type(cache).__name__}")
    return cache


def _input_device(model) -> torch.device:
    """Where the model's input goes: its embedding's (execution) device, even when weights are offloaded to `meta`."""
    return model.input_device() if hasattr(model, "input_device") else model.device


def _chunks(token_chunks, device, show_progress: bool, desc: str) -> Iterator[torch.Tensor]:
    """Each chunk as a (batch, n) LongTensor on `device`; empty chunks are skipped."""
    with tqdm(desc=desc, unit="tok", disable=not show_progress) as bar:
        for chunk in token_chunks:
            ids = chunk if isinstance(chunk, torch.Tensor) else torch.as_tensor(chunk, dtype=torch.long)
            if ids.ndim == 1:
                ids = ids[None]
            if ids.ndim != 2:
                raise ValueError(f"A chunk must be a sequence of token ids or a (batch, n) tensor, got shape {tuple(ids.shape)}")
            if ids.shape[1] == 0:
                continue
            yield ids.to(device=device, dtype=torch.long)
            bar.update(ids.numel())


_LOGITS_SLICE = 256  # tokens whose logits are computed at once by stream_log_likelihood


def _token_log_likelihoods(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for (..., vocab) logits and (...) targets, without a second vocab-sized tensor."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)


@torch.no_grad()
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
        show_progress: show a tqdm bar counting tokens.

    Yields:
        For each chunk, float32 `log p(token | everything before it)` for its tokens, shape (batch, n), except that
        the first token of a new stream has nothing before it: the first chunk of a new stream yields n - 1 values.
        Results equal those of a single forward pass over the concatenated stream, also when the stream is scored
        in several calls that continue one cache (the cache keeps the last token's hidden state, which predicts the
        next call's first token).
    """
    cache = _stream_cache(model, cache)
    last = None  # logits of the previous chunk's last token: they predict this chunk's first token
    previous = None  # the continued cache's last hidden state, projected once the head's device is known
    if cache.is_started and bool((cache.token_count > 0).all()):
        previous = cache.last_hidden_state
        if previous is None:  # a cache file saved before hf-fam kept it
            logger.warning(
                "This FamCache does not hold its last token's hidden state (saved by an older hf-fam): the first "
                "token of this call cannot be scored and is left out."
            )
    for ids in _chunks(token_chunks, _input_device(model), show_progress, "scoring"):
        hidden, _, _ = model.final_hidden_states(ids, cache=cache)
        if previous is not None:
            last, previous = model.logits_from_hidden_states(previous[:, None].to(hidden.device)), None
        scored = [] if last is None else [_token_log_likelihoods(last, ids[:, :1])]
        # the head a slice at a time: a chunk's (n, vocab) logits are never held at once
        for start in range(0, ids.shape[1] - 1, _LOGITS_SLICE):
            end = min(start + _LOGITS_SLICE, ids.shape[1] - 1)
            logits = model.logits_from_hidden_states(hidden[:, start:end])
            scored.append(_token_log_likelihoods(logits, ids[:, start + 1 : end + 1]))
        last = model.logits_from_hidden_states(hidden[:, -1:])
        yield torch.cat(scored, dim=1) if scored else hidden.new_zeros(ids.shape[0], 0, dtype=torch.float32)


@torch.no_grad()
def stream_hidden_states(
    model,
    token_chunks: Iterable[Sequence[int] | torch.Tensor],
    *,
    cache: FamCache | None = None,
    show_progress: bool = False,
) -> Iterator[torch.Tensor]:
    """The final (normed) hidden states of each chunk of a stream, (batch, n, hidden_size), in constant memory."""
    cache = _stream_cache(model, cache)
    for ids in _chunks(token_chunks, _input_device(model), show_progress, "encoding"):
        yield model.final_hidden_states(ids, cache=cache)[0]

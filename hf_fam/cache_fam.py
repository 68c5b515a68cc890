# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""The working state of TransformerFAM streams: a `transformers` `Cache` of constant size.

Per decoder layer it holds one key buffer and one value buffer: F slots for the keys/values of the rows of the FAM
state S[l], then a window of W = (M+1)*B slots for the block tokens (the memory segments plus the current block), and
the FAM state S[l] itself. Per row it holds how many real (non-padding) tokens the stream has consumed, which is all
that is needed to know the position and block of every stored token. The window keeps tokens in stream order: while
a row is in block k, window slot j holds token max(0, k - M) * B + j, so the tokens a block row may attend to are
always a prefix of the window. When a block k >= M completes, the window slides by B (one copy of M*B keys/values
per layer per block). Attention reads the buffers in place (a decoding step copies no keys) and reads only the
slots in reach: the memory segments and the current block up to the newest token.

This file travels into converted checkpoints (``trust_remote_code=True``), so it imports nothing but
``torch`` and ``transformers``.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


# Saved stream states name their slot layout: token i of block k in window slot i - max(0, k - M) * B.
_FORMAT = "hf_fam.FamCache/window"


class FamCacheLayer(CacheLayerMixin):
    """One decoder layer's share of the stream state.

    Tensors (b = batch size, F = fam_length, W = (M+1)*B):
        keys, values: (b, kv_heads, F + W, head_dim); slots [0, F) hold the keys/values of the rows of `fam_state`,
            slot F + j those of token `FamCache.window_start() + j`, rotated at its position.
        fam_state: (b, F, hidden_size) S[l], the FAM input of this layer for the current block.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, fam_length: int, window_size: int):
        super().__init__()
        self.fam_length = fam_length
        self.window_size = window_size
        self.fam_state: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.store(*self.empty_buffers(key_states, value_states))

    def empty_buffers(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, kv_heads = key_states.shape[:2]
        slots = self.fam_length + self.window_size
        keys = key_states.new_zeros(batch, kv_heads, slots, key_states.shape[-1])
        return keys, value_states.new_zeros(batch, kv_heads, slots, value_states.shape[-1])

    def store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def written(self, source, fam_kv, block_kv, writes: tuple[torch.Tensor, torch.Tensor, torch.Tensor], in_place: bool):
        """The buffers `source` ((keys, values), or None before the first call) after storing the keys/values of the
        FAM rows (each (b, kv_heads, F, d), or None) and of the real tokens of a segment (each (b, kv_heads, n, d));
        `writes` = (rows, columns, slots) says which column of which row goes to which slot (see
        `FamCache.token_writes`).

        In place when `in_place`; otherwise on copies, leaving `source` untouched for the backward pass (or the
        recompute under gradient checkpointing) of the layer call that read it.
        """
        if source is None:
            keys, values = self.empty_buffers(*block_kv)
        else:
            keys, values = source if in_place else (source[0].clone(), source[1].clone())
        if fam_kv is not None:
            keys[:, :, : self.fam_length] = fam_kv[0]
            values[:, :, : self.fam_length] = fam_kv[1]
        rows, cols, slots = writes
        keys[rows, :, slots] = block_kv[0][rows, :, cols]
        values[rows, :, slots] = block_kv[1][rows, :, cols]
        return keys, values

    def slide(self, rows: torch.Tensor, index: torch.Tensor, block_size: int, in_place: bool) -> None:
        """Drop the oldest block of the window of the rows `rows` (b,) (bool; `index` = their indices): window slot j
        takes slot j + B. Both are on this layer's device."""
        if self.keys is None:
            return
        start, keep = self.fam_length, self.window_size - block_size
        if in_place:
            for buffer in (self.keys, self.values):
                buffer[index, :, start : start + keep] = buffer[index, :, start + block_size :]  # gathered: a copy
            return
        slid = []
        for buffer in (self.keys, self.values):
            moved = torch.cat([buffer[:, :, :start], buffer[:, :, start + block_size :], buffer[:, :, start + keep :]], 2)
            slid.append(torch.where(rows[:, None, None, None], moved, buffer))
        self.keys, self.values = slid
    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError(
            "A FamCache is filled by FamForCausalLM itself; it cannot serve as the cache of another model. "
            "Pass it as `past_key_values` to a FamForCausalLM."
        )

    def get_seq_length(self) -> int:
        raise TypeError("Ask the FamCache, not one of its layers, for the sequence length.")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window_size + query_length, 0

    def get_max_length(self) -> int:
        return self.window_size

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("keys", "values", "fam_state")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def _apply_to_rows(self, fn) -> None:
        for name, tensor in self.tensors().items():
            setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_to_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_to_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_to_rows(lambda t: t[indices])

    def reset(self) -> None:
        self.keys = self.values = self.fam_state = None
        self.is_initialized = False


class FamCache(Cache):
    """Constant-size cache of a [`FamForCausalLM`] stream (see the module docstring).

    Its size stops growing once (M+1)*B tokens have been consumed. `get_seq_length()` counts every column the
    model has consumed, padding included (since the last `without_history()`), which is what `generate()` slices
    its inputs by.

    Args:
        block_size, memory_segments, fam_length (`int`): B, M and F of the model.
        num_hidden_layers (`int`): number of decoder layers.
        hidden_size (`int`): width of the FAM state.
    """

    is_compileable = False

    def __init__(self, block_size: int, memory_segments: int, fam_length: int, num_hidden_layers: int, hidden_size: int):
        self.block_size = block_size
        self.memory_segments = memory_segments
        self.fam_length = fam_length
        self.hidden_size = hidden_size
        self.window_size = (memory_segments + 1) * block_size
        super().__init__(layers=[FamCacheLayer(fam_length, self.window_size) for _ in range(num_hidden_layers)])
        # Per-row stream state; None until the first forward pass.
        self.token_count: torch.Tensor | None = None  # (b,) real tokens consumed
        self.position_offset: torch.Tensor | None = None  # (b,) added to every position (training recipe)
        self.fam_kv_fresh: torch.Tensor | None = None  # (b,) FAM slots hold the keys of fam_state for this block
        # (b, hidden) normed final hidden state of each row's last real token: it predicts the stream's next token, so
        # a stream scored in several calls (stream_log_likelihood) scores the first token of every call. It stays on
        # the device of the final hidden states (the head's), not the counters'.
        self.last_hidden_state: torch.Tensor | None = None
        self.seen_columns = 0

    @classmethod
    def from_config(cls, config) -> FamCache:
        return cls(
            block_size=config.block_size,
            memory_segments=config.memory_segments,
            fam_length=config.fam_length,
            num_hidden_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
        )

    @staticmethod
    def bytes_per_stream(config, element_size: int = 4) -> int:
        """Bytes a full cache of a model with `config` (a `FamConfig`) holds per stream (batch row), with tensors of
        `element_size` bytes: in every layer, keys and values of F FAM slots and (M+1)*B window slots, and the FAM
        state (F, hidden). Counters (a few integers per row) are left out."""
        text = config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        slots = config.fam_length + (config.memory_segments + 1) * config.block_size
        per_layer = 2 * slots * kv_heads * head_dim + config.fam_length * config.hidden_size
        return per_layer * config.num_hidden_layers * element_size

    # ----------------------------------------------------------------------------------------- identity checks
    def settings(self) -> dict[str, int]:
        return {
            "block_size": self.block_size,
            "memory_segments": self.memory_segments,
            "fam_length": self.fam_length,
            "num_hidden_layers": len(self.layers),
            "hidden_size": self.hidden_size,
        }

    def check_compatible(self, config, batch_size: int) -> None:
        """Raise a `ValueError` if this cache was built for another model or another batch."""
        expected = FamCache.from_config(config).settings()
        if self.settings() != expected:
            differ = {k: (v, expected[k]) for k, v in self.settings().items() if v != expected[k]}
            raise ValueError(
                "This FamCache was built for another FAM configuration: "
                + ", ".join(f"{k}={have} in the cache but {want} in the model" for k, (have, want) in differ.items())
                + ". Start a new stream with a fresh cache (cache=None, or model.new_cache())."
            )
        if self.token_count is not None and self.batch_size != batch_size:
            expanded = ""
            if batch_size % self.batch_size == 0:
                expanded = (
                    " If generate() expanded the batch (num_beams or num_return_sequences > 1) while continuing this "
                    f"stream, expand the cache to match first: cache.batch_repeat_interleave({batch_size // self.batch_size})."
                )
            raise ValueError(
                f"This FamCache holds {self.batch_size} stream(s) but the input has batch size {batch_size}. "
                "Each row of a batch is its own stream: keep the batch size fixed for the life of a cache." + expanded
            )

    # ------------------------------------------------------------------------------------------- stream state
    @property
    def is_started(self) -> bool:
        return self.token_count is not None

    @property
    def batch_size(self) -> int:
        return -1 if self.token_count is None else self.token_count.shape[0]

    def start(self, batch_size: int, device: torch.device, position_offset: torch.Tensor | None = None) -> None:
        self.token_count = torch.zeros(batch_size, dtype=torch.long, device=device)
        if position_offset is None:
            position_offset = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.position_offset = position_offset.to(device=device, dtype=torch.long).expand(batch_size).clone()
        self.fam_kv_fresh = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.last_hidden_state = None
        self.seen_columns = 0

    def without_history(self) -> FamCache:
        """Let the next call, or `generate`, take only the new tokens of the stream: `get_seq_length()` counts columns
        from here on, so `generate` slices nothing off its `input_ids` (by transformers' convention they would hold
        the whole history). The stream itself goes on: positions, blocks, the window and the FAM state continue.
        Returns the cache, e.g. `model.generate(new_ids, cache=cache.without_history())`."""
        self.seen_columns = 0
        return self

    def place(self, device: torch.device | str, layer_devices: list[torch.device] | None = None) -> FamCache:
        """Move the per-row counters to `device` (where the model's input is) and each layer's keys, values and FAM
        state to `layer_devices[l]` (the device decoder layer l computes on; `device` for every layer when None).
        Tensors already in place are not copied. Returns the cache."""
        device = torch.device(device)
        layer_devices = [device] * len(self.layers) if layer_devices is None else layer_devices
        if len(layer_devices) != len(self.layers):
            raise ValueError(f"layer_devices needs one device per layer ({len(self.layers)}), got {len(layer_devices)}")
        for name in _COUNTERS:
            tensor = getattr(self, name)
            if tensor is not None and tensor.device != device:
                setattr(self, name, tensor.to(device))
        for layer, layer_device in zip(self.layers, layer_devices):
            layer_device = torch.device(layer_device)
            for name, tensor in layer.tensors().items():
                if tensor.device != layer_device:
                    setattr(layer, name, tensor.to(layer_device))
            if layer.keys is not None and (not layer.is_initialized or getattr(layer, "device", None) != layer.keys.device):
                layer.store(layer.keys, layer.values)  # is_initialized, dtype and device follow the buffers
        return self

    def keep_last_hidden_state(self, hidden_states: torch.Tensor, real: torch.Tensor) -> None:
        """Keep, for each row with a real token among the (b, n) columns `real`, the normed final hidden state
        (b, n, hidden) `hidden_states` of its last one (detached); other rows keep theirs."""
        hidden_states = hidden_states.detach()
        real = real.to(hidden_states.device)
        last = real.shape[1] - 1 - real.flip(1).int().argmax(1)  # each row's last real column
        latest = hidden_states[torch.arange(real.shape[0], device=real.device), last]
        if self.last_hidden_state is None:
            self.last_hidden_state = latest
        else:
            self.last_hidden_state = torch.where(real.any(1)[:, None], latest, self.last_hidden_state.to(latest))

    def set_fam_state(self, fam_state: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> None:
        """Set S[l] for every layer (e.g. the initial state, or a state kept from an earlier stream)."""
        if len(fam_state) != len(self.layers):
            raise ValueError(f"fam_state needs one tensor per layer ({len(self.layers)}), got {len(fam_state)}")
        for layer, state in zip(self.layers, fam_state):
            layer.fam_state = state
        if self.fam_kv_fresh is not None:  # the FAM slots no longer hold the keys of the state
            self.fam_kv_fresh = torch.zeros_like(self.fam_kv_fresh)

    def fam_state(self) -> tuple[torch.Tensor, ...] | None:
        """S[l] of every layer, each (b, F, hidden_size), or None before the stream starts."""
        if self.layers[0].fam_state is None:
            return None
        return tuple(layer.fam_state for layer in self.layers)

    def window_start(self) -> torch.Tensor:
        """(b,) stream index of the token in window slot 0 of each row in its current block."""
        return (self.token_count // self.block_size - self.memory_segments).clamp(min=0) * self.block_size

    def token_writes(self, token_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, columns, slots) of the real tokens (token_index >= 0) of a segment, which lies in each row's current
        block: token i goes to slot F + i - window_start."""
        rows, cols = (token_index >= 0).nonzero(as_tuple=True)
        return rows, cols, self.fam_length + token_index[rows, cols] - self.window_start()[rows]

    def window_span(self, count_after: torch.Tensor) -> int:
        """Window slots a segment reads: every slot holding a token once each row has consumed `count_after` (b,)
        tokens in its current block (at least one, so that an all-padding first call has a key to attend to)."""
        return max(1, int((count_after - self.window_start()).max()))

    def slot_token_index(self, count_after: torch.Tensor, span: int) -> torch.Tensor:
        """(b, span) stream index of the token in window slots 0 .. span-1 of each row once `count_after` (b,) real
        tokens of its current block have been stored, -1 for slots not written yet."""
        token = self.window_start()[:, None] + torch.arange(span, device=count_after.device)
        return torch.where(token < count_after[:, None], token, -1)

    def sliding_rows(self, completed: torch.Tensor) -> torch.Tensor:
        """(b,) bool: the rows whose windows slide once the current segment is processed, those that complete a block
        k >= M (`completed` (b,)). Asked before `advance_counters` moves the counters past the segment."""
        return completed & (self.token_count // self.block_size >= self.memory_segments)

    def slide_windows(self, rows: torch.Tensor, layer_indices=None) -> None:
        """Slide the windows of the rows `rows` (b,) (see `sliding_rows`) by one block in every layer, or in the layers
        `layer_indices` (in place unless gradients are being recorded). Call only when some row slides."""
        layers = self.layers if layer_indices is None else [self.layers[i] for i in layer_indices]
        per_device = {}  # the rows, moved once to each device that holds layers
        for layer in layers:
            if layer.keys is None:
                continue
            if layer.keys.device not in per_device:
                per_device[layer.keys.device] = (rows.to(layer.keys.device), rows.nonzero().flatten().to(layer.keys.device))
            layer.slide(*per_device[layer.keys.device], self.block_size, in_place=not torch.is_grad_enabled())

    def advance_counters(self, real_tokens: torch.Tensor, columns: int, fam_recomputed: bool, completed: torch.Tensor) -> None:
        """Count a processed segment: real_tokens (b,) consumed, `columns` columns, blocks `completed` (b,). The
        windows are not touched (see `slide_windows`)."""
        self.token_count = self.token_count + real_tokens
        self.seen_columns += columns
        fresh = torch.ones_like(self.fam_kv_fresh) if fam_recomputed else self.fam_kv_fresh
        self.fam_kv_fresh = fresh & ~completed

    def advance(self, real_tokens: torch.Tensor, columns: int, fam_recomputed: bool, completed: torch.Tensor) -> None:
        """Account for a segment processed by every layer: real_tokens (b,) consumed, `columns` columns, blocks
        `completed` (b,). Rows that completed block k >= M slide their windows (in place unless gradients are being
        recorded)."""
        slide = self.sliding_rows(completed)
        if bool(slide.any()):  # once per segment, not per layer: a decoding step slides nothing
            self.slide_windows(slide)
        self.advance_counters(real_tokens, columns, fam_recomputed, completed)

    # ------------------------------------------------------------------------------------ transformers Cache API
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_columns

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.window_size

    def _apply_to_rows(self, fn) -> None:
        for name in _ROW_STATE:
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._apply_to_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._apply_to_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._apply_to_rows(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("A FamCache cannot be cropped: the FAM state has already absorbed the tokens.")

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.token_count = self.position_offset = self.fam_kv_fresh = self.last_hidden_state = None
        self.seen_columns = 0

    # ------------------------------------------------------------------------------------------ save / restore
    def save(self, path: str | os.PathLike) -> None:
        """Write the stream state to a safetensors file (written to a temporary file, then renamed)."""
        from safetensors.torch import save_file

        if not self.is_started:
            raise ValueError("Nothing to save: this FamCache has not been used by a forward pass yet.")
        tensors = {name: getattr(self, name) for name in _ROW_STATE if getattr(self, name) is not None}
        for idx, layer in enumerate(self.layers):
            for name, tensor in layer.tensors().items():
                tensors[f"layers.{idx}.{name}"] = tensor
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        metadata = {"format": _FORMAT, "settings": json.dumps(self.settings()), "seen_columns": str(self.seen_columns)}
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None, *, model=None) -> FamCache:
        """Read a stream state written by `save`.

        Args:
            device (*optional*): load everything onto this device.
            model (`FamForCausalLM`, *optional*): the model that continues the stream: load onto its devices instead
                (each layer's share onto the device that layer computes on, with accelerate's `device_map` too).
            Without either, the CPU; a model moves a cache to its devices at its next call anyway (one copy).
        """
        from safetensors import SafetensorError, safe_open

        if model is not None and device is not None:
            raise ValueError("Pass `model` (load onto the model's devices) or `device`, not both.")
        layer_devices = None
        if model is not None:
            device = model.input_device() if hasattr(model, "input_device") else model.device
            layer_devices = model.layer_devices(device) if hasattr(model, "layer_devices") else None
        device = torch.device("cpu" if device is None else device)
        try:
            handle = safe_open(os.fspath(path), framework="pt", device=str(device))
        except SafetensorError as error:
            raise ValueError(
                f"{path} is damaged or incomplete ({error}): not a whole file written by FamCache.save. Copy it again, "
                "or run the stream again and save its state anew."
            ) from error
        with handle as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT:
                older = metadata.get("format") == "hf_fam.FamCache"
                raise ValueError(
                    f"{path} was written by an older hf-fam with another slot layout; run the stream again to save it anew."
                    if older
                    else f"{path} is not a FamCache file written by FamCache.save"
                )
            cache = cls(**json.loads(metadata["settings"]))
            cache.seen_columns = int(metadata["seen_columns"])
            keys = f.keys()
            for name in _COUNTERS:
                setattr(cache, name, f.get_tensor(name))
            if "last_hidden_state" in keys:  # a file saved before hf-fam kept it has none
                cache.last_hidden_state = f.get_tensor("last_hidden_state")
            for key in keys:
                if key.startswith("layers."):
                    _, idx, name = key.split(".", 2)
                    layer = cache.layers[int(idx)]
                    setattr(layer, name, f.get_tensor(key))
        return cache.place(device, layer_devices)


# Per-row tensors of a FamCache (reordered and saved with the stream); the counters live on the input's device.
_COUNTERS = ("token_count", "position_offset", "fam_kv_fresh")
_ROW_STATE = (*_COUNTERS, "last_hidden_state")

__all__ = ["FamCache", "FamCacheLayer"]

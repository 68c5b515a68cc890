# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""TransformerFAM on top of a pretrained decoder (Hwang et al., "TransformerFAM: Feedback attention is working
memory", arXiv 2404.09173), implementing the rules of FAM_SPEC.md section 2.

The base model's embedding, decoder layers, final norm and head are reused as they are. Per block t and layer l,
the layer is called on the rows [S[l] ; X[l]_t] (FAM first, rule 2); the keys/values of the memory segments and of
earlier parts of the current block reach its attention through the layer's cache argument (`cache.update`), which every supported
attention module calls (rule 3); a mask built with transformers' mask interface (a 4D mask, or a flex BlockMask under
flex_attention) gives the attention pattern of rule 4; the layer's output on the FAM rows becomes S[l] when the block completes (rule 5); logits come from block
rows only (rule 6).

This file travels into converted checkpoints (``trust_remote_code=True``), so it imports nothing but ``torch``,
``transformers`` and its sibling files.
"""

from __future__ import annotations

import inspect
import sys
import threading
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property, partial

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import is_torch_greater_or_equal, logging

from .cache_fam import FamCache
from .configuration_fam import FamConfig


logger = logging.get_logger(__name__)

# flex_attention runs the same mask functions as a BlockMask (torch's kernel skips the blocks it masks out entirely).
SUPPORTED_ATTENTION = ("eager", "sdpa", "flex_attention")
# Rotary types whose frequencies depend on the current call's length: fixed once per model (rule 7).
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
# Marker token index of FAM rows in the per-row index tables below; padding is -1, tokens are >= 0; the FAM prompt's
# query rows (a new stream's S0, computed in its first segment's calls) are -3.
_FAM = -2
_PAD = -1
_PROMPT = -3
# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`; both spellings work here.
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# Keyword arguments of `forward` that go to the loss function (transformers' loss kwargs; the Trainer passes
# `num_items_in_batch` to normalise a loss over gradient accumulation).
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


# Why a family is refused: the `reason` of an `UnsupportedArchitectureError` is one of these (the README's table of
# families counts them).
REASON_ENCODER_DECODER = "encoder-decoder"
REASON_WRAPPER = "multimodal or composite wrapper"
REASON_NOT_CAUSAL = "not a causal decoder of the installed transformers"
REASON_NON_ATTENTION = "layers without attention (state-space, linear attention, convolution, ...)"
REASON_ATTENTION_PATTERN = "attention pattern hf-fam cannot express (chunked, indexed, compressed, ...)"
REASON_POSITIONS = "no rotary positions (learned absolute, ALiBi, or computed inside the layers)"
REASON_LAYOUT = "layout not recognised"
REASON_SELF_CHECK = "self-check failed"
# Layer kinds (`config.layer_types`) whose layers are attention layers that this file drives (rule 4).
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedArchitectureError(ValueError):
    """The model cannot be turned into a TransformerFAM model; `reason` is one of the `REASON_*` constants."""

    def __init__(self, message: str, reason: str = REASON_NOT_CAUSAL):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FamilyAdapter:
    """What hf-fam needs to know about a family beyond transformers' own extension points.

    The decoder is the causal LM's `base_model` (its `base_model_prefix`), the token embedding its
    `get_input_embeddings()`, the head its `get_output_embeddings()`. Attribute names are those of the decoder
    module; multipliers and caps name *configuration* attributes that the family's own forward applies outside the
    decoder layers (None: the family does not). The defaults are the Llama layout.
    """

    layers: str = "layers"
    norm: str = "norm"  # the final norm, applied to the last layer's output
    rotary_emb: str = "rotary_emb"
    embedding_multiplier: str | None = None  # inputs_embeds * config.<this>, in the decoder's forward
    embedding_norm: str | None = None  # a decoder module applied to the embeddings before the first layer
    logit_multiplier: str | None = None  # logits * config.<this>, in the causal LM's forward
    logit_divisor: str | None = None  # logits / config.<this>
    final_logit_softcapping: str | None = "final_logit_softcapping"  # tanh(logits / cap) * cap when set


_GRANITE = FamilyAdapter(embedding_multiplier="embedding_multiplier", logit_divisor="logits_scaling")
_COHERE = FamilyAdapter(logit_multiplier="logit_scale")
_FINAL_LAYERNORM = FamilyAdapter(norm="final_layernorm")
_GPT_LAYOUT = FamilyAdapter(layers="h", norm="ln_f")
# Only the families that differ from the Llama layout; each entry was read off the family's modeling file, and the
# conversion self-check (hf_fam.conversion) refuses any family whose forward does something no entry says.
FAMILY_ADAPTERS = {
    "codegen": _GPT_LAYOUT,
    "cohere": _COHERE,
    "cohere2": _COHERE,
    "cohere2_moe": _COHERE,
    "granite": _GRANITE,
    "granite_swa": _GRANITE,
    "granitemoe": _GRANITE,
    "granitemoe_swa": _GRANITE,
    "granitemoeshared": _GRANITE,
    "falcon": _GPT_LAYOUT,
    "gptj": _GPT_LAYOUT,
    "gpt_neox": FamilyAdapter(norm="final_layer_norm"),
    "gpt_neox_japanese": FamilyAdapter(norm="final_layer_norm"),
    "hyperclovax": FamilyAdapter(embedding_multiplier="embedding_multiplier", logit_multiplier="logits_scaling"),
    "minicpm3": FamilyAdapter(logit_divisor="logits_scaling"),  # it divides the hidden states before a bias-free head
    "modernbert-decoder": FamilyAdapter(norm="final_norm", embedding_norm="embeddings.norm"),
    "lfm2": FamilyAdapter(norm="embedding_norm"),  # its final norm, despite the name
    "nanochat": FamilyAdapter(embedding_norm="norm"),  # the same norm before the first layer and after the last
    "persimmon": _FINAL_LAYERNORM,
    "phi": _FINAL_LAYERNORM,
}


def _attribute(module, path: str):
    """`module.a.b` for path "a.b" (None when missing)."""
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def family_adapter(model_type: str) -> FamilyAdapter:
    return FAMILY_ADAPTERS.get(model_type, FamilyAdapter())


def causal_lm_families() -> list[str]:
    """Every model type with a causal-LM class in the installed transformers (its Auto registry)."""
    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check_supported_model_type(model_type: str | None) -> None:
    """Raise `UnsupportedArchitectureError` unless `model_type` has a causal-LM class in the installed transformers."""
    if model_type == "fam":
        raise UnsupportedArchitectureError(
            "This is already a TransformerFAM checkpoint (model_type 'fam'): load it with "
            "AutoModelForCausalLM.from_pretrained as it is, or convert its base model to use other FAM settings."
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedArchitectureError(
            f"model_type '{model_type}' has no causal-LM class in the installed transformers "
            "(AutoModelForCausalLM), so hf-fam cannot drive it."
        )


def check_supported_config(config, layout: bool = False) -> None:
    """Raise `UnsupportedArchitectureError` (with a `reason`) when `config` describes a family that cannot be run as
    TransformerFAM exactly, as far as the configuration tells (and with `layout`, a weightless model built from it:
    see `check_supported_layout`); the conversion self-check decides the rest."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"'{model_type}' is an encoder-decoder model; hf-fam converts decoder-only language models.",
            REASON_ENCODER_DECODER,
        )
    check_supported_model_type(model_type)
    sub_configs = sorted(getattr(config, "sub_configs", None) or {})
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if text_config is not config or sub_configs:
        raise UnsupportedArchitectureError(
            f"'{model_type}' is a multimodal or composite model (sub-configurations: {', '.join(sub_configs)}); hf-fam "
            "converts the text decoder alone: load and convert the checkpoint's language model instead.",
            REASON_WRAPPER,
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedArchitectureError(
            f"'{model_type}' with use_bidirectional_attention=True is not a causal decoder; hf-fam needs a causal one."
        )
    kinds = list(dict.fromkeys(_layer_types(config)))
    for kind in kinds:
        if kind in ATTENTION_LAYER_TYPES:
            continue
        if "attention" not in kind or "linear" in kind:
            raise UnsupportedArchitectureError(
                f"'{model_type}' has '{kind}' layers, which are not attention layers: FAM rows need every layer to "
                f"attend (layer types: {', '.join(kinds)}).",
                REASON_NON_ATTENTION,
            )
        raise UnsupportedArchitectureError(
            f"'{model_type}' has '{kind}' layers; hf-fam expresses full and sliding-window attention "
            f"({', '.join(ATTENTION_LAYER_TYPES)}), not this pattern.",
            REASON_ATTENTION_PATTERN,
        )
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", None) in ("absolute", "alibi"):
        kind = "ALiBi" if getattr(config, "alibi", False) or config.position_embedding_type == "alibi" else "learned absolute"
        raise UnsupportedArchitectureError(
            f"'{model_type}' uses {kind} positions: the FAM rows need positions that hf-fam sets (rotary).",
            REASON_POSITIONS,
        )
    if layout:
        check_supported_layout(config)


def check_supported_layout(config) -> None:
    """Raise `UnsupportedArchitectureError` when a model of `config` lacks what hf-fam drives (a rotary module,
    decoder layers, final norm, embedding, head), checked on a weightless copy built on the meta device (nothing
    is read or allocated). A configuration that transformers cannot build passes: loading it will fail anyway."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - not ours to judge; the real load reports it
        return
    _Layout(model)


def _positions_refusal(base_model, decoder, layers) -> UnsupportedArchitectureError:
    """The error for a decoder without a rotary module: learned position tables if it has any, else ALiBi-like."""
    token_embedding = base_model.get_input_embeddings()
    layer_modules = set(layers.modules()) if isinstance(layers, nn.Module) else set()
    tables = [
        name
        for name, module in decoder.named_modules()
        if isinstance(module, nn.Embedding) and module is not token_embedding and module not in layer_modules
    ]
    model_type = base_model.config.model_type
    if tables:
        what = f"learned absolute positions ({', '.join(tables)})"
    else:
        what = "positions computed inside its layers or attention (ALiBi, or rotary without a shared rotary module)"
    return UnsupportedArchitectureError(
        f"'{model_type}' has no rotary module that hf-fam can drive: it uses {what}. The FAM rows need positions that "
        "hf-fam sets (FAM_SPEC rule 2).",
        REASON_POSITIONS,
    )


class _Layout:
    """Where a loaded causal LM keeps what hf-fam drives (see `FamilyAdapter`)."""

    def __init__(self, base_model):
        config = base_model.config
        self.adapter = adapter = family_adapter(config.model_type)
        decoder = base_model.base_model
        head = base_model.get_output_embeddings()
        layers = _attribute(decoder, adapter.layers) if decoder is not base_model else None
        rotary = _attribute(decoder, adapter.rotary_emb) if decoder is not base_model else None
        if not isinstance(rotary, nn.Module):
            raise _positions_refusal(base_model, decoder, layers)
        norm = _attribute(decoder, adapter.norm)
        if adapter.embedding_norm is not None and not isinstance(_attribute(decoder, adapter.embedding_norm), nn.Module):
            norm = None
        embed = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
        missing = [
            what
            for what, found in (
                (f"decoder layers ('{adapter.layers}')", isinstance(layers, nn.ModuleList)),
                (f"final norm ('{adapter.norm}')", isinstance(norm, nn.Module)),
                ("token embedding", isinstance(embed, nn.Module)),
                ("causal-LM head", isinstance(head, nn.Module)),
            )
            if not found
        ]
        if missing:
            raise UnsupportedArchitectureError(
                f"{type(base_model).__name__} does not have the layout hf-fam expects for '{config.model_type}': no "
                f"{', '.join(missing)} on its decoder `{base_model.base_model_prefix}`. A family with another layout "
                "needs an entry in hf_fam.modeling_fam.FAMILY_ADAPTERS.",
                REASON_LAYOUT,
            )
        self.decoder, self.head, self.embed = decoder, head, embed
        self.embed_name = next(name for name, module in decoder.named_modules() if module is embed)

def _layer_types(config) -> list[str]:
    """The attention type of each decoder layer, as the base model's own forward decides it."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return list(layer_types)
    # mistral, mixtral, phi3: one window for every layer when `sliding_window` is set
    kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [kind] * config.num_hidden_layers


class FamPrompt(nn.Module):
    """The learnable FAM prompt P (rule 1): `weight` is (fam_length, hidden_size), in the output space of
    `embed_tokens`. With the gated update, `FamGate` is the other tensor TransformerFAM adds to the base model."""

    def __init__(self, fam_length: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(fam_length, hidden_size))

    def forward(self, batch_size: int) -> torch.Tensor:
        """(batch_size, fam_length, hidden_size) view of the prompt. Without grad mode, a view of the detached weight:
        a view of a parameter taken under no_grad still requires grad but has no gradient function, and torch's
        module tracker (FlopCounterMode, FSDP's memory tools) stops on such an output with an error."""
        weight = self.weight if torch.is_grad_enabled() else self.weight.detach()
        return weight.unsqueeze(0).expand(batch_size, -1, -1)

    def extra_repr(self) -> str:
        return f"fam_length={self.weight.shape[0]}, hidden_size={self.weight.shape[1]}"


class FamGate(nn.Module):
    """The per-layer gates g of the `"gated"` FAM update: `weight` is (num_hidden_layers,), and after a completed
    block S[l] <- S[l] + g[l] * (output - S[l]). Like the prompt, it lives outside the decoder layers."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_layers))

    def forward(self) -> torch.Tensor:
        """The gates of every layer, (num_hidden_layers,). Read through `forward` (not `.weight`) so that an offloaded
        gate is loaded by accelerate's hook."""
        return self.weight

    def extra_repr(self) -> str:
        return f"num_layers={self.weight.shape[0]}"


class _PendingInitialState:
    """A new stream's S0[1:] still to compute (S0[0], the FAM prompt, is in layer 0's state already). Either the
    first segment's layer calls compute them, layer l's call giving S0[l+1] (`_plan_segment` says when; `add` takes
    each), or the FAM prompt's own pass does (`states`, the rest of `_initial_states`: all at once with `compute`, or
    layer by layer with `run_layer` in a layer-major pass). `keep`, if not None, is handed all L states once they are
    known (`reuse_initial_state`)."""

    def __init__(self, states, first: torch.Tensor, keep, layers: int):
        self.states, self.keep, self.layers = states, keep, layers
        self.given = [first]
        self._kept_when_complete()

    def _kept_when_complete(self) -> None:
        if self.keep is not None and len(self.given) == self.layers:
            self.keep(self.given)

    def add(self, layer_idx: int, state: torch.Tensor, cache) -> None:
        """S0[layer_idx + 1], computed by layer `layer_idx`: set in the cache."""
        cache.layers[layer_idx + 1].fam_state = state
        if self.keep is not None:
            self.given.append(state)
            self._kept_when_complete()

    def run_layer(self, layer_idx: int, cache, track=None) -> None:
        """S0[layer_idx + 1] from the FAM prompt's own pass (layer `layer_idx` run on S0[layer_idx], its input through
        `track` first, if given)."""
        self.add(layer_idx, self.states.send(track), cache)

    def compute(self, cache) -> None:
        """Every S0[l] from the FAM prompt's own pass, set in the cache."""
        for layer_idx in range(self.layers - 1):
            self.run_layer(layer_idx, cache)


@dataclass
class _Segment:
    """What every layer call of one segment (input columns in which no row crosses a block boundary) shares, built
    once by `FamForCausalLM._plan_segment` on the control device (where the input and the cache's counters live).

    Per-row tensors (b = batch): `completes` (b,) whether the row's current block ends with this segment;
    `real_tokens` (b,) the row's tokens in the segment; `writes` where their keys go in the cache (the same slots in
    every layer); `all_complete` whether every row's block ends with it. `fam_rows`: whether the F FAM rows join the
    call; attention reads the F FAM slots and the first `span` window slots of the cache; the FAM queries see only
    the FAM keys and the keys from slot `fam_key_start` on (their current block; 0 when that is every key).
    `initial_state`: on a new stream's first segment, the `_PendingInitialState` its calls compute, the call's first
    F rows being the FAM prompt's (seeing the F FAM keys only), and `prompt_rows` (0 or F) how many rows the call
    has for them before the FAM rows (0: the FAM rows are the prompt's, their update being unused). `masks`
    per sliding window (None: full attention), `position_embeddings` per layer type, `routed_rows` the rows a
    mixture-of-experts load-balancing loss counts. `on(device)` gives what a layer call uses, on that layer's device.
    """

    completes: torch.Tensor
    all_complete: bool
    real_tokens: torch.Tensor
    fam_rows: bool
    span: int
    fam_key_start: int
    writes: tuple
    position_ids: torch.Tensor
    masks: dict
    position_embeddings: dict
    routed_rows: torch.Tensor
    initial_state: _PendingInitialState | None = None
    prompt_rows: int = 0
    per_device: dict = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> _SegmentOnDevice:
        """What a layer call on `device` uses (masks, positions, rotary embeddings, cache writes, `completes`), moved
        there once per device and segment, however many layers live on that device."""
        if device not in self.per_device:
            self.per_device[device] = _SegmentOnDevice(
                masks=_to_device(self.masks, device),
                position_embeddings=_to_device(self.position_embeddings, device),
                position_ids=self.position_ids.to(device),
                writes=_to_device(self.writes, device),
                completes=self.completes.to(device),
                all_complete=self.all_complete,
                routed_rows=_to_device(self.routed_rows, device),
                span=self.span,
                fam_key_start=self.fam_key_start,
                fam_rows=self.fam_rows,
                initial_state=self.initial_state,
                prompt_rows=self.prompt_rows,
            )
        return self.per_device[device]


@dataclass
class _SegmentOnDevice:
    """The tensors of a `_Segment` that a layer call reads, on that layer's device."""

    masks: dict
    position_embeddings: dict
    position_ids: torch.Tensor
    writes: tuple
    completes: torch.Tensor
    all_complete: bool
    routed_rows: torch.Tensor | None
    span: int
    fam_key_start: int
    fam_rows: bool
    initial_state: _PendingInitialState | None
    prompt_rows: int


def _to_device(value, device):
    """`value` (a tensor, or a tuple/list/dict of them) on `device`; tensors already there are returned as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if _is_block_mask(value):  # flex_attention's mask: its tensors move together
        return value if value.kv_num_blocks.device == torch.device(device) else value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(item, device) for item in value)
    return value


def _is_block_mask(value) -> bool:
    """Whether `value` is torch's flex-attention `BlockMask` (what transformers' flex_attention mask interface builds)."""
    flex = sys.modules.get("torch.nn.attention.flex_attention")
    return flex is not None and isinstance(value, flex.BlockMask)


def _segment_bounds(real: torch.Tensor, token_count: torch.Tensor, block_size: int) -> list[int]:
    """Column bounds of the segments of an input (real (b, n): real tokens; token_count (b,): tokens each row's stream
    consumed before): a segment ends after every column where some row completes a block, so no row crosses a block
    boundary inside one."""
    token_index = token_count[:, None] + real.cumsum(1) - 1
    ends_block = real & ((token_index + 1) % block_size == 0)
    cuts = (ends_block.any(0).nonzero().flatten() + 1).tolist()
    return sorted({0, real.shape[1], *cuts})


class _BlockAlignedLayout:
    """The rows of an input moved so that their block boundaries fall on the same columns.

    Where the rows of a batch are at different phases of their blocks (uneven left padding, or streams at different
    token counts), cutting a segment wherever *some* row completes a block multiplies the segments, and every row
    carries FAM rows in each of them. Placing each row's k-th real token at column (token_count % B) + k puts every
    row's block ends on the columns c with (c + 1) % B == 0 and moves the padding to the ends. Each row is its own
    stream (its positions, blocks and keys follow its own token count), so no row's result changes, only the
    number of segments and columns the batch needs. Padding columns of the outputs hold zeros.
    """

    def __init__(self, real, bounds, rows, columns, aligned_columns):
        self.real, self.bounds = real, bounds
        self.rows, self.columns, self.aligned_columns = rows, columns, aligned_columns

    @classmethod
    def plan(cls, real: torch.Tensor, token_count: torch.Tensor, block_size: int, fam_length: int, segments: int):
        """The aligned layout of `real` (b, n), or None when it would not be cheaper than the input as it is
        (`segments` segments). Cost: the rows each layer runs, columns + F per segment (FAM rows), then the number of
        segments. A fresh left-padded batch always gains (no wider, fewer segments); rows of continued streams at
        different phases may need up to B - 1 more columns, which can cost more than the FAM rows they save.
        Decoding steps and batches whose rows are in step keep their layout."""
        batch, width = real.shape
        if width == 1 or segments == 1 or block_size == 1:
            return None
        counts = real.sum(1)
        phase = token_count % block_size
        aligned_width = int((phase + counts).max())
        if aligned_width == 0:  # padding only
            return None
        rows, columns = real.nonzero(as_tuple=True)
        aligned_columns = phase[rows] + real.cumsum(1)[rows, columns] - 1
        aligned = torch.zeros(batch, aligned_width, dtype=torch.bool, device=real.device)
        aligned[rows, aligned_columns] = True
        bounds = _segment_bounds(aligned, token_count, block_size)
        aligned_cost = (aligned_width + fam_length * (len(bounds) - 1), len(bounds) - 1)
        if aligned_cost >= (width + fam_length * segments, segments):
            return None
        return cls(aligned, bounds, rows, columns, aligned_columns)

    def gather(self, inputs: torch.Tensor) -> torch.Tensor:
        """(b, n, ...) in the input's layout -> (b, n', ...) in the aligned one."""
        aligned = inputs.new_zeros(inputs.shape[0], self.real.shape[1], *inputs.shape[2:])
        aligned[self.rows, self.aligned_columns] = inputs[self.rows, self.columns]
        return aligned

    def scatter(self, aligned: torch.Tensor, width: int) -> torch.Tensor:
        """(b, n', ...) in the aligned layout -> (b, `width`, ...) in the input's, zeros on padding."""
        rows, columns, aligned_columns = (t.to(aligned.device) for t in (self.rows, self.columns, self.aligned_columns))
        result = aligned.new_zeros(aligned.shape[0], width, *aligned.shape[2:])
        result[rows, columns] = aligned[rows, aligned_columns]
        return result


def _execution_device(module: nn.Module, fallback: torch.device) -> torch.device:
    """The device `module` computes on: the execution device of its accelerate hook when it has one (its weights may
    sit on `meta`, offloaded to CPU or disk), else the device of its parameters, else `fallback`."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(one, "execution_device", None)
        if device is not None:
            return torch.device(device)
    for parameter in module.parameters():
        return parameter.device
    return fallback


def _offload_hooks(module: nn.Module) -> list:
    """(submodule, hook) for each accelerate hook in `module` that loads its weights for every call and drops them
    after it (`AlignDevicesHook` with `offload=True`: CPU or disk offload through `device_map`)."""
    found = []
    for submodule in module.modules():
        hook = getattr(submodule, "_hf_hook", None)
        for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if getattr(one, "offload", False) is True and hasattr(one, "pre_forward"):
                found.append((submodule, one))
    return found


def _is_fully_sharded(module: nn.Module) -> bool:
    """Whether `module` is sharded by torch FSDP2's `fully_shard` (its parameters all-gathered for every call)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    return fsdp_module is not None and isinstance(module, fsdp_module)


def _gathered_per_call(layer: nn.Module) -> bool:
    """Whether a call of `layer` gathers (FSDP2, DeepSpeed ZeRO-3) or loads (accelerate offload) its weights first."""
    return _is_fully_sharded(layer) or _is_zero3_partitioned(layer) or bool(_offload_hooks(layer))


def _is_zero3_partitioned(layer: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions `layer`'s parameters (it gives each one a `ds_id`). Nothing more is needed
    for them: ZeRO-3 keeps a parameter gathered when it is used again within `stage3_max_reuse_distance` elements,
    which the layer-major order makes one layer's worth (measured in tests/zero3_worker.py)."""
    return any(hasattr(parameter, "ds_id") for parameter in layer.parameters(recurse=True))


def _reshards_after_forward(module: nn.Module) -> bool:
    # What `FSDPModule.set_reshard_after_forward` sets; torch has no public getter for it.
    groups = getattr(module._get_fsdp_state(), "_fsdp_param_groups", None)
    return True if groups is None else any(group.post_forward_mesh_info is not None for group in groups)


@contextmanager
def _weights_kept(layer: nn.Module):
    """Keep a sharded or offloaded layer's weights gathered / loaded across the consecutive calls made inside, then
    release them as one call would: one all-gather (FSDP2) or one load (accelerate offload) for all the calls.
    Any other layer is left as it is. Yields the `_ShardedBackward` that the calls' inputs go through when an FSDP2
    layer with trainable weights runs with gradients (its backward then gathers once too), else None."""
    hooks = _offload_hooks(layer)
    sharded = _is_fully_sharded(layer)
    if not hooks and not sharded:
        yield None
        return
    for module, hook in hooks:
        hook.pre_forward(module)  # loads the weights onto the execution device
        hook.offload = False  # the calls inside then only move their inputs
    backward = None
    if sharded:
        reshards = _reshards_after_forward(layer)
        layer.unshard()
        layer.set_reshard_after_forward(False, recurse=False)
        if (
            torch.is_grad_enabled()
            and any(parameter.requires_grad for parameter in layer.parameters())
            and _ShardedBackward.supported(layer)
        ):
            backward = _ShardedBackward(layer)
    try:
        yield backward
    finally:
        if sharded:
            layer.set_reshard_after_forward(reshards, recurse=False)
            layer.reshard()
        for module, hook in hooks:
            hook.offload = True
            hook.post_forward(module, None)  # back to `meta`


class _ShardedBackward:
    """The backward half of `_weights_kept` for an FSDP2 layer: torch gathers a `fully_shard` layer's weights again
    before the backward of each of its calls and reduce-scatters its gradients after it, so a layer-major pass whose
    layer made n calls would gather and reduce n times in the backward too. While the calls' backward runs, the layer
    keeps its weights gathered and accumulates its gradients unreduced (`set_reshard_after_backward(False)`,
    `set_requires_gradient_sync(False)`); after the backward of the last of them, the layer's own settings come back
    and FSDP2's post-backward runs once: one reduce-scatter and one reshard, as for a single call.

    Every call's input goes through `track` (outside any activation checkpoint), whose backward runs after the call's
    whole backward, FSDP2's own post-backward included. The settings to come back to are kept per layer while any
    pass's backward is pending (several groups of one pass, or passes whose losses are summed), so they are read once.
    """

    # What FSDP2 keeps per parameter group and reads in its post-backward (as of torch 2.13; no public getter)
    _GROUP_SETTINGS = ("reduce_grads", "all_reduce_grads", "reshard_after_backward", "post_backward")

    @classmethod
    def supported(cls, layer: nn.Module) -> bool:
        """Whether this torch's FSDP2 has the internals used here; where not, the backward gathers once per call."""
        groups = getattr(getattr(layer, "_get_fsdp_state", lambda: None)(), "_fsdp_param_groups", None)
        return bool(groups) and all(hasattr(group, name) for group in groups for name in cls._GROUP_SETTINGS)

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.pending = 0
        self.queued = self.done = False
        record = _SHARDED_BACKWARDS.get(layer)
        if record is None:  # else a backward is pending (or a graph was dropped): its settings are the layer's own
            groups = layer._get_fsdp_state()._fsdp_param_groups
            record = _SHARDED_BACKWARDS[layer] = _ShardedBackwardRecord(
                [(group.reduce_grads, group.all_reduce_grads, group.reshard_after_backward) for group in groups]
            )
        record.open.add(self)
        self._hold(layer)

    @staticmethod
    def _hold(layer: nn.Module) -> None:
        layer.set_reshard_after_backward(False, recurse=False)
        layer.set_requires_gradient_sync(False, recurse=False)

    def track(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` as the input of one call of the layer, counted. An input without a gradient path gets one (a leaf
        of its own), so that the call's backward runs and is counted; it costs the layer's input gradient."""
        if not rows.requires_grad:
            rows = rows.detach().requires_grad_()
        self.pending += 1
        return _AfterCallBackward.apply(self, rows)

    def call_backward_done(self) -> None:
        if not self.queued:  # a call whose output the loss does not reach never runs its backward: then at the end
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
        self.pending -= 1
        if self.pending == 0:  # the last of the calls: nothing else reads the gathered weights
            self.finish()

    def finish(self) -> None:
        """The layer's own settings back, then FSDP2's post-backward once (reduce-scatter, reshard)."""
        if self.done:
            return
        self.done = True
        record = _SHARDED_BACKWARDS[self.layer]
        record.open.discard(self)
        groups = self.layer._get_fsdp_state()._fsdp_param_groups
        for group, (reduce_grads, all_reduce_grads, reshard_after_backward) in zip(groups, record.settings):
            group.reduce_grads, group.all_reduce_grads = reduce_grads, all_reduce_grads
            group.reshard_after_backward = reshard_after_backward
            group.post_backward()
        if record.open:
            self._hold(self.layer)
        else:
            del _SHARDED_BACKWARDS[self.layer]


@dataclass
class _ShardedBackwardRecord:
    settings: list  # (reduce_grads, all_reduce_grads, reshard_after_backward) per FSDP2 parameter group
    open: "weakref.WeakSet" = field(default_factory=lambda: weakref.WeakSet())


_SHARDED_BACKWARDS: "weakref.WeakKeyDictionary[nn.Module, _ShardedBackwardRecord]" = weakref.WeakKeyDictionary()


class _AfterCallBackward(torch.autograd.Function):
    """Identity on a layer call's input; its backward tells the call's `_ShardedBackward` that the call's backward
    is over."""

    @staticmethod
    def forward(ctx, keeper: _ShardedBackward, rows: torch.Tensor) -> torch.Tensor:
        ctx.keeper = keeper
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.keeper.call_backward_done()
        return None, grad


class _BlockKeyValues:
    """Stands in for the cache during one decoder-layer call on one block segment.

    The attention module hands it the keys/values of the rows it was called on ([FAM rows ;] segment rows); it stores
    them in the layer's buffers (FAM slots, then the segment's tokens in their window slots) and returns the first
    F + `span` slots: the FAM rows and every stored token still in reach, in the layout the segment's mask describes.
    It starts from the buffers the layer had when it was created, so a recompute under gradient checkpointing sees
    exactly the keys of the first pass.
    """

    def __init__(self, layer_cache, source, segment: _SegmentOnDevice, fam_length: int, in_place: bool):
        self.layer_cache = layer_cache
        self.source = source
        self.segment = segment
        self.fam_length = fam_length
        self.in_place = in_place
        self.keys = self.values = None

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        # the FAM prompt's rows, if any, come first: their keys are the FAM rows' (the same rows and positions)
        p = self.segment.prompt_rows
        key_states, value_states = key_states[:, :, p:], value_states[:, :, p:]
        f = self.fam_length if self.segment.fam_rows else 0
        fam_kv = (key_states[:, :, :f], value_states[:, :, :f]) if f else None
        block_kv = (key_states[:, :, f:], value_states[:, :, f:])
        self.keys, self.values = self.layer_cache.written(self.source, fam_kv, block_kv, self.segment.writes, self.in_place)
        visible = self.fam_length + self.segment.span
        return self.keys[:, :, :visible], self.values[:, :, :visible]


class FamPreTrainedModel(PreTrainedModel):
    config_class = FamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = True
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    _is_stateful = True
    # The Llama layout's tied keys; a converted model sets its own from its family's layout (see FamForCausalLM).
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, FamPrompt):
            self._init_fam_prompt(module)
        elif isinstance(module, FamGate):
            init.constant_(module.weight, float(self.config.fam_gate_init))
        else:
            super()._init_weights(module)

    def _init_fam_prompt(self, module: FamPrompt) -> None:
        config = self.config
        fam_length, hidden_size = module.weight.shape
        if fam_length == 0:
            return
        generator = torch.Generator().manual_seed(config.fam_prompt_seed)
        if config.fam_prompt_init == "normal":
            std = getattr(config, "initializer_range", 0.02)
            values = torch.randn(fam_length, hidden_size, generator=generator) * std
            init.copy_(module.weight, values.to(module.weight.dtype))
            return
        if config.fam_prompt_init == "token_ids":
            ids = torch.tensor(config.fam_prompt_token_ids, dtype=torch.long)
        else:  # random_tokens
            ids = torch.randint(0, config.vocab_size, (fam_length,), generator=generator)
        device = self.get_input_embeddings().weight.device
        # Rule 1: the prompt lives after any embedding scaling, so it is the embedding of ids as the base model's
        # forward makes it (embed_tokens, then the family's multiplier or norm), not raw rows.
        init.copy_(module.weight, self.embed(ids.to(device)).to(module.weight.dtype))


def _rows_share_offset(position_offset: torch.Tensor | None) -> bool:
    """Whether every row of a new stream starts at the same position offset (so all start from the same S0)."""
    return position_offset is None or bool((position_offset == position_offset[0]).all())


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast
        return False


class FamForCausalLM(FamPreTrainedModel, GenerationMixin):
    """A pretrained causal LM run as TransformerFAM: block sliding window attention plus feedback attention memory.

    State-dict keys are the base model's own (`model.*`, `lm_head.weight`) plus `fam_prompt.weight` and, with the gated
    update, `fam_gate.weight`.

    Args:
        config ([`FamConfig`]): FAM settings and the base configuration.
        base_model (`PreTrainedModel`, *optional*): a loaded causal LM of `config.text_config`'s family whose
            modules are reused (shared, not copied). Without it, a base model is built from the configuration.
    """

    def __init__(self, config: FamConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        check_supported_config(config.text_config)
        if base_model is None:
            base_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            # The base weights are loaded already: post_init must initialise the FAM prompt and nothing else.
            for module in base_model.modules():
                module._is_hf_initialized = True
        layout = _Layout(base_model)
        self._adapter = layout.adapter
        self.model = layout.decoder
        self.lm_head = layout.head
        if getattr(config.text_config, "tie_word_embeddings", False):
            # the base family ties its head to its token embedding, wherever its layout keeps them
            self._tied_weights_keys = {"lm_head.weight": f"model.{layout.embed_name}.weight"}
        # The layers read their attention implementation from this object: make it the one FamConfig holds.
        config.text_config = self.model.config
        self.fam_prompt = FamPrompt(config.fam_length, config.hidden_size)
        self.fam_gate = FamGate(config.num_hidden_layers) if config.fam_update == "gated" else None
        for layer in self.decoder_layers:
            # Memory keys/values enter attention through the layer's cache argument. In training our stand-in writes to
            # copies of the buffers it started from, never to those, so a layer that checkpoints itself (when something
            # other than this model turns that on) may keep it: the recompute sees exactly the keys of the first pass.
            layer._can_checkpoint_with_cache = True
        # Which decoder layers this model checkpoints itself (see _set_gradient_checkpointing).
        self._checkpointed_layers = [False] * len(self.decoder_layers)
        # Mixture-of-experts families: what the base causal LM's forward needs for its router load-balancing loss.
        self._router = _router_settings(base_model, self.model)
        self._router_recording = None
        # S0 kept between calls inside `reuse_initial_state()`: None outside it, else {(offset, attention): entry}.
        self._reused_initial_states = None
        _register_peft_targets(config.text_config.model_type)
        self.post_init()

    # ------------------------------------------------------------------------------------------- accessors
    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The base model's decoder layers, wherever its family keeps them."""
        return _attribute(self.model, self._adapter.layers)

    @property
    def final_norm(self) -> nn.Module:
        return _attribute(self.model, self._adapter.norm)

    @property
    def rotary_emb(self) -> nn.Module:
        return _attribute(self.model, self._adapter.rotary_emb)

    def embed(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """What the base decoder's forward feeds its first layer for these tokens: the token embedding (or the
        given `inputs_embeds`) with whatever the family applies before the layers (multiplier, norm). The FAM
        prompt lives in this space (rule 1)."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        adapter = self._adapter
        if adapter.embedding_multiplier is not None:
            inputs_embeds = inputs_embeds * getattr(self.config.text_config, adapter.embedding_multiplier)
        if adapter.embedding_norm is not None:
            inputs_embeds = _attribute(self.model, adapter.embedding_norm)(inputs_embeds)
        return inputs_embeds

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    @property
    def layer_types(self) -> list[str]:
        return _layer_types(self.config.text_config)

    def new_cache(self) -> FamCache:
        """An empty stream cache for this model (a `transformers` `Cache`)."""
        return FamCache.from_config(self.config)

    # Length-dependent rotary types: pick frequencies per call as the base model does (the conversion self-check) instead
    # of fixing them once (rule 7).
    _length_dependent_rotary_per_call = False

    # The model checkpoints its own layer calls (set by `activation_checkpointing_enable`, like any model's flag).
    gradient_checkpointing = False

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, every_n_layers: int = 1):
        """Checkpoint the decoder-layer calls of the block loop instead of letting each layer checkpoint itself.

        A layer call reads the memory keys/values through its cache argument, and reentrant checkpointing
        (`use_reentrant=True`, torch's default for `checkpoint`) carries gradients only through the positional
        inputs of the checkpointed function: the layer's own wrapper would treat the memory as constants. Here the
        checkpointed function takes the FAM and block rows *and* the key/value buffers it reads as positional
        inputs and returns the new buffers, so every checkpointing mode gives the gradients of none.
        """
        if gradient_checkpointing_func is None:
            from torch.utils.checkpoint import checkpoint as gradient_checkpointing_func
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        # The base class chose which layers to checkpoint (every_n_layers); keep that choice and do it here.
        self._checkpointed_layers = [bool(layer.gradient_checkpointing) for layer in self.decoder_layers]
        for layer in self.decoder_layers:
            layer.gradient_checkpointing = False

    # -------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        fam_position_offset: int | torch.Tensor | None = None,
        fam_state: tuple[torch.Tensor, ...] | None = None,
        past_key_values: Cache | None = None,
        **loss_kwargs,
    ) -> CausalLMOutputWithPast | MoeCausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, n)`): token ids; or pass `inputs_embeds`.
            attention_mask (`torch.Tensor` of shape `(batch, past + n)` or `(batch, n)`): 1 for real tokens, 0 for
                padding. Padding is never a key and does not count as a token of the stream.
            position_ids: ignored. Positions follow each row's count of real tokens (spec section 2), so padding and
                chunking never move a block boundary.
            cache ([`FamCache`], *optional*): the stream state to continue. An empty `DynamicCache` (what
                `generate()` makes by default) is replaced by a `FamCache`. `past_key_values`, its name before
                transformers 5.24, is accepted too.
            labels (`torch.LongTensor` of shape `(batch, n)`): causal-LM targets, -100 to ignore.
            use_cache (`bool`): return the `FamCache` to continue the stream.
            logits_to_keep (`int` or `torch.Tensor`): as in the base model's causal-LM head.
            output_hidden_states (`bool`): return the hidden states of the block rows after the embedding and after
                every layer (the last one normed). Padding columns hold no meaningful values (zeros when the batch
                ran block-aligned).
            output_attentions (`bool`): not supported (attention is computed block by block with FAM rows); True is
                refused.
            output_router_logits (`bool`): mixture-of-experts families: return the router logits of every routed row
                (block and FAM rows, padding left out) and add the base model's load-balancing loss, times its
                `router_aux_loss_coef`, to the loss. Defaults to the base configuration's `output_router_logits`.
            return_dict (`bool`): False returns a tuple, as transformers models do.
            fam_position_offset (`int` or `torch.LongTensor` of shape `(batch,)`): added to every position of a new
                stream (the training recipe's random position offset). Only read when the stream starts.
            fam_state (`tuple` of `torch.Tensor`, one `(batch, F, hidden)` per layer): the FAM state a new stream
                starts from instead of S0, e.g. the final state of an earlier stream (`cache.fam_state()`, the
                training recipe's random state passing). Only read when the stream starts. It is detached: no
                gradient flows back into the stream it came from.
            loss_kwargs: `num_items_in_batch` (what the Trainer passes to normalise over gradient accumulation),
                `ignore_index`, `shift_labels`: passed to the loss function.
        """
        unknown = sorted(set(loss_kwargs) - set(_LOSS_KWARGS))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.forward() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}. "
                "It takes the usual causal-LM arguments plus fam_position_offset and fam_state; packed-sequence "
                "arguments (cu_seq_lens_*, seq_idx) are not supported: FAM packs documents without per-document masks."
            )
        if output_attentions:
            raise ValueError(
                "output_attentions=True is not supported by TransformerFAM: attention runs block by block over FAM "
                "rows, memory segments and the current block, so there is no (sequence x sequence) attention map."
            )
        if output_router_logits is None:
            output_router_logits = getattr(self.config.text_config, "output_router_logits", False)
        if output_router_logits and self._router is None:
            raise ValueError(
                f"output_router_logits=True needs a mixture-of-experts base model; '{self.config.text_config.model_type}' "
                "has no router."
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("Pass the stream state as `cache` or as `past_key_values`, not both.")
            cache = past_key_values
        use_cache = use_cache if use_cache is not None else getattr(self.config, "use_cache", True)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        with _recording_router_logits(self, output_router_logits) as recording:
            hidden_states, all_hidden, cache = self.final_hidden_states(
                input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                fam_position_offset=fam_position_offset,
                fam_state=fam_state,
                output_hidden_states=output_hidden_states,
            )
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.logits_from_hidden_states(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        fields = {
            "loss": loss,
            "logits": logits,
            "hidden_states": all_hidden if output_hidden_states else None,
            _OUTPUT_CACHE_FIELD: cache if use_cache else None,
        }
        if output_router_logits:
            router_logits = self._router.counted_rows(recording)
            aux_loss = self._router.load_balancing_loss(router_logits)
            if loss is not None:
                loss = fields["loss"] = loss + self._router.coefficient * aux_loss.to(loss.device)
            output = MoeCausalLMOutputWithPast(**fields, aux_loss=aux_loss, router_logits=tuple(router_logits))
        else:
            output = CausalLMOutputWithPast(**fields)
        return output if return_dict else output.to_tuple()

    def final_hidden_states(
        self,
        input_ids: torch.LongTensor | None = None,
        *,
        inputs_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        fam_position_offset: int | torch.Tensor | None = None,
        fam_state: tuple[torch.Tensor, ...] | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, FamCache]:
        """The decoder part of `forward`, without the head: for a caller that projects the hidden states itself (a
        slice at a time with `logits_from_hidden_states`, or not at all).

        Takes `forward`'s arguments of the same names. Returns the block rows' normed last hidden states
        (b, n, hidden), all hidden states if `output_hidden_states` (else None), and the `FamCache` holding the
        continued streams (the one passed, or a new one).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        self._check_attention_implementation()
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        else:
            inputs_embeds = self.embed(inputs_embeds=inputs_embeds)
        batch, columns = inputs_embeds.shape[:2]
        if columns == 0:
            consumed = cache.get_seq_length() if isinstance(cache, FamCache) and cache.is_started else 0
            if consumed:
                raise ValueError(
                    f"The input has no tokens (sequence length 0). The cache has consumed {consumed} column(s), and "
                    "generate() slices that many columns off input_ids, taking them for the whole history. To "
                    "continue the stream with only the new tokens, pass cache=cache.without_history() (or an "
                    "attention_mask covering the past and new columns); or pass the whole history as input_ids."
                )
            raise ValueError("The input has no tokens (sequence length 0).")
        with self._flex_compile_settings(inputs_embeds.device):
            # one column (a decoding step) is one segment, the same calls in either order: skip the per-layer checks
            layer_major = columns > 1 and self._runs_layer_major()
            # A new stream's S0[l+1] is computed by layer l, in the first segment's call or next to it (_plan_segment)
            cache, initial_states = self._stream_cache(cache, batch, inputs_embeds, fam_position_offset, fam_state)
            # Every layer's share of the cache on that layer's device, the counters on the input's (a no-op but for a
            # cache restored elsewhere or a model whose layers moved).
            cache.place(inputs_embeds.device, self.layer_devices(inputs_embeds.device))
            real = self._real_token_mask(attention_mask, batch, columns, inputs_embeds.device)
            hidden_states, all_hidden = self._run_blocks(
                inputs_embeds, real, cache, output_hidden_states, layer_major, initial_states
            )
        hidden_states = self.final_norm(hidden_states)
        cache.keep_last_hidden_state(hidden_states, real)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden_states,)
        return hidden_states, all_hidden, cache

    def logits_from_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The causal-LM head on normed last hidden states, with the family's final-logit soft-capping if it has one.

        Lets a caller project a long chunk's hidden states a slice at a time instead of holding (n, vocab) logits.
        """
        logits = self.lm_head(hidden_states)
        adapter, text_config = self._adapter, self.config.text_config
        if adapter.logit_multiplier is not None:
            logits = logits * getattr(text_config, adapter.logit_multiplier)
        if adapter.logit_divisor is not None:
            logits = logits / getattr(text_config, adapter.logit_divisor)
        softcap = getattr(text_config, adapter.final_logit_softcapping, None) if adapter.final_logit_softcapping else None
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def _check_attention_implementation(self) -> None:
        implementation = _user_implementation(self.model.config)
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attn_implementation='{implementation}' cannot be used with TransformerFAM, whose attention pattern "
                f"is a 4D mask or a flex BlockMask (flash kernels take neither). Use one of {SUPPORTED_ATTENTION}, e.g. "
                "model.set_attn_implementation('sdpa')."
            )
        if implementation == "flex_attention" and not getattr(type(self.model), "_supports_flex_attn", False):
            # transformers refuses this when the implementation is set; a configuration edited by hand gets here
            raise ValueError(
                f"attn_implementation='flex_attention' cannot be used with this model: its base family "
                f"'{self.config.text_config.model_type}' ({type(self.model).__name__}) does not support flex attention "
                "in transformers. Use 'eager' or 'sdpa', e.g. model.set_attn_implementation('sdpa')."
            )

    def _flex_compile_settings(self, device: torch.device):
        """flex_attention on CPU: compile torch's kernel for static shapes only.

        transformers compiles flex attention with torch.compile's default, which recompiles with dynamic shapes once a
        shape changes (here: every new segment length or window fill). torch 2.13's CPU flex kernel then can fail to
        compile the masks hf-fam builds (its generated C++ names a size variable `cur_kvSplitSize<digit>` that does
        not exist: the kernel renames its split-size symbols by plain string replacement, which also hits longer names
        that start with the same characters). With static shapes the kernel compiles and matches eager attention; each
        new shape costs a compilation, and past torch._dynamo's recompile limit torch runs flex attention unfused. On
        CPU, sdpa is the faster choice anyway. Other devices use torch's default."""
        if self.model.config._attn_implementation != "flex_attention" or torch.device(device).type != "cpu":
            return nullcontext()
        return torch._dynamo.config.patch(automatic_dynamic_shapes=False)

    def _stream_cache(self, given, batch, inputs_embeds, fam_position_offset, fam_state):
        """The `FamCache` of the streams this call continues (a new one if `given` is None or an empty DynamicCache),
        started if new, and, for a new stream, the initial state: S0 set in every layer when it is given (`fam_state`)
        or kept (`reuse_initial_state`), else set in layer 0 only, the other layers' returned as a
        `_PendingInitialState` for the pass to compute."""
        pending = None
        if given is None or (isinstance(given, DynamicCache) and given.get_seq_length() == 0):
            cache = self.new_cache()
        elif isinstance(given, FamCache):
            cache = given
        else:
            raise TypeError(
                f"The cache must be a FamCache (or None), got {type(given).__name__}. "
                "A FamForCausalLM keeps its stream state in a FamCache: pass the one a previous call returned."
            )
        cache.check_compatible(self.config, batch)
        if not cache.is_started:
            offset = None
            if fam_position_offset is not None:
                offset = torch.as_tensor(fam_position_offset, dtype=torch.long, device=inputs_embeds.device)
                if offset.ndim > 1 or (offset.ndim == 1 and offset.shape[0] not in (1, batch)):
                    raise ValueError(f"fam_position_offset must be an int or a (batch,) tensor, got shape {offset.shape}")
            cache.start(batch, inputs_embeds.device, offset)
            if fam_state is not None:
                self._check_fam_state(fam_state, batch)
                # The state enters this stream as data, with no gradient path back into the stream it came from
                # (random state passing hands in the previous training step's state, whose graph is gone).
                cache.set_fam_state(tuple(state.detach().to(inputs_embeds.dtype) for state in fam_state))
            elif self.config.fam_length > 0 and cache.fam_state() is None:
                slot = self._initial_state_slot(cache.position_offset)
                kept = None if slot is None else self._reused_initial_states.get(slot[0])
                if kept is not None and kept[0] == slot[1]:
                    cache.set_fam_state(tuple(state.expand(batch, -1, -1) for state in kept[1]))
                else:
                    states = self._initial_states(batch, cache.position_offset)
                    cache.layers[0].fam_state = next(states)
                    keep = None if slot is None else partial(self._keep_initial_states, slot)
                    pending = _PendingInitialState(states, cache.layers[0].fam_state, keep, len(self.decoder_layers))
        return cache, pending

    def _check_fam_state(self, fam_state, batch) -> None:
        expected = (batch, self.config.fam_length, self.config.hidden_size)
        if len(fam_state) != self.config.num_hidden_layers or any(tuple(s.shape) != expected for s in fam_state):
            shapes = sorted({tuple(s.shape) for s in fam_state})
            raise ValueError(
                f"fam_state must hold one {expected} tensor per layer ({self.config.num_hidden_layers}), got "
                f"{len(fam_state)} tensor(s) of shapes {shapes}."
            )

    @staticmethod
    def _real_token_mask(attention_mask, batch, columns, device) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(batch, columns, dtype=torch.bool, device=device)
        if attention_mask.ndim != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < columns:
            raise ValueError(
                "attention_mask must be 2D (batch, past + new columns) with 1 for tokens and 0 for padding, got shape "
                f"{tuple(attention_mask.shape)} for an input of shape ({batch}, {columns})."
            )
        return attention_mask[:, -columns:].to(device=device) != 0

    # ------------------------------------------------------------------------------------------ rule 1
    def initial_fam_state(self, batch_size: int, position_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """S0[l] for every layer l: the inputs of each layer when the FAM prompt alone runs through the decoder,
        with bidirectional attention among its F rows and positions -F .. -1 (+ offset). Each is (b, F, hidden)."""
        return tuple(self._initial_states(batch_size, position_offset))

    @contextmanager
    def reuse_initial_state(self):
        """Compute the initial FAM state S0 once and reuse it for every new stream started inside the block.

        S0 depends on the weights only (rule 1), yet every call that starts a stream computes it: the FAM prompt's
        F rows through the decoder, in the first block's layer calls or a pass of their own (`_plan_segment`). Where
        the first block completes, that is F/B more of its rows; for many streams (an evaluation over many
        examples, a server answering one prompt after another) a visible share of the cost. Inside this block, S0 is
        computed by the first call that needs it and handed to the later ones::

            with torch.no_grad(), model.reuse_initial_state():
                for batch in batches:
                    model(**batch)

        The results are those of computing S0 in every call, up to rounding (S0 computed in another call's kernel
        calls). The block is meant for weights that do not change while it lasts; as a guard, S0 is computed again,
        not reused, when a call may need its gradient (grad mode on and a parameter requiring grad), in training
        mode, under autocast, when the rows of a batch start at different position offsets, or when a parameter or
        buffer was changed in place or replaced since (an optimizer step, `load_state_dict`, a move to another
        device or dtype). Changes that touch no parameter tensor are not seen: switch PEFT adapters (`set_adapter`,
        `disable_adapter`) outside the block, and leave it around training steps whose updates happen elsewhere
        (DeepSpeed ZeRO-3 updates its own shards). Leaving the outermost block forgets the kept states.
        """
        outermost = self._reused_initial_states is None
        if outermost:
            self._reused_initial_states = {}
        try:
            yield self
        finally:
            if outermost:
                self._reused_initial_states = None

    def _initial_state_slot(self, position_offset: torch.Tensor | None):
        """Inside `reuse_initial_state()`, where a new stream's S0 is kept: (key, fingerprint of the weights); None
        where it must be computed for this call alone (outside the block, or whenever the docstring there says so)."""
        if self._reused_initial_states is None or self.training or not _rows_share_offset(position_offset):
            return None
        if _autocast_enabled(self.input_device().type):
            return None
        tensors = [*self.parameters(), *self.buffers()]
        if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors):
            return None
        try:
            weights = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
        except (RuntimeError, NotImplementedError):  # inference tensors have no version counter, some subclasses no pointer
            return None
        offset = 0 if position_offset is None else int(position_offset[0])
        return (offset, self.model.config._attn_implementation), weights

    def _keep_initial_states(self, slot, states) -> None:
        """Keep S0 (one tensor per layer, its rows all equal) for the streams that `slot` will match: a copy of one
        row (a state computed in a segment's call is a view of its whole output). The streams share it, not copies:
        a block's update makes each layer's state a new tensor (the test changing a cache's state in place checks
        that the kept one stays as it was)."""
        kept = self._reused_initial_states
        if len(kept) >= 16:  # many offsets or implementations: start over
            kept.clear()
        kept[slot[0]] = (slot[1], tuple(state[:1].clone() for state in states))

    def _initial_states(self, batch_size: int, position_offset: torch.Tensor | None = None):
        """S0[0], S0[1], ..., S0[L-1] one at a time, each on its layer's device: asking for S0[l+1] runs layer l.
        Asked for with `send(track)`, layer l's input goes through `track` first (`_ShardedBackward.track`)."""
        fam_length = self.config.fam_length
        if _rows_share_offset(position_offset):
            rows = 1  # S0 is the same for every row: compute it once
            offset = 0 if position_offset is None else position_offset[:1]
        else:
            rows, offset = batch_size, position_offset
        # Through the module's forward, not `.weight`: an offloaded prompt is on `meta` until its hook loads it.
        hidden = self.fam_prompt(rows)
        devices = self.layer_devices(hidden.device)
        track = yield hidden.to(devices[0]).expand(batch_size, -1, -1)
        # S0[1:]: what follows is not run where the first segment's layer calls compute them (_plan_segment)
        device = hidden.device
        positions = torch.arange(-fam_length, 0, device=device)[None, :] + torch.as_tensor(offset).to(device).reshape(-1, 1)
        positions = positions.expand(rows, -1)
        everything = torch.ones(rows, fam_length, dtype=torch.bool, device=device)
        mask = self._build_mask(
            lambda b, h, q, k: everything[b, q] & everything[b, k], rows, fam_length, fam_length, hidden.dtype, device
        )
        inputs = (mask, self._position_embeddings(hidden, positions), positions)
        per_device = {}  # what the layer calls read, moved once per device
        hidden = hidden.to(devices[0])
        for layer_idx in range(len(devices) - 1):  # the last layer's output is nobody's input
            layer, layer_type, layer_device = self.decoder_layers[layer_idx], self.layer_types[layer_idx], devices[layer_idx]
            if layer_device not in per_device:
                per_device[layer_device] = _to_device(inputs, layer_device)
            layer_mask, position_embeddings, layer_positions = per_device[layer_device]
            hidden = hidden if track is None else track(hidden)
            with self._attention_context(layer, hidden) as extra:
                hidden = self._call_layer(
                    layer, hidden, layer_mask, position_embeddings[layer_type], layer_positions, None, **extra
                )
            hidden = hidden.to(devices[layer_idx + 1])
            track = yield hidden.expand(batch_size, -1, -1)

    def input_device(self) -> torch.device:
        """The device the stream's input and per-row counters live on: where the embedding computes (with accelerate's
        `device_map`, its execution device, even when its weights are offloaded)."""
        return _execution_device(self.get_input_embeddings(), self.device)

    def layer_devices(self, fallback: torch.device | None = None) -> list[torch.device]:
        """The device each decoder layer computes on: its accelerate hook's execution device when it has one (with
        `device_map`, even when its weights are offloaded), else its parameters' device (`fallback`, by default
        `input_device()`, for a layer without either)."""
        fallback = self.input_device() if fallback is None else fallback
        return [_execution_device(layer, fallback) for layer in self.decoder_layers]

    # ------------------------------------------------------------------------------------- rules 2 to 6
    def _run_blocks(self, inputs_embeds, real, cache: FamCache, output_hidden_states: bool, layer_major=False, initial_states=None):
        """Run the input through the decoder block segment by block segment, continuing `cache`'s streams, in either
        loop order (`initial_states`: a new stream's `_PendingInitialState`, or None).

        Returns the last layer's output on the block rows, (b, n, hidden), and, if asked, the block rows' hidden
        states after the embedding and after every layer.
        """
        block_size = self.config.block_size
        devices = self.layer_devices(inputs_embeds.device)
        # Through the module's forward, not `.weight`: an offloaded gate is on `meta` until its hook loads it.
        gates = None if self.fam_gate is None else self.fam_gate()
        columns = real.shape[1]
        bounds = _segment_bounds(real, cache.token_count, block_size)
        layout = _BlockAlignedLayout.plan(real, cache.token_count, block_size, self.config.fam_length, len(bounds) - 1)
        if layout is not None:
            inputs_embeds, real, bounds = layout.gather(inputs_embeds), layout.real, layout.bounds
        token_index = torch.where(real, cache.token_count[:, None] + real.cumsum(1) - 1, _PAD)
        # (start, end, columns consumed): the input's columns (what generate() slices by) count once the last segment ran
        spans = [(start, end, columns if end == bounds[-1] else 0) for start, end in zip(bounds[:-1], bounds[1:])]
        if layer_major:
            hidden, all_hidden = self._run_layer_major(
                inputs_embeds, real, token_index, spans, cache, devices, gates, output_hidden_states, initial_states
            )
        else:
            hidden, all_hidden = self._run_block_major(
                inputs_embeds, real, token_index, spans, cache, devices, gates, output_hidden_states, initial_states
            )
        if layout is not None:
            hidden = layout.scatter(hidden, columns)
            all_hidden = None if all_hidden is None else tuple(layout.scatter(h, columns) for h in all_hidden)
        return hidden, all_hidden

    def _runs_layer_major(self) -> bool:
        """Whether a pass runs layer-major (see `FamConfig.loop_order`). On an input of one segment (a decoding
        step, a short prompt) both orders make the same calls."""
        order = getattr(self.config, "loop_order", "auto")
        if order != "auto":
            return order == "layer"
        return any(_gathered_per_call(layer) for layer in self.decoder_layers)

    def _run_block_major(
        self, inputs_embeds, real, token_index, spans, cache, devices, gates, output_hidden_states, initial_states
    ):
        """Each segment through every layer, then the next segment: the cache is ready to continue after every
        segment, and only one segment's masks are alive at a time."""
        outputs, hidden_per_layer = [], []
        for start, end, consumed in spans:
            segment = self._plan_segment(
                cache, token_index[:, start:end], real[:, start:end], inputs_embeds, initial_states
            )
            if initial_states is not None and segment.initial_state is None:
                initial_states.compute(cache)  # S0 in the FAM prompt's own pass
            initial_states = None
            hidden = inputs_embeds[:, start:end]
            seen = [hidden]
            for layer_idx, (layer, device) in enumerate(zip(self.decoder_layers, devices)):
                hidden = self._block_layer(layer, layer_idx, hidden.to(device), segment.on(device), cache, gates)
                if output_hidden_states:
                    seen.append(hidden)
            cache.advance(segment.real_tokens, consumed, segment.fam_rows, segment.completes)
            outputs.append(hidden)
            hidden_per_layer.append(seen)
        all_hidden = None
        if output_hidden_states:
            all_hidden = tuple(torch.cat(per_layer, dim=1) for per_layer in zip(*hidden_per_layer))
        return torch.cat(outputs, dim=1), all_hidden

    def _run_layer_major(self, inputs_embeds, real, token_index, spans, cache, devices, gates, output_hidden_states, initial_states):
        """Every segment through layer 0, then through layer 1, ...: layer l of segment k reads only layer l-1's
        output on segment k and layer l's own state after segment k-1 (FAM state, key/value window), so the results
        are those of the block-major order. Each layer's calls follow one another, with its weights gathered or
        loaded once for all of them (`_weights_kept`).

        The segments' masks are built up front (planning reads the per-row counters only, not the buffers) and kept
        while every layer runs; an input whose masks would take more than `layer_major_mask_budget` bytes runs as
        consecutive groups of segments, each group layer-major (one gather per layer and group)."""
        outputs, seen_per_group = [], []
        next_span = 0
        first = initial_states  # a new stream's S0 to compute: only the first segment's calls can
        while next_span < len(spans):
            plans, mask_bytes = [], 0
            while next_span < len(spans) and (not plans or mask_bytes < self.layer_major_mask_budget):
                start, end, consumed = spans[next_span]
                segment = self._plan_segment(cache, token_index[:, start:end], real[:, start:end], inputs_embeds, first)
                if segment.initial_state is not None:  # S0 computed by the segment's calls
                    initial_states = None
                first = None
                slide = cache.sliding_rows(segment.completes)
                plans.append((segment, slide if bool(slide.any()) else None, inputs_embeds[:, start:end]))
                cache.advance_counters(segment.real_tokens, consumed, segment.fam_rows, segment.completes)
                mask_bytes += sum(m.numel() * m.element_size() for m in segment.masks.values() if isinstance(m, torch.Tensor))
                next_span += 1
            hidden, seen = self._layer_major_group(plans, cache, devices, gates, output_hidden_states, initial_states)
            initial_states = None  # S0 is complete after the first group's visit of every layer
            outputs.extend(hidden)
            seen_per_group.append(seen)
        all_hidden = None
        if output_hidden_states:
            all_hidden = (inputs_embeds,) + tuple(torch.cat(per_layer, dim=1) for per_layer in zip(*seen_per_group))
        return torch.cat(outputs, dim=1), all_hidden

    # The masks a layer-major pass keeps at most (bytes) before it runs its segments in groups (see _run_layer_major).
    layer_major_mask_budget = 256 * 2**20

    def _layer_major_group(self, plans, cache, devices, gates, output_hidden_states, initial_states):
        """Run the planned segments [(segment, sliding rows or None, input rows)] layer by layer. Returns the last
        layer's output per segment and, if asked, each layer's output over the group."""
        hidden = [rows for _, _, rows in plans]
        seen = []
        recording = self._router_recording
        recorded = {}  # (segment, layer) -> the router logits its call recorded, to return them in block-major order
        for layer_idx, (layer, device) in enumerate(zip(self.decoder_layers, devices)):
            with _weights_kept(layer) as backward:
                track = None if backward is None else backward.track
                for k, (segment, slide, _) in enumerate(plans):
                    first = 0 if recording is None else len(recording)
                    hidden[k] = self._block_layer(
                        layer, layer_idx, hidden[k].to(device), segment.on(device), cache, gates, track
                    )
                    if recording is not None:
                        recorded[k, layer_idx] = recording[first:]
                        del recording[first:]
                    if slide is not None:
                        cache.slide_windows(slide, layer_indices=[layer_idx])
                if initial_states is not None and layer_idx + 1 < len(devices):
                    initial_states.run_layer(layer_idx, cache, track)  # in the FAM prompt's own pass
            if output_hidden_states:
                seen.append(torch.cat(hidden, dim=1))
        for k in range(len(plans)) if recording is not None else ():
            for layer_idx in range(len(devices)):
                recording.extend(recorded[k, layer_idx])
        return hidden, seen

    def _plan_segment(self, cache: FamCache, token_index, real, inputs_embeds, initial_state=None) -> _Segment:
        """What every layer call of one segment shares. `initial_state`: a new stream's S0 still to compute (then this
        is its first segment). Its layer calls compute it where that costs no more rows than the FAM prompt's own
        pass (`segment.initial_state` is set then): S0[l+1] is layer l's output on S0[l] with positions -F .. -1
        and the F FAM rows as keys, which are the keys of S0[l] at those positions, so F query rows that see those
        keys only give it. Where no row's block ends in the segment, those rows are the FAM rows themselves (the
        update they would compute is not used); else F rows more, where the prompt's own pass would run F rows for
        each row of the batch too (one row, or rows at different position offsets). Otherwise (a batch whose rows
        share S0 and complete a block here) the caller runs the prompt's pass."""
        B, M, F = self.config.block_size, self.config.memory_segments, self.config.fam_length
        device = token_index.device
        count_before = cache.token_count
        real_tokens = real.sum(1)
        count_after = count_before + real_tokens
        block = count_before // B
        completes = (real_tokens > 0) & (count_after % B == 0)
        # FAM rows join the call when a block completes (to compute the new S, rule 5) or when the keys of S are not
        # cached yet for the current block (rule 3); otherwise their cached keys/values serve the block rows.
        fam_rows = F > 0 and bool(completes.any() or not cache.fam_kv_fresh.all())
        span = cache.window_span(count_after)
        # Key slots: F FAM slots, then each row's memory segments (min(block, M) blocks) and its current block. The
        # FAM queries see the FAM keys and their current block (rule 4): from the first row's current block on.
        fam_key_start = F + int(block.clamp(max=M).min()) * B if fam_rows and M > 0 else 0

        batch = token_index.shape[0]
        prompt_rows = None
        if initial_state is not None and fam_rows:
            if not bool(completes.any()):
                prompt_rows = 0
            elif batch == 1 or not _rows_share_offset(cache.position_offset):
                prompt_rows = F
        fam_index = torch.full((batch, F), _FAM, dtype=torch.long, device=device)
        fam_queries = [torch.full_like(fam_index, _PROMPT)] if prompt_rows is not None else []
        if prompt_rows != 0:
            fam_queries.append(fam_index)
        query_index = torch.cat([*fam_queries, token_index], 1) if fam_rows else token_index
        key_index = torch.cat([fam_index, cache.slot_token_index(count_after, span)], 1)

        # rule 2; on a new stream's first segment (block 0) also the FAM prompt's positions -F .. -1
        fam_positions = block[:, None] * B - F + torch.arange(F, device=device)
        token_positions = token_index.clamp(min=0)
        positions = token_positions
        if fam_rows:
            positions = torch.cat([fam_positions] * len(fam_queries) + [token_positions], 1)
        position_ids = positions + cache.position_offset[:, None]

        masks = {}
        for window in set(self._layer_windows):
            mask_function = _fam_mask_function(query_index, key_index, block, B, M, window)
            masks[window] = self._build_mask(
                mask_function, batch, query_index.shape[1], key_index.shape[1], inputs_embeds.dtype, device
            )
        # rows whose router logits count for a mixture-of-experts load-balancing loss: FAM rows of rows that have
        # tokens in this segment, and real tokens (the FAM prompt's rows, as in its own pass, not)
        has_tokens = (real_tokens > 0)[:, None].expand(-1, F)
        if prompt_rows:
            has_tokens = torch.cat([torch.zeros_like(has_tokens), has_tokens], 1)
        return _Segment(
            completes=completes,
            all_complete=fam_rows and bool(completes.all()),  # a host read, only where the FAM state is updated
            real_tokens=real_tokens,
            fam_rows=fam_rows,
            span=span,
            fam_key_start=fam_key_start,
            writes=cache.token_writes(token_index),
            position_ids=position_ids,
            masks=masks,
            position_embeddings=self._position_embeddings(inputs_embeds, position_ids),
            routed_rows=torch.cat([has_tokens, token_index >= 0], 1) if fam_rows else token_index >= 0,
            initial_state=None if prompt_rows is None else initial_state,
            prompt_rows=prompt_rows or 0,
        )

    def _block_layer(
        self, layer, layer_idx: int, hidden, segment: _SegmentOnDevice, cache: FamCache, gates=None, track=None
    ):
        """Rules 2, 3, 5 and 6 for one decoder layer on one block segment. `hidden`, `segment` and the layer's share
        of `cache` are on the layer's device; `gates` are the gated update's gates (`FamGate.forward`), or None;
        `track`, if given, sees the call's input rows first (`_ShardedBackward.track`)."""
        F = self.config.fam_length
        state = cache.layers[layer_idx]
        if segment.initial_state is not None:  # S0[l], computed by the previous layer's call (on its device)
            state.fam_state = state.fam_state.to(hidden.device)
        fam = [state.fam_state] * (2 if segment.prompt_rows else 1)
        rows = torch.cat([*fam, hidden], dim=1) if segment.fam_rows else hidden
        rows = rows if track is None else track(rows)
        source = (state.keys, state.values) if state.is_initialized else (None, None)
        # Decided here, outside any checkpoint: reentrant checkpointing runs its first pass without gradients.
        in_place = not torch.is_grad_enabled()
        recording = self._router_recording
        call = partial(self._segment_layer_call, layer, layer_idx, segment, state, in_place, recording is not None)
        if self.gradient_checkpointing and self.training and in_place is False and self._checkpointed_layers[layer_idx]:
            output, keys, values, *router_logits = self._gradient_checkpointing_func(call, rows, *source)
        else:
            output, keys, values, *router_logits = call(rows, *source)
        if recording is not None:
            recording.extend((logits, segment.routed_rows) for logits in router_logits)
        state.store(keys, values)
        if segment.initial_state is not None:
            if layer_idx + 1 < len(cache.layers):
                segment.initial_state.add(layer_idx, output[:, :F], cache)
            output = output[:, segment.prompt_rows :]
        if not segment.fam_rows:
            return output
        # Rule 5: the FAM rows' output is S[l] of the next block, only once the block is complete.
        new_state = output[:, :F]
        if gates is not None:  # the gated update: S + g (output - S)
            gate = gates[layer_idx].to(device=new_state.device, dtype=new_state.dtype)
            new_state = torch.lerp(state.fam_state, new_state, gate)
        sink = self.config.fam_sink_length
        if sink:  # the sink rows are never updated
            new_state = torch.cat([state.fam_state[:, :sink], new_state[:, sink:]], dim=1)
        if not segment.all_complete:  # rows whose block goes on keep their state
            new_state = torch.where(segment.completes[:, None, None], new_state, state.fam_state)
        state.fam_state = new_state
        return output[:, F:]

    def _segment_layer_call(self, layer, layer_idx, segment, layer_cache, in_place, record_router, rows, keys, values):
        """One decoder-layer call on [FAM rows ;] segment rows, reading the key/value buffers (keys, values) (None
        before the layer's first call). Returns (output rows, new keys, new values[, router logits ...]): a function
        of its tensor arguments alone whose results are all it computes, so that checkpointing it is exact in every
        mode (reentrant checkpointing carries gradients only through the function's inputs and outputs)."""
        source = None if keys is None else (keys, values)
        key_values = _BlockKeyValues(layer_cache, source, segment, self.config.fam_length, in_place)
        prompt_rows = self.config.fam_length if segment.initial_state is not None else 0
        split = self._attention_context(layer, rows, segment.fam_key_start, prompt_rows)
        with _captured_router_logits(layer, self._router if record_router else None) as router_logits, split as extra:
            output = self._call_layer(
                layer,
                rows,
                segment.masks[self._layer_windows[layer_idx]],
                segment.position_embeddings[self.layer_types[layer_idx]],
                segment.position_ids,
                key_values,
                **extra,
            )
        return (output, key_values.keys, key_values.values, *router_logits)

    def _attention_context(self, layer, rows: torch.Tensor, fam_key_start: int = 0, prompt_rows: int = 0):
        """With sdpa, a context in which the layer's attention on `rows` (its input) is `_fam_sdpa_attention`: on a
        segment with memory, it computes the F FAM queries over the keys they can see (FAM slots and slots from
        `fam_key_start` on) and the block queries over all keys, in two calls of torch's kernel (the FAM queries skip
        the memory segments' keys, which their mask hides anyway); the first `prompt_rows` queries (the FAM prompt's,
        on a new stream's first segment) over the F FAM keys alone, in a call of their own; on CPU, it lets the
        kernel share each key/value head among its query heads. It yields the keyword arguments the layer passes on
        to its attention function. The layers pick their attention function from the base configuration's name, so
        the name is switched for the call only, and only where the call gains from it: setting a configuration's
        attribute costs tens of microseconds, as much as a small layer call (a decoding step's one row)."""
        config = self.model.config
        if _user_implementation(config) != "sdpa":
            return nullcontext({})
        passes_kwargs = _passes_attention_kwargs(layer)
        split = fam_key_start > self.config.fam_length and passes_kwargs
        prompt_rows = prompt_rows if passes_kwargs else 0
        # Without the splits (or where the layer cannot pass its arguments on): one call over all queries, as the mask
        # says, through `_fam_sdpa_attention` for its grouped-query kernel call where that may apply
        if not (split or prompt_rows or (rows.shape[1] > 1 and rows.device.type == "cpu" and _TORCH_ENABLE_GQA)):
            return nullcontext({})
        kwargs = {"fam_query_rows": self.config.fam_length, "fam_key_start": fam_key_start} if split else {}
        if prompt_rows:
            kwargs["prompt_query_rows"] = prompt_rows
        return _attention_implementation(config, _FAM_SDPA, kwargs)

    @staticmethod
    def _call_layer(layer, hidden, attention_mask, position_embeddings, position_ids, block_cache, **attention_kwargs):
        # Decoder layers differ in argument order: everything but the hidden states goes by keyword.
        output = layer(
            hidden,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            **{cache_argument_name(layer): block_cache},
            **_unused_required_arguments(layer),
            **attention_kwargs,
        )
        return output[0] if isinstance(output, tuple) else output

    # --------------------------------------------------------------------------------- masks and positions
    @cached_property
    def _layer_windows(self) -> list[int | None]:
        """The base model's own sliding window of each layer (rule 4), None for full-attention layers (worked out
        once: it is read by every layer call)."""
        window = getattr(self.config.text_config, "sliding_window", None)
        return [window if kind == "sliding_attention" else None for kind in self.layer_types]

    def _build_mask(self, mask_function, batch, query_length, key_length, dtype, device):
        mask_interface = ALL_MASK_ATTENTION_FUNCTIONS[self.model.config._attn_implementation]
        mask = mask_interface(
            batch_size=batch,
            q_length=query_length,
            kv_length=key_length,
            mask_function=mask_function,
            allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False,
            dtype=dtype,
            device=device,
        )
        if _is_block_mask(mask):  # flex_attention: the mask function compiled into block-sparse form
            return mask
        if mask.dtype == torch.bool:
            # sdpa would turn a boolean mask into an additive one in every layer; do it once for all layers.
            mask = torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask

    def _position_embeddings(self, hidden, position_ids) -> dict:
        """(cos, sin) for `position_ids` (b, q), per layer type, from the base model's rotary module."""
        rotary = self.rotary_emb
        rotary_forward = self._rotary_forward(hidden.device)
        takes_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
        embeddings = {}
        for layer_type in set(self.layer_types):
            extra = (layer_type,) if takes_layer_type else ()
            embeddings[layer_type] = rotary_forward(hidden, position_ids, *extra)
        return embeddings

    def _rotary_forward(self, device: torch.device):
        """The rotary module's forward; for length-dependent rotary types, with frequencies fixed once (rule 7)."""
        rotary = self.rotary_emb
        rope_type = getattr(rotary, "rope_type", "default")
        rope_types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
        if not any(kind in str(rope) for rope in rope_types for kind in _LENGTH_DEPENDENT_ROPE):
            return rotary
        if self._length_dependent_rotary_per_call:  # the conversion self-check: as the base model does it
            return rotary
        if not getattr(rotary, "_fam_frequencies_fixed", False):
            # Drive the library's own update rule to the state it has for a max_position_embeddings-token sequence.
            takes_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
            layer_types = set(self.layer_types) if takes_layer_type else [None]
            probe = torch.zeros(1, 1, 1, device=device)
            last = self.config.text_config.max_position_embeddings - 1
            for layer_type in layer_types:
                extra = (layer_type,) if layer_type is not None else ()
                for position in (0, last):
                    rotary(probe, torch.tensor([[position]], device=probe.device), *extra)
            rotary._fam_frequencies_fixed = True
        raw_forward = inspect.unwrap(type(rotary).forward)

        def fixed_forward(x, position_ids, *extra):
            with torch.no_grad():
                return raw_forward(rotary, x, position_ids, *extra)

        return fixed_forward


class _RouterLoss:
    """What the base causal LM's forward uses for its mixture-of-experts load-balancing loss: the module whose output
    holds the router logits (from the base decoder's `_can_record_outputs`, transformers' output-capturing table),
    the family's `load_balancing_loss_func`, and its expert counts and loss coefficient."""

    def __init__(self, target_class, index, loss_function, num_experts, top_k, coefficient):
        self.target_class, self.index = target_class, index
        self.loss_function, self.num_experts, self.top_k, self.coefficient = loss_function, num_experts, top_k, coefficient

    def load_balancing_loss(self, router_logits: list[torch.Tensor]) -> torch.Tensor:
        # The family's function averages over every routed row of every layer; all calls' rows at once give that mean
        # (on the first layer's device: with a device_map the layers' logits live on their layers' devices).
        if not router_logits:  # a configuration whose layers have no router (all dense)
            return torch.zeros(())
        device = router_logits[0].device
        rows = torch.cat([logits.to(device) for logits in router_logits])
        return self.loss_function((rows,), self.num_experts, self.top_k, None)

    @staticmethod
    def counted_rows(recording: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """The router logits of the rows that count, one tensor per layer call, from what the hooks recorded."""
        return [logits[rows.reshape(-1).to(logits.device)] for logits, rows in recording]


def _router_settings(base_model, decoder) -> _RouterLoss | None:
    recorder = (getattr(decoder, "_can_record_outputs", None) or {}).get("router_logits")
    module = sys.modules.get(type(base_model).__module__)
    loss_function = getattr(module, "load_balancing_loss_func", None)
    numbers = [getattr(base_model, name, None) for name in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")]
    if recorder is None or loss_function is None or None in numbers:
        return None
    target_class = getattr(recorder, "target_class", recorder)
    return _RouterLoss(target_class, getattr(recorder, "index", 0), loss_function, *numbers)


@contextmanager
def _captured_router_logits(layer, router: _RouterLoss | None):
    """The router logits that `layer`'s routers output while the block runs (nothing when `router` is None)."""
    captured = []
    if router is None:
        yield captured
        return

    def hook(module, args, output):
        captured.append(output[router.index] if isinstance(output, (tuple, list)) else output)

    handles = [m.register_forward_hook(hook) for m in layer.modules() if isinstance(m, router.target_class)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _recording_router_logits(model, enabled: bool):
    """Collect (router logits, rows that count) of every decoder-layer call of the block loop while the block runs."""
    if not enabled:
        yield None
        return
    model._router_recording = recording = []
    try:
        yield recording
    finally:
        model._router_recording = None


def _register_peft_targets(model_type: str) -> None:
    """Give peft default adapter targets for model type `fam`: those of the base family. peft keys its tables of
    default targets by `config.model_type`, which is `fam` for every converted model; where several families are
    converted in one process the entry is the union of theirs (names that a model lacks match nothing). Only done
    when peft is imported already (before the model is built), so that importing hf_fam never imports peft."""
    constants = sys.modules.get("peft.utils.constants")
    if constants is None:
        return
    for name in dir(constants):
        table = getattr(constants, name)
        if not (name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(table, dict) and model_type in table):
            continue
        targets, known = table[model_type], table.get(FamConfig.model_type)
        if isinstance(targets, (list, tuple, set)) and isinstance(known, (list, tuple, set)):
            targets = sorted(set(known) | set(targets))
        table[FamConfig.model_type] = targets


def cache_argument_name(layer) -> str:
    """The keyword under which `layer` (a decoder layer, or a model such as the base model) takes its cache: `cache`
    from transformers 5.24 on, `past_key_values` before (a few families keep older names)."""
    kind = type(layer)
    if kind not in _CACHE_ARGUMENT:
        parameters = inspect.signature(kind.forward).parameters
        names = [name for name in ("cache", "past_key_values", "past_key_value", "layer_past") if name in parameters]
        _CACHE_ARGUMENT[kind] = names[0] if names else "past_key_values"
    return _CACHE_ARGUMENT[kind]


_CACHE_ARGUMENT: dict[type, str] = {}
_PASSED_TO_LAYERS = ("hidden_states", "attention_mask", "position_embeddings", "position_ids", "cache", "past_key_values")


def _unused_required_arguments(layer) -> dict:
    """None for each argument that `layer`'s forward requires and hf-fam does not pass (falcon's `alibi`, which it
    takes even when it does not use ALiBi). The conversion self-check tells whether None was right."""
    kind = type(layer)
    if kind not in _UNUSED_REQUIRED:
        parameters = list(inspect.signature(kind.forward).parameters.values())[1:]  # after self
        _UNUSED_REQUIRED[kind] = {
            p.name: None
            for p in parameters[1:]  # after the hidden states
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in _PASSED_TO_LAYERS + (cache_argument_name(layer),)
        }
    return _UNUSED_REQUIRED[kind]


_UNUSED_REQUIRED: dict[type, dict] = {}


_FAM_SDPA = "hf_fam_sdpa"


def _fam_sdpa_attention(
    module, query, key, value, attention_mask, *args, fam_query_rows=0, fam_key_start=0, prompt_query_rows=0, **kwargs
):
    """transformers' sdpa attention function, run as two calls on a block segment with FAM rows: the first
    `fam_query_rows` (F) queries over the F FAM keys and the keys from `fam_key_start` on (those their mask lets them
    see), the other queries over all keys. The result equals one call over all queries (masked keys weigh zero); the FAM
    queries skip the memory segments' keys, and torch's CPU kernel, which shares (heads x 256-row query slices) among
    the threads, no longer gets an uneven F-row tail in every head. Before those, with `prompt_query_rows` (P), the
    first P queries (the FAM prompt's) over the first P keys (the FAM keys, all they see) in a call of their own.
    Without these arguments: sdpa as it is. Where `_shares_key_value_heads` says so, each call is
    `_grouped_sdpa_attention`."""
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if _shares_key_value_heads(module, query, attention_mask, args, kwargs):
        sdpa = _grouped_sdpa_attention
    P = prompt_query_rows
    if P and query.shape[2] > P and torch.is_tensor(attention_mask) and kwargs.get("position_bias") is None:
        prompt_output, _ = sdpa(
            module, query[:, :, :P], key[:, :, :P], value[:, :, :P], attention_mask[:, :, :P, :P], *args, **kwargs
        )
        rest, _ = _fam_sdpa_attention(
            module, query[:, :, P:], key, value, attention_mask[:, :, P:], *args,
            fam_query_rows=fam_query_rows, fam_key_start=fam_key_start, **kwargs,
        )  # fmt: skip
        return torch.cat([prompt_output, rest], 1), None
    F = fam_query_rows
    if not (F < fam_key_start < key.shape[2]) or query.shape[2] <= F or not torch.is_tensor(attention_mask):
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
    if kwargs.get("position_bias") is not None:  # a per-query bias: not split here
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)

    def fam_columns(tensor, dim):  # the F FAM columns and those from fam_key_start on
        rest = tensor.shape[dim] - fam_key_start
        return torch.cat([tensor.narrow(dim, 0, F), tensor.narrow(dim, fam_key_start, rest)], dim)

    fam_output, _ = sdpa(
        module,
        query[:, :, :F],
        fam_columns(key, 2),
        fam_columns(value, 2),
        fam_columns(attention_mask[:, :, :F], -1),
        *args,
        **kwargs,
    )
    block_output, _ = sdpa(module, query[:, :, F:], key, value, attention_mask[:, :, F:], *args, **kwargs)
    return torch.cat([fam_output, block_output], 1), None


def _shares_key_value_heads(module, query, attention_mask, args, kwargs) -> bool:
    """Whether an sdpa call of a grouped-query attention layer (fewer key/value heads than query heads) can run as
    `_grouped_sdpa_attention`: on CPU, where torch's kernel takes `enable_gqa` with a mask (torch >= 2.5), for a mask
    tensor and several queries (what transformers' sdpa function does otherwise: copy the keys and values once per
    query head first, as CUDA's kernels need with a mask), and with nothing that function would do besides."""
    return (
        query.device.type == "cpu"
        and _TORCH_ENABLE_GQA
        and getattr(module, "num_key_value_groups", 1) > 1
        and torch.is_tensor(attention_mask)
        and query.shape[2] > 1
        and not args
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
    )


def _grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' sdpa attention function on a mask tensor, with torch's kernel reading each key/value head for
    its group of query heads (`enable_gqa`) instead of copies of the keys and values, one per query head: the same
    numbers reach the same kernel, without copying (M+1)B keys and values per layer call."""
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


_TORCH_ENABLE_GQA = is_torch_greater_or_equal("2.5")

AttentionInterface.register(_FAM_SDPA, _fam_sdpa_attention)
AttentionMaskInterface.register(_FAM_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def _attention_implementation(config, name: str, kwargs: dict):
    """`config._attn_implementation` set to `name` inside the block (which receives `kwargs`), then back.

    Threads that run the same model at once share one switch: the first to enter sets the name, the last to leave
    puts the old one back (the switched name only ever stands for the one it replaced: `_user_implementation`). A
    thread's layer call that finds the name switched without `kwargs` of its own runs plain sdpa
    (`_fam_sdpa_attention` without its two arguments), which gives the same result."""
    with _SWITCH_LOCK:
        switch = _SWITCHES.setdefault(id(config), [0, config._attn_implementation])
        switch[0] += 1
        config._attn_implementation = name
    try:
        yield kwargs
    finally:
        with _SWITCH_LOCK:
            switch[0] -= 1
            if switch[0] == 0:
                config._attn_implementation = switch[1]
                del _SWITCHES[id(config)]


# id(config) -> [threads inside the switch, the name it replaced]
_SWITCHES: dict[int, list] = {}
_SWITCH_LOCK = threading.Lock()


def _user_implementation(config) -> str:
    """The attention implementation the model was set to, also while another thread has switched the name."""
    implementation = config._attn_implementation
    return "sdpa" if implementation == _FAM_SDPA else implementation


def _passes_attention_kwargs(layer) -> bool:
    """Whether the decoder layer's forward takes **kwargs (transformers' layers pass them on to their attention)."""
    kind = type(layer)
    if kind not in _PASSES_KWARGS:
        parameters = inspect.signature(kind.forward).parameters.values()
        _PASSES_KWARGS[kind] = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return _PASSES_KWARGS[kind]


_PASSES_KWARGS: dict[type, bool] = {}


def _fam_mask_function(query_index, key_index, block, block_size, memory_segments, window):
    """Rule 4 as a transformers mask function (batch_idx, head_idx, q_idx, kv_idx) -> bool.

    query_index (b, q) / key_index (b, k) hold each row's stream index of the query/key token, -2 for FAM rows, -3
    for the FAM prompt's rows and -1 for padding or empty slots; block (b,) is the row's current block; window the
    base model's sliding window of the layer, or None.
    """

    def mask_function(batch_idx, head_idx, q_idx, kv_idx):
        query = query_index[batch_idx, q_idx]
        key = key_index[batch_idx, kv_idx]
        query_is_token, key_is_token = query >= 0, key >= 0
        query_is_fam, key_is_fam = query == _FAM, key == _FAM
        # block rows: memory segments and the current block up to themselves (causal), plus all FAM rows
        visible = key_is_token & (key <= query) & (key // block_size >= query // block_size - memory_segments)
        if window is not None:
            visible = visible & (query - key < window)
        token_sees = query_is_token & (visible | key_is_fam)
        # FAM rows: all FAM rows and every token of the current block, later ones included; no memory segments
        fam_sees = query_is_fam & (key_is_fam | (key_is_token & (key // block_size == block[batch_idx])))
        # the FAM prompt's rows (S0[l+1] from S0[l]): the FAM rows, bidirectionally, as in the prompt's own pass
        prompt_sees = (query == _PROMPT) & key_is_fam
        # padding queries are never keys and their outputs are dropped; let them see anything (no empty softmax row)
        return token_sees | fam_sees | prompt_sees | (query == _PAD)

    return mask_function


__all__ = [
    "FAMILY_ADAPTERS",
    "FamForCausalLM",
    "FamGate",
    "FamPreTrainedModel",
    "FamPrompt",
    "FamilyAdapter",
    "UnsupportedArchitectureError",
    "cache_argument_name",
    "causal_lm_families",
]

"""A slow, explicit TransformerFAM written straight from FAM_SPEC.md section 2, for one row without padding.

It shares nothing with hf_fam's block loop, cache or masks: no key/value caching at all. Memory segments are
obtained by running the stored layer inputs of the earlier blocks through the layer again next to the current
block (a row's keys/values depend only on its layer input and position, so these are the same keys), and the
attention pattern of rule 4 is written out element by element. Only the base model's own modules are reused:
embedding, decoder layers, rotary embedding, final norm and head.
"""

import torch


def _rotary(model, hidden, positions, layer_type):
    rotary = model.model.rotary_emb
    position_ids = torch.tensor([positions], dtype=torch.long)
    if isinstance(rotary.rope_type, dict):  # gemma3: one rotary per layer type
        return rotary(hidden, position_ids, layer_type)
    return rotary(hidden, position_ids)


def _mask(allowed, implementation, dtype):
    """allowed: python list of lists of bools -> the 4D mask the attention implementation expects."""
    allowed = torch.tensor(allowed, dtype=torch.bool)[None, None]
    if implementation == "sdpa":
        return allowed
    return torch.where(allowed, torch.tensor(0.0, dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))


def _layer_types(text_config):
    if getattr(text_config, "layer_types", None) is not None:
        return list(text_config.layer_types)
    kind = "sliding_attention" if getattr(text_config, "sliding_window", None) is not None else "full_attention"
    return [kind] * text_config.num_hidden_layers


def _call(layer, hidden, mask, cos_sin, positions):
    out = layer(
        hidden,
        attention_mask=mask,
        position_embeddings=cos_sin,
        position_ids=torch.tensor([positions]),
    )
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def reference_logits(fam_model, input_ids: torch.Tensor, fam_state=None, position_offset: int = 0) -> torch.Tensor:
    """Logits (n, vocab) of `fam_model` on one row of token ids (n,), from the spec's rules alone.

    `position_offset` is added to every position (the training recipe's random position offset). With
    `fam_update="gated"` a completed block sets S[l] = S[l] + g[l] * (output - S[l]) instead of the output (rule 5);
    with `fam_sink_length` K the first K rows of S[l] are never updated.
    """
    config = fam_model.config
    text_config = config.text_config
    B, M, F = config.block_size, config.memory_segments, config.fam_length
    implementation = text_config._attn_implementation
    layers = list(fam_model.model.layers)
    layer_types = _layer_types(text_config)
    window = getattr(text_config, "sliding_window", None)
    dtype = fam_model.fam_prompt.weight.dtype
    n = input_ids.shape[0]

    # Rule 1: S0[0] = P; S0[l+1] = layer_l(S0[l]) with bidirectional attention among the F rows at -F .. -1.
    state = []
    if F > 0:
        hidden = fam_model.fam_prompt.weight[None]
        positions = [p + position_offset for p in range(-F, 0)]
        mask = _mask([[True] * F for _ in range(F)], implementation, dtype)
        for layer, layer_type in zip(layers, layer_types):
            state.append(hidden)
            hidden = _call(layer, hidden, mask, _rotary(fam_model, hidden, positions, layer_type), positions)
    if fam_state is not None:
        state = [s for s in fam_state]
    gates = fam_model.fam_gate.weight.tolist() if config.fam_update == "gated" else None

    embeddings = fam_model.model.embed_tokens(input_ids[None])
    blocks = [(start, min(start + B, n)) for start in range(0, n, B)]
    # layer_inputs[l][t]: X[l]_t, the input of layer l on block t, (1, b, hidden)
    layer_inputs = [[None] * len(blocks) for _ in range(len(layers) + 1)]
    for t, (start, end) in enumerate(blocks):
        layer_inputs[0][t] = embeddings[:, start:end]

    for t, (start, end) in enumerate(blocks):
        b = end - start
        memory_blocks = list(range(max(0, t - M), t))
        memory_positions = [p for s in memory_blocks for p in range(blocks[s][0], blocks[s][1])]
        fam_positions = list(range(start - F, start))  # rule 2
        block_positions = list(range(start, end))
        positions = [p + position_offset for p in memory_positions + fam_positions + block_positions]
        kinds = ["memory"] * len(memory_positions) + ["fam"] * F + ["block"] * b
        for l, (layer, layer_type) in enumerate(zip(layers, layer_types)):
            sliding = layer_type == "sliding_attention"
            allowed = []
            for q_kind, q_pos in zip(kinds, positions):
                row = []
                for k_kind, k_pos in zip(kinds, positions):
                    if q_kind == "memory":  # memory rows only supply keys; their outputs are thrown away
                        ok = q_pos == k_pos and k_kind == "memory"
                    elif q_kind == "fam":  # rule 4: FAM sees FAM and the whole current block, not the memory
                        ok = k_kind in ("fam", "block")
                    else:  # block row: memory, FAM, and the current block causally; base window on sliding layers
                        if k_kind == "fam":
                            ok = True
                        else:
                            ok = k_pos <= q_pos and (not sliding or k_pos > q_pos - window)
                    row.append(ok)
                allowed.append(row)
            parts = [layer_inputs[l][s] for s in memory_blocks]
            if F > 0:
                parts.append(state[l])
            parts.append(layer_inputs[l][t])
            hidden = torch.cat(parts, dim=1)
            cos_sin = _rotary(fam_model, hidden, positions, layer_type)
            out = _call(layer, hidden, _mask(allowed, implementation, dtype), cos_sin, positions)
            offset = len(memory_positions)
            layer_inputs[l + 1][t] = out[:, offset + F :]
            if F > 0 and b == B:  # rule 5: feedback only from a complete block
                new = out[:, offset : offset + F]
                new = new if gates is None else state[l] + gates[l] * (new - state[l])
                K = config.fam_sink_length  # the first K rows are never updated
                state[l] = torch.cat([state[l][:, :K], new[:, K:]], dim=1)

    hidden = torch.cat([layer_inputs[len(layers)][t] for t in range(len(blocks))], dim=1)
    logits = fam_model.lm_head(fam_model.model.norm(hidden))
    softcap = getattr(text_config, "final_logit_softcapping", None)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits[0]

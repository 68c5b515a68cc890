"""Where does a FAM model's attention go on a passkey example? The write and the read of the memory, layer by layer.

    python recipes/fam_attention.py runs/merged_short_200 --filler 128 --trials 4
    python recipes/fam_attention.py UNTRAINED_FAM_FOLDER --filler 128 --trials 4      # the same settings, before training

Retrieval through the FAM needs two things in the same layer l, because S[l] is written by layer l's output on the
FAM rows and read only by layer l's attention (FAM_SPEC rules 2-5):
- the write: in the block that holds the needle, layer l's FAM queries attend to the key's digit tokens;
- the read: in the question's block, the position that predicts the answer attends to layer l's FAM keys.
For each layer this prints both shares of attention, and how much of the FAM state S[l] that the needle's block
leaves behind depends on the key (|S_a - S_b| / |S_a| for two keys, mean over FAM rows: the size of what was written
next to what the state holds anyway) (averaged over heads and trials, and the largest head's), for
examples with the needle right after the instruction (depth 0) and `--filler` tokens between it and the question,
so that with M = 0 the question's block sees the needle only through the FAM. Two more columns say what else the FAM
rows are: the share of attention that all the question block's queries give the FAM keys (the FAM as an attention
sink), and the norms of the initial state S0[l]'s rows (mean, and the largest row's) next to the median norm of the
example's tokens at layer l's input. Attention weights come from the eager implementation (the model runs in it for
this diagnostic). Use it next to `recipes/key_sensitivity.py`, which
measures whether the answer depends on the key at all.
"""

from __future__ import annotations

import argparse
import random

import torch

from hf_fam.evaluation import EvaluationError, load_fam
from hf_fam.tasks import passkey_example


def attention_calls(model, ids: list[int]) -> tuple[dict[int, list[torch.Tensor]], tuple[torch.Tensor, ...]]:
    """Per decoder layer, the attention weights (heads, queries, keys) of its block calls, in block order (the calls
    that compute the initial FAM state, with F queries and F keys, left out); and the hidden states of the tokens."""
    fam_length = model.config.fam_length
    calls: dict[int, list[torch.Tensor]] = {}
    handles = []
    for index, layer in enumerate(model.decoder_layers):
        def keep(module, args, output, index=index):
            weights = output[1]
            if weights is None:
                raise SystemExit("fam_attention.py: error: the attention returned no weights; it needs eager attention.")
            if weights.shape[-1] != fam_length or weights.shape[-2] != fam_length:  # not the S0 pass
                calls.setdefault(index, []).append(weights[0].float())

        handles.append(layer.self_attn.register_forward_hook(keep))
    try:
        with torch.no_grad():
            hidden_states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    return calls, hidden_states


def state_after(model, ids: list[int]) -> torch.Tensor:
    """The FAM state (layers, F, hidden) a stream leaves behind after `ids` (whole blocks)."""
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.tensor([ids]), cache=cache)
    return torch.stack([state[0].float() for state in cache.fam_state()])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a converted or merged FAM checkpoint folder")
    parser.add_argument("--filler", type=int, default=128, help="filler tokens between the needle and the question")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--key-digits", type=int, default=2)
    args = parser.parse_args()
    if args.trials < 1 or args.key_digits < 1 or args.filler < 0:
        parser.error("--trials and --key-digits must be at least 1, and --filler a number of tokens >= 0")
    try:
        model, tokenizer = load_fam(args.model, dtype="float32")
    except EvaluationError as error:
        raise SystemExit(f"fam_attention.py: error: {error}") from None
    config = model.config
    if config.fam_length == 0:
        raise SystemExit(f"fam_attention.py: error: {args.model} has no FAM (fam_length 0).")
    model.set_attn_implementation("eager")
    F, B = config.fam_length, config.block_size
    layers = config.num_hidden_layers
    heads = config.text_config.num_attention_heads
    write = torch.zeros(args.trials, layers, heads)  # per head: share of attention, one row per trial
    read = torch.zeros(args.trials, layers, heads)
    written = torch.zeros(args.trials, layers)
    sink = torch.zeros(args.trials, layers)  # the question block's queries -> FAM keys, mean over heads and queries
    token_norm = torch.zeros(args.trials, layers)
    for trial in range(args.trials):
        example = passkey_example(tokenizer, random.Random(trial), args.filler, depth=0.0, key_digits=args.key_digits)
        ids = example.prompt_ids + example.answer_ids[: -args.key_digits]  # up to the answer's first digit
        digits = [p for p in range(example.info["needle_start"], len(example.prompt_ids)) if tokenizer.decode([ids[p]]).strip().isdigit()]
        if not digits:
            raise SystemExit("fam_attention.py: error: no digit tokens found in the needle; this tokenizer writes the key otherwise.")
        needle = digits[0]  # the key's first digit: its block is the one whose FAM queries must read it
        digits = [p for p in digits if p // B == needle // B]
        if (len(ids) - 1) // B == needle // B:
            raise SystemExit(
                f"fam_attention.py: error: with --filler {args.filler} the key and the question share block "
                f"{needle // B} (B = {B}); give a longer --filler so that the question's block sees it only through the FAM."
            )
        calls, hidden_states = attention_calls(model, ids)
        for layer in range(layers):
            blocks = calls[layer]
            needle_call, question_call = blocks[needle // B], blocks[-1]
            block_start = (needle // B) * B
            columns = [needle_call.shape[-1] - (needle_call.shape[-2] - F) + p - block_start for p in digits]
            to_digits = needle_call[:, :F][..., columns].sum(-1).mean(-1)  # per head: FAM queries -> key digits
            to_fam = question_call[:, -1, :F].sum(-1)  # per head: the answer's position -> FAM keys
            write[trial, layer], read[trial, layer] = to_digits, to_fam
            sink[trial, layer] = question_call[:, F:, :F].sum(-1).mean()
            token_norm[trial, layer] = hidden_states[layer][0].float().norm(dim=-1).median()
        key = example.info["key"]
        other = "".join(str((int(d) + 5) % 10) for d in key)  # every digit differs
        twin = passkey_example(tokenizer, random.Random(trial), args.filler, depth=0.0, key=other)
        end = (needle // B + 1) * B  # through the needle's block, which completes
        state_a, state_b = state_after(model, example.prompt_ids[:end]), state_after(model, twin.prompt_ids[:end])
        written[trial] = ((state_a - state_b).norm(dim=-1) / state_a.norm(dim=-1)).mean(-1)
    write, read, written = write.mean(0), read.mean(0), written.mean(0)  # (layers, heads), (layers,)
    sink, token_norm = sink.mean(0), token_norm.mean(0)
    with torch.no_grad():
        initial_norms = torch.stack([state[0].float().norm(dim=-1) for state in model.initial_fam_state(1)])  # (layers, F)
    print(
        f"{args.model}: B={B} M={config.memory_segments} F={F}, needle at depth 0, filler {args.filler}, "
        f"{args.trials} trials; shares of attention, mean over heads (the largest head's, and which head)"
    )
    print(
        "layer | FAM queries -> key digits (needle's block) | key-dependent share of S[l] | answer -> FAM keys "
        "(question's block) | all its queries -> FAM keys | |S0[l]| rows: mean (largest) | a token's |x| (median)"
    )
    for layer in range(layers):
        cells = [f"{share[layer].mean():.3f} ({share[layer].max():.3f}, head {int(share[layer].argmax())})" for share in (write, read)]
        norms = initial_norms[layer]
        print(
            f"{layer:5d} | {cells[0]} | {written[layer]:.4f} | {cells[1]} | {sink[layer]:.3f} | "
            f"{norms.mean():.1f} ({norms.max():.1f}) | {token_norm[layer]:.1f}"
        )


if __name__ == "__main__":
    main()

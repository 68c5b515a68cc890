"""Is FAM's late-stream degradation (benchmarks/long_stream.py) the state's drift over many blocks or the absolute
positions? Scores tokens 45,056-65,536 of the KJV text with fresh streams, at positions 0.. and at the positions the
long stream gave them (offset 45,055). Recorded (2026-11-29, runs/smollm2_fam_default = `hf-fam convert` defaults):
11.497 and 11.497, against 18.4 for BSWA and 39.8 for FAM over the same tokens in the long stream: the positions
change nothing, the state carried over 44 blocks does.

    python benchmarks/position_offset_check.py FAM_FOLDER [TEXT_FILE]
"""
import math, sys, torch
import hf_fam  # noqa: F401  (registers the Auto classes)
from transformers import AutoModelForCausalLM, AutoTokenizer
path, start, end = sys.argv[1], 45056, 65536
text = sys.argv[2] if len(sys.argv) > 2 else "kjv.txt"
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ids = tok(open(text).read()[:400000], return_tensors="pt").input_ids[0]
piece = ids[start - 1 : end][None]  # the token before `start` predicts the first scored token
for offset in (0, start - 1):
    cache, total, count = None, 0.0, 0
    with torch.no_grad():
        for i in range(0, piece.shape[1], 1024):
            chunk = piece[:, i : i + 1025]
            if chunk.shape[1] < 2: break
            out = model(chunk[:, :1024] if chunk.shape[1] > 1024 else chunk[:, :-1], cache=cache, use_cache=True,
                        fam_position_offset=offset if cache is None else None)
            cache = out.past_key_values
            targets = chunk[:, 1 : out.logits.shape[1] + 1]
            lp = torch.log_softmax(out.logits[:, : targets.shape[1]].float(), -1).gather(-1, targets[..., None])
            total -= lp.sum().item(); count += targets.numel()
            if chunk.shape[1] <= 1024: break
    print(f"{path}: fresh stream over tokens {start}-{end}, position offset {offset}: perplexity {math.exp(total / count):.3f} ({count} tokens)", flush=True)

"""Does a FAM model carry *anything* of a passkey across a block boundary? A diagnostic for runs that stay at chance.

    python recipes/key_sensitivity.py runs/merged_short_200 --fillers 64 128 --trials 12 --key-digits 2

For each trial, two passkey examples identical but for the key (needle right after the instruction, depth 0, so it
lies blocks before the question when the filler is long enough) go through the model and through its BSWA twin
(the same weights with F = 0). The distribution the model gives the answer's first digit, at the position right
before it, is compared between the two keys: its total variation distance is 0 for a model blind to the key (BSWA
past its receptive field, exactly), and near 1 for one that reads it. Exact match of that digit is counted too. A
tiny but non-zero distance for FAM means the memory carries a trace of the key that the model does not decode.
"""

from __future__ import annotations

import argparse
import random

import torch

from hf_fam.conversion import bswa_twin
from hf_fam.evaluation import EvaluationError, load_fam
from hf_fam.tasks import passkey_example


def first_digit_distribution(model, ids: list[int], digit_ids: list[int]) -> torch.Tensor:
    """p(first answer digit | prompt and the answer's leading space) over the ten digits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return torch.softmax(logits[digit_ids].float(), -1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a merged FAM checkpoint folder")
    parser.add_argument("--fillers", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--key-digits", type=int, default=2)
    args = parser.parse_args()
    if args.trials < 1 or args.key_digits < 1 or any(filler < 0 for filler in args.fillers):
        parser.error("--trials and --key-digits must be at least 1, and --fillers numbers of tokens >= 0")

    try:
        fam, tokenizer = load_fam(args.model, dtype="float32")  # the evaluation's loader: a clear error for a bad path
    except EvaluationError as error:
        raise SystemExit(f"key_sensitivity.py: error: {error}") from None
    if fam.config.fam_length == 0:
        raise SystemExit(f"key_sensitivity.py: error: {args.model} has no FAM (fam_length 0): it is BSWA already.")
    models = {"FAM": fam, "BSWA": bswa_twin(fam).eval()}
    digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    low, high = 10 ** (args.key_digits - 1), 10**args.key_digits
    for filler in args.fillers:
        distance = {name: 0.0 for name in models}
        right = dict.fromkeys(models, 0)
        for trial in range(args.trials):
            rng = random.Random(trial)
            key_a = rng.randrange(low, high)
            key_b = rng.choice([k for k in range(low, high) if str(k)[0] != str(key_a)[0]])  # another first digit
            prompts = []
            for key in (key_a, key_b):
                example = passkey_example(tokenizer, random.Random(trial), filler, depth=0.0, key=key)
                digits = example.answer_ids[-args.key_digits :]
                if [tokenizer.decode([t]).strip() for t in digits] != list(str(key)):
                    raise SystemExit(
                        "key_sensitivity.py: error: this tokenizer does not write the key one token per digit; the "
                        "diagnostic compares distributions over the ten digit tokens and needs that."
                    )
                prompts.append(example.prompt_ids + example.answer_ids[: -args.key_digits])  # up to the first digit
            for name, model in models.items():
                p_a, p_b = (first_digit_distribution(model, ids, digit_ids) for ids in prompts)
                distance[name] += 0.5 * float((p_a - p_b).abs().sum()) / args.trials
                right[name] += int(p_a.argmax()) == int(str(key_a)[0])
        print(
            f"filler {filler}, needle at depth 0: total variation between two keys' first-digit distributions "
            + ", ".join(f"{name} {distance[name]:.5f}" for name in models)
            + "; first digit right "
            + ", ".join(f"{name} {right[name]}/{args.trials}" for name in models)
        )


if __name__ == "__main__":
    main()

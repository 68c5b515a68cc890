"""Working memory forms: a tiny Llama trained from scratch through hf_fam's own model retrieves a key from far beyond
what its attention can reach, and the same model without FAM rows cannot.

With memory_segments = 0 a block attends to nothing of the past but the FAM, so the only way a key read in the first
block can reach the question at the end of the sequence is through the FAM state, carried block after block.
"""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_fam
from hf_fam.conversion import bswa_twin


BLOCK = 16
DISTANCE = 4  # training mixes filler distances from 0 to DISTANCE blocks
DIGITS = list(range(10))  # the key is one of these token ids
MARK, QUERY = 10, 11
FILLER = list(range(12, 32))
VOCAB = 32


def key_retrieval_batch(rng: random.Random, batch: int, distance: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) of `batch` sequences [MARK, key, filler ..., QUERY, key] spanning distance + 1 blocks: the key in
    the first block, the question in the last one; only the answer carries a label."""
    length = (distance + 1) * BLOCK
    ids, labels = [], []
    for _ in range(batch):
        key = rng.choice(DIGITS)
        filler = [rng.choice(FILLER) for _ in range(length - 4)]
        ids.append([MARK, key, *filler, QUERY, key])
        labels.append([-100] * (length - 1) + [key])
    return torch.tensor(ids), torch.tensor(labels)


def train_key_retrieval(fam_length: int, fam_update: str, steps: int = 600, seed: int = 0, **fam_settings):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )
    base = LlamaForCausalLM(config)
    model = hf_fam.convert_to_fam(
        base, block_size=BLOCK, memory_segments=0, fam_length=fam_length, fam_update=fam_update, **fam_settings
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 200))
    rng = random.Random(seed)
    for _ in range(steps):
        ids, labels = key_retrieval_batch(rng, 32, rng.randint(0, DISTANCE))
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def retrieval_accuracy(model, distance: int, trials: int = 256, seed: int = 1) -> float:
    ids, labels = key_retrieval_batch(random.Random(seed), trials, distance)
    logits = model(ids[:, :-1], logits_to_keep=1).logits[:, -1, : len(DIGITS)]
    return (logits.argmax(-1) == labels[:, -1]).float().mean().item()


@pytest.fixture(scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as measured in the issue: one thread, fixed seeds
    yield
    torch.set_num_threads(previous)


def test_fam_carries_a_key_far_beyond_the_attention_window_and_bswa_cannot(one_thread):
    """The default update (gated). Measured on this machine with the same code (2026-11-29), FAM accuracy at 4 / 8 /
    32 / 128 filler blocks: gated 100% / 100% / 93.0% / 80.5%, final gates 0.16 / 0.09; the paper's update
    (fam_update="replace") 100% / 100% / 100% at 4 / 8 / 32; BSWA 8.2% / 13.7% / 7.0% (chance 10%). BSWA here is the
    trained model's own weights without FAM rows (`bswa_twin`), checked to be blind to the key (a BSWA trained on its
    own is at chance for the same reason), so no second model is trained."""
    fam_update = "gated"
    fam = train_key_retrieval(4, fam_update)
    bswa = bswa_twin(fam).eval()
    distances = (DISTANCE, 2 * DISTANCE, 8 * DISTANCE)
    fam_accuracy = {d: retrieval_accuracy(fam, d) for d in distances}
    bswa_accuracy = {d: retrieval_accuracy(bswa, d) for d in distances}
    print(f"\nfam_update={fam_update}: FAM (F=4) accuracy {fam_accuracy}; BSWA (F=0) accuracy {bswa_accuracy}; chance 0.1")
    if fam.fam_gate is not None:
        print(f"gates after training: {fam.fam_gate.weight.tolist()}")
    assert fam_accuracy[DISTANCE] >= 0.99 and fam_accuracy[2 * DISTANCE] >= 0.99
    assert fam_accuracy[8 * DISTANCE] >= 0.90
    # BSWA cannot see the key at all: its answer logits do not change when every key is replaced by another digit
    for distance in distances:
        ids, _ = key_retrieval_batch(random.Random(1), 64, distance)
        other = ids.clone()
        other[:, 1] = (ids[:, 1] + 1) % len(DIGITS)
        with torch.no_grad():
            logits, other_logits = (bswa(x[:, :-1], logits_to_keep=1).logits for x in (ids, other))
        assert torch.equal(logits, other_logits), f"BSWA saw the key {distance} blocks back"

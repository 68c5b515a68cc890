"""Training-mode behaviour: loss, gradients across blocks and into the FAM prompt, gradient checkpointing."""

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, assert_logits_close, random_ids, tiny_base
from test_fam_core import randomize_fam_prompt

import hf_fam


def test_labels_give_shifted_causal_lm_loss_from_block_rows():
    fam = randomize_fam_prompt(hf_fam.convert_to_fam(tiny_base("llama"), block_size=6, memory_segments=1, fam_length=2))
    ids = random_ids(2, 20)
    labels = ids.clone()
    labels[0, :5] = -100
    out = fam(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    assert out.logits.shape == (2, 20, 256)  # block rows only: no FAM row produces logits


@pytest.mark.parametrize("family", FAMILIES)
def test_fam_prompt_gets_gradient_from_a_loss_on_the_last_block(family):
    fam = hf_fam.convert_to_fam(tiny_base(family), block_size=5, memory_segments=0, fam_length=3)
    fam = randomize_fam_prompt(fam).train()
    ids = random_ids(1, 20)
    labels = torch.full_like(ids, -100)
    labels[0, 16:] = ids[0, 16:]  # only the last block carries loss; with M = 0 it sees the past only via FAM
    fam(ids, labels=labels).loss.backward()
    grad = fam.fam_prompt.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # gradients flow across blocks into the embeddings of tokens of earlier blocks (no stop-gradient)
    embed_grad = fam.model.embed_tokens.weight.grad
    assert embed_grad[ids[0, :5]].abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3", "mixtral"])
def test_gradient_checkpointing_keeps_memory_segments_and_gradients(family):
    """Under checkpointing the BSWA limit still equals the base model (memory segments are not dropped) and every
    gradient equals the one computed without checkpointing."""
    ids = random_ids(2, 24)
    labels = ids.clone()

    def run(checkpointing, fam_length, seed=0):
        base = tiny_base(family, seed=seed)
        fam = hf_fam.convert_to_fam(base, block_size=6, memory_segments=3, fam_length=fam_length)
        fam = randomize_fam_prompt(fam) if fam_length else fam
        fam.train()
        if checkpointing:
            fam.activation_checkpointing_enable()
        out = fam(ids, labels=labels)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in fam.named_parameters() if p.grad is not None}
        return base, out.logits.detach(), grads

    base, logits, _ = run(True, 0)
    with torch.no_grad():
        expected = base.eval()(ids).logits
    assert_logits_close(logits, expected, what="BSWA-limit logits under checkpointing")

    _, logits_plain, grads_plain = run(False, 2)
    _, logits_ckpt, grads_ckpt = run(True, 2)
    assert_logits_close(logits_ckpt, logits_plain)
    assert grads_plain.keys() == grads_ckpt.keys() and "fam_prompt.weight" in grads_plain
    for name in grads_plain:
        assert_logits_close(grads_ckpt[name], grads_plain[name], rtol=1e-4, what=f"gradient of {name}")

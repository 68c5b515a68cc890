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
    gradient equals the one computed without checkpointing, also on a sequence longer than the (M+1)B window (the
    recompute of an early block must see its own memory, not the later blocks that replaced it in the cache)."""
    ids = random_ids(2, 24)
    labels = ids.clone()

    def run(checkpointing, fam_length, memory_segments, seed=0):
        base = tiny_base(family, seed=seed)
        fam = hf_fam.convert_to_fam(base, block_size=6, memory_segments=memory_segments, fam_length=fam_length)
        fam = randomize_fam_prompt(fam) if fam_length else fam
        fam.train()
        if checkpointing:
            fam.activation_checkpointing_enable()
        out = fam(ids, labels=labels)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in fam.named_parameters() if p.grad is not None}
        return base, out.logits.detach(), grads

    base, logits, _ = run(True, 0, memory_segments=3)
    with torch.no_grad():
        expected = base.eval()(ids).logits
    assert_logits_close(logits, expected, what="BSWA-limit logits under checkpointing")

    for fam_length, memory_segments in ((2, 3), (2, 1), (0, 1)):
        _, logits_plain, grads_plain = run(False, fam_length, memory_segments)
        _, logits_ckpt, grads_ckpt = run(True, fam_length, memory_segments)
        assert_logits_close(logits_ckpt, logits_plain)
        assert grads_plain.keys() == grads_ckpt.keys()
        assert ("fam_prompt.weight" in grads_plain) == (fam_length > 0)
        for name in grads_plain:
            assert_logits_close(grads_ckpt[name], grads_plain[name], rtol=1e-4, what=f"gradient of {name} (M={memory_segments})")


def test_lora_adapters_of_the_base_model_apply_unchanged(tmp_path):
    """State-dict keys are the base's own, so a LoRA adapter trained on the base loads onto the FAM model; in the BSWA
    limit the result equals base + adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model

    ids = random_ids(1, 30)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)
    adapted_base = get_peft_model(tiny_base("llama"), lora).eval()
    adapted_base.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = adapted_base(ids).logits
        plain = tiny_base("llama")(ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapter does change the model
    fam = hf_fam.convert_to_fam(tiny_base("llama"), block_size=8, memory_segments=3, fam_length=0)
    adapted_fam = PeftModel.from_pretrained(fam, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_logits_close(adapted_fam(ids).logits, expected)


def test_peft_lora_trains_adapters_and_the_fam_prompt_together(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    fam = randomize_fam_prompt(hf_fam.convert_to_fam(tiny_base("qwen3"), block_size=6, memory_segments=0, fam_length=2))
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["fam_prompt"], task_type="CAUSAL_LM")
    model = get_peft_model(fam, config).train()
    ids = random_ids(2, 20)
    model(ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in grads) and any("fam_prompt" in name for name in grads)
    assert all(g is not None and g.abs().sum() > 0 for name, g in grads.items() if "fam_prompt" in name or "lora_B" in name)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as f:
        assert any("fam_prompt" in key for key in f.keys())


def test_random_state_passing_starts_a_stream_from_a_given_fam_state():
    """fam_state= starts a new stream from an earlier stream's final state (the paper's random state passing)."""
    fam = randomize_fam_prompt(hf_fam.convert_to_fam(tiny_base("llama"), block_size=5, memory_segments=0, fam_length=2)).eval()
    first, second = random_ids(1, 20, seed=1), random_ids(1, 12, seed=2)
    with torch.no_grad():
        state = fam(first, use_cache=True).past_key_values.fam_state()
        restarted = fam(second, fam_state=state).logits
        from_s0 = fam(second, fam_state=fam.initial_fam_state(1)).logits
        default = fam(second).logits
    assert not torch.allclose(restarted, default)  # the state carried the first stream into the second
    assert_logits_close(from_s0, default)
    with pytest.raises(ValueError, match="fam_state must hold one"):
        fam(second, fam_state=state[:1])

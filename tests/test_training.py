"""Training-mode behaviour: loss, gradients across blocks and into the FAM prompt, gradient checkpointing."""

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, assert_logits_close, random_ids, tiny_base
from test_fam_core import randomize_fam

import hf_fam


def test_labels_give_shifted_causal_lm_loss_from_block_rows():
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("llama"), block_size=6, memory_segments=1, fam_length=2))
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
    fam = randomize_fam(fam).train()
    ids = random_ids(1, 20)
    labels = torch.full_like(ids, -100)
    labels[0, 16:] = ids[0, 16:]  # only the last block carries loss; with M = 0 it sees the past only via FAM
    fam(ids, labels=labels).loss.backward()
    grad = fam.fam_prompt.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # gradients flow across blocks into the embeddings of tokens of earlier blocks (no stop-gradient)
    embed_grad = fam.model.embed_tokens.weight.grad
    assert embed_grad[ids[0, :5]].abs().sum() > 0


@pytest.mark.parametrize(
    "family, attn",
    [("llama", "eager"), ("llama", "sdpa"), ("gemma2", "eager"), ("qwen3", "eager"), ("qwen3", "sdpa"), ("mixtral", "sdpa")],
)
def test_gradient_checkpointing_keeps_memory_segments_and_gradients(family, attn):
    """Under checkpointing the BSWA limit still equals the base model (memory segments are not dropped) and every
    gradient equals the one computed without checkpointing, also on a sequence longer than the (M+1)B window (the
    recompute of an early block must see its own memory, not the later blocks that replaced it in the cache)."""
    ids = random_ids(2, 24)
    labels = ids.clone()

    def run(checkpointing, fam_length, memory_segments, seed=0):
        base = tiny_base(family, attn, seed=seed)
        fam = hf_fam.convert_to_fam(base, block_size=6, memory_segments=memory_segments, fam_length=fam_length)
        fam = randomize_fam(fam) if fam_length else fam
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

    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("qwen3"), block_size=6, memory_segments=0, fam_length=2))
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
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("llama"), block_size=5, memory_segments=0, fam_length=2)).eval()
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


# ------------------------------------------------------------------------------ checkpointing in every mode
CHECKPOINTING_MODES = {
    "non-reentrant": {"use_reentrant": False},
    "reentrant": {"use_reentrant": True},
    "torch default": {},  # what peft's prepare_model_for_kbit_training passes
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("fam_update", ["gated", "replace"])
@pytest.mark.parametrize("mode", list(CHECKPOINTING_MODES))
@pytest.mark.parametrize("memory_segments", [1, 3])
def test_every_checkpointing_mode_gives_the_gradients_of_none(mode, memory_segments, fam_update, attn):
    """Reentrant checkpointing carries gradients only through the positional inputs of the checkpointed function;
    the memory keys/values read by a layer call must be among them, or their gradients are lost."""
    ids = random_ids(2, 24)

    def gradients(kwargs):
        fam = hf_fam.convert_to_fam(
            tiny_base("llama", attn, seed=3), block_size=6, memory_segments=memory_segments, fam_length=2, fam_update=fam_update
        )
        fam = randomize_fam(fam).train()
        if kwargs is not None:
            fam.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            assert fam.is_activation_checkpointing
        loss = fam(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in fam.named_parameters() if p.grad is not None}

    loss_plain, plain = gradients(None)
    loss_ckpt, ckpt = gradients(CHECKPOINTING_MODES[mode])
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-6, atol=0)
    assert plain.keys() == ckpt.keys() and "fam_prompt.weight" in plain
    for name in plain:
        assert_logits_close(ckpt[name], plain[name], rtol=1e-5, what=f"gradient of {name} ({mode})")


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpointing_with_peft_lora_gives_the_gradients_of_none(mode):
    """Frozen base, LoRA adapters and the FAM prompt trained: the usual fine-tuning setup, every second layer
    checkpointed (every_n_layers=2)."""
    from peft import LoraConfig, get_peft_model

    ids = random_ids(2, 24)

    def gradients(kwargs):
        fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("qwen3", seed=4, num_hidden_layers=4), block_size=6, memory_segments=1, fam_length=2))
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["fam_prompt", "fam_gate"], init_lora_weights=False)
        torch.manual_seed(0)
        model = get_peft_model(fam, lora).train()
        if kwargs is not None:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=2)
        model(ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = gradients(None), gradients(CHECKPOINTING_MODES[mode])
    assert any("lora_A" in name for name in plain) and any("fam_gate" in name for name in plain)
    for name in plain:
        assert plain[name] is not None and ckpt[name] is not None, name
        assert_logits_close(ckpt[name], plain[name], rtol=1e-5, what=f"gradient of {name} ({mode})")


# ------------------------------------------------------------------------------------ random state passing
def test_state_of_the_previous_training_step_starts_the_next_one():
    """Random state passing: the final FAM state of step k starts step k+1 with no gradient path back into step k
    (its graph is freed by step k's backward)."""
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("llama"), block_size=5, memory_segments=0, fam_length=2)).train()
    optimizer = torch.optim.SGD(fam.parameters(), lr=1e-2)
    state = None
    for step in range(3):
        ids = random_ids(1, 20, seed=step)
        out = fam(ids, labels=ids, fam_state=state, use_cache=True)
        out.loss.backward()  # the second step failed with "backward through the graph a second time"
        optimizer.step()
        optimizer.zero_grad()
        cache = out.past_key_values
        assert all(s.grad_fn is not None for s in cache.fam_state())  # the state is part of this step's graph
        state = cache.fam_state()
    # what the next step starts from is the state's value, detached
    with torch.no_grad():
        ids = random_ids(1, 20, seed=9)
        given = fam(ids, fam_state=state).logits
        as_data = fam(ids, fam_state=tuple(s.detach().clone() for s in state)).logits
    assert_logits_close(given, as_data, rtol=0)


# ------------------------------------------------------------------------------------------------- peft
def test_peft_picks_the_base_familys_default_targets_and_all_linear():
    import peft
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    assert peft  # imported before the model is built, as a training script does
    fam = hf_fam.convert_to_fam(tiny_base("mistral"), block_size=6, memory_segments=1, fam_length=2)
    model = get_peft_model(fam, LoraConfig(r=2, task_type="CAUSAL_LM"))
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == set(defaults["mistral"]) == {"q_proj", "v_proj"}

    fam = hf_fam.convert_to_fam(tiny_base("llama"), block_size=6, memory_segments=1, fam_length=2)
    model = get_peft_model(fam, LoraConfig(r=2, task_type="CAUSAL_LM", target_modules="all-linear"))
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head


# --------------------------------------------------------------------------------- forward's arguments
def test_forward_refuses_unknown_arguments_and_unsupported_outputs():
    fam = hf_fam.convert_to_fam(tiny_base("llama"), block_size=6, memory_segments=1, fam_length=2).eval()
    ids = random_ids(1, 10)
    with pytest.raises(TypeError, match="'fam_positon_offset'"):
        fam(ids, fam_positon_offset=5)
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        fam(ids, output_attentions=True)
    with pytest.raises(ValueError, match="needs a mixture-of-experts base model"):
        fam(ids, output_router_logits=True)
    with torch.no_grad():
        as_tuple = fam(ids, labels=ids, return_dict=False)
        as_output = fam(ids, labels=ids)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_output.loss)
    torch.testing.assert_close(as_tuple[1], as_output.logits)


def test_num_items_in_batch_normalises_the_loss_as_the_trainer_asks():
    fam = hf_fam.convert_to_fam(tiny_base("llama"), block_size=6, memory_segments=1, fam_length=2).eval()
    ids = random_ids(2, 12)
    with torch.no_grad():
        mean = fam(ids, labels=ids).loss
        summed = fam(ids, labels=ids, num_items_in_batch=torch.tensor(1)).loss
    torch.testing.assert_close(summed, mean * 2 * 11)


def test_mixtral_router_loss_in_the_bswa_limit_equals_the_base_models():
    base = tiny_base("mixtral", sliding_window=None)
    ids = random_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # padding is not routed
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100  # the first real token of the left-padded row is predicted from a padding row's logits
    with torch.no_grad():
        expected = base(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    fam = hf_fam.convert_to_fam(base, block_size=5, memory_segments=3, fam_length=0)
    with torch.no_grad():
        actual = fam(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    torch.testing.assert_close(actual.aux_loss, expected.aux_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=0)
    assert actual.loss > fam(ids, attention_mask=mask, labels=labels).loss  # the aux loss is added, with its coefficient


def test_mixtral_router_loss_trains_the_routers_with_fam_rows():
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("mixtral"), block_size=5, memory_segments=1, fam_length=2)).train()
    ids = random_ids(2, 20)
    out = fam(ids, labels=ids, output_router_logits=True)
    assert out.aux_loss > 0 and len(out.router_logits) > 0
    # every routed row is counted: 2 rows x 20 tokens per layer, plus the FAM rows of the calls that carry them
    routed = sum(r.shape[0] for r in out.router_logits)
    assert routed > 2 * 20 * fam.config.num_hidden_layers
    out.aux_loss.backward()
    routers = [p.grad for name, p in fam.named_parameters() if name.endswith("gate.weight") and "mlp" in name]
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)


# ------------------------------------------------------------------------------ distributed wrapping
def test_no_split_modules_name_the_base_decoder_layer_for_fsdp_and_device_maps(tmp_path):
    from accelerate import infer_auto_device_map
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from transformers import AutoModelForCausalLM

    fam = hf_fam.convert_to_fam(tiny_base("qwen2"), block_size=6, memory_segments=1, fam_length=2)
    layer_class = type(fam.model.layers[0]).__name__
    assert layer_class in fam._no_split_modules
    peft_model = get_peft_model(fam, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["fam_prompt"]))
    policy = fsdp_auto_wrap_policy(peft_model)  # raises when no _no_split_modules class is found in the model
    assert policy is not None
    device_map = infer_auto_device_map(fam, no_split_module_classes=fam._no_split_modules)
    assert device_map
    fam.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto")
    assert isinstance(loaded, hf_fam.FamForCausalLM) and layer_class in loaded._no_split_modules


@pytest.mark.parametrize("kwargs", [{"use_reentrant": False}, {"use_reentrant": True}])
def test_mixtral_router_loss_under_checkpointing_gives_the_gradients_of_none(kwargs):
    """The router logits are recorded inside checkpointed layer calls; the recomputation must see the same graph."""
    ids = random_ids(2, 20)

    def gradients(checkpointing):
        fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("mixtral", seed=5), block_size=5, memory_segments=1, fam_length=2)).train()
        if checkpointing:
            fam.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        out = fam(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        return out.aux_loss.detach(), {name: p.grad for name, p in fam.named_parameters() if p.grad is not None}

    (aux_plain, plain), (aux_ckpt, ckpt) = gradients(False), gradients(True)
    torch.testing.assert_close(aux_ckpt, aux_plain, rtol=1e-6, atol=0)
    for name in plain:
        assert_logits_close(ckpt[name], plain[name], rtol=1e-5, what=f"gradient of {name}")


def test_gradients_of_a_left_padded_batch_are_those_of_its_rows_alone():
    """A batch with uneven left padding runs block-aligned (rows moved so their blocks end on the same columns); the
    gradients flow back through that move: they equal the sum of each row's own gradients."""
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("llama", seed=4), block_size=4, memory_segments=1, fam_length=2))
    fam.train()
    ids = random_ids(3, 19, seed=9)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    weights = torch.randn(3, 19, 256, generator=torch.Generator().manual_seed(1))

    def gradients(run):
        fam.zero_grad()
        run().backward()
        return {name: p.grad.clone() for name, p in fam.named_parameters() if p.grad is not None}

    def batched():
        return (fam(ids, attention_mask=mask).logits * weights)[mask.bool()].sum()

    def rows_alone():
        total = 0
        for row in range(3):
            keep = mask[row].bool()
            total = total + (fam(ids[row][keep][None]).logits[0] * weights[row][keep]).sum()
        return total

    expected, actual = gradients(rows_alone), gradients(batched)
    assert expected.keys() == actual.keys() and "fam_prompt.weight" in actual
    for name in expected:
        assert_logits_close(actual[name], expected[name], rtol=1e-4, what=f"gradient of {name}")

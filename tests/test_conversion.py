"""The public API of the FAM core: conversion, configuration, saving and loading, unconversion, bad input."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILIES, assert_logits_close, random_ids, tiny_base, tiny_config
from test_fam_core import randomize_fam
from transformers import AutoConfig, AutoModelForCausalLM

import hf_fam
from hf_fam import FamConfig, FamForCausalLM, UnsupportedArchitectureError, modeling_fam
from hf_fam.configuration_fam import DEFAULT_BLOCK_SIZE


def test_convert_shares_weights_and_adds_only_the_fam_prompt_and_gates():
    base = tiny_base("llama")
    base_keys = set(base.state_dict())
    fam = hf_fam.convert_to_fam(base, block_size=16, memory_segments=2, fam_length=4)
    assert fam.config.fam_update == "gated"  # the default
    assert set(fam.state_dict()) == base_keys | {"fam_prompt.weight", "fam_gate.weight"}
    assert fam.fam_prompt.weight.shape == (4, 64)
    assert torch.equal(fam.fam_gate.weight, torch.full((2,), fam.config.fam_gate_init)) and fam.config.fam_gate_init == 0.1
    papers = hf_fam.convert_to_fam(base, block_size=16, memory_segments=2, fam_length=4, fam_update="replace")
    assert set(papers.state_dict()) == base_keys | {"fam_prompt.weight"} and papers.fam_gate is None
    assert fam.model.layers[0].self_attn.q_proj.weight is base.model.layers[0].self_attn.q_proj.weight
    assert isinstance(fam.fam_prompt, torch.nn.Module)


def test_config_answers_base_attributes_and_defaults():
    base_config = tiny_config("qwen2")
    config = FamConfig(text_config=base_config)
    assert (config.block_size, config.memory_segments, config.fam_length) == (1024, 3, 64)
    assert config.hidden_size == 64 and config.num_hidden_layers == 2 and config.vocab_size == 256
    assert config.get_text_config() is base_config
    assert AutoConfig.for_model("fam", text_config=base_config.to_dict()).text_config.model_type == "qwen2"


def test_fam_prompt_initialised_from_token_embeddings_after_scaling():
    """Rule 1: a prompt initialised from tokens is embed_tokens(ids), which for gemma includes its scaling."""
    base = tiny_base("gemma")
    fam = hf_fam.convert_to_fam(base, block_size=8, fam_length=3, fam_prompt_init="token_ids", fam_prompt_token_ids=[5, 6, 7])
    with torch.no_grad():
        expected = base.model.embed_tokens(torch.tensor([5, 6, 7]))
    assert torch.equal(fam.fam_prompt.weight, expected)
    assert not torch.allclose(expected, base.model.embed_tokens.weight[5:8])  # gemma scales by sqrt(hidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_from_pretrained_round_trip(family, tmp_path):
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base(family), block_size=7, memory_segments=1, fam_length=2))
    ids = random_ids(2, 25)
    with torch.no_grad():
        expected = fam(ids).logits
    fam.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "fam" and config["text_config"]["model_type"] == family
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fam.FamForCausalLM"
    assert {"modeling_fam.py", "configuration_fam.py", "cache_fam.py", "model.safetensors"} <= set(os.listdir(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert isinstance(loaded, FamForCausalLM)
    assert loaded.model.config._attn_implementation == "eager"
    with torch.no_grad():
        actual = loaded(ids).logits
    # identical weights; only float rounding may differ (small matmuls round by the memory alignment of loaded weights)
    assert_logits_close(actual, expected, rtol=1e-6)
    # with the default attention implementation (sdpa where the family has it)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_logits_close(loaded(ids).logits, expected)
    if loaded.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_a_checkpoint_saved_before_the_update_option_loads_with_the_papers_update(tmp_path):
    """Configurations written before `fam_update` existed have no such key: they mean rule 5 as written."""
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("llama"), block_size=5, memory_segments=0, fam_length=2, fam_update="replace"))
    fam.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["fam_update"], config["fam_gate_init"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.fam_update == "replace" and loaded.fam_gate is None
    ids = random_ids(1, 23)
    with torch.no_grad():
        assert_logits_close(loaded(ids).logits, fam.eval()(ids).logits)
    assert FamConfig(text_config=tiny_config("llama")).fam_update == "gated"  # a new configuration: the default


def test_fam_config_of_a_base_folder_wraps_the_base_configuration(tmp_path):
    """FamConfig.from_pretrained(a base model's folder), as peft calls it when saving an adapter: the base's
    configuration with the default FAM settings, not a FamConfig of the wrong type."""
    tiny_base("qwen2").save_pretrained(tmp_path)
    config = FamConfig.from_pretrained(tmp_path)
    assert config.text_config.model_type == "qwen2" and config.vocab_size == tiny_config("qwen2").vocab_size
    assert (config.block_size, config.fam_update) == (DEFAULT_BLOCK_SIZE, "gated")


def test_save_and_load_without_fam_rows(tmp_path):
    fam = hf_fam.convert_to_fam(tiny_base("mistral"), block_size=8, memory_segments=1, fam_length=0)
    fam.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = random_ids(1, 20)
    with torch.no_grad():
        assert_logits_close(loaded(ids).logits, fam.eval()(ids).logits, rtol=1e-6)


_REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    class NoHfFam(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "hf_fam" or name.startswith("hf_fam."):
                raise ImportError("hf_fam is not installed here")
    sys.meta_path.insert(0, NoHfFam())
    try:
        import hf_fam
    except ImportError:
        pass
    else:
        raise SystemExit("hf_fam should not be importable in this test")
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, attn_implementation="eager").eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(ids).logits
    torch.save(logits, sys.argv[3])
    """
)


def test_trust_remote_code_loads_where_hf_fam_is_not_installed(tmp_path):
    fam = randomize_fam(hf_fam.convert_to_fam(tiny_base("qwen3"), block_size=6, memory_segments=1, fam_length=2))
    ids = random_ids(1, 20)
    with torch.no_grad():
        expected = fam.eval()(ids).logits
    fam.save_pretrained(tmp_path / "model")
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(_REMOTE_CODE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_logits_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-6)


def test_convert_from_a_local_folder(tmp_path):
    base = tiny_base("phi3")
    base.save_pretrained(tmp_path)
    fam = hf_fam.convert_to_fam(str(tmp_path), block_size=8, memory_segments=5, fam_length=0, dtype=torch.float32).eval()
    ids = random_ids(1, 30)
    with torch.no_grad():
        assert_logits_close(fam(ids).logits, base(ids).logits)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_unconvert_gives_back_the_base_model(family):
    base = tiny_base(family)
    ids = random_ids(1, 20)
    with torch.no_grad():
        expected = base(ids).logits
    fam = hf_fam.convert_to_fam(base, block_size=4, memory_segments=1, fam_length=2)
    back = hf_fam.unconvert(fam).eval()
    assert type(back) is type(base)
    assert set(back.state_dict()) == set(base.state_dict())
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, base.state_dict()[name]), name
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "settings,field",
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size=-3), "block_size"),
        (dict(block_size=8.0), "block_size"),
        (dict(block_size=True), "block_size"),
        (dict(memory_segments=-1), "memory_segments"),
        (dict(memory_segments="2"), "memory_segments"),
        (dict(fam_length=-1), "fam_length"),
        (dict(block_size=4, fam_length=5), "fam_length"),
        (dict(fam_length=2.5), "fam_length"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        hf_fam.convert_to_fam(tiny_base("llama"), **{"block_size": 8, "fam_length": 2, **settings})
    with pytest.raises(ValueError, match=field):
        FamConfig(text_config=tiny_config("llama"), **{"block_size": 8, "fam_length": 2, **settings})


@pytest.mark.parametrize(
    "model_type,kwargs,reason,message",
    [
        ("bert", dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
         modeling_fam.REASON_POSITIONS, "learned absolute positions"),
        ("t5", dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2),
         modeling_fam.REASON_ENCODER_DECODER, "encoder-decoder"),
        ("mamba", dict(vocab_size=64, hidden_size=32, num_hidden_layers=1), modeling_fam.REASON_NON_ATTENTION, "not attention layers"),
        ("gpt2", dict(vocab_size=64, n_embd=32, n_layer=1, n_head=2), modeling_fam.REASON_POSITIONS, r"learned absolute positions \(wpe\)"),
    ],
)
def test_unsupported_architectures_fail_naming_the_reason(model_type, kwargs, reason, message, tmp_path):
    config = AutoConfig.for_model(model_type, **kwargs)
    with pytest.raises(UnsupportedArchitectureError, match=message) as error:
        FamForCausalLM(FamConfig(text_config=config, block_size=8, fam_length=2))
    assert error.value.reason == reason
    # From a folder: refused from its config.json alone, before any weights are read.
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match=message) as error:
        hf_fam.convert_to_fam(str(tmp_path), block_size=8, fam_length=2)
    assert error.value.reason == reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_check_refuses_a_family_whose_adapter_is_wrong(dtype, monkeypatch):
    """A granite model whose adapter forgets the logit divisor or the embedding multiplier is refused at conversion,
    not converted into a model with wrong outputs, in float32 and in 16-bit (looser check); verify=False skips it."""
    from registry_families import tiny_config

    config = tiny_config("granite")
    assert config.embedding_multiplier != 1 and config.logits_scaling != 1
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    fam = hf_fam.convert_to_fam(base, block_size=8, fam_length=2)  # the real adapter passes
    assert hf_fam.verify_conversion(fam, base) <= (1e-4 if dtype == torch.float32 else 0.02)
    for broken in (modeling_fam.FamilyAdapter(logit_divisor="logits_scaling"), modeling_fam.FamilyAdapter(embedding_multiplier="embedding_multiplier")):
        monkeypatch.setitem(modeling_fam.FAMILY_ADAPTERS, "granite", broken)
        with pytest.raises(UnsupportedArchitectureError, match="self-check failed for 'granite'") as error:
            hf_fam.convert_to_fam(base, block_size=8, fam_length=2)
        assert error.value.reason == modeling_fam.REASON_SELF_CHECK
        hf_fam.convert_to_fam(base, block_size=8, fam_length=2, verify=False)  # skipped: no error


@pytest.mark.parametrize("training", [False, True])
def test_self_check_leaves_train_and_eval_modes_as_they_were(training):
    base = tiny_base("llama").train(training)
    unchecked = hf_fam.convert_to_fam(base, block_size=8, fam_length=2, verify=False)
    expected = [module.training for module in unchecked.modules()]
    fam = hf_fam.convert_to_fam(base, block_size=8, fam_length=2)
    assert [module.training for module in fam.modules()] == expected


def test_flash_attention_is_refused_with_a_clear_error():
    fam = hf_fam.convert_to_fam(tiny_base("llama"), block_size=8, fam_length=2)
    fam.model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        fam(random_ids(1, 10))


def test_bad_forward_inputs_raise_clear_errors():
    fam = hf_fam.convert_to_fam(tiny_base("llama"), block_size=8, fam_length=2).eval()
    ids = random_ids(2, 10)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        fam()
    with pytest.raises(ValueError, match="attention_mask must be 2D"):
        fam(ids, attention_mask=torch.ones(2, 1, 10, 10))
    with pytest.raises(TypeError, match="FamCache"):
        fam(ids, past_key_values=object())


def test_convert_never_reinitialises_base_weights():
    """Models assembled outside from_pretrained (e.g. de-quantized GGUF weights assigned to a meta-built model)
    carry no 'initialised' flags; conversion must still leave every base weight untouched."""
    base = tiny_base("llama")
    for module in base.modules():
        module.__dict__.pop("_is_hf_initialized", None)
    for param in base.parameters():
        param.__dict__.pop("_is_hf_initialized", None)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    fam = hf_fam.convert_to_fam(base, block_size=8, fam_length=2)
    for name, tensor in before.items():
        assert torch.equal(fam.state_dict()[name], tensor), name

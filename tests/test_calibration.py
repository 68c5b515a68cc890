"""Calibration of the FAM prompt at conversion (hf_fam.calibration): it fits the prompt alone towards BSWA."""

import logging

import pytest
import torch
from conftest import tiny_base

import hf_fam
from hf_fam.calibration import calibrate_fam_prompt, calibration_ids, default_calibration_text


SETTINGS = dict(block_size=16, memory_segments=1, fam_length=4)


def kl_to_bswa(model, windows) -> float:
    """Mean KL(BSWA || model) per token over `windows` (BSWA: the same weights without FAM)."""
    bswa = hf_fam.convert_to_fam(hf_fam.unconvert(model), block_size=16, memory_segments=1, fam_length=0)
    total = 0.0
    with torch.no_grad():
        for x in windows:
            target = bswa(x).logits.log_softmax(-1)
            output = model(x).logits.log_softmax(-1)
            total += float(torch.nn.functional.kl_div(output, target, log_target=True, reduction="none").sum(-1).mean())
    return total / len(windows)


def test_calibration_fits_the_prompt_alone_towards_bswa(tiny_tokenizer):
    """On windows of a text it never saw (the second half), the calibrated model is closer to BSWA than the fresh
    one; every other tensor, the gates included, is untouched; the record says what was done."""
    ids = calibration_ids(tiny_tokenizer)
    half = ids.numel() // 2
    held_out = [ids[half + i * 97 : half + i * 97 + 64].unsqueeze(0) for i in range(8)]
    fam = hf_fam.convert_to_fam(tiny_base("llama"), **SETTINGS, calibration_steps=0)
    assert fam.config.fam_calibration is None
    before = {name: t.clone() for name, t in fam.state_dict().items()}
    kl_before = kl_to_bswa(fam, held_out)

    record = calibrate_fam_prompt(fam, ids[:half], steps=30, window=64, learning_rate=1e-2, show_progress=False)

    kl_after = kl_to_bswa(fam, held_out)
    print(f"KL to BSWA on held-out windows: {kl_before:.5f} -> {kl_after:.5f}; record {record}")
    assert kl_after < 0.7 * kl_before
    after = fam.state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == ["fam_prompt.weight"]
    assert record["steps"] == 30 and record["window"] == 64 and record["kl_last"] < record["kl_first"]
    assert all(p.requires_grad for p in fam.parameters())  # the trainable flags are restored
    assert not fam.training


def test_convert_calibrates_with_the_folders_tokenizer_and_saves_the_record(tiny_tokenizer, tmp_path):
    base = tiny_base("llama")
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    settings = dict(SETTINGS, block_size=128)  # 512-token windows: 4 blocks
    fam = hf_fam.convert_to_fam(tmp_path / "base", **settings, calibration_steps=3, dtype=torch.float32)
    record = fam.config.fam_calibration
    assert record is not None and record["steps"] == 3 and record["text"] == "pydoc_data.topics"
    fam.save_pretrained(tmp_path / "fam")
    loaded = hf_fam.FamForCausalLM.from_pretrained(tmp_path / "fam")
    assert loaded.config.fam_calibration == record
    assert torch.equal(loaded.fam_prompt.weight, fam.fam_prompt.weight)
    uncalibrated = hf_fam.convert_to_fam(tmp_path / "base", **settings, calibration_steps=0, dtype=torch.float32)
    assert not torch.equal(uncalibrated.fam_prompt.weight, fam.fam_prompt.weight)


def test_convert_without_a_tokenizer_warns_and_leaves_the_prompt(caplog):
    with caplog.at_level(logging.WARNING):
        fam = hf_fam.convert_to_fam(tiny_base("llama"), **SETTINGS)  # built from a config: no tokenizer anywhere
    assert fam.config.fam_calibration is None
    assert "not calibrated" in caplog.text and "tokenizer=" in caplog.text


def test_calibration_refuses_what_it_cannot_do(tiny_tokenizer):
    bswa = hf_fam.convert_to_fam(tiny_base("llama"), block_size=16, memory_segments=1, fam_length=0)
    with pytest.raises(ValueError, match="no FAM"):
        calibrate_fam_prompt(bswa, torch.arange(100), steps=1, window=16)
    fam = hf_fam.convert_to_fam(tiny_base("llama"), **SETTINGS, calibration_steps=0)
    with pytest.raises(ValueError, match="needs more than window=512"):
        calibrate_fam_prompt(fam, torch.arange(100), steps=1)


def test_default_text_is_real_prose_shipped_with_python():
    text = default_calibration_text()
    assert len(text) > 100_000 and text.count(" the ") > 1_000


def test_a_calibration_text_too_short_is_refused_saying_what_to_pass(tiny_tokenizer, tmp_path):
    tiny_base("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="has [0-9]+ tokens; the calibration reads windows of 512. Pass a longer text"):
        hf_fam.convert_to_fam(tmp_path / "base", **SETTINGS, calibration_text="The grass is green.")

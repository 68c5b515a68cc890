"""Issue 15, "CLI you can trust": the `hf-fam` console script run as a user runs it (in separate processes, see
cli_runner.py; no network) on the paths where it used to invent output, destroy inputs, or fail without saying what
to do. The push paths are in test_push.py (they need the fake Hub)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_base
from test_cli import OFFLINE_ENV, assert_clean_error, hf_fam_cli, leftovers

import hf_fam
from hf_fam.io_utils import atomic_directory


def tree(folder: Path) -> dict:
    """Every file and folder under `folder` with its bytes (None for folders): the state a failure must not change."""
    return {p.relative_to(folder).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if ": error: " in line]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny llama checkpoint, a tiny GPT-2 one and a converted (FAM) tiny llama."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("trust")
    tiny_base("llama").save_pretrained(root / "tiny-llama")
    gpt2 = AutoConfig.for_model("gpt2", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(gpt2).save_pretrained(root / "tiny-gpt2")
    hf_fam.convert_to_fam(tiny_base("llama"), block_size=8, memory_segments=1, fam_length=2).save_pretrained(root / "tiny-fam")
    return {name: root / name for name in ("tiny-llama", "tiny-gpt2", "tiny-fam")}


def copy_of(folder: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(folder, target)
    return target


# ------------------------------------------------------------------------ 1. info invents nothing
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("as_json", [False, True])
def test_info_refuses_a_folder_that_is_not_a_fam_checkpoint(family, as_json, folders):
    result = hf_fam_cli("info", folders[family], *(["--json"] if as_json else []))
    model_type = "llama" if family == "tiny-llama" else "gpt2"
    assert_clean_error(result, "is not a TransformerFAM checkpoint", f"model_type '{model_type}'", "hf-fam convert")
    assert result.stdout == ""  # no invented settings, sizes or memory (it used to print 32 layers, 4.1 GiB)
    assert "4096" not in result.stderr and "GiB" not in result.stderr


def test_info_still_describes_a_fam_checkpoint(folders):
    result = hf_fam_cli("info", folders["tiny-fam"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "B=8, memory_segments M=1, fam_length F=2" in result.stdout and "hidden size 64" in result.stdout


# ------------------------------------------------------------- 3. and 4. nothing the user owns is replaced
def test_convert_refuses_to_overwrite_its_own_source(folders, tmp_path):
    source = copy_of(folders["tiny-llama"], tmp_path / "parent" / "tiny-llama")
    before = tree(tmp_path)
    for output in (source, source.parent, tmp_path / "parent" / "." / "tiny-llama"):
        result = hf_fam_cli("convert", source, output, "--block-size", 8, "--fam-length", 2, "--overwrite")
        assert_clean_error(result, "the source being read", "another output folder")
        assert "unexpected" not in result.stderr
    assert tree(tmp_path) == before


def test_convert_refuses_to_overwrite_the_gguf_file_it_reads(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    before = tree(tmp_path)
    result = hf_fam_cli("convert", folder / "model.gguf", folder, "--overwrite")
    assert_clean_error(result, "the source being read")
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "case",
    ["dot", "dotdot", "source", "existing-without-overwrite", "file-output", "bad-block-size", "missing-source",
     "unsupported-family", "truncated-weights", "not-a-checkpoint"],
)
def test_every_convert_failure_leaves_the_parent_folder_as_it_was(case, folders, tmp_path):
    """Every refusal and failure: exit 1, one paragraph, and not one byte changed or left behind around OUTPUT."""
    work = tmp_path / "work"
    source = copy_of(folders["tiny-gpt2" if case == "unsupported-family" else "tiny-llama"], work / "src")
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("mine")
    (work / "a-file").write_text("a file")
    (work / "other").mkdir()
    (work / "other" / "keep.txt").write_text("keep")
    if case == "truncated-weights":
        weights = source / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    if case == "not-a-checkpoint":
        (source / "config.json").unlink()
    cwd = work / "mine"
    output, extra = {
        "dot": (".", ["--overwrite"]),
        "dotdot": ("..", ["--overwrite"]),
        "source": ("../src", ["--overwrite"]),
        "existing-without-overwrite": ("../other", []),
        "file-output": ("../a-file", ["--overwrite"]),
        "bad-block-size": ("../out", ["--block-size", "0"]),
    }.get(case, ("../out", ["--overwrite"]))
    source_argument = "../nope" if case == "missing-source" else "../src"
    before = tree(tmp_path)
    result = hf_fam_cli("convert", source_argument, output, "--block-size", 8, "--fam-length", 2, *extra, cwd=cwd)
    assert_clean_error(result)
    assert len(error_lines(result)) == 1 and "unexpected" not in result.stderr, result.stderr[-2000:]
    assert tree(tmp_path) == before
    if case in ("dot", "dotdot"):
        assert "current folder" in error_lines(result)[0] and "Errno" not in result.stderr


def test_atomic_directory_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old folder has been moved aside; the new one cannot take its place
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "weights").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["model"] and (target / "weights").read_text() == "old"


def test_atomic_directory_refuses_the_current_folder(tmp_path, monkeypatch):
    from hf_fam.io_utils import OutputPathError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").write_text("1")
    for target in (".", "..", tmp_path, Path("sub", "..")):
        with pytest.raises(OutputPathError, match="current folder"):
            with atomic_directory(target, overwrite=True):
                pass
    assert os.listdir(tmp_path) == ["keep"] and leftovers(tmp_path.parent) == []


# -------------------------------------------------------------- 5. damaged files are named, with the fix
@pytest.mark.parametrize("damage", ["truncated", "empty"])
@pytest.mark.parametrize("command", ["info", "generate"])
def test_a_damaged_weights_file_is_named_with_the_fix(damage, command, folders, tmp_path):
    folder = copy_of(folders["tiny-fam"], tmp_path / "fam")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2] if damage == "truncated" else b"")
    arguments = ["--prompt", "Hello"] if command == "generate" else []
    result = hf_fam_cli(command, folder, *arguments)
    assert_clean_error(result, str(weights), "damaged or incomplete", "hf-fam convert", "download it again")
    assert "unexpected" not in result.stderr and len(error_lines(result)) == 1


def test_famcache_load_of_a_damaged_file_names_it(tmp_path):
    from hf_fam import FamCache

    model = hf_fam.convert_to_fam(tiny_base("llama"), block_size=4, memory_segments=1, fam_length=2).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(random_ids(1, 10), cache=cache)
    path = tmp_path / "stream.safetensors"
    cache.save(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="damaged or incomplete") as error:
        FamCache.load(path)
    assert str(path) in str(error.value) and "FamCache.save" in str(error.value)


# ---------------------------------------------------------- 6. unsupported families refused from the header
def write_gguf(path: Path, architecture: str, truncate: int = 0) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((256, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate:
        path.write_bytes(path.read_bytes()[:-truncate])
    return path


def test_an_unsupported_gguf_is_refused_before_its_weights_are_read(tmp_path):
    # the tensor data is cut short: had the weights been read, this would be a read error
    path = write_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2", truncate=32 * 1024)
    result = hf_fam_cli("convert", path, tmp_path / "out")
    assert_clean_error(result, "tiny-gpt2.gguf holds a 'gpt2' model", "learned absolute positions")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_an_unsupported_folder_is_refused_before_its_weights_are_read(folders, tmp_path):
    source = copy_of(folders["tiny-gpt2"], tmp_path / "gpt2")
    (source / "model.safetensors").write_bytes(b"not weights")
    result = hf_fam_cli("convert", source, tmp_path / "out")
    assert_clean_error(result, "'gpt2' has no rotary module")
    assert "damaged" not in result.stderr


# ------------------------------------------------------ 7. a name that is neither a folder nor reachable
def no_hub_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in OFFLINE_ENV.items() if not k.startswith(("HF_", "HUGGING_FACE_")) and k != "TRANSFORMERS_OFFLINE"}
    return {**env, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


@pytest.mark.parametrize("command", ["convert", "generate"])
def test_a_bare_name_that_is_not_a_folder_and_the_hub_unreachable(command, tmp_path):
    env = no_hub_env(tmp_path, HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there: connection refused
    arguments = ["no-such-dir", tmp_path / "out"] if command == "convert" else ["no-such-dir", "--prompt", "Hi"]
    start = time.monotonic()
    result = hf_fam_cli(command, *arguments, env=env)
    elapsed = time.monotonic() - start
    assert_clean_error(result, "no-such-dir is not a local folder", "Hub could not be reached", "offline")
    assert len(error_lines(result)) == 1
    assert "thrown while requesting" not in result.stderr and "Retrying" not in result.stderr, result.stderr
    assert elapsed < 25, elapsed  # it used to retry for ~33 s
    assert not (tmp_path / "out").exists()


def test_a_bare_name_with_hf_hub_offline(tmp_path):
    result = hf_fam_cli("convert", "no-such-dir", tmp_path / "out", env=no_hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert_clean_error(result, "no-such-dir is not a local folder", "HF_HUB_OFFLINE is set")
    assert len(error_lines(result)) == 1


# ------------------------------------------------------------------------------- 8. messages that fit
def test_question_with_prompt_is_refused(folders):
    result = hf_fam_cli("generate", folders["tiny-fam"], "--prompt", "Hello", "--question", "Why?")
    assert_clean_error(result, "--question goes with --prompt-file")


def test_chat_without_a_chat_template_and_a_one_token_answer(folders, tiny_tokenizer, tmp_path):
    model = copy_of(folders["tiny-fam"], tmp_path / "model")
    tiny_tokenizer.save_pretrained(model)
    result = hf_fam_cli("generate", model, "--prompt", "Hello", "--chat", "--max-new-tokens", 1)
    assert_clean_error(result, "needs a tokenizer with a chat template", "leave out --chat")
    assert "Loading weights" not in result.stderr  # refused before the weights are read
    # one new token: there is no decoding rate to report (it printed "decoding nan tokens/s")
    result = hf_fam_cli("generate", model, "--prompt", "Hello", "--max-new-tokens", 1)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 token generated;" in result.stderr and "no decoding rate" in result.stderr and "nan" not in result.stderr


@pytest.mark.parametrize("command", [("generate", "--prompt", "Hi"), ("eval", "passkey")])
def test_a_model_folder_without_a_tokenizer_says_so(command, folders):
    """A folder converted from a source without a tokenizer: transformers' own error spoke of sentencepiece and slow
    tokenizers."""
    args = (command[0], folders["tiny-fam"], *command[1:]) if command[0] == "generate" else ("eval", "passkey", folders["tiny-fam"])
    result = hf_fam_cli(*args)
    assert_clean_error(result, "has no tokenizer", "Copy the base model's tokenizer files into it")
    assert "sentencepiece" not in result.stderr


@pytest.mark.parametrize("command", ["info", "generate", "eval passkey", "eval perplexity"])
def test_a_folder_that_is_not_a_model_says_what_is_missing(command, folders, tmp_path):
    """One check for every command that reads a converted folder, in the order a user fixes it: config.json, then
    weights, then the tokenizer. `eval` on an empty folder said it was "converted from a source without [a tokenizer]"."""
    (tmp_path / "text.txt").write_text("Some text to score. " * 20)
    extra = {"generate": ["--prompt", "Hi"], "eval perplexity": ["--text", tmp_path / "text.txt"]}.get(command, [])

    def run(folder):
        return hf_fam_cli(*command.split(), folder, *extra)

    (tmp_path / "empty").mkdir()
    assert_clean_error(run(tmp_path / "empty"), "is not a model folder (it has no config.json)", "hf-fam convert")
    if command == "generate":  # generate reads converted folders only: it offered a .gguf file, then refused it
        result = run(tmp_path / "missing")
        assert_clean_error(result, "does not exist. Pass an existing model folder, or a Hub id")
        assert ".gguf" not in result.stderr
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_bytes((folders["tiny-fam"] / "config.json").read_bytes())
    result = run(tmp_path / "config-only")
    assert_clean_error(result, "No .safetensors weights in", "hf-fam convert")
    assert "has no tokenizer" not in result.stderr


def test_attention_span_beyond_max_position_embeddings_warns_once(folders, tmp_path):
    # (M + 1) x B is how far back a block's queries reach: 2 x 512 > 512 warns (once: the calibration's BSWA twin
    # does not warn again), with settings that fit; 1 x 512 does not.
    args = ("--fam-length", 2, "--calibration-steps", 1)
    result = hf_fam_cli("convert", folders["tiny-llama"], tmp_path / "out", "--block-size", 512, "--memory-segments", 1, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    warning = "block_size=512 with memory_segments=1 lets a block's queries reach keys 1023 positions back, further than the base model's max_position_embeddings=512"
    assert result.stderr.count(warning) == 1, result.stderr[-2000:]
    assert "e.g. block_size 256 with memory_segments 1" in result.stderr
    quiet = hf_fam_cli("convert", folders["tiny-llama"], tmp_path / "out2", "--block-size", 512, "--memory-segments", 0, *args)
    assert quiet.returncode == 0 and "max_position_embeddings" not in quiet.stderr


def test_cache_misuse_names_the_cache_argument():
    small = hf_fam.convert_to_fam(tiny_base("llama"), block_size=4, memory_segments=1, fam_length=2).eval()
    other = hf_fam.convert_to_fam(tiny_base("llama"), block_size=8, memory_segments=1, fam_length=2).eval()
    cache = small.new_cache()
    with torch.no_grad():
        small(random_ids(1, 6), cache=cache)
        with pytest.raises(ValueError, match="another FAM configuration") as error:
            other(random_ids(1, 3), cache=cache)
    assert "cache=None" in str(error.value) and "past_key_values" not in str(error.value)


# --------------------------------------------------------------------------- 9. help without torch
@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory):
    """An environment where `import torch` and `import transformers` fail."""
    poisoned = tmp_path_factory.mktemp("poisoned")
    for name in ("torch", "transformers"):
        (poisoned / f"{name}.py").write_text(f"raise ImportError('{name} must not be imported here')\n")
    return {**OFFLINE_ENV, "PYTHONPATH": str(poisoned)}


@pytest.mark.parametrize("arguments", [["--help"], ["--version"], *[[c, "--help"] for c in ("convert", "info", "generate", "push", "presets")]])
def test_help_runs_where_torch_cannot_be_imported(arguments, no_torch_env):
    result = hf_fam_cli(*arguments, env=no_torch_env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: hf-fam" in result.stdout or "hf-fam 0." in result.stdout


def test_the_poisoned_environment_does_stop_torch(no_torch_env, folders):
    result = hf_fam_cli("info", folders["tiny-fam"], env=no_torch_env, timeout=60)
    assert result.returncode != 0 and "must not be imported here" in result.stderr


def test_every_command_has_a_one_line_description():
    listing = hf_fam_cli("--help").stdout
    commands = ["convert", "info", "generate", "push", "presets"]
    for command in commands:
        assert any(line.split()[:1] == [command] and len(line.split()) > 1 for line in listing.splitlines()), (command, listing)
        text = hf_fam_cli(command, "--help").stdout
        paragraphs = text.split("\n\n")
        assert paragraphs[0].startswith(f"usage: hf-fam {command}")
        description = paragraphs[1].strip()
        assert description and not description.startswith(("positional arguments", "options")), (command, text)
        assert description.splitlines()[0][0].isupper(), description


def test_import_hf_fam_is_light_and_still_registers_the_auto_classes(folders):
    script = (
        "import sys\n"
        "import hf_fam\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'import hf_fam imported torch'\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "print(type(AutoConfig.from_pretrained(sys.argv[1])).__name__, type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)\n"
        "print(hf_fam.FamForCausalLM.__name__, hf_fam.convert_to_fam.__name__, len(hf_fam.FAMILY_ADAPTERS))\n"
    )
    other_order = "from transformers import AutoModelForCausalLM\nimport hf_fam\nimport sys\nprint(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)\n"
    submodule_first = "import sys\nimport hf_fam.modeling_fam\nfrom transformers import AutoModelForCausalLM\nprint(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)\n"
    outputs = []
    for code in (script, other_order, submodule_first):
        result = subprocess.run([sys.executable, "-c", code, str(folders["tiny-fam"])], capture_output=True, text=True, env=OFFLINE_ENV, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "could not register" not in result.stderr
        outputs.append(result.stdout.split())
    assert outputs[0] == ["FamConfig", "FamForCausalLM", "FamForCausalLM", "convert_to_fam", str(len(hf_fam.FAMILY_ADAPTERS))]
    assert outputs[1] == outputs[2] == ["FamForCausalLM"]


# ------------------------------------------------------------- messages a review found false (2026-12-05)
def test_an_output_path_that_cannot_be_made_is_refused_before_loading(folders, tmp_path):
    """OUTPUT below a file: refused before the minutes of loading and calibration (it failed at the final write, as
    an "unexpected FileExistsError" about the parent)."""
    (tmp_path / "a-file").write_text("x")
    result = hf_fam_cli("convert", folders["tiny-llama"], tmp_path / "a-file" / "out", "--block-size", 8, "--fam-length", 2)
    assert_clean_error(result, "would be inside", "which is a file")
    assert "unexpected" not in result.stderr and "Loading" not in result.stderr


def test_pickle_weights_are_read_only_when_asked_for(folders, tmp_path):
    """Safetensors only: a folder with pytorch_model.bin alone is refused by convert (unless --allow-pickle) and by
    generate, with what to do (generate said "No .safetensors weights (only its config?)")."""
    from transformers import AutoConfig

    source = tmp_path / "pickled"
    source.mkdir()
    AutoConfig.from_pretrained(folders["tiny-llama"]).save_pretrained(source)
    model = tiny_base("llama")
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    refused = hf_fam_cli("convert", source, tmp_path / "out", "--block-size", 8, "--fam-length", 2, "--calibration-steps", 0)
    assert_clean_error(refused, "holds PyTorch pickle weights", "--allow-pickle")
    assert not (tmp_path / "out").exists()
    allowed = hf_fam_cli(
        "convert", source, tmp_path / "out", "--block-size", 8, "--fam-length", 2, "--calibration-steps", 0, "--allow-pickle"
    )
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    from hf_fam.io_utils import weight_files

    assert [p.name for p in weight_files(tmp_path / "out")] == ["model.safetensors"]
    generate = hf_fam_cli("generate", source, "--prompt", "Hi")
    assert_clean_error(generate, "holds PyTorch pickle weights", "--allow-pickle")
    assert "only its config" not in generate.stderr


def test_a_source_without_tokenizer_files_is_said_so(folders, tmp_path):
    result = hf_fam_cli("convert", folders["tiny-llama"], tmp_path / "out", "--block-size", 8, "--fam-length", 2, "--calibration-steps", 0)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "has no tokenizer files" in result.stderr and "sentencepiece" not in result.stderr
    generate = hf_fam_cli("generate", folders["tiny-llama"], "--prompt", "Hi")  # a base folder, never converted
    assert_clean_error(generate, "has no tokenizer")
    assert "converted from" not in generate.stderr


def test_a_missing_weight_shard_is_named(folders, tmp_path):
    """A sharded folder with one shard gone: info printed a parameter count without it and push uploaded it."""
    sharded = tmp_path / "sharded"
    hf_fam.convert_to_fam(tiny_base("llama"), block_size=8, memory_segments=1, fam_length=2).save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    for command in (("info",), ("generate", "--prompt", "Hi")):
        result = hf_fam_cli(command[0], sharded, *command[1:])
        assert_clean_error(result, "is incomplete", f"of them are missing ({shards[1].name})")


def test_a_gate_init_that_is_not_finite_is_refused(folders, tmp_path):
    result = hf_fam_cli("convert", folders["tiny-llama"], tmp_path / "out", "--block-size", 8, "--fam-length", 2, "--fam-gate-init", "nan")
    assert_clean_error(result, "--fam-gate-init must be a finite number")
    with pytest.raises(ValueError, match="fam_gate_init must be a finite number"):
        hf_fam.FamConfig(text_config=tiny_base("llama").config, fam_gate_init=float("inf"))


def test_info_of_a_fam_checkpoint_whose_config_cannot_be_read_does_not_say_convert_it(folders, tmp_path):
    import json

    folder = copy_of(folders["tiny-fam"], tmp_path / "future")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["model_type"] = "llama9"  # a family newer than the installed transformers
    (folder / "config.json").write_text(json.dumps(config))
    result = hf_fam_cli("info", folder)
    assert_clean_error(result, "is a TransformerFAM checkpoint whose config.json cannot be read", "upgrade transformers")
    assert "Convert it first" not in result.stderr and len(result.stderr) < 2000


def test_eval_of_a_mistyped_folder_says_it_does_not_exist(tmp_path):
    result = hf_fam_cli("eval", "passkey", "my-model", env=no_hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert_clean_error(result, "my-model is not a local folder")
    assert "is not a folder;" not in result.stderr


def test_eval_lengths_are_bounded_numbers():
    from hf_fam.evaluation import EvaluationError, parse_lengths

    assert parse_lengths("1k,64") == [1024, 64]
    for bad in ("inf", "nan", "1e30", "20000k"):
        with pytest.raises(EvaluationError, match="--lengths"):
            parse_lengths(bad)

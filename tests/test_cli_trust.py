"""Issue 15, "CLI you can trust": the `hf-fam` console script run as a user runs it (subprocesses, no network) on
the paths where it used to invent output, destroy inputs, or fail without saying what to do. The push paths are in
test_push.py (they need the fake Hub)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_base
from test_cli import HF_FAM, OFFLINE_ENV, assert_clean_error, hf_fam_cli, leftovers

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


# ------------------------------------------------------------- 3. and 4. nothing the user owns is replaced


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
    assert_clean_error(result, "tiny-gpt2.gguf holds a 'gpt2' model", "Supported decoder families: llama")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_an_unsupported_folder_is_refused_before_its_weights_are_read(folders, tmp_path):
    source = copy_of(folders["tiny-gpt2"], tmp_path / "gpt2")
    (source / "model.safetensors").write_bytes(b"not weights")
    result = hf_fam_cli("convert", source, tmp_path / "out")
    assert_clean_error(result, "model_type 'gpt2' is not supported")
    assert "damaged" not in result.stderr


# ------------------------------------------------------ 7. a name that is neither a folder nor reachable
def no_hub_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in OFFLINE_ENV.items() if not k.startswith(("HF_", "HUGGING_FACE_")) and k != "TRANSFORMERS_OFFLINE"}
    return {**env, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def test_a_bare_name_with_hf_hub_offline(tmp_path):
    result = hf_fam_cli("convert", "no-such-dir", tmp_path / "out", env=no_hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert_clean_error(result, "no-such-dir is not a local folder", "HF_HUB_OFFLINE is set")
    assert len(error_lines(result)) == 1


# ------------------------------------------------------------------------------- 8. messages that fit


def test_block_size_beyond_max_position_embeddings_warns(folders, tmp_path):
    result = hf_fam_cli("convert", folders["tiny-llama"], tmp_path / "out", "--block-size", 1024, "--fam-length", 2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "block_size=1024 is larger than the base model's max_position_embeddings=512" in result.stderr
    quiet = hf_fam_cli("convert", folders["tiny-llama"], tmp_path / "out2", "--block-size", 512, "--fam-length", 2)
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


def test_import_hf_fam_is_light_and_still_registers_the_auto_classes(folders):
    script = (
        "import sys\n"
        "import hf_fam\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'import hf_fam imported torch'\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "print(type(AutoConfig.from_pretrained(sys.argv[1])).__name__, type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)\n"
        "print(hf_fam.FamForCausalLM.__name__, hf_fam.convert_to_fam.__name__, len(hf_fam.SUPPORTED_MODEL_TYPES))\n"
    )
    other_order = "from transformers import AutoModelForCausalLM\nimport hf_fam\nimport sys\nprint(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)\n"
    submodule_first = "import sys\nimport hf_fam.modeling_fam\nfrom transformers import AutoModelForCausalLM\nprint(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)\n"
    outputs = []
    for code in (script, other_order, submodule_first):
        result = subprocess.run([sys.executable, "-c", code, str(folders["tiny-fam"])], capture_output=True, text=True, env=OFFLINE_ENV, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "could not register" not in result.stderr
        outputs.append(result.stdout.split())
    assert outputs[0] == ["FamConfig", "FamForCausalLM", "FamForCausalLM", "convert_to_fam", str(len(hf_fam.SUPPORTED_MODEL_TYPES))]
    assert outputs[1] == outputs[2] == ["FamForCausalLM"]

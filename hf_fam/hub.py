# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Publishing a converted or fine-tuned folder to the Hugging Face Hub."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from transformers.utils import logging

from .card import existing_card_data, render_model_card
from .io_utils import DamagedFileError, check_model_folder, write_atomic


logger = logging.get_logger(__name__)


class PushError(Exception):
    """The upload failed; the message says what to change."""


def model_card(folder: str | Path, repo_id: str | None = None, **card_kwargs):
    """The model card of `folder`, keeping base_model, license and the fine-tuned tag of the card already there."""
    folder = Path(folder)
    previous = existing_card_data(folder)
    base_model = card_kwargs.pop("base_model", None) or previous.get("base_model")
    if isinstance(base_model, list):
        base_model = base_model[0] if base_model else None
    license = card_kwargs.pop("license", None) or previous.get("license")
    fine_tuned = card_kwargs.pop("fine_tuned", None)
    if fine_tuned is None:
        fine_tuned = "fine-tuned" in (previous.get("tags") or [])
    if not card_kwargs.get("source_description"):
        # a GGUF provenance note ("de-quantized from the GGUF file `X`") is only in the card: keep it
        found = re.search(r"de-quantized from the GGUF file `([^`]+)`", _previous_card_text(folder))
        if found:
            card_kwargs["source_description"] = f"GGUF file {found.group(1)}"
    if fine_tuned and not card_kwargs.get("training"):
        # the Training table that `hf-fam merge` wrote (base, data, steps, settings) is only in the card: keep it
        card_kwargs["training"] = existing_training_table(folder)
    card = render_model_card(folder, repo_id=repo_id, base_model=base_model, license=license, fine_tuned=fine_tuned, **card_kwargs)
    if fine_tuned:
        card.data.tags = list(card.data.tags or []) + ["fine-tuned"]
    return card


def _previous_card_text(folder: str | Path) -> str:
    path = Path(folder) / "README.md"
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def existing_training_table(folder: str | Path) -> dict:
    """The rows (name -> value) of the Training section of the card already in `folder` (README.md), or {}."""
    rows, inside = {}, False
    for line in _previous_card_text(folder).splitlines():
        if line.startswith("## "):
            inside = line.strip() == "## Training"
        elif inside and line.startswith("| ") and line.endswith(" |"):
            cells = line[2:-2].split(" | ")
            if len(cells) == 2 and cells[0].strip():
                rows[cells[0].strip()] = cells[1].strip()
    return rows


def write_model_card(folder: str | Path, repo_id: str | None = None, **card_kwargs) -> Path:
    """(Re)write README.md in `folder` (to a temporary file, then renamed), keeping base_model and license."""
    folder = Path(folder)
    write_atomic(folder / "README.md", str(model_card(folder, repo_id=repo_id, **card_kwargs)))
    return folder / "README.md"


def refresh_model_card(folder: str | Path) -> bool:
    """Rewrite the model card of `folder` if hf-fam wrote it (its `hf-fam` tag), e.g. once `hf-fam eval` has added
    rows to `eval_results.json`: the card keeps its name and Hub id (read from its usage example), base model,
    license and Training table. Returns False, writing nothing, for a folder without a card or with someone else's."""
    folder = Path(folder)
    if "hf-fam" not in (existing_card_data(folder).get("tags") or []):
        return False
    named = re.search(r'from_pretrained\("([^"]+)"', _previous_card_text(folder))
    write_model_card(folder, repo_id=named.group(1) if named else None)
    return True


def check_repo_id(repo_id: str) -> None:
    """Raise `PushError` unless `repo_id` is a valid Hub repository id (a local check, no request)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise PushError(
            f"{repo_id!r} is not a valid Hub repository id: use NAME or NAMESPACE/NAME, made of letters, digits, '-', "
            "'_' and '.' (at most 96 characters, no '--' or '..'), e.g. your-name/smollm2-135m-fam."
        ) from None


def check_can_push(repo_id: str, token: str | None = None) -> str:
    """The token to upload to `repo_id` with; `PushError` for an invalid id or no token (local checks, no request)."""
    from huggingface_hub import get_token

    check_repo_id(repo_id)
    token = token or get_token()
    if not token:
        raise PushError(
            f"No Hugging Face token found, and uploading to {repo_id} needs one: log in with `hf auth login`, or set "
            "HF_TOKEN to a token with write access. Nothing was uploaded."
        )
    return token


def _staging_copy(folder: Path, card_text: str | None) -> Path:
    """A temporary folder mirroring `folder` with symbolic links, and `card_text` as README.md (when given)."""
    staging = Path(tempfile.mkdtemp(prefix="hf-fam-push-"))
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if relative.parts[0].startswith(".") or (relative.as_posix() == "README.md" and card_text is not None):
            continue  # hidden entries are not uploaded (ignore_patterns below)
        if path.is_dir() and not path.is_symlink():
            (staging / relative).mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).symlink_to(path.resolve())
    if card_text is not None:
        (staging / "README.md").write_text(card_text, encoding="utf-8", newline="")
    return staging


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    regenerate_card: bool = True,
) -> str:
    """Create `repo_id` if needed and upload `folder`, with a freshly generated model card unless told not to.

    The regenerated card is uploaded from a temporary copy (symbolic links to the folder's files); the folder's own
    README.md is replaced by it only once the upload has succeeded, so a failed push leaves the folder unchanged.
    Returns the commit URL.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .sources import _is_connection_error

    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder: push a folder written by `hf-fam convert` or save_pretrained.")
    try:
        check_model_folder(folder, tokenizer=False)  # a model without its tokenizer is still a model users can fix
    except (FileNotFoundError, DamagedFileError) as error:
        raise PushError(str(error)) from None
    token = check_can_push(repo_id, token)
    card_text = str(model_card(folder, repo_id=repo_id)) if regenerate_card else None
    api = HfApi(token=token)
    staging = _staging_copy(folder, card_text)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if private and not getattr(api.repo_info(repo_id), "private", True):
            logger.warning(f"{repo_id} already exists and is public; --private only applies to new repositories.")
        commit = api.upload_folder(
            folder_path=str(staging),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message or "Upload TransformerFAM model (hf-fam)",
            ignore_patterns=[".*", "*.tmp", "__pycache__/*"],
        )
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise PushError(
                f"The Hub refused the upload to {repo_id} (HTTP {status}). Log in with `hf auth login` or set HF_TOKEN "
                "to a token with write access to that namespace."
            ) from error
        raise PushError(f"The upload to {repo_id} failed: {error}") from error
    except ValueError as error:  # the client's own checks: rejected card metadata, malformed answers
        raise PushError(f"The Hub rejected the upload to {repo_id}: {error}") from error
    except Exception as error:
        if not _is_connection_error(error):
            raise
        raise PushError(
            f"Could not reach the Hub to upload {repo_id} ({error}). Check your connection, or HF_ENDPOINT if you set it."
        ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if card_text is not None:
        write_atomic(folder / "README.md", card_text)  # the folder now matches what was uploaded
    return str(getattr(commit, "commit_url", commit))

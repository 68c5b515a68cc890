# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Publishing a converted or fine-tuned folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from transformers.utils import logging

from .card import existing_card_data, render_model_card


logger = logging.get_logger(__name__)


class PushError(Exception):
    """The upload failed; the message says what to change."""


def write_model_card(folder: str | Path, repo_id: str | None = None, **card_kwargs) -> Path:
    """(Re)write README.md in `folder`, keeping base_model and license from the card already there."""
    folder = Path(folder)
    previous = existing_card_data(folder)
    base_model = card_kwargs.pop("base_model", None) or previous.get("base_model")
    if isinstance(base_model, list):
        base_model = base_model[0] if base_model else None
    license = card_kwargs.pop("license", None) or previous.get("license")
    fine_tuned = card_kwargs.pop("fine_tuned", None)
    if fine_tuned is None:
        fine_tuned = "fine-tuned" in (previous.get("tags") or [])
    card = render_model_card(folder, repo_id=repo_id, base_model=base_model, license=license, fine_tuned=fine_tuned, **card_kwargs)
    if fine_tuned:
        card.data.tags = list(card.data.tags or []) + ["fine-tuned"]
    card.save(folder / "README.md")
    return folder / "README.md"


def _is_connection_error(error: Exception) -> bool:
    # huggingface_hub's HTTP client raises its own transport errors (not OSError) for refused connections and timeouts.
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, OSError) or bool(names & {"TransportError", "ConnectError", "TimeoutException", "NetworkError"})


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    regenerate_card: bool = True,
) -> str:
    """Create `repo_id` if needed and upload `folder` (regenerating its model card first, unless told not to).

    Returns the commit URL.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PushError(f"{folder} has no config.json: push a folder written by `hf-fam convert` or save_pretrained.")
    if regenerate_card:
        write_model_card(folder, repo_id=repo_id)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if private and not getattr(api.repo_info(repo_id), "private", True):
            logger.warning(f"{repo_id} already exists and is public; --private only applies to new repositories.")
        commit = api.upload_folder(
            folder_path=str(folder),
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
    return str(getattr(commit, "commit_url", commit))

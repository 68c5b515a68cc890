# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Writing files and folders so that nothing half-written is ever left behind, and reading weights files that may be damaged.

Imports neither torch nor transformers: the command line checks its paths with it before loading anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


# What to do about a damaged weights file of a converted folder.
CONVERTED_FIX = "Write the folder again with `hf-fam convert`, or download it again."


class OutputExistsError(FileExistsError):
    """The output folder exists, is not empty, and overwriting was not asked for."""


class OutputPathError(ValueError):
    """The output folder cannot be replaced: it is the current folder, a parent of it, or holds the source."""


class DamagedFileError(ValueError):
    """A weights or state file is truncated or corrupted; the message names it and says how to get a whole one."""


class TextFileError(ValueError):
    """A text file named on the command line is missing, a folder, or not UTF-8 text; the message says what to pass."""


def read_text_file(path: str | os.PathLike, option: str, fix: str, errors: str = "strict") -> str:
    """The text of the file `path`, given as `option` (e.g. "--prompt-file"), decoded as UTF-8.

    Raises [`TextFileError`] naming the option and the path when the file does not exist, is a folder, or cannot be
    read as UTF-8 (with `errors="strict"`; "replace" reads any bytes, for long texts with a few stray ones); `fix`
    says what to pass instead (e.g. "pass a UTF-8 text file")."""
    path = Path(path)
    if not path.exists():
        raise TextFileError(f"{option} {path} does not exist; {fix}.")
    if not path.is_file():
        raise TextFileError(f"{option} {path} is not a file (a folder?); {fix}.")
    try:
        return path.read_text(encoding="utf-8", errors=errors)
    except (OSError, UnicodeDecodeError) as error:
        raise TextFileError(f"{option} {path}: cannot read it as UTF-8 text ({error}); {fix}.") from None


def check_output_folder(target: str | os.PathLike, overwrite: bool = False, sources=()) -> None:
    """Raise unless `target` may be written (replaced, with `overwrite`) by `atomic_directory`.

    Refused: the current folder or one of its parents (`.`, `..`: it cannot be renamed away), a folder that is or
    contains one of `sources` (what is being read), a file, an existing non-empty folder without `overwrite`, and a
    place where no folder can be made (below a file, or in a folder the user cannot write in): checked by making and
    removing an empty folder there, so that minutes of loading are not spent before a write that cannot succeed.
    """
    target = Path(target)
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputPathError(
            f"The output {target} is the current folder{'' if resolved == cwd else ' or one of its parents'} "
            f"({resolved}), which cannot be replaced; name a new folder instead, e.g. {Path(target, 'fam-model')}."
        )
    for source in sources:
        source_resolved = Path(source).resolve()
        if source_resolved == resolved or resolved in source_resolved.parents:
            what = "is" if source_resolved == resolved else "contains"
            raise OutputPathError(
                f"The output {target} {what} the source being read ({source}); writing it would destroy the "
                "source. Choose another output folder."
            )
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} exists and is not a folder; choose another output path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(f"{target} exists and is not empty; pass --overwrite (overwrite=True) to replace it, or choose another output.")
    _check_writable_parent(resolved, target)


def _check_writable_parent(resolved: Path, target: Path) -> None:
    """Raise `OutputPathError` unless a folder can be made next to `resolved` (where `atomic_directory` stages it)."""
    existing = resolved.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"The output {target} would be inside {existing}, which is a file; choose another output path.")
    try:
        Path(tempfile.mkdtemp(prefix=".hf-fam-write-check.", dir=existing)).rmdir()
    except OSError as error:
        raise OutputPathError(
            f"Cannot write the output {target}: no folder can be made in {existing} ({error.strerror or error}). "
            "Choose an output path in a folder you can write to."
        ) from None


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (text is written as UTF-8, its line ends as they are) to a temporary file next to `path`, then
    rename it over `path`: an interrupted write leaves the earlier file whole and no temporary file behind. The file
    gets the permissions of an ordinary new file (mkstemp makes it private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder next to `target`; on success it replaces `target`, on failure it is removed.

    An existing non-empty `target` is refused unless `overwrite` (see `check_output_folder`). Whatever fails or is
    interrupted, `target` is either the old folder or the complete new one, and no temporary folder is left.
    """
    target = Path(os.path.abspath(target))  # `out/..` -> its real name, so the temporary folders sit beside it
    check_output_folder(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary folder
    old = None
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            previous = old / "previous"
            if previous.exists() and not target.exists():
                os.replace(previous, target)  # put the old folder back
            if not previous.exists():
                shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Files of which a folder saved by a tokenizer's save_pretrained holds at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer_folder(folder: str | os.PathLike) -> None:
    """Raise `FileNotFoundError` saying what to do when the local model folder `folder` holds no tokenizer files
    (transformers would otherwise talk of sentencepiece and slow tokenizers)."""
    folder = Path(folder)
    if folder.is_dir() and not has_tokenizer_files(folder):
        converted = ""
        try:
            if json.loads((folder / "config.json").read_text()).get("model_type") == "fam":
                converted = ": it was converted from a source without one"
        except (OSError, ValueError):
            pass
        raise FileNotFoundError(
            f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}){converted}. Copy the base model's tokenizer "
            "files into it (or save its tokenizer there with save_pretrained)."
        )


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether the local folder holds any of the files a tokenizer's save_pretrained writes."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def check_model_folder(folder: str | os.PathLike, tokenizer: bool = True) -> None:
    """Check that the local folder `folder` is a saved model, in the order a user would fix it: a config.json, then
    readable *.safetensors weights, then (with `tokenizer`) tokenizer files. Raises `FileNotFoundError` or
    `DamagedFileError` with what to do; a path that does not exist (a Hub id) is left to the loader."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is a file; pass a model folder written by `hf-fam convert` or save_pretrained.")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a model folder (it has no config.json); pass a folder written by `hf-fam convert` or "
            "save_pretrained."
        )
    weight_files(folder)
    check_weights_folder(folder, CONVERTED_FIX)
    if tokenizer:
        check_tokenizer_folder(folder)


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The *.safetensors files of a converted folder, sorted; `FileNotFoundError` saying what to do if it has none."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files and any(Path(folder).glob("pytorch_model*.bin")):
        raise FileNotFoundError(
            f"{folder} holds PyTorch pickle weights (pytorch_model*.bin) and no .safetensors files; hf-fam reads "
            "safetensors only, because loading a pickle can run code that it carries. Convert it with `hf-fam convert "
            f"{folder} OUTPUT --allow-pickle` if you trust it (or save it with save_pretrained first)."
        )
    if not files:
        raise FileNotFoundError(f"No .safetensors weights in {folder} (only its config?). {CONVERTED_FIX}")
    return files


def check_safetensors(path: str | os.PathLike, fix: str) -> None:
    """Raise `DamagedFileError` (naming the file and `fix`) if the safetensors file at `path` cannot be opened."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt"):
            pass
    except SafetensorError as error:
        raise DamagedFileError(damaged_file_message(path, error, fix)) from error


def damaged_file_message(path, error, fix: str) -> str:
    return f"{path} is damaged or incomplete (corrupted or truncated: {error}). {fix}"


def check_weights_folder(folder: str | os.PathLike, fix: str) -> None:
    """`check_safetensors` on every *.safetensors file of `folder` (reads their headers only), and, for a sharded
    folder, that every shard its `*.safetensors.index.json` lists is there."""
    for index in sorted(Path(folder).glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise DamagedFileError(damaged_file_message(index, error, fix)) from None
        missing = sorted(name for name in shards if not (Path(folder) / name).is_file())
        if missing:
            raise DamagedFileError(
                f"{folder} is incomplete: {index.name} lists {len(shards)} weight shards and "
                f"{len(missing)} of them are missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}). {fix}"
            )
    for path in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(path, fix)

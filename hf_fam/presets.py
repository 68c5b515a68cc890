# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Conversion presets: one YAML file per well-known checkpoint, in `conversion/presets/` (shipped as hf_fam/presets)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


PRESET_KEYS = {"hub_id", "license", "block_size", "memory_segments", "fam_length", "why"}


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str
    block_size: int
    memory_segments: int
    fam_length: int
    why: str
    license: str | None = None


def _preset_files() -> dict:
    folder = resources.files("hf_fam").joinpath("presets")
    return {entry.name[: -len(".yaml")]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def preset_names() -> list[str]:
    return sorted(_preset_files())


def load_preset(name: str) -> Preset:
    import yaml

    files = _preset_files()
    if name not in files:
        raise KeyError(f"No preset named {name!r}. Available presets: {', '.join(sorted(files))}.")
    data = yaml.safe_load(files[name].read_text()) or {}
    unknown = set(data) - PRESET_KEYS
    missing = {"hub_id", "block_size", "memory_segments", "fam_length", "why"} - set(data)
    if unknown or missing:
        raise ValueError(f"Preset {name!r} is malformed: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}.")
    return Preset(name=name, **data)

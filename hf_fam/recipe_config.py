# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""Recipe configurations: a YAML file plus `key=value` overrides from the command line (torchtune style)."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration or an override that cannot be used; the message says what to change."""


def _paths(config: dict, prefix: tuple = ()) -> list[tuple]:
    found = []
    for key, value in config.items():
        found.append(prefix + (key,))
        if isinstance(value, dict):
            found.extend(_paths(value, prefix + (key,)))
    return found


def apply_override(config: dict, override: str, fallback_section: str | None = None, fallback_keys=()) -> None:
    """Apply one `key=value` to `config` in place.

    `a.b.c=value` sets that path (creating sections). A bare `key=value` sets the one place in the config where `key`
    is (`max_steps=100` finds `trainer.max_steps`); a bare key that appears nowhere goes to `fallback_section` when it
    is one of `fallback_keys` (e.g. any `TrainingArguments` field), else it is an error. Values are read as YAML:
    `5`, `1e-4`, `true`, `null`, `[a, b]`, `{r: 8}`.
    """
    if "=" not in override:
        raise ConfigError(f"Overrides are key=value, got {override!r} (e.g. max_steps=100 or lora.r=16).")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"Override {override!r} has no key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"Cannot read the value of {override!r} as YAML: {error}") from None
    if "." in key:
        path = tuple(key.split("."))
    else:
        matches = [p for p in _paths(config) if p[-1] == key]
        if len(matches) > 1:
            options = ", ".join(".".join(m) for m in matches)
            raise ConfigError(f"{key!r} is ambiguous in this config ({options}); write the full path, e.g. {options.split(', ')[0]}={raw}.")
        if matches:
            path = matches[0]
        elif fallback_section is not None and key in fallback_keys:
            path = (fallback_section, key)
        else:
            known = ", ".join(sorted({".".join(p) for p in _paths(config) if not isinstance(_get(config, p), dict)}))
            raise ConfigError(f"Unknown config key {key!r}. Keys in this config: {known}. New keys need their full path (section.key=value).")
    node = config
    for part in path[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"Cannot set {key!r}: {part!r} is a value, not a section.")
        node = node[part]
    node[path[-1]] = value


def _get(config: dict, path: tuple):
    for part in path:
        config = config[part]
    return config


def load_config(path: str | Path, overrides: list[str] = (), fallback_section: str | None = None, fallback_keys=()) -> dict:
    """The YAML config at `path` with `overrides` (`key=value` strings) applied in order."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; the recipes' configs are in recipes/configs/.")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a YAML mapping (sections and keys), got {type(config).__name__}.")
    config = copy.deepcopy(config)
    for override in overrides:
        apply_override(config, override, fallback_section, fallback_keys)
    return config


def parse_recipe_args(argv=None, description: str = "") -> tuple[str, list[str]]:
    """`--config PATH` and the `key=value` overrides that follow it."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML config, e.g. recipes/configs/smollm2_135m_passkey_cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key, e.g. max_steps=100 lora.r=8")
    args = parser.parse_args(argv)
    return args.config, args.overrides


__all__ = ["ConfigError", "apply_override", "load_config", "parse_recipe_args"]

# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""hf-fam: TransformerFAM (block sliding window attention + feedback attention memory) for Hugging Face decoders."""

# `import hf_fam` is cheap: it imports neither torch nor transformers, so `hf-fam --help` answers at once.
#
# - The public names are loaded on first use (PEP 562 module `__getattr__`).
# - The Auto classes learn about FamConfig and FamForCausalLM as soon as both sides exist, so that
#   `import hf_fam; AutoModelForCausalLM.from_pretrained(converted_folder)` loads a FamForCausalLM as before. A finder
#   on `sys.meta_path` runs `_after_import` once any of transformers' `configuration_auto` / `modeling_auto` or our
#   `configuration_fam` / `modeling_fam` has finished executing: transformers' side imports ours (unless ours is
#   already importing), ours registers itself. Each import (and reload) of ours registers its classes again.
#   Nothing here patches transformers; it only watches those four module names.
# - save_pretrained copies configuration_fam.py, modeling_fam.py and cache_fam.py next to the weights and writes
#   `auto_map` (register_for_auto_class), so `trust_remote_code=True` loads a converted folder where hf_fam is not
#   installed.

import importlib
import importlib.abc
import sys


__version__ = "0.1.0.dev0"

_PUBLIC = {
    "FAMILY_ADAPTERS": "modeling_fam",
    "FamCache": "cache_fam",
    "FamConfig": "configuration_fam",
    "FamForCausalLM": "modeling_fam",
    "FamGate": "modeling_fam",
    "FamPrompt": "modeling_fam",
    "FamilyAdapter": "modeling_fam",
    "UnsupportedArchitectureError": "modeling_fam",
    "calibrate_fam_prompt": "calibration",
    "causal_lm_families": "modeling_fam",
    "check_supported_config": "modeling_fam",
    "convert_to_fam": "conversion",
    "stream_hidden_states": "streaming",
    "stream_log_likelihood": "streaming",
    "unconvert": "conversion",
    "verify_conversion": "conversion",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


# ------------------------------------------------------------------------------------ Auto class registration
_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"
_OURS = {_CONFIG_AUTO: f"{__name__}.configuration_fam", _MODELING_AUTO: f"{__name__}.modeling_fam"}


def _after_import(name: str) -> None:
    try:
        if name in _OURS:  # transformers' Auto module is ready: bring in ours (which registers when it has run)
            if _OURS[name] not in sys.modules:
                importlib.import_module(_OURS[name])
        elif name == _OURS[_CONFIG_AUTO]:
            from transformers import AutoConfig

            config_class = sys.modules[name].FamConfig
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            config_class.register_for_auto_class()
        elif name == _OURS[_MODELING_AUTO]:
            from transformers import AutoModelForCausalLM

            model_class = sys.modules[name].FamForCausalLM
            AutoModelForCausalLM.register(model_class.config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class("AutoModelForCausalLM")
    except Exception as error:  # never break the caller's own import; say why the Auto classes will not know FAM
        from transformers.utils import logging

        logging.get_logger(__name__).warning(
            f"hf_fam could not register its classes with transformers' Auto classes ({type(error).__name__}: {error}); "
            "load converted folders with hf_fam.FamForCausalLM.from_pretrained instead."
        )


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then `_after_import`; everything else is the real loader's."""

    def __init__(self, loader, name):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _after_import(self._name)

    def __getattr__(self, attribute):  # get_source, get_resource_reader, ...
        return getattr(self._loader, attribute)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader the other finders give for the four watched modules."""

    watched = frozenset(_OURS) | frozenset(_OURS.values())

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.watched:
            return None
        for finder in sys.meta_path:
            if type(finder).__name__ == "_AfterImportFinder" or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


if not any(type(finder).__name__ == _AfterImportFinder.__name__ for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterImportFinder())
for _name in (_CONFIG_AUTO, _MODELING_AUTO):  # transformers' Auto classes were imported before hf_fam
    if _name in sys.modules:
        _after_import(_name)

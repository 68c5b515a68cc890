"""The benchmarks' result writers (`benchmarks/common.py`, on `hf_fam.io_utils.write_atomic`) replace a results file
in one rename: a run stopped while writing leaves the earlier file whole and no temporary file behind, and the files
are ordinary ones (not private to their owner)."""

import json
import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import write_csv, write_json


def test_writers_replace_the_file(tmp_path):
    write_json(tmp_path / "out" / "r.json", {"ratio": 1.05})
    write_csv(tmp_path / "out" / "r.csv", [{"tokens": 8192, "ratio": 1.05}, {"tokens": 16384, "note": "x"}])
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == {"ratio": 1.05}
    assert (tmp_path / "out" / "r.csv").read_text().splitlines() == ["tokens,ratio,note", "8192,1.05,", "16384,,x"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["r.csv", "r.json"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("r.csv", "r.json"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o666 & ~umask


def test_an_interrupted_write_keeps_the_earlier_file(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    write_json(target, {"run": "earlier"})
    with monkeypatch.context() as patch:

        def interrupted(*args):
            raise KeyboardInterrupt

        patch.setattr(os, "replace", interrupted)  # stopped after the new text is written, before it replaces the file
        with pytest.raises(KeyboardInterrupt):
            write_json(target, {"run": "later"})
    assert json.loads(target.read_text()) == {"run": "earlier"}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(TypeError):  # not JSON: found before anything replaces the file
        write_json(target, {"run": object()})
    assert json.loads(target.read_text()) == {"run": "earlier"}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]

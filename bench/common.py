"""Helpers shared by the PUMA benchmarks: checkpoint generation, safetensors header sizes, timing, tables (FLOP counts
are in `cost_puma`)."""

import json
import os
import re
import subprocess
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Generated checkpoints, caches and outputs live in the system's temporary folder (override with --data).
BENCH_DIR = os.path.join(tempfile.gettempdir(), "puma_bench")
# Decoder-layer keys in both checkpoint layouts: `model.layers.N.` (old) and `model.language_model.layers.N.` (new).
LAYER_KEY = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_START = time.perf_counter()


def log(message: str) -> None:
    """Progress line on stderr, stamped with seconds since start."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# Random checkpoints with the shapes of the Hub's models: name -> (family, shape, key layout, k kept by the benches)
CHECKPOINTS = {
    "qwen2_vl_2b": ("qwen2_vl", "2b", "old", 12),     # Qwen/Qwen2-VL-2B-Instruct
    "qwen2_5_vl_3b": ("qwen2_5_vl", "2b", "old", 16),  # Qwen/Qwen2.5-VL-3B-Instruct
    "qwen3_vl_2b": ("qwen3_vl", "2b", "new", 12),     # Qwen/Qwen3-VL-2B-Instruct, Qwen/Qwen3-VL-Embedding-2B
    "qwen3_vl_8b": ("qwen3_vl", "8b", "new", 18),     # Qwen/Qwen3-VL-8B-Instruct, Qwen/Qwen3-VL-Embedding-8B
}
DEFAULT_DATA = BENCH_DIR


def ensure_checkpoint(name: str, folder: str = DEFAULT_DATA) -> str:
    """The random bfloat16 checkpoint `name` of `CHECKPOINTS` in 4 shards under `folder`, written unless present."""
    family, shape, layout, _ = CHECKPOINTS[name]
    path = os.path.join(folder, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        log(f"writing a random {name} checkpoint to {path}")
        subprocess.run([sys.executable, os.path.join(ROOT, "tiny_puma.py"), path, "--family", family, "--shape",
                        shape, "--layout", layout, "--shards", "4", "--dtype", "bfloat16"], check=True,
                       stdout=sys.stderr)
    return path


def checkpoint_tensors(path: str) -> dict[str, tuple[str, int, int]]:
    """`{key: (safetensors dtype, numel, stored bytes)}` for every tensor, read from the safetensors headers only."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    tensors = {}
    for filename in files:
        with open(os.path.join(path, filename), "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.pop("__metadata__", None)
        for key, info in header.items():
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            tensors[key] = (info["dtype"], numel, info["data_offsets"][1] - info["data_offsets"][0])
    return tensors


def kept_bytes(tensors: dict, num_layers: int | None, element_size: int | None = None) -> int:
    """Bytes of the tensors a `num_layers` load keeps (all but `lm_head` and decoder layers >= `num_layers`).

    With `element_size`, floating tensors are counted at that size (the load dtype) instead of the stored one.
    """
    total = 0
    for key, (dtype, numel, stored) in tensors.items():
        match = LAYER_KEY.match(key)
        if key.startswith("lm_head.") or (num_layers is not None and match and int(match.group(1)) >= num_layers):
            continue
        total += numel * element_size if element_size and dtype.startswith(("F", "BF")) else stored
    return total


LOAD_AVERAGES = []  # 1-minute load average after each timed pass: other processes on a shared machine skew timings


def time_interleaved(fns: dict, repeats: int, cpu_times: dict | None = None) -> dict:
    """`{name: [seconds, ...]}` of `repeats` rounds, each calling every `fn()` once in turn, so that load from
    other processes on the machine falls on all settings alike. `cpu_times`, if given, receives the process CPU
    seconds of each call (all threads), which other processes inflate far less than wall time."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(time.process_time() - start_cpu)
            LOAD_AVERAGES.append(os.getloadavg()[0])
            log(f"  {name}: {times[name][-1]:.2f}s, CPU {time.process_time() - start_cpu:.2f}s "
                f"(load average {LOAD_AVERAGES[-1]:.1f})")
    return times


def load_note(threads: int) -> str:
    """A line on how busy the machine was during the timed passes."""
    return (f"1-minute load average after the timed passes: {min(LOAD_AVERAGES):.1f}-{max(LOAD_AVERAGES):.1f} on "
            f"{os.cpu_count()} CPUs; the benchmark alone makes about {threads}, more means other processes shared the "
            "cores and slowed some passes.")


def synchronize(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def check(value: float, goal: float, at_most: bool) -> str:
    ok = value <= goal if at_most else value >= goal
    return f"{'PASS' if ok else 'FAIL'} ({value:.3f} {'<=' if at_most else '>='} {goal:.3f})"

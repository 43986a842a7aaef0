"""Helpers shared by the PUMA benchmarks: checkpoint generation, interleaved timing, ratio spreads, and the report
that prints each result table and, with `--markdown PATH`, writes them under a stamp of how they were measured (the
command, the date, the versions, the machine and its load). FLOP counts are in `cost_puma`."""

import datetime
import importlib.metadata
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mbeir_puma import markdown_table  # noqa: E402  (the shared report format; needs ROOT on the path)


# Generated checkpoints, caches and outputs live in the system's temporary folder (override with --data).
BENCH_DIR = os.path.join(tempfile.gettempdir(), "puma_bench")
DEFAULT_DATA = BENCH_DIR
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
# Tiny random checkpoints (6 layers of width 64): a benchmark's code path in seconds, for smoke runs and tests.
TINY_CHECKPOINTS = {
    "qwen2_vl_tiny": ("qwen2_vl", "tiny", "old", 3),
    "qwen3_vl_tiny": ("qwen3_vl", "tiny", "new", 3),
}
ALL_CHECKPOINTS = {**CHECKPOINTS, **TINY_CHECKPOINTS}


def ensure_checkpoint(name: str, folder: str = DEFAULT_DATA) -> str:
    """The random bfloat16 checkpoint `name` of `ALL_CHECKPOINTS` in 4 shards under `folder`, written unless
    present."""
    family, shape, layout, _ = ALL_CHECKPOINTS[name]
    path = os.path.join(folder, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        log(f"writing a random {name} checkpoint to {path}")
        subprocess.run([sys.executable, os.path.join(ROOT, "tiny_puma.py"), path, "--family", family, "--shape",
                        shape, "--layout", layout, "--shards", "4", "--dtype", "bfloat16"], check=True,
                       stdout=sys.stderr)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
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
    if not LOAD_AVERAGES:
        return "No timed pass recorded a load average."
    return (f"1-minute load average after the timed passes: {min(LOAD_AVERAGES):.1f}-{max(LOAD_AVERAGES):.1f} on "
            f"{os.cpu_count()} CPUs; the benchmark alone makes about {threads}, more means other processes shared the "
            "cores and slowed some passes.")


def ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Round-by-round ratios of two settings timed in the same rounds (`time_interleaved`'s lists, or any lists
    paired by index)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"ratios need two non-empty lists of one length, got {len(numerators)} and "
                         f"{len(denominators)} values.")
    return [n / d for n, d in zip(numerators, denominators)]


def spread(values: list[float], digits: int = 3) -> str:
    """`"median (min-max)"` of `values`, e.g. the ratios of a setting to the baseline over the repeats."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def check(value: float, goal: float, at_most: bool) -> str:
    ok = value <= goal if at_most else value >= goal
    return f"{'PASS' if ok else 'FAIL'} ({value:.3f} {'<=' if at_most else '>='} {goal:.3f})"


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------
# Distributions whose versions a stamp lists, where installed: the stack every benchmark measures.
STAMPED_PACKAGES = ("torch", "transformers", "accelerate", "peft", "safetensors", "numpy", "pillow", "faiss-cpu",
                    "faiss-gpu", "faiss")


def package_versions() -> dict[str, str]:
    """`{name: version}` of Python and each installed distribution of `STAMPED_PACKAGES` (read from the installed
    metadata, so nothing is imported)."""
    versions = {"python": platform.python_version()}
    for name in STAMPED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor() or "unknown CPU")
    except OSError:
        return platform.processor() or "unknown CPU"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) / 1024**2
    except (OSError, StopIteration):
        return None


def _gpus() -> str:
    """The GPUs torch sees when it is imported, else those `nvidia-smi` lists (a benchmark may run torch in child
    processes only)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return ", ".join(torch.cuda.get_device_name(i) for i in range(count)) or "none"
    if shutil.which("nvidia-smi") is None:
        return "none"
    listed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                            text=True)
    return ", ".join(listed.stdout.split("\n")[:-1]) if listed.returncode == 0 and listed.stdout.strip() else "none"


def machine() -> dict[str, str]:
    """The CPU model, cores (all, and those this process may use), memory, GPUs and the thread settings that change
    CPU timings."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = _memory_gib()
    found = {"CPU": _cpu_model(), "cores": f"{os.cpu_count()} ({usable} usable by this process)",
             "memory": f"{memory:.1f} GiB" if memory is not None else "unknown", "GPU": _gpus(),
             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")}
    if "torch" in sys.modules:  # not imported here: the benchmarks that time children only set their threads there
        found["torch threads"] = str(sys.modules["torch"].get_num_threads())
    return found


def portable_arguments(arguments: list[str]) -> list[str]:
    """`arguments` as a stamp shows them: a path inside the repository relative to it, an absolute path outside it
    (a data folder, another environment's interpreter) as the option's name in capitals (`--data DATA`), so a table
    names no one machine's folders."""
    shown = []
    for index, argument in enumerate(arguments):
        option, equals, value = (argument.partition("=") if argument.startswith("--") and "=" in argument
                                 else ("", "", argument))
        if os.path.isabs(value):
            inside = os.path.relpath(value, ROOT)
            if not inside.startswith(".."):
                value = inside
            else:
                name = option or (arguments[index - 1] if index and arguments[index - 1].startswith("--") else "")
                value = name.lstrip("-").replace("-", "_").upper() or "PATH"
        shown.append(f"{option}{equals}{value}" if equals else value)
    return shown


class Report:
    """The result tables of one benchmark run: each is printed as it is added and, when `path` is given, `write()`
    puts them all in a markdown file under a stamp (command line, UTC date, versions, machine, load average before
    and after), so a figure in the docs comes with how it was measured.

        report = Report("docs/benchmarks/load.md", "Load benchmark")
        report.table("Load time", ["setting", "time (s)"], [["puma", 1.2]], notes=["Ratios are ..."])
        report.write()
    """

    def __init__(self, path: str | None, title: str):
        self.path, self.title, self.sections = path, title, []
        self.command = shlex.join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT),
                                   *portable_arguments(sys.argv[1:])])
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.load_before = os.getloadavg()

    def table(self, title: str, headers: list[str], rows: list[list], notes: list[str] = ()) -> str:
        """Prints and records one table under a `###` heading, followed by its notes; returns the table."""
        table = markdown_table(headers, rows)
        section = "\n\n".join([f"### {title}", table, *notes])
        print("\n" + section, flush=True)
        self.sections.append(section)
        return table

    def note(self, text: str) -> None:
        """Prints and records a paragraph after the tables so far."""
        print("\n" + text, flush=True)
        self.sections.append(text)

    def stamp(self) -> str:
        """The markdown list saying how the tables were measured."""
        after = os.getloadavg()
        versions = ", ".join(f"{name} {version}" for name, version in package_versions().items())
        during = (f"; 1-minute after each timed pass: {min(LOAD_AVERAGES):.2f}-{max(LOAD_AVERAGES):.2f}"
                  if LOAD_AVERAGES else "")
        host = "; ".join(f"{key}: {value}" for key, value in machine().items())
        return "\n".join([
            f"- command: `{self.command}`",
            f"- date (UTC): {self.started:%Y-%m-%d %H:%M}",
            f"- versions: {versions}",
            f"- machine: {host}",
            f"- load average (1, 5, 15 min): {' / '.join(f'{x:.2f}' for x in self.load_before)} before, "
            f"{' / '.join(f'{x:.2f}' for x in after)} after{during}",
        ])

    def write(self) -> None:
        """Writes the stamp and every table to `path` (nothing without a path)."""
        if self.path is None:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(f"## {self.title}\n\n{self.stamp()}\n\n" + "\n\n".join(self.sections) + "\n")
        log(f"wrote {self.path}")


def add_markdown_argument(parser) -> None:
    parser.add_argument("--markdown", metavar="PATH", default=None,
                        help="also write the result tables to this markdown file (e.g. docs/benchmarks/load.md), "
                             "stamped with the command, date, versions, machine and load average")

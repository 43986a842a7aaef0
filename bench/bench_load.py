"""Load-time pruning benchmark: time and peak RSS of `PumaForEmbedding.from_pretrained` keeping k layers vs all.

Each load runs in a fresh subprocess, so peaks do not mix. The child records its RSS after the imports (baseline),
resets the peak (`/proc/self/clear_refs`), loads, and reports the peak (VmHWM) minus the baseline. That increase is
compared with the bytes of the kept tensors, summed from the safetensors headers (every tensor except `lm_head` and
decoder layers >= k). The shards are read once before timing, so every load is warm-cache. Goals:
peak RSS increase <= 1.2 x kept bytes, and t(k) / t(full) <= 1.1 x kept_bytes(k) / kept_bytes(full).

    python bench/bench_load.py                      # k=12 vs 28, bfloat16, 3 loads each (~2 min)
    python bench/bench_load.py --quick              # 1 load each
    python bench/bench_load.py --device cuda --checkpoint /path/to/Qwen2-VL-2B-Instruct
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

from common import (DEFAULT_CHECKPOINT, DTYPE_BYTES, LOAD_AVERAGES, ROOT, check, checkpoint_tensors, ensure_checkpoint,
                    kept_bytes, load_note, log, markdown_table, synchronize)


GIB = 1024**3


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(args) -> None:
    """One load in this (fresh) process; prints a JSON line with seconds and RSS figures on stdout."""
    import torch
    from modeling_puma import PumaForEmbedding

    gc.collect()
    try:  # "5" resets VmHWM to the current RSS, so the peak below excludes the imports
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    baseline = proc_status_kib("VmRSS") * 1024
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    start = time.perf_counter()
    model = PumaForEmbedding.from_pretrained(args.checkpoint, num_layers=args.child_layers or None, dtype=dtype,
                                             device_map=args.device)
    synchronize(args.device)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "baseline": baseline, "peak": proc_status_kib("VmHWM") * 1024,
              "after": proc_status_kib("VmRSS") * 1024,
              "layers": model.config.text_config.num_hidden_layers,
              "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
              "cuda_peak": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else 0}
    print(json.dumps(result))


def run_child(args, layers: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child-layers", str(layers), "--checkpoint",
               args.checkpoint, "--device", args.device, "--dtype", args.dtype]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm_page_cache(path: str) -> None:
    """Reads every shard once so that all timed loads see a warm page cache."""
    start, total = time.perf_counter(), 0
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                while chunk := f.read(64 << 20):
                    total += len(chunk)
    log(f"warm-up read of {total / GIB:.2f} GiB of shards in {time.perf_counter() - start:.1f}s")


def main(args) -> None:
    ensure_checkpoint(args.checkpoint)
    tensors = checkpoint_tensors(args.checkpoint)
    with open(os.path.join(args.checkpoint, "config.json")) as f:
        config = json.load(f)
    depth = (config.get("text_config") or config)["num_hidden_layers"]
    element_size = None if args.dtype == "auto" else DTYPE_BYTES[{"bfloat16": "BF16", "float16": "F16",
                                                                  "float32": "F32"}[args.dtype]]
    kept = {k: kept_bytes(tensors, k, element_size) for k in (args.layers, depth)}
    log(f"{args.checkpoint}: {len(tensors)} tensors, {sum(t[2] for t in tensors.values()) / GIB:.2f} GiB stored; "
        f"kept at k={args.layers}: {kept[args.layers] / GIB:.2f} GiB, at k={depth}: {kept[depth] / GIB:.2f} GiB "
        f"({args.dtype})")
    warm_page_cache(args.checkpoint)

    runs = {args.layers: [], depth: []}
    for repeat in range(args.repeats):
        for k in runs:  # interleaved, so drift affects both alike
            result = run_child(args, k)
            assert result["layers"] == k, result
            runs[k].append(result)
            LOAD_AVERAGES.append(os.getloadavg()[0])
            log(f"load {repeat + 1}/{args.repeats} k={k}: {result['seconds']:.2f}s, peak RSS increase "
                f"{(result['peak'] - result['baseline']) / GIB:.2f} GiB (baseline {result['baseline'] / GIB:.2f} GiB)")

    def med(k, fn):
        return statistics.median(fn(r) for r in runs[k])

    rows, stats = [], {}
    for k in runs:
        seconds = med(k, lambda r: r["seconds"])
        peak = med(k, lambda r: r["peak"] - r["baseline"])
        stats[k] = (seconds, peak)
        rows.append([f"k={k}" + (" (full)" if k == depth else ""), seconds, peak / GIB, kept[k] / GIB, peak / kept[k],
                     med(k, lambda r: r["param_bytes"]) / GIB, check(peak / kept[k], 1.2, at_most=True)])
    (t_k, p_k), (t_full, p_full) = stats[args.layers], stats[depth]
    kept_ratio = kept[args.layers] / kept[depth]
    rows.append([f"ratio k={args.layers} / full", t_k / t_full, p_k / p_full, kept_ratio, "", "",
                 f"time: {check(t_k / t_full, 1.1 * kept_ratio, at_most=True)}"])
    print(f"\n### Load benchmark: {args.checkpoint}, dtype {args.dtype}, device {args.device}, "
          f"median of {args.repeats} warm-cache loads, each in a fresh process\n")
    print(markdown_table(["load", "time (s)", "peak RSS increase (GiB)", "kept tensors (GiB)", "peak / kept",
                          "param bytes (GiB)", "goal"], rows))
    if args.device.startswith("cuda"):
        print("\nCUDA peak allocated (GiB): " + ", ".join(
            f"k={k}: {med(k, lambda r: r['cuda_peak']) / GIB:.2f}" for k in runs))
    print("\nGoals: peak RSS increase <= 1.2 x kept bytes; t(k)/t(full) <= 1.1 x kept(k)/kept(full) "
          f"= {1.1 * kept_ratio:.3f}. Individual times (s): "
          + "; ".join(f"k={k}: " + ", ".join(f"{r['seconds']:.2f}" for r in runs[k]) for k in runs) + ".")
    print(load_note(1))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help="Qwen2-VL checkpoint folder (generated with random weights if missing)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "auto"])
    parser.add_argument("--layers", type=int, default=12, help="kept decoder layers of the pruned load")
    parser.add_argument("--repeats", type=int, default=3, help="loads per setting (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one load per setting")
    parser.add_argument("--child-layers", type=int, default=None, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    arguments = make_parser().parse_args()
    if arguments.child_layers is not None:
        child(arguments)
    else:
        arguments.repeats = 1 if arguments.quick else arguments.repeats
        main(arguments)

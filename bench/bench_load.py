"""Load benchmark: `PumaForEmbedding.from_pretrained(num_layers=k)` side by side with transformers' own
`from_pretrained` of the same truncated configuration, for each family at its Hub shape.

Checkpoints are random, with the shapes of Qwen/Qwen2-VL-2B-Instruct (old key layout), Qwen/Qwen2.5-VL-3B-Instruct
(old layout) and Qwen/Qwen3-VL-Embedding-2B / -8B (new layout), bfloat16, 4 shards. Each load runs in a fresh process
with a warm page cache (`--warm`: the second load in the process, once imports and caches exist). Per load the child
reports the wall time and the peak of its *anonymous* (private) memory above the post-import baseline, sampled from
`/proc/self/smaps_rollup` every 2 ms: weights that transformers keeps memory-mapped from the files are shared page
cache, not private memory. Settings, interleaved:

- `transformers`: the family's own `*Model.from_pretrained(path, config=<k-layer config>, dtype=bfloat16)`;
- `puma`: `PumaForEmbedding.from_pretrained(path, num_layers=k, dtype=bfloat16, processor=<loaded before>)`, the
  model load alone (what the goal compares);
- `puma + processor` and `transformers + processor`: the same with the processor loaded inside the timed load.

The random checkpoints' tokenizers are small; a `puma` load adds the time of initialising the added `[RET]` row
from a Hub tokenizer's vocabulary (151,643 rows of the memory-mapped table), so its time is what a real checkpoint
costs.

Goals (issue of the loader): time(puma) <= 1.1 x time(transformers), anonymous peak(puma) <= 1.1 x transformers'.

    python bench/bench_load.py                           # every family, k=12 (8B shape: k=18), 3 loads each
    python bench/bench_load.py --families qwen3_vl_8b --repeats 5
    python bench/bench_load.py --quick                   # one load per setting
    python bench/bench_load.py --markdown docs/benchmarks/load.md   # also write the stamped tables there
    python bench/bench_load.py --families qwen2_vl_tiny --quick    # the code path in seconds (tiny random model)
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from common import (ALL_CHECKPOINTS, CHECKPOINTS, DEFAULT_DATA, LOAD_AVERAGES, ROOT, Report, add_markdown_argument,
                    ensure_checkpoint, load_note, log, ratios, spread)


QWEN_VOCABULARY = 151643  # rows of Qwen2/2.5/3-VL's tokenizer vocabulary before added tokens
GIB = 1024**3
SETTINGS = ("transformers", "puma", "transformers + processor", "puma + processor")


def anonymous_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Anonymous:")) * 1024


class PeakSampler(threading.Thread):
    """Samples this process's anonymous memory every `interval` seconds until stopped; keeps the peak."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, anonymous_bytes(), threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, anonymous_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, anonymous_bytes())
        return self.peak


def truncated_config(path: str, layers: int):
    """The family's own configuration of `path`, with the first `layers` decoder layers (and the DeepStack
    injections they use)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    text = config.text_config
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = text.layer_types[:layers]
    text.num_hidden_layers = layers
    vision = config.vision_config
    if getattr(vision, "deepstack_visual_indexes", None) is not None:
        vision.deepstack_visual_indexes = list(vision.deepstack_visual_indexes)[:layers]
    return config


def child(args) -> None:
    """One load in this fresh process; prints a JSON line."""
    import torch
    import transformers
    from transformers import AutoProcessor

    from configuration_puma import FAMILIES
    from modeling_puma import PumaForEmbedding, load_processor, load_source_config

    family = ALL_CHECKPOINTS[args.name][0]
    processor = None
    if args.setting == "puma":  # the processor is not part of this setting's timed load
        processor = load_processor(args.checkpoint, load_source_config(args.checkpoint))
    config = truncated_config(args.checkpoint, args.layers) if args.setting.startswith("transformers") else None

    def load():
        if args.setting.startswith("transformers"):
            model = getattr(transformers, FAMILIES[family]["model"]).from_pretrained(args.checkpoint, config=config,
                                                                                     dtype=torch.bfloat16)
            if args.setting.endswith("processor"):
                AutoProcessor.from_pretrained(args.checkpoint)
            return model, len(model.language_model.layers)
        model = PumaForEmbedding.from_pretrained(args.checkpoint, num_layers=args.layers, dtype=torch.bfloat16,
                                                 processor=processor)
        return model, model.num_layers

    def init_ret_row_at_hub_vocabulary(model) -> float:
        """The random checkpoints' tokenizers are small, so the [RET] row was initialised from a few rows: this is
        what a Hub tokenizer's vocabulary costs (the same initialisation over QWEN_VOCABULARY rows of the mapped
        table). Returns its seconds (0 for transformers' model, which adds no token)."""
        if not args.setting.startswith("puma") or model.config.embedding_token_id is None:
            return 0.0
        rows = min(QWEN_VOCABULARY, model.get_input_embeddings().weight.shape[0])
        start = time.perf_counter()
        model._init_embedding_token_row(model.config.embedding_token_id, rows)
        return time.perf_counter() - start

    if args.warm:  # a first, untimed load: what follows is a load in a process that has loaded once already
        init_ret_row_at_hub_vocabulary(load()[0])  # the model is dropped at once
        gc.collect()
    baseline = anonymous_bytes()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    model, layers = load()
    seconds = time.perf_counter() - start + init_ret_row_at_hub_vocabulary(model)
    peak = sampler.stop()
    print(json.dumps({"seconds": seconds, "anonymous_peak": peak - baseline, "anonymous_after":
                      anonymous_bytes() - baseline, "layers": layers,
                      "params": sum(p.numel() for p in model.parameters())}))


def warm_page_cache(path: str) -> None:
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                while f.read(64 << 20):
                    pass


def run_child(args, name: str, path: str, setting: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", name, "--checkpoint", path, "--setting",
               setting, "--layers", str(ALL_CHECKPOINTS[name][3])] + (["--warm"] if args.warm else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args) -> None:
    report = Report(args.markdown, "Load benchmark")
    rows = []
    for name in args.families:
        path = ensure_checkpoint(name, args.data)
        warm_page_cache(path)
        runs = {setting: [] for setting in SETTINGS}
        for repeat in range(args.repeats):
            for setting in SETTINGS:  # interleaved, so drift affects every setting alike
                result = run_child(args, name, path, setting)
                runs[setting].append(result)
                LOAD_AVERAGES.append(os.getloadavg()[0])
                log(f"{name} {setting} {repeat + 1}/{args.repeats}: {result['seconds']:.2f}s, anonymous peak "
                    f"{result['anonymous_peak'] / GIB:.2f} GiB, layers {result['layers']}")
        assert runs["puma"][0]["params"] == runs["transformers"][0]["params"], "different models were loaded"

        def values(setting, key):
            return [r[key] for r in runs[setting]]

        for setting in SETTINGS:
            base = "transformers + processor" if setting.endswith("processor") else "transformers"
            # each round's load against the baseline's load in the same round; a peak of 0 bytes counts as 1
            time_ratios = ratios(values(setting, "seconds"), values(base, "seconds"))
            memory_ratios = ratios(values(setting, "anonymous_peak"),
                                   [max(m, 1) for m in values(base, "anonymous_peak")])
            goal = ""
            if setting == "puma":
                goal = (f"time {'PASS' if statistics.median(time_ratios) <= 1.1 else 'FAIL'}, memory "
                        f"{'PASS' if statistics.median(memory_ratios) <= 1.1 else 'FAIL'}")
            rows.append([name, f"k={ALL_CHECKPOINTS[name][3]}", setting, spread(values(setting, "seconds"), 2),
                         spread([m / GIB for m in values(setting, "anonymous_peak")]), spread(time_ratios, 2),
                         spread(memory_ratios, 2), goal])
    which = "the second load in a process" if args.warm else "the first load in a fresh process"
    report.table(f"Load benchmark: bfloat16 on CPU, median (min-max) of {args.repeats} warm-cache loads, each {which}",
                 ["checkpoint", "kept", "setting", "time (s)", "anonymous peak (GiB)", "time ratio", "memory ratio",
                  "goal"], rows,
                 notes=["Ratios are each round's load against transformers' own load of the same truncated "
                        "configuration in that round (with the processor for the '+ processor' rows), median "
                        "(min-max) over the rounds. Goals: the median of puma / transformers <= 1.1 in time and "
                        "anonymous memory.", load_note(1)])
    report.write()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(CHECKPOINTS), choices=list(ALL_CHECKPOINTS),
                        help="random checkpoints (the *_tiny ones run the code path in seconds)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="folder of the generated random checkpoints")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one load per setting")
    add_markdown_argument(parser)
    parser.add_argument("--warm", action="store_true",
                        help="time a second load in each process (first-use imports and caches excluded)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    arguments = make_parser().parse_args()
    if arguments.child is not None:
        arguments.name = arguments.child
        child(arguments)
    else:
        arguments.repeats = 1 if arguments.quick else arguments.repeats
        main(arguments)

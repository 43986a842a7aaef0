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

from common import CHECKPOINTS, DEFAULT_DATA, LOAD_AVERAGES, ROOT, ensure_checkpoint, load_note, log, markdown_table


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

    family = CHECKPOINTS[args.name][0]
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
               setting, "--layers", str(CHECKPOINTS[name][3])] + (["--warm"] if args.warm else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args) -> None:
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

        def stat(setting, key):
            values = [r[key] for r in runs[setting]]
            return statistics.median(values), min(values), max(values)

        for setting in SETTINGS:
            (t, t_lo, t_hi), (m, m_lo, m_hi) = stat(setting, "seconds"), stat(setting, "anonymous_peak")
            base = "transformers + processor" if setting.endswith("processor") else "transformers"
            (t0, _, _), (m0, _, _) = stat(base, "seconds"), stat(base, "anonymous_peak")
            goal = ""
            if setting == "puma":
                goal = (f"time {'PASS' if t / t0 <= 1.1 else 'FAIL'}, memory "
                        f"{'PASS' if m / max(m0, 1) <= 1.1 else 'FAIL'}")
            rows.append([name, f"k={CHECKPOINTS[name][3]}", setting, f"{t:.2f} ({t_lo:.2f}-{t_hi:.2f})",
                         f"{m / GIB:.3f} ({m_lo / GIB:.3f}-{m_hi / GIB:.3f})", f"{t / t0:.2f}",
                         f"{m / max(m0, 1):.2f}", goal])
    which = "the second load in a process" if args.warm else "the first load in a fresh process"
    print(f"\n### Load benchmark: bfloat16 on CPU, median (min-max) of {args.repeats} warm-cache loads, each {which}\n")
    print(markdown_table(["checkpoint", "kept", "setting", "time (s)", "anonymous peak (GiB)", "time ratio",
                          "memory ratio", "goal"], rows))
    print("\nRatios are against transformers' own load of the same truncated configuration (with the processor "
          "for the '+ processor' rows). Goals: puma / transformers <= 1.1 in time and anonymous memory.")
    print(load_note(1))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(CHECKPOINTS), choices=list(CHECKPOINTS))
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="folder of the generated random checkpoints")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one load per setting")
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

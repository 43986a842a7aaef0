"""Training-step cost of PUMA's teachers, of MAC-Loss, of GradCache, and of elastic depth with Matryoshka sizes.

    python bench/bench_train_step.py [--shape small|2b] [--steps 6] [--batch 16] [--quick]
    python bench/bench_train_step.py --elastic [--shape small|2b] [--steps 8] [--batch 16] [--threads 1]
    python bench/bench_train_step.py --grad-cache [--shape small|2b] [--steps 8] [--batch 16] [--chunk 4]
    python bench/bench_train_step.py --shape tiny --quick        # the code path in seconds (tiny random model)
    python bench/bench_train_step.py --configs c mac             # some configurations only, with the baselines
    python bench/bench_train_step.py --markdown docs/benchmarks/train_step.md   # also write the stamped tables there

Each configuration runs in a fresh process (so peak memory does not mix) on the same random checkpoint (written once
to puma_bench/qwen2vl-<shape> in the temporary folder, or under --data; 28 layers, 6 for `tiny`) with a LoRA student
keeping 12 layers (3 for `tiny`), on the same batches: (a) the release recipe: a separate full-depth teacher copy,
online; (b) the shared-weight teacher; (c) the cached teacher; (d) the student alone. Then MAC vs InfoNCE on (d), and
GradCache vs plain at the same batch. Step time is the median over the timed steps (after one warm-up step); peak
memory is the process's peak RSS above its RSS after imports (CPU) or the peak allocated memory (GPU). Printed as a
markdown table of ratios against the baseline of the same run: step-time ratios pair the two configurations' steps by
index (the same batches), median (min-max) over the steps.

`--elastic` compares, in one process on the same LoRA student and the same batches, a plain MAC step with a step
training 3 depths x 3 Matryoshka sizes (the grid of 4, 8, 12 layers, a third, two thirds and all of the kept
ones, x a quarter, half and all of the embedding):
the two alternate step by step (after one warm-up round), so load from other processes falls on both alike; each
round's ratio is reported with the median and range over rounds, and the 1-minute load average.

`--grad-cache` compares, in the same way, a plain MAC step with a GradCache step (chunks of `--chunk`) and a
GradCache step that runs the frozen vision tower again in its second pass (`grad_cache_reuse_visual=False`), and
accounts for each one's work in floating-point operations (torch's `FlopCounterMode`): the plain step's forward and
backward of each group, GradCache's first pass over every chunk, its replays (forward and backward, the vision tower
skipped where its outputs are reused) and the kept last chunk (backward only), beside what the earlier GradCache ran
(every chunk re-embedded, chunks in batch order, the tower in both passes). The FLOP ratio is the cost of the
algorithm; the measured ratio adds what small chunks cost beyond their FLOPs.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from common import (BENCH_DIR, LOAD_AVERAGES, ROOT, Report, add_markdown_argument, load_note, log, ratios, spread,
                    time_interleaved)


KEPT_LAYERS = {"tiny": 3, "small": 12, "2b": 12}  # the student's depth per shape (12 of 28: the release's ratio)
# --configs key -> (row name, child settings); (a) and (d) are the baselines of the ratios, so always run
CONFIGURATIONS = {
    "a": ("(a) separate full teacher (release)", dict(teacher="separate", loss="infonce")),
    "b": ("(b) shared-weight teacher", dict(teacher="shared", loss="infonce")),
    "c": ("(c) cached teacher", dict(teacher="cached", loss="infonce")),
    "d": ("(d) student alone, InfoNCE", dict(teacher="none", loss="infonce")),
    "mac": ("(d) student alone, MAC", dict(teacher="none", loss="mac")),
    "gradcache": ("(d) student alone, MAC, GradCache chunk 4", dict(teacher="none", loss="mac", grad_cache=4)),
}


def checkpoint_for(shape: str, folder: str = BENCH_DIR) -> str:
    path = os.path.join(folder, f"qwen2vl-{shape}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        log(f"writing a random {shape} Qwen2-VL checkpoint to {path}")
        subprocess.run([sys.executable, os.path.join(ROOT, "tiny_puma.py"), path, "--shape", shape, "--shards", "2"],
                       check=True, stdout=sys.stderr)
    return path


def make_examples(count: int):
    """Mixed text/image pairs with the three target modalities."""
    from PIL import Image, ImageDraw

    colours = ["red", "green", "blue", "yellow", "purple", "orange", "grey", "pink"]
    examples = []
    for i in range(count):
        image = Image.new("RGB", (112, 112), "white")
        ImageDraw.Draw(image).ellipse([10 + i % 20, 10, 90, 90 - i % 15], fill=colours[i % len(colours)])
        caption = f"a {colours[i % len(colours)]} shape number {i} drawn on a white background"
        kind = i % 3
        query, positive, modality = (({"text": caption}, {"image": image}, "image") if kind == 0 else
                                     ({"image": image}, {"text": caption}, "text") if kind == 1 else
                                     ({"text": caption + ", again"}, {"text": caption, "image": image}, "image,text"))
        examples.append({"query": query, "positive": positive, "modality": modality, "query_id": f"q{i}",
                         "positive_id": f"c{i}"})
    return examples


class Collator:
    def __init__(self, model):
        from modeling_puma import build_prompt, featurize, parse_input

        self.model, self.build_prompt, self.featurize, self.parse_input = model, build_prompt, featurize, parse_input

    def _features(self, items, instruction=None):
        examples = [self.parse_input(item, i) for i, item in enumerate(items)]
        config, tokenizer = self.model.config, self.model.processor.tokenizer
        prompts = [self.build_prompt(config, t, im is not None, instruction, tokenizer) for t, im in examples]
        return self.featurize(self.model.processor, config, prompts, [im for _, im in examples])

    def __call__(self, examples):
        import torch

        ids = {"text": 0, "image": 1, "image,text": 2}
        return {"query": self._features([e["query"] for e in examples], "Find the match."),
                "candidate": self._features([e["positive"] for e in examples]),
                "modality": torch.tensor([ids[e["modality"]] for e in examples]),
                "query_ids": [e["query_id"] for e in examples], "candidate_ids": [e["positive_id"] for e in examples]}


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def run_one(spec: dict) -> dict:
    """One configuration, in this (fresh) process."""
    import peft
    import torch
    from transformers import TrainerCallback

    from modeling_puma import PumaForEmbedding
    from trainer_puma import (CachedTeacher, PumaTrainer, PumaTrainingArguments, SeparateTeacher,
                              precompute_teacher_cache)

    baseline = _rss_bytes()  # after imports: peak memory is reported above this
    device = spec["device"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    checkpoint = spec["checkpoint"]
    base = PumaForEmbedding.from_pretrained(checkpoint, num_layers=KEPT_LAYERS[spec["shape"]], dtype=dtype,
                                            device_map=device)
    collator = Collator(base)
    examples = make_examples(spec["batch"] * (spec["steps"] + 1))
    teacher, cache = None, os.path.join(spec["data"], f"cache-{spec['shape']}-{spec['batch']}-{spec['steps']}")
    if spec["teacher"] == "precompute":  # its own process, so the cached run's peak never holds the full model
        full = PumaForEmbedding.from_pretrained(checkpoint, dtype=dtype, device_map=device)
        loader = torch.utils.data.DataLoader(examples, batch_size=spec["batch"], collate_fn=collator)
        precompute_teacher_cache(full, loader, cache, {})
        return {}
    if spec["teacher"] == "cached":
        teacher = CachedTeacher(cache)
    elif spec["teacher"] == "separate":
        teacher = SeparateTeacher(PumaForEmbedding.from_pretrained(checkpoint, dtype=dtype, device_map=device))
    lora = peft.LoraConfig(r=16, lora_alpha=32, task_type="FEATURE_EXTRACTION",
                           target_modules=r".*language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj")
    student = peft.get_peft_model(base, lora)
    distill = spec["teacher"] != "none"
    args = PumaTrainingArguments(
        output_dir=os.path.join(spec["data"], "out"), per_device_train_batch_size=spec["batch"],
        max_steps=spec["steps"] + 1,
        learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=device == "cpu",
        bf16=device == "cuda", disable_tqdm=True, dataloader_num_workers=0, loss=spec["loss"],
        distill="mse" if distill else "none", distill_weight=0.1 if distill else 0.0,
        contrastive_weight=0.9 if distill else 1.0, teacher=spec["teacher"], teacher_model=checkpoint,
        teacher_cache=cache if spec["teacher"] == "cached" else None, grad_cache_chunk_size=spec.get("grad_cache"),
    )
    step_times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.start)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = PumaTrainer(model=student, args=args, train_dataset=examples, data_collator=collator, teacher=teacher,
                          callbacks=[Timer()])
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline)
    return {"step_s": statistics.median(step_times[1:]), "steps_s": step_times[1:], "peak_bytes": peak}


def full_depth(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    return (config.get("text_config") or config)["num_hidden_layers"]


def run_elastic(report, checkpoint: str, shape: str, data: str, batch: int, rounds: int, threads: int,
                device: str) -> None:
    """Plain step vs 3 depths x 3 Matryoshka sizes on the same student and batches, interleaved; reports the
    tables."""
    import peft
    import torch

    from modeling_puma import PumaForEmbedding
    from trainer_puma import PumaTrainer, PumaTrainingArguments

    torch.set_num_threads(threads)
    kept = KEPT_LAYERS[shape]
    base = PumaForEmbedding.from_pretrained(checkpoint, num_layers=kept, dtype=torch.float32, device_map=device)
    hidden = base.config.text_config.hidden_size
    depths, dims = [kept // 3, 2 * kept // 3, kept], [hidden // 4, hidden // 2, hidden]
    lora = peft.LoraConfig(r=16, lora_alpha=32, task_type="FEATURE_EXTRACTION",
                           target_modules=r".*language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj")
    student = peft.get_peft_model(base, lora)
    collator = Collator(base)
    examples = make_examples(batch * (rounds + 1))
    batches = [collator(examples[i * batch:(i + 1) * batch]) for i in range(rounds + 1)]

    def trainer(**elastic):
        args = PumaTrainingArguments(output_dir=os.path.join(data, "out"), per_device_train_batch_size=batch,
                                     learning_rate=1e-4, report_to=[], use_cpu=device == "cpu", disable_tqdm=True,
                                     save_strategy="no", loss="mac", **elastic)
        built = PumaTrainer(model=student, args=args, train_dataset=examples, data_collator=collator)
        built.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
        return built

    trainers = {"plain": trainer(), "elastic": trainer(depths=depths, matryoshka_dims=dims)}
    forwards = []
    base.model.language_model.register_forward_hook(lambda *a: forwards.append(1))
    counts = {name: {"next": 0, "forwards": []} for name in trainers}

    def step(name):
        def run():
            state = counts[name]
            student.zero_grad(set_to_none=True)
            forwards.clear()
            trainers[name].training_step(student, batches[state["next"]])
            if device == "cuda":
                torch.cuda.synchronize()
            state["forwards"].append(len(forwards))
            state["next"] += 1
        return run

    fns = {name: step(name) for name in trainers}
    log("warm-up round")
    for fn in fns.values():
        fn()
    LOAD_AVERAGES.clear()
    cpu = {}
    times = time_interleaved(fns, rounds, cpu)
    names = {"plain": f"plain ({kept} layers, full size)",
             "elastic": f"{len(depths)} depths x {len(dims)} sizes ({', '.join(map(str, depths))} layers x "
                        f"{', '.join(map(str, dims))})"}
    rows = [[label, f"{statistics.median(times[name]):.3f}", f"{min(times[name]):.3f}-{max(times[name]):.3f}",
             f"{statistics.median(cpu[name]):.3f}", f"{statistics.median(counts[name]['forwards']):g}"]
            for name, label in names.items()]
    report.table(f"{os.path.basename(checkpoint)}: LoRA r16 student keeping {kept} of {full_depth(checkpoint)} layers, "
                 f"batch {batch} mixed text/image pairs, MAC-Loss, {device} float32, {threads} thread(s); {rounds} "
                 "interleaved rounds after a warm-up",
                 ["step", "median (s)", "min-max (s)", "CPU median (s)", "student forwards per step"], rows)
    # each round's elastic step against the plain step of the same round
    checks = [[f"elastic step / plain step ({clock})", spread(ratios(values["elastic"], values["plain"])), "<= 1.15"]
              for clock, values in (("wall", times), ("CPU", cpu))]
    report.table("Elastic step against the plain step", ["check", "median (min-max over rounds)", "goal"], checks,
                 notes=[load_note(threads)])


def _flops(fn, visual_suffix: str = ".visual") -> tuple[float, float]:
    """`(all, vision tower)` floating-point operations of `fn()` (torch's `FlopCounterMode`)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()
    visual = sum(sum(by_op.values()) for name, by_op in counts.items() if name.endswith(visual_suffix))
    return float(counter.get_total_flops()), float(visual)


def grad_cache_flops(student, base, batch: dict, chunk: int) -> dict[str, float]:
    """FLOPs of the plain step, of GradCache as it runs, and of the earlier GradCache, on one `batch`: each group's
    forward and backward of a summed embedding (what the loss adds is negligible), and of each chunk."""
    import torch

    from trainer_puma import length_order, split_features

    def forward(features, grad: bool):
        with torch.set_grad_enabled(grad):
            embedding = student(**features).raw_embeddings
        if grad:
            embedding.sum().backward()

    token_id = base.config.image_token_id
    total = {"plain": 0.0, "gradcache": 0.0, "previous gradcache": 0.0, "vision (plain)": 0.0}
    for group in ("query", "candidate"):
        features = batch[group]
        flops, visual = _flops(lambda: forward(features, True))
        total["plain"] += flops
        total["vision (plain)"] += visual
        sorted_chunks = split_features(features, chunk, token_id, order=length_order(features))
        for index, part in enumerate(sorted_chunks):
            first, first_visual = _flops(lambda: forward(part, False))
            both, _ = _flops(lambda: forward(part, True))
            kept = group == "candidate" and index == len(sorted_chunks) - 1
            total["gradcache"] += first + (both - first if kept else both - first_visual)
        for part in split_features(features, chunk, token_id):
            first, _ = _flops(lambda: forward(part, False))
            both, _ = _flops(lambda: forward(part, True))
            total["previous gradcache"] += first + both
    student.zero_grad(set_to_none=True)
    return total


def run_grad_cache(report, checkpoint: str, shape: str, data: str, batch: int, chunk: int, rounds: int,
                   threads: int, device: str) -> None:
    """Plain step vs GradCache (and GradCache re-running the vision tower) on the same student and batches,
    interleaved; the FLOP accounting of each; reports the tables."""
    import peft
    import torch

    from modeling_puma import PumaForEmbedding
    from trainer_puma import PumaTrainer, PumaTrainingArguments

    torch.set_num_threads(threads)
    kept = KEPT_LAYERS[shape]
    base = PumaForEmbedding.from_pretrained(checkpoint, num_layers=kept, dtype=torch.float32, device_map=device)
    lora = peft.LoraConfig(r=16, lora_alpha=32, task_type="FEATURE_EXTRACTION",
                           target_modules=r".*language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj")
    student = peft.get_peft_model(base, lora)
    collator = Collator(base)
    examples = make_examples(batch * (rounds + 1))
    batches = [collator(examples[i * batch:(i + 1) * batch]) for i in range(rounds + 1)]

    def trainer(**settings):
        args = PumaTrainingArguments(output_dir=os.path.join(data, "out"), per_device_train_batch_size=batch,
                                     learning_rate=1e-4, report_to=[], use_cpu=device == "cpu", disable_tqdm=True,
                                     save_strategy="no", loss="mac", **settings)
        built = PumaTrainer(model=student, args=args, train_dataset=examples, data_collator=collator)
        built.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
        return built

    trainers = {"plain": trainer(), "gradcache": trainer(grad_cache_chunk_size=chunk),
                "gradcache, vision tower in both passes": trainer(grad_cache_chunk_size=chunk,
                                                                  grad_cache_reuse_visual=False)}
    counts = dict.fromkeys(trainers, 0)

    def step(name):
        def run():
            student.zero_grad(set_to_none=True)
            trainers[name].training_step(student, batches[counts[name]])
            if device == "cuda":
                torch.cuda.synchronize()
            counts[name] += 1
        return run

    fns = {name: step(name) for name in trainers}
    log("warm-up round")
    for fn in fns.values():
        fn()
    LOAD_AVERAGES.clear()
    cpu = {}
    times = time_interleaved(fns, rounds, cpu)
    log("counting FLOPs")
    flops = grad_cache_flops(student, base, batches[0], chunk)
    rows = [[name, f"{statistics.median(times[name]):.3f}", f"{min(times[name]):.3f}-{max(times[name]):.3f}",
             f"{statistics.median(cpu[name]):.3f}",
             spread(ratios(times[name], times["plain"])) if name != "plain" else "1",
             spread(ratios(cpu[name], cpu["plain"])) if name != "plain" else "1"]
            for name in trainers]
    report.table(f"{os.path.basename(checkpoint)}: LoRA r16 student keeping {kept} of {full_depth(checkpoint)} layers, "
                 f"batch {batch} mixed text/image pairs, GradCache chunks of {chunk}, MAC-Loss, {device} float32, "
                 f"{threads} thread(s); {rounds} interleaved rounds after a warm-up",
                 ["step", "median (s)", "min-max (s)", "CPU median (s)", "/ plain (wall), median (min-max)",
                  "/ plain (CPU), median (min-max)"], rows, notes=[load_note(threads)])
    plain = flops["plain"]
    report.table("Work per step (GFLOP, one batch)", ["step", "GFLOP", "/ plain"], [
        ["plain: forward and backward of each group", f"{plain / 1e9:.1f}", "1"],
        ["  of which the vision tower (forward only: it is frozen)", f"{flops['vision (plain)'] / 1e9:.1f}",
         f"{flops['vision (plain)'] / plain:.3f}"],
        ["GradCache: first pass, replays without the tower, kept chunk", f"{flops['gradcache'] / 1e9:.1f}",
         f"{flops['gradcache'] / plain:.3f}"],
        ["previous GradCache: chunks in batch order, every chunk and tower twice",
         f"{flops['previous gradcache'] / 1e9:.1f}", f"{flops['previous gradcache'] / plain:.3f}"],
    ], notes=["A LoRA student's backward computes input gradients only (its frozen weights get none): about one "
              "forward, so one extra forward costs 1.5 x a plain step, not the 1.33 x of full fine-tuning."])


def run_configurations(report, args, checkpoint: str) -> None:
    """Each configuration in a fresh process; reports the table of steps and peaks and the table of checks."""
    common = {"checkpoint": checkpoint, "shape": args.shape, "steps": args.steps, "batch": args.batch,
              "device": args.device, "data": args.data}
    runs = {name: spec for key, (name, spec) in CONFIGURATIONS.items() if key in args.configs}
    if "c" in args.configs:  # the cached teacher reads what this writes, in a process of its own
        runs = {"precompute the teacher cache": dict(teacher="precompute", loss="infonce"), **runs}
    results = {}
    for name, spec in runs.items():
        log(f"running {name} ...")
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps({**common, **spec})],
                             capture_output=True, text=True, cwd=ROOT)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT "):])
    results.pop("precompute the teacher cache", None)
    a, d = results[CONFIGURATIONS["a"][0]], results[CONFIGURATIONS["d"][0]]

    def step_ratios(r, base):  # steps paired by index: both ran the same batches in the same order
        return ratios(r["steps_s"], base["steps_s"])

    rows = [[name, f"{r['step_s']:.3f}", spread(step_ratios(r, d), 2), f"{r['peak_bytes'] / 2**30:.2f}",
             f"{r['peak_bytes'] / a['peak_bytes']:.2f}"] for name, r in results.items()]
    report.table(f"{args.shape} shape, {KEPT_LAYERS[args.shape]} of {full_depth(checkpoint)} layers kept, LoRA r16, "
                 f"batch {args.batch}, {args.device}, median of {args.steps} steps",
                 ["configuration", "step (s)", "step / (d), median (min-max) over steps", "peak memory (GiB)",
                  "peak / (a)"], rows)
    checks = []
    if "c" in args.configs:
        c = results[CONFIGURATIONS["c"][0]]
        checks += [["cached teacher step / student alone", spread(step_ratios(c, d), 2), "<= 1.10"],
                   ["cached teacher peak / release recipe peak", f"{c['peak_bytes'] / a['peak_bytes']:.2f}", "<= 0.60"],
                   ["speed-up of (c) over (a)", spread(step_ratios(a, c), 2) + "x",
                    "ideal ~(student+teacher)/student FLOPs"]]
    if "mac" in args.configs:
        mac = results[CONFIGURATIONS["mac"][0]]
        checks.append(["MAC step / InfoNCE step - 1 (%)", spread([100 * (r - 1) for r in step_ratios(mac, d)], 1),
                       "<= 3 %"])
        if "gradcache" in args.configs:
            plain_gc = results[CONFIGURATIONS["gradcache"][0]]
            checks.append(["GradCache peak / plain peak (same batch)",
                           f"{plain_gc['peak_bytes'] / mac['peak_bytes']:.2f}", "< 1"])
    if checks:
        report.table("Checks", ["check", "measured", "goal"], checks,
                         notes=["Step ratios pair the two configurations' timed steps by index (the same batches), "
                            "median (min-max) over the steps."])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=list(KEPT_LAYERS),
                        help="random Qwen2-VL checkpoint of this shape (tiny: the code path in seconds)")
    parser.add_argument("--data", default=BENCH_DIR, help="folder of the generated checkpoint, caches and outputs")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="2 timed steps, batch 8")
    parser.add_argument("--elastic", action="store_true",
                        help="only the plain vs 3 depths x 3 Matryoshka sizes comparison (--steps rounds)")
    parser.add_argument("--grad-cache", action="store_true",
                        help="only the plain vs GradCache comparison and its FLOP accounting (--steps rounds)")
    parser.add_argument("--chunk", type=int, default=4, help="GradCache chunk size of --grad-cache")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of --elastic and --grad-cache")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS),
                        help="configurations to run (default: all); a and d, the baselines, always run")
    add_markdown_argument(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.configs = sorted(set(args.configs) | {"a", "d"}, key=list(CONFIGURATIONS).index)
    if args.child:
        print("RESULT " + json.dumps(run_one(json.loads(args.child))), flush=True)
        return
    if args.quick:
        args.steps, args.batch = 2, 8
    mode = " (elastic depth)" if args.elastic else " (GradCache)" if args.grad_cache else ""
    report = Report(args.markdown, "Training-step benchmark" + mode)
    checkpoint = checkpoint_for(args.shape, args.data)
    if args.elastic:
        run_elastic(report, checkpoint, args.shape, args.data, args.batch, args.steps, args.threads, args.device)
    elif args.grad_cache:
        run_grad_cache(report, checkpoint, args.shape, args.data, args.batch, args.chunk, args.steps, args.threads,
                       args.device)
    else:
        run_configurations(report, args, checkpoint)
    report.write()


if __name__ == "__main__":
    main()

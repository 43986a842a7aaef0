"""What elastic depth and Matryoshka training cost at each depth and size, against a model trained alone there.

    python bench/elastic_tax.py [--seeds 0 1 2] [--variants elastic elastic-deep ...] [--scale demo|reduced] [--jobs 2]
    python bench/elastic_tax.py --variants elastic --gradients   # also the per-depth gradients
    python bench/elastic_tax.py --variants elastic --alone d3    # the reference trained alone at depth 3 only
    python bench/elastic_tax.py --report --markdown docs/benchmarks/elastic_tax.md   # the tables of what is cached
    python bench/elastic_tax.py --quick                          # the code path in minutes (not a result)

The demo's stage 2 (`configs/demo_stage2.yaml`, `configs/demo_elastic.yaml`) as `demo.py --elastic` runs it
(`--scale demo`: the demo benchmark of 2880 training queries, 6 epochs of batch 48, 360 steps), from one stage-1 model
(`configs/demo_stage1.yaml` on the tiny random Qwen2-VL, trained once); `--scale reduced` trains 30 steps on 56-pixel
images instead, too little for the tiny random model to learn its image tasks. Every variant is trained once per seed
(the stage-2 `seed`: data order and the draws of the training) and scored by Recall@5 on each task's local pool (40
queries per task) of two benchmarks: the demo benchmark it trained on (`demo`: its test scenes) and a second one
drawn with another seed (`seed1`: another scene split, other renderings and distractors; about half its test scenes
are training scenes of the first, drawn anew).

Variants (`VARIANTS`): `alone` trains depth d alone (and, with sizes, size m alone); the others train depths 1, 2, 3
(and/or the Matryoshka sizes 16, 32, 64 of the 64-wide embedding) at once with a loss setting each. The tables give
each variant's average over tasks, mean ± standard deviation over the seeds, at every trained (depth, size), and its
difference from `alone` at the same point (mean of the per-seed differences ± their standard deviation).

`--gradients` also measures, on the stage-1 model and on the elastic model of the first seed, how each depth's loss
pulls the shared parameters: per parameter group, each depth's gradient norm, its
projection on the summed gradient (as a share of it) and its cosine to the full depth's gradient (mean over 4
batches).

Each training runs in its own process (one thread, `nice`), at most `--jobs` at a time; results are cached as JSON
under `--data`-<scale> (default: puma_bench/elastic_tax-demo in the temporary folder), so a rerun only trains what
is missing.
"""

import argparse
import concurrent.futures
import itertools
import json
import os
import statistics
import subprocess
import sys

from common import BENCH_DIR, ROOT, Report, add_markdown_argument, log


DEPTHS, DIMS = (1, 2, 3), (16, 32, 64)  # the demo's kept layers; sizes of the tiny model's 64-wide embedding
# --scale -> (benchmark sizes, the stage-2 settings that differ from the demo's configs). `demo` is demo.py's own run
# (2880 training queries, 6 epochs of batch 48: 360 steps); `reduced` trains 30 steps on smaller images, which on the
# tiny random model is far too little to learn the image tasks (averages about 20, chance level on most tasks).
SCALES = {
    "demo": ({"num_train": 2880, "num_nli": 256}, ["--logging_steps", "20"]),
    "reduced": ({"num_train": 960, "num_test": 40, "num_nli": 256, "image_size": 48},
                ["--num_train_epochs", "1", "--per_device_train_batch_size", "32", "--max_pixels", "3136",
                 "--video_max_frames", "4", "--video_min_pixels", "3136", "--video_max_pixels", "3136",
                 "--video_total_pixels", "6272", "--logging_steps", "10"]),
}
QUICK = {"num_train": 14, "num_test": 4, "num_nli": 16, "image_size": 32}
# name -> (what it trains: "depth" or "size", extra train.py arguments). `alone` is the reference of every other.
VARIANTS = {
    "alone": ("both", []),
    "elastic": ("depth", ["--depth_weights", "1", "1", "1"]),             # depths 1, 2, 3; equal weights
    "elastic-linear": ("depth", ["--depth_weights", "1", "2", "3"]),      # weight proportional to depth
    "elastic-deep": ("depth", ["--depth_weights", "0.5", "0.5", "1"]),    # the full depth weighs as the others
                                                                          # together (configs/demo_elastic.yaml)
    # equal weights + Starbucks' in-batch KL to the full depth
    "elastic-selfkl": ("depth", ["--depth_weights", "1", "1", "1", "--self_kl_weight", "1.0"]),
    # equal weights; the full depth + one other drawn per step
    "elastic-sample": ("depth", ["--depth_weights", "1", "1", "1", "--elastic_sample_pairs", "1"]),
    "matryoshka": ("size", []),                                           # 3 layers, sizes 16, 32, 64; weights 1
    "matryoshka-deep": ("size", ["--matryoshka_weights", "0.5", "0.5", "1"]),
    "matryoshka-selfkl": ("size", ["--self_kl_weight", "1.0"]),
}


def points(kind: str) -> list[tuple[int, int | None]]:
    """The (depth, size) pairs a variant of this kind is scored at; None: the full size."""
    # a Matryoshka model is also scored at its full size, against the depth trained alone there
    sizes = [(DEPTHS[-1], m) for m in DIMS[:-1]] + [(DEPTHS[-1], None)]
    return {"depth": [(d, None) for d in DEPTHS], "size": sizes}[kind]


def point_label(depth: int, dim: int | None) -> str:
    return f"d{depth}" + ("" if dim is None else f"_m{dim}")


def alone_name(label: str) -> str:
    """The run trained alone at a point: `d3_m16` -> `alone-d3-m16`."""
    return "alone-" + label.replace("_", "-")


def runs(variant: str, seeds: list[int], kinds: set[str], alone: set[str] | None = None) -> list[dict]:
    """The trainings of `variant`: one per seed (and per point of `kinds` for `alone`, or per point labelled in
    `alone` where given), each with its train.py arguments."""
    kind, extra = VARIANTS[variant]
    out = []
    for seed in seeds:
        if variant == "alone":
            wanted = [p for k in ("depth", "size") if k in kinds for p in points(k)]
            for depth, dim in [p for p in dict.fromkeys(wanted) if alone is None or point_label(*p) in alone]:
                name = alone_name(point_label(depth, dim))
                args = ["--num_layers", str(depth)] + ([] if dim is None else ["--matryoshka_dims", str(dim)])
                out.append({"name": name, "seed": seed, "config": "demo_stage2.yaml", "args": args,
                            "points": [(depth, dim)]})
            continue
        if kind == "depth":
            out.append({"name": variant, "seed": seed, "config": "demo_elastic.yaml", "args": extra,
                        "points": points("depth")})
        else:
            out.append({"name": variant, "seed": seed, "config": "demo_stage2.yaml",
                        "args": ["--matryoshka_dims", *map(str, DIMS), *extra], "points": points("size")})
    return [dict(run, variant=variant) for run in out]


# ---------------------------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------------------------
def _reproducible() -> None:
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import faiss

    faiss.omp_set_num_threads(1)


def _score(model, benchmarks: dict, dim: int | None) -> dict:
    """Average Recall@5 over the tasks of each benchmark, and per task."""
    from puma_eval import evaluate_mbeir, mbeir_summary

    scored = _Truncated(model, dim) if dim is not None else model
    out = {}
    for name, root in benchmarks.items():
        results = evaluate_mbeir(scored, root, show_progress_bar=False)
        out[name] = {"average": mbeir_summary(results)["score"], **{r["label"]: r["score"] for r in results}}
    return out


class _Truncated:
    """A model whose `encode` keeps the first `dim` coordinates (Matryoshka), renormalised and zero-padded back to
    the full size that the evaluation loop allocates (the padding leaves every inner product unchanged)."""

    def __init__(self, model, dim: int):
        self._model, self._dim = model, dim

    def __getattr__(self, name):
        return getattr(self._model, name)

    def encode(self, *args, **kwargs):
        import numpy as np
        import torch

        out = self._model.encode(*args, truncate_dim=self._dim, **kwargs)
        width = self._model.config.text_config.hidden_size - out.shape[-1]
        if isinstance(out, torch.Tensor):
            return torch.nn.functional.pad(out, (0, width))
        return np.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, width)])


def child_train(spec: dict) -> None:
    """Trains one run of `runs()` and writes its scores at each of its points to `spec["result"]`."""
    _reproducible()
    from modeling_puma import PumaForEmbedding
    from train_puma import main as train_main
    from train_puma import make_parser

    argv = ["--config", os.path.join(ROOT, "configs", spec["config"]), "--model_name_or_path", spec["stage1"],
            "--mbeir_root", spec["benchmarks"]["demo"], "--output_dir", spec["output_dir"], "--seed",
            str(spec["seed"]), "--disable_tqdm", "true", *spec["stage2"], *spec["args"]]
    train_main(*make_parser().parse_args_and_config(argv))
    scores = {}
    for depth, dim in spec["points"]:
        model = PumaForEmbedding.from_pretrained(spec["output_dir"], num_layers=depth)
        scores[f"d{depth}" + ("" if dim is None else f"_m{dim}")] = _score(model, spec["benchmarks"], dim)
    with open(spec["result"], "w", encoding="utf-8") as f:
        json.dump(scores, f, indent=1)


def child_gradients(spec: dict) -> None:
    """Per-depth gradients of the contrastive loss at the shared parameters of `spec["model"]`, on the first
    training batches: writes `{group: {depth: {"norm", "share", "cosine"}}}` averaged over the batches."""
    import torch

    _reproducible()
    from data_puma import PumaCollator
    from modeling_puma import PumaForEmbedding
    from train_puma import build_dataset, make_parser
    from trainer_puma import PumaTrainer

    argv = ["--config", os.path.join(ROOT, "configs", "demo_elastic.yaml"), "--model_name_or_path", spec["model"],
            "--mbeir_root", spec["benchmarks"]["demo"], "--output_dir", spec["output_dir"], *spec["stage2"]]
    script_args, training_args, _ = make_parser().parse_args_and_config(argv)
    overrides = {key: getattr(script_args, key) for key in ("max_pixels", "video_max_frames", "video_min_pixels",
                                                            "video_max_pixels", "video_total_pixels")
                 if getattr(script_args, key)}  # the settings the training runs with (train_puma.main)
    model = PumaForEmbedding.from_pretrained(spec["model"], **overrides)
    dataset = build_dataset(script_args)
    trainer = PumaTrainer(model=model, args=training_args, train_dataset=dataset,
                          data_collator=PumaCollator(model.processor, model.config))
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if ".layers." in name:
            group = "layer " + name.split(".layers.")[1].split(".")[0]
            group = group if "visual" not in name else "vision"
        elif "norm" in name and "visual" not in name and "layers" not in name:
            group = "final norm"
        elif "visual" in name:
            group = "vision"
        else:
            group = "embeddings"
        groups.setdefault(group, []).append(parameter)
    contrastive, depths = trainer.objective.contrastive, trainer.objective.depths
    trainer.objective.contrastive.tau_hard = training_args.tau_norm
    sums = {}
    batches = list(itertools.islice(trainer.get_train_dataloader(), spec["batches"]))
    for batch in batches:
        inputs = trainer._prepare_inputs(batch)
        embedded = {group: model(**inputs[group], output_depths=depths).depth_embeddings
                    for group in ("query", "candidate", "negative") if group in inputs}
        grads = {}
        for depth in depths:
            loss = contrastive.compute_loss_from_embeddings(
                embedded["query"][depth], embedded["candidate"][depth], inputs.get("modality"),
                embedded["negative"][depth] if "negative" in embedded else None,
                inputs.get("negative_modality"))["loss"]
            params = [p for group in groups.values() for p in group]
            flat = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            flat = [torch.zeros_like(p) if g is None else g for p, g in zip(params, flat)]
            start = 0
            for group, members in groups.items():
                grads[(group, depth)] = torch.cat([g.flatten() for g in flat[start:start + len(members)]])
                start += len(members)
        for group in groups:
            total = sum(grads[(group, d)] for d in depths)
            for depth in depths:
                g, deepest = grads[(group, depth)], grads[(group, depths[-1])]
                cos = float(torch.nn.functional.cosine_similarity(g, deepest, dim=0)) if g.norm() > 0 else 0.0
                entry = sums.setdefault(group, {}).setdefault(str(depth), {"norm": 0.0, "share": 0.0, "cosine": 0.0})
                entry["norm"] += float(g.norm()) / len(batches)
                # the depth's component along the summed gradient, as a share of it
                entry["share"] += float(g @ total / total.pow(2).sum().clamp_min(1e-30)) / len(batches)
                entry["cosine"] += cos / len(batches)
    with open(spec["result"], "w", encoding="utf-8") as f:
        json.dump(sums, f, indent=1)


def spawn(mode: str, spec: dict, log_path: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    with open(log_path, "w", encoding="utf-8") as out:
        done = subprocess.run(["nice", "-n", "5", sys.executable, os.path.abspath(__file__), f"--{mode}",
                               json.dumps(spec)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{mode} {spec.get('name', '')} seed {spec.get('seed', '')} failed; see {log_path}")


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def prepare(folder: str, quick: bool, scale: str) -> dict:
    """The two benchmarks, the tiny base and the stage-1 model (made once)."""
    from demo_data_puma import make_demo_benchmark
    from tiny_puma import build_tiny_checkpoint

    sizes = QUICK if quick else SCALES[scale][0]
    benchmarks = {"demo": os.path.join(folder, "data"), "seed1": os.path.join(folder, "data-seed1")}
    for (name, root), seed in zip(benchmarks.items(), (0, 1)):
        if not os.path.isfile(os.path.join(root, "demo_benchmark.json")):
            log(f"writing the {name} benchmark")
            make_demo_benchmark(root, seed=seed, **sizes)
    base, stage1 = os.path.join(folder, "tiny-qwen2_vl"), os.path.join(folder, "stage1")
    if not os.path.isfile(os.path.join(base, "config.json")):
        build_tiny_checkpoint(base, "qwen2_vl")
    if not os.path.isfile(os.path.join(stage1, "config.json")):
        log("stage 1 (once)")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        with open(os.path.join(folder, "stage1.log"), "w", encoding="utf-8") as out:
            subprocess.run(["nice", "-n", "5", sys.executable, os.path.join(ROOT, "train.py"), "--config",
                            os.path.join(ROOT, "configs", "demo_stage1.yaml"), "--model_name_or_path", base,
                            "--teacher_model", base, "--nli_file", os.path.join(benchmarks["demo"], "nli_demo.csv"),
                            "--output_dir", stage1, "--disable_tqdm", "true",
                            *(["--max_steps", "2"] if quick else [])],
                           env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    return {"benchmarks": benchmarks, "stage1": stage1}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--alone", nargs="+", metavar="POINT",
                        help="train the reference alone only at these points (d1 d2 d3 d3_m16 d3_m32; default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once (each one thread)")
    parser.add_argument("--data", default=os.path.join(BENCH_DIR, "elastic_tax"))
    parser.add_argument("--scale", default="demo", choices=list(SCALES), help="demo: the demo's own stage 2")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 steps (the code path, not a result)")
    parser.add_argument("--gradients", action="store_true", help="also measure the per-depth gradients")
    parser.add_argument("--report", action="store_true", help="train nothing: tables of the results already there")
    parser.add_argument("--train", help=argparse.SUPPRESS)  # child modes: a JSON spec
    parser.add_argument("--grad", help=argparse.SUPPRESS)
    add_markdown_argument(parser)
    args = parser.parse_args(argv)
    if args.train or args.grad:
        return child_train(json.loads(args.train)) if args.train else child_gradients(json.loads(args.grad))
    if "alone" not in args.variants:  # the reference, trained after the variants named
        args.variants.append("alone")
    folder = f"{args.data}-{'quick' if args.quick else args.scale}"
    os.makedirs(folder, exist_ok=True)
    shared = prepare(folder, args.quick, args.scale)
    stage2 = SCALES[args.scale][1] + (["--max_steps", "2"] if args.quick else [])
    # depths before sizes, seed by seed, in the order of --variants within a seed
    kinds = {VARIANTS[v][0] for v in args.variants if v != "alone"} or {"depth", "size"}
    order = {name: i for i, name in enumerate(args.variants)}
    alone = set(args.alone) if args.alone else None
    todo = sorted((run for variant in args.variants for run in runs(variant, args.seeds, kinds, alone)),
                  key=lambda r: (r["points"][0][1] is not None, r["seed"], order[r["variant"]]))
    for run in todo:
        key = f"{run['name']}-s{run['seed']}"
        run.update(shared, stage2=stage2, output_dir=os.path.join(folder, "runs", key),
                   result=os.path.join(folder, "results", key + ".json"))
    os.makedirs(os.path.join(folder, "results"), exist_ok=True)
    missing = [] if args.report else [run for run in todo if not os.path.isfile(run["result"])]
    log(f"{len(todo)} trainings, {len(missing)} to run, {args.jobs} at a time")
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(spawn, "train", run, run["result"][:-5] + ".log"): run for run in missing}
        for future in concurrent.futures.as_completed(futures):
            run = futures[future]
            future.result()
            log(f"done {run['name']} seed {run['seed']}")
    scores = {}
    for run in todo:
        if not os.path.isfile(run["result"]):
            continue
        with open(run["result"], encoding="utf-8") as f:
            for point, by_bench in json.load(f).items():
                scores[(run["name"], run["seed"], point)] = by_bench

    report = Report(args.markdown, "Elastic depth and Matryoshka training against one model per depth and size")
    if args.report:
        report.note(f"Tables of the models this script trained earlier with the same --scale ({args.scale}), "
                    f"cached under the --data folder ({os.path.basename(folder)}); each trained in its own process "
                    "on one thread.")
    for kind, title in (("depth", "Depths 1, 2, 3 trained at once"), ("size", "Matryoshka sizes of the 3 layers")):
        variants = [v for v in args.variants if VARIANTS[v][0] == kind]
        if not variants:
            continue
        pts = points(kind)
        labels = [point_label(d, m) for d, m in pts]
        for bench in shared["benchmarks"]:
            rows = []
            for variant in ["alone"] + variants:
                row = [variant]
                for label in labels:
                    alone = alone_name(label)
                    name = alone if variant == "alone" else variant
                    seeds = [s for s in args.seeds if (name, s, label) in scores]
                    if not seeds:
                        row.append("-")
                        continue
                    values = [scores[(name, s, label)][bench]["average"] for s in seeds]
                    cell = mean_sd(values) + ("" if len(seeds) == len(args.seeds) else f" [{len(seeds)} seeds]")
                    paired = [s for s in seeds if (alone, s, label) in scores]
                    if variant != "alone" and paired:
                        differences = [scores[(name, s, label)][bench]["average"]
                                       - scores[(alone, s, label)][bench]["average"] for s in paired]
                        cell += f" ({mean_sd(differences)})"
                    row.append(cell)
                rows.append(row)
            report.table(f"{title}: `{bench}` benchmark, average Recall@5", ["variant", *labels], rows, notes=[
                f"Mean ± standard deviation over seeds {', '.join(map(str, args.seeds))} (fewer where marked); in "
                "brackets, the difference from the model trained alone at that point, seed by seed (mean ± sd), "
                "where that model was trained."])
        # per task, every run, on the demo benchmark
        bench = next(iter(shared["benchmarks"]))
        runs_here = sorted({(name, seed, label) for name, seed, label in scores if label in labels
                            and (name in variants or name.startswith("alone"))})
        tasks = [task for task in next(iter(scores.values()))[bench] if task != "average"]
        rows = [[name, seed, label, *[f"{scores[(name, seed, label)][bench][task]:.1f}" for task in tasks],
                 f"{scores[(name, seed, label)][bench]['average']:.1f}"] for name, seed, label in runs_here]
        if rows:
            report.table(f"{title}: `{bench}` benchmark per task, Recall@5", ["run", "seed", "point", *tasks,
                                                                             "average"], rows)

    if args.gradients:
        grad_table(args, folder, shared, stage2, report)
    report.write()


def grad_table(args, folder: str, shared: dict, stage2: list[str], report) -> None:
    seed = args.seeds[0]
    for label, model in (("stage-1 model (start of training)", shared["stage1"]),
                         ("elastic model (end of training)", os.path.join(folder, "runs", f"elastic-s{seed}"))):
        result = os.path.join(folder, "results", f"gradients-{os.path.basename(model)}.json")
        if not os.path.isfile(os.path.join(model, "config.json")):
            report.note(f"No gradients of the {label}: {model} is not trained yet.")
            continue
        if not os.path.isfile(result):
            spawn("grad", {**shared, "model": model, "stage2": stage2, "batches": 4, "result": result,
                           "output_dir": os.path.join(folder, "runs", "gradients")}, result[:-5] + ".log")
        with open(result, encoding="utf-8") as f:
            sums = json.load(f)
        rows = [[group, *[f"{by_depth[str(d)]['norm']:.3g} / {by_depth[str(d)]['share']:.2f} / "
                          f"{by_depth[str(d)]['cosine']:.2f}" for d in DEPTHS]]
                for group, by_depth in sums.items()]
        report.table(f"Per-depth contrastive gradients, {label}", ["parameters", *[f"depth {d}" for d in DEPTHS]],
                     rows, notes=["Each cell: the gradient norm of that depth's loss / its share of the summed "
                                  "gradient (its projection on the sum, over the sum's squared norm) / its cosine to "
                                  "the full depth's gradient; mean over 4 training batches."])


if __name__ == "__main__":
    main()

"""The built-in demo: make the offline benchmark, prune a tiny base, train both stages, evaluate, plot.

    python demo.py [--out demo_out] [--family qwen2_vl|qwen2_5_vl|qwen3_vl|qwen3_vl_moe] [--quick] [--threads 2]
                   [--elastic] [--mined] [--budget [--budget-flops F]]

Steps: `demo_data_puma.py` writes a small M-BEIR-format benchmark (text→image, text→text, text→(image,text),
image→text, image→image, composed (image,text)→image and text→video tasks over PIL-drawn scenes and clips of them
moving); `tiny_puma.py` writes a
tiny model of the chosen family (Qwen2-VL by default; 6 layers, random weights: it is NOT pretrained, nothing can be
downloaded here); PUMA keeps its first 3 layers (all of a tiny Qwen3-VL's DeepStack injections); stage 1
(`configs/demo_stage1.yaml`: NLI-style pairs, InfoNCE + distillation from the shared-weight full-depth teacher, LoRA)
and stage 2 (`configs/demo_stage2.yaml`: M-BEIR-format training set, MAC-Loss) run through `train.py`, each with a
progress bar and one log line per logging step; `puma_eval` scores the untrained pruned model and the trained one on
every task's local pool. Writes `OUT/results.md`, the trained model's full evaluation in `OUT/eval/` (table, JSON and
per-task bar charts of the untrained and the trained model), and training-curve plots `OUT/curves_stage{1,2}.png`.
`--elastic` adds the elastic-depth evidence: stage 2 trained once for depths 1, 2 and 3 against one run per depth
(`OUT/elastic.md`), and the layer analysis of the untrained base and of the elastic model (`OUT/analysis_untrained/`,
`OUT/analysis_elastic/`).
`--mined` adds the hard-negative evidence: stage 2 trained again from stage 1 with two negatives per query mined by the
first stage-2 model (`eval_puma.py mine`, into `OUT/mined/`; the tiny base knows nothing, so the best ranker at hand
is the model trained without negatives), against stage 2 with the benchmark's own near-miss negatives and without any
(`OUT/mined.md`; one run is in docs/demo.md).
`--budget` trains stage 2 once for every depth 1-3 and visual-token reduction factors 1 and 2
(`configs/demo_budget.yaml`, instead of the plain stage 2 and its evaluation), then runs the budget planner on it:
depth x max_pixels x reduction, the quality-cost frontier and the setting for a FLOP budget (`OUT/budget/`).

The run is deterministic on one machine: every draw is seeded, torch runs deterministic algorithms on a fixed number
of CPU threads (`--threads`, default 2), and MKL keeps that thread count (no dynamic adjustment) with conditional
numerical reproducibility, so a rerun prints the same table. Another CPU model or thread count may give other figures.
"""

import os


# Set before torch loads MKL: by default MKL may use fewer threads than asked (MKL_DYNAMIC) and pick code paths by
# memory alignment, either of which changes the order of floating-point sums from run to run.
for _name, _value in (("MKL_DYNAMIC", "FALSE"), ("OMP_DYNAMIC", "FALSE"), ("MKL_CBWR", "AUTO")):
    os.environ.setdefault(_name, _value)

import argparse
import json
import time

import torch

from cli_puma import ArgumentParser, UsageError, run_command
from demo_data_puma import make_demo_benchmark
from mbeir_puma import markdown_table
from puma_eval import evaluate_mbeir, mbeir_summary, plot_training_curves, write_mbeir_results
from tiny_puma import FAMILIES, build_tiny_checkpoint
from train_puma import main as train_main
from train_puma import make_parser


ROOT = os.path.dirname(os.path.abspath(__file__))
# The demo's clips: 4 frames of about 112x112 pixels each (16 video tokens per pair of frames), the settings the stage
# configs train with, so that the video task costs the tiny model about what its images cost
DEMO_VIDEO = {"video_max_frames": 4, "video_min_pixels": 12544, "video_max_pixels": 12544,
              "video_total_pixels": 25088}


def run_stage(config: str, *overrides: str):
    args = make_parser().parse_args_and_config(["--config", os.path.join(ROOT, "configs", config), *overrides])
    return train_main(*args)


def make_reproducible(threads: int) -> None:
    """Fixed thread counts (torch, MKL, OpenMP, faiss) and deterministic torch algorithms; seeds are set by each
    stage's `seed` and by the data generator."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(threads)


def recall_table(before: list[dict], after: list[dict]) -> str:
    rows = [[trained["label"], trained["metric"].replace("recall@", "Recall@"), f"{untrained['score']:.1f}",
             f"{trained['score']:.1f}"]
            for untrained, trained in zip(before + [mbeir_summary(before)], after + [mbeir_summary(after)])]
    return markdown_table(["task", "metric", "untrained", "trained"], rows)


def elastic_evidence(args, data: str, base: str, stage1: str, quick: list[str]) -> str:
    """One stage-2 run trained for depths 1, 2 and 3 at once (`configs/demo_elastic.yaml`) against three runs each
    trained for one depth (`configs/demo_stage2.yaml` pruned to it), from the same stage-1 model: Recall@5 per task and
    depth side by side; the layer analysis of the untrained base (6 layers) and of the elastic model (3 layers)."""
    from modeling_puma import PumaForEmbedding
    from puma_eval.analysis import analyze, mbeir_sample, write_analysis
    from puma_eval.tasks import load_benchmark

    elastic_dir = os.path.join(args.out, "elastic")
    print("elastic: stage 2 once for depths 1, 2 and 3", flush=True)
    run_stage("demo_elastic.yaml", "--model_name_or_path", stage1, "--mbeir_root", data, "--output_dir", elastic_dir,
              *quick)
    results = {}
    for depth in (1, 2, 3):
        separate_dir = os.path.join(args.out, f"separate-{depth}")
        print(f"elastic: stage 2 for depth {depth} alone", flush=True)
        run_stage("demo_stage2.yaml", "--model_name_or_path", stage1, "--num_layers", str(depth), "--mbeir_root", data,
                  "--output_dir", separate_dir, *quick)
        for name, folder in (("elastic", elastic_dir), ("separate", separate_dir)):
            model = PumaForEmbedding.from_pretrained(folder, num_layers=depth)
            results[(name, depth)] = evaluate_mbeir(model, data, show_progress_bar=False)
    rows = results[("elastic", 1)]
    headers = ["task", *[f"depth {d} {name}" for d in (1, 2, 3) for name in ("elastic", "separate")]]
    table = markdown_table(headers, [
        [row["label"], *[f"{(results[(name, d)] + [mbeir_summary(results[(name, d)])])[index]['score']:.1f}"
                         for d in (1, 2, 3) for name in ("elastic", "separate")]]
        for index, row in enumerate(rows + [mbeir_summary(rows)])])
    with open(os.path.join(args.out, "elastic.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    image_root = load_benchmark(data).image_root
    tasks = mbeir_sample(data, max_queries=40, max_candidates=200)
    for name, model in (("untrained", PumaForEmbedding.from_pretrained(base, **DEMO_VIDEO)),
                        ("elastic", PumaForEmbedding.from_pretrained(elastic_dir))):
        write_analysis(analyze(model, tasks, image_root, show_progress_bar=False),
                       os.path.join(args.out, f"analysis_{name}"))
    return table


# ----------------------------------------------------------------------------------------------------------------
# --mined: stage 2 with mined hard negatives
# ----------------------------------------------------------------------------------------------------------------
MINED_NEGATIVES = 2


def mined_evidence(args, data: str, stage1: str, stage2: str, without: list[dict], quick: list[str]) -> str:
    """Stage 2 from `stage1` with `MINED_NEGATIVES` hard negatives per query mined by `stage2` (trained without
    negatives), against stage 2 with as many of the benchmark's own near misses and stage 2 without negatives
    (`without`, `stage2`'s results): Recall@5 per task side by side."""
    from modeling_puma import PumaForEmbedding
    from puma_eval.mining import MiningSettings, mine_negatives

    config = make_parser().parse_args_and_config(["--config", os.path.join(ROOT, "configs", "demo_stage2.yaml")])[0]
    mined_dir = os.path.join(args.out, "mined")
    print(f"mined: {MINED_NEGATIVES} hard negatives per training query, ranked by the stage-2 model", flush=True)
    summary = mine_negatives(PumaForEmbedding.from_pretrained(stage2), os.path.join(data, config.train_queries),
                             os.path.join(data, config.candidate_pool), os.path.join(data, config.instructions),
                             mined_dir, settings=MiningSettings(num_negatives=MINED_NEGATIVES), image_root=data,
                             cache_dir=os.path.join(mined_dir, "embeddings"), show_progress_bar=False)
    results = {"none": without}
    for name, queries in (("near misses", config.train_queries), ("mined", summary["query_file"])):
        folder = os.path.join(args.out, f"stage2-{name.replace(' ', '-')}")
        print(f"mined: stage 2 with {MINED_NEGATIVES} negatives per query ({name})", flush=True)
        run_stage("demo_stage2.yaml", "--model_name_or_path", stage1, "--mbeir_root", data, "--train_queries", queries,
                  "--num_hard_negatives", str(MINED_NEGATIVES), "--output_dir", folder, *quick)
        results[name] = evaluate_mbeir(PumaForEmbedding.from_pretrained(folder), data, show_progress_bar=False)
    headers = ["task", "no negatives", f"{MINED_NEGATIVES} near misses (the benchmark's)",
               f"{MINED_NEGATIVES} mined (by the first stage-2 model)"]
    rows = [[row["label"], *[f"{(results[name] + [mbeir_summary(results[name])])[index]['score']:.1f}"
                             for name in ("none", "near misses", "mined")]]
            for index, row in enumerate(without + [mbeir_summary(without)])]
    table = markdown_table(headers, rows)
    with open(os.path.join(args.out, "mined.md"), "w", encoding="utf-8") as f:
        f.write(table + f"\n\nMining: {summary['mined']} queries, {summary['dropped_by_margin']} candidates dropped "
                f"by the margin, {summary['short'] or 'no query'} short of negatives; "
                f"settings {json.dumps(summary['settings'])}.\n")
    return table


# The planner's grid on the demo: the first 1, 2 or 3 layers; images of 2x2 or 4x4 merged patches; no or 2x2 pooling
BUDGET_DEPTHS, BUDGET_PIXELS, BUDGET_POOLS = [1, 2, 3], [3136, 12544], [1, 2]


def budget_evidence(args, data: str, stage1: str, quick: list[str]) -> str:
    """Stage 2 trained once for depths 1-3 and reduction factors 1 and 2 (`configs/demo_budget.yaml`), then the
    planner's sweep of it on a sample of the test tasks: the frontier table, the plot and the recommendation for
    `--budget-flops` (default: half the FLOPs per input of the costliest setting), written to `OUT/budget/`."""
    from modeling_puma import PumaForEmbedding
    from puma_eval.analysis import mbeir_sample
    from puma_eval.budget import describe, frontier, recommend_setting, sweep, write_budget
    from puma_eval.tasks import load_benchmark

    model_dir = os.path.join(args.out, "budget_model")
    print("budget: stage 2 once for depths 1-3 x visual-token reduction 1 and 2", flush=True)
    run_stage("demo_budget.yaml", "--model_name_or_path", stage1, "--mbeir_root", data, "--output_dir", model_dir,
              *quick)
    print("budget: sweeping depth x max_pixels x visual_pool", flush=True)
    model = PumaForEmbedding.from_pretrained(model_dir)
    tasks = mbeir_sample(data, max_queries=40, max_candidates=200)
    result = sweep(model, tasks, load_benchmark(data).image_root, depths=BUDGET_DEPTHS, max_pixels=BUDGET_PIXELS,
                   visual_pools=BUDGET_POOLS, batch_size=16, probe_size=16, latency_repeats=3)
    budget = args.budget_flops or 0.5 * max(point["gflops"] for point in result["points"]) * 1e9
    result["frontier"] = frontier(result["points"])
    result["budget"] = {"budget_flops": budget}
    result["recommendation"] = recommend_setting(result["points"], budget_flops=budget)
    write_budget(result, os.path.join(args.out, "budget"))
    rows = [[p["depth"], p["max_pixels"], p["visual_pool"], f"{p['mean']:.1f}", f"{p['gflops']:.4g}",
             f"{p['latency_ms']:.1f}"] for p in (result["points"][i] for i in result["frontier"])]
    table = markdown_table(["depth", "max_pixels", "visual_pool", "mean Recall@5", "GFLOPs/input",
                            f"ms per {result['probe_size']} inputs"], rows)
    return (f"{table}\n\nFor a budget of {budget:.3g} FLOPs per input: {describe(result['recommendation'])} "
            f"(mean {result['recommendation']['mean']:.1f}).")


def main(argv: list[str] | None = None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--family", default="qwen2_vl", choices=FAMILIES, help="family of the tiny base model")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke run, not a result)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads; fixed so that reruns give the same figures")
    parser.add_argument("--elastic", action="store_true",
                        help="also train depths 1-3 at once vs one run per depth, and analyse the layers (4 more "
                             "stage-2 runs)")
    parser.add_argument("--mined", action="store_true",
                        help="also mine hard negatives with the trained model and train stage 2 again with them, "
                             "against the benchmark's own negatives and none (2 more stage-2 runs)")
    parser.add_argument("--budget", action="store_true",
                        help="train depths 1-3 x visual-token reduction 1, 2 at once (instead of the plain stage 2) "
                             "and print the planner's quality-cost frontier (OUT/budget/)")
    parser.add_argument("--budget-flops", type=float, help="with --budget: the FLOP budget per input to recommend "
                                                           "a setting for (default: half the costliest setting's)")
    args = parser.parse_args(argv)
    if args.budget_flops is not None and (not args.budget or args.budget_flops <= 0):
        raise UsageError(f"--budget-flops {args.budget_flops}: give a positive budget, with --budget")
    if args.budget and (args.elastic or args.mined):
        raise UsageError("--budget trains its own stage 2 in place of the plain one; run --elastic or --mined apart")
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: give at least one thread")
    if os.path.isfile(args.out):
        raise UsageError(f"--out {args.out} is a file; give the folder to write the demo into")
    from modeling_puma import PumaForEmbedding  # transformers' model code loads once the arguments are checked

    start = time.time()
    make_reproducible(args.threads)
    data, base = os.path.join(args.out, "data"), os.path.join(args.out, f"tiny-{args.family}")
    stage1, stage2 = os.path.join(args.out, "stage1"), os.path.join(args.out, "stage2")
    sizes = dict(num_train=60, num_test=4, num_nli=32, image_size=48) if args.quick else dict(num_train=2880, num_nli=256)
    quick = ["--max_steps", "2"] if args.quick else []

    print("1/5 writing the demo benchmark and the tiny random base model", flush=True)
    make_demo_benchmark(data, seed=0, **sizes)
    if not os.path.isfile(os.path.join(base, "config.json")):
        build_tiny_checkpoint(base, args.family)

    print("2/5 evaluating the untrained pruned model (first 3 of 6 layers)", flush=True)
    untrained = PumaForEmbedding.from_pretrained(base, num_layers=3, **DEMO_VIDEO)
    before = evaluate_mbeir(untrained, data, show_progress_bar=False)

    print("3/5 stage 1: NLI pairs, InfoNCE + distillation from the shared-weight teacher", flush=True)
    run_stage("demo_stage1.yaml", "--model_name_or_path", base, "--teacher_model", base,
              "--nli_file", os.path.join(data, "nli_demo.csv"), "--output_dir", stage1, *quick)

    if args.budget:
        evidence = budget_evidence(args, data, stage1, quick)
        print(f"\nThe quality-cost frontier of depth x max_pixels x visual_pool (budget/budget.md, budget.png):\n\n"
              f"{evidence}\n{time.time() - start:.0f} s")
        return
    print("4/5 stage 2: M-BEIR-format training set, MAC-Loss, from stage 1's merged model", flush=True)
    run_stage("demo_stage2.yaml", "--model_name_or_path", stage1, "--mbeir_root", data, "--output_dir", stage2, *quick)

    print("5/5 evaluating the trained model", flush=True)
    after = evaluate_mbeir(PumaForEmbedding.from_pretrained(stage2), data, show_progress_bar=False)
    # the full table, JSON and per-task bar charts, the untrained model's scores beside the trained one's
    untrained_results = {"tasks": before, "average": mbeir_summary(before)}
    write_mbeir_results(after, os.path.join(args.out, "eval"), "local", baselines={"untrained": untrained_results},
                        model_name="trained")
    table = recall_table(before, after)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    for name, folder in (("stage1", stage1), ("stage2", stage2)):
        plot_training_curves(os.path.join(folder, "trainer_state.json"), os.path.join(args.out, f"curves_{name}.png"))
    print(f"\nDemo benchmark, local pools (tiny random base, so only the trained column means anything):\n\n{table}\n")
    if args.elastic:
        evidence = elastic_evidence(args, data, base, stage1, quick)
        print(f"Elastic depth vs one run per depth, Recall@5 (elastic.md; layer analyses in analysis_*/):\n\n"
              f"{evidence}\n")
    if args.mined:
        evidence = mined_evidence(args, data, stage1, stage2, after, quick)
        print(f"Stage 2 with mined hard negatives, Recall@5 (mined.md):\n\n{evidence}\n")
    print(f"results: {os.path.join(args.out, 'results.md')}; curves: {os.path.join(args.out, 'curves_stage*.png')}; "
          f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    run_command(main)

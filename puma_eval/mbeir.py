# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""M-BEIR retrieval evaluation (UniIR's protocol, as the paper reports it), built from reusable steps:

    data = load_task(benchmark, task, pool)                      # tasks.py: read and check, nothing encoded
    queries = encode_cached(model, data.query_items, ...)        # encoding.py: cached, sharded over processes
    pool = encode_sharded(model, data.pool_items, ...)
    row, ranked = score_task(data, queries, pool)                # search (index.py) + metrics (metrics.py)

`score_task` takes precomputed embeddings, so embeddings of any origin (every depth of one forward pass, another
model) are scored without re-encoding.
"""

import logging
import os

from .encoding import distributed_state, encode_cached, encode_sharded
from .index import INDEX_KINDS, build_index, load_or_build_index, search_index
from .metrics import K_VALUES, result_row, retrieval_metrics, summarize, write_results
from .tasks import MBEIR_TASKS, PUBLISHED_FIGURES, TaskData, load_benchmark, load_instructions, load_pool, load_task, \
    select_tasks


logger = logging.getLogger(__name__)

PUBLISHED_NOTE = "the paper's M-BEIR local-pool table (arXiv 2507.08064)"


def score_task(data: TaskData, query_embeddings, candidates, index: str = "flat", k: int = max(K_VALUES),
               show_progress_bar: bool = False, **index_options) -> tuple[dict, list[list[str]]]:
    """Scores one task from precomputed embeddings.

    Args:
        data: the task's queries, pool ids and relevant ids (`tasks.load_task`).
        query_embeddings: `(len(data.query_ids), dim)` tensor or array, in `data.query_ids` order.
        candidates: a faiss index over the pool, or its embeddings (`(len(data.pool_ids), dim)` matrix or
            `EmbeddingShards`) from which an `index` index is built (`index_options`: see `index.IndexSpec`).

    Returns:
        The task's result row (`metrics.result_row`) and each query's top-`k` pool ids.
    """
    if len(query_embeddings) != len(data.query_ids):
        raise ValueError(f"Task {data.task.name}: {len(query_embeddings)} query embeddings for "
                         f"{len(data.query_ids)} queries.")
    faiss_index = candidates if hasattr(candidates, "ntotal") else build_index(candidates, index, **index_options)
    if faiss_index.ntotal != len(data.pool_ids):
        raise ValueError(f"Task {data.task.name}: the index holds {faiss_index.ntotal} vectors for a pool of "
                         f"{len(data.pool_ids)} candidates.")
    _, top = search_index(faiss_index, query_embeddings, k, show_progress_bar=show_progress_bar)
    ranked = [[data.pool_ids[i] for i in row if i >= 0] for row in top]
    scores = retrieval_metrics(ranked, data.relevant)
    row = result_row(data.task.name, data.task.label, data.task.metric_k, scores, len(data.query_ids),
                     len(data.pool_ids), data.pool, data.published)
    return row, ranked


def evaluate_mbeir(model, benchmark_root, tasks: list[str] | None = None, pool: str = "local", cache_dir=None,
                   index: str = "flat", batch_size: int = 16, shard_size: int = 1024, seed: int = 0,
                   show_progress_bar: bool = True, rankings: dict | None = None, **index_options) -> list[dict] | None:
    """Evaluates `model` on the benchmark at `benchmark_root` (M-BEIR, or a root with its own task table).

    Each task ranks its queries (one fixed instruction each) against its local pool or the union pool of all tasks,
    by inner product of L2-normalised embeddings. Under `accelerate launch` every process encodes its share of the
    missing shards; the main process searches and scores.

    Args:
        tasks: task names to run (default: all, in the table's order).
        pool: `"local"` (each task's own pool) or `"global"` (the union pool, encoded and indexed once).
        cache_dir: folder of the resumable embedding shards and of the saved indexes (`None`: no cache).
        index: one of `index.INDEX_KINDS`; `"flat"` (exact) is the reported protocol. `index_options`: nlist, nprobe,
            pq_m, hnsw_m, ef_search. With a cache, other kinds are saved beside the pool's shards and reused.
        seed: seed of the per-query instruction draw.
        rankings: if given, receives `{task: {qid: [top-10 pool ids]}}`.

    Returns:
        On the main process, one dict per task: `task`, `label`, `pool`, `num_queries`, `pool_size`, `metric`
        (`recall@k`), `score`, `recall@1/5/10`, `ndcg@1/5/10`, `mrr@10` (percent) and `published` (the paper's
        figures for the task, M-BEIR local pools only); `None` on other processes.
    """
    if pool not in ("local", "global"):
        raise ValueError(f"pool must be 'local' or 'global', got {pool!r}.")
    if index not in INDEX_KINDS:
        raise ValueError(f"Unknown index kind {index!r}; use one of {INDEX_KINDS}.")
    if model.processor is None:
        raise ValueError("The model has no processor; load it from a checkpoint folder that holds the processor files.")
    benchmark = load_benchmark(benchmark_root)
    selected = select_tasks(benchmark, tasks)
    instructions = load_instructions(benchmark)
    is_main = distributed_state().is_main_process
    options = dict(image_root=benchmark.image_root, batch_size=batch_size, shard_size=shard_size,
                   show_progress_bar=show_progress_bar)

    def pool_index(data: TaskData):
        shards = encode_sharded(model, data.pool_items, data.pool_ids, cache_dir, name=data.pool_name, **options)
        if not is_main:
            return None
        # a flat index is a copy of the cached shards: only trained or graph indexes are worth saving
        path = os.path.join(shards.folder, f"index-{index}.faiss") if shards.folder and index != "flat" else None
        return load_or_build_index(shards, index, path, shards.fingerprint, show_progress_bar=show_progress_bar,
                                   **index_options)

    global_records = load_pool(benchmark.global_pool_file, "Global pool") if pool == "global" else None
    global_index = None  # encoded and indexed once, after the first task's checks pass
    results = []
    for task in selected:
        logger.info(f"Task {task.name} ({task.label}), {pool} pool")
        data = load_task(benchmark, task, pool, instructions, seed, global_records)
        if pool == "local":
            faiss_index = pool_index(data)
        else:
            global_index = global_index or pool_index(data)
            faiss_index = global_index
        query_embeddings = encode_cached(model, data.query_items, data.query_ids, cache_dir, name=data.query_name,
                                         is_query=True, instructions=data.query_instructions, **options)
        if not is_main:
            continue
        row, ranked = score_task(data, query_embeddings, faiss_index, show_progress_bar=show_progress_bar)
        results.append(row)
        if rankings is not None:
            rankings[task.name] = dict(zip(data.query_ids, ranked))
        logger.info(f"Task {task.name}: {task.label} Recall@{task.metric_k} = {row['score']:.1f}")
    return results if is_main else None


def mbeir_summary(results: list[dict]) -> dict:
    """The average row; the published average is the paper's own when all 16 M-BEIR tasks ran."""
    full = sorted(result["task"] for result in results) == sorted(task.name for task in MBEIR_TASKS)
    return summarize(results, {system: figures["average"] for system, figures in PUBLISHED_FIGURES.items()}
                     if full else None)


def write_mbeir_results(results: list[dict], out_dir, pool: str, *, baselines: dict[str, dict] | None = None,
                        model_name: str = "this model") -> str:
    """Writes `results_{pool}.md`, `results_{pool}.json` and `plots/{pool}_{task}.png`; returns the markdown.
    `baselines`: other models' results to show beside this one's (`metrics.write_results`)."""
    average = {**mbeir_summary(results), "pool": pool}
    return write_results(results, out_dir, f"results_{pool}", average=average, note=PUBLISHED_NOTE,
                         baselines=baselines, model_name=model_name)

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Evaluation of PUMA embedding models: M-BEIR retrieval (UniIR's protocol, as the paper reports it), semantic search
over a folder or JSONL corpus, and training curves.

    python eval_puma.py --model my-puma --mbeir-root M-BEIR --out eval_out                # 16 tasks, local pools
    python eval_puma.py --model my-puma --mbeir-root M-BEIR --pool global --tasks cirr_task7 mscoco_task0
    accelerate launch eval_puma.py --model my-puma --mbeir-root M-BEIR                    # pools sharded over GPUs
    python eval_puma.py --model my-puma --mbeir-root demo_data           # the benchmark make_demo_data.py writes
    python eval_puma.py search --model my-puma --corpus photos/ --query "a dog on a beach" --top-k 5
    python eval_puma.py curves --trainer-state out/trainer_state.json --out curves.png

`eval` prints and writes the per-task table (`results_{pool}.md`, `results_{pool}.json`) and one bar chart per task
beside the paper's published figures (`plots/`). Embeddings are cached as safetensors shards under `--cache-dir`
(default `OUT/embeddings`): an interrupted run resumes where it stopped and a finished one is reused.

Protocol. Each task ranks the queries of one M-BEIR test file against its local pool (MSCOCO: the 5K test pool) or
against the union pool of all tasks (`--pool global`), by inner product of L2-normalised embeddings (exact search with
faiss by default). Queries carry one instruction each, drawn once per query for determinism
(`data_puma.mbeir_eval_queries`). The score is Recall@5 (Recall@10 for Fashion200K and FashionIQ), where Recall@k is
M-BEIR's hit rate: a query counts when any positive is among its first k results. Inputs are checked as strictly as
UniIR does: unique query and candidate ids, query and candidate modalities as the task says, every positive in the
pool (for OVEN/InfoSeek positives of the other dataset are optional, UniIR's rule), an instruction for every query.

A benchmark root holding `tasks.json` (or `demo_benchmark.json`, written by `make_demo_data.py`) supplies its own task
table: `{"tasks": [{"name", "test_file", "local_pool_file", "query_modality", "cand_modality", "metric_k"?,
"label"?}, ...], "union_test_pool_file"?, "instructions_file"?, "image_root"?}` with paths relative to the root;
otherwise the 16 M-BEIR tasks below are read under UniIR's file names.
"""

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from data_puma import (checkpoint_fingerprint, dataset_id, join_path, load_mbeir_pool, load_mbeir_queries,
                       load_query_instructions, mbeir_eval_queries, own_dataset_positives, repeated_ids)
from modeling_puma import IMAGE_SUFFIXES, SUPPORTED_MODEL_TYPES, PumaForEmbedding


logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.abspath(__file__))
METRIC_PATH = os.path.join(ROOT, "metrics", "recall_at_k")
K_VALUES = (1, 5, 10)
TASK_TABLE_FILES = ("tasks.json", "demo_benchmark.json")
MBEIR_GLOBAL_POOL = "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
MBEIR_INSTRUCTIONS = "instructions/query_instructions.tsv"
INDEX_KINDS = ("flat", "ivf", "hnsw")
# Approximate-index settings: IVF probes this many of its ~4*sqrt(n) lists; HNSW links each vector to 32 neighbours
# and searches with a beam of 128 (faiss's common defaults for high recall).
IVF_NPROBE = 32
HNSW_NEIGHBOURS = 32
HNSW_EF_SEARCH = 128
# faiss's CPU flat search scores 1,024 candidates per BLAS call by default, which leaves a search of few queries at
# less than half the speed of a plain matmul (bench/bench_eval.py); 16,384 candidates per call catch up, with a
# scratch block of at most 4,096 x 16,384 floats (256 MiB).
FAISS_BLAS_CANDIDATE_BLOCK = 16384
# Ids shown per kind of violation in an error message.
_SHOWN_IDS = 5


# ----------------------------------------------------------------------------------------------------------------
# Task table
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrievalTask:
    """One retrieval task: the queries of `query_file` ranked against a candidate pool.

    Args:
        name (`str`): key used by `--tasks` and in result files (M-BEIR: UniIR's dataset name, `visualnews_task0`).
        label (`str`): column label of the paper's table (`VisualNews t→i`).
        query_file (`str`): test queries, relative to the benchmark root.
        pool_file (`str`): the task's local candidate pool, relative to the benchmark root.
        query_modality, cand_modality (`str`): `"text"`, `"image"` or `"image,text"`.
        metric_k (`int`, *optional*, defaults to 5): the k of the task's headline Recall@k.
    """

    name: str
    label: str
    query_file: str
    pool_file: str
    query_modality: str
    cand_modality: str
    metric_k: int = 5


def _mbeir_task(dataset: str, task_id: int, label: str, query_modality: str, cand_modality: str, metric_k: int = 5,
                pool: str | None = None) -> RetrievalTask:
    name = f"{dataset}_task{task_id}"
    return RetrievalTask(name, label, f"query/test/mbeir_{name}_test.jsonl",
                         f"cand_pool/local/mbeir_{pool or name}_cand_pool.jsonl", query_modality, cand_modality,
                         metric_k)


# The paper's column order. File names are UniIR's (its embed/retrieval configs); MSCOCO has a separate 5K test pool.
MBEIR_TASKS = (
    _mbeir_task("visualnews", 0, "VisualNews t→i", "text", "image"),
    _mbeir_task("mscoco", 0, "MSCOCO t→i", "text", "image", pool="mscoco_task0_test"),
    _mbeir_task("fashion200k", 0, "Fashion200K t→i", "text", "image", metric_k=10),
    _mbeir_task("webqa", 1, "WebQA t→t", "text", "text"),
    _mbeir_task("visualnews", 3, "VisualNews i→t", "image", "text"),
    _mbeir_task("mscoco", 3, "MSCOCO i→t", "image", "text", pool="mscoco_task3_test"),
    _mbeir_task("fashion200k", 3, "Fashion200K i→t", "image", "text", metric_k=10),
    _mbeir_task("nights", 4, "NIGHTS i→i", "image", "image"),
    _mbeir_task("edis", 2, "EDIS t→(i,t)", "text", "image,text"),
    _mbeir_task("webqa", 2, "WebQA t→(i,t)", "text", "image,text"),
    _mbeir_task("oven", 6, "OVEN (i,t)→t", "image,text", "text"),
    _mbeir_task("infoseek", 6, "InfoSeek (i,t)→t", "image,text", "text"),
    _mbeir_task("fashioniq", 7, "FashionIQ (i,t)→i", "image,text", "image", metric_k=10),
    _mbeir_task("cirr", 7, "CIRR (i,t)→i", "image,text", "image"),
    _mbeir_task("oven", 8, "OVEN (i,t)→(i,t)", "image,text", "image,text"),
    _mbeir_task("infoseek", 8, "InfoSeek (i,t)→(i,t)", "image,text", "image,text"),
)

# M-BEIR local-pool scores of the paper's table (arXiv 2507.08064), in MBEIR_TASKS order, then the published average.
_PUBLISHED_ROWS = {
    "PUMA": (35.7, 79.5, 25.8, 86.2, 35.2, 90.1, 29.0, 31.4, 58.2, 78.4, 52.7, 48.3, 30.6, 49.9, 74.0, 65.2, 54.4),
    "LamRA-Ret": (30.8, 78.8, 25.1, 82.5, 31.2, 88.9, 27.1, 28.7, 54.3, 77.8, 51.1, 44.2, 28.9, 47.7, 72.3, 60.8, 51.8),
    "CLIP-SF": (42.6, 81.1, 18.0, 84.7, 43.1, 92.3, 18.3, 33.0, 50.9, 78.7, 45.5, 27.9, 24.4, 44.6, 67.6, 48.9, 50.6),
}
PUBLISHED_FIGURES = {system: dict(zip([task.name for task in MBEIR_TASKS] + ["average"], row))
                     for system, row in _PUBLISHED_ROWS.items()}
# Systems drawn beside this model's bar in the per-task charts.
CHART_SYSTEMS = ("PUMA", "LamRA-Ret")


@dataclass(frozen=True)
class Benchmark:
    """A benchmark root and its task table; every path is absolute."""

    root: str
    tasks: tuple[RetrievalTask, ...]
    global_pool_file: str
    instructions_file: str
    image_root: str
    table_file: str | None  # the JSON task table, or None for the built-in M-BEIR table

    @property
    def is_mbeir(self) -> bool:
        return self.table_file is None

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative)


def load_benchmark(root) -> Benchmark:
    """The benchmark under `root`: its JSON task table (`tasks.json` or `demo_benchmark.json`) if present, else
    the 16 M-BEIR tasks."""
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"The benchmark root {root!r} is not a folder.")
    table_file = next((os.path.join(root, name) for name in TASK_TABLE_FILES
                       if os.path.isfile(os.path.join(root, name))), None)
    if table_file is None:
        return Benchmark(root, MBEIR_TASKS, os.path.join(root, MBEIR_GLOBAL_POOL),
                         os.path.join(root, MBEIR_INSTRUCTIONS), root, None)
    with open(table_file, encoding="utf-8") as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{table_file} is not valid JSON ({err}).") from err
    if not isinstance(table, dict) or not isinstance(table.get("tasks"), list) or not table["tasks"]:
        raise ValueError(f"{table_file} must be a JSON object with a non-empty 'tasks' list.")
    tasks = []
    for index, entry in enumerate(table["tasks"]):
        required = ("name", "test_file", "local_pool_file", "query_modality", "cand_modality")
        missing = [key for key in required if not isinstance(entry, dict) or not entry.get(key)]
        if missing:
            raise ValueError(f"{table_file}: tasks[{index}] lacks {missing}.")
        metric_k = entry.get("metric_k", 5)
        if isinstance(metric_k, bool) or not isinstance(metric_k, int) or metric_k not in K_VALUES:
            raise ValueError(f"{table_file}: tasks[{index}] has metric_k={metric_k!r}; use one of {K_VALUES}.")
        tasks.append(RetrievalTask(str(entry["name"]), str(entry.get("label") or entry["name"]), entry["test_file"],
                                   entry["local_pool_file"], entry["query_modality"], entry["cand_modality"], metric_k))
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"{table_file} names tasks more than once: {repeated_ids(names)}.")
    return Benchmark(root, tuple(tasks), os.path.join(root, table.get("union_test_pool_file", MBEIR_GLOBAL_POOL)),
                     os.path.join(root, table.get("instructions_file", MBEIR_INSTRUCTIONS)),
                     os.path.normpath(os.path.join(root, table.get("image_root", "."))), table_file)


def select_tasks(benchmark: Benchmark, names: list[str] | None) -> list[RetrievalTask]:
    """The tasks named in `names` (all when `None`), in the table's order."""
    if not names:
        return list(benchmark.tasks)
    known = {task.name for task in benchmark.tasks}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"Unknown tasks {unknown}; the benchmark at {benchmark.root} has {sorted(known)}.")
    return [task for task in benchmark.tasks if task.name in names]


# ----------------------------------------------------------------------------------------------------------------
# Loading and strict checks
# ----------------------------------------------------------------------------------------------------------------
def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} does not exist.")
    return path


def load_pool(path: str, what: str) -> dict[str, dict]:
    """Candidate records keyed by did; raises on a missing file, duplicate ids or an empty pool."""
    pool = load_mbeir_pool(_require_file(path, what))
    if not pool:
        raise ValueError(f"{what}: the candidate pool {path} is empty.")
    return pool


def _violation(kind: str, ids: list[str]) -> str:
    return f"{len(ids)} {kind}, e.g. {ids[:_SHOWN_IDS]}"


def check_task(task: RetrievalTask, queries: list[dict], pool: dict[str, dict], local: bool,
               query_path: str, pool_path: str) -> dict[str, list[str]]:
    """Checks queries and pool against the task and returns each query's positives in the pool (its relevant set).

    Raises `ValueError` naming the ids when a query has the wrong modality or no positive, when a positive of the
    query's own dataset is absent from the pool (positives of another dataset, which OVEN and InfoSeek queries list,
    may be absent, as in UniIR), when a positive has the wrong modality, or when a local pool holds candidates of
    another modality.
    """
    if not queries:
        raise ValueError(f"Task {task.name}: the query file {query_path} holds no query.")
    wrong_query, no_positive, absent, wrong_positive, relevant = [], [], [], [], {}
    for query in queries:
        qid = query["qid"]
        if query["query_modality"] != task.query_modality:
            wrong_query.append(f"{qid} ({query['query_modality']})")
        positives = query["pos_cand_list"]
        absent += [f"{qid}->{did}" for did in own_dataset_positives(qid, positives) if did not in pool]
        relevant[qid] = [did for did in positives if did in pool]
        if not positives:
            no_positive.append(qid)
        wrong_positive += [f"{qid}->{did} ({pool[did]['modality']})" for did in relevant[qid]
                           if pool[did]["modality"] != task.cand_modality]
    problems = []
    if wrong_query:
        problems.append(_violation(f"queries whose modality is not {task.query_modality!r}", wrong_query))
    if no_positive:
        problems.append(_violation("queries without a positive", no_positive))
    if absent:
        problems.append(_violation(f"positives absent from the pool {pool_path}", absent))
    if wrong_positive:
        problems.append(_violation(f"positives whose modality is not {task.cand_modality!r}", wrong_positive))
    if local:
        wrong_candidate = [f"{did} ({c['modality']})" for did, c in pool.items() if c["modality"] != task.cand_modality]
        if wrong_candidate:
            problems.append(_violation(f"candidates of the local pool whose modality is not {task.cand_modality!r}",
                                       wrong_candidate))
    if problems:
        raise ValueError(f"Task {task.name} ({query_path}): " + "; ".join(problems) + ".")
    return relevant


def load_task_queries(benchmark: Benchmark, task: RetrievalTask, pool: dict[str, dict], pool_path: str,
                      instructions: dict, local: bool, seed: int = 0) -> tuple[list[dict], dict[str, list[str]]]:
    """The task's evaluation queries (one fixed instruction each) and their relevant ids, after `check_task`."""
    query_path = benchmark.path(task.query_file)
    queries = load_mbeir_queries(_require_file(query_path, f"Task {task.name} query file"))
    relevant = check_task(task, queries, pool, local, query_path, pool_path)
    eval_queries = mbeir_eval_queries(queries, pool, instructions, seed=seed)
    without = [f"{q['query_id']} {(dataset_id(q['query_id']), q['query_modality'], q['modality'])}"
               for q in eval_queries if q["instruction"] is None]
    if without:
        kind = f"queries without an instruction in {benchmark.instructions_file} for (dataset id, query modality, " \
               "candidate modality)"
        raise ValueError(f"Task {task.name}: {_violation(kind, without)}.")
    return eval_queries, relevant


# ----------------------------------------------------------------------------------------------------------------
# Cached, resumable, multi-process encoding
# ----------------------------------------------------------------------------------------------------------------
def _partial_state():
    try:
        from accelerate import PartialState
    except ImportError as err:
        raise ImportError("Evaluation needs accelerate: pip install accelerate (or pip install -e '.[eval]').") from err
    return PartialState()


def model_fingerprint(model: PumaForEmbedding) -> str:
    """Hash of what determines the model's embeddings: its configuration (kept layers, prompts, pixel limits),
    dtype and attention, and, for a local checkpoint folder, the content of its files
    (`data_puma.checkpoint_fingerprint`)."""
    digest = hashlib.sha256()
    digest.update(model.config.to_json_string(use_diff=False).encode())
    digest.update(f"{model.dtype}|{model.config._attn_implementation}".encode())
    if os.path.isdir(model.name_or_path):
        digest.update(json.dumps(checkpoint_fingerprint(model.name_or_path), sort_keys=True).encode())
    return digest.hexdigest()


def _items_fingerprint(ids: list[str], items: list[dict], instructions: list[str | None]) -> str:
    """Hash of exactly what is encoded: ids, texts, image paths and each item's instruction."""
    digest = hashlib.sha256()
    for item_id, item, instruction in zip(ids, items, instructions):
        digest.update(json.dumps([item_id, item.get("text"), item.get("image"), instruction]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _read_shard(path: str, expected_ids: list[str], fingerprint: str, dim: int, warn: bool) -> torch.Tensor | None:
    """The shard's embeddings, or `None` when it is absent, unreadable or does not match (logged)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            embeddings = f.get_tensor("embeddings")
        ids = json.loads(metadata.get("ids", "null"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        problem = f"unreadable ({err})"
    else:
        if metadata.get("fingerprint") != fingerprint:
            problem = "from another model, input set or setting (fingerprint mismatch)"
        elif ids != expected_ids:
            problem = "holding other ids than expected"
        elif tuple(embeddings.shape) != (len(expected_ids), dim):
            problem = f"of shape {tuple(embeddings.shape)} instead of {(len(expected_ids), dim)}"
        elif not torch.isfinite(embeddings).all():
            problem = "holding non-finite values"
        else:
            return embeddings
    if warn:
        logger.warning(f"Embedding shard {path} is {problem}; re-encoding it.")
    return None


def _write_shard(path: str, embeddings: torch.Tensor, ids: list[str], fingerprint: str) -> None:
    from safetensors.torch import save_file

    temporary = f"{path}.tmp{os.getpid()}"
    save_file({"embeddings": embeddings.contiguous()}, temporary,
              metadata={"fingerprint": fingerprint, "ids": json.dumps(ids)})
    os.replace(temporary, path)  # a shard is complete or absent, never half-written


def _encode_items(model: PumaForEmbedding, items: list[dict], instructions: list[str | None], is_query: bool,
                  batch_size: int, image_root: str | None) -> torch.Tensor:
    """Embeds `items` in their order; `encode` takes one instruction per call, so items are grouped by it."""
    groups = {}
    for index, instruction in enumerate(instructions):
        groups.setdefault(instruction, []).append(index)
    out = torch.empty(len(items), model.config.text_config.hidden_size)
    for instruction, indices in groups.items():
        inputs = [{"text": items[i].get("text"), "image": join_path(image_root, items[i].get("image"))} for i in indices]
        out[indices] = model.encode(inputs, instruction=instruction, is_query=is_query, batch_size=batch_size,
                                    show_progress_bar=False)
    return out


def encode_cached(model: PumaForEmbedding, items: list[dict], ids: list[str], cache_dir=None, *, name: str = "items",
                  is_query: bool = False, instructions: list[str | None] | None = None, image_root=None,
                  batch_size: int = 16, shard_size: int = 1024, show_progress_bar: bool = True,
                  on_shard=None) -> torch.Tensor | None:
    """Embeds `items` (`{"text", "image"}` dicts, image paths relative to `image_root`) shard by shard.

    With `cache_dir`, each shard of `shard_size` items is written to
    `cache_dir/name/<fingerprint>/shard-NNNNN.safetensors` with its ids and fingerprint (model, items, instructions,
    query/candidate side, shard size). Valid shards are reused, so an interrupted run resumes at the first missing
    shard; unreadable or mismatched shards are re-encoded with a warning. Under `accelerate launch` the missing
    shards are split between the processes, which write them to the cache (it must be on a file system they share);
    the main process then reads them back. Shards are length-bucketed by `encode` within each instruction.

    Args:
        instructions: one per item (queries only), or `None`.
        on_shard: called as `on_shard(shard_index, num_shards)` after each shard this process encoded.

    Returns:
        On the main process, `torch.Tensor` of shape `(len(items), hidden_size)`, float32, L2-normalised rows;
        `None` on the other processes (holding every row in each of them would multiply the memory of big pools).
    """
    if len(ids) != len(items):
        raise ValueError(f"{name}: {len(items)} items but {len(ids)} ids.")
    if not items:
        raise ValueError(f"{name}: there are no items to encode.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: ids must be unique, got repeats {repeated_ids(ids)[:_SHOWN_IDS]}.")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}.")
    instructions = list(instructions) if instructions is not None else [None] * len(items)
    if len(instructions) != len(items):
        raise ValueError(f"{name}: {len(items)} items but {len(instructions)} instructions.")
    state = _partial_state()
    if cache_dir is None and state.num_processes > 1:
        raise ValueError("Encoding with several processes needs a cache_dir: they hand their shards over through it.")
    dim = model.config.text_config.hidden_size
    bounds = [(start, min(start + shard_size, len(items))) for start in range(0, len(items), shard_size)]
    fingerprint = hashlib.sha256("|".join([model_fingerprint(model), _items_fingerprint(ids, items, instructions),
                                           f"query={is_query}", f"shard_size={shard_size}"]).encode()).hexdigest()
    folder = os.path.join(os.fspath(cache_dir), name, fingerprint[:16]) if cache_dir is not None else None
    if folder is not None:
        os.makedirs(folder, exist_ok=True)

    def shard_path(index):
        return os.path.join(folder, f"shard-{index:05d}.safetensors")

    shards = [None] * len(bounds)  # embeddings the main process holds
    missing = list(range(len(bounds)))
    if folder is not None:
        missing = []
        for index, (start, end) in enumerate(bounds):
            shard = _read_shard(shard_path(index), ids[start:end], fingerprint, dim, warn=state.is_main_process)
            if shard is None:
                missing.append(index)
            elif state.is_main_process:
                shards[index] = shard
    cached = len(items) - sum(bounds[i][1] - bounds[i][0] for i in missing)
    if cached:
        logger.info(f"{name}: reusing {cached} of {len(items)} embeddings from {folder}")
    state.wait_for_everyone()  # every process has scanned the cache before any shard is written
    progress = tqdm(total=len(items), initial=cached, desc=f"Encoding {name}", unit="item",
                    disable=not (show_progress_bar and state.is_main_process))
    with state.split_between_processes(missing) as own:
        for index in own:
            start, end = bounds[index]
            embeddings = _encode_items(model, items[start:end], instructions[start:end], is_query, batch_size,
                                       image_root)
            if folder is not None:
                _write_shard(shard_path(index), embeddings, ids[start:end], fingerprint)
            if state.is_main_process:
                shards[index] = embeddings
            progress.update(end - start)
            if on_shard is not None:
                on_shard(index, len(bounds))
    progress.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    for index, shard in enumerate(shards):
        if shard is None:  # encoded by another process
            start, end = bounds[index]
            shards[index] = _read_shard(shard_path(index), ids[start:end], fingerprint, dim, warn=True)
            if shards[index] is None:
                raise RuntimeError(f"Shard {shard_path(index)} written by another process is unreadable; rerun to "
                                   "re-encode it (is the cache on a file system every process shares?).")
    return torch.cat(shards)


# ----------------------------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------------------------
def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError("Search needs faiss: pip install faiss-cpu (or faiss-gpu) or -e '.[eval]'.") from err
    return faiss


def build_index(embeddings, kind: str = "flat", use_gpu: bool | None = None):
    """A faiss inner-product index holding `embeddings` `(n, dim)`.

    `"flat"` is exact. `"ivf"` (about 4*sqrt(n) lists, `IVF_NPROBE` probed) and `"hnsw"` (`HNSW_NEIGHBOURS` links,
    beam `HNSW_EF_SEARCH`) are approximate: faster on millions of candidates, but they can miss true nearest
    neighbours, which changes Recall@k (usually lowering it), so reported numbers use `"flat"`. `use_gpu` (default:
    when faiss sees a GPU) moves flat and IVF indexes to GPUs.
    """
    faiss = _import_faiss()
    if kind not in INDEX_KINDS:
        raise ValueError(f"Unknown index kind {kind!r}; use one of {INDEX_KINDS}.")
    vectors = np.ascontiguousarray(torch.as_tensor(embeddings, dtype=torch.float32).numpy())
    n, dim = vectors.shape
    if kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(IVF_NPROBE, nlist)
    elif kind == "hnsw":
        index = faiss.index_factory(dim, f"HNSW{HNSW_NEIGHBOURS},Flat", faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        index = faiss.IndexFlatIP(dim)
    if use_gpu is None:
        use_gpu = hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0
    if use_gpu and kind != "hnsw":  # faiss has no GPU HNSW
        index = faiss.index_cpu_to_all_gpus(index)
    if kind == "ivf":
        index.train(vectors)
    index.add(vectors)
    return index


def search_index(index, queries, k: int, batch_size: int = 4096, show_progress_bar: bool = False):
    """Top-`k` `(scores, indices)`, each `(num_queries, min(k, index.ntotal))`, best first."""
    faiss = _import_faiss()
    queries = np.ascontiguousarray(torch.as_tensor(queries, dtype=torch.float32).numpy())
    k = min(k, index.ntotal)
    scores, indices = [], []
    previous_block = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = max(previous_block, FAISS_BLAS_CANDIDATE_BLOCK)
    try:
        for start in tqdm(range(0, len(queries), batch_size), desc="Searching", disable=not show_progress_bar):
            batch_scores, batch_indices = index.search(queries[start:start + batch_size], k)
            scores.append(batch_scores)
            indices.append(batch_indices)
    finally:
        faiss.cvar.distance_compute_blas_database_bs = previous_block  # a process-wide faiss setting
    return np.concatenate(scores), np.concatenate(indices)


def torch_search(queries: torch.Tensor, corpus: torch.Tensor, k: int, chunk_size: int = 65536):
    """Exact top-`k` by inner product with torch (matmul + topk over corpus chunks, merged); the reference that the
    faiss indexes are tested and benchmarked against. Returns `(scores, indices)` tensors."""
    k = min(k, len(corpus))
    best_scores = torch.full((len(queries), 0), -math.inf, dtype=queries.dtype, device=queries.device)
    best_indices = torch.empty((len(queries), 0), dtype=torch.long, device=queries.device)
    for start in range(0, len(corpus), chunk_size):
        scores = queries @ corpus[start:start + chunk_size].T  # (num_queries, chunk)
        top_scores, top_indices = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, top_scores], dim=1)
        merged_indices = torch.cat([best_indices, top_indices + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_indices = merged_indices.gather(1, order)
    return best_scores, best_indices


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_metric():
    """The local `evaluate` module `metrics/recall_at_k` (Recall@k, MRR, nDCG@k), never fetched from the Hub."""
    try:
        import evaluate
    except ImportError as err:
        raise ImportError("Evaluation needs evaluate: pip install evaluate (or pip install -e '.[eval]').") from err
    return evaluate.load(METRIC_PATH, keep_in_memory=True)


def retrieval_metrics(ranked_ids: list[list[str]], relevant_ids: list[list[str]], k_values=K_VALUES) -> dict:
    """Recall@k and nDCG@k per k and MRR over the given lists, in percent."""
    scores = load_metric().compute(predictions=ranked_ids, references=relevant_ids, k_values=list(k_values))
    return {key: 100.0 * value for key, value in scores.items()}


# ----------------------------------------------------------------------------------------------------------------
# M-BEIR evaluation
# ----------------------------------------------------------------------------------------------------------------
def _file_stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def evaluate_mbeir(model: PumaForEmbedding, benchmark_root, tasks: list[str] | None = None, pool: str = "local",
                   cache_dir=None, index: str = "flat", batch_size: int = 16, shard_size: int = 1024, seed: int = 0,
                   show_progress_bar: bool = True) -> list[dict] | None:
    """Evaluates `model` on the benchmark at `benchmark_root` (M-BEIR, or a root with its own task table).

    Args:
        tasks: task names to run (default: all, in the table's order).
        pool: `"local"` (each task's own pool) or `"global"` (the union pool, encoded once for all tasks).
        cache_dir: folder of the resumable embedding shards (`None`: no cache).
        index: `"flat"` (exact, default), `"ivf"` or `"hnsw"` (approximate; see `build_index`).
        seed: seed of the per-query instruction draw.

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
    instructions = load_query_instructions(_require_file(benchmark.instructions_file, "Query instructions"))
    is_main = _partial_state().is_main_process
    options = dict(cache_dir=cache_dir, image_root=benchmark.image_root, batch_size=batch_size, shard_size=shard_size,
                   show_progress_bar=show_progress_bar)

    def pool_index(path: str, records: dict[str, dict]):
        ids = list(records)
        items = [{"text": records[did]["txt"], "image": records[did]["img_path"]} for did in ids]
        embeddings = encode_cached(model, items, ids, name=_file_stem(path), **options)
        return ids, build_index(embeddings, index) if is_main else None

    global_pool = load_pool(benchmark.global_pool_file, "Global pool") if pool == "global" else None
    global_index = None  # encoded once, after the first task's checks pass
    results = []
    for task in selected:
        logger.info(f"Task {task.name} ({task.label}), {pool} pool")
        pool_path = benchmark.global_pool_file if pool == "global" else benchmark.path(task.pool_file)
        records = global_pool if pool == "global" else load_pool(pool_path, f"Task {task.name} local pool")
        queries, relevant = load_task_queries(benchmark, task, records, pool_path, instructions, local=pool == "local",
                                              seed=seed)
        if pool == "local":
            ids, faiss_index = pool_index(pool_path, records)
        else:
            global_index = global_index or pool_index(pool_path, records)
            ids, faiss_index = global_index
        query_ids = [q["query_id"] for q in queries]
        query_embeddings = encode_cached(model, [q["query"] for q in queries], query_ids,
                                         name=_file_stem(task.query_file), is_query=True,
                                         instructions=[q["instruction"] for q in queries], **options)
        if not is_main:
            continue
        _, top = search_index(faiss_index, query_embeddings, max(K_VALUES), show_progress_bar=show_progress_bar)
        ranked = [[ids[i] for i in row if i >= 0] for row in top]
        scores = retrieval_metrics(ranked, [relevant[qid] for qid in query_ids])
        published = ({system: figures[task.name] for system, figures in PUBLISHED_FIGURES.items()}
                     if benchmark.is_mbeir and pool == "local" else {})
        results.append({
            "task": task.name, "label": task.label, "pool": pool, "num_queries": len(queries),
            "pool_size": len(records), "metric": f"recall@{task.metric_k}", "score": scores[f"recall@{task.metric_k}"],
            **{f"recall@{k}": scores[f"recall@{k}"] for k in K_VALUES},
            **{f"ndcg@{k}": scores[f"ndcg@{k}"] for k in K_VALUES},
            f"mrr@{max(K_VALUES)}": scores["mrr"], "published": published,
        })
        logger.info(f"Task {task.name}: {task.label} Recall@{task.metric_k} = {results[-1]['score']:.1f}")
    return results if is_main else None


def summarize(results: list[dict]) -> dict:
    """The average row: the mean of each score over the tasks, and of the published figures. The published average
    is the paper's own when all 16 M-BEIR tasks ran, else the mean of the published figures of the tasks that ran."""
    keys = ["score", *[f"recall@{k}" for k in K_VALUES], *[f"ndcg@{k}" for k in K_VALUES], f"mrr@{max(K_VALUES)}"]
    average = {key: sum(result[key] for result in results) / len(results) for key in keys}
    published = {}
    if all(result["published"] for result in results):
        full = sorted(result["task"] for result in results) == sorted(task.name for task in MBEIR_TASKS)
        for system, figures in PUBLISHED_FIGURES.items():
            published[system] = figures["average"] if full else \
                sum(result["published"][system] for result in results) / len(results)
    return {"task": "average", "label": f"average ({len(results)} tasks)", "metric": "mean",
            **average, "published": published}


def results_markdown(results: list[dict], average: dict) -> str:
    """The per-task table (percent) with the average row and the published figures, in markdown."""
    systems = list(PUBLISHED_FIGURES) if any(result["published"] for result in results) else []
    headers = ["task", "metric", "score", "R@1", "R@5", "R@10", "MRR@10", "nDCG@10", "queries", "candidates",
               *[f"{system}†" for system in systems]]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in [*results, average]:
        cells = [row["label"], row["metric"].replace("recall@", "R@"), *[f"{row[key]:.1f}" for key in (
            "score", "recall@1", "recall@5", "recall@10", f"mrr@{max(K_VALUES)}", "ndcg@10")],
            str(row.get("num_queries", "")), str(row.get("pool_size", "")),
            *[f"{row['published'][system]:.1f}" if system in row["published"] else "" for system in systems]]
        lines.append("| " + " | ".join(cells) + " |")
    if systems:
        lines.append("\n† published figures: the paper's M-BEIR local-pool table (arXiv 2507.08064).")
    return "\n".join(lines)


def _import_pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("Plots need matplotlib: pip install matplotlib.") from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_task(result: dict, path: str) -> None:
    """Bar chart of the task's headline score beside the published PUMA and LamRA-Ret figures, when it has them."""
    plt = _import_pyplot()
    names = ["this model", *[system for system in CHART_SYSTEMS if system in result["published"]]]
    values = [result["score"], *[result["published"][system] for system in names[1:]]]
    figure, axes = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    bars = axes.bar(names, values, color=["tab:blue"] + ["tab:gray"] * (len(names) - 1))
    for bar in bars[1:]:
        bar.set_hatch("//")
        bar.set_label("published figures (arXiv 2507.08064)")
    axes.bar_label(bars, fmt="%.1f")
    axes.set_ylabel(result["metric"].replace("recall@", "Recall@").replace("mean", "mean task score") + " (%)")
    axes.set_ylim(0, 105)
    axes.set_title(f"{result['label']} ({result.get('pool', 'local')} pool)", fontsize=10)
    if len(names) > 1:
        axes.legend(handles=[bars[1]], loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(results: list[dict], out_dir, pool: str) -> str:
    """Writes `results_{pool}.md`, `results_{pool}.json` and `plots/{pool}_{task}.png`; returns the markdown."""
    average = summarize(results)
    table = results_markdown(results, average)
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    with open(os.path.join(out_dir, f"results_{pool}.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, f"results_{pool}.json"), "w", encoding="utf-8") as f:
        json.dump({"tasks": results, "average": average}, f, indent=2)
        f.write("\n")
    for row in [*results, {**average, "pool": pool}]:
        plot_task(row, os.path.join(out_dir, "plots", f"{pool}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', row['task'])}.png"))
    return table


# ----------------------------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------------------------
# Log keys that are bookkeeping rather than curves.
_NOT_CURVES = ("step", "epoch", "total_flos", "num_input_tokens_seen")


def plot_training_curves(trainer_state_path, out_path) -> list[str]:
    """Plots a Trainer run's logged scalars against the step: every `*loss*` key (total loss, its components,
    eval loss) on one panel, each other scalar (learning rate, grad norm, temperatures, ...) on its own.

    Returns the plotted keys.
    """
    path = os.fspath(trainer_state_path)
    with open(_require_file(path, "Trainer state"), encoding="utf-8") as f:
        try:
            history = json.load(f).get("log_history")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{path} is not a Trainer state JSON object ({err}).") from err
    curves = {}
    for entry in history or []:
        if "step" not in entry or "train_runtime" in entry:  # the end-of-training summary holds totals, not points
            continue
        for key, value in entry.items():
            if key not in _NOT_CURVES and not key.endswith(("_runtime", "_per_second")) and \
                    isinstance(value, (int, float)) and not isinstance(value, bool):
                curves.setdefault(key, []).append((entry["step"], value))
    losses = sorted((key for key in curves if "loss" in key), key=lambda key: (key != "loss", key))
    if not losses:
        raise ValueError(f"{path} logs no loss (its log_history has no '*loss*' entries to plot).")
    others = sorted(key for key in curves if key not in losses)
    plt = _import_pyplot()
    panels = 1 + len(others)
    columns = min(2, panels)
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    for key in losses:
        steps, values = zip(*curves[key])
        axes[0][0].plot(steps, values, label=key, marker="o" if key.startswith("eval_") else None, markersize=3)
    axes[0][0].set_title("losses")
    axes[0][0].legend(fontsize=8)
    for panel, key in enumerate(others, 1):
        ax = axes[panel // columns][panel % columns]
        steps, values = zip(*curves[key])
        ax.plot(steps, values, color="tab:orange")
        ax.set_title(key)
    for panel in range(panels, rows * columns):
        axes[panel // columns][panel % columns].axis("off")
    for ax in axes.flat:
        ax.set_xlabel("step")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
    return losses + others


# ----------------------------------------------------------------------------------------------------------------
# Semantic search over a corpus
# ----------------------------------------------------------------------------------------------------------------
def load_corpus(path) -> tuple[list[str], list[dict], str]:
    """`(ids, items, image_root)` of a folder (every image file and `.txt` file under it, recursively; ids are
    relative paths) or of a JSONL file (records with `text` and/or `image`, an optional `id`; image paths relative
    to the file's folder)."""
    path = os.fspath(path)
    ids, items = [], []
    if os.path.isdir(path):
        skipped = 0
        for folder, subfolders, files in os.walk(path):
            subfolders.sort()
            for filename in sorted(files):
                relative = os.path.relpath(os.path.join(folder, filename), path)
                if filename.lower().endswith(IMAGE_SUFFIXES):
                    ids.append(relative)
                    items.append({"text": None, "image": relative})
                elif filename.lower().endswith(".txt"):
                    with open(os.path.join(folder, filename), encoding="utf-8") as f:
                        text = f.read().strip()
                    if not text:
                        raise ValueError(f"Corpus file {os.path.join(folder, filename)} is empty.")
                    ids.append(relative)
                    items.append({"text": text, "image": None})
                else:
                    skipped += 1
        if skipped:
            logger.info(f"{path}: skipped {skipped} files that are neither images nor .txt")
        root = path
    elif os.path.isfile(path):
        from data_puma import read_jsonl

        for line, record in enumerate(read_jsonl(path), 1):
            unknown = set(record) - {"id", "text", "image"}
            if unknown:
                raise ValueError(f"{path}, record {line}: unknown fields {sorted(unknown)}; use id, text and image.")
            text, image = record.get("text") or None, record.get("image") or None
            if text is None and image is None:
                raise ValueError(f"{path}, record {line}: neither 'text' nor 'image'.")
            ids.append(str(record.get("id", f"record {line}")))
            items.append({"text": text, "image": image})
        root = os.path.dirname(os.path.abspath(path))
    else:
        raise FileNotFoundError(f"Corpus {path} is neither a folder nor a JSONL file.")
    if not items:
        raise ValueError(f"Corpus {path} holds no image, .txt file or record to index.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"Corpus {path} repeats ids {repeated_ids(ids)[:_SHOWN_IDS]}.")
    return ids, items, root


def search_corpus(model: PumaForEmbedding, corpus, query: str | None = None, image=None, top_k: int = 5,
                  instruction: str | None = None, batch_size: int = 16, cache_dir=None) -> list[dict]:
    """The `top_k` corpus items closest to the query (text, image or both): dicts with `rank`, `score`, `id`,
    `text`, `image`."""
    if query is None and image is None:
        raise ValueError("Give a query text, a query image, or both.")
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}.")
    ids, items, root = load_corpus(corpus)
    name = _file_stem(os.path.normpath(os.fspath(corpus)))
    corpus_embeddings = encode_cached(model, items, ids, cache_dir, name=name, image_root=root, batch_size=batch_size)
    query_embedding = model.encode([{"text": query, "image": image}], instruction=instruction, is_query=True)
    scores, top = search_index(build_index(corpus_embeddings, "flat"), query_embedding, top_k)
    return [{"rank": rank, "score": float(score), "id": ids[i], **items[i]}
            for rank, (score, i) in enumerate(zip(scores[0], top[0]), 1)]


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def load_model(path: str, dtype: str | None = None) -> PumaForEmbedding:
    """Loads a PUMA or Qwen2-VL checkpoint onto this process's device, refusing folders that are neither."""
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"--model {path} is not a PUMA or Qwen2-VL checkpoint: it has no config.json.")
        with open(config_path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"--model {path} is a {model_type!r} checkpoint, not a PUMA or Qwen2-VL one.")
    elif os.path.exists(path):
        raise ValueError(f"--model {path} is a file; pass a checkpoint folder or a Hub repository id.")
    elif os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1:  # a path, not an org/name id
        raise FileNotFoundError(f"--model {path} does not exist.")
    model = PumaForEmbedding.from_pretrained(path, device_map=_partial_state().device, dtype=dtype)
    if model.processor is None:
        raise ValueError(f"--model {path} holds no processor files; save the model with its processor.")
    return model


def _run_eval(args) -> None:
    _import_pyplot()  # fail before hours of encoding, not after
    model = load_model(args.model, args.dtype)
    cache_dir = args.cache_dir if args.cache_dir is not None else os.path.join(args.out, "embeddings")
    results = evaluate_mbeir(model, args.mbeir_root, tasks=args.tasks, pool=args.pool, cache_dir=cache_dir,
                             index=args.index, batch_size=args.batch_size, shard_size=args.shard_size, seed=args.seed)
    if results is not None:
        print(write_results(results, args.out, args.pool))
        print(f"\nWrote results_{args.pool}.md, results_{args.pool}.json and plots/ to {args.out}")


def _run_search(args) -> None:
    model = load_model(args.model, args.dtype)
    hits = search_corpus(model, args.corpus, args.query, args.image, args.top_k, args.instruction, args.batch_size,
                         args.cache_dir)
    width = max(len(hit["id"]) for hit in hits)
    print(f"{'rank':>4}  {'score':>7}  {'id':<{width}}  content")
    for hit in hits:
        content = " ".join(part for part in (f"[image {hit['image']}]" if hit["image"] else "",
                                             (hit["text"] or "")[:80].replace("\n", " ")) if part)
        print(f"{hit['rank']:>4}  {hit['score']:>7.4f}  {hit['id']:<{width}}  {content}")


def _run_curves(args) -> None:
    keys = plot_training_curves(args.trainer_state, args.out)
    print(f"Plotted {', '.join(keys)} to {args.out}")


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
    evaluation.add_argument("--cache-dir", help="embedding shards, reused and resumed (default: OUT/embeddings)")
    evaluation.add_argument("--index", choices=INDEX_KINDS, default="flat",
                            help="flat: exact inner-product search (default; the reported protocol). ivf, hnsw: "
                                 "approximate, faster on million-candidate pools, but they can miss true nearest "
                                 "neighbours, which changes Recall@k (usually lowering it, by an amount that depends "
                                 "on the data): not comparable with published figures; check against flat")
    evaluation.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass")
    evaluation.add_argument("--shard-size", type=int, default=1024, help="items per cached embedding shard")
    evaluation.add_argument("--seed", type=int, default=0, help="seed of the per-query instruction draw")
    evaluation.add_argument("--dtype", help="model dtype (default: float32 on CPU, bfloat16 on GPU)")
    evaluation.set_defaults(run=_run_eval)

    search = commands.add_parser("search", help="index a folder or JSONL corpus and print the top hits of a query")
    search.add_argument("--model", required=True, help="PUMA or Qwen2-VL checkpoint folder or Hub id")
    search.add_argument("--corpus", required=True,
                        help="folder of images and .txt files, or a JSONL file of {id?, text?, image?} records")
    search.add_argument("--query", help="query text")
    search.add_argument("--image", help="query image (with or without --query)")
    search.add_argument("--instruction", help="task instruction put before the query text")
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--batch-size", type=int, default=16)
    search.add_argument("--cache-dir", help="keep corpus embeddings here for the next search")
    search.add_argument("--dtype", help="model dtype")
    search.set_defaults(run=_run_search)

    curves = commands.add_parser("curves", help="plot loss and logged components of a Trainer run")
    curves.add_argument("--trainer-state", required=True, help="trainer_state.json of a Trainer output folder")
    curves.add_argument("--out", required=True, help="PNG file to write")
    curves.set_defaults(run=_run_curves)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "eval")  # `eval` is the default command
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "search" and args.query is None and args.image is None:
        parser.error("search needs --query, --image, or both")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # this module's progress lines, not every library's
    args.run(args)


if __name__ == "__main__":
    main()

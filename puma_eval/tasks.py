# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Retrieval task tables and query loading: the 16 M-BEIR tasks (or a benchmark root's own `tasks.json`), their
published figures, and `load_task`, which reads one task's queries and pool and checks them as strictly as UniIR
does before anything is encoded.

A benchmark root holding `tasks.json` (or `demo_benchmark.json`, written by `demo_data_puma.py`) supplies its own task
table: `{"tasks": [{"name", "test_file", "local_pool_file", "query_modality", "cand_modality", "metric_k"?,
"label"?}, ...], "union_test_pool_file"?, "instructions_file"?, "image_root"?}` with paths relative to the root;
otherwise the 16 M-BEIR tasks below are read under UniIR's file names.
"""

import json
import os
from dataclasses import dataclass

from mbeir_puma import (dataset_id, load_mbeir_pool, load_mbeir_queries, load_query_instructions, mbeir_eval_queries,
                        media_side, own_dataset_positives, repeated_ids, require_file)

from .metrics import K_VALUES


TASK_TABLE_FILES = ("tasks.json", "demo_benchmark.json")
MBEIR_GLOBAL_POOL = "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
MBEIR_INSTRUCTIONS = "instructions/query_instructions.tsv"
# Ids shown per kind of violation in an error message.
SHOWN_IDS = 5


@dataclass(frozen=True)
class RetrievalTask:
    """One retrieval task: the queries of `query_file` ranked against a candidate pool.

    Args:
        name (`str`): key used by `--tasks` and in result files (M-BEIR: UniIR's dataset name, `visualnews_task0`).
        label (`str`): column label of the paper's table (`VisualNews t→i`).
        query_file (`str`): test queries, relative to the benchmark root.
        pool_file (`str`): the task's local candidate pool, relative to the benchmark root.
        query_modality, cand_modality (`str`): `"text"`, `"image"`, `"image,text"`, `"video"` or `"text,video"`.
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
def load_pool(path: str, what: str) -> dict[str, dict]:
    """Candidate records keyed by did; raises on a missing file, duplicate ids or an empty pool."""
    pool = load_mbeir_pool(require_file(path, what))
    if not pool:
        raise ValueError(f"{what}: the candidate pool {path} is empty.")
    return pool


def violation(kind: str, ids: list[str]) -> str:
    """`"N <kind>, e.g. [first ids]"`, one clause of an error message."""
    return f"{len(ids)} {kind}, e.g. {ids[:SHOWN_IDS]}"


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
        problems.append(violation(f"queries whose modality is not {task.query_modality!r}", wrong_query))
    if no_positive:
        problems.append(violation("queries without a positive", no_positive))
    if absent:
        problems.append(violation(f"positives absent from the pool {pool_path}", absent))
    if wrong_positive:
        problems.append(violation(f"positives whose modality is not {task.cand_modality!r}", wrong_positive))
    if local:
        wrong_candidate = [f"{did} ({c['modality']})" for did, c in pool.items() if c["modality"] != task.cand_modality]
        if wrong_candidate:
            problems.append(violation(f"candidates of the local pool whose modality is not {task.cand_modality!r}",
                                      wrong_candidate))
    if problems:
        raise ValueError(f"Task {task.name} ({query_path}): " + "; ".join(problems) + ".")
    return relevant


def load_task_queries(benchmark: Benchmark, task: RetrievalTask, pool: dict[str, dict], pool_path: str,
                      instructions: dict, local: bool, seed: int = 0) -> tuple[list[dict], dict[str, list[str]]]:
    """The task's evaluation queries (one fixed instruction each) and their relevant ids, after `check_task`."""
    query_path = benchmark.path(task.query_file)
    queries = load_mbeir_queries(require_file(query_path, f"Task {task.name} query file"))
    relevant = check_task(task, queries, pool, local, query_path, pool_path)
    eval_queries = mbeir_eval_queries(queries, pool, instructions, seed=seed)
    without = [f"{q['query_id']} {(dataset_id(q['query_id']), q['query_modality'], q['modality'])}"
               for q in eval_queries if q["instruction"] is None]
    if without:
        kind = f"queries without an instruction in {benchmark.instructions_file} for (dataset id, query modality, " \
               "candidate modality)"
        raise ValueError(f"Task {task.name}: {violation(kind, without)}.")
    return eval_queries, relevant


def file_stem(path: str) -> str:
    """The file name without folder and extension: the cache name of a pool or query file."""
    return os.path.splitext(os.path.basename(path))[0]


@dataclass
class TaskData:
    """One task ready to encode and score: checked queries (one instruction each) and the candidate pool.

    `pool_name` names the pool's embeddings (its file stem), so tasks sharing a pool (the global one) share them.
    `relevant[i]` lists the pool ids relevant to query `i`.
    """

    task: RetrievalTask
    pool: str  # "local" or "global"
    pool_name: str
    pool_ids: list[str]
    pool_items: list[dict]
    query_name: str
    query_ids: list[str]
    query_items: list[dict]
    query_instructions: list[str | None]
    relevant: list[list[str]]
    published: dict[str, float]


def load_instructions(benchmark: Benchmark) -> dict:
    """The benchmark's query instructions, keyed as `mbeir_puma.load_query_instructions` reads them."""
    return load_query_instructions(require_file(benchmark.instructions_file, "Query instructions"))


def load_task(benchmark: Benchmark, task: RetrievalTask, pool: str = "local", instructions: dict | None = None,
              seed: int = 0, global_pool: dict[str, dict] | None = None) -> TaskData:
    """Reads and checks one task against its local pool or the global pool (`global_pool`, read once by the caller
    for all tasks, or here); nothing is encoded."""
    if pool not in ("local", "global"):
        raise ValueError(f"pool must be 'local' or 'global', got {pool!r}.")
    instructions = load_instructions(benchmark) if instructions is None else instructions
    if pool == "global":
        pool_path = benchmark.global_pool_file
        records = global_pool if global_pool is not None else load_pool(pool_path, "Global pool")
    else:
        pool_path = benchmark.path(task.pool_file)
        records = load_pool(pool_path, f"Task {task.name} local pool")
    queries, relevant = load_task_queries(benchmark, task, records, pool_path, instructions, local=pool == "local",
                                          seed=seed)
    pool_ids = list(records)
    published = ({system: figures[task.name] for system, figures in PUBLISHED_FIGURES.items()}
                 if benchmark.is_mbeir and pool == "local" else {})
    return TaskData(
        task=task, pool=pool, pool_name=file_stem(pool_path), pool_ids=pool_ids,
        pool_items=[media_side(records[did]["txt"], records[did]["img_path"], records[did].get("video_path"))
                    for did in pool_ids],
        query_name=file_stem(task.query_file), query_ids=[q["query_id"] for q in queries],
        query_items=[q["query"] for q in queries], query_instructions=[q["instruction"] for q in queries],
        relevant=[relevant[q["query_id"]] for q in queries], published=published)

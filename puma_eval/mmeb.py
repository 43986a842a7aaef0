# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""MMEB (Massive Multimodal Embedding Benchmark, VLM2Vec arXiv 2410.05160): each query ranks its own candidate list,
whose first entry is the target; the score is hit@1 (Precision@1), averaged per meta-task (classification, VQA,
retrieval, visual grounding) and overall.

Files are VLM2Vec's, one per task under the root: `TASK.parquet`, `TASK.jsonl` or `TASK/test-*.parquet` (the layout of
the Hub's MMEB-eval). Each record holds `qry_text`, `qry_img_path`, `tgt_text` (list) and `tgt_img_path` (list), and
optionally `qry_inst` and `tgt_inst` (MMEB-V2's image-query files). Image tokens (`<|image_1|>`) are removed: PUMA
marks images itself. A query's instruction is `qry_inst` when present (MMEB-V1 writes it into `qry_text`, which is then
encoded as it is). Candidates are encoded without instruction, as PUMA encodes candidates; identical candidates
(same text and image) are encoded once per task.
"""

import glob
import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from .encoding import distributed_state, encode_cached
from .metrics import safe_name, summarize, write_results
from .tasks import violation


logger = logging.getLogger(__name__)

# MMEB's 36 image tasks by meta-task (VLM2Vec's table).
MMEB_IMAGE_TASKS = {
    **dict.fromkeys(["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
                     "ImageNet-R", "ObjectNet", "Country211"], "classification"),
    **dict.fromkeys(["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz",
                     "GQA", "TextVQA"], "vqa"),
    **dict.fromkeys(["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS",
                     "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"], "retrieval"),
    **dict.fromkeys(["MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"], "grounding"),
}
META_TASKS = ("classification", "vqa", "retrieval", "grounding")
_IMAGE_TOKEN = re.compile(r"<\|image_\d+\|>")
_COLUMNS = (("P@1", "precision@1"), ("hit@5", "hit@5"), ("MRR", "mrr"))


def _clean(text) -> str | None:
    """Text without VLM2Vec's image tokens; `None` when nothing is left."""
    if text is None:
        return None
    text = _IMAGE_TOKEN.sub("", str(text)).strip()
    return text or None


@dataclass
class MMEBTask:
    """One MMEB task ready to encode: queries, the task's distinct candidates, and each query's candidate list
    (indices into `candidates`, target first)."""

    name: str
    category: str
    query_items: list[dict]
    query_instructions: list[str | None]
    candidates: list[dict]
    candidate_lists: list[list[int]]


def find_mmeb_tasks(root) -> dict[str, str]:
    """`{task: file or folder}` of the MMEB task files under `root`."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"The MMEB root {root!r} is not a folder.")
    found = {}
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        name, suffix = os.path.splitext(entry)
        if os.path.isfile(path) and suffix in (".parquet", ".jsonl"):
            found[name] = path
        elif os.path.isdir(path) and glob.glob(os.path.join(path, "test-*.parquet")):
            found[entry] = path
    if not found:
        raise FileNotFoundError(f"{root} holds no MMEB task file (TASK.parquet, TASK.jsonl or TASK/test-*.parquet).")
    return found


def _read_records(path: str) -> list[dict]:
    from datasets import load_dataset

    if os.path.isdir(path):
        files, kind = sorted(glob.glob(os.path.join(path, "test-*.parquet"))), "parquet"
    else:
        files, kind = [path], "parquet" if path.endswith(".parquet") else "json"
    return list(load_dataset(kind, data_files=files, split="train"))


def load_mmeb_task(path, name: str | None = None, image_root=None) -> MMEBTask:
    """Reads one MMEB task file; raises `ValueError` naming the records whose candidate lists are empty or whose text
    and image lists differ in length, or whose query or candidates have neither text nor image."""
    path = os.fspath(path)
    name = name or os.path.splitext(os.path.basename(path.rstrip(os.sep)))[0]
    records = _read_records(path)
    if not records:
        raise ValueError(f"MMEB task {name} ({path}) holds no record.")
    missing = [key for key in ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path") if key not in records[0]]
    if missing:
        raise ValueError(f"MMEB task {name} ({path}) lacks the fields {missing}; expected VLM2Vec's qry_text, "
                         "qry_img_path, tgt_text, tgt_img_path (and optional qry_inst, tgt_inst).")

    def image(value):
        return os.path.join(image_root, value) if value and image_root is not None else (value or None)

    queries, instructions, candidates, lists, index = [], [], [], [], {}
    bad_lists, empty = [], []
    for number, record in enumerate(records):
        texts, images = list(record["tgt_text"] or []), list(record["tgt_img_path"] or [])
        if not texts or len(texts) != len(images):
            bad_lists.append(f"record {number} ({len(texts)} texts, {len(images)} images)")
            continue
        query = {"text": _clean(record["qry_text"]), "image": image(record["qry_img_path"])}
        if query["text"] is None and query["image"] is None:
            empty.append(f"query of record {number}")
        queries.append(query)
        instructions.append(_clean(record.get("qry_inst")))
        row = []
        for text, image_path in zip(texts, images):
            candidate = {"text": _clean(text), "image": image(image_path)}
            if candidate["text"] is None and candidate["image"] is None:
                empty.append(f"candidate of record {number}")
            key = (candidate["text"], candidate["image"])
            if key not in index:
                index[key] = len(candidates)
                candidates.append(candidate)
            row.append(index[key])
        lists.append(row)
    problems = []
    if bad_lists:
        problems.append(violation("records whose tgt_text and tgt_img_path lists are empty or differ in length",
                                  bad_lists))
    if empty:
        problems.append(violation("inputs with neither text nor image", empty))
    if problems:
        raise ValueError(f"MMEB task {name} ({path}): " + "; ".join(problems) + ".")
    return MMEBTask(name, MMEB_IMAGE_TASKS.get(name, "other"), queries, instructions, candidates, lists)


def score_mmeb(task: MMEBTask, query_embeddings, candidate_embeddings) -> dict:
    """Scores one task from precomputed embeddings (`(queries, dim)` and `(distinct candidates, dim)`): hit@1
    (Precision@1: the target, listed first, scores highest; a tie goes to the target, as numpy's argmax gives it),
    hit@5 and the target's reciprocal rank, in percent."""
    queries = torch.as_tensor(np.asarray(query_embeddings), dtype=torch.float32)
    candidates = torch.as_tensor(np.asarray(candidate_embeddings), dtype=torch.float32)
    hits1 = hits5 = reciprocal = 0.0
    for query, row in zip(queries, task.candidate_lists):
        scores = candidates[row] @ query  # (list length,)
        rank = int((scores > scores[0]).sum())  # candidates strictly better than the target
        hits1 += rank == 0
        hits5 += rank < 5
        reciprocal += 1.0 / (rank + 1)
    n = len(task.candidate_lists)
    sizes = sorted({len(row) for row in task.candidate_lists})
    return {"task": task.name, "label": task.name, "category": task.category, "num_queries": n,
            "pool_size": sizes[0] if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}", "metric": "precision@1",
            "score": 100.0 * hits1 / n, "precision@1": 100.0 * hits1 / n, "hit@5": 100.0 * hits5 / n,
            "mrr": 100.0 * reciprocal / n, "published": {}}


def evaluate_mmeb(model, root, tasks: list[str] | None = None, image_root=None, cache_dir=None, batch_size: int = 16,
                  shard_size: int = 1024, show_progress_bar: bool = True) -> list[dict] | None:
    """Evaluates `model` on the MMEB task files under `root` (all, or `tasks`), image paths relative to `image_root`
    (default: `root/images` when it exists, else `root`). Returns one row per task on the main process (`None`
    on the others, which encode their share of the shards under `accelerate launch`)."""
    found = find_mmeb_tasks(root)
    unknown = [name for name in tasks or [] if name not in found]
    if unknown:
        raise ValueError(f"Unknown MMEB tasks {unknown}; {root} has {sorted(found)}.")
    if image_root is None:
        image_root = os.path.join(root, "images") if os.path.isdir(os.path.join(root, "images")) else os.fspath(root)
    is_main = distributed_state().is_main_process
    results = []
    for name in tasks or list(found):
        task = load_mmeb_task(found[name], name, image_root)
        logger.info(f"MMEB {name} ({task.category}): {len(task.query_items)} queries, {len(task.candidates)} "
                    "distinct candidates")
        options = dict(batch_size=batch_size, shard_size=shard_size, show_progress_bar=show_progress_bar)
        query_embeddings = encode_cached(model, task.query_items, [f"q{i}" for i in range(len(task.query_items))],
                                         cache_dir, name=f"mmeb_{safe_name(name)}_queries", is_query=True,
                                         instructions=task.query_instructions, **options)
        candidate_embeddings = encode_cached(model, task.candidates, [f"c{i}" for i in range(len(task.candidates))],
                                             cache_dir, name=f"mmeb_{safe_name(name)}_candidates", **options)
        if is_main:
            results.append(score_mmeb(task, query_embeddings, candidate_embeddings))
            logger.info(f"MMEB {name}: Precision@1 = {results[-1]['score']:.1f}")
    return results if is_main else None


def mmeb_summary(results: list[dict]) -> list[dict]:
    """Average rows: one per meta-task present, then the overall mean over tasks (MMEB's headline)."""
    rows = []
    for category in [*META_TASKS, "other"]:
        members = [row for row in results if row["category"] == category]
        if members and len(members) < len(results):
            rows.append({**summarize(members), "task": f"average_{category}",
                         "label": f"{category} ({len(members)} tasks)"})
    return rows + [summarize(results)]


def write_mmeb_results(results: list[dict], out_dir, *, baselines: dict[str, dict] | None = None,
                       model_name: str = "this model") -> str:
    """Writes `results_mmeb.md`, `results_mmeb.json` and `plots/mmeb_{task}.png`; returns the markdown.
    `baselines`: other models' results to show beside this one's (`metrics.write_results`)."""
    if not results:
        raise ValueError(f"No MMEB result to write to {out_dir}.")
    *categories, overall = mmeb_summary(results)
    return write_results(results + categories, out_dir, "results_mmeb", average=overall, columns=_COLUMNS,
                         baselines=baselines, model_name=model_name)


__all__ = ["MMEB_IMAGE_TASKS", "MMEBTask", "evaluate_mmeb", "find_mmeb_tasks", "load_mmeb_task", "mmeb_summary",
           "score_mmeb", "write_mmeb_results"]

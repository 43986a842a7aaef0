# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""MMEB (Massive Multimodal Embedding Benchmark, VLM2Vec arXiv 2410.05160; MMEB-V2, arXiv 2507.04590): its image,
video and visual-document tasks, scored as MMEB-V2's leaderboard scores them: hit@1 for image and video tasks (the
target, or any relevant candidate, ranked first), nDCG@5 with linear gains for visual documents; meta-task averages,
each modality's average over its tasks, and the overall average over all tasks.

Image tasks are VLM2Vec's files, one per task: `TASK.parquet`, `TASK.jsonl` or `TASK/test-*.parquet` (the layout of
the Hub's MMEB-eval) under the root, or under `ANNOTATIONS/TIGER-Lab/MMEB-eval` with the images in
`ROOT/image-tasks` (MMEB-V2's layout). Each record holds `qry_text`, `qry_img_path`, `tgt_text` (list) and
`tgt_img_path` (list), and optionally `qry_inst` and `tgt_inst` (MMEB-V2's image-query files). Image tokens
(`<|image_1|>`) are removed: PUMA marks images itself. A query's instruction is `qry_inst` when present (MMEB-V1
writes it into `qry_text`, which is then encoded as it is); each query ranks its own candidate list, target first.

Video and visual-document tasks are read from MMEB-V2's released layout (`puma_eval.mmeb_v2`). Candidates are
encoded without instruction, as PUMA encodes candidates; identical candidates are encoded once per task.
"""

import glob
import logging
import math
import os
import re

import numpy as np
import torch

from mbeir_puma import markdown_table

from .encoding import distributed_state, encode_cached
from .metrics import safe_name, summarize, write_results
from .mmeb_v2 import V2_TASKS, MMEBTask, load_v2_task, v2_task_status
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
# Meta-tasks by modality, in the leaderboard's order, with its column names
MODALITY_CATEGORIES = {
    "image": {"classification": "I-CLS", "vqa": "I-QA", "retrieval": "I-RET", "grounding": "I-VG"},
    "video": {"video classification": "V-CLS", "video QA": "V-QA", "video retrieval": "V-RET",
              "moment retrieval": "V-MRET"},
    "visdoc": {"ViDoRe v1": "VDRv1", "ViDoRe v2": "VDRv2", "VisRAG": "VR", "VisDoc OOD": "OOD"},
}
META_TASKS = tuple(category for categories in MODALITY_CATEGORIES.values() for category in categories)
_IMAGE_TOKEN = re.compile(r"<\|image_\d+\|>")
_COLUMNS = (("hit@1", "hit@1"), ("hit@5", "hit@5"), ("MRR", "mrr"), ("nDCG@5", "ndcg_linear@5"))
# The MMEB-eval annotations of the image tasks inside an MMEB-V2 annotations folder
_IMAGE_ANNOTATIONS = os.path.join("TIGER-Lab", "MMEB-eval")


def _clean(text) -> str | None:
    """Text without VLM2Vec's image tokens; `None` when nothing is left."""
    if text is None:
        return None
    text = _IMAGE_TOKEN.sub("", str(text)).strip()
    return text or None


def find_mmeb_tasks(root, annotations=None) -> dict[str, object]:
    """`{task: source}` of the MMEB tasks under `root`: image task files (a path) under it or, in MMEB-V2's layout,
    under `annotations/TIGER-Lab/MMEB-eval`, and the MMEB-V2 video and visual-document tasks (a `V2Task`) whose
    annotations (and frames) are there; `annotations` defaults to `root/annotations`."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"The MMEB root {root!r} is not a folder.")
    annotations = os.fspath(annotations) if annotations is not None else os.path.join(root, "annotations")
    found = {}
    for folder in (root, os.path.join(annotations, _IMAGE_ANNOTATIONS)):
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            name, suffix = os.path.splitext(entry)
            if os.path.isfile(path) and suffix in (".parquet", ".jsonl"):
                found.setdefault(name, path)
            elif os.path.isdir(path) and glob.glob(os.path.join(path, "test-*.parquet")):
                found.setdefault(entry, path)
    for name, task in V2_TASKS.items():
        if v2_task_status(task, root, annotations) is None:
            found[name] = task
    if not found:
        raise FileNotFoundError(f"{root} holds no MMEB task: no image task file (TASK.parquet, TASK.jsonl or "
                                f"TASK/test-*.parquet) and no MMEB-V2 video or visual-document task with its "
                                f"annotations under {annotations}.")
    return found


def missing_v2_parts(root, annotations=None) -> dict[str, str]:
    """`{task: what is missing}` of the MMEB-V2 video and visual-document tasks not found under `root`."""
    annotations = os.fspath(annotations) if annotations is not None else os.path.join(os.fspath(root), "annotations")
    return {name: status for name, task in V2_TASKS.items()
            if (status := v2_task_status(task, os.fspath(root), annotations)) is not None}


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


def _ndcg(scores: torch.Tensor, listed: list[int], relevant: dict[int, float], k: int = 5) -> float:
    """nDCG@k with linear gains (VLM2Vec's `ndcg_linear`): the grades of the top k candidates (ties broken by list
    order) discounted by log2(rank + 1), over the same sum of the best possible order."""
    order = np.argsort(-scores.numpy(), kind="stable")[:k]
    dcg = sum(relevant.get(listed[i], 0.0) / math.log2(rank + 2) for rank, i in enumerate(order))
    ideal = sum(grade / math.log2(rank + 2) for rank, grade in enumerate(sorted(relevant.values(), reverse=True)[:k]))
    return dcg / ideal if ideal > 0 else 0.0


def score_mmeb(task: MMEBTask, query_embeddings, candidate_embeddings) -> dict:
    """Scores one task from precomputed embeddings (`(queries, dim)` and `(distinct candidates, dim)`), in percent:
    hit@1 and hit@5 (a relevant candidate among the first 1 or 5; a tie with the best relevant candidate goes to it,
    as numpy's argmax gives it to MMEB's target, listed first), the best relevant candidate's reciprocal rank, and
    nDCG@5 with linear gains. The reported `score` is `task.metric`'s."""
    queries = torch.as_tensor(np.asarray(query_embeddings), dtype=torch.float32)
    candidates = torch.as_tensor(np.asarray(candidate_embeddings), dtype=torch.float32)
    everything = list(range(len(candidates)))
    hits1 = hits5 = reciprocal = ndcg = 0.0
    sizes = set()
    for number, (query, listed) in enumerate(zip(queries, task.candidate_lists)):
        listed = everything if listed is None else listed
        relevant = task.relevance[number] if task.relevance is not None else {listed[0]: 1.0}
        scores = candidates[listed] @ query  # (list length,)
        best = max(float(scores[i]) for i, candidate in enumerate(listed) if candidate in relevant)
        rank = int((scores > best).sum())  # candidates strictly better than the best relevant one
        hits1 += rank == 0
        hits5 += rank < 5
        reciprocal += 1.0 / (rank + 1)
        ndcg += _ndcg(scores, listed, relevant)
        sizes.add(len(listed))
    n = len(task.candidate_lists)
    sizes = sorted(sizes)
    scores = {"hit@1": 100.0 * hits1 / n, "hit@5": 100.0 * hits5 / n, "mrr": 100.0 * reciprocal / n,
              "ndcg_linear@5": 100.0 * ndcg / n}
    return {"task": task.name, "label": task.name, "category": task.category, "modality": task.modality,
            "num_queries": n, "pool_size": sizes[0] if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}",
            "metric": task.metric, "score": scores[task.metric], **scores, "published": {}}


def load_any_task(source, name: str, root, image_root=None, annotations=None, num_frames: int | None = None):
    """The task `name` from its `find_mmeb_tasks` source: an image task file, or an MMEB-V2 task."""
    if isinstance(source, (str, os.PathLike)):
        return load_mmeb_task(source, name, image_root)
    annotations = annotations if annotations is not None else os.path.join(os.fspath(root), "annotations")
    return load_v2_task(source, root, annotations, num_frames)


def default_image_root(root) -> str:
    """Where image paths of the image tasks resolve: `root/images`, else MMEB-V2's `root/image-tasks`, else
    `root`."""
    root = os.fspath(root)
    for folder in ("images", "image-tasks"):
        if os.path.isdir(os.path.join(root, folder)):
            return os.path.join(root, folder)
    return root


def evaluate_mmeb(model, root, tasks: list[str] | None = None, image_root=None, cache_dir=None, batch_size: int = 16,
                  shard_size: int = 1024, show_progress_bar: bool = True, annotations=None,
                  num_frames: int | None = None) -> list[dict] | None:
    """Evaluates `model` on the MMEB tasks under `root` (all, or `tasks`; see `find_mmeb_tasks`), image paths of the
    image tasks relative to `image_root` (default: `default_image_root`), MMEB-V2's annotations under `annotations`
    (default `root/annotations`), videos thinned first to `num_frames` frames (default: as the model thins them).
    Returns one row per task on the main process (`None` on the others, which encode their share of the shards
    under `accelerate launch`)."""
    found = find_mmeb_tasks(root, annotations)
    unknown = [name for name in tasks or [] if name not in found]
    if unknown:
        raise ValueError(f"Unknown MMEB tasks {unknown}; {root} has {sorted(found)}.")
    if image_root is None:
        image_root = default_image_root(root)
    is_main = distributed_state().is_main_process
    results = []
    for name in tasks or list(found):
        task = load_any_task(found[name], name, root, image_root, annotations, num_frames)
        logger.info(f"MMEB {name} ({task.modality}, {task.category}): {len(task.query_items)} queries, "
                    f"{len(task.candidates)} distinct candidates")
        options = dict(batch_size=batch_size, shard_size=shard_size, show_progress_bar=show_progress_bar)
        query_embeddings = encode_cached(model, task.query_items, [f"q{i}" for i in range(len(task.query_items))],
                                         cache_dir, name=f"mmeb_{safe_name(name)}_queries", is_query=True,
                                         instructions=task.query_instructions, **options)
        candidate_embeddings = encode_cached(model, task.candidates, [f"c{i}" for i in range(len(task.candidates))],
                                             cache_dir, name=f"mmeb_{safe_name(name)}_candidates", **options)
        if is_main:
            results.append(score_mmeb(task, query_embeddings, candidate_embeddings))
            logger.info(f"MMEB {name}: {task.metric} = {results[-1]['score']:.1f}")
    return results if is_main else None


def _modality(row: dict) -> str:
    return row.get("modality", "image")


def mmeb_summary(results: list[dict]) -> list[dict]:
    """Average rows, as MMEB-V2's leaderboard averages: one per meta-task present (the mean of its tasks), then, when
    several modalities ran, one per modality (the mean over its tasks, not of its meta-task means), then the overall
    mean over all tasks (MMEB's headline)."""
    rows = []
    for category in [*META_TASKS, "other"]:
        members = [row for row in results if row["category"] == category]
        if members and len(members) < len(results):
            rows.append({**summarize(members), "task": f"average_{category.replace(' ', '_')}",
                         "label": f"{category} ({len(members)} tasks)"})
    present = [modality for modality in MODALITY_CATEGORIES if any(_modality(row) == modality for row in results)]
    if len(present) > 1:
        for modality in present:
            members = [row for row in results if _modality(row) == modality]
            rows.append({**summarize(members), "task": f"average_{modality}", "modality": modality,
                         "label": f"{modality} ({len(members)} tasks)"})
    return rows + [summarize(results)]


def leaderboard_row(results: list[dict]) -> dict[str, float]:
    """`{column: score}` of MMEB-V2's leaderboard columns for the tasks of `results`: "Overall", each modality's
    average ("Image", "Video", "VisDoc") and its meta-tasks' ("I-CLS", ..., "OOD"), those with tasks only."""
    def mean(rows):
        return sum(row["score"] for row in rows) / len(rows)

    columns = {"Overall": mean(results)}
    for modality, categories in MODALITY_CATEGORIES.items():
        members = [row for row in results if _modality(row) == modality]
        if not members:
            continue
        columns[{"image": "Image", "video": "Video", "visdoc": "VisDoc"}[modality]] = mean(members)
        for category, column in categories.items():
            in_category = [row for row in members if row["category"] == category]
            if in_category:
                columns[column] = mean(in_category)
    return columns


def leaderboard_markdown(results: list[dict], model_name: str = "this model",
                         baselines: dict[str, dict] | None = None) -> str:
    """MMEB-V2's leaderboard table: one row per model (this one and each baseline that ran the same tasks), the
    overall, per-modality and per-meta-task scores as columns."""
    columns = leaderboard_row(results)
    rows = [[model_name, *[f"{score:.1f}" for score in columns.values()]]]
    tasks = {row["task"] for row in results}
    for name, data in (baselines or {}).items():
        if {row["task"] for row in data["tasks"]} == tasks:
            theirs = leaderboard_row(data["tasks"])
            rows.append([name, *[f"{theirs[column]:.1f}" for column in columns]])
    return markdown_table(["model", *columns], rows)


def write_mmeb_results(results: list[dict], out_dir, *, baselines: dict[str, dict] | None = None,
                       model_name: str = "this model") -> str:
    """Writes `results_mmeb.md` (the per-task table with meta-task, modality and overall averages, then the
    leaderboard table), `results_mmeb.json` and `plots/mmeb_{task}.png`; returns the markdown.
    `baselines`: other models' results to show beside this one's (`metrics.write_results`)."""
    if not results:
        raise ValueError(f"No MMEB result to write to {out_dir}.")
    *categories, overall = mmeb_summary(results)
    table = write_results(results + categories, out_dir, "results_mmeb", average=overall, columns=_COLUMNS,
                          baselines=baselines, model_name=model_name)
    board = leaderboard_markdown(results, model_name, baselines)
    with open(os.path.join(out_dir, "results_mmeb.md"), "a", encoding="utf-8") as f:
        f.write("\n" + board + "\n")
    return table + "\n\n" + board


__all__ = ["META_TASKS", "MMEB_IMAGE_TASKS", "MMEBTask", "MODALITY_CATEGORIES", "evaluate_mmeb", "find_mmeb_tasks",
           "leaderboard_markdown", "leaderboard_row", "load_any_task", "load_mmeb_task", "missing_v2_parts",
           "mmeb_summary", "score_mmeb", "write_mmeb_results"]

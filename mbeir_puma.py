# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""The M-BEIR file format and the rules that training, evaluation and the Space share: one definition of each.

- the modality vocabulary (`MODALITY_IDS`, `modality_id`, `normalize_modality`, `content_modality`);
- M-BEIR's layout as UniIR published it: query files (`load_mbeir_queries`), candidate pools keyed by `did`
  (`load_mbeir_pool`), `query_instructions.tsv` (`load_query_instructions`), ids `"dataset_id:n"` (`dataset_id`) and
  UniIR's own-dataset-positive rule (`own_dataset_positives`), the evaluation query selection (`mbeir_eval_queries`);
- the generic pair format of a 🤗 dataset mapped by column names (`ColumnMapping`);
- content fingerprints of files and checkpoints (`file_fingerprint`, `checkpoint_fingerprint`), which key caches;
- the markdown table every report writes (`markdown_table`: results, model cards, layer analyses, benchmarks).

This module imports neither torch nor the model: `data_puma` (training), `puma_eval` (evaluation) and the Space
read M-BEIR through it.
"""

import hashlib
import json
import logging
import numbers
import os
import zlib
from collections import Counter, defaultdict

import numpy as np


logger = logging.getLogger(__name__)

# Fixed ids, so modality labels gathered from every rank and every dataset agree.
MODALITY_IDS = {"text": 0, "image": 1, "image,text": 2, "video": 3, "text,video": 4}
UNKNOWN_MODALITY_OFFSET = 1000
# Examples of skipped ids shown per reason in a summary line.
SHOWN_IDS = 5


# ----------------------------------------------------------------------------------------------------------------
# Modality labels
# ----------------------------------------------------------------------------------------------------------------
def normalize_modality(label: str) -> str:
    """The canonical spelling of a modality label: lower case, parts sorted (`"text,image"` -> `"image,text"`)."""
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"A modality label must be a non-empty string, got {label!r}.")
    return ",".join(sorted(part.strip().lower() for part in label.split(",") if part.strip()))


def modality_id(label: str) -> int:
    """The id of a modality label: `MODALITY_IDS` for known labels, else a stable id >= 1000 from the label's CRC32.

    The CRC32 of the canonical label is the same in every process (unlike `hash`), so ids of labels gathered across
    ranks agree.
    """
    label = normalize_modality(label)
    if label in MODALITY_IDS:
        return MODALITY_IDS[label]
    return UNKNOWN_MODALITY_OFFSET + zlib.crc32(label.encode("utf-8"))


def content_modality(text: str | None, image, video=None) -> str | None:
    """`"text"`, `"image"`, `"video"`, `"image,text"` or `"text,video"` for an input with that content (a video
    wins over an image); `None` when it has neither."""
    visual = "video" if video is not None else "image" if image is not None else None
    if visual is not None:
        return normalize_modality(f"{visual},text") if text else visual
    return "text" if text else None


def media_side(text: str | None, image, video=None) -> dict:
    """An input as the datasets and evaluation hand it over: `{"text", "image"}`, with `"video"` only when there is
    one (so that the items of text and image data stay as they were)."""
    return {"text": text, "image": image, **({"video": video} if video is not None else {})}


# ----------------------------------------------------------------------------------------------------------------
# Rules shared by training and evaluation (one definition each)
# ----------------------------------------------------------------------------------------------------------------
def dataset_id(item_id: str) -> str:
    """The M-BEIR dataset id of a query or candidate id: `"9:1234"` -> `"9"`."""
    return str(item_id).split(":")[0]


def join_path(root, path: str | None) -> str | None:
    """`path` resolved against `root`; `None` and an absent root leave it as it is."""
    if path is None or root is None:
        return path
    return os.path.join(root, path)


def require_file(path, what: str) -> str:
    """`path`, or `FileNotFoundError` naming `what` when it is not a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} does not exist.")
    return os.fspath(path)


def repeated_ids(ids: list[str]) -> list[str]:
    """The ids that occur more than once in `ids`, sorted."""
    return sorted(item for item, count in Counter(ids).items() if count > 1)


def own_dataset_positives(qid: str, positives: list[str]) -> list[str]:
    """The positives that must be in the pool: those of the query's own dataset, or all when it has none there.

    OVEN and InfoSeek queries list positives of the other dataset too, which a task's pool may lack (UniIR's rule).
    """
    own = [did for did in positives if dataset_id(did) == dataset_id(qid)]
    return own or list(positives)


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints (what keys a cache)
# ----------------------------------------------------------------------------------------------------------------
def file_fingerprint(path, blocks: int = 64, block_size: int = 4096) -> str:
    """SHA-256 of a file's size and content: the whole file up to `blocks * block_size` bytes, else `blocks` evenly
    spaced blocks of it (a retrained checkpoint keeps every file size, and hashing gigabytes would take minutes)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(f"size={size}".encode())
    with open(path, "rb") as f:
        if size <= blocks * block_size:
            digest.update(f.read())
        else:
            for i in range(blocks):
                f.seek((size - block_size) * i // (blocks - 1))
                digest.update(f.read(block_size))
    return digest.hexdigest()


def checkpoint_fingerprint(name: str) -> dict[str, str]:
    """What identifies a checkpoint's weights: `{file: file_fingerprint}` of `config.json` and every safetensors file
    of a local folder; a Hub repository id stands for itself (pin `revision` for reproducible caches)."""
    name = os.fspath(name)
    if not os.path.isdir(name):
        return {"name": name}
    files = ["config.json"] + sorted(f for f in os.listdir(name) if f.endswith(".safetensors"))
    return {f: file_fingerprint(os.path.join(name, f)) for f in files if os.path.isfile(os.path.join(name, f))}


# ----------------------------------------------------------------------------------------------------------------
# M-BEIR files
# ----------------------------------------------------------------------------------------------------------------
def read_jsonl(path) -> list[dict]:
    """The JSON objects of a JSON-lines file, one per non-empty line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {line_number}: invalid JSON ({err.msg} at column {err.colno})."
                ) from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}.")
            records.append(record)
    return records


def _optional_str(value) -> str | None:
    """M-BEIR writes absent text and image paths as `null` or `""`; both become `None`."""
    if value is None:
        return None
    value = str(value)
    return value if value.strip() else None


def _id_list(value, path, line_number: int, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{path}, record {line_number}: {field} must be a list of ids, got {type(value).__name__}.")
    return [str(item) for item in value]


def load_mbeir_queries(path) -> list[dict]:
    """M-BEIR query records: `qid` (`"dataset_id:n"`), `query_txt`, `query_img_path`, `query_video_path` (this
    project's addition: a video file), `query_modality`, `pos_cand_list`, `neg_cand_list`, `task_id`.

    Absent text, image or video is `None`; a missing `query_modality` is derived from the content; ids are strings.
    An image path may name a PDF page (`doc.pdf#page=2`).
    """
    queries = []
    for line_number, record in enumerate(read_jsonl(path), 1):
        if record.get("qid") in (None, ""):
            raise ValueError(f"{path}, record {line_number}: missing 'qid'.")
        text, image = _optional_str(record.get("query_txt")), _optional_str(record.get("query_img_path"))
        video = _optional_str(record.get("query_video_path"))
        modality = record.get("query_modality") or content_modality(text, image, video)
        if modality is None:
            raise ValueError(
                f"{path}, record {line_number} (qid {record['qid']}): neither query_txt, query_img_path nor "
                "query_video_path."
            )
        if image is not None and video is not None:
            raise ValueError(f"{path}, record {line_number} (qid {record['qid']}): both query_img_path and "
                             "query_video_path; a query holds one of them.")
        task_id = record.get("task_id")
        queries.append({
            "qid": str(record["qid"]),
            "query_txt": text,
            "query_img_path": image,
            "query_video_path": video,
            "query_modality": normalize_modality(modality),
            "pos_cand_list": _id_list(record.get("pos_cand_list"), path, line_number, "pos_cand_list"),
            "neg_cand_list": _id_list(record.get("neg_cand_list"), path, line_number, "neg_cand_list"),
            "task_id": int(task_id) if task_id is not None else None,
        })
    duplicates = repeated_ids([query["qid"] for query in queries])
    if duplicates:
        raise ValueError(f"{path} has {len(duplicates)} duplicate qids, e.g. {duplicates[:SHOWN_IDS]}; "
                         "query ids must be unique (they key qrels and caches).")
    return queries


def load_mbeir_pool(path) -> dict[str, dict]:
    """M-BEIR candidate records keyed by `did`: `did`, `txt`, `img_path` (an image, or a PDF page
    `doc.pdf#page=2`), `video_path` (this project's addition: a video file), `modality`."""
    pool, duplicates = {}, []
    for line_number, record in enumerate(read_jsonl(path), 1):
        did = record.get("did")
        if did in (None, ""):
            raise ValueError(f"{path}, record {line_number}: missing 'did'.")
        did = str(did)
        text, image = _optional_str(record.get("txt")), _optional_str(record.get("img_path"))
        video = _optional_str(record.get("video_path"))
        modality = record.get("modality") or content_modality(text, image, video)
        if modality is None:
            raise ValueError(f"{path}, record {line_number} (did {did}): neither txt, img_path nor video_path.")
        if image is not None and video is not None:
            raise ValueError(f"{path}, record {line_number} (did {did}): both img_path and video_path; a candidate "
                             "holds one of them.")
        if did in pool:
            duplicates.append(did)
        pool[did] = {"did": did, "txt": text, "img_path": image, "video_path": video,
                     "modality": normalize_modality(modality)}
    if duplicates:
        raise ValueError(f"{path} has {len(duplicates)} duplicate candidate ids (did), e.g. "
                         f"{sorted(set(duplicates))[:SHOWN_IDS]}.")
    return pool


def load_query_instructions(path) -> dict[tuple[str, str, str], list[str]]:
    """Instructions of M-BEIR's `query_instructions.tsv`, keyed by `(dataset_id, query_modality, cand_modality)`.

    After a header line, each line holds: query modality, candidate modality, dataset name, dataset id, then one or
    more instructions (tab-separated; empty cells are ignored), as UniIR reads it.
    """
    instructions = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for line_number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.strip().split("\t")
        prompts = [p.strip() for p in parts[4:] if p.strip()]
        if len(parts) < 5 or not prompts:
            raise ValueError(f"{path}, line {line_number}: expected query modality, candidate modality, dataset name, "
                             f"dataset id and at least one instruction, separated by tabs; got {parts!r}.")
        key = (parts[3].strip(), normalize_modality(parts[0]), normalize_modality(parts[1]))
        instructions[key] = prompts
    return instructions




# ----------------------------------------------------------------------------------------------------------------
# Evaluation queries
# ----------------------------------------------------------------------------------------------------------------
class SkipLog:
    """Counts skipped items per reason, with a few example ids, for one summary log line."""

    def __init__(self):
        self.ids = defaultdict(list)

    def add(self, reason: str, item_id: str) -> None:
        self.ids[reason].append(item_id)

    def summary(self) -> str:
        return "; ".join(f"{len(ids)} {reason} (e.g. {', '.join(ids[:SHOWN_IDS])})"
                         for reason, ids in self.ids.items())

    def __bool__(self) -> bool:
        return bool(self.ids)



def mbeir_eval_queries(queries: list[dict], pool: dict[str, dict], instructions: dict, seed: int = 0) -> list[dict]:
    """Evaluation queries with one fixed instruction each, drawn deterministically from `(seed, qid)`.

    The target modality is that of the first positive in `pool` from the query's own dataset (UniIR's rule for
    OVEN/InfoSeek, whose positives may come from the other dataset), else of its first positive in `pool`.
    Queries with no positive in `pool` or no instruction for their key get `instruction=None`, counted and logged.

    Returns one dict per query: `query_id` (the qid), `query` (`{"text", "image"}`, the image path as in the file),
    `instruction`, `modality` (target), `query_modality`, `task_id`, `pos_cand_list`.
    """
    missing = SkipLog()
    items = []
    for query in queries:
        qid = query["qid"]
        in_pool = [did for did in query["pos_cand_list"] if did in pool]
        target = pool[own_dataset_positives(qid, in_pool)[0]]["modality"] if in_pool else None
        prompts = instructions.get((dataset_id(qid), query["query_modality"], target)) if target else None
        instruction = None
        if not target:
            missing.add("queries with no positive in the pool", qid)
        elif not prompts:
            missing.add("queries with no instruction for their key", qid)
        else:
            rng = np.random.default_rng([seed, zlib.crc32(qid.encode("utf-8"))])
            instruction = prompts[int(rng.integers(len(prompts)))]
        items.append({
            "query_id": qid,
            "query": media_side(query["query_txt"], query["query_img_path"], query.get("query_video_path")),
            "instruction": instruction,
            "modality": target,
            "query_modality": query["query_modality"],
            "task_id": query["task_id"],
            "pos_cand_list": list(query["pos_cand_list"]),
        })
    if missing:
        logger.warning(f"{len(items)} evaluation queries; without instruction: {missing.summary()}.")
    return items


# ----------------------------------------------------------------------------------------------------------------
# A 🤗 dataset's rows as (query, positive, negatives) pairs, mapped by column names
# ----------------------------------------------------------------------------------------------------------------
class ColumnMapping:
    """Maps rows of a 🤗 dataset to examples (the dict every PUMA dataset yields) through named columns.

    Args:
        query_text, query_image, positive_text, positive_image: column names; at least one query and one positive
            column are required.
        negative_text, negative_image: columns of one hard negative per row, or of a list of them.
        query_video, positive_video, negative_video: video columns (paths, frame lists, or a 🤗 `Video` column's
            decoders or `{"path", "bytes"}` dicts), in place of the image columns of a side.
        id_column: column of a row id; the query id is the id, candidate ids append `:pos` / `:neg{j}`. Without
            it the id is the row's position.
        modality_column: column of the positive's modality (default: derived from which positive columns are
            non-empty in the row).
        image_root: folder that relative image paths in image columns are relative to.

    Image columns may hold paths, `PIL.Image`s or `{"bytes", "path"}` dicts (an undecoded `Image` feature).
    """

    def __init__(self, query_text: str | None = None, query_image: str | None = None,
                 positive_text: str | None = None, positive_image: str | None = None,
                 negative_text: str | None = None, negative_image: str | None = None, id_column: str | None = None,
                 modality_column: str | None = None, image_root=None, query_video: str | None = None,
                 positive_video: str | None = None, negative_video: str | None = None):
        if query_text is None and query_image is None and query_video is None:
            raise ValueError("A column mapping needs a query column: pass query_text and/or query_image or "
                             "query_video.")
        if positive_text is None and positive_image is None and positive_video is None:
            raise ValueError("A column mapping needs a positive column: pass positive_text and/or positive_image or "
                             "positive_video.")
        for side, image, video in (("query", query_image, query_video), ("positive", positive_image, positive_video),
                                   ("negative", negative_image, negative_video)):
            if image is not None and video is not None:
                raise ValueError(f"Pass {side}_image or {side}_video, not both: an input holds one of them.")
        self.columns = {"query_text": query_text, "query_image": query_image, "positive_text": positive_text,
                        "positive_image": positive_image, "negative_text": negative_text,
                        "negative_image": negative_image, "id_column": id_column, "modality_column": modality_column,
                        "query_video": query_video, "positive_video": positive_video,
                        "negative_video": negative_video}
        self.image_root = image_root

    def check_columns(self, available) -> None:
        """Raises `ValueError` naming the mapped columns that `available` lacks."""
        missing = {arg: name for arg, name in self.columns.items() if name is not None and name not in available}
        if missing:
            raise ValueError(f"Columns {missing} are not in the dataset, whose columns are {list(available)}.")

    def _side(self, row: dict, text_column: str | None, image_column: str | None,
              video_column: str | None = None) -> dict:
        text = row[text_column] if text_column is not None else None
        image = row[image_column] if image_column is not None else None
        video = row[video_column] if video_column is not None else None
        return media_side(text if isinstance(text, str) and text.strip() else None, self._image(image),
                          self._image(video))

    def _image(self, image):
        if isinstance(image, str):
            return join_path(self.image_root, image) if image.strip() else None
        return image

    def _negatives(self, row: dict, row_id: str) -> list[dict]:
        text_column, video_column = self.columns["negative_text"], self.columns["negative_video"]
        visual_column = video_column or self.columns["negative_image"]
        texts = row[text_column] if text_column is not None else None
        visuals = row[visual_column] if visual_column is not None else None
        several = isinstance(texts, list) or (isinstance(visuals, list)
                                              and (video_column is None or _is_list_of_videos(visuals)))

        def negative(text, visual) -> dict:
            text = text if isinstance(text, str) and text.strip() else None
            visual = self._image(visual)
            return media_side(text, None, visual) if video_column else media_side(text, visual)

        if not several:
            side = negative(texts, visuals)
            return [side] if any(side.get(key) is not None for key in ("text", "image", "video")) else []
        count = len(texts if isinstance(texts, list) else visuals)
        texts = texts if isinstance(texts, list) else [texts] * count
        if not (isinstance(visuals, list) and (video_column is None or _is_list_of_videos(visuals))):
            visuals = [visuals] * count  # one visual (or none) for every negative text
        if len(texts) != len(visuals):
            raise ValueError(f"Row {row_id}: {len(texts)} negative texts but {len(visuals)} negative "
                             f"{'videos' if video_column else 'images'}.")
        return [negative(text, visual) for text, visual in zip(texts, visuals)]

    def example(self, row: dict, position) -> dict:
        """The example of `row`, whose id is its id column's value or else `position`."""
        id_column, modality_column = self.columns["id_column"], self.columns["modality_column"]
        row_id = str(row[id_column]) if id_column is not None else str(position)
        positive = self._side(row, self.columns["positive_text"], self.columns["positive_image"],
                              self.columns["positive_video"])
        negatives = self._negatives(row, row_id)
        if modality_column is not None and row[modality_column]:
            modality = normalize_modality(row[modality_column])
        else:
            modality = content_modality(positive["text"], positive["image"], positive.get("video"))
        return {
            "query": self._side(row, self.columns["query_text"], self.columns["query_image"],
                                self.columns["query_video"]),
            "instruction": None,
            "query_id": row_id,
            "positive": positive,
            "positive_id": f"{row_id}:pos",
            "modality": modality,
            "negatives": negatives,
            "negative_ids": [f"{row_id}:neg{j}" for j in range(len(negatives))],
            "negative_modalities": [content_modality(n["text"], n["image"], n.get("video")) for n in negatives],
        }


def _is_list_of_videos(value: list) -> bool:
    """Whether a negative video column's list holds several videos (paths, dicts, decoders) rather than the frames
    of one (images or arrays)."""
    return bool(value) and all(isinstance(item, (str, dict)) or hasattr(item, "get_frames_at") for item in value)


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------
ALIGNMENTS = {None: "---", "left": ":---", "center": ":---:", "right": "---:"}


def markdown_table(headers: list, rows: list[list], align: list[str | None] | None = None,
                   float_format: str = ".3g") -> str:
    """A GitHub-flavoured markdown table: one header row, the separator, one line per row; no trailing newline.

    Cells are written with `str`, real non-integer numbers (numpy's too) with `float_format`, `None` as an empty
    cell; a `|` inside a cell is escaped. `align` gives each column `"left"`, `"center"`, `"right"` or `None` (the renderer's default).

        >>> print(markdown_table(["task", "R@5"], [["WebQA", 81.25], ["OVEN", None]], align=[None, "right"]))
        | task | R@5 |
        |---|---:|
        | WebQA | 81.2 |
        | OVEN |  |
    """
    align = [None] * len(headers) if align is None else list(align)
    if len(align) != len(headers) or any(a not in ALIGNMENTS for a in align):
        raise ValueError(f"align must give one of {list(ALIGNMENTS)} per column ({len(headers)}), got {align!r}.")

    def line(cells) -> str:
        text = ["" if c is None else format(c, float_format) if isinstance(c, numbers.Real)
                and not isinstance(c, numbers.Integral) else str(c) for c in cells]
        return "| " + " | ".join(t.replace("|", "\\|") for t in text) + " |"

    lines = [line(headers), "|" + "".join(ALIGNMENTS[a] + "|" for a in align)]
    for number, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"Row {number} of the table has {len(row)} cells for {len(headers)} columns "
                             f"{list(headers)}: {list(row)!r}.")
        lines.append(line(row))
    return "\n".join(lines)


__all__ = ["MODALITY_IDS", "SHOWN_IDS", "ColumnMapping", "SkipLog", "checkpoint_fingerprint", "content_modality",
           "dataset_id", "file_fingerprint", "join_path", "load_mbeir_pool", "load_mbeir_queries",
           "load_query_instructions", "markdown_table", "mbeir_eval_queries", "media_side", "modality_id",
           "normalize_modality",
           "own_dataset_positives", "read_jsonl", "repeated_ids", "require_file"]

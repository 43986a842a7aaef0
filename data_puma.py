# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""PUMA training data: M-BEIR, NLI and column-mapped 🤗 datasets as examples, and the collator that turns examples
into model inputs.

Every dataset yields the same plain dict per example:

    {"query": {"text": str | None, "image": path | PIL.Image | None}, "instruction": str | None, "query_id": str,
     "positive": {"text", "image"}, "positive_id": str, "modality": str,
     "negatives": [{"text", "image"}, ...], "negative_ids": [str, ...], "negative_modalities": [str, ...]}

`modality` is the target modality (the positive's); `query_id` identifies the exact query input, instruction
included, so per-id caches (teacher embeddings) stay correct. [`PumaCollator`] builds the prompts with the model's
own `build_prompt`, runs the processor and returns modality ids from [`MODALITY_IDS`].

M-BEIR is read in the format UniIR published (query files, candidate pools keyed by `did`, `query_instructions.tsv`);
`make_demo_data.py` writes a small benchmark in the same format.
"""

import csv
import hashlib
import io
import json
import logging
import os
import zlib
from collections import Counter, defaultdict

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from modeling_puma import build_prompt, featurize, load_image


logger = logging.getLogger(__name__)

# Fixed ids, so modality labels gathered from every rank and every dataset agree.
MODALITY_IDS = {"text": 0, "image": 1, "image,text": 2, "video": 3}
UNKNOWN_MODALITY_OFFSET = 1000
# Progress bars for start-up scans only where they take noticeable time.
_PROGRESS_MIN_ITEMS = 10_000
# Examples of skipped ids shown per reason in a summary line.
_SHOWN_IDS = 5


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


def content_modality(text: str | None, image) -> str | None:
    """`"text"`, `"image"` or `"image,text"` for an input with that content; `None` when it has neither."""
    if image is not None and text:
        return "image,text"
    if image is not None:
        return "image"
    return "text" if text else None


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


def repeated_ids(ids: list[str]) -> list[str]:
    """The ids that occur more than once in `ids`, sorted."""
    return sorted(item for item, count in Counter(ids).items() if count > 1)


def own_dataset_positives(qid: str, positives: list[str]) -> list[str]:
    """The positives that must be in the pool: those of the query's own dataset, or all when it has none there.

    OVEN and InfoSeek queries list positives of the other dataset too, which a task's pool may lack (UniIR's rule).
    """
    own = [did for did in positives if dataset_id(did) == dataset_id(qid)]
    return own or list(positives)


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
    """M-BEIR query records: `qid` (`"dataset_id:n"`), `query_txt`, `query_img_path`, `query_modality`,
    `pos_cand_list`, `neg_cand_list`, `task_id`.

    Absent text or image is `None`; a missing `query_modality` is derived from the content; ids are strings.
    """
    queries = []
    for line_number, record in enumerate(read_jsonl(path), 1):
        if record.get("qid") in (None, ""):
            raise ValueError(f"{path}, record {line_number}: missing 'qid'.")
        text, image = _optional_str(record.get("query_txt")), _optional_str(record.get("query_img_path"))
        modality = record.get("query_modality") or content_modality(text, image)
        if modality is None:
            raise ValueError(
                f"{path}, record {line_number} (qid {record['qid']}): neither query_txt nor query_img_path."
            )
        task_id = record.get("task_id")
        queries.append({
            "qid": str(record["qid"]),
            "query_txt": text,
            "query_img_path": image,
            "query_modality": normalize_modality(modality),
            "pos_cand_list": _id_list(record.get("pos_cand_list"), path, line_number, "pos_cand_list"),
            "neg_cand_list": _id_list(record.get("neg_cand_list"), path, line_number, "neg_cand_list"),
            "task_id": int(task_id) if task_id is not None else None,
        })
    duplicates = repeated_ids([query["qid"] for query in queries])
    if duplicates:
        raise ValueError(f"{path} has {len(duplicates)} duplicate qids, e.g. {duplicates[:_SHOWN_IDS]}; "
                         "query ids must be unique (they key qrels and caches).")
    return queries


def load_mbeir_pool(path) -> dict[str, dict]:
    """M-BEIR candidate records keyed by `did`: `did`, `txt`, `img_path`, `modality`."""
    pool, duplicates = {}, []
    for line_number, record in enumerate(read_jsonl(path), 1):
        did = record.get("did")
        if did in (None, ""):
            raise ValueError(f"{path}, record {line_number}: missing 'did'.")
        did = str(did)
        text, image = _optional_str(record.get("txt")), _optional_str(record.get("img_path"))
        modality = record.get("modality") or content_modality(text, image)
        if modality is None:
            raise ValueError(f"{path}, record {line_number} (did {did}): neither txt nor img_path.")
        if did in pool:
            duplicates.append(did)
        pool[did] = {"did": did, "txt": text, "img_path": image, "modality": normalize_modality(modality)}
    if duplicates:
        raise ValueError(f"{path} has {len(duplicates)} duplicate candidate ids (did), e.g. "
                         f"{sorted(set(duplicates))[:_SHOWN_IDS]}.")
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


def _candidate_input(candidate: dict, image_root) -> dict:
    return {"text": candidate["txt"], "image": join_path(image_root, candidate["img_path"])}


class _SkipLog:
    """Counts skipped items per reason, with a few example ids, for one summary log line."""

    def __init__(self):
        self.ids = defaultdict(list)

    def add(self, reason: str, item_id: str) -> None:
        self.ids[reason].append(item_id)

    def summary(self) -> str:
        return "; ".join(f"{len(ids)} {reason} (e.g. {', '.join(ids[:_SHOWN_IDS])})"
                         for reason, ids in self.ids.items())

    def __bool__(self) -> bool:
        return bool(self.ids)


class MBEIRTrainDataset(Dataset):
    """M-BEIR training queries, each paired per epoch with a drawn positive, instruction and hard negatives.

    Every epoch (see `set_epoch`) each query draws one positive from its `pos_cand_list`; the example's target
    modality is that candidate's modality. It then draws one instruction for (dataset id, query modality, target
    modality) and, with `num_hard_negatives > 0`, that many hard negatives from its `neg_cand_list` (without
    replacement while they last, then with replacement). Draws depend only on `(seed, epoch, index)`, so a resumed run
    sees the same examples. Instructions go on queries only.

    Start-up validation: candidate ids absent from the pool, candidates whose image file is missing, and positives
    with no instruction for their key are dropped from a query's lists; queries left without a positive (or, with
    `num_hard_negatives > 0`, without a hard negative) and queries whose image file is missing are skipped. Drops
    and skips are counted and logged in one summary line; a `ValueError` is raised only when every query is skipped.

    Args:
        query_file: M-BEIR query JSON-lines file (e.g. `query/union_train/mbeir_union_up_train.jsonl`).
        pool_file: candidate pool JSON-lines file holding every candidate the queries name (e.g.
            `cand_pool/global/mbeir_union_train_cand_pool.jsonl`).
        instructions_file: `query_instructions.tsv`.
        image_root: folder that `query_img_path` and `img_path` are relative to (the M-BEIR root).
        num_hard_negatives: hard negatives per example (0: none).
        seed: seed of the draws (a non-negative integer).
        check_images: check at start-up that every image file exists (turn off to start faster on a trusted copy).
    """

    def __init__(self, query_file, pool_file, instructions_file, image_root, num_hard_negatives: int = 0,
                 seed: int = 0, check_images: bool = True):
        if isinstance(num_hard_negatives, bool) or not isinstance(num_hard_negatives, int) or num_hard_negatives < 0:
            raise ValueError(f"num_hard_negatives must be a non-negative integer, got {num_hard_negatives!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        self.query_file = str(query_file)
        self.image_root = image_root
        self.num_hard_negatives = num_hard_negatives
        self.seed = seed
        self.epoch = 0
        self.pool = load_mbeir_pool(pool_file)
        self.instructions = load_query_instructions(instructions_file)
        self.check_images = check_images
        self._image_exists = {}
        self.examples = self._validate(load_mbeir_queries(query_file))

    def _has_image(self, path: str | None) -> bool:
        if path is None or not self.check_images:
            return True
        if path not in self._image_exists:
            self._image_exists[path] = os.path.isfile(path)
        return self._image_exists[path]

    def _usable_candidates(self, ids: list[str], kind: str, dropped: _SkipLog) -> list[str]:
        usable = []
        for did in ids:
            candidate = self.pool.get(did)
            if candidate is None:
                dropped.add(f"{kind} ids absent from the pool", did)
            elif not self._has_image(join_path(self.image_root, candidate["img_path"])):
                dropped.add(f"{kind}s whose image file is missing", did)
            else:
                usable.append(did)
        return usable

    def _validate(self, queries: list[dict]) -> list[tuple]:
        """Keeps the usable queries as `(qid, text, image, query_modality, positives, negatives)` tuples."""
        skipped, dropped = _SkipLog(), _SkipLog()
        examples = []
        for query in tqdm(queries, desc="Checking M-BEIR queries", disable=len(queries) < _PROGRESS_MIN_ITEMS):
            qid = query["qid"]
            image = join_path(self.image_root, query["query_img_path"])
            if not self._has_image(image):
                skipped.add("queries whose image file is missing", qid)
                continue
            positives = []
            for did in self._usable_candidates(query["pos_cand_list"], "positive", dropped):
                key = (dataset_id(qid), query["query_modality"], self.pool[did]["modality"])
                if key in self.instructions:
                    positives.append(did)
                else:
                    dropped.add("positives with no instruction for (dataset id, query modality, candidate modality)",
                                f"{qid}->{did} {key}")
            if not positives:
                skipped.add("queries without a usable positive", qid)
                continue
            negatives = []
            if self.num_hard_negatives > 0:  # negatives are unused otherwise, so not checked
                negatives = self._usable_candidates(query["neg_cand_list"], "negative", dropped)
                if not negatives:
                    skipped.add("queries without a usable hard negative", qid)
                    continue
            examples.append((qid, query["query_txt"], image, query["query_modality"], tuple(positives),
                             tuple(negatives)))
        if skipped or dropped:
            logger.warning(
                f"{self.query_file}: kept {len(examples)} of {len(queries)} queries. "
                + (f"Skipped: {skipped.summary()}. " if skipped else "")
                + (f"Dropped candidate references: {dropped.summary()}." if dropped else "")
            )
        if not examples:
            raise ValueError(f"{self.query_file}: every one of its {len(queries)} queries was skipped "
                             f"({skipped.summary()}); check the pool, instructions and image_root {self.image_root!r}.")
        return examples

    def set_epoch(self, epoch: int) -> None:
        """Selects the draws of `epoch`; call it before each epoch's DataLoader iterator is created.

        accelerate's DataLoader forwards its `set_epoch` to the dataset only when its sampler has none, which is not
        the case under the Trainer's default seedable sampler: call this from a callback's `on_epoch_begin`.
        DataLoader workers hold a copy of the dataset: with `persistent_workers=True` they keep the epoch they
        started with, so leave persistent workers off.
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        qid, text, image, query_modality, positives, negatives = self.examples[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        positive_id = positives[int(rng.integers(len(positives)))]
        positive = self.pool[positive_id]
        prompts = self.instructions[(dataset_id(qid), query_modality, positive["modality"])]
        instruction_index = int(rng.integers(len(prompts)))
        negative_ids = [negatives[i] for i in _draw_indices(rng, len(negatives), self.num_hard_negatives)]
        return {
            "query": {"text": text, "image": image},
            "instruction": prompts[instruction_index],
            "query_id": f"{qid}#i{instruction_index}",
            "positive": _candidate_input(positive, self.image_root),
            "positive_id": positive_id,
            "modality": positive["modality"],
            "negatives": [_candidate_input(self.pool[did], self.image_root) for did in negative_ids],
            "negative_ids": negative_ids,
            "negative_modalities": [self.pool[did]["modality"] for did in negative_ids],
        }


def _draw_indices(rng: np.random.Generator, available: int, wanted: int) -> list[int]:
    """`wanted` indices below `available`: distinct while they last, the shortfall drawn with replacement."""
    if wanted == 0:
        return []
    order = rng.permutation(available)[:wanted].tolist()
    return order + rng.integers(available, size=wanted - len(order)).tolist()


def mbeir_eval_queries(queries: list[dict], pool: dict[str, dict], instructions: dict, seed: int = 0) -> list[dict]:
    """Evaluation queries with one fixed instruction each, drawn deterministically from `(seed, qid)`.

    The target modality is that of the first positive in `pool` from the query's own dataset (UniIR's rule for
    OVEN/InfoSeek, whose positives may come from the other dataset), else of its first positive in `pool`.
    Queries with no positive in `pool` or no instruction for their key get `instruction=None`, counted and logged.

    Returns one dict per query: `query_id` (the qid), `query` (`{"text", "image"}`, the image path as in the file),
    `instruction`, `modality` (target), `query_modality`, `task_id`, `pos_cand_list`.
    """
    missing = _SkipLog()
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
            "query": {"text": query["query_txt"], "image": query["query_img_path"]},
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
# NLI (stage 1)
# ----------------------------------------------------------------------------------------------------------------
class NLIDataset(Dataset):
    """SimCSE's NLI triplets (`nli_for_simcse.csv`: `sent0`, `sent1`, `hard_neg`) as text-to-text examples.

    `sent0` is the query, `sent1` the positive and `hard_neg` the optional hard negative; ids come from the data row
    number (`nli:{row}`, `nli:{row}:sent1`, `nli:{row}:hard_neg`). Rows with an empty field that is used are counted,
    logged and skipped.
    """

    def __init__(self, csv_path, use_hard_negatives: bool = True):
        self.csv_path = str(csv_path)
        self.use_hard_negatives = use_hard_negatives
        columns = ["sent0", "sent1"] + (["hard_neg"] if use_hard_negatives else [])
        self.rows = []
        skipped = _SkipLog()
        with open(csv_path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            absent = [c for c in columns if c not in (reader.fieldnames or [])]
            if absent:
                raise ValueError(f"{csv_path} lacks the columns {absent}; its columns are {reader.fieldnames}.")
            for row_number, row in enumerate(reader):
                fields = tuple((row.get(c) or "").strip() for c in columns)
                if not all(fields):
                    skipped.add("rows with an empty field", f"row {row_number}")
                    continue
                self.rows.append((row_number,) + fields)
        if skipped:
            logger.warning(f"{csv_path}: kept {len(self.rows)} rows. Skipped: {skipped.summary()}.")
        if not self.rows:
            raise ValueError(f"{csv_path} holds no usable row with {columns} filled in.")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row_number, sent0, sent1, *hard_neg = self.rows[index]
        return {
            "query": {"text": sent0, "image": None},
            "instruction": None,
            "query_id": f"nli:{row_number}",
            "positive": {"text": sent1, "image": None},
            "positive_id": f"nli:{row_number}:sent1",
            "modality": "text",
            "negatives": [{"text": text, "image": None} for text in hard_neg],
            "negative_ids": [f"nli:{row_number}:hard_neg" for _ in hard_neg],
            "negative_modalities": ["text" for _ in hard_neg],
        }


# ----------------------------------------------------------------------------------------------------------------
# Any 🤗 dataset, mapped by column names
# ----------------------------------------------------------------------------------------------------------------
class ColumnPairDataset(Dataset):
    """Examples from a 🤗 `datasets.Dataset` whose columns are named in the arguments.

    A streaming `datasets.IterableDataset` gives an [`IterableColumnPairDataset`] (a torch `IterableDataset`).

    Args:
        dataset: the 🤗 dataset.
        query_text, query_image, positive_text, positive_image: column names; at least one query and one positive
            column are required.
        negative_text, negative_image: columns of one hard negative per row, or of a list of them.
        id_column: column of a row id; the query id is the id, candidate ids append `:pos` / `:neg{j}`. Without
            it the id is the row index, or for a stream the position in what this rank and worker read (unique
            within a run, but not stable across runs: name an id column where ids key a cache).
        modality_column: column of the positive's modality (default: derived from which positive columns are
            non-empty in the row).
        image_root: folder that relative image paths in image columns are relative to.

    Image columns may hold paths, `PIL.Image`s or `{"bytes", "path"}` dicts (an undecoded `Image` feature). A row
    whose query or positive is empty reaches the collator, which counts, logs and skips it.
    """

    def __new__(cls, dataset=None, *args, **kwargs):
        if cls is ColumnPairDataset and _is_streaming(dataset):
            cls = IterableColumnPairDataset
        return super().__new__(cls)

    def __init__(self, dataset, query_text: str | None = None, query_image: str | None = None,
                 positive_text: str | None = None, positive_image: str | None = None,
                 negative_text: str | None = None, negative_image: str | None = None, id_column: str | None = None,
                 modality_column: str | None = None, image_root=None):
        if query_text is None and query_image is None:
            raise ValueError("ColumnPairDataset needs a query column: pass query_text and/or query_image.")
        if positive_text is None and positive_image is None:
            raise ValueError("ColumnPairDataset needs a positive column: pass positive_text and/or positive_image.")
        self.dataset = dataset
        self.columns = {"query_text": query_text, "query_image": query_image, "positive_text": positive_text,
                        "positive_image": positive_image, "negative_text": negative_text,
                        "negative_image": negative_image, "id_column": id_column, "modality_column": modality_column}
        self.image_root = image_root
        if getattr(dataset, "column_names", None) is not None:
            self._check_columns(dataset.column_names)

    def _check_columns(self, available) -> None:
        missing = {arg: name for arg, name in self.columns.items() if name is not None and name not in available}
        if missing:
            raise ValueError(f"Columns {missing} are not in the dataset, whose columns are {list(available)}.")

    def _side(self, row: dict, text_column: str | None, image_column: str | None) -> dict:
        text = row[text_column] if text_column is not None else None
        image = row[image_column] if image_column is not None else None
        return {"text": text if isinstance(text, str) and text.strip() else None, "image": self._image(image)}

    def _image(self, image):
        if isinstance(image, str):
            return join_path(self.image_root, image) if image.strip() else None
        return image

    def _negatives(self, row: dict, row_id: str) -> list[dict]:
        text_column, image_column = self.columns["negative_text"], self.columns["negative_image"]
        texts = row[text_column] if text_column is not None else None
        images = row[image_column] if image_column is not None else None
        if not isinstance(texts, list) and not isinstance(images, list):
            negative = self._side(row, text_column, image_column)
            return [negative] if negative["text"] is not None or negative["image"] is not None else []
        count = len(texts if isinstance(texts, list) else images)
        texts = texts if isinstance(texts, list) else [texts] * count
        images = images if isinstance(images, list) else [images] * count
        if len(texts) != len(images):
            raise ValueError(f"Row {row_id}: {len(texts)} negative texts but {len(images)} negative images.")
        return [{"text": t if isinstance(t, str) and t.strip() else None, "image": self._image(i)}
                for t, i in zip(texts, images)]

    def _example(self, row: dict, position) -> dict:
        id_column, modality_column = self.columns["id_column"], self.columns["modality_column"]
        row_id = str(row[id_column]) if id_column is not None else str(position)
        positive = self._side(row, self.columns["positive_text"], self.columns["positive_image"])
        negatives = self._negatives(row, row_id)
        if modality_column is not None and row[modality_column]:
            modality = normalize_modality(row[modality_column])
        else:
            modality = content_modality(positive["text"], positive["image"])
        return {
            "query": self._side(row, self.columns["query_text"], self.columns["query_image"]),
            "instruction": None,
            "query_id": row_id,
            "positive": positive,
            "positive_id": f"{row_id}:pos",
            "modality": modality,
            "negatives": negatives,
            "negative_ids": [f"{row_id}:neg{j}" for j in range(len(negatives))],
            "negative_modalities": [content_modality(n["text"], n["image"]) for n in negatives],
        }

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self._example(self.dataset[index], index)


class IterableColumnPairDataset(ColumnPairDataset, IterableDataset):
    """[`ColumnPairDataset`] over a streaming `datasets.IterableDataset`; built by `ColumnPairDataset(...)`.

    Sharding across DataLoader workers is the wrapped dataset's own (it splits its shards when iterated in a worker).
    """

    def set_epoch(self, epoch: int) -> None:
        """Forwards the epoch to the wrapped dataset, which reshuffles its buffer and shards per epoch."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        prefix = _stream_position_prefix()
        for index, row in enumerate(self.dataset):
            if index == 0 and getattr(self.dataset, "column_names", None) is None:
                self._check_columns(row.keys())  # a dataset without declared features shows its columns here
            yield self._example(row, f"{prefix}{index}")

    def __len__(self):
        raise TypeError("A streaming ColumnPairDataset has no length.")

    def __getitem__(self, index):
        raise TypeError("A streaming ColumnPairDataset is iterated, not indexed.")


def _stream_position_prefix() -> str:
    """Names the rank and DataLoader worker reading a stream: each numbers its rows from 0."""
    parts = []
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts.append(f"rank{torch.distributed.get_rank()}")
    worker = torch.utils.data.get_worker_info()
    if worker is not None:
        parts.append(f"worker{worker.id}")
    return "-".join(parts) + ":" if parts else ""


def _is_streaming(dataset) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.IterableDataset)


# ----------------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------------
class PumaCollator:
    """Turns examples (the dicts the datasets above yield) into a batch of model inputs.

    Returns:
        `dict` with
        - `query`, `candidate`: processor features (`input_ids`, `attention_mask`, and with images `pixel_values`,
          `image_grid_thw`; `mm_token_type_ids` on transformers 5) of the queries (instructions applied) and of the
          positives, one row per kept example (B);
        - `negative`: features of the hard negatives flattened query-major (B * n rows), only when n > 0;
        - `modality`: `LongTensor` `(B,)`, the id ([`modality_id`]) of each positive's modality;
        - `negative_modality`: `LongTensor` `(B * n,)`;
        - `query_ids`, `candidate_ids`, `negative_ids`: lists of strings.

    Prompts come from `modeling_puma.build_prompt` (the model's template, text truncated to `config.max_text_tokens`
    before the embedding token) and images from `modeling_puma.load_image` (EXIF rotation, RGB, pixel limit). An
    example with an unreadable image or an empty side is counted (`num_skipped`), logged and dropped from its batch;
    a batch left empty raises `ValueError`.

    Args:
        processor: the model's Qwen2-VL processor (`model.processor`), whose tokenizer holds the embedding token.
        config: the model's `PumaConfig`.
        image_root: folder that relative image paths are resolved against.
        max_image_pixels: refuse larger images (decompression bombs); default `PIL.Image.MAX_IMAGE_PIXELS`.
    """

    _LOGGED_SKIPS = 10  # each of the first skips is logged, then every `_SKIP_LOG_EVERY`-th
    _SKIP_LOG_EVERY = 100

    def __init__(self, processor, config, image_root=None, max_image_pixels: int | None = None):
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"The processor {type(processor).__name__} has no tokenizer.")
        pools_at_token = config.pooling == "token"
        token_id = tokenizer.convert_tokens_to_ids(config.embedding_token) if pools_at_token else None
        if pools_at_token and (config.embedding_token_id is None or token_id != config.embedding_token_id):
            raise ValueError(
                f"The tokenizer maps the embedding token {config.embedding_token!r} to {token_id}, the config says "
                f"{config.embedding_token_id}; pass the model's own processor and config "
                "(model.processor, model.config)."
            )
        self.processor = processor
        self.config = config
        self.image_root = image_root
        self.max_image_pixels = max_image_pixels
        self.num_skipped = 0

    def featurize_inputs(self, inputs: list[dict], instructions: list[str | None] | None = None):
        """Processor features of `{"text", "image"}` inputs, with per-input instructions (queries only)."""
        loaded = [self._load_side(item, f"inputs[{i}]") for i, item in enumerate(inputs)]
        return self._features(loaded, instructions)

    def __call__(self, examples: list[dict]) -> dict:
        kept = []
        for example in examples:
            negatives = example.get("negatives") or []
            if len(example.get("negative_ids") or []) != len(negatives) or \
                    len(example.get("negative_modalities") or []) != len(negatives):
                raise ValueError(f"Example {example.get('query_id')!r}: negatives, negative_ids and "
                                 "negative_modalities differ in length.")
            try:
                kept.append((example, self._load_example(example)))
            except (OSError, ValueError) as err:
                self._log_skip(example, err)
        if not kept:
            raise ValueError(f"Every one of the {len(examples)} examples of this batch was skipped (see the log).")
        counts = {len(loaded["negatives"]) for _, loaded in kept}
        if len(counts) > 1:
            raise ValueError(
                f"Examples of one batch must have the same number of hard negatives, got {sorted(counts)}."
            )

        batch = {
            "query": self._features([loaded["query"] for _, loaded in kept],
                                    [example.get("instruction") for example, _ in kept]),
            "candidate": self._features([loaded["positive"] for _, loaded in kept]),
        }
        negatives = [negative for _, loaded in kept for negative in loaded["negatives"]]
        if negatives:
            batch["negative"] = self._features(negatives)
        batch["modality"] = torch.tensor([modality_id(example["modality"]) for example, _ in kept], dtype=torch.long)
        batch["negative_modality"] = torch.tensor(
            [modality_id(label) for example, _ in kept for label in example["negative_modalities"]], dtype=torch.long)
        batch["query_ids"] = [str(example["query_id"]) for example, _ in kept]
        batch["candidate_ids"] = [str(example["positive_id"]) for example, _ in kept]
        batch["negative_ids"] = [str(did) for example, _ in kept for did in example["negative_ids"]]
        return batch

    def _features(self, sides: list[tuple], instructions: list[str | None] | None = None):
        instructions = instructions if instructions is not None else [None] * len(sides)
        prompts = [build_prompt(self.config, text, image is not None, instruction, self.processor.tokenizer)
                   for (text, image), instruction in zip(sides, instructions)]
        return featurize(self.processor, self.config, prompts, [image for _, image in sides])

    def _load_example(self, example: dict) -> dict:
        """The example's sides as `(text, RGB image | None)`; raises on an unreadable image or an empty side."""
        if example.get("modality") is None:
            raise ValueError("its positive has neither text nor image, so it has no target modality")
        return {
            "query": self._load_side(example["query"], "query"),
            "positive": self._load_side(example["positive"], "positive"),
            "negatives": [self._load_side(negative, f"negatives[{j}]")
                          for j, negative in enumerate(example.get("negatives") or [])],
        }

    def _load_side(self, side: dict, name: str) -> tuple:
        text, image = side.get("text"), side.get("image")
        text = text if isinstance(text, str) and text.strip() else None
        if text is None and image is None:
            raise ValueError(f"its {name} has neither text nor image")
        return text, (self._open_image(image, name) if image is not None else None)

    def _open_image(self, image, name: str):
        from PIL import Image

        if isinstance(image, dict):  # an undecoded 🤗 `Image` feature
            if image.get("bytes"):
                try:
                    image = Image.open(io.BytesIO(image["bytes"]))
                except Image.DecompressionBombError as err:
                    raise ValueError(f"its {name} image exceeds the pixel limit ({err})") from err
            elif image.get("path"):
                image = image["path"]
            else:
                raise ValueError(f"its {name} image dict has neither 'bytes' nor 'path'")
        if isinstance(image, (str, os.PathLike)) and self.image_root is not None:
            image = os.path.join(self.image_root, image)
        try:
            return load_image(image, 0, self.max_image_pixels)
        except (OSError, ValueError) as err:
            raise ValueError(f"its {name} image could not be used ({err})") from err

    def _log_skip(self, example: dict, err: Exception) -> None:
        self.num_skipped += 1
        if self.num_skipped <= self._LOGGED_SKIPS or self.num_skipped % self._SKIP_LOG_EVERY == 0:
            logger.warning(f"Skipped example {example.get('query_id')!r}: {err} "
                           f"({self.num_skipped} skipped by this collator so far).")


__all__ = ["MODALITY_IDS", "ColumnPairDataset", "IterableColumnPairDataset", "MBEIRTrainDataset", "NLIDataset",
           "PumaCollator", "content_modality", "load_mbeir_pool", "load_mbeir_queries", "load_query_instructions",
           "mbeir_eval_queries", "modality_id", "normalize_modality", "read_jsonl"]

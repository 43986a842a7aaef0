# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""The cached teacher: the full-depth teacher's raw embedding of every input a training run can draw, computed once,
stored as shards on disk and read memory-mapped by sample id while the student trains.

    items = teacher_items(dataset)                       # every query (with each instruction it can draw) and candidate
    print(describe_teacher_cache(items, dim, torch.bfloat16, cache_dir))   # its size, before anything is encoded
    precompute_teacher_cache(teacher, dataset, cache_dir, fingerprint, dtype=torch.bfloat16)
    teacher = CachedTeacher(cache_dir, fingerprint)     # .embed(features, ids)

At M-BEIR's scale (1.1 M training queries, each with the instructions its positives' modalities allow, and 5.6 M
candidates, 3584 dimensions for a 7B teacher) the cache is tens of GB, so:

- it is written by every process of `accelerate launch` at once, each encoding its share of the shards
  (`puma_eval.encoding.encode_sharded`, the evaluation's resumable sharded encoding): a killed build resumes at the
  first shard that is missing, and a shard is complete or absent, never half-written;
- it is read memory-mapped: a lookup reads the rows it needs from the page cache, shared by every process of the
  machine, and a process holds only the sorted id index (about 16 bytes per id, mapped too);
- its size is printed before it is built (`describe_teacher_cache`), with the free space of its disk.

Layout of `cache_dir`: `queries/<fingerprint>/shard-NNNNN.safetensors` and `candidates/<fingerprint>/...` (each
shard's ids and fingerprint in its header), `index/ids.npy` (every id, sorted, fixed-width bytes) and
`index/rows.npy` (each sorted id's row: queries first, then candidates), `manifest.json` (parts, shard size, dtype,
dimension) and `fingerprint.json` (what the embeddings depend on: teacher checkpoint, prompt template, pixel limits,
data files), written last, so that a cache holding it is complete.
"""

import json
import logging
import os
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch

from mbeir_puma import SHOWN_IDS, checkpoint_fingerprint, file_fingerprint
from puma_eval.encoding import EmbeddingShards, distributed_state, encode_sharded


logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 1: one process, index.json of every id and shards loaded whole into memory
PARTS = ("queries", "candidates")
DEFAULT_SHARD_SIZE = 65536


def teacher_fingerprint(teacher_path: str, config, data_files: list[str]) -> dict:
    """What a cached teacher embedding depends on: the teacher checkpoint's content, prompt template, pixel limits
    and the data files' content (`mbeir_puma.checkpoint_fingerprint` / `file_fingerprint`)."""
    prompt_fields = ("embedding_token", "system_prompt", "instruction_template", "user_suffix_template",
                     "modality_words", "assistant_template", "format_text", "max_text_tokens", "pooling")
    # the reading of images and the sampling of videos and PDF pages (fields of later versions, absent: defaults)
    media_fields = ("max_prompt_tokens", "keep_empty_instruction", "exif_transpose", "alpha_mode", "video_fps",
                    "video_min_frames", "video_max_frames", "video_min_pixels", "video_max_pixels",
                    "video_total_pixels", "pdf_dpi")
    return {
        "teacher_checkpoint": checkpoint_fingerprint(teacher_path),
        "prompt_template": {name: getattr(config, name) for name in prompt_fields},
        "pixel_limits": {"min_pixels": config.min_pixels, "max_pixels": config.max_pixels},
        "media": {name: getattr(config, name, None) for name in media_fields},
        "data_files": {os.path.basename(path): file_fingerprint(path) for path in data_files},
    }


def _normalised(fingerprint: dict) -> dict:
    return json.loads(json.dumps(fingerprint, sort_keys=True))


def teacher_cache_is_fresh(cache_dir: str, fingerprint: dict) -> bool:
    """Whether `cache_dir` holds a complete teacher cache of this format written for exactly this `fingerprint`."""
    path, manifest = os.path.join(cache_dir, "fingerprint.json"), os.path.join(cache_dir, "manifest.json")
    if not (os.path.isfile(path) and os.path.isfile(manifest)):
        return False
    with open(manifest, encoding="utf-8") as f:
        if json.load(f).get("format") != CACHE_FORMAT:
            return False
    with open(path, encoding="utf-8") as f:
        return json.load(f) == _normalised(fingerprint)


# ----------------------------------------------------------------------------------------------------------------
# What to cache
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TeacherItems:
    """The inputs of one part of the cache (queries or candidates), one per id, in a fixed order."""

    ids: list[str] = field(default_factory=list)
    inputs: list[dict] = field(default_factory=list)
    instructions: list[str | None] = field(default_factory=list)

    def add(self, item_id: str, item: dict, instruction: str | None, seen: dict) -> None:
        """Adds `item` under `item_id` unless the id is known; `seen` maps every id added so far to its input, and
        an id seen with another input is an error (a cache keyed by it would hold the wrong embedding)."""
        key = (item.get("text"), _image_key(item.get("image")), instruction)
        if item_id in seen:
            if seen[item_id] != key:
                raise ValueError(f"The id {item_id!r} names two different inputs ({seen[item_id]} and {key}); a "
                                 "teacher cache needs one input per id.")
            return
        seen[item_id] = key
        self.ids.append(item_id)
        self.inputs.append({"text": item.get("text"), "image": item.get("image")})
        self.instructions.append(instruction)


def _image_key(image):
    return image if image is None or isinstance(image, str) else f"<{type(image).__name__} {id(image)}>"


def teacher_items(dataset) -> dict[str, TeacherItems]:
    """`{"queries": ..., "candidates": ...}`: every input a run over `dataset` can hand the teacher.

    A dataset that defines `teacher_inputs()` (M-BEIR, NLI and column-mapped datasets do) lists them all: M-BEIR's
    queries come with every instruction their positives' modalities allow, so every epoch's draw is covered.
    Otherwise every example is read once (the draws of the dataset's current epoch)."""
    if hasattr(dataset, "teacher_inputs"):
        records = dataset.teacher_inputs()
    elif hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        records = _records_of_examples(dataset)
    else:
        raise ValueError(f"A cached teacher needs a dataset it can list (with a length, or teacher_inputs()); "
                         f"{type(dataset).__name__} is a stream: use teacher='shared' or 'separate'.")
    parts, seen = {part: TeacherItems() for part in PARTS}, {}
    for part, item_id, item, instruction in records:
        parts[part].add(str(item_id), item, instruction, seen)
    if not parts["queries"].ids and not parts["candidates"].ids:
        raise ValueError("The dataset lists no input for the teacher cache.")
    return parts


def _records_of_examples(dataset):
    for index in range(len(dataset)):
        example = dataset[index]
        yield "queries", example["query_id"], example["query"], example.get("instruction")
        yield "candidates", example["positive_id"], example["positive"], None
        for negative_id, negative in zip(example.get("negative_ids") or [], example.get("negatives") or []):
            yield "candidates", negative_id, negative, None


def describe_teacher_cache(items: dict[str, TeacherItems], dim: int, dtype: torch.dtype, cache_dir: str,
                           shard_size: int = DEFAULT_SHARD_SIZE) -> str:
    """One line giving what the cache will hold and its size on disk, with the free space there."""
    counts = {part: len(items[part].ids) for part in PARTS}
    total = sum(counts.values())
    element = torch.empty((), dtype=dtype).element_size()
    width = max((len(item_id.encode()) for part in PARTS for item_id in items[part].ids), default=1)
    size = total * dim * element + total * (width + 8)
    shards = sum(-(-count // shard_size) for count in counts.values())
    folder = cache_dir
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder or ".").free
    return (f"Teacher cache: {counts['queries']:,} query inputs (each instruction counted) and "
            f"{counts['candidates']:,} candidates x {dim} dimensions in {str(dtype).replace('torch.', '')} = "
            f"{_gib(size)} (with the id index) in {shards} shards of at most {shard_size:,} under "
            f"{os.path.abspath(cache_dir)}; {_gib(free)} free there" + (" (NOT ENOUGH)" if free < size else "") + ".")


def _gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**27 else f"{size / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def precompute_teacher_cache(teacher, dataset, out_dir: str, fingerprint: dict, *, batch_size: int = 16,
                             shard_size: int = DEFAULT_SHARD_SIZE, dtype: torch.dtype = torch.float32,
                             items: dict[str, TeacherItems] | None = None) -> int:
    """Embeds every input of `dataset` (`teacher_items`; a `DataLoader` stands for its dataset) with `teacher`, the
    raw pooled states (not normalised), and writes the cache to `out_dir`; returns the number of ids.

    Under `accelerate launch` every process calls it: each encodes its share of the missing shards, the main process
    then writes the index, the manifest and the fingerprint, and all return once the cache is complete. Shards of an
    earlier, killed build with the same teacher, inputs and settings are reused."""
    items = items if items is not None else teacher_items(getattr(dataset, "dataset", dataset))
    state = distributed_state()
    if state.is_main_process:
        logger.info(describe_teacher_cache(items, teacher.config.text_config.hidden_size, dtype, out_dir, shard_size))
    teacher.eval()
    if getattr(teacher.config, "visual_pool", 1) != 1:  # the target is the unreduced embedding, as every teacher's
        teacher.config.visual_pool = 1
    parts = []
    for part in PARTS:
        if not items[part].ids:
            continue
        shards = encode_sharded(teacher, items[part].inputs, items[part].ids, out_dir, name=part,
                                is_query=part == "queries", instructions=items[part].instructions,
                                batch_size=batch_size, shard_size=shard_size, normalize=False, dtype=dtype,
                                show_progress_bar=True)
        if state.is_main_process:
            parts.append({"name": part, "folder": os.path.relpath(shards.folder, out_dir), "rows": len(shards),
                          "shard_size": shard_size})
    if state.is_main_process:
        _write_index(out_dir, [items[part].ids for part in PARTS if items[part].ids])
        manifest = {"format": CACHE_FORMAT, "parts": parts, "dim": teacher.config.text_config.hidden_size,
                    "dtype": str(dtype).replace("torch.", "")}
        _write_json(os.path.join(out_dir, "manifest.json"), manifest)
        _write_json(os.path.join(out_dir, "fingerprint.json"), fingerprint, indent=2)  # last: the cache is complete
    state.wait_for_everyone()
    return sum(len(items[part].ids) for part in PARTS)


def _write_index(out_dir: str, id_lists: list[list[str]]) -> None:
    """`index/ids.npy` (every id, sorted, as fixed-width UTF-8 bytes) and `index/rows.npy` (each one's row)."""
    ids = np.array([item_id.encode() for ids in id_lists for item_id in ids], dtype=np.bytes_)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    repeated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if len(repeated):
        raise ValueError(f"Ids occur in both queries and candidates: {[r.decode() for r in repeated[:SHOWN_IDS]]}.")
    folder = os.path.join(out_dir, "index")
    os.makedirs(folder, exist_ok=True)
    for name, array in (("ids", sorted_ids), ("rows", order.astype(np.int64))):
        temporary = os.path.join(folder, f"{name}.tmp{os.getpid()}.npy")
        np.save(temporary, array)
        os.replace(temporary, os.path.join(folder, f"{name}.npy"))


def _write_json(path: str, value: dict, indent: int | None = None) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=indent, sort_keys=True)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
class CachedTeacher:
    """Teacher embeddings looked up by sample id, memory-mapped from a cache `precompute_teacher_cache` wrote;
    refuses a cache whose fingerprint differs from the run's (naming what differs) or that is incomplete.

    `embed(features, ids)` returns the rows of `ids` as float32 on the device of `features["input_ids"]`."""

    def __init__(self, cache_dir: str, expected_fingerprint: dict | None = None):
        self.cache_dir = cache_dir
        fingerprint_path, manifest_path = (os.path.join(cache_dir, name) for name in ("fingerprint.json",
                                                                                     "manifest.json"))
        if not os.path.isfile(fingerprint_path):
            raise FileNotFoundError(f"The teacher cache {cache_dir} is incomplete or absent ({fingerprint_path} does "
                                    "not exist): fill it with --precompute_teacher.")
        with open(fingerprint_path, encoding="utf-8") as f:
            stored = json.load(f)
        if expected_fingerprint is not None:
            expected = _normalised(expected_fingerprint)
            differing = [key for key in sorted(set(stored) | set(expected)) if stored.get(key) != expected.get(key)]
            if differing:
                details = "; ".join(f"{key}: cache {stored.get(key)} != run {expected.get(key)}" for key in differing)
                raise ValueError(f"The teacher cache {cache_dir} is stale ({details}). Recompute it with "
                                 "precompute_teacher_cache.")
        manifest = None
        if os.path.isfile(manifest_path):
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
        if manifest is None or manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"The teacher cache {cache_dir} was written in another format (format "
                             f"{None if manifest is None else manifest.get('format')}, this version reads "
                             f"{CACHE_FORMAT}); recompute it with --precompute_teacher.")
        self.dim, self.dtype = manifest["dim"], getattr(torch, manifest["dtype"])
        self.ids = np.load(os.path.join(cache_dir, "index", "ids.npy"), mmap_mode="r")
        self.rows = np.load(os.path.join(cache_dir, "index", "rows.npy"), mmap_mode="r")
        # each part's first row and its shards' bounds; shards are mapped on first use
        self.parts, self._mapped, start = [], {}, 0
        for part in manifest["parts"]:
            folder = os.path.join(cache_dir, part["folder"])
            size, rows = part["shard_size"], part["rows"]
            bounds = [(i, min(i + size, rows)) for i in range(0, rows, size)]
            self.parts.append((start, part["shard_size"], EmbeddingShards(None, self.dim, bounds, None, folder)))
            start += part["rows"]

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, ids: list[str]) -> np.ndarray:
        """The cache row of each id; a `KeyError` lists the ids the cache lacks."""
        encoded = [str(item_id).encode() for item_id in ids]
        width = self.ids.dtype.itemsize
        wanted = np.array([item if len(item) <= width else b"" for item in encoded], dtype=self.ids.dtype)
        positions = np.searchsorted(self.ids, wanted).clip(max=len(self.ids) - 1)
        found = (self.ids[positions] == wanted) & np.array([0 < len(item) <= width for item in encoded])
        if not found.all():
            missing = [str(item_id) for item_id, ok in zip(ids, found) if not ok]
            raise KeyError(f"The teacher cache lacks {len(missing)} ids of this batch, e.g. {missing[:5]}; it is "
                           "incomplete.")
        return np.asarray(self.rows[positions])

    def _shard(self, part: int, index: int):
        key = (part, index)
        if key not in self._mapped:
            self._mapped[key] = self.parts[part][2].mapped(index)
        return self._mapped[key]

    def lookup(self, ids: list[str]) -> torch.Tensor:
        """The cached embeddings of `ids`, `(len(ids), dim)` float32 on CPU."""
        rows = self.rows_of(ids)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        starts = [start for start, _, _ in self.parts]
        for i, row in enumerate(rows.tolist()):
            part = int(np.searchsorted(starts, row, side="right")) - 1
            local = row - starts[part]
            shard_size = self.parts[part][1]
            values = self._shard(part, local // shard_size)[local % shard_size]
            out[i] = _as_float32(values, self.dtype)
        return torch.from_numpy(out)

    def embed(self, features: dict, ids: list[str]) -> torch.Tensor:
        return self.lookup(ids).to(features["input_ids"].device)


def _as_float32(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.bfloat16:  # numpy has no bfloat16: its bits are the upper half of a float32's
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


__all__ = ["CACHE_FORMAT", "CachedTeacher", "TeacherItems", "describe_teacher_cache", "precompute_teacher_cache",
           "teacher_cache_is_fresh", "teacher_fingerprint", "teacher_items"]

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""PUMA training data: M-BEIR, NLI and column-mapped 🤗 datasets as examples, and the collator that turns examples
into model inputs.

Every dataset yields the same plain dict per example:

    {"query": {"text": str | None, "image": path | PIL.Image | None[, "video": path | frames]}, "instruction":
     str | None, "query_id": str, "positive": {"text", "image"[, "video"]}, "positive_id": str, "modality": str,
     "negatives": [{"text", "image"[, "video"]}, ...], "negative_ids": [str, ...], "negative_modalities": [str, ...]}

An image path may name a PDF page (`doc.pdf#page=2`); a side holds a text and at most one image or video.

`modality` is the target modality (the positive's); `query_id` identifies the exact query input, instruction
included, so per-id caches (teacher embeddings) stay correct. [`PumaCollator`] builds the prompts with the model's
own `build_prompt`, runs the processor and returns modality ids from [`MODALITY_IDS`].

M-BEIR files, the modality vocabulary and the column mapping of 🤗 datasets are read through `mbeir_puma`, the
format module below this one, which evaluation and the Space read too.
"""

import csv
import io
import logging
import os

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from mbeir_puma import (ColumnMapping, SkipLog, dataset_id, join_path, load_mbeir_pool, load_mbeir_queries,
                        load_query_instructions, media_side, modality_id)
from modeling_puma import build_prompt, featurize, load_image, media_file, sample_video, video_input


logger = logging.getLogger(__name__)

# Progress bars for start-up scans only where they take noticeable time.
_PROGRESS_MIN_ITEMS = 10_000


# ----------------------------------------------------------------------------------------------------------------
# M-BEIR (stage 2)
# ----------------------------------------------------------------------------------------------------------------
def _candidate_input(candidate: dict, image_root) -> dict:
    return media_side(candidate["txt"], join_path(image_root, candidate["img_path"]),
                      join_path(image_root, candidate.get("video_path")))


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
        """Whether the image, video (file or folder of frames) or PDF a path names exists (checked once per path)."""
        if path is None or not self.check_images:
            return True
        if path not in self._image_exists:
            self._image_exists[path] = os.path.exists(media_file(path))
        return self._image_exists[path]

    def _usable_candidates(self, ids: list[str], kind: str, dropped: SkipLog) -> list[str]:
        usable = []
        for did in ids:
            candidate = self.pool.get(did)
            if candidate is None:
                dropped.add(f"{kind} ids absent from the pool", did)
            elif not self._has_image(join_path(self.image_root, candidate["img_path"])):
                dropped.add(f"{kind}s whose image file is missing", did)
            elif not self._has_image(join_path(self.image_root, candidate.get("video_path"))):
                dropped.add(f"{kind}s whose video file is missing", did)
            else:
                usable.append(did)
        return usable

    def _validate(self, queries: list[dict]) -> list[tuple]:
        """Keeps the usable queries as `(qid, query side, query_modality, positives, negatives)` tuples."""
        skipped, dropped = SkipLog(), SkipLog()
        examples = []
        for query in tqdm(queries, desc="Checking M-BEIR queries", disable=len(queries) < _PROGRESS_MIN_ITEMS):
            qid = query["qid"]
            image = join_path(self.image_root, query["query_img_path"])
            video = join_path(self.image_root, query.get("query_video_path"))
            if not self._has_image(image):
                skipped.add("queries whose image file is missing", qid)
                continue
            if not self._has_image(video):
                skipped.add("queries whose video file is missing", qid)
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
            examples.append((qid, media_side(query["query_txt"], image, video), query["query_modality"],
                             tuple(positives), tuple(negatives)))
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

    def _query_id(self, qid: str, positives: tuple, modality: str, instruction_index: int) -> str:
        """The id of a query with its drawn instruction: `qid#i<index>`, with the target modality before the index
        when the query's positives have several (their instruction lists differ)."""
        if len({self.pool[did]["modality"] for did in positives}) > 1:
            return f"{qid}#{modality}#i{instruction_index}"
        return f"{qid}#i{instruction_index}"

    def teacher_inputs(self):
        """Every input a run can draw, as `(part, id, {"text", "image"[, "video"]}, instruction)` (`part`:
        "queries" or "candidates"): each query with every instruction of every target modality its positives have,
        under the ids `__getitem__` gives them, then every positive and hard negative. What a teacher cache must
        hold."""
        for qid, query, query_modality, positives, _ in self.examples:
            for modality in dict.fromkeys(self.pool[did]["modality"] for did in positives):
                for index, instruction in enumerate(self.instructions[(dataset_id(qid), query_modality, modality)]):
                    yield "queries", self._query_id(qid, positives, modality, index), dict(query), instruction
        candidates = (did for *_, positives, negatives in self.examples
                      for did in (*positives, *(negatives if self.num_hard_negatives else ())))
        for did in dict.fromkeys(candidates):
            yield "candidates", did, _candidate_input(self.pool[did], self.image_root), None

    def __getitem__(self, index: int) -> dict:
        qid, query, query_modality, positives, negatives = self.examples[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        positive_id = positives[int(rng.integers(len(positives)))]
        positive = self.pool[positive_id]
        prompts = self.instructions[(dataset_id(qid), query_modality, positive["modality"])]
        instruction_index = int(rng.integers(len(prompts)))
        negative_ids = [negatives[i] for i in _draw_indices(rng, len(negatives), self.num_hard_negatives)]
        return {
            "query": dict(query),
            "instruction": prompts[instruction_index],
            "query_id": self._query_id(qid, positives, positive["modality"], instruction_index),
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
        skipped = SkipLog()
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

    def teacher_inputs(self):
        """Every input of the dataset, as `(part, id, {"text", "image"}, instruction)` (a teacher cache's content)."""
        for index in range(len(self)):
            example = self[index]
            yield "queries", example["query_id"], example["query"], None
            for item_id, item in ((example["positive_id"], example["positive"]),
                                  *zip(example["negative_ids"], example["negatives"])):
                yield "candidates", item_id, item, None

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
    """Examples from a 🤗 `datasets.Dataset` whose columns are named in the arguments (`mbeir_puma.ColumnMapping`).

    A streaming `datasets.IterableDataset` gives an [`IterableColumnPairDataset`] (a torch `IterableDataset`).

    Args:
        dataset: the 🤗 dataset.
        query_text, query_image, positive_text, positive_image, negative_text, negative_image, id_column,
            modality_column, image_root: the `ColumnMapping` arguments. Without `id_column` the id is the row index,
            or for a stream the position in what this rank and worker read (unique within a run, but not stable
            across runs: name an id column where ids key a cache).

    A row whose query or positive is empty reaches the collator, which counts, logs and skips it.
    """

    def __new__(cls, dataset=None, *args, **kwargs):
        if cls is ColumnPairDataset and _is_streaming(dataset):
            cls = IterableColumnPairDataset
        return super().__new__(cls)

    def __init__(self, dataset, **columns):
        self.dataset = dataset
        self.mapping = ColumnMapping(**columns)
        if getattr(dataset, "column_names", None) is not None:
            self.mapping.check_columns(dataset.column_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.mapping.example(self.dataset[index], index)


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
                self.mapping.check_columns(row.keys())  # a dataset without declared features shows its columns here
            yield self.mapping.example(row, f"{prefix}{index}")

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
    before the embedding token), images from `modeling_puma.load_image` (read as the recipe says, PDF pages
    rendered, pixel limit) and videos from `modeling_puma.sample_video` (decoded, sampled and resized as the recipe
    says; a path, frames, or a 🤗 `Video` value: a decoder or a `{"path", "bytes"}` dict). An example with an
    unreadable image or video or an empty side is counted (`num_skipped`), logged and dropped from its batch; a batch
    left empty raises `ValueError`.

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
        prompts = [build_prompt(self.config, text, visual, instruction, self.processor.tokenizer)
                   for (text, visual), instruction in zip(sides, instructions)]
        return featurize(self.processor, self.config, prompts, [visual for _, visual in sides])

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
        """`(text, visual)`: the visual an RGB image, or a video decoded and sampled now (a bad file skips the
        example here rather than failing the batch)."""
        text, image, video = side.get("text"), side.get("image"), side.get("video")
        text = text if isinstance(text, str) and text.strip() else None
        if text is None and image is None and video is None:
            raise ValueError(f"its {name} has neither text nor image nor video")
        if image is not None and video is not None:
            raise ValueError(f"its {name} has both an image and a video")
        if video is not None:
            return text, self._open_video(video, name)
        return text, (self._open_image(image, name) if image is not None else None)

    def _open_video(self, video, name: str):
        if isinstance(video, dict):  # an undecoded 🤗 `Video` value
            video = video.get("path") if video.get("path") and os.path.isfile(video["path"]) else video.get("bytes")
        if isinstance(video, (str, os.PathLike)) and self.image_root is not None:
            video = os.path.join(self.image_root, video)
        try:
            return sample_video(video_input(video, f"its {name} video", max_pixels=self.max_image_pixels),
                                self.config)
        except (OSError, ValueError) as err:
            raise ValueError(f"its {name} video could not be used ({err})") from err

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
            return load_image(image, 0, self.max_image_pixels, self.config, name=f"its {name} image")
        except (OSError, ValueError) as err:
            raise ValueError(f"its {name} image could not be used ({err})") from err

    def _log_skip(self, example: dict, err: Exception) -> None:
        self.num_skipped += 1
        if self.num_skipped <= self._LOGGED_SKIPS or self.num_skipped % self._SKIP_LOG_EVERY == 0:
            logger.warning(f"Skipped example {example.get('query_id')!r}: {err} "
                           f"({self.num_skipped} skipped by this collator so far).")


__all__ = ["ColumnPairDataset", "IterableColumnPairDataset", "MBEIRTrainDataset", "NLIDataset", "PumaCollator"]

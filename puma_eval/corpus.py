# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Semantic search over a user's corpus: a folder of images and `.txt` files, or a JSONL file of records."""

import logging
import os

from mbeir_puma import read_jsonl, repeated_ids

from .encoding import encode_sharded
from .index import load_or_build_index, search_index
from .tasks import SHOWN_IDS, file_stem


logger = logging.getLogger(__name__)


def image_suffixes() -> tuple[str, ...]:
    """File suffixes of the image formats Pillow opens."""
    from PIL import Image

    return tuple(sorted(suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN))


def load_corpus(path) -> tuple[list[str], list[dict], str]:
    """`(ids, items, image_root)` of a folder (every image file and `.txt` file under it, recursively; ids are
    relative paths) or of a JSONL file (records with `text` and/or `image`, an optional `id`; image paths relative
    to the file's folder)."""
    path = os.fspath(path)
    ids, items = [], []
    if os.path.isdir(path):
        skipped, suffixes = 0, image_suffixes()
        for folder, subfolders, files in os.walk(path):
            subfolders.sort()
            for filename in sorted(files):
                relative = os.path.relpath(os.path.join(folder, filename), path)
                if filename.lower().endswith(suffixes):
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
        raise ValueError(f"Corpus {path} repeats ids {repeated_ids(ids)[:SHOWN_IDS]}.")
    return ids, items, root


class CorpusIndex:
    """A corpus encoded and indexed once, searched by text, image or both (what the search CLI and the Space use).

    Args:
        model: a `PumaForEmbedding`.
        ids, items, root: the corpus (`load_corpus`); image paths of `items` are relative to `root`.
        cache_dir: keep the embeddings (and a non-flat index) here for the next start.
        index: an `index.INDEX_KINDS` kind; `index_options` go to `index.IndexSpec`.
    """

    def __init__(self, model, ids: list[str], items: list[dict], root: str | None = None, *, name: str = "corpus",
                 cache_dir=None, index: str = "flat", batch_size: int = 16, show_progress_bar: bool = False,
                 **index_options):
        self.model, self.ids, self.items, self.root = model, ids, items, root
        shards = encode_sharded(model, items, ids, cache_dir, name=name, image_root=root, batch_size=batch_size,
                                show_progress_bar=show_progress_bar)
        path = os.path.join(shards.folder, f"index-{index}.faiss") if shards.folder and index != "flat" else None
        self.index = load_or_build_index(shards, index, path, shards.fingerprint, **index_options)

    @classmethod
    def from_path(cls, model, corpus, **kwargs) -> "CorpusIndex":
        """Loads and indexes the folder or JSONL corpus at `corpus`."""
        ids, items, root = load_corpus(corpus)
        return cls(model, ids, items, root, name=file_stem(os.path.normpath(os.fspath(corpus))), **kwargs)

    def search(self, query: str | None = None, image=None, top_k: int = 5,
               instruction: str | None = None) -> list[dict]:
        """The `top_k` items closest to the query (text, image path or PIL image, or both): dicts with `rank`,
        `score`, `id`, `text`, `image` (the item's path, relative to `root`)."""
        if query is None and image is None:
            raise ValueError("Give a query text, a query image, or both.")
        if top_k < 1:
            raise ValueError(f"top_k must be positive, got {top_k}.")
        embedding = self.model.encode([{"text": query, "image": image}], instruction=instruction, is_query=True)
        scores, top = search_index(self.index, embedding, top_k)
        return [{"rank": rank, "score": float(score), "id": self.ids[i], **self.items[i]}
                for rank, (score, i) in enumerate(zip(scores[0], top[0]), 1) if i >= 0]


def search_corpus(model, corpus, query: str | None = None, image=None, top_k: int = 5,
                  instruction: str | None = None, batch_size: int = 16, cache_dir=None,
                  index: str = "flat") -> list[dict]:
    """The `top_k` corpus items closest to the query (text, image or both): dicts with `rank`, `score`, `id`,
    `text`, `image`."""
    if query is None and image is None:
        raise ValueError("Give a query text, a query image, or both.")
    return CorpusIndex.from_path(model, corpus, cache_dir=cache_dir, index=index, batch_size=batch_size).search(
        query, image, top_k, instruction)

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Semantic search over a user's corpus: a folder of images, videos, PDFs and `.txt` files, or a JSONL file of
records. A PDF is one item per page, found as `file` and `page` (numbered from 1) with the id `file#page=N`."""

import logging
import os

from mbeir_puma import read_jsonl, repeated_ids

from .encoding import encode_sharded
from .index import load_or_build_index, search_index
from .tasks import SHOWN_IDS, file_stem


logger = logging.getLogger(__name__)

# The fields of a corpus item: a text and at most one visual (an image, a video, or a PDF's page)
ITEM_FIELDS = ("text", "image", "video", "pdf", "page")


def image_suffixes() -> tuple[str, ...]:
    """File suffixes of the image formats Pillow opens."""
    from PIL import Image

    return tuple(sorted(suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN))


def video_suffixes() -> tuple[str, ...]:
    """File suffixes read as videos (an animated GIF is one too)."""
    from modeling_puma import VIDEO_SUFFIXES

    return tuple(suffix for suffix in VIDEO_SUFFIXES if suffix != ".gif")


def pdf_pages(path, pdf: str, item_id: str) -> tuple[list[str], list[dict]]:
    """`(ids, items)` of every page of the PDF `pdf` (relative to `path`'s folder, or absolute): ids
    `item_id#page=N`, items `{"pdf": pdf, "page": N}`."""
    from modeling_puma import pdf_page_count

    count = pdf_page_count(pdf if os.path.isabs(pdf) else os.path.join(path, pdf))
    if count == 0:
        raise ValueError(f"Corpus PDF {os.path.join(path, pdf)} has no pages.")
    return ([f"{item_id}#page={page}" for page in range(1, count + 1)],
            [{"text": None, "image": None, "pdf": pdf, "page": page} for page in range(1, count + 1)])


def _folder_item(folder: str, filename: str, relative: str, suffixes: tuple, videos: tuple) -> dict | None:
    """The item of one file of a corpus folder, by its kind, or `None` for a file of no kind read here."""
    from modeling_puma import _is_animated

    lowered = filename.lower()
    path = os.path.join(folder, filename)
    if lowered.endswith(videos) or (lowered.endswith(".gif") and _is_animated(path)):
        return {"text": None, "image": None, "video": relative}
    if lowered.endswith(suffixes):
        return {"text": None, "image": relative}
    if lowered.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
        if not text:
            raise ValueError(f"Corpus file {path} is empty.")
        return {"text": text, "image": None}
    return None


def load_corpus(path) -> tuple[list[str], list[dict], str]:
    """`(ids, items, root)` of a folder (every image, video, PDF and `.txt` file under it, recursively; ids are
    relative paths, a PDF's pages `file.pdf#page=N`) or of a JSONL file (records with `text` and at most one of
    `image`, `video` or `pdf` (with an optional `page`: without one, every page is an item), and an optional `id`;
    paths relative to the file's folder). Item paths are relative to `root`."""
    path = os.fspath(path)
    ids, items = [], []
    if os.path.isdir(path):
        skipped, suffixes, videos = 0, image_suffixes(), video_suffixes()
        for folder, subfolders, files in os.walk(path):
            subfolders.sort()
            for filename in sorted(files):
                relative = os.path.relpath(os.path.join(folder, filename), path)
                if filename.lower().endswith(".pdf"):
                    page_ids, page_items = pdf_pages(path, relative, relative)
                    ids += page_ids
                    items += page_items
                    continue
                item = _folder_item(folder, filename, relative, suffixes, videos)
                if item is None:
                    skipped += 1
                    continue
                ids.append(relative)
                items.append(item)
        if skipped:
            logger.info(f"{path}: skipped {skipped} files that are neither images, videos, PDFs nor .txt")
        root = path
    elif os.path.isfile(path):
        root = os.path.dirname(os.path.abspath(path))
        for line, record in enumerate(read_jsonl(path), 1):
            unknown = set(record) - {"id", *ITEM_FIELDS}
            if unknown:
                raise ValueError(f"{path}, record {line}: unknown fields {sorted(unknown)}; use id, text and one of "
                                 "image, video or pdf (with page).")
            item = {key: record[key] for key in ITEM_FIELDS if record.get(key) not in (None, "")}
            visuals = [key for key in ("image", "video", "pdf") if key in item]
            if not visuals and "text" not in item:
                raise ValueError(f"{path}, record {line}: neither 'text' nor 'image', 'video' or 'pdf'.")
            if len(visuals) > 1:
                raise ValueError(f"{path}, record {line}: {' and '.join(visuals)}; a record holds one of them.")
            if "page" in item and "pdf" not in item:
                raise ValueError(f"{path}, record {line}: 'page' without 'pdf'.")
            item_id = str(record.get("id", f"record {line}"))
            if "pdf" in item and "page" not in item:  # every page
                page_ids, page_items = pdf_pages(root, item["pdf"], item_id)
                ids += page_ids
                items += [{**page, "text": item.get("text")} for page in page_items]
                continue
            ids.append(item_id)
            items.append({"text": item.get("text"), "image": item.get("image"),
                          **{key: item[key] for key in item if key not in ("text", "image")}})
    else:
        raise FileNotFoundError(f"Corpus {path} is neither a folder nor a JSONL file.")
    if not items:
        raise ValueError(f"Corpus {path} holds no image, video, PDF, .txt file or record to index.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"Corpus {path} repeats ids {repeated_ids(ids)[:SHOWN_IDS]}.")
    return ids, items, root


class CorpusIndex:
    """A corpus encoded and indexed once, searched by a text, an image or a video, or a text and one of them (what
    the search CLI and the Space use).

    Args:
        model: a `PumaForEmbedding`.
        ids, items, root: the corpus (`load_corpus`); the paths of `items` are relative to `root`.
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

    def search(self, query: str | None = None, image=None, top_k: int = 5, instruction: str | None = None,
               video=None) -> list[dict]:
        """The `top_k` items closest to the query (a text, and an image (path or PIL image) or a video (path or
        frames)): dicts with `rank`, `score`, `id` and the item's fields (`text`, `image`, `video`, or `pdf` and
        `page`; paths relative to `root`)."""
        if query is None and image is None and video is None:
            raise ValueError("Give a query text, a query image or video, or a text and one of them.")
        if image is not None and video is not None:
            raise ValueError("Give a query image or a query video, not both.")
        if top_k < 1:
            raise ValueError(f"top_k must be positive, got {top_k}.")
        embedding = self.model.encode([{"text": query, "image": image, "video": video}], instruction=instruction,
                                      is_query=True)
        scores, top = search_index(self.index, embedding, top_k)
        return [{"rank": rank, "score": float(score), "id": self.ids[i], **self.items[i]}
                for rank, (score, i) in enumerate(zip(scores[0], top[0]), 1) if i >= 0]


def search_corpus(model, corpus, query: str | None = None, image=None, top_k: int = 5,
                  instruction: str | None = None, batch_size: int = 16, cache_dir=None,
                  index: str = "flat", video=None) -> list[dict]:
    """The `top_k` corpus items closest to the query (a text, an image or a video, or a text and one of them):
    dicts with `rank`, `score`, `id` and the item's fields (`CorpusIndex.search`)."""
    if query is None and image is None and video is None:
        raise ValueError("Give a query text, a query image or video, or a text and one of them.")
    return CorpusIndex.from_path(model, corpus, cache_dir=cache_dir, index=index, batch_size=batch_size).search(
        query, image, top_k, instruction, video)

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""PUMA multimodal search: a Gradio page that searches a gallery of images and texts by text, image or both.

    PUMA_MODEL=my-org/puma-2b PUMA_GALLERY=photos/ python space/app.py     # locally
    python -c "import space_puma; space_puma.push_space('me/puma-search', 'my-org/puma-2b', gallery='photos/')"

Settings come from `space_config.json` beside this file (written by `space_puma.save_space_folder`), overridden by
the environment: `PUMA_MODEL` (checkpoint folder or Hub id), `PUMA_GALLERY` (a folder of images and `.txt` files, a
JSONL file of `{id?, text?, image?}` records, a folder saved with `datasets`' `save_to_disk`, or a Hub dataset id with
`image` and/or `text` columns), `PUMA_GALLERY_SPLIT`, `PUMA_INSTRUCTION`, `PUMA_TOP_K`. The gallery is encoded once at
start-up (embeddings cached under `PUMA_CACHE_DIR`, default `~/.cache/puma_space`) and searched with faiss.
"""

import json
import os
import sys
import textwrap

import gradio as gr
from PIL import Image, ImageDraw


HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (HERE, os.path.dirname(HERE)):  # the Space folder holds the project modules; in the repository, its root
    if os.path.isfile(os.path.join(folder, "modeling_puma.py")) and folder not in sys.path:
        sys.path.insert(0, folder)

from puma_eval.corpus import CorpusIndex, load_corpus  # noqa: E402


CONFIG_FILE = os.path.join(HERE, "space_config.json")
DEFAULTS = {"model": None, "gallery": "gallery", "gallery_split": "train", "title": "PUMA multimodal search",
            "instruction": "", "top_k": 8}
THUMBNAIL = (256, 256)
# System fonts only: the page loads nothing from outside the Space.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])


def load_config() -> dict:
    """`DEFAULTS`, then `space_config.json`, then the `PUMA_*` environment variables."""
    config = dict(DEFAULTS)
    if os.path.isfile(CONFIG_FILE):
        with open(CONFIG_FILE, encoding="utf-8") as f:
            config.update(json.load(f))
    for key in DEFAULTS:
        if os.environ.get(f"PUMA_{key.upper()}"):
            config[key] = os.environ[f"PUMA_{key.upper()}"]
    if not config["model"]:
        raise ValueError("No model: set PUMA_MODEL or write space_config.json with space_puma.save_space_folder.")
    config["top_k"] = int(config["top_k"])
    return config


def load_gallery(source: str, split: str = "train") -> tuple[list[str], list[dict], str | None]:
    """`(ids, items, image_root)` of a folder or JSONL gallery (`puma_eval.corpus.load_corpus`), or of a `datasets`
    dataset (saved folder or Hub id) with `image` and/or `text` columns and an optional `id` column."""
    path = source if os.path.isabs(source) else os.path.join(HERE, source)
    saved_dataset = os.path.isdir(path) and os.path.isfile(os.path.join(path, "dataset_info.json"))
    if os.path.exists(path) and not saved_dataset:
        return load_corpus(path)
    import datasets

    dataset = datasets.load_from_disk(path) if saved_dataset else datasets.load_dataset(source, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[split]
    columns = set(dataset.column_names)
    if not columns & {"image", "text"}:
        raise ValueError(f"Gallery dataset {source} has neither an 'image' nor a 'text' column ({sorted(columns)}).")
    ids = [str(i) for i in dataset["id"]] if "id" in columns else [str(i) for i in range(len(dataset))]
    items = [{"text": row.get("text") or None, "image": row.get("image")} for row in dataset]
    return ids, items, None


def text_thumbnail(text: str) -> Image.Image:
    """A text item drawn as a card, so texts and images share the result gallery."""
    card = Image.new("RGB", THUMBNAIL, (245, 245, 240))
    lines = textwrap.wrap(text, width=34)[:14]
    ImageDraw.Draw(card).multiline_text((12, 12), "\n".join(lines), fill=(30, 30, 30), spacing=4)
    return card


def thumbnail(item: dict, root: str | None) -> Image.Image:
    if item["image"] is None:
        return text_thumbnail(item["text"])
    image = item["image"] if isinstance(item["image"], Image.Image) else \
        Image.open(os.path.join(root, item["image"]) if root else item["image"])
    image = image.convert("RGB")
    image.thumbnail(THUMBNAIL)
    return image


def build_demo(index: CorpusIndex, title: str = DEFAULTS["title"], instruction: str = "",
               top_k: int = DEFAULTS["top_k"]) -> gr.Blocks:
    """The page: a text box and an image box for the query, an instruction, the number of results, and the ranked
    results as a gallery of thumbnails captioned `rank. id (score)` and as a table."""

    def search(text, image, task_instruction, k):
        if not (text or "").strip() and image is None:
            raise gr.Error("Type a query, give an image, or both.")
        hits = index.search((text or "").strip() or None, image, int(k), (task_instruction or "").strip() or None)
        gallery = [(thumbnail(hit, index.root), f"{hit['rank']}. {hit['id']} ({hit['score']:.3f})") for hit in hits]
        table = [[hit["rank"], round(hit["score"], 4), hit["id"], (hit["text"] or "")[:200]] for hit in hits]
        return gallery, table

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nSearch {len(index.ids):,} images and texts with a text, an image, or both. "
                    f"Model: `{index.model.name_or_path}` (PUMA, layer-pruned Qwen2-VL embeddings).")
        with gr.Row():
            with gr.Column():
                query = gr.Textbox(label="Text query", placeholder="a dog catching a frisbee", elem_id="query-text")
                task = gr.Textbox(label="Instruction", value=instruction, elem_id="instruction",
                                  placeholder="Find an image that matches the given caption.")
                k = gr.Slider(1, min(50, len(index.ids)), value=min(top_k, len(index.ids)), step=1,
                              label="Results", elem_id="top-k")
                button = gr.Button("Search", variant="primary", elem_id="search")
            image = gr.Image(label="Image query", type="pil", elem_id="query-image")
        gallery = gr.Gallery(label="Results", columns=4, object_fit="contain", height="auto", elem_id="results")
        table = gr.Dataframe(headers=["rank", "score", "id", "text"], label="Scores", elem_id="scores")
        for trigger in (button.click, query.submit):
            trigger(search, [query, image, task, k], [gallery, table])
    return demo


def main() -> None:
    from modeling_puma import PumaForEmbedding

    config = load_config()
    model = PumaForEmbedding.from_pretrained(config["model"])
    ids, items, root = load_gallery(config["gallery"], config["gallery_split"])
    cache = os.environ.get("PUMA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "puma_space"))
    index = CorpusIndex(model, ids, items, root, cache_dir=cache, show_progress_bar=True)
    build_demo(index, config["title"], config["instruction"], config["top_k"]).launch(theme=THEME)


if __name__ == "__main__":
    main()

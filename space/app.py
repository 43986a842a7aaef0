# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""PUMA multimodal search: a Gradio page that searches a gallery of images, videos, document pages and texts by a
text, an image or a video, or a text and one of them.

    PUMA_MODEL=my-org/puma-2b PUMA_GALLERY=photos/ python space/app.py     # locally
    python -c "import space_puma; space_puma.push_space('me/puma-search', 'my-org/puma-2b', gallery='photos/')"

Settings come from `space_config.json` beside this file (written by `space_puma.save_space_folder`), overridden by
the environment: `PUMA_MODEL` (checkpoint folder or Hub id), `PUMA_GALLERY`, `PUMA_GALLERY_SPLIT`, `PUMA_INSTRUCTION`,
`PUMA_TOP_K`. A gallery is one of:

- a folder of images, videos, PDFs and `.txt` files (`puma_eval.corpus.load_corpus`: each image, video, PDF page
  and text is an item; a PDF page is found as `file.pdf#page=N`);
- a JSONL file of `{id?, text?, image?}` records (image paths relative to the file);
- a `datasets` dataset with an `image` and/or a `text` (or `caption`) column and an optional `id` column: a folder
  saved with `save_to_disk`, an image folder with a `metadata.jsonl`/`.csv`/`.parquet` file, or a Hub dataset id.

A relative `PUMA_GALLERY` is relative to the working directory; a relative gallery in `space_config.json` to this
file's folder. The gallery is encoded once at start-up (embeddings cached under `PUMA_CACHE_DIR`, default
`~/.cache/puma_space`) and searched with faiss. Settings are checked before the model loads; a mistake is answered
with one line (`PUMA_DEBUG=1` shows the traceback).
"""

import json
import os
import sys
import textwrap

from PIL import Image, ImageDraw


HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (HERE, os.path.dirname(HERE)):  # the Space folder holds the project modules; in the repository, its root
    if os.path.isfile(os.path.join(folder, "modeling_puma.py")) and folder not in sys.path:
        sys.path.insert(0, folder)

# gradio, torch (puma_eval) and the model are imported where they are used, after the settings are checked: a wrong
# setting is answered in a second rather than after twenty seconds of imports.
from cli_puma import UsageError, check_model_path, looks_like_path, run_command  # noqa: E402


CONFIG_FILE = os.path.join(HERE, "space_config.json")
DEFAULTS = {"model": None, "gallery": "gallery", "gallery_split": "train", "title": "PUMA multimodal search",
            "instruction": "", "top_k": 8}
# Columns a `datasets` gallery may hold its texts in, in order of preference.
TEXT_COLUMNS = ("text", "caption")
# Files that make a folder a `datasets` image folder with metadata (captions and other columns per image).
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
FAMILY_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL",
                "qwen3_vl_moe": "Qwen3-VL-MoE"}
THUMBNAIL = (256, 256)

THUMBNAIL_DPI = 72
def theme():
    """The page's theme: system fonts only, so that the page loads nothing from outside the Space."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def resolve_gallery(source: str, base: str) -> str:
    """`source` as a path relative to `base` when a file or folder is there (or it reads as a path), else unchanged
    (a Hub dataset id); a path that does not exist is a `FileNotFoundError` naming it."""
    path = os.path.join(base, os.path.expanduser(source))
    if os.path.exists(path):
        return os.path.normpath(path)
    if looks_like_path(source) or source.endswith((".jsonl", ".json")):
        raise FileNotFoundError(f"Gallery {source}: {os.path.normpath(path)} does not exist.")
    return source


def load_config() -> dict:
    """`DEFAULTS`, then `space_config.json`, then the `PUMA_*` environment variables; the gallery resolved (a relative
    `PUMA_GALLERY` against the working directory, a relative gallery of `space_config.json` against its folder).
    Raises `UsageError` on a missing model or a bad number of results, `FileNotFoundError` on a missing gallery."""
    config = dict(DEFAULTS)
    if os.path.isfile(CONFIG_FILE):
        with open(CONFIG_FILE, encoding="utf-8") as f:
            config.update(json.load(f))
    gallery_base = HERE
    for key in DEFAULTS:
        if os.environ.get(f"PUMA_{key.upper()}"):
            config[key] = os.environ[f"PUMA_{key.upper()}"]
            if key == "gallery":  # typed by the user, relative to where they are
                gallery_base = os.getcwd()
    if not config["model"]:
        raise UsageError("No model: set PUMA_MODEL or write space_config.json with space_puma.save_space_folder.")
    try:
        config["top_k"] = int(config["top_k"])
    except ValueError as err:
        raise UsageError(f"PUMA_TOP_K={config['top_k']}: give a whole number of results") from err
    if config["top_k"] < 1:
        raise UsageError(f"PUMA_TOP_K={config['top_k']}: give a positive number of results")
    config["gallery"] = resolve_gallery(config["gallery"], gallery_base)
    return config


def _gallery_kind(path: str) -> str:
    """'corpus' (a folder of images and .txt files, or a JSONL file), 'saved' (`save_to_disk`), 'imagefolder' (with
    a metadata file) or 'hub' (not a local path)."""
    if os.path.isfile(path):
        return "corpus"
    if not os.path.isdir(path):
        return "hub"
    if any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_info.json", "dataset_dict.json")):
        return "saved"
    if any(os.path.isfile(os.path.join(path, name)) for name in METADATA_FILES):
        return "imagefolder"
    return "corpus"


def load_gallery(source: str, split: str = "train") -> tuple[list[str], list[dict], str | None]:
    """`(ids, items, image_root)` of a gallery (see the module docstring): a folder of images and `.txt` files or a
    JSONL file (`puma_eval.corpus.load_corpus`), or a `datasets` dataset with an `image` and/or a text column
    (`TEXT_COLUMNS`) and an optional `id` column, whose items hold PIL images. A relative path is relative to the
    working directory (`load_config` resolves the settings' paths)."""
    kind = _gallery_kind(source)
    if kind == "corpus":
        from puma_eval.corpus import load_corpus

        return load_corpus(source)
    import datasets

    if kind == "saved":
        dataset = datasets.load_from_disk(source)
    elif kind == "imagefolder":
        dataset = datasets.load_dataset("imagefolder", data_dir=source, split=split)
    else:
        dataset = datasets.load_dataset(source, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"Gallery dataset {source} has no split {split!r} (it has {sorted(dataset)}); set "
                             "PUMA_GALLERY_SPLIT.")
        dataset = dataset[split]
    columns = set(dataset.column_names)
    text_column = next((name for name in TEXT_COLUMNS if name in columns), None)
    if "image" not in columns and text_column is None:
        raise ValueError(f"Gallery dataset {source} has neither an 'image' nor a text column "
                         f"({' or '.join(TEXT_COLUMNS)}); its columns are {sorted(columns)}.")
    ids = [str(i) for i in dataset["id"]] if "id" in columns else [str(i) for i in range(len(dataset))]
    items = [{"text": (row.get(text_column) or None) if text_column else None, "image": row.get("image")}
             for row in dataset]
    return ids, items, None


def model_description(model) -> str:
    """What the page says of the model: its name, family and the decoder layers it keeps."""
    config = model.config
    family = FAMILY_NAMES.get(config.base_model_type, config.base_model_type)
    kept, total = len(config.kept_layers), config.base_num_hidden_layers
    layers = f"all {total} decoder layers" if kept == total else f"{kept} of the {total} decoder layers"
    return f"`{model.name_or_path}`: PUMA embeddings from {layers} of a {family} model"


def gallery_kinds(items: list[dict]) -> str:
    """What a gallery holds, in words: "images and texts", "images, videos, document pages and texts", ..."""
    kinds = [word for key, word in (("image", "images"), ("video", "videos"), ("pdf", "document pages"),
                                    ("text", "texts"))
             if any(item.get(key) is not None and (key != "text" or all(item.get(k) is None
                                                                        for k in ("image", "video", "pdf")))
                    for item in items)]
    return kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " and " + kinds[-1]


def text_thumbnail(text: str) -> Image.Image:
    """A text item drawn as a card, so texts and images share the result gallery."""
    card = Image.new("RGB", THUMBNAIL, (245, 245, 240))
    lines = textwrap.wrap(text, width=34)[:14]
    ImageDraw.Draw(card).multiline_text((12, 12), "\n".join(lines), fill=(30, 30, 30), spacing=4)
    return card


def thumbnail(item: dict, root: str | None) -> Image.Image:
    """What the result gallery shows of an item: the image, a video's middle frame, a PDF page (rendered at 72 dpi)
    or the text drawn as a card."""
    def path(value):
        return os.path.join(root, value) if root and isinstance(value, str) else value

    if item.get("video") is not None:
        from modeling_puma import decode_video

        frames, *_ = decode_video(path(item["video"]), lambda total, fps: [total // 2])
        image = Image.fromarray(frames[0].permute(1, 2, 0).numpy())
    elif item.get("pdf") is not None:
        from modeling_puma import load_pdf_page

        image = load_pdf_page(path(item["pdf"]), item.get("page"), item["pdf"], dpi=THUMBNAIL_DPI)
    elif item.get("image") is not None:
        image = item["image"] if isinstance(item["image"], Image.Image) else Image.open(path(item["image"]))
    else:
        return text_thumbnail(item["text"])
    image = image.convert("RGB")
    image.thumbnail(THUMBNAIL)
    return image


def build_demo(index, title: str = DEFAULTS["title"], instruction: str = "", top_k: int = DEFAULTS["top_k"]):
    """The page (a `gr.Blocks` over a `puma_eval.corpus.CorpusIndex`): a text box and an image box for the query,
    an instruction, the number of results, and the ranked results as a gallery of thumbnails captioned
    `rank. id (score)` and as a table."""
    import gradio as gr

    def search(text, image, task_instruction, k, video=None):
        if not (text or "").strip() and image is None and video is None:
            raise gr.Error("Type a query, give an image or a video, or both.")
        if image is not None and video is not None:
            raise gr.Error("Give an image or a video, not both.")
        hits = index.search((text or "").strip() or None, image, int(k), (task_instruction or "").strip() or None,
                            video=video)
        gallery = [(thumbnail(hit, index.root), f"{hit['rank']}. {hit['id']} ({hit['score']:.3f})") for hit in hits]
        table = [[hit["rank"], round(hit["score"], 4), hit["id"], (hit["text"] or "")[:200]] for hit in hits]
        return gallery, table

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nSearch {len(index.ids):,} {gallery_kinds(index.items)} with a text, an image or a "
                    f"video, or a text and one of them. Model: {model_description(index.model)}.")
        with gr.Row():
            with gr.Column():
                query = gr.Textbox(label="Text query", placeholder="a dog catching a frisbee", elem_id="query-text")
                task = gr.Textbox(label="Instruction", value=instruction, elem_id="instruction",
                                  placeholder="Find an image that matches the given caption.")
                k = gr.Slider(1, min(50, len(index.ids)), value=min(top_k, len(index.ids)), step=1,
                              label="Results", elem_id="top-k")
                button = gr.Button("Search", variant="primary", elem_id="search")
            image = gr.Image(label="Image query", type="pil", elem_id="query-image")
            video = gr.Video(label="Video query", sources=["upload"], elem_id="query-video")
        gallery = gr.Gallery(label="Results", columns=4, object_fit="contain", height="auto", elem_id="results")
        table = gr.Dataframe(headers=["rank", "score", "id", "text"], label="Scores", elem_id="scores")
        for trigger in (button.click, query.submit):
            trigger(search, [query, image, task, k, video], [gallery, table])
    return demo


def main(argv=None) -> None:
    """Checks the settings and reads the gallery, then loads the model, encodes the gallery and serves the page."""
    config = load_config()
    check_model_path(config["model"], "PUMA_MODEL")
    ids, items, root = load_gallery(config["gallery"], config["gallery_split"])
    from modeling_puma import PumaForEmbedding
    from puma_eval.corpus import CorpusIndex

    model = PumaForEmbedding.from_pretrained(config["model"])
    cache = os.environ.get("PUMA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "puma_space"))
    index = CorpusIndex(model, ids, items, root, cache_dir=cache, show_progress_bar=True)
    build_demo(index, config["title"], config["instruction"], config["top_k"]).launch(theme=theme())


if __name__ == "__main__":
    run_command(main)

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""A Hugging Face Space that searches a gallery with a PUMA model: `save_space_folder` writes it, `push_space`
creates the Space and uploads it.

    from space_puma import push_space, save_space_folder

    save_space_folder("puma-search", "my-org/puma-2b", gallery="photos/")       # then: python puma-search/app.py
    push_space("me/puma-search", "my-org/puma-2b", gallery="photos/")

The folder holds `space/app.py` (Gradio), the project modules it imports, `space_config.json` (model, gallery,
instruction, number of results), `requirements.txt`, the gallery (copied when it is a local folder or JSONL file;
a Hub dataset id is read at start-up) and a README whose metadata tells the Hub it is a Gradio Space.
"""

import json
import os
import shutil
import tempfile

from huggingface_hub import HfApi, SpaceCard, SpaceCardData

from configuration_puma import SUPPORTED_TRANSFORMERS
from hub_puma import asset_folder, check_hub_reachable


ROOT = os.path.dirname(os.path.abspath(__file__))
APP_FILE = os.path.join(asset_folder("space", "puma_space"), "app.py")
# What app.py imports from the project (cli_puma, puma_eval.corpus and their imports).
PROJECT_FILES = ("configuration_puma.py", "modeling_puma.py", "mbeir_puma.py", "cli_puma.py", "puma_eval")
# Gradio comes with the Space's SDK; these are what the app adds.
REQUIREMENTS = ("torch>=2.4", "torchvision>=0.19", f"transformers{SUPPORTED_TRANSFORMERS}", "safetensors>=0.4.3",
                "accelerate>=1.0", "faiss-cpu>=1.8", "pillow>=10", "numpy>=1.24", "datasets>=3.0",
                "av>=12", "pypdfium2>=4.30")  # the last two: video queries and galleries of videos and PDFs


def save_space_folder(out_dir, model_id: str, *, gallery=None, gallery_split: str = "train",
                      title: str = "PUMA multimodal search", instruction: str = "", top_k: int = 8,
                      license: str | None = "apache-2.0", emoji: str = "🔎") -> str:
    """Writes the Space to `out_dir` and returns it.

    Args:
        model_id: the PUMA checkpoint the Space loads (Hub id, or a path the Space can read).
        gallery: a folder of images and `.txt` files or a JSONL file (copied into `out_dir/gallery`), or a `datasets`
            Hub id (read by the Space at start-up).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(APP_FILE, os.path.join(out_dir, "app.py"))
    for name in PROJECT_FILES:
        source, target = os.path.join(ROOT, name), os.path.join(out_dir, name)
        if os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    gallery_entry = gallery
    if gallery is not None and os.path.exists(gallery):
        if os.path.isdir(gallery):
            shutil.copytree(gallery, os.path.join(out_dir, "gallery"), dirs_exist_ok=True)
            gallery_entry = "gallery"
        else:
            from mbeir_puma import read_jsonl

            os.makedirs(os.path.join(out_dir, "gallery"), exist_ok=True)
            shutil.copy(gallery, os.path.join(out_dir, "gallery", os.path.basename(gallery)))
            for record in read_jsonl(gallery):  # the images the records name, at the same relative paths
                if record.get("image"):
                    target = os.path.join(out_dir, "gallery", record["image"])
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(gallery)), record["image"]), target)
            gallery_entry = os.path.join("gallery", os.path.basename(gallery))
    with open(os.path.join(out_dir, "space_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model": model_id, "gallery": gallery_entry or "gallery", "gallery_split": gallery_split,
                   "title": title, "instruction": instruction, "top_k": top_k}, f, indent=2)
    with open(os.path.join(out_dir, "requirements.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(REQUIREMENTS) + "\n")
    import gradio

    card_data = SpaceCardData(title=title, emoji=emoji, colorFrom="indigo", colorTo="blue", sdk="gradio",
                              sdk_version=gradio.__version__, app_file="app.py", pinned=False, license=license,
                              models=[model_id], tags=["multimodal", "retrieval", "puma"])
    content = (f"---\n{card_data.to_yaml()}\n---\n\n# {title}\n\nSearch a gallery of images and texts with "
               f"[{model_id}](https://huggingface.co/{model_id}), a PUMA embedding model "
               "([arXiv 2507.08064](https://arxiv.org/abs/2507.08064)): type a text, drop an image, or both.\n")
    SpaceCard(content).save(os.path.join(out_dir, "README.md"))
    return out_dir


def push_space(repo_id: str, model_id: str, *, token: str | None = None, private: bool | None = None,
               endpoint: str | None = None, commit_message: str = "Upload PUMA search Space", **space_kwargs):
    """Creates the Gradio Space `repo_id` if needed and uploads the folder `save_space_folder` writes; returns the
    `CommitInfo`. An offline machine fails at once with an error naming the Space (as `hub_puma.push_to_hub`)."""
    api = HfApi(endpoint=endpoint, token=token)
    check_hub_reachable(api.endpoint, repo_id,
                        fallback="write the Space with save_space_folder() and upload that folder later")
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_space_folder(os.path.join(tmp, repo_id.split("/")[-1]), model_id, **space_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="space", commit_message=commit_message)


__all__ = ["push_space", "save_space_folder"]

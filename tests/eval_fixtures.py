# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Fixtures of the evaluation tests: a saved tiny PUMA checkpoint, a small M-BEIR-format benchmark with its own task
table, coloured images, and a counter of encoded items."""

import json
import os

import pytest
from PIL import Image

from modeling_puma import PumaForEmbedding
from puma_eval.tasks import MBEIR_GLOBAL_POOL, MBEIR_INSTRUCTIONS


@pytest.fixture(scope="module")
def puma_checkpoint(tiny_checkpoint, tmp_path_factory):
    """A saved 2-layer PUMA checkpoint of the tiny random Qwen2-VL."""
    folder = str(tmp_path_factory.mktemp("puma") / "tiny-puma")
    PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(puma_checkpoint):
    return PumaForEmbedding.from_pretrained(puma_checkpoint)


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def candidate(did, txt=None, img_path=None):
    modality = "image,text" if txt and img_path else ("image" if img_path else "text")
    return {"did": did, "txt": txt, "img_path": img_path, "modality": modality}


def query(qid, text, positive, modality="text"):
    return {"qid": qid, "query_txt": text, "query_img_path": None, "query_modality": modality,
            "pos_cand_list": [positive], "neg_cand_list": [], "task_id": 0}


TEXT_POOL = [candidate("1:0", "a red circle"), candidate("1:1", "two blue squares"), candidate("1:2", "a green star"),
             candidate("1:3", "three yellow triangles"), candidate("1:4", "a purple hexagon")]
IMAGE_POOL = [candidate(f"2:{i}", img_path=f"images/{name}.png") for i, name in enumerate(["red", "green", "blue"])]
DISTRACTORS = [candidate(f"3:{i}", text) for i, text in enumerate(
    ["a red square", "two blue circles", "a green triangle", "a yellow star", "a circle", "squares"])] + \
    [candidate(f"4:{i}", img_path=f"images/{name}.png") for i, name in enumerate(["grey", "black"])]
TEXT_QUERIES = [query("1:0", "something red and round", "1:0"), query("1:1", "blue shapes", "1:1"),
                query("1:2", "a star", "1:2")]
IMAGE_QUERIES = [query("2:0", "a red picture", "2:0"), query("2:1", "a green picture", "2:1")]
INSTRUCTIONS = ("query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2\n"
                "text\ttext\tShapes\t1\tFind the matching sentence.\tRetrieve a paraphrase.\n"
                "text\timage\tPictures\t2\tFind the picture.\n")
TASK_TABLE = {"tasks": [
    {"name": "shapes_task1", "test_file": "query/test/shapes_task1_test.jsonl",
     "local_pool_file": "cand_pool/local/shapes_task1_cand_pool.jsonl", "query_modality": "text",
     "cand_modality": "text"},
    {"name": "pictures_task0", "test_file": "query/test/pictures_task0_test.jsonl",
     "local_pool_file": "cand_pool/local/pictures_task0_cand_pool.jsonl", "query_modality": "text",
     "cand_modality": "image", "metric_k": 1},
]}
COLOURS = {"red": (220, 20, 20), "green": (20, 160, 20), "blue": (20, 20, 220), "grey": (128, 128, 128),
           "black": (0, 0, 0)}


def write_images(folder):
    os.makedirs(folder, exist_ok=True)
    for name, colour in COLOURS.items():
        Image.new("RGB", (40, 32), colour).save(os.path.join(folder, f"{name}.png"))


@pytest.fixture
def benchmark(tmp_path):
    """A small benchmark in M-BEIR's format with its own task table: a text->text and a text->image task, their
    local pools, and a global pool that adds text and image distractors."""
    root = tmp_path / "bench"
    write_images(root / "images")
    write_jsonl(str(root / "query/test/shapes_task1_test.jsonl"), TEXT_QUERIES)
    write_jsonl(str(root / "query/test/pictures_task0_test.jsonl"), IMAGE_QUERIES)
    write_jsonl(str(root / "cand_pool/local/shapes_task1_cand_pool.jsonl"), TEXT_POOL)
    write_jsonl(str(root / "cand_pool/local/pictures_task0_cand_pool.jsonl"), IMAGE_POOL)
    write_jsonl(str(root / MBEIR_GLOBAL_POOL), TEXT_POOL + IMAGE_POOL + DISTRACTORS)
    os.makedirs(root / "instructions")
    (root / MBEIR_INSTRUCTIONS).write_text(INSTRUCTIONS, encoding="utf-8")
    (root / "tasks.json").write_text(json.dumps(TASK_TABLE), encoding="utf-8")
    return root


class EncodeCounter:
    """Wraps `model.encode` to count the items it embeds."""

    def __init__(self, model, monkeypatch):
        self.count = 0
        original = model.encode

        def counting(inputs, **kwargs):
            self.count += len(inputs)
            return original(inputs, **kwargs)

        monkeypatch.setattr(model, "encode", counting)

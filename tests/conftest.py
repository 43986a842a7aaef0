"""Shared fixtures: tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints written offline in the key layouts
real checkpoints use, single file and sharded."""

import os
import sys

import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tiny_puma import build_tiny_checkpoint  # noqa: E402


TINY_DEPTH = 6
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """`{(layout, num_shards): folder}` of one random Qwen2-VL (seed 0) in the old and new key layouts."""
    root = tmp_path_factory.mktemp("qwen2vl")
    folders = {}
    for layout in ("old", "new"):
        for shards in (1, 3):
            folders[(layout, shards)] = build_tiny_checkpoint(str(root / f"{layout}-{shards}"), "qwen2_vl", layout,
                                                              shards, seed=0)
    return folders


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoints):
    """The layout Qwen/Qwen2-VL-2B-Instruct is published in: transformers <= 4.51 keys, one file."""
    return tiny_checkpoints[("old", 1)]


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory, tiny_checkpoint):
    """`{family: folder}`: a tiny random checkpoint of each family in the layout its Hub checkpoints use."""
    root = tmp_path_factory.mktemp("families")
    folders = {"qwen2_vl": tiny_checkpoint}
    for family in FAMILIES[1:]:
        folders[family] = build_tiny_checkpoint(str(root / family), family, seed=0)
    return folders


@pytest.fixture(scope="session")
def embedder_checkpoints(tmp_path_factory):
    """Tiny random checkpoints laid out like Qwen/Qwen3-VL-Embedding-2B and Alibaba-NLP/gme-Qwen2-VL-2B-Instruct
    (named so, so that their recipe is detected from the name)."""
    root = tmp_path_factory.mktemp("embedders")
    return {"qwen3_vl_embedding": build_tiny_checkpoint(str(root / "Qwen3-VL-Embedding-tiny"), "qwen3_vl",
                                                        embedder="qwen3_vl_embedding", max_pixels=64 * 32 * 32),
            "gme": build_tiny_checkpoint(str(root / "gme-Qwen2-VL-tiny"), "qwen2_vl", embedder="gme")}


@pytest.fixture(scope="session")
def mbeir_root(tmp_path_factory):
    """A tiny M-BEIR tree in UniIR's exact layout (`mbeir_layout.write_mbeir_tree`); do not modify it."""
    from mbeir_layout import write_mbeir_tree

    root = tmp_path_factory.mktemp("M-BEIR")
    write_mbeir_tree(root)
    return str(root)


def draw_images():
    """Three small RGB images of different sizes and contents."""
    from PIL import Image, ImageDraw

    out = []
    for i, (size, colour) in enumerate([((90, 60), (200, 10, 10)), ((40, 120), (20, 160, 30)), ((64, 64), (0, 0, 255))]):
        image = Image.new("RGB", size, (255, 255, 255))
        ImageDraw.Draw(image).ellipse([4 + i, 4, size[0] - 6, size[1] - 8 + i], fill=colour)
        out.append(image)
    return out


@pytest.fixture
def images():
    return draw_images()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)

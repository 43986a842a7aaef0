"""Save with one transformers major, load with the other: PUMA folders and plain family exports.

    python tests/cross_version.py save DIR     # in one virtual environment (e.g. transformers 5.x)
    python tests/cross_version.py check DIR    # in another (e.g. transformers 4.57): loads and compares

`save` builds tiny random Qwen2-VL and Qwen3-VL checkpoints, prunes them with PUMA, writes each PUMA folder
(`save_pretrained`) and its plain family export, and stores the embeddings of texts, images and image+text pairs.
`check` loads every PUMA folder with `AutoModel.from_pretrained(..., trust_remote_code=True)` (the project blocked
from import) and every export with `AutoModel`, the family's `*Model` and `*ForConditionalGeneration` (Qwen3-VL on
4.57: the last only, as for Qwen's own checkpoints), and asserts
that all embeddings equal the stored ones within 100 float32 ulps (another major may run other kernels, which round
differently). CI runs it both ways.
"""

import json
import os
import sys

import numpy as np

from numerics import assert_close  # beside this script


# non-contiguous Qwen2-VL layers; Qwen3-VL with DeepStack; Qwen3-VL-MoE, whose fused experts each major holds differently
CASES = {"qwen2_vl": [0, 1, 5], "qwen3_vl": [0, 1], "qwen3_vl_moe": [0, 2, 3]}


def inputs(root):
    """Texts, images (by path) and image+text pairs, of different lengths and sizes."""
    from PIL import Image, ImageDraw

    paths = []
    for index, (size, colour) in enumerate((((97, 61), (200, 20, 20)), ((45, 130), (20, 150, 40)))):
        image = Image.new("RGB", size, (250, 250, 250))
        ImageDraw.Draw(image).ellipse([5, 5, size[0] - 7, size[1] - 9], fill=colour)
        paths.append(os.path.join(root, f"image{index}.png"))
        image.save(paths[-1])
    return ["a red circle", {"image": paths[0]}, {"text": "two blue squares", "image": paths[1]}]


def export_embeddings(folder, class_name, items):
    """The export card's recipe with vanilla transformers: prompts cut after the pooled token, the recipe's resize,
    left padding, the last position."""
    import torch
    import transformers
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    meta = json.load(open(os.path.join(folder, "puma_export_meta.json")))
    model = getattr(transformers, class_name).from_pretrained(folder, dtype=torch.float32).eval()
    model = model.model if hasattr(model, "lm_head") else model
    processor = transformers.AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    images = []
    for item in items:
        if isinstance(item, dict) and item.get("image"):
            image = Image.open(item["image"]).convert("RGB")
            height, width = smart_resize(image.height, image.width, factor=meta["factor"],
                                         min_pixels=meta["min_pixels"], max_pixels=meta["max_pixels"])
            images.append(image.resize((width, height), Image.BICUBIC))
    batch = processor(text=meta["prompts"], images=images or None, padding=True, return_tensors="pt", do_resize=False)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state[:, -1]
    return torch.nn.functional.normalize(hidden, dim=-1).numpy()


def save(out):
    import transformers

    from hub_puma import _cut_after_pooled_token, export_plain_checkpoint
    from modeling_puma import PumaForEmbedding, parse_input
    from tiny_puma import build_tiny_checkpoint

    os.makedirs(out, exist_ok=True)
    items = inputs(out)
    for family, layers in CASES.items():
        base = build_tiny_checkpoint(os.path.join(out, f"{family}-base"), family, max_pixels=24 * 32 * 32)
        model = PumaForEmbedding.from_pretrained(base, kept_layers=layers)
        model.save_pretrained(os.path.join(out, f"{family}-puma"))
        np.save(os.path.join(out, f"{family}.npy"), model.encode(items, convert_to_numpy=True))
        export = export_plain_checkpoint(os.path.join(out, f"{family}-puma"), os.path.join(out, f"{family}-export"),
                                         license="apache-2.0")
        vision = model.config.vision_config
        prompts = []
        for index, item in enumerate(items):
            text, image = parse_input(item, index)
            prompts.append(_cut_after_pooled_token(model.build_prompt(text, image is not None), model.config))
        json.dump({"prompts": prompts, "factor": vision.patch_size * vision.spatial_merge_size,
                   "min_pixels": model.config.min_pixels, "max_pixels": model.config.max_pixels},
                  open(os.path.join(export, "puma_export_meta.json"), "w"))
    json.dump({"transformers": transformers.__version__}, open(os.path.join(out, "saved_with.json"), "w"))
    print(f"saved with transformers {transformers.__version__} to {out}")


def check(out):
    import transformers

    from modeling_puma import transformers_major

    for name in ("modeling_puma", "configuration_puma", "hub_puma", "tiny_puma"):  # only the folders' own code
        sys.modules[name] = None
    from transformers import AutoModel

    saved_with = json.load(open(os.path.join(out, "saved_with.json")))["transformers"]
    items = inputs(out)
    generation = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
                  "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}
    backbone = {"qwen2_vl": "Qwen2VLModel", "qwen3_vl": "Qwen3VLModel", "qwen3_vl_moe": "Qwen3VLMoeModel"}
    for family in CASES:
        if family == "qwen3_vl_moe" and transformers_major(saved_with) >= 5 and transformers_major() < 5:
            # transformers 5's own save_pretrained writes fused experts in its in-memory layout, which 4.57 cannot
            # read; PUMA folders and exports of Qwen3-VL-MoE inherit that
            print(f"{family}: not checked from {saved_with} to {transformers.__version__} (transformers 5 writes "
                  "Qwen3-VL-MoE experts in a layout 4.57 cannot read, in its own save_pretrained too)")
            continue
        expected = np.load(os.path.join(out, f"{family}.npy"))
        model = AutoModel.from_pretrained(os.path.join(out, f"{family}-puma"), trust_remote_code=True)
        got = model.encode(items, convert_to_numpy=True)
        assert_close(got, expected, ulps=100, name=f"{family} PUMA folder")
        # the export's processor resizes into the recipe's pixel range on this major too
        meta = json.load(open(os.path.join(out, f"{family}-export", "puma_export_meta.json")))
        image_processor = transformers.AutoProcessor.from_pretrained(os.path.join(out, f"{family}-export")).image_processor
        size = image_processor.size if isinstance(image_processor.size, dict) else dict(image_processor.size)
        limits = (getattr(image_processor, "min_pixels", None) or size["shortest_edge"],
                  getattr(image_processor, "max_pixels", None) or size["longest_edge"])
        assert limits == (meta["min_pixels"], meta["max_pixels"]), (family, limits, size)
        classes = ("AutoModel", backbone[family], generation[family])
        if family.startswith("qwen3_vl") and transformers.__version__.startswith("4."):
            # exports keep the Hub's Qwen3-VL layout (`model.language_model.*`, what vLLM reads), which 4.57's
            # Qwen3VLModel cannot load (Qwen's own checkpoints neither): its generation class is the 4.57 way
            classes = (generation[family],)
        for class_name in classes:
            got = export_embeddings(os.path.join(out, f"{family}-export"), class_name, items)
            assert_close(got, expected, ulps=100, name=f"{family} export via {class_name}")
        print(f"{family}: PUMA folder and export ({len(classes)} classes) saved with {saved_with} equal with "
              f"{transformers.__version__}")
    print("CROSS-VERSION-OK")


if __name__ == "__main__":
    command, folder = sys.argv[1:3]
    {"save": save, "check": check}[command](folder)

"""Quickstart: build a tiny Qwen2-VL offline, prune it to its first layers with PUMA, embed texts and images.

    python quickstart.py [--out demo_out] [--num-layers 3]

The base model is tiny and randomly initialised (nothing can be downloaded here), so the similarities only show the
mechanics: load-time pruning, the prompt format, and one embedding space for texts, images and image+text pairs.
With real weights the same code is `PumaForEmbedding.from_pretrained("Qwen/Qwen2-VL-2B-Instruct", num_layers=12)`.
"""

import argparse
import os

from PIL import Image, ImageDraw

from modeling_puma import PumaForEmbedding
from tiny_puma import build_tiny_checkpoint


def shape_image(colour: str, shape: str, size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = [size // 5, size // 5, size * 4 // 5, size * 4 // 5]
    draw.ellipse(box, fill=colour) if shape == "circle" else draw.rectangle(box, fill=colour)
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--num-layers", type=int, default=3)
    args = parser.parse_args()

    base = os.path.join(args.out, "tiny-qwen2vl")
    if not os.path.isfile(os.path.join(base, "config.json")):
        build_tiny_checkpoint(base)
    model = PumaForEmbedding.from_pretrained(base, num_layers=args.num_layers)
    pruned = os.path.join(args.out, f"puma-tiny-k{args.num_layers}")
    model.save_pretrained(pruned)
    print(f"kept layers {model.config.kept_layers} of {model.config.base_num_hidden_layers}; saved to {pruned}")

    queries = ["a red circle", "a blue square", {"text": "the same shape but blue", "image": shape_image("red", "circle")}]
    candidates = [shape_image("red", "circle"), shape_image("blue", "rectangle"), "a blue circle on white"]
    q = model.encode(queries, instruction="Retrieve the matching item.", is_query=True)
    c = model.encode(candidates)
    scores = q @ c.T
    names = ["img:red circle", "img:blue square", "txt:blue circle"]
    labels = ["a red circle", "a blue square", "img+txt: same but blue"]
    print(f"{'query / candidate':<24}" + "".join(f"{n:>17}" for n in names))
    for label, row in zip(labels, scores):
        print(f"{label:<24}" + "".join(f"{v:>17.3f}" for v in row.tolist()))
    print("(random tiny base: similarities are not meaningful until trained)")


if __name__ == "__main__":
    main()

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Writes randomly initialised Qwen2-VL checkpoints offline, laid out like the real ones on the Hub.

A checkpoint folder holds `config.json`, safetensors weights (one file or shards with `model.safetensors.index.json`)
in either key layout real checkpoints use, and, for the tiny model, a byte-level BPE tokenizer trained on the fly with
Qwen2-VL's special tokens plus a real `Qwen2VLProcessor`. Nothing here is pretrained: the weights are random.

    python tiny_qwen2vl.py OUT_DIR [--layout old|new] [--shards N] [--shape tiny|2b] [--dtype bfloat16]
"""

import argparse
import json
import os
import zlib

import torch
from safetensors.torch import save_file


QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]

# Qwen/Qwen2-VL-7B-Instruct's chat template.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

# Shapes: text config (flat, as in the Hub's config.json) and vision config.
SHAPES = {
    "tiny": {
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                     tie_word_embeddings=True),
        "vision": dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2),
    },
    # tiny but not trivial: 28 layers like the 7B, so k=12 keeps the release's depth ratio (benchmarks)
    "small": {
        "text": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=28, num_attention_heads=6,
                     num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
                     tie_word_embeddings=True),
        "vision": dict(depth=4, embed_dim=192, hidden_size=384, mlp_ratio=4, num_heads=4),
    },
    # Qwen/Qwen2-VL-2B-Instruct
    "2b": {
        "text": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, tie_word_embeddings=True),
        "vision": dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16),
    },
}

TINY_CORPUS = [
    "a red circle on a white background", "two blue squares next to a green triangle", "a small yellow star",
    "the same object but red", "find an image that matches the caption", "retrieve a sentence that answers the question",
    "a photo of a dog running on the beach", "what is shown in this picture", "a large purple hexagon at the top left",
    "Summarize above image in one word:", "Summarize above sentence in one word:",
    "Summarize above image and sentence in one word:", "You are a helpful assistant.",
    "three orange diamonds in a row", "an empty grey canvas", "the quick brown fox jumps over the lazy dog",
    "A man is playing a guitar.", "Two women are walking in the park.", "There is a cat sitting on the mat.",
    "Find me an everyday image that matches the given caption.", "Retrieve a passage that provides an answer.",
]


def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained now on a small corpus, with Qwen2-VL's special tokens appended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(TINY_CORPUS * 4, trainer)
    tokenizer.add_special_tokens(QWEN2_VL_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right",
        model_max_length=32768, clean_up_tokenization_spaces=False,
    )


def save_tiny_processor(out_dir: str, min_pixels: int = 4 * 28 * 28, max_pixels: int = 16 * 28 * 28):
    """Saves a real `Qwen2VLProcessor` around the tiny tokenizer; returns the special-token ids for the config."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(out_dir)
    # Name the class real Qwen2-VL checkpoints name, so AutoTokenizer and the processor's type check accept it.
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=AutoTokenizer.from_pretrained(out_dir),
        video_processor=Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"), ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"), ("vision_token_id", "<|vision_pad|>"),
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>")]}
    return ids, len(tokenizer)


def hub_config(shape: str = "tiny", layout: str = "old", dtype: str = "float32", token_ids: dict | None = None,
               vocab_size: int | None = None, num_hidden_layers: int | None = None) -> dict:
    """A `config.json` dict as the Hub holds it: flat text fields (layout "old") or a nested `text_config` ("new")."""
    spec = SHAPES[shape]
    text = dict(spec["text"])
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    if num_hidden_layers is not None:
        text["num_hidden_layers"] = num_hidden_layers
    text.update(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                use_sliding_window=False, sliding_window=32768, max_window_layers=text["num_hidden_layers"],
                attention_dropout=0.0, initializer_range=0.02, use_cache=True)
    vision = dict(spec["vision"], in_chans=3, patch_size=14, spatial_patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    ids = token_ids or {"bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
                        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
                        "video_token_id": 151656}
    config = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "torch_dtype": dtype,
              "transformers_version": "4.41.2", **ids, "vision_config": vision}
    if layout == "old":
        config.update(text)
    else:
        config["tie_word_embeddings"] = text["tie_word_embeddings"]
        config["text_config"] = dict(text, model_type="qwen2_vl_text", **{k: ids[k] for k in ("bos_token_id", "eos_token_id")})
    return config


def parameter_shapes(config: dict) -> dict[str, torch.Size]:
    """Tensor names (transformers' in-memory layout) and shapes of `Qwen2VLForConditionalGeneration(config)`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**config))
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # tied checkpoints on the Hub do not store lm_head
    return shapes


def checkpoint_key(name: str, layout: str) -> str:
    """Maps an in-memory tensor name to its name in a checkpoint of the given layout."""
    if layout == "old":
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model."):]
        if name.startswith("model.visual."):
            return name[len("model."):]
    return name


def random_tensor(name: str, shape: torch.Size, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic per-name random values; norm weights near 1, matrices scaled by 1/sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=generator)
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    if name.endswith(".bias"):
        values *= 0.02
    elif "norm" in leaf or leaf in ("ln_q",):
        values = 1.0 + 0.1 * values
    elif len(shape) >= 2 and "embed_tokens" not in name:
        values /= (torch.tensor(shape[1:]).prod().float().sqrt())
    return values.to(dtype)


def write_random_checkpoint(out_dir: str, config: dict, layout: str = "old", num_shards: int = 1, seed: int = 0,
                            dtype: torch.dtype = torch.float32) -> list[str]:
    """Writes `config.json` and random weights in `layout`, split into `num_shards` safetensors files."""
    if layout not in ("old", "new"):
        raise ValueError(f"layout must be 'old' or 'new', got {layout!r}.")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    shapes = parameter_shapes(config)
    names = list(shapes)
    sizes = [shapes[n].numel() for n in names]
    budget = sum(sizes) / num_shards
    groups, current, filled = [], [], 0
    for name, size in zip(names, sizes):
        if current and filled + size > budget and len(groups) < num_shards - 1:
            groups.append(current)
            current, filled = [], 0
        current.append(name)
        filled += size
    groups.append(current)
    files, weight_map, total = [], {}, 0
    for i, group in enumerate(groups):
        filename = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {checkpoint_key(n, layout): random_tensor(n, shapes[n], seed, dtype) for n in group}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, os.path.join(out_dir, filename), metadata={"format": "pt"})
        weight_map.update({key: filename for key in tensors})
        files.append(filename)
        del tensors
    if len(groups) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files


def build_tiny_qwen2vl(out_dir: str, layout: str = "old", num_shards: int = 1, seed: int = 0,
                       num_hidden_layers: int | None = None, dtype: torch.dtype = torch.float32,
                       max_pixels: int = 16 * 28 * 28) -> str:
    """A complete tiny Qwen2-VL checkpoint folder (config, weights, tokenizer, processor); returns `out_dir`."""
    token_ids, num_tokens = save_tiny_processor(out_dir, max_pixels=max_pixels)
    vocab_size = (num_tokens + 8 + 63) // 64 * 64  # padded rows beyond the tokenizer, as in real checkpoints
    config = hub_config("tiny", layout, str(dtype).replace("torch.", ""), token_ids, vocab_size, num_hidden_layers)
    write_random_checkpoint(out_dir, config, layout, num_shards, seed, dtype)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--layout", choices=["old", "new"], default="old")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.shape == "tiny":
        build_tiny_qwen2vl(args.out_dir, args.layout, args.shards, args.seed, dtype=dtype)
    else:
        token_ids, num_tokens = save_tiny_processor(args.out_dir)  # a processor is needed to add the embedding token
        vocab_size = None if args.shape == "2b" else (num_tokens + 8 + 63) // 64 * 64
        config = hub_config(args.shape, args.layout, args.dtype, token_ids, vocab_size)
        write_random_checkpoint(args.out_dir, config, args.layout, args.shards, args.seed, dtype)
    print(f"wrote {args.shape} Qwen2-VL checkpoint ({args.layout} layout, {args.shards} shard(s)) to {args.out_dir}")


if __name__ == "__main__":
    main()

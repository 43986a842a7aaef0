"""The Qwen-VL family: Qwen2.5-VL and Qwen3-VL (with DeepStack) against transformers' own full models, and the
trained-embedder recipes (Qwen3-VL-Embedding, GME) against a reimplementation of their documented inference steps."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image, ImageDraw, ImageOps
from safetensors.torch import load_file, save_file

from conftest import TINY_DEPTH
from numerics import assert_close
from modeling_puma import PumaForEmbedding, TransformersCompatibilityError, load_image, reuses_visual_outputs
from test_modeling import features_for, inputs_of_every_kind, oracle
from tiny_puma import build_tiny_checkpoint


# Embeddings of the tiny models (float32, up to 6 layers) computed by two code paths that round differently (ours and
# transformers' or a reference implementation, batched or not): 100 float32 ulps of the largest value (~1.2e-5 on
# unit vectors)
FORWARD_ULPS = 100


@pytest.mark.parametrize("family,k", [
    ("qwen2_5_vl", 2), ("qwen2_5_vl", TINY_DEPTH),
    # the tiny Qwen3-VL injects DeepStack features after layers 0, 1 and 2: k below, at and above that count
    ("qwen3_vl", 1), ("qwen3_vl", 2), ("qwen3_vl", 3), ("qwen3_vl", 4), ("qwen3_vl", TINY_DEPTH),
    ("qwen3_vl_moe", 2), ("qwen3_vl_moe", TINY_DEPTH),
])
def test_pruned_family_model_matches_its_own_full_model_after_k_layers(family_checkpoints, images, family, k):
    # Given a stock checkpoint of the family, in the key layout its Hub checkpoints use
    checkpoint = family_checkpoints[family]
    # When it is pruned to k layers and run on a right-padded batch of text, image and image+text inputs
    model = PumaForEmbedding.from_pretrained(checkpoint, num_layers=k)
    assert type(model.model).__name__ == {"qwen2_5_vl": "Qwen2_5_VLModel", "qwen3_vl": "Qwen3VLModel",
                                          "qwen3_vl_moe": "Qwen3VLMoeModel"}[family]
    features = features_for(model, inputs_of_every_kind(images))
    assert (features["attention_mask"][:, -1] == 0).any()  # some rows are padded on the right
    with torch.no_grad():
        raw = model(**features).raw_embeddings
    # Then its embedding is the full model's final-norm hidden state entering layer k (after DeepStack injection)
    assert_close(raw, oracle(checkpoint, model, features, k), ulps=FORWARD_ULPS)


@pytest.mark.parametrize("k", [1, 2, 3, TINY_DEPTH])
def test_qwen3_unused_deepstack_mergers_are_neither_loaded_nor_left_without_gradient(family_checkpoints, images, k):
    model = PumaForEmbedding.from_pretrained(family_checkpoints["qwen3_vl"], num_layers=k)
    mergers = model.model.visual.deepstack_merger_list
    assert len(mergers) == min(k, 3) and model.config.vision_config.deepstack_visual_indexes == [0, 1, 2][:k]
    assert not any("deepstack_merger_list.3" in name or f"deepstack_merger_list.{min(k, 3)}." in name
                   for name in model.state_dict())
    # Every parameter takes part in an image batch's loss, as DDP needs (it fails on unused parameters)
    model.train()
    features = features_for(model, [images[0], {"text": "a red circle", "image": images[1]}])
    model(**features).embeddings.sum().backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_a_placeholder_image_reaches_every_vision_weight_through_what_the_language_model_reads(family_checkpoints,
                                                                                            family):
    model = PumaForEmbedding.from_pretrained(family_checkpoints[family], num_layers=2)
    model.train()
    visual, seen = model.model.visual, []
    ids = torch.tensor([[5, 6, 7, model.config.embedding_token_id]])
    if not reuses_visual_outputs(model):  # transformers releases whose backbone cannot take the tower's outputs
        with pytest.raises(TransformersCompatibilityError, match="mm_encoder_outputs"):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), run_vision_tower=True)
        return

    def record(module, args, output):  # which of the tensors the tower hands its caller the loss reaches
        for field in ("last_hidden_state", "pooler_output"):
            handed = getattr(output, field) * 1.0  # the caller's own tensor, as DeepSpeed's hooks hand it over
            handed.register_hook(lambda grad, field=field: seen.append(field))
            setattr(output, field, handed)
        return output

    visual.register_forward_hook(record)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), run_vision_tower=True).embeddings.sum().backward()
    # every weight of the tower gets a (zero) gradient, as the sharded processes that see images do ...
    unused = [name for name, p in visual.named_parameters() if p.grad is None]
    assert not unused, unused
    assert all(not p.grad.any() for p in visual.parameters())
    # ... through the merged features only, as an image's reaches the language model (DeepSpeed ZeRO-3 hooks each
    # tower output a gradient reaches, and needs the same hooks on every process)
    assert seen == ["pooler_output"]


def _qwen3_checkpoint_with_layers(source, layers, out_dir):
    """A stock Qwen3-VL checkpoint holding only `layers` of `source`, renumbered, with the DeepStack mergers of the
    kept injected layers renumbered alike, for transformers to load as the reference."""
    shutil.copytree(source, out_dir)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    config = json.load(open(os.path.join(source, "config.json")))
    indexes = config["vision_config"]["deepstack_visual_indexes"]
    kept_mergers = [i for i in layers if i < len(indexes)]
    out = {}
    for key, value in tensors.items():
        for prefix, kept in (("model.language_model.layers.", layers), ("model.visual.deepstack_merger_list.", kept_mergers)):
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split(".", 1)
                if int(index) in kept:
                    out[f"{prefix}{kept.index(int(index))}.{rest}"] = value
                break
        else:
            out[key] = value
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config["text_config"]["num_hidden_layers"] = len(layers)
    config["vision_config"]["deepstack_visual_indexes"] = [indexes[i] for i in kept_mergers]
    json.dump(config, open(os.path.join(out_dir, "config.json"), "w"))
    return out_dir


def test_qwen3_non_contiguous_layers_keep_the_injections_of_their_own_layers(family_checkpoints, images, tmp_path):
    layers = [0, 2, 5]  # injection 0 follows pruned layer 0, injection 2 pruned layer 1, layer 5 has none
    model = PumaForEmbedding.from_pretrained(family_checkpoints["qwen3_vl"], kept_layers=layers)
    assert model.config.vision_config.deepstack_visual_indexes == [0, 2]
    reference = _qwen3_checkpoint_with_layers(family_checkpoints["qwen3_vl"], layers, str(tmp_path / "subset"))
    features = features_for(model, inputs_of_every_kind(images))
    with torch.no_grad():
        raw = model(**features).raw_embeddings
    assert_close(raw, oracle(reference, model, features, len(layers)), ulps=FORWARD_ULPS)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_family_puma_checkpoint_saves_reloads_and_prunes_further(family_checkpoints, images, tmp_path, family):
    inputs = inputs_of_every_kind(images)
    model = PumaForEmbedding.from_pretrained(family_checkpoints[family], kept_layers=[0, 1, 3])
    model.save_pretrained(tmp_path / "puma")
    reloaded = PumaForEmbedding.from_pretrained(str(tmp_path / "puma"))
    assert reloaded.config.base_model_type == family and type(reloaded.model) is type(model.model)
    assert_close(reloaded.encode(inputs), model.encode(inputs), ulps=FORWARD_ULPS)
    further = PumaForEmbedding.from_pretrained(str(tmp_path / "puma"), kept_layers=[0, 3])
    direct = PumaForEmbedding.from_pretrained(family_checkpoints[family], kept_layers=[0, 3])
    assert_close(further.encode(inputs), direct.encode(inputs), ulps=FORWARD_ULPS)


# ---------------------------------------------------------------------------------------------------------------
# Trained embedders: their own recipe at full depth
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def photos():
    """Images of odd sizes, so that every resize step matters."""
    out = []
    for size, colour in (((97, 61), (200, 20, 20)), ((45, 130), (20, 150, 40))):
        image = Image.new("RGB", size, (250, 250, 250))
        ImageDraw.Draw(image).ellipse([5, 5, size[0] - 7, size[1] - 9], fill=colour)
        out.append(image)
    return out


def _last_token(hidden, attention_mask):
    """The reference's pooling: the last position whose attention mask is 1 (flip + argmax)."""
    column = attention_mask.shape[1] - attention_mask.flip(dims=[1]).argmax(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0]), column]


def qwen3_vl_embedding_reference(checkpoint, inputs, instruction=None):
    """Qwen3-VL-Embedding's inference (QwenLM/Qwen3-VL-Embedding `src/models/qwen3_vl_embedding.py`): a system turn
    with the instruction (default "Represent the user's input."; "." added unless it ends with punctuation), a user
    turn of images then texts, the processor's chat template with the generation prompt, qwen-vl-utils' `fetch_image`
    (factor 32, [4, 1800] x 32^2 pixels) and `do_resize=False`, transformers' `Qwen3VLModel`, the last attended
    token's hidden state, L2-normalised."""
    import unicodedata

    from qwen_vl_utils import fetch_image

    processor = transformers.Qwen3VLProcessor.from_pretrained(checkpoint, padding_side="right")
    # (through the generation class, which both transformers majors load this key layout into)
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).model.eval()
    if instruction:
        instruction = instruction.strip()
        if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
            instruction += "."
    texts, images = [], []
    for item in inputs:
        content = []
        if item.get("image") is not None:
            image = fetch_image({"image": item["image"], "min_pixels": 4 * 32 * 32, "max_pixels": 1800 * 32 * 32},
                                image_patch_size=16)
            images.append(image)
            content.append({"type": "image", "image": image})
        if item.get("text"):
            content.append({"type": "text", "text": item["text"]})
        conversation = [{"role": "system", "content": [{"type": "text", "text": instruction or "Represent the user's input."}]},
                        {"role": "user", "content": content}]
        texts.append(processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
    batch = processor(text=texts, images=images or None, truncation=True, max_length=8192, padding=True,
                      do_resize=False, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return F.normalize(_last_token(hidden, batch["attention_mask"]), p=2, dim=-1), batch


def gme_fetch_image(image):
    """GME's `fetch_image` (its copy of an early qwen-vl-utils): a path opened or a PIL image taken as it is,
    `convert("RGB")` (alpha discarded, no EXIF rotation), `smart_resize` at factor 28 into [4, 16384] x 28^2 pixels,
    PIL's default (bicubic) resize."""
    from qwen_vl_utils.vision_process import smart_resize

    image = (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")
    height, width = smart_resize(image.height, image.width, 28, 4 * 28 * 28, 16384 * 28 * 28)
    return image.resize((width, height))


def gme_reference(checkpoint, inputs, instruction=None, is_query=True):
    """GME's inference (Alibaba-NLP/gme-Qwen2-VL `gme_inference.py`): the hand-built prompt
    `<|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n{image}{text}<|im_end|>\\n<|im_start|>assistant\\n
    <|endoftext|>` (instruction "You are a helpful assistant." for candidates or when none is given; an empty one
    stays empty), `gme_fetch_image` then the processor's own resize into [256, 1280] x 28^2, the whole sequence
    truncated to 1800 tokens, the text decoder run on the input embeddings (image features scattered in) with
    `position_ids=None`, i.e. positions 0..L-1 for every token, the last attended token, L2-normalised."""
    min_pixels, max_pixels = 256 * 28 * 28, 1280 * 28 * 28
    processor = transformers.Qwen2VLProcessor.from_pretrained(checkpoint, min_pixels=min_pixels, max_pixels=max_pixels)
    processor.tokenizer.padding_side = "right"
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).model.eval()
    if not is_query or instruction is None:
        instruction = "You are a helpful assistant."
    texts, images = [], []
    for item in inputs:
        prompt = ""
        if item.get("image") is not None:
            prompt += "<|vision_start|><|image_pad|><|vision_end|>"
            images.append(gme_fetch_image(item["image"]))
        prompt += item.get("text") or ""
        texts.append(f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
                     "<|im_start|>assistant\n<|endoftext|>")
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    batch = processor(text=texts, images=images or None, padding=True, truncation=True, max_length=1800,
                      return_tensors="pt", size=size, min_pixels=min_pixels, max_pixels=max_pixels)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        if images:
            image_embeds = model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
            image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
            embeds[batch["input_ids"] == model.config.image_token_id] = image_embeds
        length = batch["input_ids"].shape[1]
        positions = torch.arange(length).view(1, 1, -1).expand(3, len(texts), -1)
        hidden = model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                      position_ids=positions).last_hidden_state
    return F.normalize(_last_token(hidden, batch["attention_mask"]), p=2, dim=-1), batch


def test_qwen3_vl_embedding_at_full_depth_is_the_embedder_itself(embedder_checkpoints, photos):
    pytest.importorskip("qwen_vl_utils", reason="the reference's image loading is qwen-vl-utils' fetch_image")
    checkpoint = embedder_checkpoints["qwen3_vl_embedding"]
    # Given the embedder's folder, its recipe is detected from its name
    model = PumaForEmbedding.from_pretrained(checkpoint)
    assert model.config.preset == "qwen3_vl_embedding" and model.config.pooling == "last"
    assert model.config.embedding_token_id is None and "[RET]" not in model.processor.tokenizer.get_vocab()
    inputs = [{"text": "a red circle on a white background"}, {"image": photos[0]},
              {"text": "two blue squares", "image": photos[1]}]
    references = {}
    for instruction in (None, "Retrieve images that match the caption"):
        expected, batch = references[instruction] = qwen3_vl_embedding_reference(checkpoint, inputs, instruction)
        # the pooled token is the `<|endoftext|>` the tokenizer appends after the generation prompt
        ends = batch["input_ids"][torch.arange(3), batch["attention_mask"].sum(1) - 1]
        assert (ends == model.processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")).all()
        got = model.encode(inputs, instruction=instruction, is_query=instruction is not None)
        assert_close(got, expected, ulps=FORWARD_ULPS)
    # Matryoshka truncation as the embedder documents it: the first d dimensions, renormalised
    truncated = F.normalize(references[None][0][:, :32], dim=-1)
    assert_close(model.encode(inputs, truncate_dim=32), truncated, ulps=FORWARD_ULPS)


def test_gme_at_full_depth_is_the_embedder_itself(embedder_checkpoints, photos):
    pytest.importorskip("qwen_vl_utils", reason="the reference's image loading is qwen-vl-utils' fetch_image")
    checkpoint = embedder_checkpoints["gme"]
    model = PumaForEmbedding.from_pretrained(checkpoint)
    assert model.config.preset == "gme" and model.config.position_mode == "sequential"
    inputs = [{"text": "What kind of car is this?"}, {"image": photos[0]}, {"text": "A red circle.", "image": photos[1]}]
    expected, _ = gme_reference(checkpoint, inputs, is_query=False)
    assert_close(model.encode(inputs), expected, ulps=FORWARD_ULPS)
    instruction = "Find an image that matches the given text."
    expected, _ = gme_reference(checkpoint, inputs, instruction, is_query=True)
    assert_close(model.encode(inputs, instruction=instruction, is_query=True), expected, ulps=FORWARD_ULPS)


# ---------------------------------------------------------------------------------------------------------------
# Trained embedders: the published code's reading of images, instructions and long texts, and the options that
# restore this repository's earlier choices (docs/deviations.md)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def rgba_photo(photos):
    """An RGBA image whose transparent half hides a colour that compositing on white and dropping alpha tell apart."""
    image = photos[0].convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    ImageDraw.Draw(alpha).rectangle([0, 0, image.width // 2, image.height], fill=40)
    image.putalpha(alpha)
    return image


def test_gme_drops_the_alpha_of_an_rgba_image_as_gme_does(embedder_checkpoints, rgba_photo):
    pytest.importorskip("qwen_vl_utils", reason="the reference's resize is qwen-vl-utils' smart_resize")
    checkpoint = embedder_checkpoints["gme"]
    inputs = [{"image": rgba_photo}, {"text": "a red circle", "image": rgba_photo}]
    expected, _ = gme_reference(checkpoint, inputs, is_query=False)
    assert_close(PumaForEmbedding.from_pretrained(checkpoint).encode(inputs), expected, ulps=FORWARD_ULPS)
    # alpha_mode="composite": the transparent part on white, as this repository read every image before
    composited = PumaForEmbedding.from_pretrained(checkpoint, alpha_mode="composite").encode(inputs)
    on_white = Image.alpha_composite(Image.new("RGBA", rgba_photo.size, "white"), rgba_photo).convert("RGB")
    expected_on_white, _ = gme_reference(checkpoint, [{"image": on_white}, {"text": "a red circle", "image": on_white}],
                                         is_query=False)
    assert_close(composited, expected_on_white, ulps=FORWARD_ULPS)
    assert (composited - expected).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["qwen3_vl_embedding", "gme"])
def test_embedders_read_an_exif_rotated_jpeg_unrotated_as_their_published_code(embedder_checkpoints, photos, tmp_path,
                                                                               preset):
    pytest.importorskip("qwen_vl_utils", reason="the references' image loading is qwen-vl-utils'")
    checkpoint = embedder_checkpoints[preset]
    stored = photos[0].transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = str(tmp_path / "rotated.jpg")
    stored.save(path, exif=exif.tobytes(), quality=100)
    reference = qwen3_vl_embedding_reference if preset == "qwen3_vl_embedding" else \
        lambda checkpoint, inputs: gme_reference(checkpoint, inputs, is_query=False)
    expected, _ = reference(checkpoint, [{"image": path}])
    assert_close(PumaForEmbedding.from_pretrained(checkpoint).encode([path]), expected, ulps=FORWARD_ULPS)
    # exif_transpose=True: displayed upright, as this repository read every image before
    rotated = PumaForEmbedding.from_pretrained(checkpoint, exif_transpose=True).encode([path])
    upright, _ = reference(checkpoint, [{"image": ImageOps.exif_transpose(Image.open(path))}])
    assert_close(rotated, upright, ulps=FORWARD_ULPS)
    assert (rotated - expected).abs().max() > 1e-3


def test_gme_keeps_an_empty_query_instruction_as_an_empty_system_turn(embedder_checkpoints, photos):
    pytest.importorskip("qwen_vl_utils", reason="the reference's resize is qwen-vl-utils' smart_resize")
    checkpoint = embedder_checkpoints["gme"]
    inputs = [{"text": "What kind of car is this?"}, {"image": photos[0]}]
    model = PumaForEmbedding.from_pretrained(checkpoint)
    assert "<|im_start|>system\n<|im_end|>" in model.build_prompt("a car", None, "")
    expected, _ = gme_reference(checkpoint, inputs, instruction="", is_query=True)
    assert_close(model.encode(inputs, instruction="", is_query=True), expected, ulps=FORWARD_ULPS)
    assert_close(model.encode(inputs, instruction=""), expected, ulps=FORWARD_ULPS)  # "" is given: a query
    # candidates always get the default, whatever empty instruction comes along (GME's is_query=False)
    default, _ = gme_reference(checkpoint, inputs, is_query=False)
    assert_close(model.encode(inputs, instruction="", is_query=False), default, ulps=FORWARD_ULPS)
    # keep_empty_instruction=False: the default system turn, as mteb's GME wrapper (and this repository before) do
    substituted = PumaForEmbedding.from_pretrained(checkpoint, keep_empty_instruction=False)
    assert_close(substituted.encode(inputs, instruction="", is_query=True), default, ulps=FORWARD_ULPS)
    assert (default - expected).abs().max() > 1e-3


def test_qwen3_vl_embedding_falls_back_to_its_default_for_a_blank_instruction(embedder_checkpoints, photos):
    pytest.importorskip("qwen_vl_utils", reason="the reference's image loading is qwen-vl-utils' fetch_image")
    checkpoint = embedder_checkpoints["qwen3_vl_embedding"]
    model = PumaForEmbedding.from_pretrained(checkpoint)
    inputs = [{"text": "a red circle"}, {"image": photos[1]}]
    default, _ = qwen3_vl_embedding_reference(checkpoint, inputs)
    for blank in ("  ", "", "\n"):
        expected, _ = qwen3_vl_embedding_reference(checkpoint, inputs, blank)
        assert_close(expected, default, ulps=0)  # the published code strips it and falls back
        assert_close(model.encode(inputs, instruction=blank, is_query=True), expected, ulps=FORWARD_ULPS)
    assert "<|im_start|>system\nRepresent the user's input.<|im_end|>" in model.build_prompt("a", None, "  ")


def test_gme_truncates_the_whole_prompt_at_1800_tokens_as_gme_does(embedder_checkpoints):
    pytest.importorskip("qwen_vl_utils", reason="the reference's resize is qwen-vl-utils' smart_resize")
    checkpoint = embedder_checkpoints["gme"]
    model = PumaForEmbedding.from_pretrained(checkpoint)
    words = " ".join(["the quick brown fox jumps over the lazy dog"] * 250)
    assert len(model.processor.tokenizer(words)["input_ids"]) > 1800
    inputs = [{"text": words}, {"text": "a short text"}]
    expected, batch = gme_reference(checkpoint, inputs, is_query=False)
    assert batch["attention_mask"][0].sum() == 1800  # the pooled <|endoftext|> is cut off, as in GME
    assert_close(model.encode(inputs), expected, ulps=FORWARD_ULPS)
    # max_text_tokens with max_prompt_tokens=None: the text is cut before the template, keeping the pooled token
    kept = PumaForEmbedding.from_pretrained(checkpoint, max_text_tokens=1700, max_prompt_tokens=None)
    assert (kept.encode(inputs)[0] - expected[0]).abs().max() > 1e-3
    assert_close(kept.encode(inputs)[1], expected[1], ulps=FORWARD_ULPS)


@pytest.mark.parametrize("preset", ["qwen3_vl_embedding", "gme"])
def test_a_pruned_embedder_keeps_its_recipe_and_its_full_depth_teacher(embedder_checkpoints, photos, tmp_path, preset):
    checkpoint = embedder_checkpoints[preset]
    pruned = PumaForEmbedding.from_pretrained(checkpoint, num_layers=2)
    teacher = PumaForEmbedding.from_pretrained(checkpoint)
    assert pruned.config.preset == teacher.config.preset == preset and pruned.config.kept_layers == [0, 1]
    inputs = ["a red circle", photos[0]]
    with torch.no_grad():
        features = features_for(pruned, inputs)
        full = teacher(**features, output_depths=[2])
    # the teacher's embedding at depth 2 is the pruned model's: the same recipe, the same first layers
    assert_close(full.depth_embeddings[2], pruned(**features).raw_embeddings, ulps=FORWARD_ULPS)
    pruned.save_pretrained(tmp_path / "pruned")
    reloaded = PumaForEmbedding.from_pretrained(str(tmp_path / "pruned"))
    assert reloaded.config.preset == preset
    assert_close(reloaded.encode(inputs), pruned.encode(inputs), ulps=FORWARD_ULPS)


def test_the_recipe_can_be_told_or_overridden(family_checkpoints, embedder_checkpoints):
    told = PumaForEmbedding.from_pretrained(family_checkpoints["qwen3_vl"], num_layers=1, preset="qwen3_vl_embedding")
    assert told.config.preset == "qwen3_vl_embedding" and told.config.pooling == "last"
    release = PumaForEmbedding.from_pretrained(embedder_checkpoints["gme"], num_layers=1, preset="puma")
    assert release.config.pooling == "token" and release.config.embedding_token_id is not None
    with pytest.raises(ValueError, match=r"preset='nope' is not one of"):
        PumaForEmbedding.from_pretrained(family_checkpoints["qwen3_vl"], num_layers=1, preset="nope")


def test_output_depths_give_every_truncated_model_from_one_pass(family_checkpoints, images):
    checkpoint = family_checkpoints["qwen3_vl"]
    model = PumaForEmbedding.from_pretrained(checkpoint)
    features = features_for(model, inputs_of_every_kind(images))
    with torch.no_grad():
        out = model(**features, output_depths=[1, 3, TINY_DEPTH])
    for depth in (1, 3, TINY_DEPTH):
        assert_close(out.depth_embeddings[depth], oracle(checkpoint, model, features, depth), ulps=FORWARD_ULPS)
    with pytest.raises(ValueError, match=r"output_depths \[7\] are outside 1\.\.6"):
        model(**features, output_depths=[7])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_family_export_loads_in_every_stock_class_and_equals_puma(family_checkpoints, images, tmp_path, family):
    import hub_puma
    from modeling_puma import featurize, parse_input

    classes = {"qwen2_5_vl": ("Qwen2_5_VLModel", "Qwen2_5_VLForConditionalGeneration"),
               "qwen3_vl": ("Qwen3VLModel", "Qwen3VLForConditionalGeneration")}[family]
    model = PumaForEmbedding.from_pretrained(family_checkpoints[family], kept_layers=[0, 1, 4])
    model.save_pretrained(tmp_path / "puma")
    export = hub_puma.export_plain_checkpoint(tmp_path / "puma", tmp_path / "export", license="apache-2.0")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [classes[1]]
    assert config["text_config"]["num_hidden_layers"] == 3
    inputs = inputs_of_every_kind(images)
    examples = [parse_input(item, i) for i, item in enumerate(inputs)]
    prompts = [model.build_prompt(text, image is not None) for text, image in examples]
    features = featurize(model.processor, model.config, prompts, [image for _, image in examples])
    with torch.no_grad():
        expected = model(**features).raw_embeddings
    if "mm_token_type_ids" not in features:
        features["mm_token_type_ids"] = model._mm_token_type_ids(features["input_ids"])
    token = features["input_ids"] == model.config.embedding_token_id
    position = (token * torch.arange(token.shape[1])).argmax(dim=1)
    names = ("AutoModel", *classes)
    if family == "qwen3_vl" and transformers.__version__.startswith("4."):
        # the export keeps the Hub's Qwen3-VL layout (what vLLM reads); 4.57 loads it, as Qwen's own checkpoints, in
        # the generation class only
        names = classes[1:]
    for class_name in names:
        loaded, info = getattr(transformers, class_name).from_pretrained(export, dtype=torch.float32,
                                                                         output_loading_info=True)
        assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), (class_name, info)
        base = loaded.model if hasattr(loaded, "lm_head") else loaded
        with torch.no_grad():
            hidden = base.eval()(**features).last_hidden_state
        assert_close(hidden[torch.arange(len(prompts)), position], expected, ulps=FORWARD_ULPS, name=class_name)


def test_qwen3_moe_pruning_keeps_each_layer_kind(family_checkpoints, images):
    # the tiny Qwen3-VL-MoE has a dense MLP in layer 1 only; transformers decides a layer's kind from its index
    checkpoint = family_checkpoints["qwen3_vl_moe"]
    model = PumaForEmbedding.from_pretrained(checkpoint, kept_layers=[0, 2, 5])
    assert [type(layer.mlp).__name__ for layer in model.model.language_model.layers] == ["Qwen3VLMoeTextSparseMoeBlock"] * 3
    kept_dense = PumaForEmbedding.from_pretrained(checkpoint, kept_layers=[1, 3])
    assert [type(layer.mlp).__name__ for layer in kept_dense.model.language_model.layers] == [
        "Qwen3VLMoeTextMLP", "Qwen3VLMoeTextSparseMoeBlock"]
    assert kept_dense.config.text_config.mlp_only_layers == [0]
    features = features_for(model, inputs_of_every_kind(images))
    with torch.no_grad():
        raw = model(**features).raw_embeddings
    assert torch.isfinite(raw).all() and raw.shape == (5, model.config.text_config.hidden_size)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_the_shared_weight_teacher_is_the_full_model_for_every_family(family_checkpoints, images, family):
    import peft

    from trainer_puma import SeparateTeacher, SharedWeightTeacher

    checkpoint = family_checkpoints[family]
    student = PumaForEmbedding.from_pretrained(checkpoint, num_layers=4)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.\d+\.self_attn\.\w+_proj")
    student = peft.get_peft_model(student, config)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a teacher that forgot to disable the adapters would differ
    shared = SharedWeightTeacher.from_student(student, checkpoint)
    separate = SeparateTeacher(PumaForEmbedding.from_pretrained(checkpoint))
    features = features_for(student.get_base_model(), inputs_of_every_kind(images))
    assert_close(shared.embed(features, None), separate.embed(features, None), ulps=FORWARD_ULPS)
    if family.startswith("qwen3_vl"):  # the student must keep the three layers DeepStack injects after
        shallow = peft.get_peft_model(PumaForEmbedding.from_pretrained(checkpoint, num_layers=2), config)
        with pytest.raises(ValueError, match=r"keep the 3 layers Qwen3-VL injects visual features after"):
            SharedWeightTeacher.from_student(shallow, checkpoint)

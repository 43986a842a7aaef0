"""PumaForEmbedding against transformers' own Qwen2-VL, on tiny random checkpoints built offline: pruning, encoding,
prompts, saving and bad input. Qwen2.5-VL, Qwen3-VL and the trained-embedder recipes are in test_families.py."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import ROOT, TINY_DEPTH
from numerics import assert_close
from modeling_puma import PumaForEmbedding


# Embeddings of the tiny models (float32, up to 6 layers) computed by two code paths that round differently (ours and
# transformers' or a reference implementation, batched or not): 100 float32 ulps of the largest value (~1.2e-5 on
# unit vectors)
FORWARD_ULPS = 100


def inputs_of_every_kind(images):
    """Text, image and image+text inputs, of different lengths so batches are padded."""
    return ["a red circle", images[0], {"text": "two blue squares next to a green triangle", "image": images[1]},
            "the quick brown fox jumps over the lazy dog", {"image": images[2]}]


def features_for(model, inputs, instruction=None):
    """Processor features of `inputs`, built as `encode` builds them."""
    from modeling_puma import featurize, parse_input

    examples = [parse_input(item, i) for i, item in enumerate(inputs)]
    prompts = [model.build_prompt(text, image is not None, instruction) for text, image in examples]
    return featurize(model.processor, model.config, prompts, [image for _, image in examples])


def oracle(checkpoint, model, features, depth_after):
    """transformers' own full-depth model of the checkpoint's family: the final norm of the hidden state that enters
    layer `depth_after` (after it, for the last layer), read at the pooled position. The embedding token's row is
    copied from `model`, the only weight PUMA adds. It is loaded through the class the checkpoint names
    (`architectures`), which knows the checkpoint's key layout."""
    with open(os.path.join(checkpoint, "config.json")) as f:
        architecture = json.load(f)["architectures"][0]
    full = getattr(transformers, architecture).from_pretrained(checkpoint, dtype=torch.float32).model.eval()
    token_id = model.config.embedding_token_id
    features = dict(features)
    if "mm_token_type_ids" in full.forward.__code__.co_varnames and "mm_token_type_ids" not in features:
        features["mm_token_type_ids"] = model._mm_token_type_ids(features["input_ids"])
    captured = {}
    layers = full.language_model.layers
    if depth_after < len(layers):
        layers[depth_after].register_forward_pre_hook(
            lambda module, args, kwargs: captured.update(hidden=args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)
    with torch.no_grad():
        if model.config.pooling == "token":
            embed = full.get_input_embeddings()
            if token_id >= embed.weight.shape[0]:
                full.resize_token_embeddings(token_id + 1)
                embed = full.get_input_embeddings()
            embed.weight[token_id] = model.get_input_embeddings().weight[token_id]
        out = full(**features)
        hidden = full.language_model.norm(captured["hidden"]) if captured else out.last_hidden_state
    rows = torch.arange(hidden.shape[0])
    if model.config.pooling == "token":
        position = (features["input_ids"] == token_id).int().argmax(dim=1)
    else:
        position = features["attention_mask"].sum(dim=1) - 1
    return hidden[rows, position]


@pytest.mark.parametrize("layout,shards", [("old", 1), ("new", 1), ("old", 3), ("new", 3)])
def test_pruned_model_matches_first_k_layers_of_full_model(tiny_checkpoints, images, layout, shards):
    # Given a stock checkpoint in either key layout, single file or sharded
    checkpoint = tiny_checkpoints[(layout, shards)]
    k = 3
    # When it is loaded pruned to k layers and run on text, image and image+text inputs in one padded batch
    model = PumaForEmbedding.from_pretrained(checkpoint, num_layers=k)
    features = features_for(model, inputs_of_every_kind(images))
    with torch.no_grad():
        output = model(**features)
    # Then the raw embedding is the oracle's final-norm hidden state after layer k at the embedding token
    expected = oracle(checkpoint, model, features, k)
    assert output.raw_embeddings.shape == (5, model.config.text_config.hidden_size)
    assert_close(output.raw_embeddings, expected, ulps=FORWARD_ULPS)
    assert_close(output.embeddings, torch.nn.functional.normalize(expected, dim=-1), ulps=FORWARD_ULPS)
    assert len(model.model.language_model.layers) == k


def test_full_depth_load_is_the_teacher(tiny_checkpoint, images):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint)
    assert model.config.kept_layers == list(range(TINY_DEPTH))
    features = features_for(model, inputs_of_every_kind(images))
    with torch.no_grad():
        raw = model(**features).raw_embeddings
    assert_close(raw, oracle(tiny_checkpoint, model, features, TINY_DEPTH), ulps=FORWARD_ULPS)


def _checkpoint_with_layers(source, layers, out_dir):
    """A stock (old layout) checkpoint holding only `layers` of `source`, renumbered, for transformers to load."""
    shutil.copytree(source, out_dir)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    kept = {}
    for key, value in tensors.items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            if int(index) in layers:
                kept[f"model.layers.{layers.index(int(index))}.{rest}"] = value
        else:
            kept[key] = value
    save_file(kept, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = config["max_window_layers"] = len(layers)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return out_dir


def test_non_contiguous_kept_layers_match_a_checkpoint_of_those_layers(tiny_checkpoint, images, tmp_path):
    layers = [0, 1, TINY_DEPTH - 1]  # the release's "keep the last layer" variant, in small
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, kept_layers=layers)
    assert model.config.kept_layers == layers and model.config.base_num_hidden_layers == TINY_DEPTH
    reference = _checkpoint_with_layers(tiny_checkpoint, layers, str(tmp_path / "subset"))
    features = features_for(model, inputs_of_every_kind(images))
    with torch.no_grad():
        raw = model(**features).raw_embeddings
    assert_close(raw, oracle(reference, model, features, len(layers)), ulps=FORWARD_ULPS)


def test_batched_encoding_equals_one_at_a_time(tiny_checkpoint, images):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3)
    inputs = inputs_of_every_kind(images)
    batched = model.encode(inputs, batch_size=3)
    singles = torch.stack([model.encode([item])[0] for item in inputs])
    assert batched.shape == (len(inputs), 64)
    assert_close(batched, singles, ulps=FORWARD_ULPS)
    # x / |x| then |.| in float32: a rounding per element, summed over 64 dimensions
    assert_close(batched.norm(dim=-1), torch.ones(len(inputs)), ulps=16, name="norms")


def test_encode_restores_input_order_after_length_sorting(tiny_checkpoint, images):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)
    inputs = inputs_of_every_kind(images)
    forward = model.encode(inputs, batch_size=2)
    backward = model.encode(inputs[::-1], batch_size=2)
    assert_close(forward, backward.flip(0), ulps=FORWARD_ULPS)
    # distinct inputs give distinct embeddings, so a permutation would be caught
    assert (forward[0] - forward[1]).abs().max() > 1e-3


def test_encode_accepts_paths_single_items_numpy_and_matryoshka(tiny_checkpoint, images, tmp_path):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)
    path = tmp_path / "circle.png"
    images[0].save(path)
    from_path = model.encode([str(path), path])
    from_image = model.encode([images[0]])
    assert_close(from_path, from_image.expand(2, -1), ulps=FORWARD_ULPS)
    single = model.encode("a red circle")
    assert single.shape == (64,)
    as_numpy = model.encode(["a red circle"], convert_to_numpy=True)
    assert isinstance(as_numpy, np.ndarray)
    assert_close(as_numpy[0], single, ulps=FORWARD_ULPS)
    truncated = model.encode(["a red circle"], truncate_dim=16)
    full = model.encode(["a red circle"], normalize=False)
    assert truncated.shape == (1, 16)
    assert_close(truncated[0], torch.nn.functional.normalize(full[0, :16], dim=0), ulps=FORWARD_ULPS)


def test_an_instruction_makes_the_inputs_queries_and_candidates_refuse_one(tiny_checkpoint):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)
    plain = model.encode(["a dog"])
    # an instruction applies without is_query, as Sentence Transformers' prompt and Qwen3-VL-Embedding's instruction do
    instructed = model.encode(["a dog"], instruction="Find an image.")
    query = model.encode(["a dog"], instruction="Find an image.", is_query=True)
    assert torch.equal(instructed, query)  # the same prompt, so the same computation
    assert (plain - query).abs().max() > 1e-3
    # a query without an instruction is embedded like a candidate
    assert torch.equal(model.encode(["a dog"], is_query=True), plain)
    with pytest.raises(ValueError, match=r"instruction applies to queries only"):
        model.encode(["a dog"], instruction="Find an image.", is_query=False)
    prompt = model.build_prompt("a dog", True, "find an image")
    assert "<|vision_start|><|image_pad|><|vision_end|>Find an image.\na dog.\nSummarize above image and sentence in one word: <|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n[RET].<|im_end|>\n")


def test_prompt_equals_the_release_chat_template_rendering(tiny_checkpoint):
    # The release renders [{"user": image, text}, {"assistant": "[RET]."}] with the processor's chat template.
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)
    for text, has_image, modality in [("A dog.", False, "sentence"), ("", True, "image"), ("A dog.", True, "image and sentence")]:
        content = ([{"type": "image"}] if has_image else []) + [
            {"type": "text", "text": f"{text}\nSummarize above {modality} in one word: "}]
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": "[RET]."}]}]
        rendered = model.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        assert model.build_prompt(text or None, has_image) == rendered


SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
ASSISTANT = "<|im_start|>assistant\n[RET].<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.mark.parametrize("text,has_image,instruction,expected", [
    ("a dog on a beach", False, None,
     SYSTEM + "<|im_start|>user\nA dog on a beach.\nSummarize above sentence in one word: <|im_end|>\n" + ASSISTANT),
    ('  "What is this?"\r\n', False, None,
     SYSTEM + "<|im_start|>user\nWhat is this?\nSummarize above sentence in one word: <|im_end|>\n" + ASSISTANT),
    ("a dog on a beach", False, '"retrieve an image of the caption"',
     SYSTEM + "<|im_start|>user\nRetrieve an image of the caption.\na dog on a beach.\n"
              "Summarize above sentence in one word: <|im_end|>\n" + ASSISTANT),
    (None, True, None,
     SYSTEM + "<|im_start|>user\n" + IMAGE + "\nSummarize above image in one word: <|im_end|>\n" + ASSISTANT),
    ("a red car", True, None,
     SYSTEM + "<|im_start|>user\n" + IMAGE + "A red car.\nSummarize above image and sentence in one word: <|im_end|>\n"
     + ASSISTANT),
    (None, True, "find a similar photo!",
     SYSTEM + "<|im_start|>user\n" + IMAGE + "Find a similar photo!\nSummarize above image and sentence in one word: "
              "<|im_end|>\n" + ASSISTANT),
])
def test_release_prompts_written_out_by_hand(tiny_checkpoint, text, has_image, instruction, expected):
    # The release: format_string(format_string(instruction) + "\n" + text), quotes and "\r" removed, full stops added.
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1)
    assert model.build_prompt(text, has_image, instruction) == expected


def test_release_prompt_of_an_over_long_text_is_cut_before_the_suffix(tiny_checkpoint):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1, max_text_tokens=4)
    words = "two women are walking in the park"
    ids = model.processor.tokenizer("Two women are walking in the park.", add_special_tokens=False)["input_ids"]
    assert len(ids) > 4
    kept = model.processor.tokenizer.decode(ids[:4])
    assert model.build_prompt(words, False) == (
        SYSTEM + "<|im_start|>user\n" + kept + "\nSummarize above sentence in one word: <|im_end|>\n" + ASSISTANT)


def test_long_text_is_truncated_without_losing_the_embedding_token(tiny_checkpoint):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2, max_text_tokens=8)
    long_text = "the quick brown fox jumps over the lazy dog " * 50
    prompt = model.build_prompt(long_text, False)
    assert prompt.endswith("[RET].<|im_end|>\n")
    text = prompt.split("<|im_start|>user\n")[1].split("\nSummarize above")[0]
    assert text.startswith("The quick") and len(model.processor.tokenizer(text)["input_ids"]) <= 8
    assert model.encode([long_text]).shape == (1, 64)


def test_pixel_limits_bound_the_image_tokens(tiny_checkpoint):
    big = Image.new("RGB", (400, 300), (10, 200, 30))
    counts = {}
    for max_pixels in (4 * 28 * 28, 12 * 28 * 28):
        model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1, max_pixels=max_pixels)
        features = features_for(model, [big])
        tokens = int((features["input_ids"] == model.config.image_token_id).sum())
        counts[max_pixels] = tokens
        assert tokens * 28 * 28 <= max_pixels
    assert counts[4 * 28 * 28] < counts[12 * 28 * 28]


def test_exif_rotation_and_non_rgb_images(tiny_checkpoint, images, tmp_path):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)
    upright = images[0]
    # stored rotated, with an EXIF tag saying "rotate 90 clockwise to display" (orientation 6)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes(), quality=100)
    upright_path = tmp_path / "upright.jpg"
    upright.save(upright_path, quality=100)
    # not a rounding bound: JPEG codes the rotated pixels in other 8x8 blocks, so the decoded images differ slightly
    assert torch.allclose(model.encode([path]), model.encode([upright_path]), atol=1e-3)
    for mode in ("L", "RGBA", "P", "CMYK"):
        assert model.encode([upright.convert(mode)]).shape == (1, 64)


def test_pooling_modes_last_and_mean(tiny_checkpoint, images):
    features = None
    for pooling in ("last", "mean"):
        model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3, pooling=pooling)
        features = features_for(model, ["a red circle", "the quick brown fox jumps over the lazy dog"])
        with torch.no_grad():
            out = model(**features, output_hidden_states=True)
        mask = features["attention_mask"]
        hidden = out.last_hidden_state
        if pooling == "last":
            expected = torch.stack([hidden[i, int(mask[i].sum()) - 1] for i in range(2)])
        else:
            expected = torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(2)])
        assert_close(out.raw_embeddings, expected, ulps=FORWARD_ULPS)


def test_attention_implementations_agree(tiny_checkpoint, images):
    inputs = inputs_of_every_kind(images)
    sdpa = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3).encode(inputs)
    eager = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3, attn_implementation="eager").encode(inputs)
    # SDPA's fused attention and eager's matmul-softmax-matmul round differently in each of 3 layers
    assert_close(sdpa, eager, ulps=800, name="sdpa vs eager")


def test_dtype_passes_through(tiny_checkpoint):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.encode(["a dog"]).dtype == torch.float32
    assert PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1, torch_dtype="auto").dtype == torch.float32
    assert PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1, device_map="cpu").device.type == "cpu"


def test_only_kept_tensors_are_read(tiny_checkpoint, tmp_path):
    # Given a sharded checkpoint whose dropped layers and lm_head live in a shard that is then deleted
    folder = tmp_path / "split"
    shutil.copytree(tiny_checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    dropped = {k: v for k, v in tensors.items() if k.startswith("model.layers.") and int(k.split(".")[2]) >= 2}
    dropped["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    kept = {k: v for k, v in tensors.items() if k not in dropped}
    save_file(kept, folder / "kept.safetensors", metadata={"format": "pt"})
    save_file(dropped, folder / "dropped.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {**{k: "kept.safetensors" for k in kept}, **{k: "dropped.safetensors" for k in dropped}}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    os.remove(folder / "dropped.safetensors")
    # When it is loaded with two layers, it loads; at full depth, the missing shard is reported
    model = PumaForEmbedding.from_pretrained(str(folder), num_layers=2)
    assert not any(name.startswith("lm_head") for name in model.state_dict())
    assert len(model.model.language_model.layers) == 2
    with pytest.raises(OSError, match="dropped.safetensors"):
        PumaForEmbedding.from_pretrained(str(folder))


def test_embedding_token_row_of_a_large_vocabulary_is_the_mean_of_evenly_spaced_rows(tiny_checkpoint):
    # a Qwen-sized vocabulary: every ceil(rows / EMBEDDING_MEAN_ROWS)-th row, read as a view (the mapped table of a
    # real checkpoint is not copied), and close to the mean of every row
    from modeling_puma import EMBEDDING_MEAN_ROWS

    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1)
    rows = 3 * EMBEDDING_MEAN_ROWS - 7
    model.resize_token_embeddings(rows + 1)
    torch.manual_seed(0)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_()
    model._init_embedding_token_row(rows, rows)
    weight = model.get_input_embeddings().weight
    # float32 means of the same ~1,000 rows, summed in another order
    assert_close(weight[rows], weight[:rows:3].mean(0), ulps=100, name="[RET] row")
    assert (weight[rows] - weight[:rows].mean(0)).abs().max() < 0.15  # rows have unit spread; 1/sqrt(1k) ~ 0.03


def test_embedding_token_row_is_initialised_trainable_and_saved(tiny_checkpoint, tmp_path):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)
    tokenizer = model.processor.tokenizer
    token_id = model.config.embedding_token_id
    assert tokenizer.convert_tokens_to_ids("[RET]") == token_id
    weight = model.get_input_embeddings().weight
    assert weight.requires_grad
    rows_before = token_id  # the token was appended after the tokenizer's rows
    # float32 means of the same few hundred rows of magnitude < 1, summed in another order
    assert_close(weight[token_id], weight[:rows_before].mean(0), ulps=10, name="[RET] row")
    with torch.no_grad():
        weight[token_id] = 0.5
    model.save_pretrained(tmp_path / "puma")
    reloaded = PumaForEmbedding.from_pretrained(str(tmp_path / "puma"))
    assert torch.all(reloaded.get_input_embeddings().weight[token_id] == 0.5)
    assert reloaded.config.model_type == "puma" and reloaded.config.kept_layers == [0, 1]


def test_puma_checkpoint_can_be_pruned_further(tiny_checkpoint, images, tmp_path):
    layers = [0, 1, 2, TINY_DEPTH - 1]
    PumaForEmbedding.from_pretrained(tiny_checkpoint, kept_layers=layers).save_pretrained(tmp_path / "puma")
    inputs = inputs_of_every_kind(images)
    further = PumaForEmbedding.from_pretrained(str(tmp_path / "puma"), kept_layers=[0, 2, TINY_DEPTH - 1])
    direct = PumaForEmbedding.from_pretrained(tiny_checkpoint, kept_layers=[0, 2, TINY_DEPTH - 1])
    assert further.config.kept_layers == [0, 2, TINY_DEPTH - 1]
    assert_close(further.encode(inputs), direct.encode(inputs), ulps=FORWARD_ULPS)
    first_two = PumaForEmbedding.from_pretrained(str(tmp_path / "puma"), num_layers=2)
    assert first_two.config.kept_layers == [0, 1]
    with pytest.raises(ValueError, match=r"not in this checkpoint"):
        PumaForEmbedding.from_pretrained(str(tmp_path / "puma"), kept_layers=[3])


def test_a_trained_depth_of_an_elastic_checkpoint_loads_through_auto_model(tiny_checkpoint, images, tmp_path):
    from transformers import AutoModel

    # Given a checkpoint trained at depths 1, 2 and 3 of its 3 layers
    elastic = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3, trained_depths=[1, 2, 3])
    elastic.save_pretrained(tmp_path / "elastic")
    # When AutoModel loads its first 2 layers (the config it reads first still lists depth 3)
    model = AutoModel.from_pretrained(str(tmp_path / "elastic"), trust_remote_code=True, num_layers=2)
    # Then it holds 2 layers, keeps the depths trained up to 2, and embeds as the 3-layer model does at depth 2
    assert model.config.kept_layers == [0, 1] and model.config.trained_depths == [1, 2]
    features = features_for(elastic, inputs_of_every_kind(images))
    with torch.no_grad():
        expected = elastic(**features, output_depths=[2]).depth_embeddings[2]
        got = model(**features).raw_embeddings
    assert_close(got, expected, ulps=FORWARD_ULPS)


def test_save_writes_auto_map_model_files_and_processor(tiny_checkpoint, tmp_path):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)
    model.save_pretrained(tmp_path / "puma")
    files = set(os.listdir(tmp_path / "puma"))
    assert {"configuration_puma.py", "modeling_puma.py", "model.safetensors", "tokenizer.json"} <= files
    config = json.loads((tmp_path / "puma" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_puma.PumaConfig", "AutoModel": "modeling_puma.PumaForEmbedding"}
    assert config["model_type"] == "puma" and config["text_config"]["num_hidden_layers"] == 2


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    # The project must not be importable: block its modules even if it is pip-installed.
    for name in ("modeling_puma", "configuration_puma", "tiny_puma"):
        sys.modules[name] = None
    import numpy as np
    from PIL import Image
    from transformers import AutoModel

    folder, got_path, image_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    got = model.encode(["a red circle", {"text": "a dog", "image": Image.open(image_path)}], convert_to_numpy=True)
    np.save(got_path, got)  # compared by the test
    print("FRESH-PROCESS-OK")
    """
)


def test_trust_remote_code_round_trip_in_a_fresh_process(tiny_checkpoint, images, tmp_path):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3)
    folder = tmp_path / "hub_repo"
    model.save_pretrained(folder)
    image_path = tmp_path / "image.png"
    images[1].save(image_path)
    expected = model.encode(["a red circle", {"text": "a dog", "image": Image.open(image_path)}])
    (tmp_path / "script.py").write_text(FRESH_PROCESS_SCRIPT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(folder), str(tmp_path / "got.npy"),
                             str(image_path)], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert "FRESH-PROCESS-OK" in result.stdout, result.stderr[-3000:]
    assert_close(np.load(tmp_path / "got.npy"), expected, ulps=FORWARD_ULPS)


def test_hub_files_import_only_each_other_and_allowed_libraries():
    import ast

    allowed = {"torch", "transformers", "numpy", "PIL", "tqdm", "huggingface_hub", "safetensors"} \
        | set(sys.stdlib_module_names)
    # only inside try/except ImportError: the module class, the video decoders and the PDF renderer
    optional = {"sentence_transformers", "av", "torchcodec", "pypdfium2"}

    for filename in ("configuration_puma.py", "modeling_puma.py"):
        tree = ast.parse(open(os.path.join(ROOT, filename)).read())
        guarded = {id(node) for block in ast.walk(tree) if isinstance(block, ast.Try)
                   and any(isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in block.handlers)
                   for statement in block.body for node in ast.walk(statement)}
        for node in ast.walk(tree):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                root = name.split(".")[0]
                assert root in allowed or (root in optional and id(node) in guarded), (filename, name)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"num_layers": 0}, r"num_layers=0"),
    ({"num_layers": TINY_DEPTH + 1}, r"num_layers=7"),
    ({"kept_layers": [0, 0, 1]}, r"duplicates \[0\]"),
    ({"kept_layers": [2, 1]}, r"sorted"),
    ({"kept_layers": []}, r"at least one"),
    ({"kept_layers": [0, TINY_DEPTH]}, r"must lie in 0\.\.5"),
    ({"num_layers": 2, "kept_layers": [0, 1]}, r"not both"),
])
def test_bad_layer_requests_raise(tiny_checkpoint, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PumaForEmbedding.from_pretrained(tiny_checkpoint, **kwargs)


def test_non_qwen2_vl_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'llama' checkpoint"):
        PumaForEmbedding.from_pretrained(str(folder), num_layers=2)


def test_bin_only_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    folder = tmp_path / "bin"
    shutil.copytree(tiny_checkpoint, folder)
    os.rename(folder / "model.safetensors", folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="only safetensors"):
        PumaForEmbedding.from_pretrained(str(folder), num_layers=2)


def test_a_config_without_model_type_is_named_with_the_supported_types(tiny_checkpoint, tmp_path):
    folder = tmp_path / "untyped"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'} has no 'model_type'.*'qwen2_vl', 'qwen2_5_vl', "
                                         r"'qwen3_vl', 'qwen3_vl_moe', 'puma'"):
        PumaForEmbedding.from_pretrained(str(folder), num_layers=2)


def _no_retry_waits(*args):
    raise AssertionError("the load waited to retry a request")


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_id_without_the_hub_fails_at_once_naming_hf_hub_offline(monkeypatch, tmp_path, offline):
    # Given offline mode, or a Hub that refuses connections (a closed loopback port)
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(time, "sleep", _no_retry_waits)
    # When a Hub id that is not in the cache is loaded, then one line names HF_HUB_OFFLINE and a local folder
    with pytest.raises(OSError, match=r"^Cannot load 'no-such-org/no-such-model': .*HF_HUB_OFFLINE.*local checkpoint "
                                      r"folder") as raised:
        PumaForEmbedding.from_pretrained("no-such-org/no-such-model", num_layers=2, cache_dir=str(tmp_path))
    assert "\n" not in str(raised.value)


def test_a_hub_id_in_the_cache_loads_while_the_hub_does_not_answer(tiny_checkpoint, monkeypatch, tmp_path, images):
    # Given a checkpoint in the Hugging Face cache layout and a Hub that refuses connections
    import time

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--puma-org--qwen2-vl-tiny"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(time, "sleep", _no_retry_waits)
    # When it is loaded by its Hub id, then it comes from the cache, without retries, and equals the folder's model
    model = PumaForEmbedding.from_pretrained("puma-org/qwen2-vl-tiny", num_layers=2, cache_dir=str(tmp_path / "cache"))
    expected = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)
    assert torch.equal(model.encode([images[0], "a dog"]), expected.encode([images[0], "a dog"]))  # the same files


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tokenizer_lacking_the_embedding_token_is_refused(tiny_checkpoint, tmp_path):
    PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2).save_pretrained(tmp_path / "puma")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_checkpoint, name), tmp_path / "puma" / name)
    with pytest.raises(ValueError, match=r"lacks the embedding token '\[RET\]'"):
        PumaForEmbedding.from_pretrained(str(tmp_path / "puma"))


@pytest.mark.parametrize("inputs,error,match", [
    ([], ValueError, "empty list"),
    (None, ValueError, "None"),
    ([None], ValueError, r"inputs\[0\] is None"),
    (["ok", ""], ValueError, r"inputs\[1\] is an empty string"),
    ([{"caption": "x"}], ValueError, "unknown keys"),
    ([3.5], ValueError, "unsupported type float"),
    (["/no/such/image.png"], FileNotFoundError, r"/no/such/image\.png"),
])
def test_bad_encode_inputs_raise(tiny_checkpoint, inputs, error, match):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1)
    with pytest.raises(error, match=match):
        model.encode(inputs)


def test_corrupt_and_oversized_images_raise(tiny_checkpoint, images, tmp_path):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match=r"corrupt\.png.*not a readable image"):
        model.encode([str(corrupt)])
    big = tmp_path / "big.png"
    images[0].save(big)
    with pytest.raises(ValueError, match=r"over the limit of 100"):
        model.encode([str(big)], max_image_pixels=100)
    with pytest.raises(ValueError, match=r"over the limit of 100"):
        model.encode([images[0]], max_image_pixels=100)


def test_truncate_dim_larger_than_the_embedding_raises(tiny_checkpoint):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1)
    with pytest.raises(ValueError, match=r"truncate_dim=65 is outside 1\.\.64"):
        model.encode(["a"], truncate_dim=65)


def test_forward_without_the_embedding_token_raises(tiny_checkpoint):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1)
    ids = model.processor.tokenizer(["a red circle"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"Rows \[0\] of input_ids lack the embedding token"):
        model(**ids)


def test_an_existing_file_is_an_image_whatever_its_name_and_text_can_be_said_explicitly(tiny_checkpoint, images,
                                                                                          tmp_path):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1)
    spaced = tmp_path / "My Pictures" / "my photo.JPG"
    spaced.parent.mkdir()
    images[0].save(spaced, format="PNG")
    no_suffix = tmp_path / "scan"
    images[0].save(no_suffix, format="PNG")
    expected = model.encode([images[0]])
    assert_close(model.encode([str(spaced)]), expected, ulps=FORWARD_ULPS)
    assert_close(model.encode([str(no_suffix)]), expected, ulps=FORWARD_ULPS)
    as_text = model.encode([{"text": str(spaced)}])
    assert not torch.allclose(as_text, expected, atol=1e-3)
    assert model.build_prompt(str(spaced), False).count("<|image_pad|>") == 0


@pytest.mark.parametrize("item,error,match", [
    ("/home/me/My Pictures/cat.jpg", FileNotFoundError, r"'/home/me/My Pictures/cat\.jpg' does not exist.*\{'text'"),
    ("holiday.PNG", FileNotFoundError, r"'holiday\.PNG' does not exist"),
    ("https://example.com/cat.jpg", ValueError, r"is a URL; URLs are not fetched\. Download the image first"),
    ({"image": "http://example.com/a.png"}, ValueError, r"URLs are not fetched"),
])
def test_missing_image_paths_and_urls_raise(tiny_checkpoint, item, error, match):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1)
    with pytest.raises(error, match=match):
        model.encode([item])


def test_an_existing_file_that_is_not_an_image_says_how_to_embed_it_as_text(tiny_checkpoint, tmp_path):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.txt' is not a readable image.*\{'text': \.\.\.\}"):
        model.encode([str(notes)])


@pytest.mark.parametrize("content", [b"\x00" * 4096, bytes(range(256)) * 64, b"\xff\xff\xff\xff\xff\xff\xff\x7f{}"])
def test_a_corrupt_safetensors_file_is_named(tiny_checkpoint, tmp_path, content):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(OSError, match=r"corrupt/model\.safetensors is not a valid safetensors file"):
        PumaForEmbedding.from_pretrained(str(folder), num_layers=1)


def test_a_corrupt_shard_is_named(tiny_checkpoints, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoints[("new", 3)], folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x00" * 64)
    with pytest.raises(OSError, match=rf"{shard.name} is not a valid safetensors file"):
        PumaForEmbedding.from_pretrained(str(folder), num_layers=1)


# ---------------------------------------------------------------------------------------------------------------
# A Hub repository: shards of dropped layers are never downloaded
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(tmp_path):
    """A loopback server answering the Hub's file endpoints (`/{repo}/resolve/{revision}/{path}`) for the folders
    in `repos`, and recording every file requested."""
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    repos, requested = {}, []
    commit = "0123456789abcdef0123456789abcdef01234567"

    class Handler(BaseHTTPRequestHandler):
        def _file(self):
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve" or "/".join(parts[:2]) not in repos:
                return None, None
            name = "/".join(parts[4:])
            path = os.path.join(repos["/".join(parts[:2])], name)
            return name, (path if os.path.isfile(path) else None)

        def _tree(self, send_body):
            """`/api/models/{repo}/tree/{revision}/{folder}`: the folder's listing, or the Hub's 404 for none."""
            parts = self.path.split("?")[0].strip("/").split("/")
            repo, folder = "/".join(parts[2:4]), "/".join(parts[6:])
            path = os.path.join(repos.get(repo, "/nonexistent"), folder)
            requested.append((self.command, f"tree:{folder}"))
            if not os.path.isdir(path):
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = json.dumps([{"type": "file", "path": f"{folder}/{n}", "size": os.path.getsize(os.path.join(path, n))}
                               for n in sorted(os.listdir(path))]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _answer(self, send_body):
            if self.path.startswith("/api/models/"):
                return self._tree(send_body)
            name, path = self._file()
            requested.append((self.command, name))
            if path is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound" if name else "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = open(path, "rb").read()
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", repos, requested
    server.shutdown()
    server.server_close()


FAKE_HUB_SCRIPT = textwrap.dedent(
    """
    import sys
    from modeling_puma import PumaForEmbedding

    model = PumaForEmbedding.from_pretrained(sys.argv[1], **({"num_layers": int(sys.argv[2])} if len(sys.argv) > 2 else {}))
    print("LAYERS", len(model.model.language_model.layers), model.encode(["a red circle"]).shape)
    """
)


def test_a_hub_checkpoint_is_pruned_without_downloading_the_shards_of_dropped_layers(tiny_checkpoint, fake_hub,
                                                                                     tmp_path):
    # Given a Hub repository whose last shard holds only dropped layers (2..5) and the LM head
    endpoint, repos, requested = fake_hub
    repo = tmp_path / "repo"
    shutil.copytree(tiny_checkpoint, repo)
    tensors = load_file(repo / "model.safetensors")
    os.remove(repo / "model.safetensors")
    late = {k: v for k, v in tensors.items() if k.startswith("model.layers.") and int(k.split(".")[2]) >= 2}
    late["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    early = {k: v for k, v in tensors.items() if k not in late}
    save_file(early, repo / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(late, repo / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in early},
                  **{k: "model-00002-of-00002.safetensors" for k in late}}
    (repo / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    repos["puma-org/qwen2-vl-tiny"] = str(repo)
    (tmp_path / "load.py").write_text(FAKE_HUB_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=ROOT)

    def load(*args):
        result = subprocess.run([sys.executable, str(tmp_path / "load.py"), "puma-org/qwen2-vl-tiny", *args],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert "LAYERS" in result.stdout, result.stderr[-3000:]
        return result.stdout

    # When it is loaded from the Hub with two layers
    assert "LAYERS 2 torch.Size([1, 64])" in load("2")
    # Then the shard of dropped layers was never requested, and everything the model needs was
    files = {name for _, name in requested}
    assert "model-00002-of-00002.safetensors" not in files
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"} <= files
    # and at full depth it is fetched
    requested.clear()
    assert "LAYERS 6" in load()
    assert ("GET", "model-00002-of-00002.safetensors") in requested

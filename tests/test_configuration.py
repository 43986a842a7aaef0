"""PumaConfig: defaults, validation and serialisation."""

import json

import pytest
from transformers import Qwen2VLConfig

from configuration_puma import PumaConfig


def small_base(depth=6):
    return Qwen2VLConfig(text_config={"num_hidden_layers": depth, "hidden_size": 64, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "intermediate_size": 128,
                                      "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
                         vision_config={"depth": 1, "embed_dim": 32, "num_heads": 2, "hidden_size": 64})


def test_defaults_follow_the_release_prompt_format():
    config = PumaConfig()
    assert config.model_type == "puma" and config.base_model_type == "qwen2_vl" and config.preset == "puma"
    assert config.embedding_token == "[RET]" and config.pooling == "token" and config.normalize
    assert config.user_suffix_template.format(modality=config.modality_words["image,text"]) == \
        "\nSummarize above image and sentence in one word: "
    assert config.modality_words["text"] == "sentence"
    assert config.assistant_template.format(embedding_token=config.embedding_token) == "[RET].<|im_end|>\n"
    assert config.format_text and config.instruction_placement == "user" and config.position_mode == "mrope"
    assert (config.min_pixels, config.max_pixels) == (4 * 28 * 28, 300 * 28 * 28)
    assert config.kept_layers == list(range(config.text_config.num_hidden_layers))


def test_from_base_config_keeps_original_numbering_and_slices_layer_types():
    base = small_base()
    base.text_config.layer_types = ["full_attention"] * 5 + ["sliding_attention"]
    config = PumaConfig.from_base_config(base, [0, 1, 5])
    assert config.kept_layers == [0, 1, 5] and config.base_num_hidden_layers == 6
    assert config.text_config.num_hidden_layers == 3
    assert config.text_config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert config.text_config.hidden_size == 64 and config.vision_config.depth == 1
    # pruning a PUMA config further maps its local layer indices back to the base numbering
    further = PumaConfig.from_base_config(config, [0, 2])
    assert further.kept_layers == [0, 5] and further.base_num_hidden_layers == 6


@pytest.mark.parametrize("layers,match", [
    ([], "at least one"), ([1, 1], "duplicates"), ([3, 2], "sorted"), ([0, 6], r"0\.\.5"), ([-1, 0], r"0\.\.5"),
])
def test_impossible_layer_sets_are_rejected(layers, match):
    with pytest.raises(ValueError, match=match):
        PumaConfig.from_base_config(small_base(), layers)


@pytest.mark.parametrize("kwargs,match", [
    ({"pooling": "cls"}, "pooling='cls'"),
    ({"min_pixels": 10, "max_pixels": 5}, "min_pixels"),
    ({"max_text_tokens": 0}, "max_text_tokens"),
    ({"matryoshka_dims": [10_000]}, "matryoshka_dims"),
    ({"modality_words": {"image": "image"}}, "modality_words"),
    ({"kept_layers": [0, 1], "text_config": {"num_hidden_layers": 3}}, "must agree"),
])
def test_invalid_fields_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PumaConfig(**kwargs)


def test_save_and_load_round_trip(tmp_path):
    config = PumaConfig.from_base_config(small_base(), [0, 2, 5], pooling="mean", matryoshka_dims=[16, 32])
    config.embedding_token_id = 77
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["kept_layers"] == [0, 2, 5] and saved["text_config"]["num_hidden_layers"] == 3
    loaded = PumaConfig.from_pretrained(tmp_path)
    for field in ("kept_layers", "base_num_hidden_layers", "pooling", "matryoshka_dims", "embedding_token_id",
                  "user_suffix_template", "min_pixels", "max_pixels"):
        assert getattr(loaded, field) == getattr(config, field), field
    assert loaded.text_config.num_hidden_layers == 3


@pytest.mark.parametrize("preset,family,expected", [
    ("qwen3_vl_embedding", "qwen3_vl", dict(pooling="last", embedding_token=None, instruction_placement="system",
                                            system_prompt="Represent the user's input.", assistant_template="",
                                            punctuate_instruction=True, min_pixels=4 * 32 * 32,
                                            max_pixels=1800 * 32 * 32, processor_min_pixels=None,
                                            matryoshka_dims=[64, 128, 256, 512, 1024, 2048])),
    ("gme", "qwen2_vl", dict(pooling="last", embedding_token=None, instruction_placement="system",
                             system_prompt="You are a helpful assistant.", assistant_template="<|endoftext|>",
                             position_mode="sequential", min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28,
                             processor_min_pixels=256 * 28 * 28, processor_max_pixels=1280 * 28 * 28)),
    ("puma", "qwen3_vl", dict(pooling="token", system_prompt=None)),  # Qwen3-VL's template has no default system turn
])
def test_presets_set_the_recipe_and_explicit_fields_win(preset, family, expected):
    config = PumaConfig(base_model_type=family, preset=preset, text_config={"hidden_size": 2048})
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    overridden = PumaConfig(base_model_type=family, preset=preset, text_config={"hidden_size": 2048}, max_text_tokens=7)
    assert overridden.max_text_tokens == 7 and overridden.pooling == expected["pooling"]


@pytest.mark.parametrize("family,text,vision", [
    ("qwen2_5_vl", "Qwen2_5_VLTextConfig", "Qwen2_5_VLVisionConfig"),
    ("qwen3_vl", "Qwen3VLTextConfig", "Qwen3VLVisionConfig"),
])
def test_sub_configurations_are_the_family_own(family, text, vision):
    config = PumaConfig(base_model_type=family, text_config={"model_type": "anything", "num_hidden_layers": 2})
    assert type(config.text_config).__name__ == text and type(config.vision_config).__name__ == vision
    backbone = config.backbone_config()
    assert backbone.model_type == family and backbone.text_config is config.text_config


@pytest.mark.parametrize("kept,expected", [
    ([0, 1], [8, 16]), ([0, 1, 2, 3], [8, 16, 24]), ([0, 2, 5], [8, 24]), ([1, 2], [16, 24]), ([4, 5], []),
])
def test_qwen3_deepstack_injections_follow_their_kept_layers(kept, expected):
    from transformers import Qwen3VLConfig

    base = Qwen3VLConfig(text_config={"num_hidden_layers": 6, "hidden_size": 64}, vision_config={"depth": 27})
    assert list(base.vision_config.deepstack_visual_indexes) == [8, 16, 24]
    config = PumaConfig.from_base_config(base, kept)
    assert config.vision_config.deepstack_visual_indexes == expected
    assert config.base_model_type == "qwen3_vl" and config.kept_layers == kept


def test_saved_sub_configurations_carry_the_legacy_rope_keys(tmp_path):
    config = PumaConfig.from_base_config(small_base(), [0, 1])
    config.save_pretrained(tmp_path)
    text = json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert text["rope_scaling"]["mrope_section"] == [2, 3, 3] and text["rope_theta"] == 1000000.0


def test_the_first_layers_of_an_elastic_model_keep_their_trained_depths():
    config = PumaConfig.from_base_config(small_base(), [0, 1, 2, 3], trained_depths=[1, 2, 4])
    assert config.trained_depths == [1, 2, 4]
    assert PumaConfig.from_base_config(config, [0, 1]).trained_depths == [1, 2]
    assert PumaConfig.from_base_config(config, [0, 2]).trained_depths is None  # not a prefix: not trained so
    with pytest.raises(ValueError, match=r"trained_depths entry 5 is outside 1\.\.4"):
        PumaConfig.from_base_config(small_base(), [0, 1, 2, 3], trained_depths=[5])

"""PumaConfig: defaults, validation and serialisation."""

import json

import pytest
from transformers import Qwen2VLConfig

from configuration_puma import PumaConfig


def small_base(depth=6):
    return Qwen2VLConfig(text_config={"num_hidden_layers": depth, "hidden_size": 64, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "intermediate_size": 128},
                         vision_config={"depth": 1, "embed_dim": 32, "num_heads": 2, "hidden_size": 64})


def test_defaults_follow_the_release_prompt_format():
    config = PumaConfig()
    assert config.model_type == "puma"
    assert config.embedding_token == "[RET]" and config.pooling == "token" and config.normalize
    assert config.user_suffix_template.format(modality=config.modality_words["image,text"]) == \
        "\nSummarize above image and sentence in one word: "
    assert config.modality_words["text"] == "sentence"
    assert config.assistant_template.format(embedding_token=config.embedding_token) == "[RET]."
    assert (config.min_pixels, config.max_pixels) == (4 * 28 * 28, 300 * 28 * 28)
    assert config.kept_layers == list(range(config.text_config.num_hidden_layers))


def test_from_qwen2_vl_config_keeps_original_numbering_and_slices_layer_types():
    base = small_base()
    base.text_config.layer_types = ["full_attention"] * 5 + ["sliding_attention"]
    config = PumaConfig.from_qwen2_vl_config(base, [0, 1, 5])
    assert config.kept_layers == [0, 1, 5] and config.base_num_hidden_layers == 6
    assert config.text_config.num_hidden_layers == 3
    assert config.text_config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert config.text_config.hidden_size == 64 and config.vision_config.depth == 1
    # pruning a PUMA config further maps its local layer indices back to the base numbering
    further = PumaConfig.from_qwen2_vl_config(config, [0, 2])
    assert further.kept_layers == [0, 5] and further.base_num_hidden_layers == 6


@pytest.mark.parametrize("layers,match", [
    ([], "at least one"), ([1, 1], "duplicates"), ([3, 2], "sorted"), ([0, 6], r"0\.\.5"), ([-1, 0], r"0\.\.5"),
])
def test_impossible_layer_sets_are_rejected(layers, match):
    with pytest.raises(ValueError, match=match):
        PumaConfig.from_qwen2_vl_config(small_base(), layers)


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
    config = PumaConfig.from_qwen2_vl_config(small_base(), [0, 2, 5], pooling="mean", matryoshka_dims=[16, 32])
    config.embedding_token_id = 77
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["kept_layers"] == [0, 2, 5] and saved["text_config"]["num_hidden_layers"] == 3
    loaded = PumaConfig.from_pretrained(tmp_path)
    for field in ("kept_layers", "base_num_hidden_layers", "pooling", "matryoshka_dims", "embedding_token_id",
                  "user_suffix_template", "min_pixels", "max_pixels"):
        assert getattr(loaded, field) == getattr(config, field), field
    assert loaded.text_config.num_hidden_layers == 3

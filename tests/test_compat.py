"""The assumptions behind the "transformers compatibility" helpers of modeling_puma.py and configuration_puma.py, each
checked on the installed transformers; every failure names its version. CI runs this file on transformers 4.57, on
the oldest supported 5.x and on the newest."""

import inspect
import json
import os
import re

import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open

import modeling_puma
from configuration_puma import SUPPORTED_TRANSFORMERS, PumaConfig, set_attn_implementation, sub_config_declaration
from conftest import ROOT
from modeling_puma import (PumaForEmbedding, TransformersCompatibilityError, attn_implementation,
                           holds_fused_experts_transposed, hub_offline_mode, image_processor_pixel_kwargs,
                           keep_pruned_names_on_save, loads_lazy_state_dict, prepare_inputs,
                           set_image_processor_pixels, smart_resize, transformers_major)
from tiny_puma import GENERATION_CLASS, hub_config


VERSION = f"transformers {transformers.__version__}"


def small_puma_config(**kwargs) -> PumaConfig:
    return PumaConfig(text_config={"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "intermediate_size": 128,
                                   "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
                      vision_config={"depth": 1, "embed_dim": 32, "num_heads": 2, "hidden_size": 64}, **kwargs)


def test_the_installed_transformers_is_in_the_supported_range():
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(SUPPORTED_TRANSFORMERS).contains(transformers.__version__, prereleases=True), \
        f"{VERSION} is outside the supported range {SUPPORTED_TRANSFORMERS}"
    assert transformers_major() == int(transformers.__version__.split(".")[0])
    assert transformers_major("5.4.0") == 5 and transformers_major("4.57.6") == 4


def test_the_install_range_is_the_supported_range_and_ci_tests_its_oldest_5x():
    from packaging.specifiers import SpecifierSet

    setup = open(os.path.join(ROOT, "setup.cfg"), encoding="utf-8").read()
    assert f"\n    transformers{SUPPORTED_TRANSFORMERS}\n" in setup
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    oldest = re.search(r"^OLDEST_TRANSFORMERS_5=(\S+)$", ci, re.M).group(1)
    major, minor, _ = (int(part) for part in oldest.split("."))
    supported = SpecifierSet(SUPPORTED_TRANSFORMERS)
    assert oldest in supported and f"{major}.{minor - 1}.99" not in supported, oldest


# ----------------------------------------------------------------------------------------------------------------
# configuration_puma.py
# ----------------------------------------------------------------------------------------------------------------
def test_sub_configurations_are_declared_the_way_this_transformers_reads_them():
    (attribute, declared), = sub_config_declaration().items()
    if attribute == "sub_configs_defaults":
        from transformers.configuration_utils import SubConfigSpec

        assert all(isinstance(spec, SubConfigSpec) for spec in declared.values()), VERSION
    # whichever the declaration, transformers derives `sub_configs` from it, and its loaders iterate that
    assert set(PumaConfig.sub_configs) == {"text_config", "vision_config"}, \
        f"{VERSION} does not see PumaConfig's {attribute} as its sub_configs"
    config = small_puma_config()
    saved = config.to_dict()
    assert saved["text_config"]["num_hidden_layers"] == 2 and saved["vision_config"]["depth"] == 1, VERSION
    assert type(PumaConfig(**{k: v for k, v in saved.items() if k != "model_type"}).text_config) is \
        type(config.text_config), f"{VERSION}: a saved PumaConfig does not reload its family's text configuration"


def test_the_attention_implementation_is_set_and_read_through_the_configuration():
    config = small_puma_config()
    set_attn_implementation(config, "eager")
    assert attn_implementation(config) == "eager", VERSION
    # the setter updates the sub-configurations, and the backbone configuration shares them
    assert attn_implementation(config.text_config) == attn_implementation(config.vision_config) == "eager", \
        f"{VERSION}: setting _attn_implementation does not reach the sub-configurations"
    backbone = config.backbone_config()
    assert attn_implementation(backbone) == "eager" and backbone.text_config is config.text_config, VERSION


def test_a_configuration_without_an_attention_implementation_is_a_compatibility_error():
    with pytest.raises(TransformersCompatibilityError, match=rf"transformers {transformers.__version__} .*"
                                                             r"_attn_implementation"):
        attn_implementation(object())


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def test_the_key_mapping_loads_layer_2_as_layer_1_and_saves_it_so(tiny_checkpoint, tmp_path):
    # Given non-contiguous layers 0 and 2 loaded through the pruning key mapping (lazy state dict or folder)
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, kept_layers=[0, 2])
    with safe_open(os.path.join(tiny_checkpoint, "model.safetensors"), framework="pt") as f:
        source = f.get_tensor("model.layers.2.mlp.down_proj.weight")
    assert torch.equal(model.model.language_model.layers[1].mlp.down_proj.weight, source), \
        f"{VERSION} did not load checkpoint layer 2 as layer 1 (loads_lazy_state_dict={loads_lazy_state_dict()})"
    if transformers_major() >= 5:  # only the family's own conversions are left to revert on save
        mapping = modeling_puma._key_mapping(modeling_puma.load_source_config(tiny_checkpoint), [0, 2], True)
        for conversion in model._weight_conversions:
            patterns = getattr(conversion, "_original_source_patterns", None) or conversion.source_patterns
            assert not set(patterns) & set(mapping), f"{VERSION} still records the pruning map: {patterns}"
    # When it is saved, then its file holds layers 0 and 1 (not the source numbering 0 and 2)
    model.save_pretrained(tmp_path / "puma")
    with safe_open(str(tmp_path / "puma" / "model.safetensors"), framework="pt") as f:
        layers = {int(key.split("layers.")[1].split(".")[0]) for key in f.keys() if "layers." in key}
    assert layers == {0, 1}, f"{VERSION}: save_pretrained wrote layers {sorted(layers)}"


class _ModelWithoutConversions:
    pass


class _Conversion:
    def __init__(self, source_patterns, used: bool = True):
        self.source_patterns, self.used = source_patterns, used

    def was_used(self) -> bool:
        return self.used


def test_the_pruning_map_and_unused_renamings_are_dropped_from_the_recorded_conversions_only():
    mapping = {r"^model\.layers\.(2)\.": "model.language_model.layers.1."}
    model = _ModelWithoutConversions()
    if transformers_major() < 5:
        keep_pruned_names_on_save(model, mapping)  # transformers 4 reverts no key_mapping: nothing to do
        assert not hasattr(model, "_weight_conversions")
        return
    with pytest.raises(TransformersCompatibilityError, match=rf"transformers {transformers.__version__} .*"
                                                             r"_weight_conversions"):
        keep_pruned_names_on_save(model, mapping)
    family, pruning = _Conversion([r"^visual\.merger\."]), _Conversion(list(mapping))
    model._weight_conversions = [family, pruning]
    keep_pruned_names_on_save(model, mapping)
    assert model._weight_conversions == [family]
    model._weight_conversions = [family]
    with pytest.raises(TransformersCompatibilityError, match="is among model._weight_conversions"):
        keep_pruned_names_on_save(model, mapping)
    # a load under DeepSpeed ZeRO-3 records the renamings it tried, too: those that renamed nothing are dropped
    legacy = _Conversion([r"^model\.language_model\.model"], used=False)
    model._weight_conversions = [family, legacy, pruning]
    keep_pruned_names_on_save(model, mapping)
    assert model._weight_conversions == [family]


def test_qwen3_moe_fused_experts_are_held_in_the_layout_the_helper_says():
    config = {k: v for k, v in hub_config("qwen3_vl_moe").items()
              if k not in ("architectures", "model_type", "transformers_version")}
    with torch.device("meta"):
        model = transformers.Qwen3VLMoeForConditionalGeneration(transformers.Qwen3VLMoeConfig(**config))
    text = model.config.text_config
    experts = model.model.language_model.layers[0].mlp.experts
    hub_layout = (text.num_experts, text.hidden_size, 2 * text.moe_intermediate_size)
    transposed = (text.num_experts, 2 * text.moe_intermediate_size, text.hidden_size)
    assert tuple(experts.gate_up_proj.shape) == (transposed if holds_fused_experts_transposed() else hub_layout), \
        f"{VERSION} holds gate_up_proj as {tuple(experts.gate_up_proj.shape)}"
    assert GENERATION_CLASS["qwen3_vl_moe"] == type(model).__name__


# ----------------------------------------------------------------------------------------------------------------
# Images and processors
# ----------------------------------------------------------------------------------------------------------------
def test_smart_resize_is_qwen2_vl_image_processing_own():
    # the export card's recipe imports it from there too
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as library

    for height, width in ((97, 61), (45, 130), (2000, 3000)):
        got = smart_resize(height, width, factor=28, min_pixels=4 * 28 * 28, max_pixels=300 * 28 * 28)
        assert got == library(height, width, factor=28, min_pixels=4 * 28 * 28, max_pixels=300 * 28 * 28), VERSION
        assert got[0] % 28 == 0 and got[1] % 28 == 0 and 4 * 28 * 28 <= got[0] * got[1] <= 300 * 28 * 28, VERSION


@pytest.mark.parametrize("low, high", [(4 * 28 * 28, 8 * 28 * 28), (20 * 28 * 28, 40 * 28 * 28)])
def test_the_image_processor_resizes_into_the_pixel_range_it_is_given(low, high):
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    image = Image.new("RGB", (300, 200), (10, 120, 200))
    grid = image_processor(images=[image], return_tensors="pt", **image_processor_pixel_kwargs(low, high))
    pixels = int(grid["image_grid_thw"][0, 1:].prod()) * 14 * 14
    assert low <= pixels <= high, f"{VERSION} resized to {pixels} pixels, outside [{low}, {high}]"


def test_a_saved_image_processor_keeps_the_pixel_range(tmp_path):
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    set_image_processor_pixels(image_processor, 4 * 28 * 28, 8 * 28 * 28)
    image_processor.save_pretrained(tmp_path)
    reloaded = transformers.Qwen2VLImageProcessor.from_pretrained(tmp_path)
    grid = reloaded(images=[Image.new("RGB", (600, 400))], return_tensors="pt")["image_grid_thw"]
    pixels = int(grid[0, 1:].prod()) * 14 * 14
    assert 4 * 28 * 28 <= pixels <= 8 * 28 * 28, f"{VERSION} reloads the pixel range as {pixels} pixels"


def test_flash_attention_is_detected_through_public_api():
    from transformers.utils import is_flash_attn_2_available

    assert isinstance(is_flash_attn_2_available(), bool), VERSION


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_the_vision_towers_outputs_are_reused_where_the_backbone_takes_them(family_checkpoints, family):
    # GradCache's second pass skips a frozen vision tower where transformers takes its earlier outputs back
    model = PumaForEmbedding.from_pretrained(family_checkpoints[family], num_layers=3)
    features = modeling_puma.featurize(model.processor, model.config, [
        modeling_puma.build_prompt(model.config, "a dot", True, None, model.processor.tokenizer)],
        [Image.new("RGB", (56, 84), (200, 10, 10))])
    with torch.no_grad():
        first = model(**features, output_visual_outputs=True)
        if not modeling_puma.reuses_visual_outputs(model):
            assert first.visual_outputs is None, VERSION
            with pytest.raises(TransformersCompatibilityError, match=rf"transformers {transformers.__version__}"):
                model(**features, visual_outputs={"image": object()})
            return
        assert set(first.visual_outputs) == {"image"}, VERSION
        again = model(**{k: v for k, v in features.items() if k != "pixel_values"},
                      visual_outputs=first.visual_outputs)
    assert torch.equal(again.raw_embeddings, first.raw_embeddings), VERSION


# ----------------------------------------------------------------------------------------------------------------
# Trainer and Hub
# ----------------------------------------------------------------------------------------------------------------
def test_the_trainer_prepares_a_batch_with_prepare_inputs():
    prepare = getattr(transformers.Trainer, "_prepare_inputs", None)
    assert prepare is not None and list(inspect.signature(prepare).parameters) == ["self", "inputs"], \
        f"{VERSION}: Trainer._prepare_inputs(inputs) is gone or takes other arguments"
    with pytest.raises(TransformersCompatibilityError, match=rf"transformers {transformers.__version__} .*"
                                                             r"_prepare_inputs"):
        prepare_inputs(object(), {})


def test_hub_offline_mode_follows_hf_hub_offline(monkeypatch):
    from huggingface_hub import constants

    for value in (True, False):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", value)
        assert hub_offline_mode() is value


def test_the_processor_of_a_puma_folder_loads_with_its_configuration(tiny_checkpoint, tmp_path):
    # transformers 5's tokenizer loader resolves the model configuration, here remote code: the helper hands it over
    PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1).save_pretrained(tmp_path / "puma")
    config = json.loads((tmp_path / "puma" / "config.json").read_text())
    assert config["model_type"] == "puma"
    processor = modeling_puma.load_processor(str(tmp_path / "puma"), PumaConfig.from_pretrained(tmp_path / "puma"))
    assert "[RET]" in processor.tokenizer.get_vocab(), VERSION
    assert os.path.isfile(tmp_path / "puma" / "tokenizer_config.json")

"""FLOP counts of `cost_puma` against torch's own counter (`FlopCounterMode`) on real forwards of every family, with
eager attention and eager experts (the counter does not see CPU SDPA kernels nor the grouped expert kernels)."""

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from conftest import FAMILIES
from cost_puma import (depth_costs, text_flops_per_sequence, video_grid, video_tokens, vision_flops_per_image,
                       vision_flops_per_video)
from modeling_puma import PumaForEmbedding, build_prompt, featurize


def load(checkpoint, num_layers):
    model = PumaForEmbedding.from_pretrained(checkpoint, num_layers=num_layers, attn_implementation="eager")
    if model.config.base_model_type == "qwen3_vl_moe":
        model.set_experts_implementation("eager")  # one matrix product per expert, which the counter sees
    return model


def features(model, text, image=None):
    prompt = build_prompt(model.config, text, image is not None, None, model.processor.tokenizer)
    return featurize(model.processor, model.config, [prompt], [image])


def counted(model, inputs) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_and_image_flops_equal_torchs_count_of_the_forward(family_checkpoints, family):
    model = load(family_checkpoints[family], num_layers=2)
    config = model.config
    text = features(model, "a red circle on a white table")
    image = features(model, None, Image.new("RGB", (112, 84), "red"))
    _, grid_h, grid_w = image["image_grid_thw"][0].tolist()

    text_flops = text_flops_per_sequence(config.text_config, 2, text["input_ids"].shape[1])
    image_flops = vision_flops_per_image(config.vision_config, grid_h, grid_w) \
        + text_flops_per_sequence(config.text_config, 2, image["input_ids"].shape[1])

    assert text_flops == counted(model, text)
    if family == "qwen2_5_vl":  # windowed vision attention: full attention is counted, an upper bound
        assert 1 <= image_flops / counted(model, image) <= 1.05
    else:
        assert image_flops == counted(model, image)


def test_depth_costs_are_the_ratios_of_the_truncated_models_flops(family_checkpoints):
    # Qwen3-VL: a shallower model also drops the DeepStack mergers of the layers it no longer has
    deepest = load(family_checkpoints["qwen3_vl"], num_layers=3)
    picture = Image.new("RGB", (64, 64), "blue")  # 4 x 4 patches of 16 pixels: already a multiple of the merged patch
    image_inputs = features(deepest, None, picture)
    image_tokens = int(image_inputs["image_grid_thw"][0].prod()) // deepest.config.vision_config.spatial_merge_size ** 2
    text_inputs = features(deepest, "a red circle on a white table")
    length = text_inputs["input_ids"].shape[1]

    costs = depth_costs(deepest.config, [1, 2, 3], text_tokens=length, image_pixels=64 * 64)
    image_costs = depth_costs(deepest.config, [1, 2, 3], image_inputs["input_ids"].shape[1] - image_tokens, 64 * 64)

    totals = {}
    for depth in (1, 2, 3):
        model = deepest if depth == 3 else load(family_checkpoints["qwen3_vl"], depth)
        totals[depth] = (counted(model, text_inputs), counted(model, image_inputs))
    for depth in (1, 2, 3):
        assert costs[depth]["text"] == pytest.approx(totals[depth][0] / totals[3][0], rel=1e-12)
        assert image_costs[depth]["image"] == pytest.approx(totals[depth][1] / totals[3][1], rel=1e-12)
    assert image_costs[1]["image"] > costs[1]["text"]  # the vision tower runs at every depth


@pytest.mark.parametrize("family", FAMILIES)
def test_video_flops_and_tokens_equal_the_forwards(family_checkpoints, family, tmp_path):
    pytest.importorskip("av", reason="the video is written and decoded with PyAV")
    from media_fixtures import moving_shape_frames, write_video
    from modeling_puma import parse_input

    factor = 32 if family.startswith("qwen3") else 28
    model = PumaForEmbedding.from_pretrained(family_checkpoints[family], num_layers=2, attn_implementation="eager",
                                             video_max_frames=6, video_min_pixels=4 * factor ** 2,
                                             video_max_pixels=16 * factor ** 2, video_total_pixels=24 * factor ** 2)
    if family == "qwen3_vl_moe":
        model.set_experts_implementation("eager")
    config = model.config
    path = write_video(tmp_path / "clip.mp4", moving_shape_frames(30, (90, 60)))  # 3 s at 10 fps: 6 frames
    _, video = parse_input(path, 0, config=config)
    inputs = featurize(model.processor, config, [model.build_prompt(None, video)], [video])
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert (t, h, w) == video_grid(config, 6, 60, 90)
    assert int((inputs["input_ids"] == config.video_token_id).sum()) == video_tokens(config, 6, 60, 90)
    flops = vision_flops_per_video(config.vision_config, t, h, w) \
        + text_flops_per_sequence(config.text_config, 2, inputs["input_ids"].shape[1])
    if family == "qwen2_5_vl":  # windowed vision attention: full attention is counted, an upper bound
        assert 1 <= flops / counted(model, inputs) <= 1.05
    else:
        assert flops == counted(model, inputs)


def test_video_depth_costs_are_the_ratios_of_the_truncated_models_flops(family_checkpoints, tmp_path):
    pytest.importorskip("av", reason="the video is written and decoded with PyAV")
    from media_fixtures import moving_shape_frames, write_video
    from modeling_puma import parse_input

    settings = dict(video_max_frames=4, video_min_pixels=4 * 32 * 32, video_max_pixels=16 * 32 * 32,
                    video_total_pixels=24 * 32 * 32, attn_implementation="eager")
    path = write_video(tmp_path / "clip.mp4", moving_shape_frames(20, (64, 64)))
    totals, costs = {}, None
    for depth in (1, 2, 3):
        model = PumaForEmbedding.from_pretrained(family_checkpoints["qwen3_vl"], num_layers=depth, **settings)
        _, video = parse_input(path, 0, config=model.config)
        inputs = featurize(model.processor, model.config, [model.build_prompt(None, video)], [video])
        totals[depth] = counted(model, inputs)
        if depth == 3:
            text_tokens = inputs["input_ids"].shape[1] - int((inputs["input_ids"] == model.config.video_token_id).sum())
            costs = depth_costs(model.config, [1, 2, 3], text_tokens, video=(4, 64, 64))
    for depth in (1, 2, 3):
        assert costs[depth]["video"] == pytest.approx(totals[depth] / totals[3], rel=1e-12)

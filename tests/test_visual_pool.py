"""Visual-token reduction (`PumaConfig.visual_pool`): factor 1 is the model unchanged; factor k equals a hand-built
computation (transformers' own vision tower, window means over the merged grid, placeholder runs shortened to the
reduced grid, transformers' own `get_rope_index` on the reduced grid and its own language model) for every family,
Qwen3-VL's DeepStack and videos included; odd grids pool with ceil; the plain export refuses it."""

import json
import math
import os

import pytest
import torch
import transformers

from conftest import TINY_DEPTH
from modeling_puma import PumaForEmbedding, pool_visual_grid, reduced_grid_thw, visual_keep_pattern
from numerics import assert_close
from test_modeling import features_for, inputs_of_every_kind
from test_video import clips, small_video, video_features, video_inputs_of_every_kind  # noqa: F401 (fixture)


FORWARD_ULPS = 100  # two code paths that round differently, as in test_families


def stock_model(checkpoint, model):
    """transformers' own full model of `checkpoint` with `model`'s embedding-token row (the only weight PUMA adds)."""
    with open(os.path.join(checkpoint, "config.json")) as f:
        architecture = json.load(f)["architectures"][0]
    full = getattr(transformers, architecture).from_pretrained(checkpoint, dtype=torch.float32).model.eval()
    token_id = model.config.embedding_token_id
    if token_id >= full.get_input_embeddings().weight.shape[0]:
        full.resize_token_embeddings(token_id + 1)
    with torch.no_grad():
        full.get_input_embeddings().weight[token_id] = model.get_input_embeddings().weight[token_id]
    return full


def window_means(features, thw, merge, k):
    """Each frame's merged grid (rows x cols, raster order) averaged over k x k windows, edge windows over the
    cells they cover, by explicit loops."""
    t, h, w = thw
    rows, cols = h // merge, w // merge
    grid = features.reshape(t, rows, cols, -1)
    out = [grid[f, r:r + k, c:c + k].reshape(-1, grid.shape[-1]).mean(0)
           for f in range(t) for r in range(0, rows, k) for c in range(0, cols, k)]
    return torch.stack(out)


def shortened_rows(features, token_ids, grids, merge, k):
    """Each row of input_ids / attention_mask / token types with every frame's placeholder run cut to the reduced
    grid's token count (visuals in order over the batch), right-padded."""
    kept_rows = []
    frames = {kind: [f for t, h, w in grids[kind] for f in [(h // merge) * (w // merge)] * t] for kind in grids}
    kept_of = {kind: [math.ceil(h // merge / k) * math.ceil(w // merge / k) for t, h, w in grids[kind]
                      for _ in range(t)] for kind in grids}
    cursor = {kind: [0, 0] for kind in grids}  # frame index, tokens seen in that frame
    for row in range(features["input_ids"].shape[0]):
        kept = []
        for column, token in enumerate(features["input_ids"][row].tolist()):
            kind = token_ids.get(token)
            if kind is not None:
                frame, seen = cursor[kind]
                keep = seen < kept_of[kind][frame]
                seen += 1
                cursor[kind] = [frame + 1, 0] if seen == frames[kind][frame] else [frame, seen]
                if not keep:
                    continue
            kept.append(column)
        kept_rows.append(kept)
    width = max(len(kept) for kept in kept_rows)
    ids = torch.zeros(len(kept_rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, kept in enumerate(kept_rows):
        ids[row, :len(kept)] = features["input_ids"][row, kept]
        mask[row, :len(kept)] = features["attention_mask"][row, kept]
    return ids, mask


def reduced_oracle(checkpoint, model, features, depth_after, k):
    """The embedding of `features` with visual tokens pooled k x k, built by hand from transformers' own model."""
    full = stock_model(checkpoint, model)
    config = model.config
    merge = config.vision_config.spatial_merge_size
    token_ids = {config.image_token_id: "image", config.video_token_id: "video"}
    visuals = {kind: (features[pixels], features[f"{kind}_grid_thw"])
               for kind, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")) if pixels in features}
    grids = {kind: grid.tolist() for kind, (_, grid) in visuals.items()}
    with torch.no_grad():
        pooled, deepstack = {}, {}
        for kind, (pixels, grid) in visuals.items():
            out = full.visual(pixels, grid_thw=grid, return_dict=True)
            sizes = [t * h * w // merge ** 2 for t, h, w in grids[kind]]

            def pool(merged, sizes=sizes, kind=kind):
                return torch.cat([window_means(part, thw, merge, k)
                                  for part, thw in zip(merged.split(sizes), grids[kind])])

            pooled[kind] = pool(out.pooler_output)
            deepstack[kind] = [pool(level) for level in (getattr(out, "deepstack_features", None) or [])]
        ids, mask = shortened_rows(features, token_ids, grids, merge, k)
        types = torch.zeros_like(ids, dtype=torch.int32)
        types[ids == config.image_token_id] = 1
        types[ids == config.video_token_id] = 2
        reduced = {f"{kind}_grid_thw": torch.tensor([[t, math.ceil(h // merge / k) * merge,
                                                      math.ceil(w // merge / k) * merge] for t, h, w in grids[kind]])
                   for kind in grids}
        rope_kwargs = {"second_per_grid_ts": features["second_per_grid_ts"]} if "second_per_grid_ts" in features else {}
        positions, _ = full.get_rope_index(ids, mm_token_type_ids=types, attention_mask=mask, **reduced,
                                           **rope_kwargs)
        embeds = full.get_input_embeddings()(ids)
        is_visual = torch.zeros_like(ids, dtype=torch.bool)
        for token_id, kind in token_ids.items():
            if kind in pooled:
                embeds[ids == token_id] = pooled[kind]
                is_visual |= ids == token_id
        extra = {}
        if any(deepstack.values()):
            levels = len(next(iter(v for v in deepstack.values() if v)))
            joint = []
            for level in range(levels):
                rows = embeds.new_zeros(int(is_visual.sum()), embeds.shape[-1])
                for token_id, kind in token_ids.items():
                    if kind in deepstack:
                        rows[(ids == token_id)[is_visual]] = deepstack[kind][level]
                joint.append(rows)
            extra = {"visual_pos_masks": is_visual, "deepstack_visual_embeds": joint}
        captured = {}
        layers = full.language_model.layers
        if depth_after < len(layers):
            layers[depth_after].register_forward_pre_hook(
                lambda module, args, kwargs: captured.update(hidden=args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True)
        out = full.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **extra)
        hidden = full.language_model.norm(captured["hidden"]) if captured else out.last_hidden_state
    is_token = (ids == config.embedding_token_id) & mask.bool()
    position = (is_token * (torch.arange(ids.shape[1]) + 1)).argmax(dim=1)
    return hidden[torch.arange(ids.shape[0]), position]


# ---------------------------------------------------------------------------------------------------------------
# The grid arithmetic
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["avg", "bilinear"])
def test_pooling_an_odd_grid_keeps_a_ceil_sized_grid(mode):
    # Given a 2-frame video grid of 5 x 3 merged cells (merge 2: patches 10 x 6)
    features = torch.randn(2 * 5 * 3, 4, dtype=torch.float64)
    pooled = pool_visual_grid(features, (2, 10, 6), merge=2, factor=2, mode=mode)
    # Then each frame keeps ceil(5/2) x ceil(3/2) cells, as the reduced grid and the kept placeholders say
    assert pooled.shape == (2 * 3 * 2, 4)
    grid = torch.tensor([[2, 10, 6]])
    assert reduced_grid_thw(grid, 2, 2).tolist() == [[2, 6, 4]]
    assert visual_keep_pattern(grid, 2, 2).tolist() == ([True] * 6 + [False] * 9) * 2
    if mode == "avg":  # the edge windows average the cells they cover only
        assert_close(pooled, window_means(features, (2, 10, 6), 2, 2))


@pytest.mark.parametrize("mode", ["avg", "bilinear"])
def test_bfloat16_features_pool_in_float32_and_keep_their_dtype(mode):
    features = torch.randn(3 * 5, 8, dtype=torch.bfloat16)
    pooled = pool_visual_grid(features, (1, 6, 10), merge=2, factor=2, mode=mode)
    assert pooled.dtype == torch.bfloat16
    assert_close(pooled.float(), pool_visual_grid(features.float(), (1, 6, 10), 2, 2, mode), dtype=torch.bfloat16,
                 ulps=1)


def test_bilinear_pooling_of_a_constant_grid_is_that_constant():
    features = torch.full((4 * 4, 3), 2.5, dtype=torch.float64)
    assert_close(pool_visual_grid(features, (1, 8, 8), merge=2, factor=2, mode="bilinear"),
                 torch.full((4, 3), 2.5, dtype=torch.float64))


@pytest.mark.parametrize("thw, factor", [((1, 16, 12), 2), ((2, 14, 10), 2), ((1, 20, 16), 4)],
                         ids=["even", "odd-video", "factor-4"])
def test_bilinear_pooling_equals_pillows_antialiased_bilinear_resize(thw, factor):
    # Pillow's BILINEAR resize of a float image ("F" mode) widens its triangle filter by the scale when it
    # shrinks: the antialiased resampling the "bilinear" mode promises, computed by another library per channel
    import numpy as np
    from PIL import Image

    t, h, w = thw
    rows, cols = h // 2, w // 2
    features = torch.randn(t * rows * cols, 3, dtype=torch.float32)
    size = (-(-cols // factor), -(-rows // factor))  # Pillow's (width, height)
    grid = features.reshape(t, rows, cols, 3).numpy()
    expected = torch.from_numpy(np.stack([
        np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(grid[f, :, :, c]))
                             .resize(size, Image.BILINEAR)) for c in range(3)], axis=-1)
        for f in range(t)])).reshape(-1, 3)
    assert_close(pool_visual_grid(features, thw, merge=2, factor=factor, mode="bilinear"), expected, ulps=8)


def test_bad_reduction_factors_are_refused_naming_the_option(tiny_checkpoint):
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="visual_pool"):
            PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2, visual_pool=bad)
    with pytest.raises(ValueError, match="visual_pool_mode"):
        PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2, visual_pool_mode="max")


# ---------------------------------------------------------------------------------------------------------------
# The model against the hand-built computation
# ---------------------------------------------------------------------------------------------------------------
def test_factor_one_leaves_the_model_bit_equal(family_checkpoints, images):
    model = PumaForEmbedding.from_pretrained(family_checkpoints["qwen3_vl"], num_layers=3)
    features = features_for(model, inputs_of_every_kind(images))
    with torch.no_grad():
        plain = model(**features).raw_embeddings
        explicit = model(**features, visual_pool=1).raw_embeddings
    assert torch.equal(plain, explicit)


@pytest.mark.parametrize("family,k", [("qwen2_vl", 3), ("qwen2_5_vl", 2), ("qwen3_vl", 2), ("qwen3_vl", 4),
                                      ("qwen3_vl", TINY_DEPTH), ("qwen3_vl_moe", 2)])
def test_reduced_images_equal_the_hand_built_reduction(family_checkpoints, images, family, k):
    checkpoint = family_checkpoints[family]
    model = PumaForEmbedding.from_pretrained(checkpoint, num_layers=k, visual_pool=2)
    features = features_for(model, inputs_of_every_kind(images))
    # the images' merged grids include odd sides (ceil pooling is exercised)
    merged = features["image_grid_thw"][:, 1:] // model.config.vision_config.spatial_merge_size
    assert (merged % 2 == 1).any()
    with torch.no_grad():
        raw = model(**features).raw_embeddings
    assert_close(raw, reduced_oracle(checkpoint, model, features, k, 2), ulps=FORWARD_ULPS)


def test_factor_given_to_encode_overrides_the_config(family_checkpoints, images):
    model = PumaForEmbedding.from_pretrained(family_checkpoints["qwen2_5_vl"], num_layers=2)
    reduced = PumaForEmbedding.from_pretrained(family_checkpoints["qwen2_5_vl"], num_layers=2, visual_pool=3)
    inputs = inputs_of_every_kind(images)
    assert_close(model.encode(inputs, visual_pool=3), reduced.encode(inputs), ulps=FORWARD_ULPS)
    assert not torch.allclose(model.encode(inputs), reduced.encode(inputs))
    # texts have no visual tokens: unchanged
    assert torch.equal(model.encode(["a red circle"], visual_pool=3), model.encode(["a red circle"]))


@pytest.mark.parametrize("family,k", [("qwen2_vl", 3), ("qwen2_5_vl", 2), ("qwen3_vl", 2), ("qwen3_vl", 4)])
def test_reduced_videos_equal_the_hand_built_reduction(family_checkpoints, clips, images, family, k):
    # Given videos (every frame pooled, Qwen3-VL's per-frame timestamps kept) with a text and an image in the batch
    checkpoint = family_checkpoints[family]
    model = PumaForEmbedding.from_pretrained(checkpoint, num_layers=k, visual_pool=2, **small_video(family))
    inputs = video_inputs_of_every_kind(clips, images)
    if family == "qwen2_5_vl":  # transformers 5.4 to 5.1x cannot place a batch mixing images and videos
        inputs = inputs[:-1]
    features = video_features(model, inputs)
    assert (features["video_grid_thw"][:, 0] > 1).any()
    with torch.no_grad():
        raw = model(**features).raw_embeddings
    assert_close(raw, reduced_oracle(checkpoint, model, features, k, 2), ulps=FORWARD_ULPS)


# ---------------------------------------------------------------------------------------------------------------
# Saving and exporting
# ---------------------------------------------------------------------------------------------------------------
def test_the_puma_folder_carries_the_reduction_and_the_plain_export_refuses_it(family_checkpoints, images, tmp_path):
    import hub_puma

    model = PumaForEmbedding.from_pretrained(family_checkpoints["qwen3_vl"], num_layers=2, visual_pool=2,
                                             trained_visual_pools=[1, 2])
    model.save_pretrained(tmp_path / "puma")
    reloaded = PumaForEmbedding.from_pretrained(str(tmp_path / "puma"))
    assert (reloaded.config.visual_pool, reloaded.config.trained_visual_pools) == (2, [1, 2])
    inputs = inputs_of_every_kind(images)
    assert_close(reloaded.encode(inputs), model.encode(inputs), ulps=FORWARD_ULPS)
    with pytest.raises(ValueError, match="visual_pool=2"):
        hub_puma.export_plain_checkpoint(tmp_path / "puma", tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    # at factor 1 the same weights export
    PumaForEmbedding.from_pretrained(str(tmp_path / "puma"), visual_pool=1).save_pretrained(tmp_path / "unreduced")
    hub_puma.export_plain_checkpoint(tmp_path / "unreduced", tmp_path / "plain")
    assert (tmp_path / "plain" / "config.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# Training: elastic reduction factors, distilled from the unreduced model
# ---------------------------------------------------------------------------------------------------------------
def test_a_reduced_training_step_distils_the_unreduced_self_and_records_the_factors(tiny_checkpoint, images,
                                                                                   tmp_path):
    pytest.importorskip("peft")
    from test_trainer import Collator, PairDataset, lora_student, one_batch, training_args
    from trainer_puma import PumaTrainer

    from modeling_puma import prepare_inputs

    student = lora_student(tiny_checkpoint)
    base = student.get_base_model()
    dataset = PairDataset(images)
    collator = Collator(base.processor, base.config)
    args = training_args(tmp_path, loss="infonce", distill="mse", distill_weight=0.5, contrastive_weight=0.5,
                         teacher="self", visual_pools=[1, 2], max_steps=2, save_strategy="no")
    trainer = PumaTrainer(model=student, args=args, train_dataset=dataset, data_collator=collator)
    batch = prepare_inputs(trainer, one_batch(dataset, collator))
    distill = {}
    for step in (0, 1):  # the factors are taken in turn, one per optimizer step
        trainer.state.global_step = step
        with torch.no_grad():
            _, outputs = trainer.compute_loss(student, batch, return_outputs=True)
            student_rows = trainer._embed(student, batch["candidate"])
            reference = student(**batch["candidate"], visual_pool=args.visual_pools[step]).raw_embeddings
        assert torch.equal(student_rows, reference)
        distill[step] = outputs["distill_loss"].item()
    # at factor 1 the student is its own teacher; at factor 2 it is pulled towards its unreduced embedding
    assert distill[0] == 0.0 and distill[1] > 0.0
    trainer.state.global_step = 0
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.load(open(tmp_path / "saved" / "config.json"))
    assert saved["trained_visual_pools"] == [1, 2]


def test_every_teacher_embeds_without_reduction(tiny_checkpoint, images):
    reduced = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2, visual_pool=2)
    features = features_for(reduced, inputs_of_every_kind(images))
    from trainer_puma import SeparateTeacher

    with torch.no_grad():
        assert torch.equal(SeparateTeacher(reduced).embed(features, None),
                           reduced(**features, visual_pool=1).raw_embeddings)
        assert not torch.allclose(reduced(**features).raw_embeddings, reduced(**features, visual_pool=1).raw_embeddings)


def test_reduction_with_grad_cache_or_a_reused_vision_tower_is_refused(tiny_checkpoint, images, tmp_path):
    pytest.importorskip("peft")
    from test_trainer import Collator, PairDataset, lora_student, training_args
    from trainer_puma import PumaTrainer

    student = lora_student(tiny_checkpoint)
    base = student.get_base_model()
    dataset = PairDataset(images)
    args = training_args(tmp_path, loss="infonce", visual_pools=[1, 2], grad_cache_chunk_size=2, max_steps=1,
                         save_strategy="no")
    with pytest.raises(ValueError, match="visual_pools does not combine with GradCache"):
        PumaTrainer(model=student, args=args, train_dataset=dataset,
                    data_collator=Collator(base.processor, base.config)).train()
    features = features_for(base, inputs_of_every_kind(images))
    with pytest.raises(ValueError, match="visual_pool=2 does not combine"):
        base(**features, visual_pool=2, output_visual_outputs=True)


def test_visual_pools_are_checked_naming_the_option(tmp_path):
    from trainer_puma import PumaTrainingArguments

    with pytest.raises(ValueError, match="visual_pools"):
        PumaTrainingArguments(output_dir=str(tmp_path), visual_pools=[1, 0], report_to=[], use_cpu=True)


def test_a_transformers_without_precomputed_encoder_outputs_is_named(tiny_checkpoint, images):
    from configuration_puma import TransformersCompatibilityError

    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2, visual_pool=2)
    features = features_for(model, inputs_of_every_kind(images))
    # as the family classes of transformers 4.57 and 5.4 are: no mm_encoder_outputs input
    model._backbone_inputs = model._backbone_inputs - {"mm_encoder_outputs"}
    with pytest.raises(TransformersCompatibilityError, match="mm_encoder_outputs.*visual_pool=2"):
        model(**features)
    model(**features, visual_pool=1)  # no reduction: no need of it

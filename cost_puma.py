# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Forward FLOPs of a PUMA model per input, from its configuration: the decoder layers and the vision tower. They are
the cost axis of a depth choice (the model card's depth table, the benchmarks).

Counts are 2 FLOPs per weight per token for every matrix product, plus the attention products at full length;
norms, activations, rotary embeddings and the embedding lookup are left out (under 1 % at the Hub shapes).

    from cost_puma import depth_costs

    depth_costs(model.config, [4, 8, 12], text_tokens=40)  # {4: {"text": 0.33, "image": 0.62}, ...}
    video_tokens(model.config, frames=16, height=720, width=1280)  # what a 16-frame 720p clip costs in tokens

With visual-token reduction (`visual_pool` k), the decoder sees `t * ceil(h / merge / k) * ceil(w / merge / k)`
visual tokens (`reduced_visual_tokens`); the vision tower's cost is unchanged (the pooling itself is left out).

    image_flops(model.config, depth=4, pixels=448 * 448, text_tokens=40, visual_pool=2)

A video is `t` temporal patches (pairs of frames) of `h x w` patches: its tokens are `t * h * w / merge^2` and its
vision FLOPs `t` times those of one `h x w` image, as every family's vision tower attends within a temporal patch.
"""

from configuration_puma import _is_sparse_layer


def text_layer_flops(text_config, index: int, length: int) -> float:
    """FLOPs of decoder layer `index` on one sequence of `length` tokens: q, k, v, o projections, QK^T and AV over
    the whole sequence, and the MLP (for a Qwen3-VL-MoE sparse layer: the router and its `num_experts_per_tok`
    experts)."""
    h = text_config.hidden_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, text_config.num_key_value_heads * head_dim
    attention = h * q + 2 * h * kv + q * h
    if getattr(text_config, "num_experts", 0) and _is_sparse_layer(text_config, index):
        mlp = h * text_config.num_experts + text_config.num_experts_per_tok * 3 * h * text_config.moe_intermediate_size
    else:
        mlp = 3 * h * text_config.intermediate_size  # gate, up, down
    return float(length * (2 * (attention + mlp) + 4 * length * q))


def text_flops_per_sequence(text_config, num_layers: int, length: int) -> float:
    """FLOPs of one sequence of `length` tokens through the first `num_layers` decoder layers."""
    return sum(text_layer_flops(text_config, index, length) for index in range(num_layers))


def vision_flops_per_image(vision_config, grid_h: int, grid_w: int, num_mergers: int | None = None) -> float:
    """FLOPs of the vision tower on one image of `grid_h x grid_w` patches: the patch embedding, `depth` blocks
    (attention over all the image's patches, so Qwen2.5-VL's windowed blocks are counted at their upper bound) and
    `num_mergers` patch mergers (default: the final one plus Qwen3-VL's DeepStack mergers)."""
    patches = grid_h * grid_w
    if getattr(vision_config, "embed_dim", None):  # Qwen2-VL: width embed_dim, a two-matrix MLP of mlp_ratio x width
        width, out = vision_config.embed_dim, vision_config.hidden_size
        mlp = 2 * width * int(width * vision_config.mlp_ratio)
    else:  # Qwen2.5-VL (gated MLP) and Qwen3-VL (two-matrix MLP)
        width, out = vision_config.hidden_size, vision_config.out_hidden_size
        mlp = (3 if vision_config.model_type.startswith("qwen2_5") else 2) * width * vision_config.intermediate_size
    patch_in = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size ** 2
    block = 2 * (4 * width * width + mlp) + 4 * patches * width  # qkv and proj, the MLP; QK^T and AV
    merge = vision_config.spatial_merge_size ** 2
    if num_mergers is None:
        num_mergers = 1 + len(getattr(vision_config, "deepstack_visual_indexes", None) or [])
    merger = 2 * ((merge * width) ** 2 + merge * width * out) * patches / merge
    return float(patches * (2 * patch_in * width + vision_config.depth * block) + num_mergers * merger)


def vision_flops_per_video(vision_config, grid_t: int, grid_h: int, grid_w: int,
                           num_mergers: int | None = None) -> float:
    """FLOPs of the vision tower on one video of `grid_t` temporal patches of `grid_h x grid_w` patches: `grid_t`
    times an image's (the towers attend within each temporal patch, over its `grid_h * grid_w` patches)."""
    return grid_t * vision_flops_per_image(vision_config, grid_h, grid_w, num_mergers)


def video_grid(config, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The patch grid `(t, h, w)` of a video file's `frames` sampled frames of `height x width` pixels under
    `config`'s recipe: the frame count made even (`video_max_frames` at most), each frame resized into
    `video_min_pixels` .. `min(video_max_pixels, 2 * video_total_pixels / frames)` (qwen-vl-utils' rule). (The frames
    of a frame list are resized once before, which can move the final size by a patch.)"""
    from modeling_puma import FRAME_FACTOR, qwen_vl_smart_resize

    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    frames = min(frames + frames % FRAME_FACTOR, config.video_max_frames - config.video_max_frames % FRAME_FACTOR)
    max_pixels = max(min(config.video_max_pixels, config.video_total_pixels / frames * FRAME_FACTOR),
                     int(config.video_min_pixels * 1.05))
    h, w = qwen_vl_smart_resize(height, width, factor, config.video_min_pixels, max_pixels)
    return frames // vision.temporal_patch_size, h // vision.patch_size, w // vision.patch_size


def video_tokens(config, frames: int, height: int, width: int) -> int:
    """Placeholder tokens of a video of `frames` sampled frames of `height x width` pixels under `config`'s recipe."""
    t, h, w = video_grid(config, frames, height, width)
    return t * h * w // config.vision_config.spatial_merge_size ** 2


def reduced_visual_tokens(grid_t: int, grid_h: int, grid_w: int, merge: int, visual_pool: int = 1) -> int:
    """Decoder tokens of a visual of patch grid `(grid_t, grid_h, grid_w)` pooled `visual_pool` x `visual_pool` per
    frame after the `merge` x `merge` merger, with ceil at odd edges (as `PumaForEmbedding` pools)."""
    rows, cols = grid_h // merge, grid_w // merge
    return grid_t * -(-rows // visual_pool) * -(-cols // visual_pool)


def image_flops(config, depth: int, pixels: int, text_tokens: int, visual_pool: int = 1) -> float:
    """Forward FLOPs of one image of about `pixels` pixels (a square, `image_grid`) plus `text_tokens` text tokens
    through the vision tower and the first `depth` decoder layers, its visual tokens reduced by `visual_pool`."""
    vision_config = config.vision_config
    grid_h, grid_w = image_grid(config, pixels)
    injected = len(getattr(vision_config, "deepstack_visual_indexes", None) or [])
    tokens = reduced_visual_tokens(1, grid_h, grid_w, vision_config.spatial_merge_size, visual_pool)
    vision = vision_flops_per_image(vision_config, grid_h, grid_w, num_mergers=1 + min(injected, depth))
    return vision + text_flops_per_sequence(config.text_config, depth, text_tokens + tokens)


def image_grid(config, pixels: int) -> tuple[int, int]:
    """The patch grid `(h, w)` of a square image of about `pixels` pixels, each side a multiple of the merged patch."""
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    side = max(1, round((pixels ** 0.5) / unit)) * unit
    return side // vision.patch_size, side // vision.patch_size


def depth_costs(config, depths: list[int], text_tokens: int, image_pixels: int | None = None,
                video: tuple[int, int, int] | None = None, visual_pool: int = 1) -> dict[int, dict]:
    """`{depth: {"text": r, "image": r[, "video": r]}}`: the FLOPs of a PUMA model truncated to each depth, as a
    fraction of the deepest depth listed, for a text input of `text_tokens` tokens, for an image of `image_pixels`
    pixels (default: the config's `max_pixels`) plus those text tokens and, given `video` = `(frames, height,
    width)`, for such a video (sampled as `video_grid` says) plus those text tokens. The vision tower runs whatever
    the depth, so the image and video ratios are the larger ones. `visual_pool` reduces the visual tokens (the ratios
    stay relative to the deepest depth at that same reduction)."""
    grid_h, grid_w = image_grid(config, image_pixels or config.max_pixels)
    vision_config = config.vision_config
    image_tokens = reduced_visual_tokens(1, grid_h, grid_w, vision_config.spatial_merge_size, visual_pool)
    injected = len(getattr(vision_config, "deepstack_visual_indexes", None) or [])
    video_thw = video_grid(config, *video) if video is not None else None

    def flops(depth: int) -> dict[str, float]:
        # Qwen3-VL injects DeepStack features after decoder layers 0..injected-1: a shallower depth skips the rest
        mergers = 1 + min(injected, depth)
        vision = vision_flops_per_image(vision_config, grid_h, grid_w, num_mergers=mergers)
        costs = {"text": text_flops_per_sequence(config.text_config, depth, text_tokens),
                 "image": vision + text_flops_per_sequence(config.text_config, depth, text_tokens + image_tokens)}
        if video_thw is not None:
            t, h, w = video_thw
            costs["video"] = vision_flops_per_video(vision_config, t, h, w, num_mergers=mergers) \
                + text_flops_per_sequence(config.text_config, depth, text_tokens + reduced_visual_tokens(
                    t, h, w, vision_config.spatial_merge_size, visual_pool))
        return costs

    deepest = flops(max(depths))
    return {depth: {kind: value / deepest[kind] for kind, value in flops(depth).items()} for depth in depths}

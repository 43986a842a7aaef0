"""Encoding benchmark of `PumaForEmbedding.encode` on a random checkpoint with the shapes of a family's Hub model
(`--family`: Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-2B, Qwen3-VL-8B; see `common.CHECKPOINTS`; the `*_tiny` ones run the
code path in seconds).

(a) Text throughput with k kept layers vs the full depth, against the FLOP-ideal speed-up (embedding, kept decoder
    layers and final norm at the workload's token lengths); goal: measured / ideal >= 0.9.
(b) Length-bucketed batching (`encode` on the whole set) vs naive padded batching (`encode` on consecutive chunks of
    `batch_size` items, each one padded batch) on a mixed-length set, with k layers; goal: speed-up >= 1.3.
(c) Image throughput (PIL images of three sizes) at two `config.max_pixels` caps, with k layers, against the
    FLOP ratio of the vision tower plus the language model (Qwen2-VL only: the FLOP count is its vision tower's).
With `--video` (instead of (a)-(c); PyAV writes the clips):
(d) Video throughput with k kept layers vs the full depth (random-noise clips written as MP4, decoded and sampled as
    the recipe says), against the FLOP-ideal speed-up (the vision tower runs at every depth, so it is far below the
    text one).
(e) The cost of frames and pixels with k layers: the same clips sampled to other frame counts and frame sizes
    (`video_max_frames`, `video_min_pixels`/`video_max_pixels`): video tokens, GFLOP per video and throughput,
    against the FLOP ratio.
With `--reduction K [K ...]` (instead of (a)-(c)):
(f) Visual-token reduction: image throughput with k layers at reduction factor 1 and each K (`visual_pool`, the
    merged tokens pooled K x K), in the same run, against the FLOP-ideal speed-up (the vision tower runs whatever the
    factor, so the ideal is bounded by its share).
Both models are held at once so that the timed passes can alternate between the settings compared (other processes
on a shared machine then slow both alike); each setting is warmed up. Throughputs are the best of `--repeats` passes;
speed-ups are the median (min-max) of the passes' ratios (each pass against the other setting's pass of the same
round), in wall time (goals) and in process CPU time (all threads; far less inflated by other processes).

    python bench/bench_encode.py                           # Qwen2-VL-2B shape, float32 on CPU, k=12 vs 28
    python bench/bench_encode.py --family qwen3_vl_2b      # Qwen3-VL-2B / Qwen3-VL-Embedding-2B shape
    python bench/bench_encode.py --family qwen2_5_vl_3b --share-weights   # one float32 copy of the weights
    python bench/bench_encode.py --quick                   # smoke run with tiny workloads
    python bench/bench_encode.py --family qwen2_vl_tiny --quick     # the code path in seconds (tiny random model)
    python bench/bench_encode.py --markdown docs/benchmarks/encode.md   # also write the stamped tables there
    python bench/bench_encode.py --device cuda --dtype bfloat16
    python bench/bench_encode.py --family qwen3_vl_2b --video --markdown docs/benchmarks/encode_video.md
    python bench/bench_encode.py --reduction 2 4 --markdown docs/benchmarks/encode_reduction.md
"""

import argparse
import copy
import gc
import itertools
import json
import os
import random
import statistics
import time

import numpy as np
import torch
from PIL import Image

from common import (ALL_CHECKPOINTS, DEFAULT_DATA, Report, add_markdown_argument, check, ensure_checkpoint,
                    load_note, log, ratios, spread, time_interleaved)
from cost_puma import reduced_visual_tokens, text_flops_per_sequence, vision_flops_per_image, vision_flops_per_video
from modeling_puma import PumaForEmbedding, featurize, parse_input, smart_resize


WORDS = ("the a photo of dog cat man woman red blue green small large two three running sitting on in at with near "
         "beach park street table mat guitar picture image sentence question answer find retrieve shows playing "
         "walking over under quick brown fox lazy jumps everyday caption passage").split()
IMAGE_SIZES = [(160, 120), (224, 224), (392, 392)]  # (width, height)


def make_text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def token_lengths(model, texts: list[str]) -> list[int]:
    """Prompt lengths in tokens, as `encode` builds them."""
    tokenizer = model.processor.tokenizer
    return [len(tokenizer(model.build_prompt(text, False))["input_ids"]) for text in texts]


def load(args, num_layers: int):
    start = time.perf_counter()
    model = PumaForEmbedding.from_pretrained(args.checkpoint, num_layers=num_layers, device_map=args.device,
                                             dtype=getattr(torch, args.dtype))
    log(f"loaded k={num_layers} ({args.dtype}, {args.device}) in {time.perf_counter() - start:.1f}s")
    return model


def load_sharing(args, full):
    """The pruned model on the full model's own tensors, for shapes whose two copies do not fit memory (two float32
    Qwen2.5-VL-3B models need 24 GiB): a copy of the full model's modules that holds its tensors rather than copies
    of them, its decoder cut to the first k layers, as `from_pretrained(path, num_layers=k)` loads it."""
    memo = {id(tensor): tensor for tensor in itertools.chain(full.parameters(), full.buffers())}
    model = copy.deepcopy(full, memo)
    decoder = model.model.language_model
    decoder.layers = decoder.layers[:args.layers]
    model.config.text_config.num_hidden_layers = args.layers
    model.config.kept_layers = list(full.config.kept_layers)[:args.layers]
    layer_types = getattr(model.config.text_config, "layer_types", None)
    if layer_types is not None:
        model.config.text_config.layer_types = list(layer_types)[:args.layers]
    log(f"k={args.layers} shares the full model's tensors")
    return model


def load_pair(args, depth: int) -> dict:
    """{k: the pruned model, depth: the full model}, the pruned one on the full one's tensors with --share-weights."""
    if not args.share_weights:
        return {k: load(args, k) for k in (args.layers, depth)}
    full = load(args, depth)
    return {args.layers: load_sharing(args, full), depth: full}


def padded_tokens(lengths: list[int], batch_size: int) -> int:
    chunks = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    return sum(len(chunk) * max(chunk) for chunk in chunks)


def make_images(sizes) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def image_flops(model, images, max_pixels: int, batch_size: int) -> tuple[float, int]:
    """Forward FLOPs (vision tower + language model, prompts padded per batch) and image tokens of encoding `images`
    under `max_pixels`."""
    config = model.config
    prompt_tokens = len(model.processor.tokenizer(model.build_prompt(None, True))["input_ids"]) - 1
    flops, tokens = 0.0, []
    for image in images:
        h, w = smart_resize(image.height, image.width, factor=28, min_pixels=config.min_pixels, max_pixels=max_pixels)
        tokens.append(h * w // (28 * 28))
        flops += vision_flops_per_image(config.vision_config, h // 14, w // 14)
    tokens.sort(reverse=True)  # encode's length buckets
    for i in range(0, len(tokens), batch_size):
        chunk = tokens[i:i + batch_size]
        flops += len(chunk) * text_flops_per_sequence(config.text_config, config.text_config.num_hidden_layers,
                                                      prompt_tokens + chunk[0])
    return flops, sum(tokens)


def text_tables(report, args, texts, lengths, mixed, mixed_lengths, t_text, t_bucket, cpu, pruned, depth, bs):
    """Tables (a) and (b)."""
    text_config = pruned.config.text_config
    best, best_cpu = ({key: min(v) for key, v in t.items()} for t in ({**t_text, **t_bucket}, cpu))
    flops = {k: sum(text_flops_per_sequence(text_config, k, n) for n in lengths) for k in t_text}
    ideal = flops[depth] / flops[args.layers]
    # speed-ups: each round's full-depth (naive) pass against the pruned (bucketed) pass of the same round
    measured, measured_cpu = ratios(t_text[depth], t_text[args.layers]), ratios(cpu[depth], cpu[args.layers])
    setup = (f"{args.dtype} on {args.device}; throughput: best of {args.repeats} interleaved passes, speed-ups: median "
             f"(min-max) of the passes' ratios")
    rows = [[f"k={k}", len(texts) / best[k], flops[k] / best[k] / 1e9, best_cpu[k], ""] for k in (depth, args.layers)]
    rows.append([f"speed-up k={args.layers} vs {depth}", spread(measured), f"FLOP-ideal {ideal:.3f}",
                 spread(measured_cpu), f"measured/ideal {check(statistics.median(measured) / ideal, 0.9, False)}; "
                 f"by CPU time {statistics.median(measured_cpu) / ideal:.3f}"])
    report.table(f"(a) Text throughput: {len(texts)} texts of {min(lengths)}-{max(lengths)} tokens (mean "
                 f"{sum(lengths) / len(lengths):.0f}), batch {args.batch_size}, {setup}",
                 ["layers", "texts/s", "GFLOP/s", "CPU s", "goal"], rows)

    naive_tokens, bucket_tokens = padded_tokens(mixed_lengths, bs), padded_tokens(sorted(mixed_lengths), bs)
    speedup, speedup_cpu = ratios(t_bucket["naive"], t_bucket["bucketed"]), ratios(cpu["naive"], cpu["bucketed"])
    report.table(f"(b) Length-bucketed vs naive padded batching: k={args.layers}, {len(mixed)} texts of "
                 f"{min(mixed_lengths)}-{max(mixed_lengths)} tokens (one long per chunk), batch {bs}, {setup}",
                 ["batching", "texts/s", "padded tokens", "CPU s", "goal"], [
                     ["naive (given order)", len(mixed) / best["naive"], naive_tokens, best_cpu["naive"], ""],
                     ["length-bucketed (encode)", len(mixed) / best["bucketed"], bucket_tokens, best_cpu["bucketed"],
                      ""],
                     ["speed-up", spread(speedup), f"ratio {naive_tokens / bucket_tokens:.3f}", spread(speedup_cpu),
                      f"{check(statistics.median(speedup), 1.3, at_most=False)}; by CPU time "
                      f"{statistics.median(speedup_cpu):.3f}"]])


def image_table(report, args, images, sizes, caps, t_image, cpu, f_image) -> None:
    """Table (c)."""
    best, best_cpu = {key: min(v) for key, v in t_image.items()}, {key: min(cpu[key]) for key in caps}
    low, high = caps
    flop_ratio = f_image[high][0] / f_image[low][0]
    measured, measured_cpu = ratios(t_image[high], t_image[low]), ratios(cpu[high], cpu[low])
    rows = [[f"{cap // 784}*28*28", f_image[cap][1], len(images) / best[cap], f_image[cap][0] / len(images) / 1e9,
             f_image[cap][0] / best[cap] / 1e9, best_cpu[cap], ""] for cap in caps]
    rows.append([f"ratio {low // 784} vs {high // 784}", f_image[low][1] / f_image[high][1], spread(measured),
                 f"FLOP-ideal {flop_ratio:.3f}", "", spread(measured_cpu),
                 f"measured/ideal {statistics.median(measured) / flop_ratio:.3f}; "
                 f"by CPU time {statistics.median(measured_cpu) / flop_ratio:.3f}"])
    report.table(f"(c) Images: k={args.layers}, {len(images)} random-pixel images (w, h) {sizes}, batch "
                 f"{args.batch_size}, {args.dtype} on {args.device}; throughput: best of {args.repeats} interleaved "
                 f"passes, ratios: median (min-max) of the passes' ratios",
                 ["max_pixels", "image tokens (all images)", "images/s", "GFLOP/image", "GFLOP/s", "CPU s", "note"],
                 rows)


# ---------------------------------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------------------------------
def write_clips(folder: str, count: int, frames: int, size: tuple[int, int]) -> list[str]:
    """`count` MP4 clips (H.264, 4:2:0) of `frames` random-noise frames of `size` (w, h) at 10 fps."""
    import av

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(count):
        path = os.path.join(folder, f"clip{index}-{frames}x{size[0]}x{size[1]}.mp4")
        with av.open(path, "w") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
            for _ in range(frames):
                frame = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(path)
    return paths


def video_setting(frames: int, side: int) -> dict:
    """Recipe fields that sample `frames` frames of every clip (all its frames up to that many) at about `side`^2
    pixels each."""
    return {"video_fps": 1000.0, "video_min_frames": 2, "video_max_frames": frames, "video_min_pixels": side * side,
            "video_max_pixels": side * side, "video_total_pixels": frames * side * side}


def video_flops(model, clips: list[str], batch_size: int) -> tuple[float, int]:
    """Forward FLOPs (vision tower + language model, prompts padded per batch) and video tokens of encoding `clips`
    with `model`'s recipe."""
    config = model.config
    merge = config.vision_config.spatial_merge_size ** 2
    flops, lengths, tokens = 0.0, [], 0
    for clip in clips:
        _, video = parse_input(clip, 0, config=config)
        features = featurize(model.processor, config, [model.build_prompt(None, video)], [video])
        t, h, w = features["video_grid_thw"][0].tolist()
        flops += vision_flops_per_video(config.vision_config, t, h, w,
                                        num_mergers=1 + min(model.num_layers, len(
                                            getattr(config.vision_config, "deepstack_visual_indexes", None) or [])))
        lengths.append(features["input_ids"].shape[1])
        tokens += t * h * w // merge
    lengths.sort(reverse=True)
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i:i + batch_size]
        flops += len(chunk) * text_flops_per_sequence(config.text_config, config.text_config.num_hidden_layers,
                                                      chunk[0])
    return flops, tokens


def video_tables(report, args, depth: int) -> None:
    """Tables (d) and (e)."""
    frames, side = (4, 56) if args.quick else (args.video_frames, args.video_side)
    clips = write_clips(os.path.join(args.data, "clips"), 2 if args.quick else args.num_videos, 2 * frames,
                        (160, 120))
    setup = (f"{args.dtype} on {args.device}; throughput: best of {args.repeats} interleaved passes, speed-ups: median "
             "(min-max) of the passes' ratios")
    models = load_pair(args, depth)
    for model in models.values():
        for name, value in video_setting(frames, side).items():
            setattr(model.config, name, value)
        model.encode(clips[:1], batch_size=args.batch_size)  # warm-up
    log(f"(d) videos, k={args.layers} vs {depth}: {len(clips)} clips, {frames} frames of about {side}x{side}")
    cpu = {}
    times = time_interleaved({k: lambda m=m: m.encode(clips, batch_size=args.batch_size)
                              for k, m in models.items()}, args.repeats, cpu)
    flops = {k: video_flops(m, clips, args.batch_size) for k, m in models.items()}
    ideal = flops[depth][0] / flops[args.layers][0]
    measured, measured_cpu = ratios(times[depth], times[args.layers]), ratios(cpu[depth], cpu[args.layers])
    rows = [[f"k={k}", flops[k][1] // len(clips), len(clips) / min(times[k]), flops[k][0] / len(clips) / 1e9,
             min(cpu[k]), ""] for k in (depth, args.layers)]
    rows.append([f"speed-up k={args.layers} vs {depth}", "", spread(measured), f"FLOP-ideal {ideal:.3f}",
                 spread(measured_cpu), f"measured/ideal {statistics.median(measured) / ideal:.3f}; by CPU time "
                                       f"{statistics.median(measured_cpu) / ideal:.3f}"])
    report.table(f"(d) Videos: {len(clips)} random-noise clips of {2 * frames} frames (160x120, H.264), sampled to "
                 f"{frames} frames of about {side}x{side} pixels, batch {args.batch_size}, {setup}",
                 ["layers", "video tokens per clip", "videos/s", "GFLOP/video", "CPU s", "note"], rows)
    del models[depth]
    gc.collect()

    pruned = models[args.layers]
    settings = [(2, side), (frames, side), (2 * frames, side), (frames, 2 * side)] if not args.quick else         [(2, side), (frames, side)]
    many = write_clips(os.path.join(args.data, "clips"), len(clips), max(f for f, _ in settings), (160, 120))

    def encode_at(setting):
        for name, value in video_setting(*setting).items():
            setattr(pruned.config, name, value)
        pruned.encode(many, batch_size=args.batch_size)

    log(f"(e) frames and pixels at k={args.layers}: {settings}")
    cpu = {}
    times = time_interleaved({setting: lambda setting=setting: encode_at(setting) for setting in settings},
                             args.repeats, cpu)
    costs = {}
    for setting in settings:
        for name, value in video_setting(*setting).items():
            setattr(pruned.config, name, value)
        costs[setting] = video_flops(pruned, many, args.batch_size)
    base = settings[0]
    rows = [[setting[0], f"{setting[1]}x{setting[1]}", costs[setting][1] // len(many), costs[setting][0] / len(many)
             / 1e9, len(many) / min(times[setting]), spread(ratios(times[setting], times[base])),
             f"{costs[setting][0] / costs[base][0]:.3f}", spread(ratios(cpu[setting], cpu[base]))]
            for setting in settings]
    report.table(f"(e) Frames and pixels: k={args.layers}, {len(many)} clips, each sampled to the frames and frame "
                 f"size given, {setup}; ratios against the first row",
                 ["frames", "pixels per frame", "video tokens per clip", "GFLOP/video", "videos/s", "time ratio",
                  "FLOP ratio", "CPU time ratio"], rows)


# ---------------------------------------------------------------------------------------------------------------
# Visual-token reduction
# ---------------------------------------------------------------------------------------------------------------
def reduction_flops(model, images, factor: int, batch_size: int) -> tuple[float, float, int]:
    """Forward FLOPs (all, and the decoder's alone; prompts padded per batch) and visual tokens of encoding `images`
    with the visual tokens pooled `factor` x `factor`."""
    config = model.config
    merge = config.vision_config.spatial_merge_size
    injected = len(getattr(config.vision_config, "deepstack_visual_indexes", None) or [])
    vision, lengths, tokens = 0.0, [], 0
    for image in images:
        features = featurize(model.processor, config, [model.build_prompt(None, image)], [image])
        t, h, w = features["image_grid_thw"][0].tolist()
        vision += vision_flops_per_image(config.vision_config, h, w, num_mergers=1 + min(model.num_layers, injected))
        kept = reduced_visual_tokens(t, h, w, merge, factor)
        lengths.append(features["input_ids"].shape[1] - t * (h // merge) * (w // merge) + kept)
        tokens += kept
    lengths.sort(reverse=True)
    decoder = sum(len(lengths[i:i + batch_size]) * text_flops_per_sequence(config.text_config, model.num_layers,
                                                                           lengths[i])
                  for i in range(0, len(lengths), batch_size))
    return vision + decoder, decoder, tokens


def reduction_table(report, args) -> None:
    """Table (f)."""
    factors = [1] + sorted(set(args.reduction) - {1})
    sizes = IMAGE_SIZES[:1] if args.quick else [tuple(size) for size in args.reduction_sizes]
    images = make_images(sizes)
    model = load(args, args.layers)
    model.config.max_pixels = args.reduction_max_pixels
    for factor in factors:
        model.encode(images[:1], batch_size=args.batch_size, visual_pool=factor)  # warm-up
    log(f"(f) reduction factors {factors}: {len(images)} images {sizes}, max_pixels {args.reduction_max_pixels}")
    cpu = {}
    times = time_interleaved({factor: lambda factor=factor: model.encode(images, batch_size=args.batch_size,
                                                                         visual_pool=factor)
                              for factor in factors}, args.repeats, cpu)
    costs = {factor: reduction_flops(model, images, factor, args.batch_size) for factor in factors}
    rows = []
    for factor in factors:
        ideal = costs[1][0] / costs[factor][0]
        measured, measured_cpu = ratios(times[1], times[factor]), ratios(cpu[1], cpu[factor])
        rows.append([factor, costs[factor][2] // len(images), len(images) / min(times[factor]),
                     costs[factor][0] / len(images) / 1e9, costs[factor][1] / len(images) / 1e9, min(cpu[factor]),
                     spread(measured), f"{ideal:.3f}", f"{statistics.median(measured) / ideal:.3f}",
                     spread(measured_cpu), f"{statistics.median(measured_cpu) / ideal:.3f}"])
    report.table(f"(f) Visual-token reduction: k={args.layers}, {len(images)} random-pixel images (w, h) {sizes} at "
                 f"max_pixels {args.reduction_max_pixels}, batch {args.batch_size}, {args.dtype} on {args.device}; "
                 f"throughput: best of {args.repeats} interleaved passes, speed-ups against factor 1: median "
                 "(min-max) of the passes' ratios",
                 ["visual_pool", "visual tokens per image", "images/s", "GFLOP/image", "decoder GFLOP/image", "CPU s",
                  "speed-up", "FLOP-ideal", "measured/ideal", "speed-up by CPU time", "CPU/ideal"], rows)


def main(args) -> None:
    report = Report(args.markdown, f"Encoding benchmark ({args.family})")
    rng = random.Random(0)
    args.checkpoint = args.checkpoint or ensure_checkpoint(args.family, args.data)
    args.layers = args.layers or ALL_CHECKPOINTS[args.family][3]
    with_images = ALL_CHECKPOINTS[args.family][0] == "qwen2_vl"
    with open(os.path.join(args.checkpoint, "config.json")) as f:
        config = json.load(f)
    depth = (config.get("text_config") or config)["num_hidden_layers"]
    if args.reduction:
        reduction_table(report, args)
        report.note(load_note(torch.get_num_threads()))
        report.write()
        return
    if args.video:
        video_tables(report, args, depth)
        report.note(load_note(torch.get_num_threads()))
        report.write()
        return
    n_text, n_chunks, sizes = (4, 2, IMAGE_SIZES[::2]) if args.quick else (args.num_texts, 4, IMAGE_SIZES)
    texts = [make_text(rng, rng.randint(1, 16)) for _ in range(n_text)]
    # Mixed set: each chunk of the given order holds one 40-word passage among 1-6 word queries.
    bs = args.bucket_batch_size
    mixed = [make_text(rng, 40 if i == j else rng.randint(1, 6)) for _ in range(n_chunks)
             for j in [rng.randrange(bs)] for i in range(bs)]
    images = make_images(sizes)
    caps = [64 * 28 * 28, 256 * 28 * 28]

    models = load_pair(args, depth)
    pruned = models[args.layers]
    lengths, mixed_lengths = token_lengths(pruned, texts), token_lengths(pruned, mixed)
    log(f"(a) text throughput, {len(texts)} texts of {min(lengths)}-{max(lengths)} tokens, batch {args.batch_size}")
    for model in models.values():
        model.encode(texts[:2], batch_size=args.batch_size)  # warm-up
    cpu = {}  # process CPU seconds per setting: less inflated than wall time when other processes share the cores
    t_text = time_interleaved({k: lambda m=m: m.encode(texts, batch_size=args.batch_size)
                               for k, m in models.items()}, args.repeats, cpu)
    del models, model
    gc.collect()

    log(f"(b) bucketing, {len(mixed)} mixed texts of {min(mixed_lengths)}-{max(mixed_lengths)} tokens, batch {bs}")
    t_bucket = time_interleaved({
        "naive": lambda: [pruned.encode(mixed[i:i + bs], batch_size=bs) for i in range(0, len(mixed), bs)],
        "bucketed": lambda: pruned.encode(mixed, batch_size=bs)}, args.repeats, cpu)
    text_tables(report, args, texts, lengths, mixed, mixed_lengths, t_text, t_bucket, cpu, pruned, depth, bs)

    if with_images:
        log(f"(c) images {sizes}")
        pruned.encode(images[:1], batch_size=args.batch_size)  # warm-up

        def encode_images(cap):
            pruned.config.max_pixels = cap
            pruned.encode(images, batch_size=args.batch_size)

        t_image = time_interleaved({cap: lambda cap=cap: encode_images(cap) for cap in caps}, args.repeats, cpu)
        f_image = {cap: image_flops(pruned, images, cap, args.batch_size) for cap in caps}
        image_table(report, args, images, sizes, caps, t_image, cpu, f_image)
    report.note(load_note(torch.get_num_threads()))
    report.write()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl_2b", choices=list(ALL_CHECKPOINTS),
                        help="random checkpoint of this shape (generated under --data if missing; the *_tiny ones "
                             "run the code path in seconds)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder of the generated random checkpoints")
    parser.add_argument("--checkpoint", default=None, help="use this checkpoint folder instead")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--layers", type=int, default=None, help="kept decoder layers (default: the family's)")
    parser.add_argument("--share-weights", action="store_true",
                        help="the pruned model uses the full model's tensors (when two copies do not fit memory)")
    parser.add_argument("--num-texts", type=int, default=12, help="texts in workload (a)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of (a) and (c)")
    parser.add_argument("--bucket-batch-size", type=int, default=4, help="batch size of (b)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per setting (best reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny workloads, one pass")
    parser.add_argument("--video", action="store_true", help="the video tables (d) and (e) instead of (a)-(c)")
    parser.add_argument("--num-videos", type=int, default=2, help="clips in workloads (d) and (e)")
    parser.add_argument("--video-frames", type=int, default=4, help="frames sampled per clip in (d)")
    parser.add_argument("--video-side", type=int, default=112, help="side of the sampled frames in (d), pixels")
    parser.add_argument("--reduction", type=int, nargs="+", metavar="K",
                        help="table (f) instead of (a)-(c): visual-token reduction factors timed against factor 1")
    parser.add_argument("--reduction-sizes", type=int, nargs=2, action="append", metavar=("W", "H"),
                        default=None, help="image sizes of (f), repeatable (default: 448x448 and 392x294)")
    parser.add_argument("--reduction-max-pixels", type=int, default=256 * 28 * 28, help="max_pixels of (f)")
    add_markdown_argument(parser)
    return parser


if __name__ == "__main__":
    arguments = make_parser().parse_args()
    arguments.repeats = 1 if arguments.quick else arguments.repeats
    arguments.reduction_sizes = arguments.reduction_sizes or [(448, 448), (392, 294)]
    main(arguments)

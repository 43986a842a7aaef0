# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Layer analysis: which depth to keep, with evidence, before any training.

One full-depth forward pass over a sample of the user's data collects, for every decoder layer l of the model:

- the block influence (ShortGPT, arXiv 2403.03853): BI_l = 1 - E[cos(x_l, y_l)] over every non-padding token, where
  x_l enters layer l and y_l leaves it (before anything is added after it, such as Qwen3-VL's DeepStack features).
  A layer whose output equals its input has BI 0: the least important;
- the angular distance (Gromov et al., arXiv 2403.17887) between the residual streams after l and after l + n layers
  at the pooled position, d = arccos(cos) / pi, averaged over the inputs; for each n, the block of n layers whose
  removal changes the stream least;
- the zero-training retrieval quality of the model truncated after each depth d (the final norm applied at d, the
  recipe's pooling, all from the same pass through `PumaForEmbedding.forward(output_depths=...)`): each task's
  metric, scored by `mbeir.score_task` exactly as the evaluation scores a model;
- the cost of each depth: the FLOP ratio of the truncated model (`cost_puma.depth_costs`) on the sample's typical
  text and image inputs.

It then recommends a depth for a budget (`max_layers`, or `max_cost` as a FLOP ratio): the depth with the best mean
quality within the budget, the smallest depth within `tolerance` points of it, and, for comparison, the ShortGPT set
of that many layers with the highest block influence.

    from puma_eval.analysis import analyze, mbeir_sample, write_analysis

    tasks = mbeir_sample("M-BEIR", ["webqa_task1", "mscoco_task0"], max_queries=200, max_candidates=2000)
    result = analyze(model, tasks, image_root="M-BEIR", max_cost=0.5)
    write_analysis(result, "analysis_out")            # analysis.json, analysis.md, analysis.png
"""

import dataclasses
import json
import logging
import math
import os
import statistics
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cost_puma import depth_costs
from mbeir_puma import content_modality, join_path, markdown_table

from .mbeir import score_task
from .tasks import RetrievalTask, TaskData, load_benchmark, load_instructions, load_task, select_tasks


logger = logging.getLogger(__name__)

DISTANCE_SPANS = (1, 2, 4, 8)


# ----------------------------------------------------------------------------------------------------------------
# Samples of the user's data, as tasks
# ----------------------------------------------------------------------------------------------------------------
def mbeir_sample(benchmark_root, tasks: list[str] | None = None, max_queries: int = 200,
                 max_candidates: int = 2000, seed: int = 0) -> list[TaskData]:
    """Each task's test queries (at most `max_queries`, drawn with `seed`) against a sample of its local pool: every
    candidate relevant to a drawn query plus random others, up to `max_candidates` in all. Scores on a sampled pool
    are higher than on the whole pool; they compare depths with one another."""
    benchmark = load_benchmark(benchmark_root)
    instructions = load_instructions(benchmark)
    rng = np.random.default_rng(seed)
    samples = []
    for task in select_tasks(benchmark, tasks):
        data = load_task(benchmark, task, "local", instructions, seed)
        chosen = sorted(rng.permutation(len(data.query_ids))[:max_queries].tolist())
        relevant = {did for i in chosen for did in data.relevant[i]}
        others = [i for i, did in enumerate(data.pool_ids) if did not in relevant]
        room = max(0, max_candidates - len(relevant))
        kept = sorted([i for i, did in enumerate(data.pool_ids) if did in relevant]
                      + rng.permutation(others)[:room].tolist())
        samples.append(dataclasses.replace(
            data, pool_ids=[data.pool_ids[i] for i in kept], pool_items=[data.pool_items[i] for i in kept],
            query_ids=[data.query_ids[i] for i in chosen], query_items=[data.query_items[i] for i in chosen],
            query_instructions=[data.query_instructions[i] for i in chosen],
            relevant=[data.relevant[i] for i in chosen], published={}))
    return samples


def pair_task(examples, name: str = "pairs", instruction: str | None = None, max_pairs: int | None = None,
              seed: int = 0) -> TaskData:
    """A retrieval task from a sequence of (query, positive) examples — `DatasetPairs` of a 🤗 dataset or
    `folder_pairs` of a folder: each query ranks every example's positive, its own being the relevant one. Only the
    `max_pairs` sampled examples are read."""
    indices = range(len(examples))
    if max_pairs is not None and len(examples) > max_pairs:
        rng = np.random.default_rng(seed)
        indices = sorted(rng.permutation(len(examples))[:max_pairs].tolist())
    examples = [examples[i] for i in indices]
    if not examples:
        raise ValueError(f"{name}: there are no examples to analyse.")
    modality = examples[0]["modality"]
    query_modality = _modality(examples[0]["query"])
    task = RetrievalTask(name, name, "", "", query_modality, modality, 5)
    pool_ids = [f"{name}:pos{i}" for i in range(len(examples))]
    return TaskData(task=task, pool="local", pool_name=f"{name}-pool", pool_ids=pool_ids,
                    pool_items=[dict(example["positive"]) for example in examples], query_name=f"{name}-queries",
                    query_ids=[f"{name}:q{i}" for i in range(len(examples))],
                    query_items=[dict(example["query"]) for example in examples],
                    query_instructions=[example.get("instruction") or instruction for example in examples],
                    relevant=[[pool_id] for pool_id in pool_ids], published={})


class DatasetPairs(Sequence):
    """The examples of a 🤗 dataset's rows under a `mbeir_puma.ColumnMapping`, read (and decoded) on access."""

    def __init__(self, dataset, mapping):
        mapping.check_columns(dataset.column_names)
        self.dataset, self.mapping = dataset, mapping

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.mapping.example(self.dataset[index], index)


def folder_pairs(folder) -> list[dict]:
    """Caption -> image (or video) examples from a folder of images and videos each with a same-named `.txt`
    caption beside it."""
    from PIL import Image

    from modeling_puma import VIDEO_SUFFIXES

    folder = os.fspath(folder)
    images = {suffix for suffix, _ in Image.registered_extensions().items()}
    media = sorted(name for name in os.listdir(folder) if os.path.splitext(name)[1].lower() in images
                   or name.lower().endswith(VIDEO_SUFFIXES))
    examples = []
    for name in media:
        caption = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        if os.path.isfile(caption):
            with open(caption, encoding="utf-8") as f:
                text = f.read().strip()
            if text:
                is_video = name.lower().endswith(VIDEO_SUFFIXES) and not name.lower().endswith(".gif")
                positive = {"text": None, "image": None, "video": name} if is_video else {"text": None, "image": name}
                examples.append({"query": {"text": text, "image": None}, "positive": positive,
                                 "modality": "video" if is_video else "image"})
    if not examples:
        raise ValueError(f"{folder} holds no image or video with a non-empty same-named .txt caption beside it.")
    return examples


def _modality(side: dict) -> str:
    return content_modality(side.get("text"), side.get("image"), side.get("video")) or "text"


# ----------------------------------------------------------------------------------------------------------------
# One pass: every depth's embedding and the layer statistics
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Statistics:
    """Running sums of the layer statistics over the sample."""

    num_layers: int
    spans: tuple[int, ...]
    influence_sum: torch.Tensor = None  # (layers,)
    tokens: int = 0
    distance_sum: dict = None  # span -> (layers - span + 1,)
    inputs: int = 0
    video_grids: list = dataclasses.field(default_factory=list)  # (t, h, w) of every video seen

    def __post_init__(self):
        self.influence_sum = torch.zeros(self.num_layers, dtype=torch.float64)
        self.distance_sum = {n: torch.zeros(self.num_layers - n + 1, dtype=torch.float64) for n in self.spans}


@torch.no_grad()
def _collect(model, items: list[dict], instructions: list[str | None], is_query: bool, image_root, batch_size: int,
             statistics: _Statistics, depths: list[int], desc: str) -> dict[int, torch.Tensor]:
    """Embeds `items` at every depth of `depths` in one forward pass per batch, adding the layer statistics of the
    batch to `statistics`; returns `{depth: (len(items), dim) L2-normalised float32}`."""
    from modeling_puma import build_prompt, featurize, parse_input

    from .encoding import encode_input

    config, tokenizer = model.config, model.processor.tokenizer
    layers, norm = model.model.language_model.layers, model.model.language_model.norm
    captured = {}

    def enter(index):
        def hook(module, args, kwargs):
            # setdefault: the final norm's first call is the model's own; `output_depths` then calls it again on the
            # shallower streams, which must not replace the stream after the last layer
            captured.setdefault(("in", index), args[0] if args else kwargs["hidden_states"])
        return hook

    def leave(index):
        def hook(module, args, kwargs, output):
            captured[("out", index)] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [layer.register_forward_pre_hook(enter(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(leave(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(norm.register_forward_pre_hook(enter(len(layers)), with_kwargs=True))
    out = {depth: torch.empty(len(items), config.text_config.hidden_size) for depth in depths}
    try:
        for start in tqdm(range(0, len(items), batch_size), desc=desc, leave=False):
            batch = range(start, min(start + batch_size, len(items)))
            examples = [parse_input(encode_input(items[i], image_root), i, config=config) for i in batch]
            prompts = [build_prompt(config, text, visual, instructions[i] if is_query else None, tokenizer)
                       for i, (text, visual) in zip(batch, examples)]
            features = featurize(model.processor, config, prompts, [visual for _, visual in examples],
                                 names=[f"{desc} item {i}" for i in batch])
            if "video_grid_thw" in features:  # the videos' grids, for the cost of a typical video
                statistics.video_grids += features["video_grid_thw"].tolist()
            features = model.features_on_device(features)
            captured.clear()
            result = model(**features, output_depths=depths)
            for depth in depths:
                out[depth][batch.start:batch.stop] = F.normalize(result.depth_embeddings[depth].float(), dim=-1).cpu()
            _accumulate(statistics, captured, features, model)
    finally:
        for handle in handles:
            handle.remove()
    return out


def _accumulate(statistics: _Statistics, captured: dict, features: dict, model) -> None:
    mask = features["attention_mask"].bool()
    for index in range(statistics.num_layers):
        cosine = F.cosine_similarity(captured[("in", index)].float(), captured[("out", index)].float(), dim=-1)
        statistics.influence_sum[index] += (1 - cosine)[mask].double().sum().cpu()
    statistics.tokens += int(mask.sum())
    # the residual stream after l layers, at the pooled position: what enters layer l (the final norm for the last)
    streams = [model.pool(captured[("in", index)].float(), features["input_ids"], features["attention_mask"])
               for index in range(statistics.num_layers + 1)]
    for span in statistics.spans:
        for start in range(statistics.num_layers - span + 1):
            cosine = F.cosine_similarity(streams[start], streams[start + span], dim=-1).clamp(-1, 1)
            statistics.distance_sum[span][start] += (torch.arccos(cosine) / math.pi).double().sum().cpu()
    statistics.inputs += int(mask.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Analysis and recommendation
# ----------------------------------------------------------------------------------------------------------------
def analyze(model, tasks: list[TaskData], image_root=None, *, depths: list[int] | None = None, batch_size: int = 8,
            max_layers: int | None = None, max_cost: float | None = None, tolerance: float = 1.0,
            spans: tuple[int, ...] = DISTANCE_SPANS, show_progress_bar: bool = True) -> dict:
    """Layer statistics, per-depth quality and cost of `model` (a full-depth, or any, PUMA model) on `tasks`, and a
    recommendation for the budget (`max_layers` or `max_cost`, a FLOP ratio of the full depth).

    Returns a JSON-serialisable dict: `layers` (per layer: `block_influence`, and `angular_distance` for each span n
    starting at that layer), `depths` (per depth: each task's score, `mean`, `cost_text`, `cost_image`, `cost`),
    `tasks`, `budget`, `recommendation`.
    """
    if max_layers is not None and max_cost is not None:
        raise ValueError("Give max_layers or max_cost, not both.")
    num_layers = model.num_layers
    if max_layers is not None and not 0 < max_layers <= num_layers:
        raise ValueError(f"max_layers={max_layers} is outside 1..{num_layers} (the model's layers).")
    if max_cost is not None and not 0 < max_cost <= 1:
        raise ValueError(f"max_cost={max_cost} must be a FLOP ratio in (0, 1].")
    if not tasks:
        raise ValueError("There are no tasks to analyse.")
    depths = sorted(set(depths or range(1, num_layers + 1)) | {num_layers})
    spans = tuple(n for n in spans if n < num_layers) or (1,)
    statistics = _Statistics(num_layers, spans)
    model.eval()

    rows, lengths, pixels, images, videos = [], [], [], 0, 0
    for data in tasks:
        queries = _collect(model, data.query_items, data.query_instructions, True, image_root, batch_size, statistics,
                           depths, f"{data.task.name} queries")
        pool = _collect(model, data.pool_items, [None] * len(data.pool_items), False, image_root, batch_size,
                        statistics, depths, f"{data.task.name} pool")
        row = {"task": data.task.name, "label": data.task.label, "metric": f"recall@{data.task.metric_k}",
               "num_queries": len(data.query_ids), "pool_size": len(data.pool_ids), "scores": {}}
        for depth in depths:
            result, _ = score_task(data, queries[depth], pool[depth])
            row["scores"][depth] = result["score"]
        rows.append(row)
        for item in data.query_items + data.pool_items:
            lengths.append(len(model.processor.tokenizer(item.get("text") or "")["input_ids"]))
            if item.get("video") is not None:
                videos += 1
            elif item.get("image") is not None:
                images += 1
                pixels.append(_image_pixels(item["image"] if not isinstance(item["image"], str)
                                            else join_path(image_root, item["image"]), model.config))
        logger.info(f"{data.task.name}: " + ", ".join(f"d{d} {row['scores'][d]:.1f}" for d in depths))

    text_tokens = int(statistics_median(lengths)) + 20  # plus the prompt's template tokens
    video = None
    if statistics.video_grids:  # the median video, as the frames and pixels its grid was resized to
        patch = model.config.vision_config.patch_size
        t, h, w = (int(statistics_median([grid[axis] for grid in statistics.video_grids])) for axis in range(3))
        video = (2 * t, h * patch, w * patch)
    costs = depth_costs(model.config, depths, text_tokens, int(statistics_median(pixels)) if pixels else None,
                        video=video)
    image_share, video_share = images / max(1, len(lengths)), videos / max(1, len(lengths))
    per_depth = []
    for depth in depths:
        scores = {row["task"]: row["scores"][depth] for row in rows}
        cost = (1 - image_share - video_share) * costs[depth]["text"] + image_share * costs[depth]["image"]
        per_depth.append({"depth": depth, "scores": scores, "mean": sum(scores.values()) / len(scores),
                          "cost_text": costs[depth]["text"], "cost_image": costs[depth]["image"],
                          **({"cost_video": costs[depth]["video"]} if video is not None else {}),
                          "cost": cost + (video_share * costs[depth]["video"] if video is not None else 0.0)})
    influence = (statistics.influence_sum / max(1, statistics.tokens)).tolist()
    layers = [{"layer": i, "original_layer": model.config.kept_layers[i], "block_influence": influence[i],
               "angular_distance": {n: float(statistics.distance_sum[n][i] / max(1, statistics.inputs))
                                    for n in spans if i < num_layers - n + 1}} for i in range(num_layers)]
    result = {"model": model.name_or_path, "num_layers": num_layers, "kept_layers": list(model.config.kept_layers),
              "tasks": [{key: row[key] for key in ("task", "label", "metric", "num_queries", "pool_size")}
                        for row in rows],
              "depths": per_depth, "layers": layers, "image_share": image_share, "video_share": video_share,
              "video_frames_pixels": video, "text_tokens": text_tokens,
              "budget": {"max_layers": max_layers, "max_cost": max_cost, "tolerance": tolerance}}
    result["removable_blocks"] = {n: min(range(num_layers - n + 1), key=lambda i: layers[i]["angular_distance"][n])
                                  for n in spans}
    result["recommendation"] = recommend(result, max_layers, max_cost, tolerance)
    return result


def statistics_median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _image_pixels(path, config) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return min(max(image.width * image.height, config.min_pixels), config.max_pixels)


def recommend(result: dict, max_layers: int | None = None, max_cost: float | None = None,
              tolerance: float = 1.0) -> dict:
    """The depth with the best mean score within the budget, the smallest depth within `tolerance` points of it, and
    the ShortGPT set (the layers of highest block influence, in order) of the recommended size."""
    within = [row for row in result["depths"]
              if (max_layers is None or row["depth"] <= max_layers) and (max_cost is None or row["cost"] <= max_cost)]
    if not within:
        cheapest = min(result["depths"], key=lambda row: row["cost"])
        raise ValueError(f"No depth fits the budget (max_layers={max_layers}, max_cost={max_cost}); the cheapest "
                         f"analysed depth, {cheapest['depth']}, costs {cheapest['cost']:.3f} of the full depth.")
    best = max(within, key=lambda row: (row["mean"], -row["depth"]))
    smallest = min((row for row in within if row["mean"] >= best["mean"] - tolerance), key=lambda row: row["depth"])
    influence = [layer["block_influence"] for layer in result["layers"]]
    by_influence = sorted(sorted(range(len(influence)), key=lambda i: -influence[i])[:smallest["depth"]])
    original = result["kept_layers"]
    return {"depth": smallest["depth"], "kept_layers": original[:smallest["depth"]], "mean": smallest["mean"],
            "cost": smallest["cost"], "best_depth": best["depth"], "best_mean": best["mean"],
            "block_influence_layers": [original[i] for i in by_influence],
            "least_important_layer": original[min(range(len(influence)), key=lambda i: influence[i])]}


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------
def _count(number, noun: str) -> str:
    """`1 layer`, `3 layers`, `0.5 points`: the number with its noun, plural unless it is 1."""
    return f"{number:g} {noun}" if number == 1 else f"{number:g} {noun}s"


def _first(depth: int) -> str:
    """`layer` for one layer, `3 layers` for more: what follows "keep the first" or "the"."""
    return "layer" if depth == 1 else f"{depth} layers"


def analysis_markdown(result: dict) -> str:
    """Tables of quality and cost per depth, statistics per layer, and the recommendation."""
    tasks = [task["task"] for task in result["tasks"]]
    with_video = "cost_video" in result["depths"][0]
    depth_rows = [[row["depth"], *[f"{row['scores'][task]:.1f}" for task in tasks], f"{row['mean']:.1f}",
                   f"{row['cost_text']:.3f}", f"{row['cost_image']:.3f}",
                   *([f"{row['cost_video']:.3f}"] if with_video else [])] for row in result["depths"]]
    lines = [f"### Quality and cost per depth ({result['model']}, zero training)\n",
             markdown_table(["depth", *tasks, "mean", "FLOP ratio (text)", "FLOP ratio (image)",
                             *(["FLOP ratio (video)"] if with_video else [])], depth_rows)]
    if with_video:
        frames, height, width = result["video_frames_pixels"]
        lines.append(f"\nThe video ratio is of the sample's median video: {frames} frames of {width}x{height} pixels "
                     "after sampling.")
    spans = sorted({n for layer in result["layers"] for n in layer["angular_distance"]})
    layer_rows = [[layer["layer"], layer["original_layer"], f"{layer['block_influence']:.4f}",
                   *[f"{layer['angular_distance'][n]:.4f}" if n in layer["angular_distance"] else None for n in spans]]
                  for layer in result["layers"]]
    lines += ["", "### Layer statistics\n",
              markdown_table(["layer", "base layer", "block influence",
                              *[f"angular distance, {_count(n, 'layer')}" for n in spans]], layer_rows)]
    recommendation, budget = result["recommendation"], result["budget"]
    budget_text = (f"at most {_count(budget['max_layers'], 'layer')}" if budget["max_layers"] is not None else
                   f"at most {budget['max_cost']:g} of the full depth's FLOPs" if budget["max_cost"] is not None
                   else "no budget")
    lines += ["", f"### Recommendation ({budget_text})\n",
              f"- keep the first {_first(recommendation['depth'])}: "
              f"`kept_layers={recommendation['kept_layers']}` "
              f"(mean {recommendation['mean']:.1f}, FLOP ratio {recommendation['cost']:.3f} at the sample's mix of "
              f"text, image and video inputs); the best depth within the budget is {recommendation['best_depth']} "
              f"(mean {recommendation['best_mean']:.1f}), and this is the smallest within {_count(budget['tolerance'], 'point')} of it",
              f"- the {_first(recommendation['depth'])} of highest block influence (ShortGPT): "
              f"`kept_layers={recommendation['block_influence_layers']}`",
              f"- least important layer by block influence: {recommendation['least_important_layer']}; most removable "
              "block of n layers by angular distance: " + ", ".join(
                  f"n={n}: layer {start}" if int(n) == 1 else f"n={n}: layers {start}..{start + int(n) - 1}"
                  for n, start in result["removable_blocks"].items())]
    return "\n".join(lines) + "\n"


def plot_analysis(result: dict, path) -> None:
    """Quality per task and mean vs depth with the FLOP ratio on a second axis; block influence per layer."""
    from .plots import import_pyplot

    plt = import_pyplot()
    depths = [row["depth"] for row in result["depths"]]
    figure, (quality, layers) = plt.subplots(1, 2, figsize=(12, 4.5))
    for task in result["tasks"]:
        quality.plot(depths, [row["scores"][task["task"]] for row in result["depths"]], marker=".", alpha=0.6,
                     label=task["label"])
    quality.plot(depths, [row["mean"] for row in result["depths"]], color="black", linewidth=2.5, label="mean")
    quality.axvline(result["recommendation"]["depth"], color="grey", linestyle=":", label="recommended")
    quality.set_xlabel("depth (layers kept)")
    quality.set_ylabel("score (%)")
    quality.set_title("quality when truncated (no further training) and cost vs depth")
    quality.set_xticks(depths)
    cost = quality.twinx()
    cost.plot(depths, [row["cost_text"] for row in result["depths"]], color="tab:red", linestyle="--",
              label="FLOP ratio, text")
    cost.plot(depths, [row["cost_image"] for row in result["depths"]], color="tab:purple", linestyle="--",
              label="FLOP ratio, image")
    if "cost_video" in result["depths"][0]:
        cost.plot(depths, [row["cost_video"] for row in result["depths"]], color="tab:green", linestyle="--",
                  label="FLOP ratio, video")
    cost.set_ylim(0, 1.05)
    cost.set_ylabel("FLOP ratio of the full depth")
    handles = quality.get_legend_handles_labels()[0] + cost.get_legend_handles_labels()[0]
    quality.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower right")
    layers.bar([layer["layer"] for layer in result["layers"]],
               [layer["block_influence"] for layer in result["layers"]], color="tab:blue")
    layers.set_xticks([layer["layer"] for layer in result["layers"]],
                      [str(layer["original_layer"]) for layer in result["layers"]])
    layers.set_xlabel("layer (numbered as in the base model)")
    layers.set_ylabel("block influence (1 - cos)")
    layers.set_title("block influence per layer")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_analysis(result: dict, out_dir) -> str:
    """Writes `analysis.json`, `analysis.md` and `analysis.png` into `out_dir`; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "analysis.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    markdown = analysis_markdown(result)
    with open(os.path.join(out_dir, "analysis.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    plot_analysis(result, os.path.join(out_dir, "analysis.png"))
    return markdown


__all__ = ["analysis_markdown", "analyze", "folder_pairs", "mbeir_sample", "pair_task", "plot_analysis", "recommend",
           "write_analysis"]

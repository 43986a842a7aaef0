# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""The budget planner: which depth, image resolution, visual-token reduction (and Matryoshka size) to run, with
evidence, for a FLOP, latency or memory budget.

`sweep` scores every setting of depth x `max_pixels` x `visual_pool` (x embedding size, for a model trained with
`matryoshka_dims`) on a sample of the user's data, without training: every depth comes from one forward pass
(`PumaForEmbedding.forward(output_depths=...)`) per resolution and reduction factor, as in the layer analysis. Each
setting gets

- `mean`: the mean of the tasks' scores (`mbeir.score_task`, as the evaluation scores a model);
- `gflops`: the mean forward FLOPs per input of the sample, counted from the inputs' own token counts and patch
  grids (`cost_puma`: the vision tower, plus the decoder layers on the reduced sequence);
- `latency_ms`: the measured median time of one forward pass of a fixed probe batch (the first `probe_size` items
  of the first task's pool, queries and candidates mixed as they come) through the vision tower and the first
  `depth` layers, in this process on its device;
- `memory_mb`: the weights a model of that depth holds (vision tower, token embeddings, the first `depth` layers,
  the final norm) in the model's dtype.

`frontier` is the Pareto set of the settings (no other setting is at most as costly and at least as good, and
strictly one of them); `recommend_setting` is the best-quality setting within every budget given.

    from puma_eval.budget import sweep, recommend_setting, write_budget

    result = sweep(model, tasks, image_root, depths=[2, 4, 8], max_pixels=[200704, 401408], visual_pools=[1, 2, 4])
    result["recommendation"] = recommend_setting(result["points"], budget_flops=5e9)
    write_budget(result, "budget_out")   # budget.json, budget.md, budget.png (the frontier, chosen point labelled)

A setting the model was not trained at (a reduction factor outside `config.trained_visual_pools`, a depth outside
`trained_depths`) is scored as it is: the quality of a zero-training truncation or pooling, which training at that
setting raises.
"""

import contextlib
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from cost_puma import text_flops_per_sequence, vision_flops_per_video
from mbeir_puma import markdown_table

from .mbeir import score_task


COST_AXES = {"gflops": "GFLOPs per input", "latency_ms": "latency per probe batch (ms)",
             "memory_mb": "weights (MB)"}


# ----------------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def resolution(model, max_pixels: int):
    """`model`'s images resized to at most `max_pixels` pixels (and at least `min(min_pixels, max_pixels)`)."""
    config = model.config
    saved = config.min_pixels, config.max_pixels
    config.min_pixels, config.max_pixels = min(config.min_pixels, max_pixels), max_pixels
    try:
        yield
    finally:
        config.min_pixels, config.max_pixels = saved


@contextlib.contextmanager
def first_layers(model, depth: int):
    """`model` running only its first `depth` decoder layers (then its final norm): the truncated model whose
    latency a setting of that depth measures. The layer list is restored on exit."""
    text = model.model.language_model
    layers = text.layers
    text.layers = nn.ModuleList(list(layers)[:depth])
    try:
        yield
    finally:
        text.layers = layers


def _features(model, items: list[dict], instructions: list, is_query: bool, image_root, start: int, stop: int):
    from modeling_puma import build_prompt, featurize, parse_input

    from .encoding import encode_input

    config = model.config
    examples = [parse_input(encode_input(items[i], image_root), i, config=config) for i in range(start, stop)]
    prompts = [build_prompt(config, text, visual, instructions[i] if is_query else None, model.processor.tokenizer)
               for i, (text, visual) in zip(range(start, stop), examples)]
    return featurize(model.processor, config, prompts, [visual for _, visual in examples])


def input_flops(config, features: dict, depth: int, visual_pool: int) -> list[float]:
    """Forward FLOPs of each row of `features` (processor features) through the vision tower and the first `depth`
    decoder layers, its visual tokens reduced by `visual_pool`: the tower on each visual's own patch grid, the
    decoder on the row's text tokens plus its reduced visual tokens."""
    from cost_puma import reduced_visual_tokens

    vision_config = config.vision_config
    merge = vision_config.spatial_merge_size
    injected = len(getattr(vision_config, "deepstack_visual_indexes", None) or [])
    mergers = 1 + min(injected, depth)
    ids, mask = features["input_ids"], features["attention_mask"].bool()
    flops = []
    grids = {kind: iter(features[f"{kind}_grid_thw"].tolist()) if f"{kind}_grid_thw" in features else iter(())
             for kind in ("image", "video")}
    for row in range(ids.shape[0]):
        tokens = int(mask[row].sum())
        vision = 0.0
        for kind, token_id in (("image", config.image_token_id), ("video", config.video_token_id)):
            if not bool((ids[row][mask[row]] == token_id).any()):
                continue
            t, h, w = next(grids[kind])
            vision += vision_flops_per_video(vision_config, t, h, w, num_mergers=mergers)
            tokens += reduced_visual_tokens(t, h, w, merge, visual_pool) - t * (h // merge) * (w // merge)
        flops.append(vision + text_flops_per_sequence(config.text_config, depth, tokens))
    return flops


def weight_megabytes(model, depth: int) -> float:
    """MB of the weights a model truncated to `depth` layers holds: everything but the decoder layers past it."""
    layers = model.model.language_model.layers
    dropped = sum(p.numel() * p.element_size() for layer in list(layers)[depth:] for p in layer.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return (total - dropped) / 2 ** 20


@torch.no_grad()
def _embed_all(model, data, image_root, depths, visual_pool, batch_size, flops: dict) -> tuple[dict, dict]:
    """`({depth: queries}, {depth: pool})`, L2-normalised float32; adds every input's FLOPs per depth to `flops`."""
    out = []
    for items, instructions, is_query in ((data.query_items, data.query_instructions, True),
                                          (data.pool_items, [None] * len(data.pool_items), False)):
        embedded = {depth: [] for depth in depths}
        for start in range(0, len(items), batch_size):
            features = _features(model, items, instructions, is_query, image_root, start,
                                 min(start + batch_size, len(items)))
            for depth in depths:
                flops[depth] += input_flops(model.config, features, depth, visual_pool)
            result = model(**model.features_on_device(features), output_depths=depths, visual_pool=visual_pool)
            for depth in depths:
                embedded[depth].append(result.depth_embeddings[depth].float().cpu())
        out.append({depth: torch.cat(parts) for depth, parts in embedded.items()})
    return out[0], out[1]


@torch.no_grad()
def measure_latency_ms(model, features: dict, depth: int, visual_pool: int, repeats: int = 3) -> float:
    """Median wall time (ms) of `repeats` forward passes of `features` through the first `depth` layers, after one
    warm-up pass."""
    features = model.features_on_device(features)
    times = []
    with first_layers(model, depth):
        for attempt in range(repeats + 1):
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            start = time.perf_counter()
            model(**features, visual_pool=visual_pool)
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            if attempt:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def sweep(model, tasks: list, image_root=None, *, depths: list[int] | None = None,
          max_pixels: list[int] | None = None, visual_pools: list[int] | None = None,
          matryoshka_dims: list[int] | None = None, batch_size: int = 8, probe_size: int = 8,
          latency_repeats: int = 3) -> dict:
    """Quality and cost of every setting depth x `max_pixels` x `visual_pools` (x `matryoshka_dims`, default the
    model's trained sizes) of `model` on `tasks` (`TaskData`, e.g. from `analysis.mbeir_sample` or `pair_task`).

    Returns a JSON-serialisable dict: `points` (one per setting: `depth`, `max_pixels`, `visual_pool`, `dim`,
    `scores` per task, `mean`, `gflops`, `latency_ms`, `memory_mb`), `tasks`, `model`, `device`.
    """
    if not tasks:
        raise ValueError("There are no tasks to sweep.")
    num_layers = model.num_layers
    depths = sorted(set(depths or range(1, num_layers + 1)))
    bad = [d for d in depths if not 0 < d <= num_layers]
    if bad:
        raise ValueError(f"depths {bad} are outside 1..{num_layers} (the model's layers).")
    max_pixels = sorted(set(max_pixels or [model.config.max_pixels]))
    visual_pools = sorted(set(visual_pools or [model.config.visual_pool]))
    for factor in visual_pools:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"visual_pools entries must be positive integers, got {factor!r}.")
    hidden = model.config.text_config.hidden_size
    dims = sorted(set(matryoshka_dims or model.config.matryoshka_dims or [hidden]) | {hidden})
    if any(not 0 < dim <= hidden for dim in dims):
        raise ValueError(f"matryoshka_dims {dims} must lie in 1..{hidden} (the embedding size).")
    model.eval()
    probe = tasks[0]
    points = []
    for pixels in max_pixels:
        with resolution(model, pixels):
            probe_features = _features(model, probe.pool_items, [None] * len(probe.pool_items), False, image_root,
                                       0, min(probe_size, len(probe.pool_items)))
            for factor in visual_pools:
                flops = {depth: [] for depth in depths}
                scores = {depth: {dim: {} for dim in dims} for depth in depths}
                for data in tasks:
                    queries, pool = _embed_all(model, data, image_root, depths, factor, batch_size, flops)
                    for depth in depths:
                        for dim in dims:
                            result, _ = score_task(data, F.normalize(queries[depth][:, :dim], dim=-1),
                                                   F.normalize(pool[depth][:, :dim], dim=-1))
                            scores[depth][dim][data.task.name] = result["score"]
                for depth in depths:
                    latency = measure_latency_ms(model, probe_features, depth, factor, latency_repeats)
                    for dim in dims:
                        task_scores = scores[depth][dim]
                        points.append({"depth": depth, "max_pixels": pixels, "visual_pool": factor, "dim": dim,
                                       "scores": task_scores, "mean": sum(task_scores.values()) / len(task_scores),
                                       "gflops": sum(flops[depth]) / len(flops[depth]) / 1e9,
                                       "latency_ms": latency, "memory_mb": weight_megabytes(model, depth)})
    return {"model": model.name_or_path, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "probe_size": min(probe_size, len(probe.pool_items)), "latency_repeats": latency_repeats,
            "tasks": [data.task.name for data in tasks], "points": points}


# ----------------------------------------------------------------------------------------------------------------
# Frontier and recommendation
# ----------------------------------------------------------------------------------------------------------------
def frontier(points: list[dict], cost: str = "gflops") -> list[int]:
    """Indices of the Pareto set of `points` in quality (`mean`, higher is better) and `cost` (lower is better),
    ordered by cost: the points no other point dominates (at most as costly, at least as good, strictly one of
    them). Of points equal in both, the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][cost], -points[i]["mean"], i))
    kept, best = [], -math.inf
    for i in order:
        if points[i]["mean"] > best:
            kept.append(i)
            best = points[i]["mean"]
    return kept


def recommend_setting(points: list[dict], budget_flops: float | None = None, budget_latency_ms: float | None = None,
                      budget_memory_mb: float | None = None) -> dict:
    """The point of best `mean` among those within every budget given (GFLOPs are compared as FLOPs: `budget_flops`
    is in FLOPs per input); ties go to the cheaper in FLOPs, then in latency. A budget nothing fits raises
    `ValueError` naming it and the cheapest setting's cost."""
    budgets = [(name, key, limit, scale) for name, key, limit, scale in (
        ("budget_flops", "gflops", budget_flops, 1e9), ("budget_latency_ms", "latency_ms", budget_latency_ms, 1.0),
        ("budget_memory_mb", "memory_mb", budget_memory_mb, 1.0)) if limit is not None]
    for name, _, limit, _ in budgets:
        if not limit > 0:
            raise ValueError(f"{name}={limit} must be positive.")
    if not points:
        raise ValueError("There are no swept settings to choose from.")
    within = [point for point in points if all(point[key] * scale <= limit for _, key, limit, scale in budgets)]
    if not within:
        failing = []
        for name, key, limit, scale in budgets:
            cheapest = min(points, key=lambda point: point[key])
            failing.append(f"{name}={limit:g} (the cheapest setting, {describe(cheapest)}, needs "
                           f"{cheapest[key] * scale:.4g})")
        raise ValueError("No swept setting fits the budget: " + "; ".join(failing) + ".")
    return min(within, key=lambda point: (-point["mean"], point["gflops"], point["latency_ms"]))


def describe(point: dict) -> str:
    """`depth 4, 401408 px, pool 2, dim 1536`: a setting in words."""
    return (f"depth {point['depth']}, {point['max_pixels']} px, pool {point['visual_pool']}, "
            f"dim {point['dim']}")


def label(point: dict) -> str:
    """A setting's short label for the plot: `d4 401k k2` (plus `/512` for a truncated dimension)."""
    return f"d{point['depth']} {point['max_pixels'] // 1000}k k{point['visual_pool']}" + (
        f" /{point['dim']}" if point.get("truncated") else "")


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------
def budget_markdown(result: dict, cost: str = "gflops") -> str:
    """The table of every setting (frontier ones marked) and the recommendation."""
    points, on_frontier = result["points"], set(result["frontier"])
    headers = ["depth", "max_pixels", "visual_pool", "dim", *result["tasks"], "mean", "GFLOPs/input",
               f"latency (ms, {result['probe_size']} inputs)", "weights (MB)", "frontier"]
    rows = [[p["depth"], p["max_pixels"], p["visual_pool"], p["dim"],
             *[f"{p['scores'][task]:.1f}" for task in result["tasks"]], f"{p['mean']:.1f}", f"{p['gflops']:.4g}",
             f"{p['latency_ms']:.1f}", f"{p['memory_mb']:.1f}",
             "yes" if i in on_frontier else ""] for i, p in enumerate(points)]
    lines = [f"### Quality and cost per setting ({result['model']}, {result['device']}, {result['dtype']})\n",
             markdown_table(headers, rows),
             f"\nQuality is zero-training where the model was not trained at a setting. Latency is the median of "
             f"{result['latency_repeats']} passes of one probe batch, measured in this run; it varies with the "
             f"machine and its load. The frontier is the Pareto set in mean score and {COST_AXES[cost]}."]
    recommendation = result.get("recommendation")
    if result.get("no_fit"):
        lines += ["", "### No recommendation\n", result["no_fit"]]
    if recommendation is not None:
        budget = ", ".join(f"{name} = {value:g}" for name, value in result.get("budget", {}).items()
                           if value is not None) or "no budget"
        lines += ["", f"### Recommendation ({budget})\n",
                  f"- {describe(recommendation)}: mean {recommendation['mean']:.1f}, "
                  f"{recommendation['gflops']:.4g} GFLOPs per input, {recommendation['latency_ms']:.1f} ms per probe "
                  f"batch, {recommendation['memory_mb']:.1f} MB of weights",
                  f"- load it with `PumaForEmbedding.from_pretrained(..., num_layers={recommendation['depth']}, "
                  f"max_pixels={recommendation['max_pixels']}, visual_pool={recommendation['visual_pool']})`"
                  + (f" and encode with `truncate_dim={recommendation['dim']}`" if recommendation.get("truncated")
                     else "")]
    return "\n".join(lines) + "\n"


def plot_frontier(result: dict, path, cost: str = "gflops") -> None:
    """Every setting's mean score against its cost, the frontier as a line with its settings labelled, and the
    recommended setting circled and labelled."""
    from .plots import import_pyplot

    plt = import_pyplot()
    points = result["points"]
    figure, axes = plt.subplots(figsize=(8, 5))
    axes.scatter([p[cost] for p in points], [p["mean"] for p in points], color="lightgrey", label="settings")
    line = [points[i] for i in result["frontier"]]
    axes.plot([p[cost] for p in line], [p["mean"] for p in line], color="tab:blue", marker="o", label="frontier")
    for p in line:
        axes.annotate(label(p), (p[cost], p["mean"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    chosen = result.get("recommendation")
    if chosen is not None:
        axes.scatter([chosen[cost]], [chosen["mean"]], s=160, facecolors="none", edgecolors="tab:red", linewidths=2,
                     label="recommended")
        axes.annotate(f"recommended: {label(chosen)}", (chosen[cost], chosen["mean"]), textcoords="offset points",
                      xytext=(6, 8), fontsize=8, color="tab:red")
    axes.set_xlabel(COST_AXES[cost])
    axes.set_ylabel("mean score (%)")
    axes.set_title("quality vs cost: depth x max_pixels x visual_pool")
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_budget(result: dict, out_dir, cost: str = "gflops") -> str:
    """Writes `budget.json`, `budget.md` and `budget.png` into `out_dir`; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "budget.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    markdown = budget_markdown(result, cost)
    with open(os.path.join(out_dir, "budget.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    plot_frontier(result, os.path.join(out_dir, "budget.png"), cost)
    return markdown


def plan(model, tasks: list, image_root=None, *, budget_flops: float | None = None,
         budget_latency_ms: float | None = None, budget_memory_mb: float | None = None, **sweep_kwargs) -> dict:
    """`sweep`, its frontier (in the cost the budget is given in: latency for a latency budget, weights for a
    memory budget, else FLOPs) and the recommendation for the budget (the best setting overall without one). When
    no setting fits the budget, `recommendation` is `None` and `no_fit` says why (`recommend_setting`'s error)."""
    result = sweep(model, tasks, image_root, **sweep_kwargs)
    hidden = model.config.text_config.hidden_size
    for point in result["points"]:
        point["truncated"] = point["dim"] != hidden
    result["cost_axis"] = ("latency_ms" if budget_latency_ms is not None else
                           "memory_mb" if budget_memory_mb is not None and budget_flops is None else "gflops")
    result["frontier"] = frontier(result["points"], result["cost_axis"])
    result["budget"] = {"budget_flops": budget_flops, "budget_latency_ms": budget_latency_ms,
                        "budget_memory_mb": budget_memory_mb}
    try:
        result["recommendation"] = recommend_setting(result["points"], budget_flops, budget_latency_ms,
                                                     budget_memory_mb)
    except ValueError as err:  # the sweep is still worth writing: it shows what the budget would need
        result["recommendation"], result["no_fit"] = None, str(err)
    return result


__all__ = ["budget_markdown", "describe", "first_layers", "frontier", "input_flops", "label", "measure_latency_ms",
           "plan", "plot_frontier", "recommend_setting", "resolution", "sweep", "weight_megabytes", "write_budget"]

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Charts: one bar chart per evaluated task beside published figures, and the training curves of a Trainer run."""

import json
import math
import os

from mbeir_puma import require_file


# Systems drawn beside this model's bar in the per-task charts.
CHART_SYSTEMS = ("PUMA", "LamRA-Ret", "VLM2Vec")
# Log keys that are bookkeeping rather than curves.
_NOT_CURVES = ("step", "epoch", "total_flos", "num_input_tokens_seen")


def import_pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or an `ImportError` saying what to install."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("Plots need matplotlib: pip install matplotlib.") from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_task(result: dict, path: str, baselines: dict[str, float] | None = None,
              model_name: str = "this model") -> None:
    """Bar chart of the task's headline score: each baseline's (e.g. the untrained model's), this model's (named
    `model_name`), and the published figures of `CHART_SYSTEMS` when the task has them."""
    plt = import_pyplot()
    baselines = baselines or {}
    published = [system for system in CHART_SYSTEMS if system in result["published"]]
    names = [*baselines, model_name, *published]
    values = [*baselines.values(), result["score"], *[result["published"][system] for system in published]]
    colours = ["tab:orange"] * len(baselines) + ["tab:blue"] + ["tab:gray"] * len(published)
    figure, axes = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    bars = axes.bar(names, values, color=colours)
    legend = []
    if baselines:
        bars[0].set_label("baseline" if len(baselines) == 1 else "baselines")
        legend.append(bars[0])
    bars[len(baselines)].set_label(model_name)
    legend.append(bars[len(baselines)])
    for bar in bars[len(baselines) + 1:]:
        bar.set_hatch("//")
        bar.set_label("published figures")
    if published:
        legend.append(bars[len(baselines) + 1])
    axes.bar_label(bars, fmt="%.1f")
    metric = result["metric"].replace("recall@", "Recall@").replace("precision@", "Precision@")
    axes.set_ylabel(metric.replace("mean", "mean task score") + " (%)")
    axes.set_ylim(0, 115)  # room above a 100 % bar for its label and the legend
    pool = f" ({result['pool']} pool)" if result.get("pool") else ""
    axes.set_title(f"{result['label']}{pool}", fontsize=10)
    if published:  # tells the published figures (hatched) from this run's bars; the axis names the rest
        axes.legend(handles=legend, loc="upper right", fontsize=8, ncols=len(legend))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_training_curves(trainer_state_path, out_path) -> list[str]:
    """Plots a Trainer run's logged scalars against the step: every `*loss*` key (total loss, its components,
    eval loss) on one panel, each other scalar (learning rate, grad norm, temperatures, ...) on its own.

    Returns the plotted keys.
    """
    path = os.fspath(trainer_state_path)
    with open(require_file(path, "Trainer state"), encoding="utf-8") as f:
        try:
            history = json.load(f).get("log_history")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{path} is not a Trainer state JSON object ({err}).") from err
    curves = {}
    for entry in history or []:
        if "step" not in entry or "train_runtime" in entry:  # the end-of-training summary holds totals, not points
            continue
        for key, value in entry.items():
            if key not in _NOT_CURVES and not key.endswith(("_runtime", "_per_second")) and \
                    isinstance(value, (int, float)) and not isinstance(value, bool):
                curves.setdefault(key, []).append((entry["step"], value))
    losses = sorted((key for key in curves if "loss" in key), key=lambda key: (key != "loss", key))
    if not losses:
        raise ValueError(f"{path} logs no loss (its log_history has no '*loss*' entries to plot).")
    others = sorted(key for key in curves if key not in losses)
    plt = import_pyplot()
    panels = 1 + len(others)
    columns = min(2, panels)
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    for key in losses:
        steps, values = zip(*curves[key])
        if key == "loss":  # a wide translucent band, so that a component equal to it stays visible on top
            axes[0][0].plot(steps, values, label=key, color="black", linewidth=4, alpha=0.3, zorder=1)
            continue
        # a component equal to the total at every step (one loss, weight 1) says so rather than hiding the total
        same = "loss" in curves and curves[key] == curves["loss"]
        axes[0][0].plot(steps, values, label=f"{key} (= loss)" if same else key, linestyle="--", linewidth=1.5,
                        marker="o" if key.startswith("eval_") else None, markersize=3, zorder=2)
    axes[0][0].set_title("losses")
    axes[0][0].legend(fontsize=8, loc="best")
    for panel, key in enumerate(others, 1):
        ax = axes[panel // columns][panel % columns]
        steps, values = zip(*curves[key])
        ax.plot(steps, values, color="tab:orange")
        ax.set_title(key)
    for panel in range(panels, rows * columns):
        axes[panel // columns][panel % columns].axis("off")
    for ax in axes.flat:
        ax.set_xlabel("step")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
    return losses + others

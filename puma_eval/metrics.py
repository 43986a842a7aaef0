# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Retrieval metrics and result reports: Recall@k, MRR and nDCG@k through the local `evaluate` module
`puma_eval/recall_at_k`, the per-task result rows, the average row, and the markdown/JSON tables."""

import functools
import json
import os
import re

from mbeir_puma import markdown_table


METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recall_at_k")
K_VALUES = (1, 5, 10)


@functools.lru_cache(maxsize=1)
def load_metric():
    """The local `evaluate` module `puma_eval/recall_at_k` (Recall@k, MRR, nDCG@k), never fetched from the Hub."""
    try:
        import evaluate
    except ImportError as err:
        raise ImportError("Evaluation needs evaluate: pip install evaluate (or pip install -e '.[eval]').") from err
    return evaluate.load(METRIC_PATH, keep_in_memory=True)


def retrieval_metrics(ranked_ids: list[list[str]], relevant_ids: list[list[str]], k_values=K_VALUES) -> dict:
    """Recall@k and nDCG@k per k and MRR over the given lists, in percent."""
    scores = load_metric().compute(predictions=ranked_ids, references=relevant_ids, k_values=list(k_values))
    return {key: 100.0 * value for key, value in scores.items()}


def result_row(name: str, label: str, metric_k: int, scores: dict, num_queries: int, pool_size: int,
               pool: str = "local", published: dict | None = None) -> dict:
    """One task's result: `task`, `label`, `pool`, `num_queries`, `pool_size`, `metric` (`recall@k`), `score`,
    `recall@1/5/10`, `ndcg@1/5/10`, `mrr@10` (percent) and `published` (figures of other systems)."""
    return {
        "task": name, "label": label, "pool": pool, "num_queries": num_queries, "pool_size": pool_size,
        "metric": f"recall@{metric_k}", "score": scores[f"recall@{metric_k}"],
        **{f"recall@{k}": scores[f"recall@{k}"] for k in K_VALUES},
        **{f"ndcg@{k}": scores[f"ndcg@{k}"] for k in K_VALUES},
        f"mrr@{max(K_VALUES)}": scores["mrr"], "published": dict(published or {}),
    }


def summarize(results: list[dict], full_average: dict[str, float] | None = None) -> dict:
    """The average row: the mean of each score over the tasks, and of the published figures.

    `full_average` gives each system's own published average, used when every task of the benchmark ran (the
    M-BEIR table's); otherwise the published average is the mean of the published figures of the tasks that ran.
    """
    # every score the rows share (counts are not scores)
    keys = [key for key, value in results[0].items() if isinstance(value, float) and
            all(isinstance(result.get(key), float) for result in results)]
    average = {key: sum(result[key] for result in results) / len(results) for key in keys}
    published = {}
    if results and all(result["published"] for result in results):
        for system in results[0]["published"]:
            if full_average is not None and system in full_average:
                published[system] = full_average[system]
            elif all(system in result["published"] for result in results):
                published[system] = sum(result["published"][system] for result in results) / len(results)
    return {"task": "average", "label": f"average ({len(results)} tasks)", "metric": "mean",
            **average, "published": published}


def results_markdown(results: list[dict], average: dict, note: str | None = None,
                     columns: tuple[tuple[str, str], ...] | None = None) -> str:
    """The per-task table (percent) with the average row and the published figures, in markdown.

    `columns` are `(header, key)` pairs of the score columns (default: M-BEIR's R@1/5/10, MRR@10, nDCG@10).
    """
    columns = columns or (("R@1", "recall@1"), ("R@5", "recall@5"), ("R@10", "recall@10"),
                          ("MRR@10", f"mrr@{max(K_VALUES)}"), ("nDCG@10", "ndcg@10"))
    systems = list(dict.fromkeys(system for result in results for system in result["published"]))
    headers = ["task", "metric", "score", *[header for header, _ in columns], "queries", "candidates",
               *[f"{system}†" for system in systems]]
    rows = []
    for row in [*results, average]:
        metric = row["metric"].replace("recall@", "R@").replace("precision@", "P@")
        rows.append([row["label"], metric, f"{row['score']:.1f}", *[f"{row[key]:.1f}" for _, key in columns],
                     row.get("num_queries"), row.get("pool_size"),
                     *[f"{row['published'][s]:.1f}" if s in row["published"] else None for s in systems]])
    table = markdown_table(headers, rows)
    return table + f"\n\n† published figures: {note}." if systems and note else table


def safe_name(name: str) -> str:
    """`name` with every character outside `[A-Za-z0-9_.-]` replaced, for file names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_results(results: list[dict], out_dir, name: str, *, average: dict | None = None, note: str | None = None,
                  columns=None, plots: bool = True) -> str:
    """Writes `{name}.md`, `{name}.json` and, with `plots`, one bar chart per task in `plots/{name}_{task}.png`;
    returns the markdown table."""
    average = average or summarize(results)
    table = results_markdown(results, average, note, columns)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump({"tasks": results, "average": average}, f, indent=2)
        f.write("\n")
    if plots:
        from .plots import plot_task

        os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
        for row in [*results, average]:
            chart = f"{name.removeprefix('results_')}_{safe_name(row['task'])}.png"
            plot_task(row, os.path.join(out_dir, "plots", chart))
    return table

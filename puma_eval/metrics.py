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


def read_results(path) -> dict:
    """A results file `write_results` wrote (`{"tasks": [rows], "average": row}`), e.g. to compare against; a file
    of another shape is a `ValueError` naming it."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a results JSON file ({err}).") from err
    rows = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) and {"task", "score"} <= set(row) for row in rows) \
            or not isinstance(data.get("average"), dict):
        raise ValueError(f"{path} is not a results file of eval_puma.py (a JSON object with 'tasks' rows, each with "
                         "'task' and 'score', and an 'average' row).")
    return data


def baseline_scores(results: list[dict], baselines: dict[str, dict] | None) -> dict[str, dict[str, float]]:
    """`{baseline name: {task: score}}` of the rows of each baseline results file (`read_results`) that compare with
    `results`: a task's row when it has the same metric, an average row (`task` starting with "average") only when
    the baseline averaged the same tasks."""
    tasks = {row["task"] for row in results if not row["task"].startswith("average")}
    compared = {}
    for name, data in (baselines or {}).items():
        rows = {row["task"]: row for row in [*data["tasks"], data["average"]]}
        same_tasks = {task for task in rows if not task.startswith("average")} == tasks
        compared[name] = {task: row["score"] for task, row in rows.items()
                          if not task.startswith("average") or same_tasks}
    return compared


def results_markdown(results: list[dict], average: dict, note: str | None = None,
                     columns: tuple[tuple[str, str], ...] | None = None,
                     baselines: dict[str, dict[str, float]] | None = None) -> str:
    """The per-task table (percent) with the average row and the published figures, in markdown.

    `columns` are `(header, key)` pairs of the score columns (default: M-BEIR's R@1/5/10, MRR@10, nDCG@10);
    `baselines` (`baseline_scores`) adds each baseline's score beside this model's.
    """
    columns = columns or (("R@1", "recall@1"), ("R@5", "recall@5"), ("R@10", "recall@10"),
                          ("MRR@10", f"mrr@{max(K_VALUES)}"), ("nDCG@10", "ndcg@10"))
    baselines = baselines or {}
    systems = list(dict.fromkeys(system for result in results for system in result["published"]))
    headers = ["task", "metric", "score", *baselines, *[header for header, _ in columns], "queries", "candidates",
               *[f"{system}†" for system in systems]]
    rows = []
    for row in [*results, average]:
        metric = row["metric"].replace("recall@", "R@").replace("precision@", "P@")
        rows.append([row["label"], metric, f"{row['score']:.1f}",
                     *[f"{scores[row['task']]:.1f}" if row["task"] in scores else None for scores in baselines.values()],
                     *[f"{row[key]:.1f}" for _, key in columns],
                     row.get("num_queries"), row.get("pool_size"),
                     *[f"{row['published'][s]:.1f}" if s in row["published"] else None for s in systems]])
    table = markdown_table(headers, rows)
    return table + f"\n\n† published figures: {note}." if systems and note else table


def safe_name(name: str) -> str:
    """`name` with every character outside `[A-Za-z0-9_.-]` replaced, for file names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_results(results: list[dict], out_dir, name: str, *, average: dict | None = None, note: str | None = None,
                  columns=None, plots: bool = True, baselines: dict[str, dict] | None = None,
                  model_name: str = "this model") -> str:
    """Writes `{name}.md`, `{name}.json` and, with `plots`, one bar chart per task in `plots/{name}_{task}.png`;
    returns the markdown table.

    `baselines` maps a name (e.g. "untrained") to the results of another model on the same benchmark (`read_results`,
    or `{"tasks": rows, "average": row}` in memory): their scores stand beside this model's, named `model_name`, in
    the table and the charts."""
    average = average or summarize(results)
    compared = baseline_scores([*results, average], baselines)
    table = results_markdown(results, average, note, columns, compared)
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
            plot_task(row, os.path.join(out_dir, "plots", chart), model_name=model_name,
                      baselines={other: scores[row["task"]] for other, scores in compared.items()
                                 if row["task"] in scores})
    return table

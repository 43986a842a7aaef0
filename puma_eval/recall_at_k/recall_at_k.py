# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Retrieval metrics over ranked candidate ids: Recall@k (M-BEIR's hit rate), MRR and nDCG@k.

A local `evaluate` module, loaded by path so that it never touches the Hub:

    evaluate.load("puma_eval/recall_at_k")
"""

import math

import datasets
import evaluate


_DESCRIPTION = """\
Scores ranked retrieval results against sets of relevant ids, with binary relevance.

- `recall@k`: the fraction of queries with at least one relevant id among their first k predictions. This is the
  Recall@k of M-BEIR (UniIR) and of CLIP/BLIP retrieval papers, i.e. a hit rate, not the fraction of relevant ids found.
- `mrr`: the mean reciprocal rank of the first relevant prediction (0 when none is predicted); over top-K lists this
  is MRR@K.
- `ndcg@k`: the mean nDCG over the first k predictions, with gain 1 per relevant id and the ideal ranking putting
  min(k, number of relevant ids) relevant ids first.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[str]]`): per query, candidate ids in ranked order, best first, without repeats.
    references (`list[list[str]]`): per query, the relevant ids (at least one).
    k_values (`list[int]`, *optional*, defaults to `[1, 5, 10]`): the cut-offs of Recall@k and nDCG@k.

Returns:
    `dict`: `recall@k` and `ndcg@k` for each k, and `mrr`, each a float in [0, 1].

Example:
    >>> import evaluate
    >>> metric = evaluate.load("puma_eval/recall_at_k")
    >>> metric.compute(predictions=[["b", "a"], ["c", "d"]], references=[["a"], ["x"]], k_values=[1, 2])
    {'recall@1': 0.0, 'recall@2': 0.5, 'ndcg@1': 0.0, 'ndcg@2': 0.31546487678572877, 'mrr': 0.25}
"""

_CITATION = """\
@inproceedings{wei2024uniir,
  title     = {UniIR: Training and Benchmarking Universal Multimodal Information Retrievers},
  author    = {Wei, Cong and Chen, Yang and Chen, Haonan and Hu, Hexiang and Zhang, Ge and Fu, Jie and Ritter, Alan
               and Chen, Wenhu},
  booktitle = {European Conference on Computer Vision},
  year      = {2024}
}
"""


def _discount(rank: int) -> float:
    """DCG discount of a 0-based rank."""
    return 1.0 / math.log2(rank + 2)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecallAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("string")),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
            reference_urls=["https://github.com/TIGER-AI-Lab/UniIR"],
        )

    def _compute(self, predictions, references, k_values=(1, 5, 10)):
        k_values = list(k_values)
        bad = [k for k in k_values if isinstance(k, bool) or not isinstance(k, int) or k < 1]
        if bad or not k_values:
            raise ValueError(f"k_values must be positive integers, got {k_values!r}.")
        if not predictions:
            raise ValueError("predictions is empty: there is no query to score.")
        hits = {k: 0.0 for k in k_values}
        ndcg = {k: 0.0 for k in k_values}
        reciprocal_ranks = 0.0
        for index, (ranked, relevant) in enumerate(zip(predictions, references)):
            relevant = set(relevant)
            if not relevant:
                raise ValueError(f"references[{index}] is empty: every query needs at least one relevant id.")
            if len(set(ranked)) != len(ranked):
                repeated = sorted({item for item in ranked if ranked.count(item) > 1})
                raise ValueError(f"predictions[{index}] repeats ids {repeated}.")
            first = next((rank for rank, item in enumerate(ranked) if item in relevant), None)
            if first is not None:
                reciprocal_ranks += 1.0 / (first + 1)
            for k in k_values:
                hits[k] += first is not None and first < k
                dcg = sum(_discount(rank) for rank, item in enumerate(ranked[:k]) if item in relevant)
                ideal = sum(_discount(rank) for rank in range(min(k, len(relevant))))
                ndcg[k] += dcg / ideal
        n = len(predictions)
        return {**{f"recall@{k}": hits[k] / n for k in k_values}, **{f"ndcg@{k}": ndcg[k] / n for k in k_values},
                "mrr": reciprocal_ranks / n}

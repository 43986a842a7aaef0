# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Hard-negative mining for M-BEIR-format training data, positive-aware (NV-Retriever, arXiv 2407.15831).

    python eval_puma.py mine --model teacher_or_student --mbeir-root M-BEIR \\
        --queries query/union_train/mbeir_union_up_train.jsonl \\
        --pool cand_pool/global/mbeir_union_train_cand_pool.jsonl --out mined --num-negatives 8

For each query, with any PUMA checkpoint (the full-depth teacher, the student, a trained model):

1. the pool and the queries are embedded through the evaluation's cache (`encoding.encode_sharded`: resumable,
   split between the processes of `accelerate launch`), each query with one instruction drawn as evaluation draws
   it (`mbeir_puma.mbeir_eval_queries`);
2. the query is searched among the candidates of its target modalities (those of its positives in the pool; one
   index per modality);
3. its positives are dropped from the ranking, and so is every candidate scoring within a margin of the positive's
   score, the lowest of its positives' (`threshold = positive - margin` and/or `positive - relative_margin *
   |positive|`; NV-Retriever's TopK-MarginPos and TopK-PercPos): those are likely unlabelled positives;
4. `num_negatives` are drawn without replacement from the ranks `rank_range` of the candidates that survive (1 = the
   best-scoring survivor), seeded by `(seed, qid)`, and kept in rank order. As in NV-Retriever, the range counts after
   the margin: where a model scores many candidates near the positive, the negatives come from further down rather
   than not at all. The search goes as deep as that needs (doubling its depth for the queries still short), so a
   query falls short of `num_negatives` only when its target modalities hold too few candidates under the margin.

Writes `OUT/<queries file name>` (the query file with `neg_cand_list` replaced: what `MBEIRTrainDataset` and
`train.py --dataset mbeir --num_hard_negatives N` read), `OUT/columns/train.jsonl` (one row per query with its first
positive and the negatives' texts and image paths, for `train.py --dataset hf --hf_dataset OUT/columns --columns
...`; the `--columns` value is in `OUT/mining.json`) and `OUT/mining.json` (settings, counts, the margin's drops).
"""

import json
import logging
import os
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from mbeir_puma import (SkipLog, dataset_id, load_mbeir_pool, load_mbeir_queries, load_query_instructions,
                        mbeir_eval_queries, media_side, own_dataset_positives, read_jsonl)

from .encoding import distributed_state, encode_sharded
from .index import INDEX_KINDS, build_index, search_index


logger = logging.getLogger(__name__)

# `--columns` of the generic loader (`train.py --dataset hf`) for the columns file
COLUMNS = {"query_text": "query_text", "query_image": "query_image", "positive_text": "positive_text",
           "positive_image": "positive_image", "negative_text": "negative_text", "negative_image": "negative_image",
           "id_column": "id", "modality_column": "modality"}


@dataclass
class MiningSettings:
    """What `mine_negatives` keeps.

    Args:
        num_negatives: negatives drawn per query.
        rank_range: `(first, last)` ranks, 1-based and inclusive, among the query's candidates that are neither
            positives nor dropped by the margin, that the negatives are drawn from.
        margin: drop candidates scoring above `positive - margin` (absolute; `None`: off).
        relative_margin: drop candidates scoring above `positive - relative_margin * |positive|` (NV-Retriever's
            TopK-PercPos at 95 % is 0.05; `None`: off).
        seed: seed of the draws (with each query's id).
    """

    num_negatives: int = 8
    rank_range: tuple[int, int] = (1, 50)
    margin: float | None = None
    relative_margin: float | None = 0.05
    seed: int = 0

    def __post_init__(self):
        self.rank_range = tuple(self.rank_range)
        first, last = self.rank_range if len(self.rank_range) == 2 else (0, -1)
        if not 1 <= first <= last:
            raise ValueError(f"rank_range must be (first, last) with 1 <= first <= last, got {self.rank_range}.")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be positive, got {self.num_negatives}.")
        for name in ("margin", "relative_margin"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a non-negative number or None, got {value!r}.")

    def threshold(self, positive_score: float) -> float:
        """The highest score a negative may have."""
        bounds = [float("inf")]
        if self.margin is not None:
            bounds.append(positive_score - self.margin)
        if self.relative_margin is not None:
            bounds.append(positive_score - self.relative_margin * abs(positive_score))
        return min(bounds)


def select_negatives(qid: str, ranked_ids: list[str], ranked_scores: list[float], positives: set[str],
                     positive_score: float, settings: MiningSettings) -> tuple[list[str], int]:
    """The negatives of one query from its ranking (best first): `(chosen ids in rank order, candidates the margin
    dropped)`. The ranking must reach `rank_range[1]` survivors of the margin wherever the pool has them."""
    threshold = settings.threshold(positive_score)
    candidates = [(did, score) for did, score in zip(ranked_ids, ranked_scores) if did not in positives]
    survivors = [did for did, score in candidates if score <= threshold]
    first, last = settings.rank_range
    in_range = survivors[first - 1:last]
    rng = np.random.default_rng([settings.seed, zlib.crc32(qid.encode("utf-8"))])
    chosen = sorted(rng.choice(len(in_range), size=min(settings.num_negatives, len(in_range)), replace=False).tolist())
    return [in_range[i] for i in chosen], len(candidates) - len(survivors)


def _search_past_margin(faiss_index, vectors: np.ndarray, row_ids: list[str], positives: list[set[str]],
                        thresholds: list[float], needed: int, depth: int) -> list[tuple[list[str], list[float]]]:
    """Each query's top results in one index, `(ids, scores)` best first, deep enough to hold `needed` candidates
    that are neither its positives nor above its threshold (and every candidate tied with the last of them), or the
    whole index: searched at `depth`, then again at doubled depths for the queries still short."""
    results = [None] * len(vectors)
    asking = list(range(len(vectors)))
    while asking:
        scores, found = search_index(faiss_index, vectors[asking], depth)
        short = []
        for query, row_scores, row_found in zip(asking, scores, found):
            ids = [row_ids[i] for i in row_found if i >= 0]
            values = [float(value) for value, i in zip(row_scores, row_found) if i >= 0]
            results[query] = ids, values
            survivors = [value for did, value in zip(ids, values)
                         if did not in positives[query] and value <= thresholds[query]]
            # deep enough once past the last needed survivor's score: candidates tied with it (equal contents)
            # are then all here, and ranked in pool order as an exact search would
            deep_enough = len(survivors) >= needed and values[-1] < survivors[needed - 1]
            if not deep_enough and depth < faiss_index.ntotal:
                short.append(query)
        asking, depth = short, min(2 * depth, faiss_index.ntotal)
    return results


def _shard_array(shards, index: int) -> np.ndarray:
    """Shard `index` of `EmbeddingShards`: mapped from its file, or the in-memory tensor of an uncached run."""
    return shards.mapped(index) if shards.folder is not None else shards.shard(index).numpy()


class _RowSubset:
    """Some rows of `EmbeddingShards`, read shard by shard: what `index.build_index` indexes for one modality."""

    def __init__(self, shards, rows: np.ndarray):
        self.shards, self.rows, self.dim = shards, rows, shards.dim

    def __len__(self) -> int:
        return len(self.rows)

    def chunks(self):
        for index, (start, end) in enumerate(self.shards.bounds):
            wanted = self.rows[(self.rows >= start) & (self.rows < end)]
            if len(wanted):
                yield np.asarray(_shard_array(self.shards, index)[wanted - start], dtype=np.float32)


def _rows(shards, rows: list[int]) -> np.ndarray:
    """Rows of `EmbeddingShards`, float32."""
    out = np.empty((len(rows), shards.dim), dtype=np.float32)
    starts = np.array([start for start, _ in shards.bounds])
    for i, row in enumerate(rows):
        index = int(np.searchsorted(starts, row, side="right")) - 1
        out[i] = _shard_array(shards, index)[row - shards.bounds[index][0]]
    return out


def mine_negatives(model, queries_file: str, pool_file: str, instructions_file: str, out_dir: str, *,
                   settings: MiningSettings = MiningSettings(), image_root: str | None = None, cache_dir=None,
                   index: str = "flat", batch_size: int = 16, shard_size: int = 1024, instruction_seed: int = 0,
                   show_progress_bar: bool = True, **index_options) -> dict | None:
    """Mines `settings.num_negatives` hard negatives per query of `queries_file` from `pool_file` with `model`
    (module docstring) and writes the files to `out_dir`; returns the summary written to `mining.json` on the main
    process, `None` on the others (which encode their share of the shards)."""
    if index not in INDEX_KINDS:
        raise ValueError(f"Unknown index kind {index!r}; use one of {INDEX_KINDS}.")
    pool = load_mbeir_pool(pool_file)
    queries = load_mbeir_queries(queries_file)
    instructions = load_query_instructions(instructions_file)
    items = mbeir_eval_queries(queries, pool, instructions, seed=instruction_seed)
    state = distributed_state()
    options = dict(image_root=image_root, batch_size=batch_size, shard_size=shard_size,
                   show_progress_bar=show_progress_bar)
    pool_ids = list(pool)
    pool_items = [media_side(pool[did]["txt"], pool[did]["img_path"], pool[did].get("video_path")) for did in pool_ids]
    pool_shards = encode_sharded(model, pool_items, pool_ids, cache_dir, name=f"mining-pool-{_stem(pool_file)}",
                                 **options)
    mined = [item for item in items if item["modality"] is not None]
    query_shards = encode_sharded(model, [item["query"] for item in mined], [item["query_id"] for item in mined],
                                  cache_dir, name=f"mining-queries-{_stem(queries_file)}", is_query=True,
                                  instructions=[item["instruction"] for item in mined], **options)
    if not state.is_main_process:
        return None

    row_of = {did: row for row, did in enumerate(pool_ids)}
    positives = {item["query_id"]: [did for did in item["pos_cand_list"] if did in pool] for item in mined}
    targets = {qid: sorted({pool[did]["modality"] for did in dids}) for qid, dids in positives.items()}
    query_vectors = query_shards.tensor().numpy()
    query_row = {item["query_id"]: row for row, item in enumerate(mined)}
    # each query's score of its positives; the margin is taken from the lowest
    positive_score = {}
    for qid, dids in positives.items():
        scores = _rows(pool_shards, [row_of[did] for did in dids]) @ query_vectors[query_row[qid]]
        positive_score[qid] = float(scores.min())
    depth = settings.rank_range[1] + max(len(dids) for dids in positives.values())
    rankings = {qid: ([], []) for qid in positives}
    for modality in sorted({m for modalities in targets.values() for m in modalities}):
        rows = np.array([row for row, did in enumerate(pool_ids) if pool[did]["modality"] == modality])
        asking = [qid for qid, modalities in targets.items() if modality in modalities]
        faiss_index = build_index(_RowSubset(pool_shards, rows), index, show_progress_bar=show_progress_bar,
                                  **index_options)
        found = _search_past_margin(faiss_index, query_vectors[[query_row[qid] for qid in asking]],
                                    [pool_ids[row] for row in rows], [set(positives[qid]) for qid in asking],
                                    [settings.threshold(positive_score[qid]) for qid in asking],
                                    settings.rank_range[1], depth)
        for qid, (ids, values) in zip(asking, found):
            rankings[qid][0].extend(ids)
            rankings[qid][1].extend(values)
    negatives, dropped_by_margin, short = {}, 0, SkipLog()
    for qid, (ids, values) in rankings.items():
        # one ranking over the modalities searched, best first; equal scores (equal candidates) in pool order
        order = sorted(range(len(ids)), key=lambda i: (-values[i], row_of[ids[i]]))
        ranked_ids, ranked_scores = [ids[i] for i in order], [values[i] for i in order]
        negatives[qid], dropped = select_negatives(qid, ranked_ids, ranked_scores, set(positives[qid]),
                                                   positive_score[qid], settings)
        dropped_by_margin += dropped
        if len(negatives[qid]) < settings.num_negatives:
            short.add(f"queries with fewer than {settings.num_negatives} negatives", qid)
    skipped = SkipLog()
    for item in items:
        if item["modality"] is None:
            skipped.add("queries with no positive in the pool (left without negatives)", item["query_id"])
    summary = _write_outputs(queries_file, pool, negatives, out_dir, settings, image_root)
    summary.update(num_queries=len(items), mined=len(negatives), dropped_by_margin=dropped_by_margin,
                   short=short.summary() or None, skipped=skipped.summary() or None, model=model.name_or_path,
                   pool=os.path.abspath(pool_file), queries=os.path.abspath(queries_file), index=index)
    with open(os.path.join(out_dir, "mining.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    if short or skipped:
        logger.warning(f"Mining: {'; '.join(text for text in (short.summary(), skipped.summary()) if text)}.")
    return summary


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _write_outputs(queries_file: str, pool: dict, negatives: dict[str, list[str]], out_dir: str,
                   settings: MiningSettings, image_root: str | None) -> dict:
    """The query file with `neg_cand_list` replaced, the columns file, and the summary's settings and paths. The
    columns file maps image columns (one `ColumnMapping` maps a side to images or to videos, not both), so a query
    whose query, positive or negatives hold a video is left out of it and counted (`columns_skipped_video`); the
    query file keeps it."""
    os.makedirs(os.path.join(out_dir, "columns"), exist_ok=True)
    records = read_jsonl(queries_file)
    query_path = os.path.join(out_dir, os.path.basename(queries_file))
    rows, skipped_video = [], 0
    with open(query_path, "w", encoding="utf-8") as f:
        for record in records:
            qid = str(record["qid"])
            record["neg_cand_list"] = negatives.get(qid, [])
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            in_pool = [did for did in record.get("pos_cand_list") or [] if str(did) in pool]
            if qid not in negatives or not in_pool:
                continue
            positive = pool[own_dataset_positives(qid, [str(did) for did in in_pool])[0]]
            if record.get("query_video_path") or any(pool[did].get("video_path") for did in
                                                      [positive["did"], *negatives[qid]]):
                skipped_video += 1
                continue
            rows.append({"id": qid, "query_text": record.get("query_txt") or None,
                         "query_image": record.get("query_img_path") or None, "positive_text": positive["txt"],
                         "positive_image": positive["img_path"], "modality": positive["modality"],
                         "negative_text": [pool[did]["txt"] for did in negatives[qid]],
                         "negative_image": [pool[did]["img_path"] for did in negatives[qid]],
                         "dataset_id": dataset_id(qid)})
    if skipped_video:
        logger.info("%d queries with videos are in the query file but not in the columns file (image columns).",
                    skipped_video)
    with open(os.path.join(out_dir, "columns", "train.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"settings": asdict(settings), "query_file": os.path.abspath(query_path),
            "columns_file": os.path.abspath(os.path.join(out_dir, "columns", "train.jsonl")),
            "columns": COLUMNS, "columns_skipped_video": skipped_video,
            "image_root": os.path.abspath(image_root) if image_root else None}


__all__ = ["COLUMNS", "MiningSettings", "mine_negatives", "select_negatives"]

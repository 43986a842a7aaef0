# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Evaluation of PUMA embedding models, one job per module:

- `tasks`: task tables (M-BEIR's 16, or a benchmark's `tasks.json`), strict checks, `load_task`
- `encoding`: the resumable embedding cache, sharded over the processes of `accelerate launch`
- `index`: faiss indexes (flat, float16, IVF-Flat/SQ8/PQ, HNSW), memory estimates, GPU shards, on-disk reuse
- `metrics`: Recall@k / MRR / nDCG, result rows, markdown and JSON tables
- `plots`: per-task bar charts, training curves
- `mbeir`: the M-BEIR protocol, and `score_task` for precomputed embeddings
- `mmeb`: MMEB-V2's image, video and visual-document tasks: hit@1, nDCG@5, meta-task, modality and overall tables
- `mmeb_v2`: MMEB-V2's video and visual-document tasks read from the released layout (and `MMEBTask`)
- `mteb_model`: the model behind mteb 2.x's encoder interface
- `corpus`: semantic search over a folder (images, videos, PDF pages, texts) or JSONL corpus

`python eval_puma.py` is the command line.
"""

from .corpus import CorpusIndex, load_corpus, search_corpus
from .encoding import EmbeddingShards, distributed_state, encode_cached, encode_sharded, model_fingerprint
from .index import INDEX_KINDS, IndexSpec, build_index, index_memory_bytes, load_or_build_index, search_index, \
    torch_search
from .mbeir import evaluate_mbeir, mbeir_summary, score_task, write_mbeir_results
from .metrics import K_VALUES, load_metric, retrieval_metrics, summarize, write_results
from .plots import plot_training_curves
from .tasks import MBEIR_TASKS, PUBLISHED_FIGURES, load_benchmark, load_task


__all__ = [
    "CorpusIndex", "EmbeddingShards", "INDEX_KINDS", "IndexSpec", "K_VALUES", "MBEIR_TASKS", "PUBLISHED_FIGURES",
    "build_index", "distributed_state", "encode_cached", "encode_sharded", "evaluate_mbeir", "index_memory_bytes",
    "load_benchmark", "load_corpus", "load_metric", "load_or_build_index", "load_task", "mbeir_summary",
    "model_fingerprint", "plot_training_curves", "retrieval_metrics", "score_task", "search_corpus", "search_index",
    "summarize", "torch_search", "write_mbeir_results", "write_results",
]

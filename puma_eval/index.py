# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""faiss inner-product indexes for candidate pools, from exact to compressed, filled shard by shard, sharded over
the GPUs faiss sees, saved to disk and reused when their fingerprint matches.

| kind | faiss factory | bytes per vector (d dims) | search |
|---|---|---|---|
| `flat` | `Flat` | 4d | exact (the reported protocol) |
| `flat-fp16` | `SQfp16` | 2d | exhaustive on float16 vectors |
| `flat-sq8` | `SQ8` | d | exhaustive on 8-bit scalar-quantised vectors |
| `ivf-flat` | `IVF{nlist},Flat` | 4d + 8 | `nprobe` of `nlist` lists |
| `ivf-sq8` | `IVF{nlist},SQ8` | d + 8 | `nprobe` lists, 8-bit scalar quantised |
| `ivf-pq` | `IVF{nlist},PQ{m}np` | m + 8 | `nprobe` lists, product quantised (m bytes) |
| `hnsw` | `HNSW{M},Flat` | 4d + ~8M | graph, beam `ef_search` |
| `hnsw-sq8` | `HNSW{M},SQ8` | d + ~8M | graph on 8-bit vectors |

Every kind but `flat` changes Recall@k (usually lowering it): check against `flat` on a sample before reporting.
`bench/bench_eval.py` measures recall, memory and speed of each; the README gives the recommendation.
"""

import json
import logging
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm


logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "flat-fp16", "flat-sq8", "ivf-flat", "ivf-sq8", "ivf-pq", "hnsw", "hnsw-sq8")
# Kinds faiss runs on GPUs (it has no GPU HNSW, and GPU IVF-PQ takes few code sizes).
GPU_KINDS = ("flat", "flat-fp16", "ivf-flat", "ivf-sq8")
# IVF probes IVF_NPROBE of its ~4*sqrt(n) lists; HNSW links each vector to HNSW_NEIGHBOURS others and searches with a
# beam of HNSW_EF_SEARCH (faiss's common high-recall settings; bench/bench_eval.py measures them).
IVF_NPROBE = 64
HNSW_NEIGHBOURS = 32
HNSW_EF_SEARCH = 128
# k-means wants 39..256 training points per list; 64 keep training within minutes on a million vectors.
IVF_TRAIN_POINTS_PER_LIST = 64
MIN_TRAIN_POINTS_PER_LIST = 39
# IVF-PQ default: one byte per 8 dimensions (192 bytes for 1536 dims, 448 for 3584).
PQ_DIMS_PER_BYTE = 8
# faiss's CPU flat search scores 1,024 candidates per BLAS call by default, which leaves a search of few queries at
# less than half the speed of a plain matmul (bench/bench_eval.py); 16,384 candidates per call catch up, with a
# scratch block of at most 4,096 x 16,384 floats (256 MiB).
FAISS_BLAS_CANDIDATE_BLOCK = 16384
INDEX_META_SUFFIX = ".json"


def import_faiss():
    """faiss, or an `ImportError` saying what to install."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError("Search needs faiss: pip install faiss-cpu (or faiss-gpu) or -e '.[eval]'.") from err
    return faiss


@dataclass
class IndexSpec:
    """An index kind and its parameters, resolved for a pool of `num_vectors` vectors of `dim` dimensions.

    Args:
        kind (`str`, *optional*, defaults to `"flat"`): one of `INDEX_KINDS`.
        nlist (`int`, *optional*): IVF lists; default `4 * sqrt(n)`, at most `n / 39`.
        nprobe (`int`, *optional*, defaults to `IVF_NPROBE`): IVF lists searched per query.
        pq_m (`int`, *optional*): bytes per IVF-PQ code; default `dim / 8` rounded to a divisor of `dim`.
        hnsw_m (`int`, *optional*, defaults to `HNSW_NEIGHBOURS`): HNSW links per vector.
        ef_search (`int`, *optional*, defaults to `HNSW_EF_SEARCH`): HNSW search beam.
    """

    kind: str = "flat"
    num_vectors: int = 0
    dim: int = 0
    nlist: int | None = None
    nprobe: int = IVF_NPROBE
    pq_m: int | None = None
    hnsw_m: int = HNSW_NEIGHBOURS
    ef_search: int = HNSW_EF_SEARCH

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"Unknown index kind {self.kind!r}; use one of {INDEX_KINDS}.")
        for name in ("nprobe", "hnsw_m", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.kind.startswith("ivf") and self.num_vectors:
            if self.nlist is None:
                self.nlist = int(4 * math.sqrt(self.num_vectors))
            self.nlist = max(1, min(self.nlist, self.num_vectors // MIN_TRAIN_POINTS_PER_LIST))
        if self.kind == "ivf-pq" and self.dim:
            if self.pq_m is None:
                self.pq_m = max(d for d in range(1, max(1, self.dim // PQ_DIMS_PER_BYTE) + 1) if self.dim % d == 0)
            if self.dim % self.pq_m:
                raise ValueError(f"pq_m={self.pq_m} must divide the dimension {self.dim}.")

    @property
    def factory(self) -> str:
        """The faiss `index_factory` string."""
        return {"flat": "Flat", "flat-fp16": "SQfp16", "flat-sq8": "SQ8", "ivf-flat": f"IVF{self.nlist},Flat",
                "ivf-sq8": f"IVF{self.nlist},SQ8", "ivf-pq": f"IVF{self.nlist},PQ{self.pq_m}np",
                "hnsw": f"HNSW{self.hnsw_m},Flat", "hnsw-sq8": f"HNSW{self.hnsw_m},SQ8"}[self.kind]

    @property
    def needs_training(self) -> bool:
        return self.kind not in ("flat", "hnsw")

    def search_parameters(self) -> str:
        """faiss `ParameterSpace` settings applied before each search."""
        if self.kind.startswith("ivf"):
            return f"nprobe={min(self.nprobe, self.nlist)}"
        if self.kind.startswith("hnsw"):
            return f"efSearch={self.ef_search}"
        return ""


def index_memory_bytes(spec: IndexSpec) -> int:
    """Estimated memory of a filled index: vectors or codes, ids, centroids and codebooks, HNSW links."""
    n, d = spec.num_vectors, spec.dim
    code = {"flat": 4 * d, "flat-fp16": 2 * d, "flat-sq8": d, "ivf-flat": 4 * d, "ivf-sq8": d, "ivf-pq": spec.pq_m or 0,
            "hnsw": 4 * d, "hnsw-sq8": d}[spec.kind]
    total = n * code
    if spec.kind.startswith("ivf"):
        total += n * 8 + spec.nlist * d * 4  # ids of the inverted lists, centroids
        if spec.kind == "ivf-pq":
            total += 256 * d * 4  # codebooks: m sub-quantisers of 256 centroids of d/m floats
    if spec.kind.startswith("hnsw"):
        # level 0 keeps 2M links, a vector reaches level l >= 1 with probability M^-l and keeps M links there;
        # plus offsets (8 bytes) and levels (4 bytes) per vector
        m = spec.hnsw_m
        total += int(n * (4 * 2 * m + 4 * m / (m - 1) + 12))
    if spec.kind.endswith("sq8"):
        total += 2 * d * 4  # per-dimension ranges
    return int(total)


def _as_float32(chunk) -> np.ndarray:
    if torch.is_tensor(chunk):
        chunk = chunk.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(chunk, dtype=np.float32)


def _chunks(source, chunk_size: int = 65536):
    """(number of rows, dim, a function returning an iterator over float32 row blocks) of a matrix or of an object
    with `chunks()`, `__len__` and `dim` (`encoding.EmbeddingShards`)."""
    if hasattr(source, "chunks"):
        return len(source), source.dim, lambda: (_as_float32(chunk) for chunk in source.chunks())
    matrix = source if torch.is_tensor(source) else np.asarray(source)
    if matrix.ndim != 2:
        raise ValueError(f"Embeddings must be a (n, dim) matrix, got shape {tuple(matrix.shape)}.")
    return matrix.shape[0], matrix.shape[1], \
        lambda: (_as_float32(matrix[start:start + chunk_size]) for start in range(0, matrix.shape[0], chunk_size))


def _training_sample(num_rows: int, chunks, wanted: int) -> np.ndarray:
    """About `wanted` rows taken evenly through the pool (pools are often grouped by dataset: a prefix would not
    represent it)."""
    stride = max(1, num_rows // max(1, wanted))
    sample, seen = [], 0
    for chunk in chunks():
        first = (-seen) % stride
        sample.append(chunk[first::stride])
        seen += len(chunk)
    return np.ascontiguousarray(np.concatenate(sample)[:wanted])


def available_memory() -> int | None:
    """Bytes the kernel can give without swapping (MemAvailable), or `None` where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _use_gpus(faiss, kind: str, use_gpu: bool | None) -> bool:
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu and not gpus:
        raise ValueError("use_gpu=True, but faiss sees no GPU (is faiss-gpu installed?).")
    if use_gpu is None:
        use_gpu = gpus > 0
    if use_gpu and kind not in GPU_KINDS:
        logger.info(f"faiss has no GPU version of a {kind} index; it stays on the CPU")
        return False
    return bool(use_gpu)


def build_index(source, kind: str = "flat", *, use_gpu: bool | None = None, show_progress_bar: bool = False,
                **options):
    """A faiss inner-product index holding `source`: a `(n, dim)` tensor or array, or `EmbeddingShards` read shard
    by shard (the pool is never held whole beside the index).

    `options` are `IndexSpec` fields (`nlist`, `nprobe`, `pq_m`, `hnsw_m`, `ef_search`). The estimated memory is
    logged before anything is allocated (and a warning given when it exceeds the available memory). IVF and SQ
    kinds train on a sample taken evenly through the pool. With GPUs (`use_gpu`, default: when faiss sees any) the
    `GPU_KINDS` are sharded over all of them (`index_cpu_to_all_gpus` with `shard=True`: each holds 1/G of the
    vectors); other kinds stay on the CPU. The search parameters are set on the returned index.
    """
    faiss = import_faiss()
    num_rows, dim, chunks = _chunks(source)
    if num_rows == 0:
        raise ValueError("There are no vectors to index.")
    spec = IndexSpec(kind, num_rows, dim, **options)
    estimate = index_memory_bytes(spec)
    available = available_memory()
    logger.info(f"Building a {kind} index ({spec.factory}) of {num_rows:,} x {dim} vectors: about "
                f"{estimate / 2**30:.2f} GiB" + (f" ({available / 2**30:.1f} GiB available)" if available else ""))
    if available is not None and estimate > available:
        logger.warning(f"The {kind} index needs about {estimate / 2**30:.1f} GiB, more than the "
                       f"{available / 2**30:.1f} GiB available; choose a compressed kind (see the README).")
    on_gpu = _use_gpus(faiss, kind, use_gpu)
    index = faiss.index_factory(dim, "Flat" if on_gpu and kind == "flat-fp16" else spec.factory,
                                faiss.METRIC_INNER_PRODUCT)
    if spec.needs_training and not (on_gpu and kind == "flat-fp16"):
        wanted = min(num_rows, max(IVF_TRAIN_POINTS_PER_LIST * (spec.nlist or 1), 256 * MIN_TRAIN_POINTS_PER_LIST))
        index.train(_training_sample(num_rows, chunks, wanted))
    if on_gpu:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True  # split the vectors over the GPUs instead of copying them to each
        options.useFloat16 = kind == "flat-fp16"
        index = faiss.index_cpu_to_all_gpus(index, co=options)
    with tqdm(total=num_rows, desc=f"Indexing ({kind})", unit="vector", disable=not show_progress_bar) as progress:
        for chunk in chunks():
            index.add(chunk)
            progress.update(len(chunk))
    set_search_parameters(index, spec)
    return index


def set_search_parameters(index, spec: IndexSpec) -> None:
    """Applies `spec`'s nprobe / efSearch through faiss's `ParameterSpace` (which reaches through GPU shards)."""
    faiss = import_faiss()
    if spec.search_parameters():
        space = faiss.GpuParameterSpace() if _is_gpu_index(faiss, index) else faiss.ParameterSpace()
        space.set_index_parameters(index, spec.search_parameters())


def _is_gpu_index(faiss, index) -> bool:
    if not hasattr(faiss, "GpuParameterSpace"):  # faiss-cpu
        return False
    return type(index).__name__ in ("IndexShards", "IndexReplicas") or \
        type(faiss.downcast_index(index)).__name__.startswith("Gpu")


def save_index(index, path, fingerprint: str, spec: IndexSpec) -> None:
    """Writes `index` (moved to the CPU first) to `path` and its fingerprint and spec to `path.json`."""
    faiss = import_faiss()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cpu_index = faiss.index_gpu_to_cpu(index) if _is_gpu_index(faiss, index) else index
    temporary = f"{path}.tmp{os.getpid()}"
    faiss.write_index(cpu_index, temporary)
    os.replace(temporary, path)
    with open(path + INDEX_META_SUFFIX, "w", encoding="utf-8") as f:
        json.dump({"fingerprint": fingerprint, "ntotal": int(index.ntotal), "spec": asdict(spec)}, f, indent=2)


def load_index(path, fingerprint: str, spec: IndexSpec | None = None, use_gpu: bool | None = None, mmap: bool = False):
    """The index saved at `path` when its fingerprint (and kind and build parameters, if `spec` is given) match,
    else `None` with the reason logged. `spec`'s search parameters (nprobe, efSearch) apply to the loaded index.
    `mmap` maps the file instead of reading it (faiss `IO_FLAG_MMAP`)."""
    faiss = import_faiss()
    path = os.fspath(path)
    if not os.path.isfile(path) or not os.path.isfile(path + INDEX_META_SUFFIX):
        return None
    with open(path + INDEX_META_SUFFIX, encoding="utf-8") as f:
        meta = json.load(f)
    saved = IndexSpec(**meta["spec"])
    build_fields = ("kind", "num_vectors", "dim", "nlist", "pq_m", "hnsw_m")
    problem = None
    if meta.get("fingerprint") != fingerprint:
        problem = "it indexes other embeddings (fingerprint mismatch)"
    elif spec is not None and any(getattr(spec, name) != getattr(saved, name) for name in build_fields):
        problem = f"it was built as {saved.factory}, not {spec.factory}"
    if problem:
        logger.warning(f"Not reusing the index {path}: {problem}; rebuilding it.")
        return None
    index = faiss.read_index(path, faiss.IO_FLAG_MMAP if mmap else 0)
    if index.ntotal != meta["ntotal"]:
        logger.warning(f"Not reusing the index {path}: it holds {index.ntotal} vectors, not {meta['ntotal']}.")
        return None
    if spec is not None:
        saved.nprobe, saved.ef_search = spec.nprobe, spec.ef_search
    if _use_gpus(faiss, saved.kind, use_gpu):
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        index = faiss.index_cpu_to_all_gpus(index, co=options)
    logger.info(f"Reusing the {saved.kind} index {path} ({index.ntotal:,} vectors)")
    set_search_parameters(index, saved)
    return index


def load_or_build_index(source, kind: str = "flat", path=None, fingerprint: str | None = None, *,
                        use_gpu: bool | None = None, show_progress_bar: bool = False, **options):
    """The index at `path` when it was saved for the same embeddings (`fingerprint`) and build parameters; else one
    built from `source` and, with `path`, saved there for the next search."""
    num_rows, dim, _ = _chunks(source)
    spec = IndexSpec(kind, num_rows, dim, **options)
    if path is not None:
        if fingerprint is None:
            raise ValueError("An on-disk index needs the fingerprint of the embeddings it holds.")
        index = load_index(path, fingerprint, spec, use_gpu)
        if index is not None:
            return index
    index = build_index(source, kind, use_gpu=use_gpu, show_progress_bar=show_progress_bar, **options)
    if path is not None:
        save_index(index, path, fingerprint, spec)
    return index


def search_index(index, queries, k: int, batch_size: int = 4096, show_progress_bar: bool = False):
    """Top-`k` `(scores, indices)`, each `(num_queries, min(k, index.ntotal))`, best first; approximate indexes
    mark missing results with index -1."""
    faiss = import_faiss()
    queries = _as_float32(queries)
    k = min(k, index.ntotal)
    scores, indices = [], []
    previous_block = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = max(previous_block, FAISS_BLAS_CANDIDATE_BLOCK)
    try:
        for start in tqdm(range(0, len(queries), batch_size), desc="Searching", disable=not show_progress_bar):
            batch_scores, batch_indices = index.search(queries[start:start + batch_size], k)
            scores.append(batch_scores)
            indices.append(batch_indices)
    finally:
        faiss.cvar.distance_compute_blas_database_bs = previous_block  # a process-wide faiss setting
    return np.concatenate(scores), np.concatenate(indices)


def torch_search(queries: torch.Tensor, corpus: torch.Tensor, k: int, chunk_size: int = 65536):
    """Exact top-`k` by inner product with torch (matmul + topk over corpus chunks, merged); the reference that the
    faiss indexes are tested and benchmarked against. Returns `(scores, indices)` tensors."""
    k = min(k, len(corpus))
    best_scores = torch.full((len(queries), 0), -math.inf, dtype=queries.dtype, device=queries.device)
    best_indices = torch.empty((len(queries), 0), dtype=torch.long, device=queries.device)
    for start in range(0, len(corpus), chunk_size):
        scores = queries @ corpus[start:start + chunk_size].T  # (num_queries, chunk)
        top_scores, top_indices = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, top_scores], dim=1)
        merged_indices = torch.cat([best_indices, top_indices + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_indices = merged_indices.gather(1, order)
    return best_scores, best_indices

"""Evaluation benchmark: pool encoding, exact search, index kinds for million-candidate pools, and encoding over
several processes, as `eval_puma.py` runs them.

(a) Pool encoding throughput on the tiny random Qwen2-VL (built offline; CPU): `encode_cached`, which hands each
    shard to the length-bucketed `encode`, vs naive batching (`encode` on consecutive chunks of `batch_size` items in
    the pool's order, each one padded batch). The pool mixes short captions with long passages, in random order, as
    M-BEIR's union pool does. The tiny model has little compute per token, so the ratio understates what bucketing
    saves on a real model; the padded-token ratio is the model-independent part.
(b) Search latency of 100 queries (top-10) against 10^4 and 10^6 random unit vectors of 1536 dimensions (Qwen2-VL-2B's
    hidden size): faiss `IndexFlatIP` (what `puma_eval` uses) vs torch brute force (`puma_eval.index.torch_search`:
    matmul + topk over chunks of 65,536 candidates). Both read the same float32 memory; both are exact, and their
    top-10 ids are compared. A size is skipped, with a note, when the machine lacks the memory for it.
(c) Index kinds (`puma_eval.index.INDEX_KINDS`, the same faiss factory strings) on `--index-size` vectors of
    `--index-dims` dimensions, two kinds of data: random unit vectors (the hardest case: every neighbour is nearly
    as far as any other) and data clustered like real embeddings (a shared mean direction, a power-law spectrum in a
    random basis, `n/50` clusters; queries drawn from the same clusters). The vectors live in a float32 file that is
    memory-mapped and read shard by shard, as `EmbeddingShards` are, so the process holds only the index under test.
    Per kind: Recall@10 relative to flat (the exact top 10) over `--index-queries` queries, the index's size (as
    faiss.write_index writes it: what it holds in memory) beside the estimate `eval_puma.py` prints, build time,
    and search time per query (a batch of `--timed-queries`; median and range of 3 passes). The IVF kinds share one
    coarse quantiser and list assignment per data set (faiss's spherical k-means on 39 points per list, 10
    iterations; its time is added to each IVF kind's build time); HNSW kinds are built on the first `--hnsw-size`
    vectors only, since an HNSW graph of 10^6 vectors takes hours on 2 CPU cores; their recall is then relative to
    flat on that subset. `--nprobe-sweep` searches each IVF index again with more lists probed.
(d) Encoding throughput of `accelerate launch eval_puma.py`'s sharded encoding with 1 process (1 thread, then all
    threads) vs 2 CPU processes (gloo, the threads split between them), on the tiny model: the items/s between the
    first and the last barrier.
Timed passes alternate between the settings compared (other processes on a shared machine then slow both alike);
the best of `--repeats` passes is reported unless said otherwise, and ratios are the median (min-max) of the passes'
ratios (each pass against the baseline's pass of the same round).

    python bench/bench_eval.py                       # (a)-(d); ~45 min on 2 CPU cores, peak ~7 GiB
    python bench/bench_eval.py --sections c --index-dims 3584 --index-size 200000 --hnsw-size 20000
    python bench/bench_eval.py --quick               # smoke run of every section at small sizes
    python bench/bench_eval.py --tiny                # the code path of every section in seconds (test sizes)
    python bench/bench_eval.py --markdown docs/benchmarks/eval.md   # also write the stamped tables there
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from common import ROOT, Report, add_markdown_argument, check, log, ratios, spread, time_interleaved
from puma_eval.encoding import distributed_state, encode_cached, encode_sharded
from puma_eval.index import INDEX_KINDS, MIN_TRAIN_POINTS_PER_LIST, IndexSpec, available_memory, import_faiss, \
    index_memory_bytes, search_index, set_search_parameters, torch_search
from modeling_puma import PumaForEmbedding
from tiny_puma import build_tiny_checkpoint


WORDS = ("the a photo of dog cat man woman red blue green small large two three running sitting on in at with near "
         "beach park street table mat guitar picture image sentence question answer find retrieve shows playing "
         "walking over under quick brown fox lazy jumps everyday caption passage").split()
DIM = 1536
TOP_K = 10
CHUNK = 65536


def make_pool(rng: random.Random, size: int, long_every: int) -> list[dict]:
    """Captions of 3-12 words, with a 150-word passage at random places (1 in `long_every` on average)."""
    lengths = [150 if rng.random() < 1 / long_every else rng.randint(3, 12) for _ in range(size)]
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(n)), "image": None} for n in lengths]


def padded_tokens(lengths: list[int], batch_size: int) -> int:
    chunks = (lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size))
    return sum(len(chunk) * max(chunk) for chunk in chunks)


def bench_encoding(report, args) -> None:
    with tempfile.TemporaryDirectory() as folder:
        log("building the tiny random Qwen2-VL checkpoint")
        checkpoint = build_tiny_checkpoint(folder, "qwen2_vl", "old", 1, seed=0)
        model = PumaForEmbedding.from_pretrained(checkpoint, num_layers=args.layers)
    pool = make_pool(random.Random(0), args.pool_size, args.long_every)
    ids = [f"0:{i}" for i in range(len(pool))]
    tokenizer = model.processor.tokenizer
    lengths = [len(tokenizer(model.build_prompt(item["text"], False))["input_ids"]) for item in pool]
    bs = args.batch_size
    model.encode([item["text"] for item in pool[:bs]], batch_size=bs)  # warm-up

    def naive():
        for start in range(0, len(pool), bs):
            model.encode([item["text"] for item in pool[start:start + bs]], batch_size=bs)

    log(f"(a) encoding {len(pool)} texts of {min(lengths)}-{max(lengths)} tokens, batch {bs}")
    times = time_interleaved({
        "naive": naive,
        "bucketed": lambda: encode_cached(model, pool, ids, batch_size=bs, show_progress_bar=False)}, args.repeats)
    speedup = ratios(times["naive"], times["bucketed"])
    best = {key: min(value) for key, value in times.items()}
    naive_tokens, bucket_tokens = padded_tokens(lengths, bs), padded_tokens(sorted(lengths), bs)
    report.table(f"(a) Pool encoding: tiny random Qwen2-VL (hidden {model.config.text_config.hidden_size}, "
                 f"{args.layers} layers), float32 on CPU, {len(pool)} texts of {min(lengths)}-{max(lengths)} tokens in "
                 f"random order, batch {bs}, best of {args.repeats}",
                 ["batching", "items/s", "padded tokens"], [
                     ["naive (consecutive chunks, given order)", len(pool) / best["naive"], naive_tokens],
                     ["length-bucketed (encode_cached)", len(pool) / best["bucketed"], bucket_tokens],
                     ["ratio bucketed / naive", spread(speedup),
                      f"naive / bucketed {naive_tokens / bucket_tokens:.3f}"]])


def flat_index(size: int, generator: torch.Generator):
    """A faiss IndexFlatIP filled chunk by chunk with random unit vectors, and a zero-copy torch view of its data."""
    faiss = import_faiss()
    index = faiss.IndexFlatIP(DIM)
    for start in range(0, size, CHUNK):
        chunk = torch.nn.functional.normalize(torch.randn(min(CHUNK, size - start), DIM, generator=generator), dim=-1)
        index.add(chunk.numpy())
    corpus = torch.from_numpy(faiss.rev_swig_ptr(index.get_xb(), size * DIM).reshape(size, DIM))
    return index, corpus


def bench_search(report, args) -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, DIM, generator=generator), dim=-1)
    rows = []
    for size in sorted(args.sizes):  # ascending: the previous, smaller index is alive while the next one fills
        needed = size * DIM * 4
        if needed * 1.15 > (available_memory() or 0):
            note = f"skipped: needs {needed / 2**30:.1f} GiB, {(available_memory() or 0) / 2**30:.1f} GiB available"
            log(f"(b) {size} vectors {note}")
            rows.append([f"{size:,}", note, "", "", ""])
            continue
        log(f"(b) search, {size} vectors of {DIM} dimensions, {args.queries} queries")
        index, corpus = flat_index(size, generator)
        results = {}

        def run_faiss():
            results["faiss"] = search_index(index, queries, TOP_K)[1]

        def run_torch():
            results["torch"] = torch_search(queries, corpus, TOP_K, chunk_size=CHUNK)[1].numpy()

        run_faiss(), run_torch()  # warm-up
        times = time_interleaved({"faiss": run_faiss, "torch": run_torch}, args.repeats)
        agreement = float(np.mean(results["faiss"] == results["torch"]))
        rows.append([f"{size:,}", 1000 * min(times["faiss"]), 1000 * min(times["torch"]),
                     spread(ratios(times["torch"], times["faiss"])), check(agreement, 1.0, at_most=False)])
    report.table(f"(b) Exact search: {args.queries} queries, top-{TOP_K}, random unit vectors of {DIM} dimensions, "
                 f"float32 on CPU ({torch.get_num_threads()} threads), best of {args.repeats}",
                 ["candidates", "faiss IndexFlatIP (ms)", "torch matmul+topk (ms)", "ratio torch / faiss",
                  "same top-10 ids"], rows)


# ---------------------------------------------------------------------------------------------------------------- (c)
class ClusteredModel:
    """Unit vectors clustered like real embeddings: x = normalise(mean + centre_c + noise), where centres and noise
    follow a power-law spectrum (variance of the i-th direction ~ i^-1.2) in a random orthonormal basis, and the
    shared mean makes random pairs correlate (cosine ~0.3), as the embeddings of one model do."""

    def __init__(self, dim: int, clusters: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0]  # (dim, dim) orthonormal
        spectrum = torch.arange(1, dim + 1, dtype=torch.float32) ** -0.6
        self.spectrum = spectrum / spectrum.norm()
        self.mean = 0.55 * torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0)
        self.centres = self.shaped(torch.randn(clusters, dim, generator=generator))

    def shaped(self, noise: torch.Tensor) -> torch.Tensor:
        return (noise * self.spectrum) @ self.basis

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        labels = torch.randint(len(self.centres), (n,), generator=generator)
        noise = self.shaped(torch.randn(n, len(self.mean), generator=generator))
        points = self.mean + self.centres[labels] + 0.6 * noise
        return torch.nn.functional.normalize(points, dim=-1)


def make_vectors(path: str, kind: str, n: int, dim: int, queries: int, seed: int = 0):
    """(memory-mapped (n, dim) float32 candidates in `path`, (queries, dim) queries); written once, then reused."""
    model = ClusteredModel(dim, max(1, n // 50), seed) if kind == "clustered" else None
    generator = torch.Generator().manual_seed(seed + 1)

    def sample(count):
        if model is not None:
            return model.sample(count, generator)
        return torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=-1)

    if not os.path.isfile(path) or np.load(path, mmap_mode="r").shape != (n, dim):
        log(f"(c) writing {n:,} {kind} vectors of {dim} dimensions to {path}")
        data = np.lib.format.open_memmap(path + ".tmp.npy", mode="w+", dtype=np.float32, shape=(n, dim))
        for start in range(0, n, CHUNK):
            data[start:start + CHUNK] = sample(min(CHUNK, n - start)).numpy()
        data.flush()
        del data
        os.replace(path + ".tmp.npy", path)
    else:
        for start in range(0, n, CHUNK):  # the same generator state for the queries
            sample(min(CHUNK, n - start))
    return np.load(path, mmap_mode="r"), sample(queries).numpy()


class MappedShards:
    """`EmbeddingShards`' interface (`len`, `dim`, `chunks()`) over a memory-mapped matrix."""

    def __init__(self, data):
        self.data, self.dim = data, data.shape[1]

    def __len__(self):
        return len(self.data)

    def chunks(self):
        for start in range(0, len(self.data), CHUNK):
            yield np.ascontiguousarray(self.data[start:start + CHUNK])


def build_for_bench(shards, spec: IndexSpec, centroids=None, lists=None):
    """The index `puma_eval.index.build_index` builds for `spec` (same factory string and parameters), with the data
    set's shared coarse centroids and list assignments for the IVF kinds."""
    faiss = import_faiss()
    index = faiss.index_factory(spec.dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index) if spec.kind.startswith("ivf") else None
    if ivf is not None:
        ivf.quantizer.add(centroids)  # trained: IVF's train() then trains only the SQ/PQ codes
    if spec.needs_training:
        rows = np.concatenate([chunk[::max(1, len(shards) // 65536)] for chunk in shards.chunks()])[:65536]
        index.train(rows)
    start = 0
    for chunk in shards.chunks():
        if ivf is not None:  # the vectors' lists, computed once per data set
            assigned = np.ascontiguousarray(lists[start:start + len(chunk)])
            ivf.add_core(len(chunk), faiss.swig_ptr(chunk), None, faiss.swig_ptr(assigned))
        else:
            index.add(chunk)
        start += len(chunk)
    set_search_parameters(index, spec)
    return index


def serialized_bytes(index, folder: str) -> int:
    """Size of the index written with faiss.write_index: what it holds in memory (vectors or codes, ids, centroids,
    codebooks, links), without holding a second copy in memory."""
    path = os.path.join(folder, "index.faiss")
    import_faiss().write_index(index, path)
    size = os.path.getsize(path)
    os.remove(path)
    return size


def bench_indexes(report, args) -> None:
    faiss = import_faiss()
    n, dim = args.index_size, args.index_dims
    rows = []
    for data_kind in args.data_kinds:
        path = os.path.join(args.data_dir, f"{data_kind}_{n}x{dim}.npy")
        os.makedirs(args.data_dir, exist_ok=True)
        data, queries = make_vectors(path, data_kind, n, dim, args.index_queries)
        shards = MappedShards(data)
        nlist = IndexSpec("ivf-flat", n, dim, nlist=args.nlist).nlist
        centroids = lists = None
        centroid_time = 0.0
        if any(kind.startswith("ivf") for kind in args.kinds):
            log(f"(c) {data_kind}: k-means of {nlist} coarse centroids")
            start = time.perf_counter()
            sample = np.ascontiguousarray(data[::max(1, n // (MIN_TRAIN_POINTS_PER_LIST * nlist))])
            kmeans = faiss.Kmeans(dim, nlist, niter=10, spherical=True, seed=0)
            kmeans.train(sample)
            del sample
            centroids = kmeans.centroids
            quantizer = faiss.IndexFlatIP(dim)
            quantizer.add(centroids)
            lists = np.concatenate([quantizer.search(chunk, 1)[1][:, 0] for chunk in shards.chunks()])
            centroid_time = time.perf_counter() - start
        truth = {}
        for kind in args.kinds:
            subset = kind.startswith("hnsw") and args.hnsw_size < n
            size = args.hnsw_size if subset else n
            part = MappedShards(data[:size]) if subset else shards
            spec = IndexSpec(kind, size, dim, nprobe=args.nprobe, nlist=args.nlist if kind.startswith("ivf") else None)
            if ("flat", size) not in truth:  # the exact top 10 on these candidates
                reference = build_for_bench(part, IndexSpec("flat", size, dim), None)
                truth[("flat", size)] = search_index(reference, queries, TOP_K)[1]
                del reference
            log(f"(c) {data_kind}: {kind} ({spec.factory}) on {size:,} vectors")
            start = time.perf_counter()
            index = build_for_bench(part, spec, centroids, lists)
            build = time.perf_counter() - start + (centroid_time if kind.startswith("ivf") else 0.0)
            memory = serialized_bytes(index, args.data_dir)
            found = search_index(index, queries, TOP_K)[1]
            exact = truth[("flat", size)]
            recall = float(np.mean([len(set(f) & set(e)) / TOP_K for f, e in zip(found.tolist(), exact.tolist())]))
            times = []
            timed = queries[:args.timed_queries]
            for _ in range(3):
                start = time.perf_counter()
                search_index(index, timed, TOP_K)
                times.append((time.perf_counter() - start) / len(timed) * 1000)
            estimate = index_memory_bytes(spec)
            rows.append([data_kind, kind, f"{size:,}", f"{recall:.4f}", f"{memory / 2**30:.3f}",
                         f"{estimate / 2**30:.3f}", f"{build:.0f}",
                         f"{statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})",
                         f"{index_memory_bytes(IndexSpec(kind, 5_600_000, dim)) / 2**30:.1f}"])
            log("    " + " | ".join(rows[-1]))
            for nprobe in args.nprobe_sweep if kind.startswith("ivf") else ():  # the same index, more lists probed
                swept = IndexSpec(kind, size, dim, nprobe=nprobe, nlist=spec.nlist)
                set_search_parameters(index, swept)
                found = search_index(index, queries, TOP_K)[1]
                recall = float(np.mean([len(set(f) & set(e)) / TOP_K for f, e in zip(found.tolist(), exact.tolist())]))
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    search_index(index, timed, TOP_K)
                    times.append((time.perf_counter() - start) / len(timed) * 1000)
                timing = f"{statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})"
                rows.append([data_kind, f"{kind}, nprobe {nprobe}", f"{size:,}", f"{recall:.4f}", *rows[-1][4:7],
                             timing, rows[-1][8]])
                log("    " + " | ".join(rows[-1]))
            del index
        del data, shards
    report.table(f"(c) Index kinds: {n:,} candidates of {dim} dimensions, {args.index_queries} queries, top-{TOP_K}, "
                 f"nlist {nlist}, nprobe {args.nprobe}, float32 on CPU ({torch.get_num_threads()} threads)",
                 ["data", "index", "candidates", "Recall@10 vs flat", "memory (GiB)", "estimate (GiB)", "build (s)",
                  "search (ms/query, median (range) of 3)", "estimate at 5.6 M (GiB)"], rows)


# ---------------------------------------------------------------------------------------------------------------- (d)
def encode_worker(args) -> None:
    """Runs under `accelerate launch`: encodes the benchmark pool with the sharded cache, prints items/s."""
    from modeling_puma import PumaForEmbedding

    state = distributed_state()
    model = PumaForEmbedding.from_pretrained(args.worker_checkpoint, num_layers=args.layers)
    pool = make_pool(random.Random(0), args.pool_size, args.long_every)
    ids = [f"0:{i}" for i in range(len(pool))]
    model.encode([item["text"] for item in pool[:args.batch_size]], batch_size=args.batch_size)  # warm-up
    state.wait_for_everyone()
    start = time.perf_counter()
    encode_sharded(model, pool, ids, args.worker_cache, batch_size=args.batch_size, shard_size=args.batch_size,
                   show_progress_bar=False)
    elapsed = time.perf_counter() - start  # encode_sharded returns after its final barrier
    if state.is_main_process:
        print(json.dumps({"processes": state.num_processes, "items_per_s": len(pool) / elapsed}))


def bench_processes(report, args) -> None:
    from tiny_puma import build_tiny_checkpoint

    cores = os.cpu_count() or 2
    settings = [(1, 1), (1, cores), (2, max(1, cores // 2))]  # (processes, threads per process)
    if args.tiny and cores > 1:  # the code path: one process and two (one process on every core runs the same code)
        settings.remove((1, cores))
    results = {setting: [] for setting in settings}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = build_tiny_checkpoint(os.path.join(folder, "tiny"), "qwen2_vl", "old", 1, seed=0)
        for repeat in range(args.repeats):
            for processes, threads in settings:
                cache = os.path.join(folder, f"cache-{processes}-{threads}-{repeat}")
                launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(processes)]
                if processes > 1:
                    launch.append("--multi_gpu")
                command = launch + [os.path.abspath(__file__), "--encode-worker", "--worker-checkpoint", checkpoint,
                                    "--worker-cache", cache, "--pool-size", str(args.pool_size), "--layers",
                                    str(args.layers), "--batch-size", str(args.batch_size)]
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
                output = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
                results[(processes, threads)].append(json.loads(output.strip().splitlines()[-1])["items_per_s"])
                speed = results[(processes, threads)][-1]
                log(f"(d) {processes} process(es) x {threads} thread(s): {speed:.1f} items/s")
    base = results[settings[0]]
    report.table(f"(d) Sharded encoding under accelerate launch: {args.pool_size} texts, tiny model ({args.layers} "
                 f"layers), batch {args.batch_size}, {cores} CPU cores, best of {args.repeats}",
                 ["processes x threads", "items/s (best)", "all passes", "ratio to 1 x 1"],
                 [[f"{p} x {t}", max(results[(p, t)]), str([round(x, 1) for x in results[(p, t)]]),
                   spread(ratios(results[(p, t)], base))] for p, t in settings])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="abcd", help="which sections to run, e.g. 'c' or 'ad'")
    parser.add_argument("--pool-size", type=int, default=512, help="texts in the encoded pool of (a) and (d)")
    parser.add_argument("--long-every", type=int, default=8, help="one long passage per this many texts, on average")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2, help="kept layers of the tiny model (it has 6)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000], help="candidate counts of (b)")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--index-size", type=int, default=1_000_000, help="candidates of (c)")
    parser.add_argument("--index-dims", type=int, default=DIM, help="dimensions of (c)")
    parser.add_argument("--index-queries", type=int, default=1000, help="queries of (c)")
    parser.add_argument("--timed-queries", type=int, default=200, help="queries per timed search pass of (c)")
    parser.add_argument("--hnsw-size", type=int, default=50_000, help="candidates of the HNSW kinds in (c)")
    parser.add_argument("--nprobe", type=int, default=64, help="IVF lists searched per query in (c)")
    parser.add_argument("--nprobe-sweep", type=int, nargs="*", default=[128, 256],
                        help="further nprobe values searched on each IVF index of (c)")
    parser.add_argument("--kinds", nargs="+", default=list(INDEX_KINDS), choices=INDEX_KINDS, help="index kinds of (c)")
    parser.add_argument("--data-kinds", nargs="+", default=["clustered", "random"], choices=["clustered", "random"],
                        help="data sets of (c)")
    parser.add_argument("--nlist", type=int, help="IVF lists in (c) (default: 4*sqrt(n), as eval_puma.py)")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "puma_bench_eval"),
                        help="where (c) keeps its generated vectors (float32 files, reused by the next run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per setting (best reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small pools and indexes, one pass")
    parser.add_argument("--tiny", action="store_true",
                        help="the code path of every section in seconds: test-sized pools and indexes, one pass")
    add_markdown_argument(parser)
    parser.add_argument("--encode-worker", action="store_true", help=argparse.SUPPRESS)  # (d)'s launched processes
    parser.add_argument("--worker-checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--worker-cache", help=argparse.SUPPRESS)
    return parser


def main(args) -> None:
    if args.quick:
        args.pool_size, args.sizes, args.repeats = 64, [10_000, 100_000], 1
        args.index_size, args.index_queries, args.hnsw_size = 20_000, 100, 5_000
    if args.tiny:
        args.pool_size, args.batch_size, args.sizes, args.queries, args.repeats = 16, 8, [1_000], 10, 1
        args.index_size, args.index_dims, args.index_queries, args.timed_queries = 2_000, 32, 20, 10
        args.hnsw_size, args.nlist, args.nprobe, args.nprobe_sweep = 500, 8, 2, [4]
    report = Report(args.markdown, "Evaluation benchmark")
    sections = {"a": bench_encoding, "b": bench_search, "c": bench_indexes, "d": bench_processes}
    for section, bench in sections.items():
        if section in args.sections:
            bench(report, args)
    report.write()


if __name__ == "__main__":
    arguments = make_parser().parse_args()
    if arguments.encode_worker:
        encode_worker(arguments)
    else:
        main(arguments)

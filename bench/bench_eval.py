"""Evaluation benchmark: pool encoding and candidate search, as `eval_puma.py` runs them.

(a) Pool encoding throughput on the tiny random Qwen2-VL (built offline; CPU): `encode_cached`, which hands each
    shard to the length-bucketed `encode`, vs naive batching (`encode` on consecutive chunks of `batch_size` items in
    the pool's order, each one padded batch). The pool mixes short captions with long passages, in random order, as
    M-BEIR's union pool does. The tiny model has little compute per token, so the ratio understates what bucketing
    saves on a real model; the padded-token ratio is the model-independent part.
(b) Search latency of 100 queries (top-10) against 10^4 and 10^6 random unit vectors of 1536 dimensions (Qwen2-VL-2B's
    hidden size): faiss `IndexFlatIP` (what `eval_puma` uses) vs torch brute force (`eval_puma.torch_search`: matmul +
    topk over chunks of 65,536 candidates). Both read the same float32 memory; both are exact, and their top-10 ids
    are compared. A size is skipped, with a note, when the machine lacks the memory for it.
Timed passes alternate between the settings compared (other processes on a shared machine then slow both alike);
the best of `--repeats` passes is reported.

    /work/venv/bin/python bench/bench_eval.py            # ~3 min on 2 CPU cores, ~6.5 GB RAM for 10^6 vectors
    /work/venv/bin/python bench/bench_eval.py --quick    # smoke run: small pool, 10^4 and 10^5 vectors
"""

import argparse
import random
import tempfile

import numpy as np
import torch

from common import check, log, markdown_table, time_interleaved
from puma_eval.encoding import encode_cached
from puma_eval.index import import_faiss as _import_faiss, search_index, torch_search
from modeling_puma import PumaForEmbedding
from tiny_qwen2vl import build_tiny_qwen2vl


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


def bench_encoding(args) -> None:
    with tempfile.TemporaryDirectory() as folder:
        log("building the tiny random Qwen2-VL checkpoint")
        checkpoint = build_tiny_qwen2vl(folder, "old", 1, seed=0)
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
    times = {key: min(value) for key, value in times.items()}
    naive_tokens, bucket_tokens = padded_tokens(lengths, bs), padded_tokens(sorted(lengths), bs)
    speedup = times["naive"] / times["bucketed"]
    print(f"\n### (a) Pool encoding: tiny random Qwen2-VL (hidden {model.config.text_config.hidden_size}, "
          f"{args.layers} layers), float32 on CPU, {len(pool)} texts of {min(lengths)}-{max(lengths)} tokens in random "
          f"order, batch {bs}, best of {args.repeats}\n")
    print(markdown_table(["batching", "items/s", "padded tokens"], [
        ["naive (consecutive chunks, given order)", len(pool) / times["naive"], naive_tokens],
        ["length-bucketed (encode_cached)", len(pool) / times["bucketed"], bucket_tokens],
        ["ratio bucketed / naive", speedup, f"naive / bucketed {naive_tokens / bucket_tokens:.3f}"]]))


def available_memory() -> int:
    """Bytes the kernel can give without swapping (MemAvailable), or 0 where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def flat_index(size: int, generator: torch.Generator):
    """A faiss IndexFlatIP filled chunk by chunk with random unit vectors, and a zero-copy torch view of its data."""
    faiss = _import_faiss()
    index = faiss.IndexFlatIP(DIM)
    for start in range(0, size, CHUNK):
        chunk = torch.nn.functional.normalize(torch.randn(min(CHUNK, size - start), DIM, generator=generator), dim=-1)
        index.add(chunk.numpy())
    corpus = torch.from_numpy(faiss.rev_swig_ptr(index.get_xb(), size * DIM).reshape(size, DIM))
    return index, corpus


def bench_search(args) -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, DIM, generator=generator), dim=-1)
    rows = []
    for size in sorted(args.sizes):  # ascending: the previous, smaller index is alive while the next one fills
        needed = size * DIM * 4
        if needed * 1.15 > available_memory():
            note = f"skipped: needs {needed / 2**30:.1f} GiB, {available_memory() / 2**30:.1f} GiB available"
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
        times = {key: min(value) for key, value in time_interleaved({"faiss": run_faiss, "torch": run_torch},
                                                                    args.repeats).items()}
        agreement = float(np.mean(results["faiss"] == results["torch"]))
        rows.append([f"{size:,}", 1000 * times["faiss"], 1000 * times["torch"], times["torch"] / times["faiss"],
                     check(agreement, 1.0, at_most=False)])
    print(f"\n### (b) Exact search: {args.queries} queries, top-{TOP_K}, random unit vectors of {DIM} dimensions, "
          f"float32 on CPU ({torch.get_num_threads()} threads), best of {args.repeats}\n")
    print(markdown_table(["candidates", "faiss IndexFlatIP (ms)", "torch matmul+topk (ms)", "ratio torch / faiss",
                          "same top-10 ids"], rows))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool-size", type=int, default=512, help="texts in the encoded pool of (a)")
    parser.add_argument("--long-every", type=int, default=8, help="one long passage per this many texts, on average")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2, help="kept layers of the tiny model (it has 6)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000], help="candidate counts of (b)")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per setting (best reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 texts, 10^4 and 10^5 vectors, one pass")
    return parser


if __name__ == "__main__":
    arguments = make_parser().parse_args()
    if arguments.quick:
        arguments.pool_size, arguments.sizes, arguments.repeats = 64, [10_000, 100_000], 1
    bench_encoding(arguments)
    bench_search(arguments)

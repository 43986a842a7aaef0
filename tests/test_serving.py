"""The serving recipe without vLLM: the export's chat template renders `build_prompt`'s prompt for every preset, its
`puma_recipe.json` and Matryoshka sizes, and `client_puma` (image preparation as `encode`'s, truncation, batching,
retries and refusals) against a stand-in server on loopback. tests/test_vllm.py runs the same against vLLM."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer

import client_puma
import hub_puma
from client_puma import EmbeddingRequestError, EmbeddingsClient, ServingRecipe
from modeling_puma import PumaForEmbedding, build_prompt, load_image, resize_image


TEXTS = [None, "a red circle", '  "a quoted text "  ', "ends with a question?", "two\r\nlines", "ßtraße lower",
         "{text} and {instruction} in braces"]
INSTRUCTIONS = [None, "", "Find an image that matches the given caption", "检索相符的图片。", " spaced out ! ",
                "«quoted»", '"q"', "   "]


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, embedder_checkpoints, tmp_path_factory):
    """`{preset: (model, export folder)}`: PUMA's recipe on Qwen2-VL (with Matryoshka sizes), Qwen3-VL-Embedding's
    and GME's."""
    root = tmp_path_factory.mktemp("serving")
    models = {"puma": PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2, matryoshka_dims=[16, 32, 64]),
              "qwen3_vl_embedding": PumaForEmbedding.from_pretrained(embedder_checkpoints["qwen3_vl_embedding"],
                                                                     num_layers=2),
              "gme": PumaForEmbedding.from_pretrained(embedder_checkpoints["gme"], num_layers=2)}
    out = {}
    for preset, model in models.items():
        assert model.config.preset == preset
        model.save_pretrained(root / preset)
        out[preset] = (model, Path(hub_puma.export_plain_checkpoint(root / preset, root / f"{preset}-export",
                                                                    license="apache-2.0")))
    return out


def messages(text, has_image, instruction):
    content = ([{"type": "image"}] if has_image else []) + ([{"type": "text", "text": text}] if text is not None else [])
    return ([{"role": "system", "content": instruction}] if instruction is not None else []) + [
        {"role": "user", "content": content}]


@pytest.mark.parametrize("preset", ["puma", "qwen3_vl_embedding", "gme"])
def test_export_chat_template_renders_build_prompt_cut_after_the_pooled_token(exports, preset):
    # Given the export's tokenizer (its chat template, as vLLM renders it through transformers)
    model, export = exports[preset]
    tokenizer = AutoTokenizer.from_pretrained(export)
    for text in TEXTS:
        for has_image in (False, True):
            for instruction in INSTRUCTIONS:
                # When an input is rendered from its messages
                try:
                    want = hub_puma._cut_after_pooled_token(build_prompt(model.config, text, has_image, instruction),
                                                            model.config)
                except ValueError as err:  # neither text nor image
                    with pytest.raises(Exception, match="neither text nor image"):
                        tokenizer.apply_chat_template(messages(text, has_image, instruction), tokenize=False)
                    assert "neither text nor image" in str(err)
                    continue
                got = tokenizer.apply_chat_template(messages(text, has_image, instruction), tokenize=False)
                # Then it is the recipe's prompt, character for character
                assert got == want, (preset, text, has_image, instruction)


@pytest.mark.parametrize("preset", ["puma", "qwen3_vl_embedding"])
def test_template_text_only_and_prepared_text_let_a_client_truncate_as_build_prompt(exports, preset):
    model, export = exports[preset]
    tokenizer = AutoTokenizer.from_pretrained(export)
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
    model.config.max_text_tokens, limit = 50, model.config.max_text_tokens  # a limit the text exceeds
    try:
        want = hub_puma._cut_after_pooled_token(
            build_prompt(model.config, long_text, True, "Find it", model.processor.tokenizer), model.config)
        recipe_text = tokenizer.apply_chat_template(messages(long_text, True, "Find it"), tokenize=False,
                                                    text_only=True)
        cut = tokenizer.decode(tokenizer(recipe_text, add_special_tokens=False)["input_ids"][:50])
        got = tokenizer.apply_chat_template(messages(cut, True, "Find it"), tokenize=False, prepared_text=True)
    finally:
        model.config.max_text_tokens = limit
    assert got == want


def test_unservable_requests_are_refused_by_the_template(exports):
    _, export = exports["puma"]
    tokenizer = AutoTokenizer.from_pretrained(export)
    refused = {
        "an assistant turn": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        "two images": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}],
        "a video": [{"role": "user", "content": [{"type": "video"}]}],
        "two user turns": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    }
    for label, conversation in refused.items():
        with pytest.raises(Exception, match="embedding"):
            tokenizer.apply_chat_template(conversation, tokenize=False)


def test_recipe_file_and_matryoshka_sizes_travel_with_the_export(exports):
    model, export = exports["puma"]
    recipe = json.loads((export / "puma_recipe.json").read_text())
    config = json.loads((export / "config.json").read_text())
    assert config["matryoshka_dimensions"] == [16, 32, 64]
    assert recipe["vllm"]["pooler_config"] == {"pooling_type": "LAST", "use_activation": True}
    assert recipe["vllm"]["hf_overrides"] is None and recipe["vllm"]["tested_version"] == hub_puma.TESTED_VLLM
    assert ServingRecipe.from_file(export) == ServingRecipe(28, model.config.min_pixels, model.config.max_pixels,
                                                            model.config.max_text_tokens, [16, 32, 64], 64)
    gme = json.loads((exports["gme"][1] / "puma_recipe.json").read_text())
    assert gme["vllm"]["hf_overrides"] == {"text_config": {"rope_parameters": {"mrope_section": None}}}
    assert "matryoshka_dimensions" not in json.loads((exports["gme"][1] / "config.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# The client's image preparation is encode's
# ---------------------------------------------------------------------------------------------------------------
def test_client_smart_resize_is_transformers_smart_resize():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for height in (10, 28, 57, 240, 333, 1000, 4000):
        for width in (10, 45, 224, 500, 3000):
            for low, high in ((4 * 784, 300 * 784), (256 * 784, 1280 * 784)):
                if max(height, width) / min(height, width) > 200:  # both refuse
                    with pytest.raises(ValueError, match="aspect ratio"):
                        client_puma.smart_resize(height, width, 28, low, high)
                    continue
                assert client_puma.smart_resize(height, width, 28, low, high) == smart_resize(
                    height, width, factor=28, min_pixels=low, max_pixels=high), (height, width, low, high)


def test_client_fits_images_as_encode_resizes_them(exports, images, tmp_path):
    model, export = exports["puma"]
    recipe = ServingRecipe.from_file(export)
    rgba = Image.new("RGBA", (50, 70), (255, 0, 0, 128))
    rgba.save(tmp_path / "transparent.png")
    palette = images[0].convert("P")
    sources = [*images, tmp_path / "transparent.png", palette, (tmp_path / "transparent.png").read_bytes()]
    for source in sources:
        fitted = client_puma.fit_image(client_puma.open_image(source), recipe)
        reference = resize_image(load_image(source if not isinstance(source, bytes) else tmp_path / "transparent.png"),
                                 model.config)
        assert fitted.size == reference.size and fitted.tobytes() == reference.tobytes()


def test_client_parses_inputs_by_encodes_rules_and_refuses_urls(tmp_path, images):
    images[0].save(tmp_path / "a.png")
    assert client_puma.parse_input("a red circle") == ("a red circle", None)
    text, image = client_puma.parse_input({"text": "cap", "image": str(tmp_path / "a.png")})
    assert text == "cap" and image.size == images[0].size
    with pytest.raises(ValueError, match="URL"):
        client_puma.parse_input("https://example.com/cat.jpg")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        client_puma.parse_input("missing.jpg")
    with pytest.raises(ValueError, match="empty string"):
        client_puma.parse_input("  ")
    with pytest.raises(ValueError, match="not a readable image"):
        client_puma.parse_input(b"not an image")


# ---------------------------------------------------------------------------------------------------------------
# The client's requests, batching, retries and refusals, against a stand-in server
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def stand_in():
    """A loopback server answering `/v1/models` and `/v1/embeddings` (vector = [index of the conversation, its
    message count]); `state["fail"]` lists statuses to answer first, `state["bodies"]` records the requests."""
    state = {"fail": [], "bodies": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.answer(200, {"data": [{"id": "served-model"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["bodies"].append(body)
            if state["fail"]:
                status = state["fail"].pop(0)
                return self.answer(status, {"error": {"message": f"refused with {status}"}})
            if self.path == "/tokenize":  # one token per character of the texts, plus ten for the template
                texts = [part.get("text", "") for message in body["messages"] for part in
                         (message["content"] if isinstance(message["content"], list)
                          else [{"text": message["content"]}])]
                return self.answer(200, {"tokens": list(range(sum(map(len, texts)) + 10))})
            if "input" in body:  # token-id prompts: vector = [index, prompt length]
                return self.answer(200, {"data": [{"index": i, "embedding": [float(i), float(len(ids))]}
                                                  for i, ids in enumerate(body["input"])]})
            conversations = body["messages"] if isinstance(body["messages"][0], list) else [body["messages"]]
            self.answer(200, {"data": [{"index": i, "embedding": [float(i), float(len(c))]}
                                       for i, c in enumerate(conversations)]})

        def answer(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", state
    server.shutdown()
    server.server_close()


RECIPE = ServingRecipe(image_factor=28, min_pixels=3136, max_pixels=235200, max_text_tokens=450,
                       matryoshka_dims=[32, 64])


def test_client_batches_by_count_and_sends_the_recipe_request(stand_in, images):
    url, state = stand_in
    client = EmbeddingsClient(url, RECIPE, batch_size=2, backoff=0)
    vectors = client.embed(["a", "b", images[0], {"text": "c", "image": images[1]}, "d"], instruction="Find it",
                           is_query=True, dimensions=32)
    assert len(state["bodies"]) == 3 and [len(b["messages"]) for b in state["bodies"]][-1] == 2  # 2, 2, 1 inputs
    assert [v[0] for v in vectors] == [0, 1, 0, 1, 0]  # each answer back in its input's place
    body = state["bodies"][0]
    assert body["model"] == "served-model" and body["add_special_tokens"] is True and body["dimensions"] == 32
    assert body["messages"][0][0] == {"role": "system", "content": "Find it"}
    image_body = state["bodies"][1]["messages"][0][1]["content"][0]
    assert image_body["type"] == "image_url" and image_body["image_url"]["url"].startswith("data:image/png;base64,")
    # documents carry no instruction
    client.embed(["a"], instruction="Find it")
    assert state["bodies"][-1]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "a"}]}]


def test_client_cuts_prompts_over_max_prompt_tokens_into_token_ids_and_refuses_them_with_an_image(stand_in, images):
    # Given a recipe that truncates the whole prompt (Qwen3-VL-Embedding's and GME's published truncation)
    url, state = stand_in
    recipe = ServingRecipe(image_factor=28, min_pixels=3136, max_pixels=235200, max_text_tokens=None,
                           max_prompt_tokens=300)
    client = EmbeddingsClient(url, recipe, model="served-model", backoff=0)
    # When a short and a long text are embedded
    vectors = client.embed(["short", "x" * 400, "also short"])
    # Then the long one travels as its rendered ids cut to the limit, the short ones as messages, answers in order
    id_requests = [body for body in state["bodies"] if "input" in body]
    assert [len(ids) for body in id_requests for ids in body["input"]] == [300]
    assert vectors[1] == [0.0, 300.0] and vectors[0] == [0.0, 1.0] and vectors[2] == [1.0, 1.0]
    # and a long text beside an image cannot travel cut: refused, naming the input
    with pytest.raises(ValueError, match=r"inputs\[1\].*max_prompt_tokens=300"):
        client.embed(["short", {"text": "y" * 400, "image": images[0]}])


def test_client_retries_5xx_and_raises_4xx_with_the_servers_message(stand_in):
    url, state = stand_in
    client = EmbeddingsClient(url, RECIPE, model="served-model", max_retries=2, backoff=0)
    state["fail"] = [503, 500]
    assert client.embed("a") == [0.0, 1.0]
    assert len(state["bodies"]) == 3  # two refusals, then the answer
    state["fail"] = [400]
    with pytest.raises(EmbeddingRequestError, match="refused with 400") as refused:
        client.embed("a")
    assert refused.value.status == 400 and len(state["bodies"]) == 4  # no retry
    state["fail"] = [503, 503, 503]
    with pytest.raises(EmbeddingRequestError, match="failed 3 times"):
        client.embed("a")
    with pytest.raises(ValueError, match="not a trained Matryoshka size"):
        client.embed("a", dimensions=48)


def test_client_retries_a_refused_connection_then_names_it():
    client = EmbeddingsClient("http://127.0.0.1:9", RECIPE, model="m", max_retries=1, backoff=0)  # discard port
    with pytest.raises(EmbeddingRequestError, match="failed 2 times; last: Connect") as failed:
        client.embed("a")
    assert failed.value.status is None

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""A client of vLLM's OpenAI-compatible `/v1/embeddings` serving a PUMA export (`hub_puma.export_plain_checkpoint`),
whose answers equal `PumaForEmbedding.encode`'s.

The export's chat template renders the recipe's prompt (instruction placement and formatting, vision tokens, suffix,
the prompt cut after the pooled token) from a request's messages; this client applies what a template cannot: images
are opened as `encode` opens them (EXIF rotation, transparency on white, RGB) and resized with PIL bicubic onto the
recipe's grid, so that the server's processor leaves them as they are (or resizes them further exactly as `encode`'s
does); texts longer than the recipe's token limit are truncated with the server's own tokenizer. It batches inputs
by count and retries connection errors and 5xx answers with exponential backoff; a 4xx answer raises at once with
the server's message.

    python -m vllm.entrypoints.openai.api_server --model puma-export --runner pooling --convert embed \\
        --pooler-config '{"pooling_type": "LAST", "use_activation": true}' --dtype float32      # vLLM's CPU build

    from client_puma import EmbeddingsClient

    client = EmbeddingsClient("http://localhost:8000", recipe="puma-export")   # the export folder (puma_recipe.json)
    queries = client.embed(["a dog on a beach"], instruction="Find an image that matches the given caption.",
                           is_query=True)
    documents = client.embed(["photo.jpg", {"text": "a red car", "image": "car.png"}])   # lists of floats

Only the standard library, httpx and PIL are imported: the client runs where torch is not installed.
"""

import base64
import io
import json
import logging
import math
import os
import struct
import time
from dataclasses import dataclass

import httpx


logger = logging.getLogger(__name__)

RECIPE_FILE = "puma_recipe.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
URL_PREFIXES = ("http://", "https://", "ftp://", "s3://", "gs://", "hf://")
RETRY_STATUSES = (429, 500, 502, 503, 504)


class EmbeddingRequestError(RuntimeError):
    """The server refused a request (4xx) or kept failing after the retries; `status` is its HTTP status (`None` for
    a connection that never succeeded) and the message holds the server's own."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class ServingRecipe:
    """What the client applies itself, from an export's `puma_recipe.json` (`hub_puma.serving_recipe`).

    Args:
        image_factor (`int`): image sides are multiples of it (vision patch size times merge size).
        min_pixels (`int`), max_pixels (`int`): the pixel range images are resized into first.
        max_text_tokens (`int`, *optional*): longer texts (instruction merged, where the recipe merges it) are
            truncated before the suffix (PUMA's recipe); `None`: not.
        max_prompt_tokens (`int`, *optional*): the whole tokenised prompt is truncated on the right to this many
            tokens (Qwen3-VL-Embedding's and GME's published truncation); `None`: not.
        matryoshka_dims (`list[int]`, *optional*): the trained sizes a request's `dimensions` may take.
        hidden_size (`int`, *optional*): the full embedding size.
    """

    image_factor: int
    min_pixels: int
    max_pixels: int
    max_text_tokens: int | None
    matryoshka_dims: list[int] | None = None
    hidden_size: int | None = None
    max_prompt_tokens: int | None = None

    @classmethod
    def from_file(cls, path) -> "ServingRecipe":
        """Reads `puma_recipe.json`, or the one in the export folder `path`."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, RECIPE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path!r} does not exist; pass the export folder or its {RECIPE_FILE} "
                                    "(hub_puma.export_plain_checkpoint writes it).")
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        fields = ("image_factor", "min_pixels", "max_pixels", "max_text_tokens", "matryoshka_dims", "hidden_size",
                  "max_prompt_tokens")
        return cls(**{name: values.get(name) for name in fields})


# ----------------------------------------------------------------------------------------------------------------
# Images: opened, rotated, flattened and resized as `encode` does (modeling_puma.load_image, resize_image)
# ----------------------------------------------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's target size (transformers' `smart_resize`): each side a multiple of `factor`, the pixel count in
    `[min_pixels, max_pixels]`, the aspect ratio kept as closely as that allows."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"An image of {width}x{height} has an aspect ratio over 200, which Qwen-VL cannot take.")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def open_image(image, name: str = "image"):
    """An RGB `PIL.Image` of a path, a `PIL.Image` or an image file's bytes (a downloaded URL's content): EXIF-rotated,
    transparency composited on white. URLs are refused (download them first); PIL's pixel limit applies."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, (bytes, bytearray)):
        source = io.BytesIO(image)
    elif isinstance(image, (str, os.PathLike)):
        source = os.fspath(image)
        if source.strip().lower().startswith(URL_PREFIXES):
            raise ValueError(f"{name}: {source!r} is a URL; URLs are not fetched. Download the image and pass its "
                             "path or bytes.")
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{name}: image file {source!r} does not exist (to embed this string as text, "
                                    "pass {'text': ...}).")
    elif isinstance(image, Image.Image):
        source = None
    else:
        raise ValueError(f"{name} must be a path, a PIL.Image or bytes, got {type(image).__name__}.")
    if source is not None:
        try:
            opened = Image.open(source)
            opened.load()
        except Image.DecompressionBombError as err:
            raise ValueError(f"{name} exceeds PIL's pixel limit ({err}).") from err
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"{name} is not a readable image ({err}).") from err
        image = opened
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def fit_image(image, recipe: ServingRecipe):
    """`image` (RGB) resized with PIL bicubic onto the recipe's grid and pixel range, unchanged if already there."""
    from PIL import Image

    height, width = smart_resize(image.height, image.width, recipe.image_factor, recipe.min_pixels,
                                 recipe.max_pixels)
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), resample=Image.BICUBIC)


def image_data_url(image) -> str:
    """A lossless PNG `data:` URL of a PIL image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def parse_input(item, index: int = 0) -> tuple[str | None, object]:
    """`(text, image)` of one input, by `encode`'s rules: a `str` naming a file or looking like an image path is an
    image, other strings are text; `{"text", "image"}` dicts; PIL images, paths and bytes are images."""
    from PIL import Image

    name = f"inputs[{index}]"
    if isinstance(item, dict):
        unknown = set(item) - {"text", "image"}
        if unknown:
            raise ValueError(f"{name} has unknown keys {sorted(unknown)}; use 'text' and/or 'image'.")
        text, image = item.get("text"), item.get("image")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{name}['text'] must be a string, got {type(text).__name__}.")
        if text is None and image is None:
            raise ValueError(f"{name} has neither 'text' nor 'image'.")
        return text, open_image(image, name) if image is not None else None
    if isinstance(item, (Image.Image, os.PathLike, bytes, bytearray)):
        return None, open_image(item, name)
    if isinstance(item, str):
        if not item.strip():
            raise ValueError(f"{name} is an empty string.")
        stripped = item.strip()
        looks_like_path = "\n" not in stripped and len(stripped) < 4096 and stripped.lower().endswith(IMAGE_SUFFIXES)
        if os.path.isfile(item) or stripped.lower().startswith(URL_PREFIXES) or looks_like_path:
            return None, open_image(item, name)
        return item, None
    raise ValueError(f"{name} has unsupported type {type(item).__name__}; use str, PIL.Image, a path, bytes or a "
                     "dict.")


# ----------------------------------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------------------------------
class EmbeddingsClient:
    """Embeds texts, images and image+text pairs through a vLLM server of a PUMA export, as `encode` would.

    Args:
        base_url (`str`): the server, e.g. `"http://localhost:8000"`.
        recipe (`str`, `os.PathLike` or `ServingRecipe`): the export folder (or its `puma_recipe.json`).
        model (`str`, *optional*): the served model name. Default: the first model the server lists.
        batch_size (`int`, *optional*, defaults to 32): inputs per request.
        max_retries (`int`, *optional*, defaults to 4): retries of a request after a connection error or a 5xx/429
            answer, waiting `backoff`, `2 * backoff`, ... seconds between them.
        backoff (`float`, *optional*, defaults to 0.5): the first wait, in seconds.
        timeout (`float`, *optional*, defaults to 120): seconds per request.
        api_key (`str`, *optional*): sent as a bearer token (the server's `--api-key`).
    """

    def __init__(self, base_url: str, recipe, model: str | None = None, batch_size: int = 32, max_retries: int = 4,
                 backoff: float = 0.5, timeout: float = 120.0, api_key: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if max_retries < 0 or backoff < 0:
            raise ValueError(f"max_retries and backoff must not be negative, got {max_retries} and {backoff}.")
        self.recipe = recipe if isinstance(recipe, ServingRecipe) else ServingRecipe.from_file(recipe)
        self.batch_size, self.max_retries, self.backoff = batch_size, max_retries, backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)
        self._model = model

    @property
    def model(self) -> str:
        """The served model name (asked once from `/v1/models` when not given)."""
        if self._model is None:
            models = self._request("GET", "/v1/models")["data"]
            if not models:
                raise EmbeddingRequestError("The server lists no model.")
            self._model = models[0]["id"]
        return self._model

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------------------------
    def embed(self, inputs, *, instruction: str | None = None, is_query: bool = False,
              dimensions: int | None = None) -> list[list[float]]:
        """Embeds `inputs` (a list of texts, images — paths, PIL images, image bytes — and `{"text", "image"}`
        dicts; a single item gives a single vector) as `encode(inputs, instruction=..., is_query=...,
        truncate_dim=dimensions)` does: L2-normalised, `dimensions` a Matryoshka size the model was trained at.
        """
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        if not items:
            raise ValueError("inputs is an empty list; there is nothing to embed.")
        if dimensions is not None and self.recipe.matryoshka_dims and dimensions not in self.recipe.matryoshka_dims:
            raise ValueError(f"dimensions={dimensions} is not a trained Matryoshka size {self.recipe.matryoshka_dims}.")
        instruction = instruction if is_query else None
        messages = [self.messages(*parse_input(item, index), instruction) for index, item in enumerate(items)]
        prepared = [self._truncated(message) for message in messages]
        token_ids = [self._prompt_ids(message, index) for index, message in enumerate(messages)]
        results = [None] * len(items)
        cut = [i for i, ids in enumerate(token_ids) if ids is not None]
        for start in range(0, len(cut), self.batch_size):  # prompts cut by the recipe travel as token ids
            batch = cut[start:start + self.batch_size]
            for index, vector in zip(batch, self.embed_token_ids([token_ids[i] for i in batch], dimensions)):
                results[index] = vector
        prepared = [None if ids is not None else p for p, ids in zip(prepared, token_ids)]
        for kind in (False, True):  # texts placed as they are travel in requests of their own
            indices = [i for i, p in enumerate(prepared) if (p is not None) == kind and token_ids[i] is None]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                vectors = self.embed_messages([prepared[i] if kind else messages[i] for i in batch], dimensions,
                                              prepared_text=kind)
                for index, vector in zip(batch, vectors):
                    results[index] = vector
        return results[0] if single else results

    def messages(self, text: str | None, image, instruction: str | None = None) -> list[dict]:
        """The request messages of one input: the instruction as the system message, the image (fitted, as a PNG
        data URL) and the text as the user message."""
        content = []
        if image is not None:
            content.append({"type": "image_url", "image_url": {"url": image_data_url(fit_image(image, self.recipe))}})
        if text:
            content.append({"type": "text", "text": text})
        if not content:
            raise ValueError("An input has neither text nor image.")
        # an empty instruction is still an instruction (GME keeps an empty system turn)
        system = [{"role": "system", "content": instruction}] if instruction is not None else []
        return system + [{"role": "user", "content": content}]

    # ------------------------------------------------------------------------------------------------------------
    def _truncated(self, messages: list[dict]) -> list[dict] | None:
        """The messages with the recipe's text cut to `max_text_tokens` tokens (placed as is, `prepared_text`), or
        `None` when no cut is needed. A byte-level BPE token covers at least one byte, so a text of fewer bytes than
        the limit is never cut and costs no request."""
        if self.recipe.max_text_tokens is None:
            return None
        if _text_bytes(messages) + 8 <= self.recipe.max_text_tokens:
            return None
        rendered = self._request("POST", "/tokenize", {
            "model": self.model, "messages": [_text_only(m) for m in messages], "add_generation_prompt": False,
            "add_special_tokens": False, "chat_template_kwargs": {"text_only": True}})["tokens"]
        if len(rendered) <= self.recipe.max_text_tokens:
            return None
        text = self._request("POST", "/detokenize", {"model": self.model,
                                                     "tokens": rendered[: self.recipe.max_text_tokens]})["prompt"]
        user = messages[-1]
        images = [part for part in user["content"] if part.get("type") != "text"]
        system = [message for message in messages if message["role"] == "system"]
        return system + [{"role": "user", "content": images + [{"type": "text", "text": text}]}]

    def _prompt_ids(self, messages: list[dict], index: int) -> list[int] | None:
        """The token ids of the rendered prompt cut to `max_prompt_tokens` (as `encode`'s processor cuts it: special
        tokens added, then the right end dropped), or `None` when no cut is needed. A template cannot count tokens
        and the server's own truncation keeps the left end, so the client sends the cut ids. An input with an image
        whose prompt needs the cut raises: its ids cannot travel without the image."""
        limit = self.recipe.max_prompt_tokens
        image_tokens = sum(_image_tokens(part, self.recipe.image_factor) for part in messages[-1]["content"])
        if limit is None or _text_bytes(messages) + image_tokens + 256 <= limit:  # a template adds < 256 tokens
            return None
        ids = self._request("POST", "/tokenize", {
            "model": self.model, "messages": [_text_only(m) for m in messages], "add_generation_prompt": False,
            "add_special_tokens": True})["tokens"]
        if len(ids) + image_tokens <= limit:
            return None
        if image_tokens:
            raise ValueError(f"inputs[{index}]: its prompt ({len(ids) + image_tokens} tokens with the image) passes "
                             f"the recipe's max_prompt_tokens={limit}, which encode truncates on the right; a server "
                             "request cannot carry that cut with an image. Shorten the text.")
        return ids[:limit]

    def embed_token_ids(self, prompts: list[list[int]], dimensions: int | None = None) -> list[list[float]]:
        """The embeddings of prompts given as token ids (already rendered and cut), in one request."""
        body = {"model": self.model, "input": prompts, "encoding_format": "float"}
        if dimensions is not None:
            body["dimensions"] = dimensions
        return self._embeddings(body, len(prompts))

    def embed_messages(self, conversations: list[list[dict]], dimensions: int | None = None,
                       prepared_text: bool = False) -> list[list[float]]:
        """The embeddings of prepared conversations (`messages` of each input) in one request; `prepared_text`:
        their texts are final (merged, formatted, truncated), placed as they are."""
        body = {"model": self.model, "messages": conversations if len(conversations) > 1 else conversations[0],
                "encoding_format": "float", "add_special_tokens": True}
        if prepared_text:
            body["chat_template_kwargs"] = {"prepared_text": True}
        if dimensions is not None:
            body["dimensions"] = dimensions
        return self._embeddings(body, len(conversations))

    def _embeddings(self, body: dict, count: int) -> list[list[float]]:
        """The `count` embeddings of one `/v1/embeddings` request, in input order."""
        data = self._request("POST", "/v1/embeddings", body)["data"]
        if len(data) != count:
            raise EmbeddingRequestError(f"The server returned {len(data)} embeddings for {count} inputs.")
        return [row["embedding"] for row in sorted(data, key=lambda row: row["index"])]

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One request with retries; returns the JSON answer."""
        for attempt in range(self.max_retries + 1):
            try:
                response = self.http.request(method, path, json=body)
            except (httpx.TransportError,) as err:  # refused, reset, timed out: the server may be starting
                problem, status = f"{type(err).__name__}: {err}", None
            else:
                if response.status_code < 400:
                    return response.json()
                problem, status = f"HTTP {response.status_code}: {_server_message(response)}", response.status_code
                if status not in RETRY_STATUSES:
                    raise EmbeddingRequestError(f"{method} {path} was refused ({problem}).", status)
            if attempt < self.max_retries:
                wait = self.backoff * 2 ** attempt
                logger.warning(f"{method} {path} failed ({problem}); retrying in {wait:g} s")
                time.sleep(wait)
        raise EmbeddingRequestError(f"{method} {path} failed {self.max_retries + 1} times; last: {problem}.", status)


def _text_bytes(messages: list[dict]) -> int:
    """UTF-8 bytes of the messages' texts: a byte-level BPE token covers at least one byte, so no text of fewer
    bytes than a token limit passes it."""
    texts = [part.get("text") or "" for message in messages for part in
             (message["content"] if isinstance(message["content"], list) else [{"text": message["content"]}])]
    return sum(len(text.encode("utf-8")) for text in texts)


def _image_tokens(part: dict, factor: int) -> int:
    """Tokens of a fitted image sent as a PNG data URL (its size read from the PNG header): one per merged patch."""
    if not isinstance(part, dict) or part.get("type") != "image_url":
        return 0
    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1][:44])
    width, height = struct.unpack(">II", data[16:24])
    return (width // factor) * (height // factor)


def _text_only(message: dict) -> dict:
    """A message without its image parts (the tokenizer endpoint then needs no image)."""
    if isinstance(message["content"], str):
        return message
    return {**message, "content": [part for part in message["content"] if part.get("type") == "text"]}


def _server_message(response) -> str:
    """The error message of a server's answer (vLLM's `{"error": {"message": ...}}` or a plain body)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:500]


__all__ = ["EmbeddingRequestError", "EmbeddingsClient", "ServingRecipe", "fit_image", "open_image", "parse_input",
           "smart_resize"]

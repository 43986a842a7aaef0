# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Inference Endpoints handler of a PUMA repository: JSON in, embedding vectors out.

Request: `{"inputs": INPUT or [INPUT, ...], "parameters": {...}}`, where an INPUT is

- a text string;
- an image: a `data:image/...;base64,` URI, or a bare base64 string of an image file (recognised by its signature);
- a video or a one-page PDF: a `data:video/...;base64,` or `data:application/pdf;base64,` URI, or a bare base64
  string of the file (recognised by its signature: MP4/MOV, WebM/MKV, AVI; PDF);
- `{"text": ..., "image": ...}`, `{"text": ..., "video": ..., "fps": ..., "max_frames": ...}` or
  `{"text": ..., "pdf": ..., "page": n}` (pages numbered from 1), the text optional, the file given as base64 or a
  data URI.

Parameters, under `"parameters"` or at the top level: `instruction` (a task instruction; it makes the inputs
queries), `is_query` (default: whether an instruction is given) and `truncate_dim` (keep that many leading dimensions,
renormalised). The answer is a list of embedding vectors (lists of floats), one per input, or `{"error": "..."}`.

URLs (http/https) of images, videos and PDFs are fetched only when the endpoint sets `PUMA_ALLOW_IMAGE_URLS=1`.
`PUMA_MAX_IMAGE_BYTES` (default 20 MiB), `PUMA_MAX_VIDEO_BYTES` (100 MiB), `PUMA_MAX_PDF_BYTES` (50 MiB) bound each
file and `PUMA_MAX_IMAGE_PIXELS` (default 40 megapixels) each image, video frame and rendered page. Videos and PDFs
are written to a temporary folder removed after the request; decoding them needs PyAV (`av`) and pypdfium2 in the
endpoint's requirements. Texts are never read as file paths. This file imports only the standard library, PIL and
transformers.
"""

import base64
import binascii
import io
import logging
import os
import re
import tempfile
import urllib.request

from PIL import Image, UnidentifiedImageError
from transformers import AutoModel


logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_VIDEO_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_PDF_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
URL_TIMEOUT_S = 10
PARAMETERS = ("instruction", "is_query", "truncate_dim")
INPUT_KEYS = ("text", "image", "video", "pdf", "page", "fps", "max_frames")
# data URI media type -> the kind of file it holds
_DATA_URI = re.compile(r"^data:(?P<type>image/[\w.+-]+|video/[\w.+-]+|application/pdf);base64,(?P<data>.*)$",
                       re.DOTALL)
_IMAGE_URL = re.compile(r"^https?://\S+\.(?:jpe?g|png|gif|bmp|tiff?|webp)(?:[?#]\S*)?$", re.IGNORECASE)
_MEDIA_URL = re.compile(r"^https?://\S+\.(?:mp4|webm|mkv|mov|avi|m4v|pdf)(?:[?#]\S*)?$", re.IGNORECASE)
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
# A bare base64 string shorter than this is a text: no image file is that small.
_MIN_BASE64_IMAGE_CHARS = 64


class RequestError(ValueError):
    """A bad request; its message is returned to the client."""


class EndpointHandler:
    """Loads the PUMA model of the repository at `path` and embeds the inputs of each request.

    Args:
        path (`str`): the repository folder (Inference Endpoints passes it).
        max_image_bytes, max_image_pixels (`int`, *optional*): per-image limits; default from `PUMA_MAX_IMAGE_BYTES`
            and `PUMA_MAX_IMAGE_PIXELS` (which bounds video frames and rendered PDF pages too).
        max_video_bytes, max_pdf_bytes (`int`, *optional*): per-file limits; default from `PUMA_MAX_VIDEO_BYTES` and
            `PUMA_MAX_PDF_BYTES`.
        allow_image_urls (`bool`, *optional*): fetch http(s) image URLs; default from `PUMA_ALLOW_IMAGE_URLS`.
    """

    def __init__(self, path: str = "", *, max_image_bytes: int | None = None, max_image_pixels: int | None = None,
                 allow_image_urls: bool | None = None, max_video_bytes: int | None = None,
                 max_pdf_bytes: int | None = None):
        # "auto": the first GPU in bfloat16 when there is one, else the CPU in float32
        self.model = AutoModel.from_pretrained(path or ".", trust_remote_code=True, device_map="auto").eval()
        environ = os.environ
        self.max_image_bytes = max_image_bytes or int(environ.get("PUMA_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES))
        self.max_video_bytes = max_video_bytes or int(environ.get("PUMA_MAX_VIDEO_BYTES", DEFAULT_MAX_VIDEO_BYTES))
        self.max_pdf_bytes = max_pdf_bytes or int(environ.get("PUMA_MAX_PDF_BYTES", DEFAULT_MAX_PDF_BYTES))
        self.max_image_pixels = max_image_pixels or int(environ.get("PUMA_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS))
        if allow_image_urls is None:
            allow_image_urls = os.environ.get("PUMA_ALLOW_IMAGE_URLS", "").lower() in ("1", "true", "yes")
        self.allow_image_urls = allow_image_urls

    def __call__(self, data: dict) -> list[list[float]] | dict[str, str]:
        """Embeds the request's inputs; a bad request gets `{"error": message}`, never a traceback."""
        try:
            with tempfile.TemporaryDirectory(prefix="puma-request-") as folder:
                self._files = folder  # where the request's videos and PDFs are written, removed after it
                items, options = self._parse_request(data)
                embeddings = self.model.encode(items, max_image_pixels=self.max_image_pixels, **options)
        except (ValueError, ImportError) as err:  # a RequestError, an input `encode` refuses, a decoder missing
            return {"error": str(err)}
        except Exception as err:  # the client gets a message, the endpoint log gets the traceback
            logger.exception("PUMA handler failed")
            return {"error": f"Internal error while embedding ({type(err).__name__}); see the endpoint logs."}
        return embeddings.tolist()

    # ----------------------------------------------------------------------------------------------------------------
    # Request parsing
    # ----------------------------------------------------------------------------------------------------------------
    def _parse_request(self, data) -> tuple[list[dict], dict]:
        """The `encode` inputs (always dicts, so no text is read as a path; videos and PDFs as files the handler
        wrote) and options."""
        if not isinstance(data, dict):
            raise RequestError(f"The request must be a JSON object with an 'inputs' key, got {type(data).__name__}.")
        unknown = set(data) - {"inputs", "parameters", *PARAMETERS}
        if unknown:
            raise RequestError(f"Unknown request keys {sorted(unknown)}; use 'inputs' and 'parameters' "
                               f"(with {', '.join(PARAMETERS)}).")
        if "inputs" not in data:
            raise RequestError("The request has no 'inputs': send {\"inputs\": \"a text\"} or a list of inputs.")
        inputs = data["inputs"]
        if isinstance(inputs, list):
            if not inputs:
                raise RequestError("'inputs' is an empty list; there is nothing to embed.")
            items = [self._parse_input(item, f"inputs[{i}]") for i, item in enumerate(inputs)]
        else:
            items = [self._parse_input(inputs, "inputs")]
        return items, self._parse_parameters(data)

    def _parse_parameters(self, data: dict) -> dict:
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise RequestError(f"'parameters' must be an object, got {type(parameters).__name__}.")
        unknown = set(parameters) - set(PARAMETERS)
        if unknown:
            raise RequestError(f"Unknown parameters {sorted(unknown)}; the handler takes {', '.join(PARAMETERS)}.")
        both = sorted(set(parameters) & set(data))
        if both:
            raise RequestError(f"{both} given both at the top level and under 'parameters'; give each once.")
        options = {**{key: data[key] for key in PARAMETERS if key in data}, **parameters}

        instruction = options.get("instruction")
        if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
            raise RequestError(f"'instruction' must be a non-empty string, got {instruction!r}.")
        is_query = options.get("is_query", instruction is not None)
        if not isinstance(is_query, bool):
            raise RequestError(f"'is_query' must be true or false, got {is_query!r}.")
        if instruction is not None and not is_query:
            raise RequestError("'instruction' applies to queries only; drop it or set 'is_query' to true.")
        truncate_dim = options.get("truncate_dim")
        hidden_size = self.model.config.text_config.hidden_size
        if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                         or not 0 < truncate_dim <= hidden_size):
            raise RequestError(f"'truncate_dim' must be an integer in 1..{hidden_size} (the embedding size), "
                               f"got {truncate_dim!r}.")
        return {"instruction": instruction, "is_query": is_query, "truncate_dim": truncate_dim}

    def _parse_input(self, item, where: str) -> dict:
        if isinstance(item, str):
            if not item.strip():
                raise RequestError(f"{where} is an empty string.")
            media = self._media_of_string(item, where)
            return {"text": item} if media is None else media
        if isinstance(item, dict):
            unknown = set(item) - set(INPUT_KEYS)
            if unknown:
                raise RequestError(f"{where} has unknown keys {sorted(unknown)}; use 'text' and at most one of "
                                   "'image', 'video' (with 'fps', 'max_frames') or 'pdf' (with 'page').")
            text = item.get("text")
            given = [key for key in ("image", "video", "pdf") if item.get(key) is not None]
            if text is None and not given:
                raise RequestError(f"{where} has neither 'text' nor 'image', 'video' or 'pdf'.")
            if text is not None and (not isinstance(text, str) or not text.strip()):
                raise RequestError(f"{where}['text'] must be a non-empty string, got {text!r}.")
            if len(given) > 1:
                raise RequestError(f"{where} has {' and '.join(given)}; an input holds one of them.")
            parsed = {"text": text} if text is not None else {}
            for key in given:
                value = item[key]
                if not isinstance(value, str):
                    raise RequestError(f"{where}[{key!r}] must be a base64 string or a data URI, got "
                                       f"{type(value).__name__}.")
                kind, raw = self._file_bytes(value, f"{where}[{key!r}]", key)
                parsed.update(self._media(raw, key, f"{where}[{key!r}]"))
            # sampling and page numbers as encode reads them (it checks their values)
            parsed.update({key: item[key] for key in ("page", "fps", "max_frames") if item.get(key) is not None})
            return parsed
        raise RequestError(f"{where} must be a string or an object with 'text' and 'image', 'video' or 'pdf', got "
                           f"{type(item).__name__}.")

    def _media_of_string(self, item: str, where: str) -> dict | None:
        """The `encode` input of a bare string naming an image, video or PDF (a data URI, a URL of one, or base64
        of one by its signature), or `None` when it is a text."""
        if item.startswith("data:") or _IMAGE_URL.match(item) or _MEDIA_URL.match(item):
            kind, raw = self._file_bytes(item, where, None)
            return self._media(raw, kind, where)
        if len(item) >= _MIN_BASE64_IMAGE_CHARS and not any(c.isspace() for c in item):
            try:
                raw = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                return None
            kind = _kind_of(raw)
            if kind is not None:
                self._check_bytes(len(raw), where, kind)
                return self._media(raw, kind, where)
        return None

    def _media(self, raw: bytes, kind: str, where: str) -> dict:
        """`{"image": PIL image}`, or `{"video" | "pdf": path}` of the bytes written to the request's folder."""
        if kind == "image":
            return {"image": self._open_image(raw, where)}
        suffix = ".pdf" if kind == "pdf" else _video_suffix(raw)
        path = os.path.join(self._files, re.sub(r"[^\w]+", "-", where).strip("-") + suffix)
        with open(path, "wb") as f:
            f.write(raw)
        return {kind: path}

    def _file_bytes(self, value: str, where: str, kind: str | None) -> tuple[str, bytes]:
        """`(kind, bytes)` of a data URI, base64 string or (when allowed) http(s) URL; `kind` (image, video or pdf)
        is the key the value came under, else read from the data URI, the URL's suffix or the bytes' signature."""
        if value.startswith(("http://", "https://")):
            kind = kind or ("pdf" if value.lower().split("?")[0].endswith(".pdf") else
                            "video" if _MEDIA_URL.match(value) else "image")
            return kind, self._fetch(value, where, kind)
        if value.startswith("data:"):
            match = _DATA_URI.match(value)
            if match is None:
                raise RequestError(f"{where} is a data URI but not 'data:image/<type>;base64,<data>' (or video/<type>, "
                                   "application/pdf).")
            uri_kind = {"image": "image", "video": "video", "application": "pdf"}[match.group("type").split("/")[0]]
            if kind is not None and uri_kind != kind:
                raise RequestError(f"{where} is a data URI of {match.group('type')}, not of a {kind}.")
            kind, value = uri_kind, match.group("data")
        kind = kind or "image"
        value = "".join(value.split())  # base64 wrapped in lines (MIME style)
        self._check_bytes(len(value) * 3 // 4, where, kind)
        try:
            return kind, base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(f"{where} is not valid base64 ({err}).") from None

    def _fetch(self, url: str, where: str, kind: str = "image") -> bytes:
        if not self.allow_image_urls:
            raise RequestError(f"{where} is an {kind if kind != 'pdf' else 'PDF'} URL; this endpoint does not fetch "
                               "URLs (set PUMA_ALLOW_IMAGE_URLS=1 to allow it). Send the file as base64 or a data URI.")
        try:
            with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
                raw = response.read(self._max_bytes(kind) + 1)
        except OSError as err:
            raise RequestError(f"{where}: could not fetch {url!r} ({err}).") from None
        self._check_bytes(len(raw), where, kind)
        return raw

    def _max_bytes(self, kind: str) -> int:
        return {"image": self.max_image_bytes, "video": self.max_video_bytes, "pdf": self.max_pdf_bytes}[kind]

    def _check_bytes(self, size: int, where: str, kind: str = "image") -> None:
        if size > self._max_bytes(kind):
            raise RequestError(f"{where} is over the {kind if kind != 'pdf' else 'PDF'} size limit of "
                               f"{self._max_bytes(kind)} bytes.")

    def _open_image(self, raw: bytes, where: str) -> Image.Image:
        """Opens an image, checking its pixel count before decoding it (decompression bombs)."""
        try:
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > self.max_image_pixels:
                raise RequestError(f"{where} has {image.width}x{image.height} pixels, over the limit of "
                                   f"{self.max_image_pixels}.")
            image.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise RequestError(f"{where} is not a readable image ({err}).") from None
        except Image.DecompressionBombError as err:
            raise RequestError(f"{where} is over PIL's decompression-bomb limit ({err}).") from None
        return image


def _kind_of(raw: bytes) -> str | None:
    """"image", "video" or "pdf" by a file's signature, or `None`."""
    if raw.startswith(_IMAGE_SIGNATURES) or (raw[:4] == b"RIFF" and raw[8:12] == b"WEBP"):
        return "image"
    if raw.startswith(b"%PDF-"):
        return "pdf"
    if raw[4:8] == b"ftyp" or raw.startswith(b"\x1a\x45\xdf\xa3") or (raw[:4] == b"RIFF" and raw[8:12] == b"AVI "):
        return "video"
    return None


def _video_suffix(raw: bytes) -> str:
    """A file suffix for video bytes, by their signature (the decoder reads the content either way)."""
    if raw.startswith(b"\x1a\x45\xdf\xa3"):
        return ".webm" if b"webm" in raw[:64] else ".mkv"
    if raw[:4] == b"RIFF":
        return ".avi"
    return ".mp4"

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""The embedding cache: items encoded shard by shard into fingerprinted safetensors files, resumable after an
interruption, with the missing shards split between the processes of `accelerate launch`.

    shards = encode_sharded(model, items, ids, "cache", name="pool")   # EmbeddingShards, read lazily
    embeddings = encode_cached(model, items, ids, "cache", name="pool")  # one (n, dim) tensor
"""

import hashlib
import json
import logging
import os
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from mbeir_puma import checkpoint_fingerprint, join_path, repeated_ids

from .tasks import SHOWN_IDS


logger = logging.getLogger(__name__)


def distributed_state():
    """accelerate's `PartialState` for this process, distributed over CPU processes too.

    `PartialState()` alone reads neither `accelerate launch --cpu` (the `ACCELERATE_USE_CPU` variable, which only
    `AcceleratorState` reads) nor the absence of any accelerator: on a machine without a GPU each launched process
    would see itself as the only one and encode the whole pool. Asking for the CPU in those two cases makes the
    processes one gloo group (or MPI under mpirun).
    """
    try:
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
    except ImportError as err:
        raise ImportError("Evaluation needs accelerate: pip install accelerate (or pip install -e '.[eval]').") from err
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accelerator)


def model_fingerprint(model) -> str:
    """Hash of what determines the model's embeddings: its configuration (kept layers, prompts, pixel limits),
    dtype and attention, the engine (vLLM: `vllm_engine.VllmEmbedder`) and, for a local checkpoint folder, the content of its files
    (`mbeir_puma.checkpoint_fingerprint`)."""
    from modeling_puma import attn_implementation

    digest = hashlib.sha256()
    digest.update(model.config.to_json_string(use_diff=False).encode())
    digest.update(f"{model.dtype}|{attn_implementation(model.config)}".encode())
    if getattr(model, "engine", None):  # another engine's kernels round differently: its own cache
        digest.update(f"|{model.engine} {model.version}".encode())
    if os.path.isdir(model.name_or_path):
        digest.update(json.dumps(checkpoint_fingerprint(model.name_or_path), sort_keys=True).encode())
    return digest.hexdigest()


def image_fingerprint(image) -> str | None:
    """What identifies an item's image in `items_fingerprint`: its path; for an image held in memory (a PIL image,
    as a `datasets` Image column decodes it, or such a column's undecoded `{"bytes", "path"}` dict) the SHA-256 of
    its content, so that equal images give equal fingerprints in any process."""
    if image is None or isinstance(image, str):
        return image
    if isinstance(image, os.PathLike):
        return os.fspath(image)
    if isinstance(image, dict) and ("bytes" in image or "path" in image):
        content = image.get("bytes")
        return "sha256:" + hashlib.sha256(content).hexdigest() if content else image.get("path")
    if hasattr(image, "tobytes") and hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image
        digest = hashlib.sha256(f"{image.mode}|{image.size}|".encode())
        digest.update(image.tobytes())
        return "pixels:" + digest.hexdigest()
    raise TypeError(f"Cannot fingerprint an image of type {type(image).__name__}; give a path, a PIL image or a "
                    "datasets image dict.")


def media_fingerprint(item: dict) -> list:
    """What identifies an item's video or PDF page in `items_fingerprint`: `[]` for an item without either (so
    that the fingerprints of texts and images stay as they were), else the video's path (frames: each frame's
    `image_fingerprint`) or the PDF's path and page."""
    video, pdf = item.get("video"), item.get("pdf")
    if video is not None:
        if isinstance(video, (str, os.PathLike)):
            return ["video", os.fspath(video)]
        return ["video", [_frame_fingerprint(frame) for frame in video]]
    if pdf is not None:
        return ["pdf", os.fspath(pdf), item.get("page")]
    return []


def _frame_fingerprint(frame) -> str:
    """A frame's `image_fingerprint`; for an array or tensor, the SHA-256 of its shape and bytes."""
    if isinstance(frame, (str, os.PathLike, dict)) or hasattr(frame, "mode"):
        return image_fingerprint(frame)
    array = frame.detach().cpu().numpy() if torch.is_tensor(frame) else frame
    return f"array:{tuple(array.shape)}:" + hashlib.sha256(array.tobytes()).hexdigest()


def items_fingerprint(ids: list[str], items: list[dict], instructions: list[str | None]) -> str:
    """Hash of exactly what is encoded: ids, texts, images (`image_fingerprint`), videos and PDF pages
    (`media_fingerprint`) and each item's instruction."""
    digest = hashlib.sha256()
    for item_id, item, instruction in zip(ids, items, instructions):
        digest.update(json.dumps([item_id, item.get("text"), image_fingerprint(item.get("image")),
                                  instruction, *media_fingerprint(item)]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _shard_problem(path: str, expected_ids: list[str], fingerprint: str, dim: int) -> str | None:
    """Why the shard at `path` cannot be used (absent, unreadable, another fingerprint, ids or shape); `None` if it
    can. Reads the header only: validating a 5.6 M-candidate cache must not read its 34 GB."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        return "absent"
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            shape = tuple(f.get_slice("embeddings").get_shape())
        ids = json.loads(metadata.get("ids", "null"))
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as err:
        return f"unreadable ({err})"
    if metadata.get("fingerprint") != fingerprint:
        return "from another model, input set or setting (fingerprint mismatch)"
    if ids != expected_ids:
        return "holding other ids than expected"
    if shape != (len(expected_ids), dim):
        return f"of shape {shape} instead of {(len(expected_ids), dim)}"
    return None


def _write_shard(path: str, embeddings: torch.Tensor, ids: list[str], fingerprint: str,
                 dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file

    if not torch.isfinite(embeddings).all():
        bad = [ids[i] for i in (~torch.isfinite(embeddings).all(dim=1)).nonzero().flatten().tolist()]
        raise ValueError(f"The model produced non-finite embeddings for {bad[:SHOWN_IDS]} (shard {path}).")
    temporary = f"{path}.tmp{os.getpid()}"
    save_file({"embeddings": embeddings.to(dtype or embeddings.dtype).contiguous()}, temporary,
              metadata={"fingerprint": fingerprint, "ids": json.dumps(ids)})
    os.replace(temporary, path)  # a shard is complete or absent, never half-written


def encode_input(item: dict, image_root: str | None = None) -> dict:
    """The `encode` input of a `{"text", "image" | "video" | "pdf" (and "page")}` item, its paths resolved against
    `image_root`."""
    def resolved(value):
        return join_path(image_root, value) if isinstance(value, str) else value

    out = {"text": item.get("text"), "image": resolved(item.get("image"))}
    if item.get("video") is not None:
        out["video"] = resolved(item["video"])
    if item.get("pdf") is not None:
        out.update(pdf=resolved(item["pdf"]), page=item.get("page"))
    return out


def encode_items(model, items: list[dict], instructions: list[str | None] | None = None, is_query: bool = False,
                 batch_size: int = 16, image_root: str | None = None, normalize: bool = True) -> torch.Tensor:
    """Embeds `items` (`{"text", "image" | "video" | "pdf" (and "page")}` dicts) in their order,
    `(len(items), hidden_size)` float32, L2-normalised unless `normalize=False` (the raw pooled states a distillation
    teacher provides); `encode` takes one instruction per call, so items are grouped by it."""
    instructions = instructions if instructions is not None else [None] * len(items)
    groups = {}
    for index, instruction in enumerate(instructions):
        groups.setdefault(instruction, []).append(index)
    out = torch.empty(len(items), model.config.text_config.hidden_size)
    for instruction, indices in groups.items():
        inputs = [encode_input(items[i], image_root) for i in indices]
        out[indices] = model.encode(inputs, instruction=instruction, is_query=is_query, batch_size=batch_size,
                                    normalize=normalize, show_progress_bar=False)
    return out


class EmbeddingShards:
    """The embeddings of an id list, shard by shard: cached safetensors files read on demand, or tensors in memory.

    Attributes: `ids`, `dim`, `fingerprint` (of model, items, instructions, side and shard size), `folder` (the
    cache folder, `None` without a cache) and `bounds` (each shard's `(start, end)` rows).
    """

    def __init__(self, ids, dim, bounds, fingerprint, folder, in_memory=None):
        self.ids, self.dim, self.bounds, self.fingerprint, self.folder = ids, dim, bounds, fingerprint, folder
        self._in_memory = {} if in_memory is None else in_memory

    def __len__(self) -> int:
        return len(self.ids)

    def shard_path(self, index: int) -> str:
        return os.path.join(self.folder, f"shard-{index:05d}.safetensors")

    def shard(self, index: int) -> torch.Tensor:
        """Shard `index`, `(rows, dim)` float32; a cached shard that turns out unreadable or non-finite is removed
        (so that a rerun re-encodes it) and raises."""
        if index in self._in_memory:
            return self._in_memory[index]
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.shard_path(index)
        try:
            embeddings = load_file(path)["embeddings"]
            problem = None if torch.isfinite(embeddings).all() else "holds non-finite values"
        except (SafetensorError, OSError, KeyError, RuntimeError) as err:
            problem = f"is unreadable ({err})"
        if problem is None and tuple(embeddings.shape) == (self.bounds[index][1] - self.bounds[index][0], self.dim):
            return embeddings
        if os.path.exists(path):
            os.remove(path)
        raise RuntimeError(f"Embedding shard {path} {problem or 'changed shape'} (was it written by another "
                           "process on a file system this one does not share?); removed it: rerun to re-encode it.")

    def mapped(self, index: int):
        """Shard `index` of the cache as a read-only numpy array mapped from its file (`(rows, dim)`; bfloat16 shards
        as `uint16`, to view as `torch.bfloat16`): rows are read from disk when indexed, so a cache larger than
        memory can be looked up row by row (the teacher cache)."""
        return map_safetensors(self.shard_path(index), "embeddings")

    def chunks(self) -> Iterator[torch.Tensor]:
        """Every shard in order: what an index is filled from without holding the whole pool in memory."""
        for index in range(len(self.bounds)):
            yield self.shard(index)

    def tensor(self) -> torch.Tensor:
        """All rows, `(len(ids), dim)`."""
        return torch.cat(list(self.chunks()))


def encode_sharded(model, items: list[dict], ids: list[str], cache_dir=None, *, name: str = "items",
                   is_query: bool = False, instructions: list[str | None] | None = None, image_root=None,
                   batch_size: int = 16, shard_size: int = 1024, show_progress_bar: bool = True,
                   on_shard=None, normalize: bool = True, dtype: torch.dtype | None = None) -> EmbeddingShards | None:
    """Embeds `items` (`{"text", "image" | "video" | "pdf"}` dicts, paths relative to `image_root`) shard by shard.

    With `cache_dir`, each shard of `shard_size` items is written to
    `cache_dir/name/<fingerprint>/shard-NNNNN.safetensors` with its ids and fingerprint (model, items, instructions,
    query/candidate side, shard size). Valid shards are reused, so an interrupted run resumes at the first missing
    shard; unreadable or mismatched shards are re-encoded with a warning. Under `accelerate launch` (GPUs, or CPU
    processes) the missing shards are split between the processes, each encoding its own and writing it to the cache
    (which must be on a file system they share); each logs how many items it encoded. Within each instruction `encode`
    buckets a shard's items by length.

    Args:
        instructions: one per item (queries only), or `None`.
        on_shard: called as `on_shard(shard_index, num_shards)` after each shard this process encoded.
        normalize: L2-normalise the embeddings (`False`: the raw pooled states, as a distillation teacher gives).
        dtype: the dtype shards are stored in (default float32), e.g. `torch.bfloat16` for half the disk.

    Returns:
        On the main process, the `EmbeddingShards` (L2-normalised rows unless `normalize=False`, read from the cache
        on demand); `None` on the other processes, after every process has written its shards.
    """
    instructions = _checked_arguments(items, ids, cache_dir, name, shard_size, instructions)
    state = distributed_state()
    if cache_dir is None and state.num_processes > 1:
        raise ValueError("Encoding with several processes needs a cache_dir: they hand their shards over through it.")
    bounds = [(start, min(start + shard_size, len(items))) for start in range(0, len(items), shard_size)]
    settings = [f"query={is_query}", f"shard_size={shard_size}"]
    if not normalize or dtype not in (None, torch.float32):  # so that the fingerprints of earlier caches stay valid
        settings += [f"normalize={normalize}", f"dtype={dtype}"]
    fingerprint = hashlib.sha256("|".join([model_fingerprint(model), items_fingerprint(ids, items, instructions),
                                           *settings]).encode()).hexdigest()
    folder = os.path.join(os.fspath(cache_dir), name, fingerprint[:16]) if cache_dir is not None else None
    in_memory = {}
    shards = EmbeddingShards(ids, model.config.text_config.hidden_size, bounds, fingerprint, folder, in_memory)
    missing = _missing_shards(shards, name, state)
    state.wait_for_everyone()  # every process has scanned the cache before any shard is written
    cached = len(items) - sum(bounds[i][1] - bounds[i][0] for i in missing)
    progress = tqdm(total=len(items), initial=cached, desc=f"Encoding {name}", unit="item",
                    disable=not (show_progress_bar and state.is_main_process))
    encoded = 0
    with state.split_between_processes(missing) as own:
        for index in own:
            start, end = bounds[index]
            embeddings = encode_items(model, items[start:end], instructions[start:end], is_query, batch_size,
                                      image_root, normalize)
            if folder is not None:
                _write_shard(shards.shard_path(index), embeddings, ids[start:end], fingerprint, dtype)
            else:
                in_memory[index] = embeddings
            encoded += end - start
            # other processes' shards are not counted here: the bar shows this process's progress
            progress.update(end - start)
            if on_shard is not None:
                on_shard(index, len(bounds))
    progress.close()
    if missing:
        logger.info(f"{name}: process {state.process_index} of {state.num_processes} encoded {encoded} items "
                    f"in {len(own)} shards")
    state.wait_for_everyone()
    return shards if state.is_main_process else None


def _checked_arguments(items: list[dict], ids: list[str], cache_dir, name: str, shard_size: int,
                       instructions: list[str | None] | None) -> list[str | None]:
    """Raises on ids that do not match the items, an empty or invalid request; returns one instruction per item."""
    if len(ids) != len(items):
        raise ValueError(f"{name}: {len(items)} items but {len(ids)} ids.")
    if not items:
        raise ValueError(f"{name}: there are no items to encode.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: ids must be unique, got repeats {repeated_ids(ids)[:SHOWN_IDS]}.")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}.")
    if cache_dir is not None and not os.fspath(cache_dir):
        raise ValueError("cache_dir is an empty path; pass None to encode without a cache.")
    instructions = list(instructions) if instructions is not None else [None] * len(items)
    if len(instructions) != len(items):
        raise ValueError(f"{name}: {len(items)} items but {len(instructions)} instructions.")
    return instructions


def _missing_shards(shards: EmbeddingShards, name: str, state) -> list[int]:
    """The indices of the shards to encode: all without a cache; else those absent, unreadable or mismatched in the
    cache folder (created if needed), with a warning for each invalid one and a line on what is reused."""
    if shards.folder is None:
        return list(range(len(shards.bounds)))
    os.makedirs(shards.folder, exist_ok=True)
    missing = []
    for index, (start, end) in enumerate(shards.bounds):
        problem = _shard_problem(shards.shard_path(index), shards.ids[start:end], shards.fingerprint, shards.dim)
        if problem is not None:
            missing.append(index)
            if problem != "absent" and state.is_main_process:
                logger.warning(f"Embedding shard {shards.shard_path(index)} is {problem}; re-encoding it.")
    cached = len(shards) - sum(shards.bounds[i][1] - shards.bounds[i][0] for i in missing)
    if cached and state.is_main_process:
        logger.info(f"{name}: reusing {cached} of {len(shards)} embeddings from {shards.folder}")
    return missing


# numpy dtypes of safetensors' tensor types (bfloat16 has none: its 16 bits are read as uint16)
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "uint16"}


def map_safetensors(path: str, name: str):
    """The tensor `name` of the safetensors file `path` as a read-only `numpy.memmap` (bfloat16 as `uint16`).

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and byte
    range after the header, then the data: the range is mapped as it is, nothing is read until indexed."""
    import numpy as np

    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    if name not in header:
        raise KeyError(f"{path} holds no tensor {name!r} (it holds {sorted(k for k in header if k != '__metadata__')}).")
    entry = header[name]
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} is {entry['dtype']}, not one of {sorted(_SAFETENSORS_DTYPES)}.")
    start, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end == start:
        return np.zeros(shape, dtype=_SAFETENSORS_DTYPES[entry["dtype"]])
    return np.memmap(path, dtype=_SAFETENSORS_DTYPES[entry["dtype"]], mode="r", offset=8 + length + start,
                     shape=shape)


def encode_cached(model, items: list[dict], ids: list[str], cache_dir=None, **kwargs) -> torch.Tensor | None:
    """`encode_sharded` with every row in one tensor `(len(items), hidden_size)` on the main process (`None` on the
    others, where holding every row would multiply the memory of big pools)."""
    shards = encode_sharded(model, items, ids, cache_dir, **kwargs)
    return shards.tensor() if shards is not None else None

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""PUMA: a layer-pruned Qwen2-VL universal multimodal embedding model (arXiv 2507.08064).

`PumaForEmbedding` is the vision tower plus the kept decoder layers of a Qwen2-VL model, composed from transformers'
own `Qwen2VLModel`; the embedding is the final-norm hidden state at an added embedding token, L2-normalised.
`PumaForEmbedding.from_pretrained` prunes any Qwen2-VL checkpoint at load time, reading only the kept tensors.

This file and `configuration_puma.py` are the remote code of a PUMA Hub repository: they import only each other,
torch, transformers, the standard library, numpy and PIL.
"""

import contextlib
import importlib
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel, Qwen2VLProcessor
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel
from transformers.utils import ModelOutput, logging


if __package__:
    from .configuration_puma import PumaConfig, validate_kept_layers
else:  # imported as a top-level module (a checkout or a pip install) rather than as Hub remote code
    _configuration = importlib.import_module("configuration_puma")
    PumaConfig, validate_kept_layers = _configuration.PumaConfig, _configuration.validate_kept_layers


logger = logging.get_logger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
QWEN2_VL_MODEL_TYPES = ("qwen2_vl", "puma")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Keyword arguments of `from_pretrained` that `AutoModel` forwards and that need no action here.
_IGNORED_LOAD_KWARGS = {"_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs", "code_revision",
                        "low_cpu_mem_usage", "use_safetensors", "_commit_hash", "proxies"}
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "revision", "token", "subfolder")

# Checkpoint key layouts. Qwen2-VL checkpoints published with transformers <= 4.51 (Qwen/Qwen2-VL-2B-Instruct,
# -7B-Instruct) name the LLM `model.*` and the vision tower `visual.*`; later saves, and PUMA's, use the in-memory
# layout of `Qwen2VLModel` under `model.`: `model.language_model.*` and `model.visual.*`.
_OLD_LAYOUT_RULES = ((re.compile(r"^visual\."), "model.visual."),
                     (re.compile(r"^model\.(layers|embed_tokens|norm)\."), r"model.language_model.\1."))
_LAYER_KEY = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.*)$")
_EMBED_KEY = "model.language_model.embed_tokens.weight"
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


@dataclass
class PumaEmbeddingOutput(ModelOutput):
    """
    Output of [`PumaForEmbedding.forward`].

    Args:
        embeddings (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Pooled embeddings, L2-normalised when `config.normalize` is set.
        raw_embeddings (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            The pooled final-norm hidden states before normalisation (the target of hidden-state distillation).
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
            Final-norm hidden states of every position; returned with `output_hidden_states=True`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Hidden states of the embedding layer and of each kept decoder layer; returned with
            `output_hidden_states=True`.
    """

    embeddings: torch.FloatTensor | None = None
    raw_embeddings: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class PumaPreTrainedModel(PreTrainedModel):
    config: PumaConfig
    config_class = PumaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_sdpa = True


class PumaForEmbedding(PumaPreTrainedModel):
    """Vision tower + kept decoder layers + final norm of Qwen2-VL; the embedding is read at the embedding token."""

    def __init__(self, config: PumaConfig):
        super().__init__(config)
        self.model = Qwen2VLModel(config)
        self.processor = None  # set by `from_pretrained` or `set_processor`; used by `encode`
        self._backbone_takes_mm_token_type_ids = "mm_token_type_ids" in _forward_parameters(self.model)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> PumaEmbeddingOutput | tuple:
        r"""
        Embeds a batch of prompts (built by `encode` or the data collator).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids; each row must
                contain the embedding token when `config.pooling == "token"`.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 for real tokens.
            pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw: as returned by the Qwen2-VL processor.
            mm_token_type_ids (`torch.IntTensor`, *optional*): 0 text, 1 image, 2 video per token. Computed from
                `input_ids` when absent; transformers versions that do not take it ignore it.
        """
        if input_ids is None:
            raise ValueError("PumaForEmbedding.forward needs input_ids (the embedding token is located through them).")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        output_hidden_states = bool(output_hidden_states)
        return_dict = return_dict if return_dict is not None else True

        backbone_inputs = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
                           "pixel_values_videos": pixel_values_videos, "video_grid_thw": video_grid_thw}
        if self._backbone_takes_mm_token_type_ids:
            if mm_token_type_ids is None:
                mm_token_type_ids = self._mm_token_type_ids(input_ids)
            backbone_inputs["mm_token_type_ids"] = mm_token_type_ids

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **backbone_inputs,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        raw = self.pool(hidden, input_ids, attention_mask)
        embeddings = F.normalize(raw, p=2, dim=-1) if self.config.normalize else raw

        result = PumaEmbeddingOutput(
            embeddings=embeddings,
            raw_embeddings=raw,
            last_hidden_state=hidden if output_hidden_states else None,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
        )
        return result if return_dict else result.to_tuple()

    def _mm_token_type_ids(self, input_ids: torch.LongTensor) -> torch.IntTensor:
        """0 for text, 1 for image placeholder, 2 for video placeholder tokens; shape of `input_ids`."""
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == self.config.image_token_id] = 1
        types[input_ids == self.config.video_token_id] = 2
        return types

    def pool(self, hidden: torch.Tensor, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pools `hidden` `(batch, seq, dim)` to `(batch, dim)` per `config.pooling`."""
        batch = torch.arange(hidden.shape[0], device=hidden.device)
        if self.config.pooling == "mean":
            mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if self.config.pooling == "last":
            index = (attention_mask.bool() * (positions + 1)).argmax(dim=1)
            return hidden[batch, index]
        token_id = self.config.embedding_token_id
        if token_id is None:
            raise ValueError("config.embedding_token_id is not set; load the model with PumaForEmbedding.from_pretrained.")
        is_token = (input_ids == token_id) & attention_mask.bool()
        missing = (~is_token.any(dim=1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(
                f"Rows {missing} of input_ids lack the embedding token {self.config.embedding_token!r} (id {token_id}); "
                "build inputs with the model's prompt template (encode() or the data collator) and do not truncate it away."
            )
        # The last occurrence is the assistant turn's, even if a user text spells the token out.
        index = (is_token * (positions + 1)).argmax(dim=1)
        return hidden[batch, index]

    # ------------------------------------------------------------------------------------------------------------
    # Loading and saving
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        num_layers: int | None = None,
        kept_layers: list[int] | None = None,
        config: PumaConfig | None = None,
        processor=None,
        dtype=None,
        torch_dtype=None,
        device_map=None,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> "PumaForEmbedding":
        """Loads a stock Qwen2-VL or a PUMA checkpoint, keeping only the requested decoder layers.

        Args:
            pretrained_model_name_or_path: a local folder or a Hub repository id.
            num_layers (`int`, *optional*): keep the first `num_layers` decoder layers of the checkpoint.
            kept_layers (`list[int]`, *optional*): keep these layers, numbered as in the original base model.
                Without either, all the checkpoint's layers are kept (for a stock checkpoint: the full-depth teacher).
            processor (*optional*): a Qwen2-VL processor to use instead of the one saved with the checkpoint.
            dtype / torch_dtype: `torch.dtype`, its name, or `"auto"` (the checkpoint's). Default: float32 on CPU,
                bfloat16 on GPU.
            device_map: a device (`"cpu"`, `"cuda:0"`, `0`, `torch.device`), `{"": device}`, or `"auto"`.
            attn_implementation: `"sdpa"` (default), `"flash_attention_2"` (default on GPU when installed) or `"eager"`.
            kwargs: Hub arguments (`revision`, `token`, `cache_dir`, ...) and overrides of PUMA config fields
                (`pooling`, `normalize`, `max_pixels`, ...).

        Only safetensors weights are read, and only the tensors of kept layers: dropped layers and `lm_head` are never
        materialised.
        """
        if model_args:
            raise TypeError(f"PumaForEmbedding.from_pretrained takes no extra positional arguments, got {model_args!r}.")
        if num_layers is not None and kept_layers is not None:
            raise ValueError("Pass num_layers or kept_layers, not both.")
        hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
        for key in _IGNORED_LOAD_KWARGS:
            kwargs.pop(key, None)
        name = str(pretrained_model_name_or_path)

        source_config = _load_source_config(name, hub_kwargs)
        if config is not None and list(config.kept_layers) != list(source_config.kept_layers) and kept_layers is None \
                and num_layers is None:
            # AutoModel applies a `kept_layers=` keyword to the loaded config; honour it as a pruning request.
            kept_layers = list(config.kept_layers)
        local_layers = _select_local_layers(source_config, num_layers, kept_layers)

        puma_overrides = {key: kwargs.pop(key) for key in list(kwargs) if _is_puma_field(key)}
        if kwargs:
            raise TypeError(f"PumaForEmbedding.from_pretrained got unexpected keyword arguments {sorted(kwargs)}.")
        if config is not None and isinstance(source_config, PumaConfig):
            puma_overrides = {**_puma_fields(config), **puma_overrides}
        target = PumaConfig.from_qwen2_vl_config(source_config, local_layers, **puma_overrides)

        processor = processor if processor is not None else _load_processor(name, hub_kwargs, source_config)
        added_token_rows = None
        if processor is not None:
            added_token_rows = _ensure_embedding_token(processor, target, is_puma=isinstance(source_config, PumaConfig))

        device = _resolve_device(device_map)
        torch_dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, device, source_config)
        target._attn_implementation = _resolve_attn_implementation(attn_implementation, device, torch_dtype)
        for sub in (target, target.text_config, target.vision_config):
            sub.dtype = torch_dtype
        target._name_or_path = name

        with torch.device(device), _default_dtype(torch_dtype), _no_init_weights():
            model = cls(target)
        # Qwen2-VL's backbone may carry a stale dtype in sub-configs on some versions; make every float tensor agree.
        if any(p.dtype != torch_dtype for p in model.parameters() if p.is_floating_point()):
            model.to(torch_dtype)

        source_to_target = _source_layer_map(local_layers)
        _load_kept_tensors(model, name, hub_kwargs, source_to_target)
        if added_token_rows is not None:
            model._init_embedding_token_row(*added_token_rows)
        model.processor = processor
        model.eval()
        return model

    def _init_embedding_token_row(self, token_id: int, num_trained_rows: int):
        """Initialises a newly added embedding token's input row to the mean of the tokenizer's existing rows.

        The mean keeps the new row inside the distribution the first layer was trained on, unlike the arbitrary
        padding row the release left in place; the row stays trainable and is saved.
        """
        weight = self.get_input_embeddings().weight
        with torch.no_grad():
            weight[token_id] = weight[:num_trained_rows].float().mean(dim=0).to(weight.dtype)

    def set_processor(self, processor):
        """Attaches a Qwen2-VL processor (adding the embedding token to its tokenizer if absent)."""
        added = _ensure_embedding_token(processor, self.config, is_puma=True)
        if added is not None:
            raise ValueError(
                f"The processor's tokenizer lacks the embedding token {self.config.embedding_token!r}; "
                "use the processor saved with this model."
            )
        self.processor = processor

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves weights, config, the two model files (through `auto_map`) and the processor."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)

    # ------------------------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(
        self,
        inputs,
        *,
        instruction: str | None = None,
        is_query: bool = False,
        batch_size: int = 8,
        truncate_dim: int | None = None,
        normalize: bool = True,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = False,
        max_image_pixels: int | None = None,
    ):
        """Embeds texts, images and image+text pairs.

        Args:
            inputs: a list whose items are a `str` (text), a `PIL.Image.Image`, an image path (`os.PathLike`, or a
                `str` ending in an image suffix such as `.jpg`), or a dict `{"text": ..., "image": ...}`. A single item
                is embedded on its own and returns a 1-D result.
            instruction: task instruction put before the text of queries (used only with `is_query=True`).
            is_query: whether the inputs are queries (instructions apply) or candidates.
            batch_size: inputs per forward pass; inputs are sorted by length into batches, order is restored.
            truncate_dim: keep the first `truncate_dim` dimensions (Matryoshka), renormalised if `normalize`.
            normalize: L2-normalise the returned embeddings.
            show_progress_bar: default: shown when there are more than 10 batches.
            convert_to_numpy: return a numpy array instead of a tensor.
            max_image_pixels: reject larger images (decompression bombs); default `PIL.Image.MAX_IMAGE_PIXELS`.

        Returns:
            `torch.Tensor` (CPU, float32) or `numpy.ndarray` of shape `(len(inputs), dim)`.
        """
        if self.processor is None:
            raise ValueError(
                "No processor is attached to this model; load it with PumaForEmbedding.from_pretrained from a folder "
                "that holds the processor files, or call model.set_processor(processor)."
            )
        single = not isinstance(inputs, (list, tuple))
        if inputs is None:
            raise ValueError("inputs is None; pass a list of texts, images or {'text':..., 'image':...} dicts.")
        items = [inputs] if single else list(inputs)
        if not items:
            raise ValueError("inputs is an empty list; there is nothing to encode.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        hidden_size = self.config.text_config.hidden_size
        if truncate_dim is not None and not 0 < truncate_dim <= hidden_size:
            raise ValueError(f"truncate_dim={truncate_dim} is outside 1..{hidden_size} (the embedding dimension).")

        examples = [parse_input(item, i, max_image_pixels) for i, item in enumerate(items)]
        instruction = instruction if is_query else None
        prompts = [build_prompt(self.config, text, image is not None, instruction, self.processor.tokenizer)
                   for text, image in examples]
        lengths = [_estimate_length(self.config, prompt, image) for prompt, (_, image) in zip(prompts, examples)]
        order = sorted(range(len(items)), key=lambda i: -lengths[i])
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        if show_progress_bar is None:
            show_progress_bar = len(batches) > 10

        from tqdm.auto import tqdm  # transformers' own progress bar dependency

        results = [None] * len(items)
        for batch in tqdm(batches, desc="Encoding", disable=not show_progress_bar):
            features = featurize(self.processor, self.config, [prompts[i] for i in batch],
                                 [examples[i][1] for i in batch])
            features = {key: value.to(self.device) for key, value in features.items() if torch.is_tensor(value)}
            if "pixel_values" in features:
                features["pixel_values"] = features["pixel_values"].to(self.dtype)
            embeddings = self(**features).raw_embeddings.float()
            if truncate_dim is not None:
                embeddings = embeddings[:, :truncate_dim]
            if normalize:
                embeddings = F.normalize(embeddings, p=2, dim=-1)
            embeddings = embeddings.cpu()  # one device-to-host copy per batch
            for row, index in enumerate(batch):
                results[index] = embeddings[row]
        stacked = torch.stack(results)
        if single:
            stacked = stacked[0]
        return stacked.numpy() if convert_to_numpy else stacked

    def build_prompt(self, text: str | None, has_image: bool, instruction: str | None = None) -> str:
        """The chat prompt of one input; see the module-level `build_prompt`."""
        tokenizer = self.processor.tokenizer if self.processor is not None else None
        return build_prompt(self.config, text, has_image, instruction, tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# Prompts and processor features (shared by `encode` and the training collator)
# ----------------------------------------------------------------------------------------------------------------
def build_prompt(config: PumaConfig, text: str | None, has_image: bool, instruction: str | None = None,
                 tokenizer=None) -> str:
    """The chat prompt of one input: system turn, user turn (image, instruction + text, suffix), assistant turn.

    Reproduces the release's format (Qwen2-VL chat template, `format_string`, truncation of instruction + text to
    `config.max_text_tokens` tokens of `tokenizer` before the suffix, so the embedding token is never cut off).
    """
    text = (text or "").strip()
    if instruction:
        text = config.instruction_template.format(instruction=instruction.strip(), text=text).strip()
    if text:
        if config.format_text:
            text = _format_text(text)
        if tokenizer is not None:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > config.max_text_tokens:
                text = tokenizer.decode(ids[: config.max_text_tokens])
    if not has_image and not text:
        raise ValueError("An input has neither text nor image.")
    modality = "image,text" if has_image and text else ("image" if has_image else "text")
    vision = "<|vision_start|><|image_pad|><|vision_end|>" if has_image else ""
    user = vision + text + config.user_suffix_template.format(modality=config.modality_words[modality])
    assistant = config.assistant_template.format(embedding_token=config.embedding_token)
    system = f"<|im_start|>system\n{config.system_prompt}<|im_end|>\n" if config.system_prompt is not None else ""
    return f"{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>\n"


def pixel_limit_kwargs(config: PumaConfig) -> dict:
    """Processor keywords applying `config.min_pixels`/`max_pixels`: `size` on transformers 5; transformers 4's image
    processors read the explicit `min_pixels`/`max_pixels` in preference to `size["longest_edge"]`."""
    limits = {"size": {"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels}}
    if int(transformers.__version__.split(".")[0]) < 5:
        limits.update(min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    return limits


def featurize(processor, config: PumaConfig, prompts: list[str], images: list) -> dict:
    """Right-padded processor features of `prompts`; `images[i]` is the RGB image of prompt i or `None`."""
    present = [image for image in images if image is not None]
    return processor(text=prompts, images=present or None, padding=True, padding_side="right", return_tensors="pt",
                     **pixel_limit_kwargs(config))


def _estimate_length(config: PumaConfig, prompt: str, image) -> int:
    """Token count of a prompt for length bucketing: characters stand in for text tokens, patches for image tokens."""
    length = len(prompt) // 4
    if image is not None:
        pixels = min(max(image.width * image.height, config.min_pixels), config.max_pixels)
        length += pixels // (28 * 28)
    return length


# ----------------------------------------------------------------------------------------------------------------
# Loading helpers
# ----------------------------------------------------------------------------------------------------------------
def _forward_parameters(module: nn.Module) -> set[str]:
    """Parameter names of a module's `forward`: used to bridge transformers 4.57 and 5.x."""
    import inspect

    return set(inspect.signature(module.forward).parameters)


def _is_puma_field(key: str) -> bool:
    return key in _puma_field_names()


def _puma_field_names() -> tuple[str, ...]:
    import inspect

    return tuple(p for p in inspect.signature(PumaConfig.__init__).parameters
                 if p not in ("self", "kwargs", "kept_layers", "base_num_hidden_layers", "embedding_token_id"))


def _puma_fields(config: PumaConfig) -> dict:
    return {key: getattr(config, key) for key in _puma_field_names() if hasattr(config, key)}


def _resolve_file(name: str, filename: str, hub_kwargs: dict, required: bool = True) -> str | None:
    """Local path of `filename` in the folder or Hub repository `name`; `None` when absent and not required."""
    subfolder = hub_kwargs.get("subfolder") or ""
    if os.path.isdir(name):
        path = os.path.join(name, subfolder, filename)
        if os.path.isfile(path):
            return path
        if required:
            raise OSError(f"'{name}' has no file {os.path.join(subfolder, filename)!r}.")
        return None
    from huggingface_hub import hf_hub_download  # a transformers dependency

    try:
        return hf_hub_download(name, filename, subfolder=subfolder or None,
                               **{k: v for k, v in hub_kwargs.items() if k != "subfolder"})
    except Exception as err:
        kind = type(err).__name__
        if not required and kind in ("EntryNotFoundError", "RemoteEntryNotFoundError", "LocalEntryNotFoundError"):
            return None  # optional file: absent from the repository, or from the cache when offline
        if kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            raise OSError(f"The Hub repository '{name}' has no file {filename!r}.") from None
        raise OSError(
            f"Could not load '{name}': it is not a local folder, and fetching {filename!r} from the Hugging Face Hub "
            f"failed ({kind}: {err}). Pass the path of a local checkpoint folder."
        ) from err


def _load_source_config(name: str, hub_kwargs: dict):
    """The checkpoint's configuration, as `PumaConfig` (PUMA checkpoints) or `Qwen2VLConfig` (stock Qwen2-VL)."""
    from transformers import Qwen2VLConfig

    with open(_resolve_file(name, "config.json", hub_kwargs), encoding="utf-8") as f:
        config_dict = json.load(f)
    model_type = config_dict.get("model_type")
    if model_type not in QWEN2_VL_MODEL_TYPES:
        raise ValueError(
            f"'{name}' is a {model_type!r} checkpoint; PumaForEmbedding loads Qwen2-VL (model_type 'qwen2_vl') "
            "and PUMA (model_type 'puma') checkpoints."
        )
    for key in ("auto_map", "transformers_version", "architectures", "model_type"):
        config_dict.pop(key, None)
    config_cls = PumaConfig if model_type == "puma" else Qwen2VLConfig
    config = config_cls(**config_dict)
    if model_type == "qwen2_vl":
        config.kept_layers = list(range(config.text_config.num_hidden_layers))
    return config


def _select_local_layers(source_config, num_layers: int | None, kept_layers: list[int] | None) -> list[int]:
    """Indices, in the checkpoint's own layer numbering, of the layers to keep."""
    available = list(source_config.kept_layers)  # original numbering of the checkpoint's layers
    depth = len(available)
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 0 < num_layers <= depth:
            raise ValueError(f"num_layers={num_layers!r} must be an integer in 1..{depth} (the checkpoint has {depth} decoder layers).")
        return list(range(num_layers))
    if kept_layers is None:
        return list(range(depth))
    kept_layers = list(kept_layers)
    validate_kept_layers(kept_layers, source_config.base_num_hidden_layers if hasattr(source_config, "base_num_hidden_layers") else depth)
    absent = [layer for layer in kept_layers if layer not in available]
    if absent:
        raise ValueError(f"kept_layers {absent} are not in this checkpoint, which holds original layers {available}.")
    return [available.index(layer) for layer in kept_layers]


def _source_layer_map(local_layers: list[int]) -> dict[int, int]:
    return {source: target for target, source in enumerate(local_layers)}


def _load_processor(name: str, hub_kwargs: dict, config):
    """The processor saved with the checkpoint, or `None` (with a log line) when it has none."""
    # transformers 5 saves one processor_config.json; earlier versions (and the Hub's Qwen2-VL) preprocessor_config.json
    if all(_resolve_file(name, f, hub_kwargs, required=False) is None
           for f in ("processor_config.json", "preprocessor_config.json")):
        logger.warning(f"'{name}' holds no processor files; encode() needs model.set_processor(...).")
        return None
    kwargs = {key: value for key, value in hub_kwargs.items() if key != "force_download"}
    # The Qwen2-VL family always uses this processor; AutoProcessor would consult the PUMA config (remote code).
    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 5's tokenizer loader resolves the model config, which for PUMA is remote code: hand it over.
        kwargs["config"] = config
    return Qwen2VLProcessor.from_pretrained(name, **kwargs)


def _ensure_embedding_token(processor, config: PumaConfig, is_puma: bool) -> tuple[int, int] | None:
    """Makes the tokenizer know the embedding token and records its id in `config`.

    Returns `(token_id, rows_before)` when the token was added now (its input row needs initialising), else `None`.
    A PUMA checkpoint must already carry the token with the id its config names.
    """
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"The processor {type(processor).__name__} has no tokenizer.")
    token = config.embedding_token
    vocab = tokenizer.get_vocab()
    if token in vocab:
        token_id = vocab[token]
        if config.embedding_token_id is not None and config.embedding_token_id != token_id:
            raise ValueError(
                f"The tokenizer maps the embedding token {token!r} to id {token_id}, but the config says "
                f"{config.embedding_token_id}; the tokenizer does not belong to this model."
            )
        config.embedding_token_id = token_id
        return None
    if is_puma:
        raise ValueError(
            f"The tokenizer lacks the embedding token {token!r} that this PUMA model was trained with; "
            "use the tokenizer saved with the model."
        )
    rows_before = len(tokenizer)
    tokenizer.add_tokens([token], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    config.embedding_token_id = token_id
    if token_id >= config.text_config.vocab_size:
        config.text_config.vocab_size = token_id + 1
    return token_id, rows_before


def _resolve_device(device_map) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                f"device_map={device_map!r} spreads the model over several devices; PumaForEmbedding is loaded on "
                "one device (pass a device, {'': device} or 'auto')."
            )
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def _resolve_dtype(dtype, device: torch.device, source_config) -> torch.dtype:
    if dtype is None:
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    if dtype == "auto":
        dtype = getattr(source_config, "dtype", None) or getattr(source_config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype.")
    return dtype


def _resolve_attn_implementation(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    if requested is not None:
        return requested
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            pass
        else:
            return "flash_attention_2"
    return "sdpa"


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Creates parameters directly in `dtype`, so a bf16 load never holds a float32 copy."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _no_init_weights():
    """transformers' own context that skips random initialisation of weights about to be overwritten."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _checkpoint_files(name: str, hub_kwargs: dict) -> dict[str, list[str]]:
    """Maps each safetensors file of the checkpoint to the tensor names it holds (via the shard index if any)."""
    index_path = _resolve_file(name, SAFE_WEIGHTS_INDEX_NAME, hub_kwargs, required=False)
    if index_path is not None:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = defaultdict(list)
        for key, filename in weight_map.items():
            files[filename].append(key)
        return dict(files)
    if _resolve_file(name, SAFE_WEIGHTS_NAME, hub_kwargs, required=False) is None:
        raise OSError(
            f"'{name}' has no safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}); only safetensors "
            "are loaded. Convert .bin weights with transformers' save_pretrained(..., safe_serialization=True)."
        )
    return {SAFE_WEIGHTS_NAME: None}


def _target_key(key: str, source_to_target: dict[int, int]) -> str | None:
    """The parameter name of checkpoint tensor `key` in `PumaForEmbedding`, or `None` if it is not kept."""
    if key.startswith("lm_head."):
        return None
    for pattern, replacement in _OLD_LAYOUT_RULES:
        key = pattern.sub(replacement, key)
    match = _LAYER_KEY.match(key)
    if match is None:
        return key
    layer = source_to_target.get(int(match.group(1)))
    return None if layer is None else f"model.language_model.layers.{layer}.{match.group(2)}"


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    header.pop("__metadata__", None)
    return header, 8 + header_size


def _read_tensor_into(f, info: dict, data_offset: int, out: torch.Tensor, key: str, path: str) -> None:
    """Reads one safetensors tensor straight into `out` (or into its leading rows), casting if needed.

    Reading with `readinto` into the destination's memory keeps peak memory at the kept bytes: mapping whole shards
    would make every touched page of a shard resident while it is open.
    """
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    shape = torch.Size(info["shape"])
    if dtype is None:
        raise ValueError(f"Tensor {key!r} in {path} has unsupported dtype {info['dtype']}.")
    if shape != out.shape:
        if key == _EMBED_KEY and shape[1:] == out.shape[1:] and shape[0] <= out.shape[0]:
            out = out[: shape[0]]  # rows appended for the embedding token stay for the caller to fill
        else:
            raise ValueError(f"Tensor {key!r} in {path} has shape {tuple(shape)}, the model expects {tuple(out.shape)}.")
    start, end = info["data_offsets"]
    direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
    buffer = out if direct else torch.empty(shape, dtype=dtype)
    f.seek(data_offset + start)
    if end > start:
        view = memoryview(buffer.view(-1).view(torch.uint8).numpy())
        if f.readinto(view) != end - start:
            raise OSError(f"{path} is truncated: tensor {key!r} could not be read in full.")
    if not direct:
        with torch.no_grad():
            out.copy_(buffer)


def _load_kept_tensors(model: "PumaForEmbedding", name: str, hub_kwargs: dict, source_to_target: dict[int, int]):
    """Fills every parameter and persistent buffer of `model` from the checkpoint, reading only kept tensors."""
    state = model.state_dict(keep_vars=True)
    loaded, skipped_unknown = set(), []
    for filename, keys in _checkpoint_files(name, hub_kwargs).items():
        if keys is not None and all(_target_key(key, source_to_target) is None for key in keys):
            continue  # a shard of dropped layers only: never opened, never downloaded
        path = _resolve_file(name, filename, hub_kwargs)
        header, data_offset = _read_safetensors_header(path)
        keys = keys if keys is not None else list(header)
        with open(path, "rb") as f:
            for key in keys:
                target = _target_key(key, source_to_target)
                if target is None:
                    continue
                if target not in state:
                    skipped_unknown.append(key)
                    continue
                if key not in header:
                    raise OSError(f"The shard index of '{name}' lists {key!r} in {filename}, which lacks it.")
                _read_tensor_into(f, header[key], data_offset, state[target].data, key, path)
                loaded.add(target)
    missing = [key for key in state if key not in loaded]
    if missing:
        raise OSError(f"The checkpoint '{name}' lacks tensors the model needs: {missing[:8]}{' ...' if len(missing) > 8 else ''}.")
    if skipped_unknown:
        logger.warning(f"Ignored {len(skipped_unknown)} checkpoint tensors unknown to Qwen2-VL: {skipped_unknown[:5]}")


# ----------------------------------------------------------------------------------------------------------------
# Input helpers
# ----------------------------------------------------------------------------------------------------------------
def _format_text(text: str) -> str:
    """The release's `format_string`: capitalise the first letter and end with punctuation."""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text + "."


def _looks_like_image_path(item) -> bool:
    if isinstance(item, os.PathLike):
        return True
    return isinstance(item, str) and not any(c.isspace() for c in item) and item.lower().endswith(IMAGE_SUFFIXES)


def parse_input(item, index: int = 0, max_image_pixels: int | None = None):
    """`(text, image)` of one `encode` input; `image` is an RGB `PIL.Image` or `None`."""
    from PIL import Image

    if item is None:
        raise ValueError(f"inputs[{index}] is None.")
    if isinstance(item, dict):
        unknown = set(item) - {"text", "image"}
        if unknown:
            raise ValueError(f"inputs[{index}] has unknown keys {sorted(unknown)}; use 'text' and/or 'image'.")
        text, image = item.get("text"), item.get("image")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"inputs[{index}]['text'] must be a string, got {type(text).__name__}.")
        if text is None and image is None:
            raise ValueError(f"inputs[{index}] has neither 'text' nor 'image'.")
        return (text, load_image(image, index, max_image_pixels) if image is not None else None)
    if isinstance(item, Image.Image) or _looks_like_image_path(item):
        return None, load_image(item, index, max_image_pixels)
    if isinstance(item, str):
        if not item.strip():
            raise ValueError(f"inputs[{index}] is an empty string.")
        return item, None
    raise ValueError(f"inputs[{index}] has unsupported type {type(item).__name__}; use str, PIL.Image, a path or a dict.")


def load_image(image, index: int = 0, max_image_pixels: int | None = None):
    """Opens, EXIF-rotates and converts an image to RGB, refusing missing, corrupt and oversized files."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    limit = max_image_pixels if max_image_pixels is not None else Image.MAX_IMAGE_PIXELS
    if not isinstance(image, Image.Image):
        if not isinstance(image, (str, os.PathLike)):
            raise ValueError(f"inputs[{index}] image must be a PIL.Image or a path, got {type(image).__name__}.")
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"inputs[{index}]: image file {path!r} does not exist.")
        try:
            opened = Image.open(path)
            _check_pixels(opened, limit, f"inputs[{index}] ({path})")
            opened.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"inputs[{index}]: {path!r} is not a readable image ({err}).") from err
        except Image.DecompressionBombError as err:
            raise ValueError(f"inputs[{index}]: {path!r} exceeds the pixel limit ({err}).") from err
        image = opened
    else:
        _check_pixels(image, limit, f"inputs[{index}]")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _check_pixels(image, limit: int | None, name: str) -> None:
    if limit is not None and image.width * image.height > limit:
        raise ValueError(
            f"{name} has {image.width}x{image.height} = {image.width * image.height} pixels, over the limit of {limit} "
            "(a possible decompression bomb); raise max_image_pixels to accept it."
        )


PumaConfig.register_for_auto_class()
PumaForEmbedding.register_for_auto_class("AutoModel")

__all__ = ["PumaEmbeddingOutput", "PumaForEmbedding", "PumaPreTrainedModel", "build_prompt", "featurize", "load_image",
           "parse_input", "pixel_limit_kwargs"]

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""PUMA: layer-pruned Qwen-VL universal multimodal embedding models (arXiv 2507.08064).

`PumaForEmbedding` is the vision tower plus the kept decoder layers of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model (or of
an embedder trained on one, such as GME or Qwen3-VL-Embedding), composed from the family's own transformers model
class; the embedding is the final-norm hidden state at the pooled position (an added embedding token, or the last
token), L2-normalised. `PumaForEmbedding.from_pretrained` prunes any such checkpoint at load time through transformers'
own `from_pretrained`, without downloading the shards that hold only dropped layers.

This file and `configuration_puma.py` are the remote code of a PUMA Hub repository: they import only each other,
torch, transformers, the standard library, numpy and PIL (sentence-transformers optionally, for its module class).
What they assume of transformers beyond its public API, and every difference between its versions, is in each
file's "transformers compatibility" section.
"""

import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, is_flash_attn_2_available, logging


if __package__:
    from .configuration_puma import (FAMILIES, PRESETS, PumaConfig, TransformersCompatibilityError, attn_implementation,
                                     incompatibility, transformers_major, validate_kept_layers, validate_visual_pool)
else:  # imported as a top-level module (a checkout or a pip install) rather than as Hub remote code
    _configuration = importlib.import_module("configuration_puma")
    FAMILIES, PRESETS = _configuration.FAMILIES, _configuration.PRESETS
    PumaConfig, validate_kept_layers = _configuration.PumaConfig, _configuration.validate_kept_layers
    validate_visual_pool = _configuration.validate_visual_pool
    # the configuration's "transformers compatibility" helpers, reused by this file's section of that name
    TransformersCompatibilityError = _configuration.TransformersCompatibilityError
    attn_implementation, incompatibility = _configuration.attn_implementation, _configuration.incompatibility
    transformers_major = _configuration.transformers_major


logger = logging.get_logger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = (*FAMILIES, "puma")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
URL_PREFIXES = ("http://", "https://", "ftp://", "s3://", "gs://", "hf://")
# seconds a Hub id's load waits for the Hub to answer before reading from the local cache only
HUB_PROBE_TIMEOUT_S = 5.0
# rows averaged into an added embedding token's initial row (evenly spaced when the vocabulary is larger)
EMBEDDING_MEAN_ROWS = 1024
# Keyword arguments of `from_pretrained` that `AutoModel` forwards and that need no action here.
_IGNORED_LOAD_KWARGS = {"_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs", "code_revision",
                        "low_cpu_mem_usage", "use_safetensors", "_commit_hash", "proxies", "key_mapping"}
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "revision", "token", "subfolder")
# Target of the checkpoint tensors a pruned model does not use (dropped layers and mergers, the LM head); the model
# ignores them as unexpected keys, and transformers never materialises them.
_DROPPED = "puma_dropped"
# Names in the repositories of trained embedders that identify their recipe (see `detect_preset`).
_PRESET_NAME_PATTERNS = (("qwen3_vl_embedding", re.compile(r"qwen3[-_]?vl[-_]?embedding", re.I)),
                         ("gme", re.compile(r"(^|[/_-])gme[-_]", re.I)))
_PRESET_MARKER_FILES = (("gme", "gme_inference.py"),)


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
            The backbone's hidden states (embedding output and each kept decoder layer's output, without the final
            norm); returned with `output_hidden_states=True`.
        depth_embeddings (`dict[int, torch.FloatTensor]`, *optional*):
            For each depth d of `output_depths`, the pooled final-norm hidden state of the model truncated after its
            first d layers, each of shape `(batch_size, hidden_size)`, before normalisation.
        visual_outputs (`dict[str, ModelOutput]`, *optional*):
            The vision tower's outputs of this forward, keyed `"image"` / `"video"` (the family's own output objects:
            merged patch features, and DeepStack features for Qwen3-VL); returned with `output_visual_outputs=True`
            where transformers can take them back (`reuses_visual_outputs`), to skip the tower when the same inputs
            are embedded again (GradCache's second pass).
    """

    embeddings: torch.FloatTensor | None = None
    raw_embeddings: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    depth_embeddings: dict[int, torch.FloatTensor] | None = None
    visual_outputs: dict | None = None


class PumaPreTrainedModel(PreTrainedModel):
    config: PumaConfig
    config_class = PumaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock", "Qwen2_5_VLDecoderLayer",
                         "Qwen2_5_VLVisionBlock", "Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock",
                         "Qwen3VLMoeTextDecoderLayer", "Qwen3VLMoeVisionBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _keys_to_ignore_on_load_unexpected = [rf"{_DROPPED}\."]
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_sdpa = True

    def _init_weights(self, module):
        # The backbone's own initialisation covers every module this model holds (random weights only matter for a
        # model built from a config, never for a loaded one).
        return self.model._init_weights(module)


class PumaForEmbedding(PumaPreTrainedModel):
    """Vision tower + kept decoder layers + final norm of a Qwen-VL family model; the embedding is read at the
    pooled position of `config.pooling`."""

    def __init__(self, config: PumaConfig):
        super().__init__(config)
        self.model = backbone_class(config.base_model_type)(config.backbone_config())
        self.processor = None  # set by `from_pretrained` or `set_processor`; used by `encode`
        self._backbone_inputs = set(inspect.signature(self.model.forward).parameters)
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
        output_depths: list[int] | None = None,
        visual_outputs: dict | None = None,
        output_visual_outputs: bool = False,
        run_vision_tower: bool = False,
        visual_pool: int | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> PumaEmbeddingOutput | tuple:
        r"""
        Embeds a batch of prompts (built by `encode` or the data collator).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids; each row must
                contain the embedding token when `config.pooling == "token"`.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 for real tokens.
            pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw: as returned by the family's processor.
            mm_token_type_ids (`torch.IntTensor`, *optional*): 0 text, 1 image, 2 video per token. Computed from
                `input_ids` when absent; transformers versions that do not take it ignore it.
            output_depths (`list[int]`, *optional*): also return the pooled embedding after the first d layers for
                each d (`depth_embeddings`), from this one forward pass.
            visual_outputs (`dict`, *optional*): `visual_outputs` of an earlier forward of these same inputs, used
                instead of running the vision tower again (its pixel inputs are then ignored). Only valid while the
                tower's weights are unchanged.
            output_visual_outputs (`bool`, *optional*): also return the vision tower's outputs (`visual_outputs`).
            run_vision_tower (`bool`, *optional*): run the vision tower in every call, before the language model, on
                a placeholder image when the inputs hold none (its output enters the embedding times zero).
                Processes that shard the model (FSDP, DeepSpeed ZeRO-3) gather each module's weights when it runs,
                so all of them must run the same modules in the same order, whatever their batch holds.
            visual_pool (`int`, *optional*): visual-token reduction factor of this pass (default
                `config.visual_pool`); with k > 1 the image and video placeholder runs of `input_ids` are shortened
                to the k x k pooled grid (see `reduce_visual_inputs`), so `last_hidden_state` is shorter than
                `input_ids`.
        """
        if input_ids is None:
            raise ValueError("PumaForEmbedding.forward needs input_ids (the pooled position is located through them).")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return_dict = return_dict if return_dict is not None else True
        depths = self._check_depths(output_depths)

        backbone_inputs = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
                           "pixel_values_videos": pixel_values_videos, "video_grid_thw": video_grid_thw}
        factor = self.config.visual_pool if visual_pool is None else visual_pool
        validate_visual_pool(factor)
        if factor != 1 and (visual_outputs is not None or run_vision_tower or output_visual_outputs):
            # both hand the backbone encoder outputs: the reduced ones are computed here from the pixels
            raise ValueError(f"visual_pool={factor} does not combine with visual_outputs, output_visual_outputs or "
                             "run_vision_tower (GradCache's reuse of the vision tower, sharded training) yet.")
        if factor != 1 and (pixel_values is not None or pixel_values_videos is not None):
            input_ids, attention_mask, mm_token_type_ids, backbone_inputs = self.reduce_visual_inputs(
                input_ids, attention_mask, backbone_inputs, factor, mm_token_type_ids)
        if "mm_token_type_ids" in self._backbone_inputs:
            backbone_inputs["mm_token_type_ids"] = (mm_token_type_ids if mm_token_type_ids is not None
                                                    else self._mm_token_type_ids(input_ids))
        anchor = None
        if run_vision_tower and visual_outputs is None:
            if not reuses_visual_outputs(self):
                raise incompatibility("the backbone's forward takes the vision tower's outputs (mm_encoder_outputs), "
                                      "which run_vision_tower (sharded training, GradCache's reuse) hands it",
                                      "it has no such argument")
            visual_outputs, anchor = self._run_vision_tower(pixel_values, image_grid_thw)
        if visual_outputs:
            if not reuses_visual_outputs(self):
                raise incompatibility("the backbone's forward takes the vision tower's outputs (mm_encoder_outputs)",
                                      "it has no such argument")
            kwargs["mm_encoder_outputs"] = dict(visual_outputs)
            for modality, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
                if modality in visual_outputs:
                    backbone_inputs[pixels] = None
        if self.config.position_mode == "sequential" and "position_ids" not in kwargs:
            # Position i for token i in all three rotary sections, image tokens included (GME's inference).
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            kwargs["position_ids"] = positions.view(1, 1, -1).expand(3, input_ids.shape[0], -1)

        with self._capture_layer_inputs(depths) as captured:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                output_hidden_states=bool(output_hidden_states),
                return_dict=True,
                **backbone_inputs,
                **kwargs,
            )
        hidden = outputs.last_hidden_state
        raw = self.pool(hidden, input_ids, attention_mask)
        if anchor is not None:  # the placeholder image's output, times zero: its gradients exist on every process
            raw = raw + anchor
        embeddings = F.normalize(raw, p=2, dim=-1) if self.config.normalize else raw

        depth_embeddings = None
        if depths:
            norm = self.model.language_model.norm
            depth_embeddings = {depth: raw if depth == self.num_layers
                                else self.pool(norm(captured[depth]), input_ids, attention_mask)
                                for depth in depths}

        result = PumaEmbeddingOutput(
            embeddings=embeddings,
            raw_embeddings=raw,
            last_hidden_state=hidden if output_hidden_states else None,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            depth_embeddings=depth_embeddings,
            visual_outputs=visual_outputs_of(outputs) if output_visual_outputs and reuses_visual_outputs(self)
            else None,
        )
        return result if return_dict else result.to_tuple()

    def _run_vision_tower(self, pixel_values, image_grid_thw) -> tuple[dict, torch.Tensor | None]:
        """`(visual_outputs, anchor)` for `run_vision_tower`: the tower's outputs of the inputs' images, or of a
        placeholder image (one merged token of zeros) with `anchor`, its outputs summed times zero."""
        if pixel_values is not None:
            return {"image": vision_tower_outputs(self.model, pixel_values, image_grid_thw)}, None
        vision = self.config.vision_config
        merge = vision.spatial_merge_size
        grid = torch.tensor([[1, merge, merge]], device=self.device)
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        placeholder = torch.zeros(merge * merge, width, dtype=self.model.visual.dtype, device=self.device)
        outputs = vision_tower_outputs(self.model, placeholder, grid)
        # Only the outputs the language model reads of an image (the merged features, Qwen3-VL's DeepStack ones),
        # which reach every weight of the tower: its gradients then enter through the outputs a real image's do.
        # DeepSpeed ZeRO-3 checks that every process runs backward hooks in the same order and count, and it hooks
        # each output of the tower that receives a gradient.
        if getattr(outputs, "pooler_output", None) is None:
            raise incompatibility("the vision tower's outputs hold the merged features in pooler_output",
                                  f"{type(outputs).__name__} has none")
        read = [outputs.pooler_output, getattr(outputs, "deepstack_features", None)]
        return {}, sum(tensor.sum() for tensor in _tensors_in(read)) * 0.0

    @property
    def num_layers(self) -> int:
        return self.config.text_config.num_hidden_layers

    def _check_depths(self, depths) -> list[int]:
        depths = sorted(set(depths or []))
        bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, int) or not 0 < d <= self.num_layers]
        if bad:
            raise ValueError(f"output_depths {bad} are outside 1..{self.num_layers} (the model's layers).")
        return depths

    @contextlib.contextmanager
    def _capture_layer_inputs(self, depths: list[int]):
        """Records the hidden state entering decoder layer d for each depth d < the model's depth: the residual
        stream after d layers, including any visual feature injected after layer d - 1 (Qwen3-VL's DeepStack), so
        its final norm is exactly the embedding of the model truncated to d layers."""
        captured, handles = {}, []
        layers = self.model.language_model.layers
        for depth in depths:
            if depth < len(layers):
                def hook(module, args, kwargs, depth=depth):
                    captured[depth] = args[0] if args else kwargs["hidden_states"]
                handles.append(layers[depth].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

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
            # the last position whose mask is 1, whichever side the padding is on
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
    # Visual-token reduction
    # ------------------------------------------------------------------------------------------------------------
    def reduce_visual_inputs(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, visual_inputs: dict,
                             factor: int, mm_token_type_ids: torch.IntTensor | None = None):
        """The inputs of a forward pass whose visual tokens are pooled `factor` x `factor`.

        The vision tower runs on the processor's pixels and grid as usual; each image's and each video frame's merged
        features (Qwen3-VL's DeepStack features alike) are pooled on their grid (`pool_visual_grid`); every
        placeholder run of `input_ids` keeps the first `reduced` tokens of each frame and drops the rest, rows
        re-padded on the right; the backbone gets the pooled encoder outputs (`mm_encoder_outputs`) with the reduced
        grids, from which it computes the M-RoPE positions of the reduced grid itself (`get_rope_index`).

        Returns:
            `(input_ids, attention_mask, mm_token_type_ids, backbone_inputs)` of the reduced sequence.
        """
        if "mm_encoder_outputs" not in self._backbone_inputs:
            raise incompatibility(f"{type(self.model).__name__}.forward takes precomputed mm_encoder_outputs",
                                  f"needed by visual_pool={factor}; transformers 5.19 and later have it")
        merge = self.config.vision_config.spatial_merge_size
        mode = self.config.visual_pool_mode
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        encoder_outputs, backbone_inputs = {}, {}
        for kind, token_id in (("image", self.config.image_token_id), ("video", self.config.video_token_id)):
            pixels = visual_inputs[f"pixel_values{'_videos' if kind == 'video' else ''}"]
            grid = visual_inputs[f"{kind}_grid_thw"]
            if pixels is None:
                continue
            outputs = getattr(self.model, f"get_{kind}_features")(pixels, grid, return_dict=True)
            outputs.pooler_output = tuple(pool_visual_grid(features, thw, merge, factor, mode)
                                          for features, thw in zip(outputs.pooler_output, grid.tolist()))
            if getattr(outputs, "deepstack_features", None) is not None:
                outputs.deepstack_features = [
                    tuple(pool_visual_grid(features, thw, merge, factor, mode)
                          for features, thw in zip(level, grid.tolist()))
                    for level in outputs.deepstack_features]
            encoder_outputs[kind] = outputs
            backbone_inputs[f"{kind}_grid_thw"] = reduced_grid_thw(grid, merge, factor)
            placeholders = input_ids == token_id
            kept = visual_keep_pattern(grid, merge, factor).to(input_ids.device)
            if kept.numel() != int(placeholders.sum()):
                raise ValueError(f"input_ids hold {int(placeholders.sum())} {kind} tokens but {kind}_grid_thw makes "
                                 f"{kept.numel()}; pass the processor's features unchanged.")
            keep[placeholders] = kept
        backbone_inputs["mm_encoder_outputs"] = encoder_outputs
        columns = [input_ids, attention_mask] + ([mm_token_type_ids] if mm_token_type_ids is not None else [])
        lengths = keep.sum(dim=1)
        width = int(lengths.max())
        # right-aligned padding of the kept tokens: slot j of row r is filled when j < lengths[r]
        filled = torch.arange(width, device=input_ids.device) < lengths.unsqueeze(1)
        reduced = []
        for column in columns:
            out = column.new_zeros((column.shape[0], width))
            out[filled] = column[keep]
            reduced.append(out)
        reduced_types = reduced[2] if mm_token_type_ids is not None else None
        return reduced[0], reduced[1], reduced_types, backbone_inputs

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
        preset: str | None = None,
        config: PumaConfig | None = None,
        processor=None,
        dtype=None,
        torch_dtype=None,
        device_map=None,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> "PumaForEmbedding":
        """Loads a Qwen2-VL, Qwen2.5-VL, Qwen3-VL or PUMA checkpoint, keeping only the requested decoder layers.

        Args:
            pretrained_model_name_or_path: a local folder or a Hub repository id.
            num_layers (`int`, *optional*): keep the first `num_layers` decoder layers of the checkpoint.
            kept_layers (`list[int]`, *optional*): keep these layers, numbered as in the original base model.
                Without either, all the checkpoint's layers are kept (for a stock checkpoint: the full-depth teacher).
            preset (`str`, *optional*): the prompt and pooling recipe, `"puma"`, `"qwen3_vl_embedding"` or `"gme"`.
                Default: a PUMA checkpoint's own; for a stock checkpoint, detected from its name or files
                (`detect_preset`), else `"puma"`.
            processor (*optional*): the family's processor to use instead of the one saved with the checkpoint.
            dtype / torch_dtype: `torch.dtype`, its name, or `"auto"` (the checkpoint's). Default: float32 on CPU,
                bfloat16 on GPU.
            device_map: a device (`"cpu"`, `"cuda:0"`, `0`, `torch.device`), `{"": device}`, or `"auto"`.
            attn_implementation: `"sdpa"` (default), `"flash_attention_2"` (default on GPU when installed) or `"eager"`.
            kwargs: Hub arguments (`revision`, `token`, `cache_dir`, ...) and overrides of PUMA config fields
                (`pooling`, `normalize`, `max_pixels`, ...).

        The weights are loaded by transformers' own `from_pretrained` of the pruned configuration, with a key mapping
        that renumbers the kept layers (and Qwen3-VL's kept DeepStack mergers) and sets aside the rest; only
        safetensors are read, and shards holding only dropped tensors are neither downloaded nor opened. A Hub id is
        read from the local cache only when HF_HUB_OFFLINE is set or the Hub does not answer within
        `HUB_PROBE_TIMEOUT_S` seconds; a file missing there is then an error at once.
        """
        if model_args:
            raise TypeError(f"PumaForEmbedding.from_pretrained takes no extra positional arguments, got {model_args!r}.")
        if num_layers is not None and kept_layers is not None:
            raise ValueError("Pass num_layers or kept_layers, not both.")
        name = str(pretrained_model_name_or_path)
        hub_kwargs, puma_overrides = _split_load_kwargs(kwargs)
        hub_kwargs = _hub_kwargs_for(name, hub_kwargs)

        source_config = load_source_config(name, hub_kwargs)
        target, local_layers = _target_config(name, source_config, hub_kwargs, config, num_layers, kept_layers,
                                              preset, puma_overrides)
        processor = processor if processor is not None else load_processor(name, source_config, hub_kwargs)
        added_token_rows = None
        if processor is not None:
            added_token_rows = _ensure_embedding_token(processor, target, is_puma=isinstance(source_config, PumaConfig))

        device = _resolve_device(device_map)
        torch_dtype = _resolve_dtype(dtype if dtype is not None else torch_dtype, device, source_config)
        target.dtype = torch_dtype
        load_kwargs = {"config": target, "dtype": torch_dtype,
                       "attn_implementation": _resolve_attn_implementation(attn_implementation, device, torch_dtype)}
        if device.type != "cpu":
            load_kwargs["device_map"] = {"": device}
        # Under DeepSpeed ZeRO-3 transformers builds the model inside `deepspeed.zero.Init`, which records the
        # `__init__` of each module class defined meanwhile and puts that one back on exit: a modeling file first
        # imported there loses the kernels wrapper of its attention classes' `__init__` (`use_kernelized_func`), and
        # every model built afterwards (a teacher) fails in attention. Importing the backbone's file here keeps it.
        backbone_class(target.base_model_type)
        model = cls._load_kept_weights(name, hub_kwargs, source_config, local_layers, load_kwargs)
        model._finish_loading(name, processor, added_token_rows)
        return model

    @classmethod
    def _load_kept_weights(cls, name: str, hub_kwargs: dict, source_config, local_layers: list[int],
                           load_kwargs: dict) -> "PumaForEmbedding":
        """transformers' own `from_pretrained` of the pruned configuration (`load_kwargs["config"]`) with the kept
        tensors of checkpoint `name`, renamed by the pruning key mapping."""
        is_kept = _is_kept_key_function(source_config, local_layers)
        lazy = loads_lazy_state_dict()
        # a loader of lazy state dicts opens every file anyway, and needs no checkpoint prefix (see _key_mapping)
        weights = _checkpoint_weights(name, hub_kwargs, is_kept, check_files=not lazy)
        mapping = _key_mapping(source_config, local_layers, weights.has_model_prefix)
        if lazy:
            # transformers 5 loads a checkpoint tensor under its own name when its mapped name is not a parameter and
            # its own name is one (a dropped layer 1 of a checkpoint whose layer 2 becomes layer 1): hand it the kept
            # tensors only, as the lazy memory-mapped safetensors slices its own loader reads from files.
            with contextlib.ExitStack() as files:
                model = super().from_pretrained(None, state_dict=weights.lazy_state_dict(is_kept, files),
                                                key_mapping=mapping, **load_kwargs)
        else:
            import tempfile

            # transformers 4 reads the files itself: a folder with the pruned config and links to the needed files
            with tempfile.TemporaryDirectory(prefix="puma-load-") as view:
                weights.write_view(view, load_kwargs["config"])
                model = super().from_pretrained(view, key_mapping=mapping, **load_kwargs)
        keep_pruned_names_on_save(model, mapping)
        return model

    def _finish_loading(self, name: str, processor, added_token_rows: tuple[int, int] | None) -> None:
        """After transformers' load: the checkpoint's name, the added embedding token's row, the processor and
        evaluation mode."""
        self.config.name_or_path = name
        self.name_or_path = name
        if added_token_rows is not None:
            self._init_embedding_token_row(*added_token_rows)
        self.processor = processor
        self.eval()

    def _init_embedding_token_row(self, token_id: int, num_trained_rows: int):
        """Initialises a newly added embedding token's input row to the mean of the tokenizer's existing rows.

        The mean keeps the new row inside the distribution the first layer was trained on, unlike the arbitrary
        padding row the release left in place; the row stays trainable and is saved. Of a larger vocabulary it is
        the mean of `EMBEDDING_MEAN_ROWS` evenly spaced rows (every 149th of Qwen's 151,643): each row read faults
        in its part of the memory-mapped table, and reading all of it (1.2 GB for an 8B model) took as long as the
        rest of the load; the sampled mean differs from the full one by about 3/100 of a row's spread.
        """
        if token_id >= self.get_input_embeddings().weight.shape[0]:
            self.resize_token_embeddings(token_id + 1)  # transformers' own resize (a checkpoint without spare rows)
        weight = self.get_input_embeddings().weight
        with torch.no_grad():
            rows = weight[:num_trained_rows:math.ceil(num_trained_rows / EMBEDDING_MEAN_ROWS)]
            # A matrix-vector product sums the rows (a strided view: no copy) without the float copy of the table
            # that `.float().mean()` makes, accumulating in float32 inside the kernel.
            ones = torch.ones(rows.shape[0], dtype=weight.dtype, device=weight.device)
            weight[token_id] = ((ones @ rows).float() / rows.shape[0]).to(weight.dtype)

    def set_processor(self, processor):
        """Attaches the family's processor (whose tokenizer must already know the embedding token, if any)."""
        added = _ensure_embedding_token(processor, self.config, is_puma=True)
        if added is not None:
            raise ValueError(
                f"The processor's tokenizer lacks the embedding token {self.config.embedding_token!r}; "
                "use the processor saved with this model."
            )
        self.processor = processor

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves weights (in the family's checkpoint format), config, the two model files (through `auto_map`), the
        processor, and the Sentence Transformers files, so the folder loads with `AutoModel` (transformers 4.57 and
        5.x) and with `SentenceTransformer` (both with `trust_remote_code=True`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.processor is not None and kwargs.get("is_main_process", True):
            self.processor.save_pretrained(save_directory)
            make_tokenizer_config_portable(os.path.join(save_directory, "tokenizer_config.json"))
            write_sentence_transformers_files(save_directory)

    # ------------------------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(
        self,
        inputs,
        *,
        instruction: str | None = None,
        is_query: bool | None = None,
        batch_size: int = 8,
        truncate_dim: int | None = None,
        normalize: bool = True,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = False,
        max_image_pixels: int | None = None,
        visual_pool: int | None = None,
    ):
        """Embeds texts, images, videos, PDF pages, and any of these with a text.

        Args:
            inputs: a list of inputs (a single input, not in a list, is embedded on its own and returns a 1-D
                result). An input is one of

                - a `str`: a path of an existing file is that file, whatever its name, by its kind: a video
                  (`.mp4`, `.webm`, `.mkv`, `.mov`, `.avi`, `.m4v`, or an animated `.gif`), a PDF page (`.pdf`: a
                  one-page PDF, or `"doc.pdf#page=3"` for page 3, pages numbered from 1) or else an image; a
                  one-line `str` that looks like such a path (by its suffix) but names no file raises
                  `FileNotFoundError`; any other `str` is text. URLs are not fetched;
                - a `PIL.Image.Image` or an `os.PathLike` (the same rules as a path `str`);
                - a video as frames: a list of `PIL.Image`s, image paths or `(H, W, 3)` arrays, or a `(T, H, W, 3)`
                  or `(T, 3, H, W)` `uint8` array or tensor;
                - a dict of a text and at most one visual: `{"text": ...}` (always text), `{"image": ...}`,
                  `{"video": file | folder of frames | frames}` with optional `"fps"` (frames sampled per second of
                  a file) and
                  `"max_frames"` (as Qwen3-VL-Embedding's inputs), or `{"pdf": path, "page": n}` (pages from 1; a
                  one-page PDF needs no page), each with an optional `"text"`.

                Videos are sampled and resized as the recipe says (`config.video_*`): a file at `video_fps` frames
                per second, `video_min_frames` to `video_max_frames` of them, an even number; a frame list thinned
                evenly to `video_max_frames`; each frame within `video_min_pixels`..`video_max_pixels` and the clip
                within `video_total_pixels`. Files are decoded with PyAV (`pip install av`) or, without it,
                torchcodec. PDF pages are rendered with pypdfium2 (`pip install pypdfium2`) at `config.pdf_dpi`,
                then resized as images. An unreadable, empty or oversized file raises an error naming it.
            instruction: task instruction; giving one makes the inputs queries (as Sentence Transformers applies a
                `prompt` and Qwen3-VL-Embedding an `instruction` to what they embed). Where it goes is the recipe's.
            is_query: whether the inputs are queries or candidates; default: queries exactly when an instruction is
                given. Candidates are embedded without an instruction, so `is_query=False` with one raises.
            batch_size: inputs per forward pass; inputs are sorted by length into batches (videos apart from the rest),
                order is restored.
            truncate_dim: keep the first `truncate_dim` dimensions (Matryoshka), renormalised if `normalize`.
            normalize: L2-normalise the returned embeddings.
            show_progress_bar: default: shown when there are more than 10 batches.
            convert_to_numpy: return a numpy array instead of a tensor.
            max_image_pixels: reject larger images, video frames and rendered PDF pages (decompression bombs);
                default `PIL.Image.MAX_IMAGE_PIXELS`.
            visual_pool: visual-token reduction factor (default `config.visual_pool`): each image's and video
                frame's merged tokens are pooled `visual_pool` x `visual_pool` before the decoder (see
                `PumaConfig.visual_pool`); a model not trained at that factor (`config.trained_visual_pools`) embeds
                less faithfully.

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
            raise ValueError("inputs is None; pass a list of texts, images, videos or {'text':..., 'image':...} "
                             "dicts.")
        items = [inputs] if single else list(inputs)
        if not items:
            raise ValueError("inputs is an empty list; there is nothing to encode.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        hidden_size = self.config.text_config.hidden_size
        if truncate_dim is not None and not 0 < truncate_dim <= hidden_size:
            raise ValueError(f"truncate_dim={truncate_dim} is outside 1..{hidden_size} (the embedding dimension).")

        if is_query is None:
            is_query = instruction is not None
        if not is_query:
            if instruction:
                raise ValueError("instruction applies to queries only; drop it to embed candidates, or drop "
                                 "is_query=False.")
            instruction = None  # candidates get the recipe's default, whatever empty instruction was passed
        examples = [parse_input(item, i, max_image_pixels, self.config) for i, item in enumerate(items)]
        prompts = [build_prompt(self.config, text, visual, instruction, self.processor.tokenizer)
                   for text, visual in examples]
        lengths = [_estimate_length(self.config, prompt, visual) for prompt, (_, visual) in zip(prompts, examples)]
        # videos are batched apart: transformers 5.4 to 5.1x cannot place a Qwen2.5-VL batch mixing images and videos
        batches = []
        for has_video in (False, True):
            group = [i for i in range(len(items)) if (visual_kind(examples[i][1]) == "video") == has_video]
            order = sorted(group, key=lambda i: -lengths[i])
            batches += [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        if show_progress_bar is None:
            show_progress_bar = len(batches) > 10

        from tqdm.auto import tqdm  # transformers' own progress bar dependency

        results = [None] * len(items)
        for batch in tqdm(batches, desc="Encoding", disable=not show_progress_bar):
            features = featurize(self.processor, self.config, [prompts[i] for i in batch],
                                 [examples[i][1] for i in batch], names=[f"inputs[{i}]" for i in batch])
            embeddings = self(**self.features_on_device(features), visual_pool=visual_pool).raw_embeddings.float()
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

    def features_on_device(self, features) -> dict:
        """Processor features as `forward` takes them: tensors on the model's device, pixel values in its dtype."""
        features = {key: value.to(self.device) for key, value in features.items() if torch.is_tensor(value)}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in features:
                features[key] = features[key].to(self.dtype)
        return features

    def build_prompt(self, text: str | None, visual=None, instruction: str | None = None) -> str:
        """The chat prompt of one input; see the module-level `build_prompt`."""
        tokenizer = self.processor.tokenizer if self.processor is not None else None
        return build_prompt(self.config, text, visual, instruction, tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# Visual-token reduction (the grid arithmetic of `PumaForEmbedding.reduce_visual_inputs`)
# ----------------------------------------------------------------------------------------------------------------
def reduced_grid_thw(grid_thw: torch.LongTensor, merge: int, factor: int) -> torch.LongTensor:
    """The `(num_visuals, 3)` patch grids whose merged grids are those of `grid_thw` pooled `factor` x `factor`
    with ceil: `(t, ceil(h / merge / factor) * merge, ceil(w / merge / factor) * merge)`; the family's
    `get_rope_index` reads positions of the reduced tokens from them."""
    reduced = grid_thw.clone()
    reduced[:, 1:] = (grid_thw[:, 1:] // merge + factor - 1) // factor * merge
    return reduced


def visual_keep_pattern(grid_thw: torch.LongTensor, merge: int, factor: int) -> torch.BoolTensor:
    """Which of the placeholder tokens of the visuals of `grid_thw` (in order, `t * h/merge * w/merge` each, frame
    after frame) a reduction by `factor` keeps: the first `ceil(h/merge/factor) * ceil(w/merge/factor)` of each
    frame. A frame's tokens are contiguous in every family's prompt (Qwen3-VL puts a timestamp between frames)."""
    pattern = []
    for (t, h, w), (_, rh, rw) in zip(grid_thw.tolist(), reduced_grid_thw(grid_thw, merge, factor).tolist()):
        tokens, kept = (h // merge) * (w // merge), (rh // merge) * (rw // merge)
        frame = torch.zeros(tokens, dtype=torch.bool)
        frame[:kept] = True
        pattern.append(frame.repeat(t))
    return torch.cat(pattern) if pattern else torch.zeros(0, dtype=torch.bool)


def pool_visual_grid(features: torch.Tensor, grid_thw, merge: int, factor: int, mode: str = "avg") -> torch.Tensor:
    """Merged visual features `(t * h/merge * w/merge, dim)` of one image or video (patch grid `grid_thw`, in the
    merger's raster order over frames, rows, columns) pooled per frame to `(t * ceil(h/merge/factor) *
    ceil(w/merge/factor), dim)`: `"avg"` averages each `factor` x `factor` window, a partial window at an odd edge
    over the cells it covers; `"bilinear"` resamples the grid (antialiased)."""
    t, h, w = (int(size) for size in grid_thw)
    rows, cols = h // merge, w // merge
    # pooled in float32 at least: bf16 window sums round, and CPU has no bf16 antialiased bilinear kernel
    wide = torch.promote_types(features.dtype, torch.float32)
    grid = features.reshape(t, rows, cols, -1).permute(0, 3, 1, 2).to(wide)  # (t, dim, rows, cols)
    if mode == "avg":
        # with no padding, ceil_mode's edge windows divide by the cells inside the input
        pooled = F.avg_pool2d(grid, factor, ceil_mode=True)
    else:
        size = (-(-rows // factor), -(-cols // factor))
        pooled = F.interpolate(grid, size=size, mode="bilinear", align_corners=False, antialias=True)
    return pooled.permute(0, 2, 3, 1).reshape(-1, features.shape[-1]).to(features.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Prompts and processor features (shared by `encode`, the training collator and the Sentence Transformers module)
# ----------------------------------------------------------------------------------------------------------------
def format_string(text: str | None) -> str:
    """The release's `format_string` (JiuTian-VL/PUMA `src/utils.py`, UniIR): drop `"\\r"`, strip whitespace and
    surrounding double quotes, capitalise the first letter and end with a full stop unless it ends with `.`, `?`
    or `!`."""
    text = (text or "").replace("\r", "").strip().strip('"')
    if text:
        text = text[0].upper() + text[1:]
        text = text if text[-1] in ".?!" else text + "."
    return text


def punctuate(instruction: str) -> str:
    """Qwen3-VL-Embedding's instruction rule: strip, and end with a full stop unless the last character is
    punctuation (any Unicode category P)."""
    import unicodedata

    instruction = instruction.strip()
    if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
        instruction += "."
    return instruction


def visual_kind(visual) -> str | None:
    """`"image"`, `"video"` or `None` for what `build_prompt` and `featurize` take as an input's visual: `None` or
    `False` (none), `True` or an image (an image), `"image"`/`"video"`, or a `VideoInput` / `SampledVideo`."""
    if visual is None or visual is False:
        return None
    if isinstance(visual, (VideoInput, SampledVideo)) or visual == "video":
        return "video"
    return "image"


def build_prompt(config: PumaConfig, text: str | None, visual=None, instruction: str | None = None,
                 tokenizer=None) -> str:
    """The chat prompt of one input: system turn, user turn (the image or video, then instruction and text, then
    suffix), assistant turn, as `config`'s recipe says. `visual` is the input's image or video, or just whether it
    has an image (`True`) or which visual it has (`"image"`, `"video"`); see `visual_kind`.

    With the release recipe this is `ret_oneword.py`'s prompt: `format_string(format_string(instruction) + "\\n" +
    text)`, truncated to `config.max_text_tokens` tokens of `tokenizer` before the suffix, so the embedding token is
    never cut off. With `instruction_placement="system"` the instruction replaces the system prompt; an empty one
    (`""`, or blank under `punctuate_instruction`) is an empty system turn with `keep_empty_instruction` (GME) and
    else leaves the default.
    """
    text = text or ""
    system = config.system_prompt
    if instruction is not None:
        if config.punctuate_instruction:
            instruction = punctuate(instruction)
        if config.instruction_placement == "system":
            if instruction or config.keep_empty_instruction:
                system = instruction
        elif instruction:
            if config.format_text:
                instruction = format_string(instruction)
            text = config.instruction_template.format(instruction=instruction.strip(), text=text)
    if config.format_text:
        text = format_string(text)
    if text and tokenizer is not None and config.max_text_tokens is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > config.max_text_tokens:
            text = tokenizer.decode(ids[: config.max_text_tokens])
    kind = visual_kind(visual)
    if kind is None and not text:
        raise ValueError("An input has neither text nor image nor video.")
    modality = ",".join(sorted(part for part in (kind, "text" if text else None) if part))
    words = config.modality_words.get(modality) or PRESETS[config.preset]["modality_words"][modality]
    vision = {None: "", "image": "<|vision_start|><|image_pad|><|vision_end|>",
              "video": "<|vision_start|><|video_pad|><|vision_end|>"}[kind]
    user = vision + text + config.user_suffix_template.format(modality=words)
    assistant = config.assistant_template.format(embedding_token=config.embedding_token)
    system = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return f"{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}"


def resize_image(image, config: PumaConfig):
    """`image` resized with PIL bicubic so that each side is a multiple of the vision patch size times the merge
    size and its pixel count lies in `[config.min_pixels, config.max_pixels]` (qwen-vl-utils' `fetch_image`)."""
    from PIL import Image

    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    height, width = smart_resize(image.height, image.width, factor=factor, min_pixels=config.min_pixels,
                                 max_pixels=config.max_pixels)
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), resample=Image.BICUBIC)


def processor_kwargs(config: PumaConfig) -> dict:
    """Image processor keywords of the recipe: no resize after `resize_image`, or a second one into the processor
    pixel range."""
    if config.processor_min_pixels is None:
        return {"do_resize": False}
    return image_processor_pixel_kwargs(config.processor_min_pixels, config.processor_max_pixels)


# The prompt's video item as the chat templates write it. Qwen3-VL's processor puts a vision start/end pair around
# each frame's tokens itself; transformers 4.57, 5.4 and >= 5.25 then drop this outer pair, 5.24 keeps it. Handing
# the bare video token over gives every version the same, published expansion.
_VIDEO_ITEM = "<|vision_start|><|video_pad|><|vision_end|>"


def featurize(processor, config: PumaConfig, prompts: list[str], visuals: list, names: list[str] | None = None) -> dict:
    """Right-padded processor features of `prompts`; `visuals[i]` is prompt i's RGB image, video (`VideoInput`,
    decoded here, or `SampledVideo`) or `None`. `names` name the inputs in errors (default `inputs[i]`).

    With `config.max_prompt_tokens` the whole tokenised prompt is truncated on the right to that many tokens (the
    published embedders' truncation); a prompt whose image or video tokens alone pass it raises, naming the input."""
    names = names if names is not None else [f"inputs[{i}]" for i in range(len(prompts))]
    images, videos = [], []
    for visual in visuals:
        kind = visual_kind(visual)
        if kind == "image":
            images.append(resize_image(visual, config))
        elif kind == "video":
            videos.append(visual if isinstance(visual, SampledVideo) else sample_video(visual, config))
    kwargs = {"images_kwargs": processor_kwargs(config)}
    if videos:
        if config.base_model_type.startswith("qwen3_vl"):
            prompts = [prompt.replace(_VIDEO_ITEM, "<|video_pad|>") for prompt in prompts]
        kwargs["videos"] = [video.frames for video in videos]
        kwargs["videos_kwargs"] = {"do_resize": False, "do_sample_frames": False,
                                   "video_metadata": [dict(video.metadata) for video in videos],
                                   **video_processor_kwargs(processor.video_processor,
                                                            [video.sample_fps for video in videos])}
    if config.max_prompt_tokens is not None:
        kwargs.update(truncation=True, max_length=config.max_prompt_tokens)
    try:
        return processor(text=prompts, images=images or None, padding=True, padding_side="right",
                         return_tensors="pt", **kwargs)
    except ValueError as err:
        if config.max_prompt_tokens is None or "token count" not in str(err):
            raise
        with_visuals = ", ".join(name for name, visual in zip(names, visuals) if visual_kind(visual))
        raise ValueError(
            f"Truncating the prompts of {with_visuals} to max_prompt_tokens={config.max_prompt_tokens} would cut "
            f"into their image or video tokens; lower max_pixels or video_total_pixels, or raise max_prompt_tokens "
            f"({err})"
        ) from err


def _estimate_length(config: PumaConfig, prompt: str, visual) -> int:
    """Token count of a prompt for length bucketing: characters stand in for text tokens, patches for image tokens,
    the recipe's video budget for a video's."""
    length = len(prompt) // 4
    factor = config.vision_config.patch_size * config.vision_config.spatial_merge_size
    kind = visual_kind(visual)
    if kind == "video":
        length += config.video_total_pixels // (factor * factor)
    elif kind == "image" and hasattr(visual, "width"):
        pixels = min(max(visual.width * visual.height, config.min_pixels), config.max_pixels)
        length += pixels // (factor * factor)
    return length


# ----------------------------------------------------------------------------------------------------------------
# Sentence Transformers
# ----------------------------------------------------------------------------------------------------------------
ST_MODALITIES = ("text", "image", "image+text", "video", "text+video", "message")
ST_REQUIREMENT = ">=6.0"

try:  # optional: the module class Sentence Transformers loads from a PUMA folder
    from sentence_transformers.base.modality import is_message_dict
    from sentence_transformers.sentence_transformer.modules import Transformer as _SentenceTransformersTransformer
except ImportError:
    _SentenceTransformersTransformer = None

if _SentenceTransformersTransformer is not None:

    class PumaSentenceTransformer(_SentenceTransformersTransformer):
        """Sentence Transformers' `Transformer` whose inputs are PUMA prompts: texts, images (PIL or paths),
        videos (paths, frames) and `{"text", "image" | "video"}` dicts (see `PumaForEmbedding.encode`). Loading, the
        forward pass (through `modality_config`, reading `raw_embeddings`) and saving are Sentence Transformers' own;
        only `preprocess` builds the recipe's prompt, which a chat template cannot (instruction placement, modality
        suffix, truncation before the pooled token).
        A `prompt` (from `encode(prompt=...)` or a named entry of `prompts`, as `encode_query` uses) is the query
        instruction."""

        def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict:
            # `task`, `processing_kwargs` and `max_length` are ignored: prompt length and pixels are config fields.
            for index, item in enumerate(inputs):
                if is_message_dict(item) or (isinstance(item, list) and item and is_message_dict(item[0])):
                    raise ValueError(
                        f"inputs[{index}] is a chat message; PUMA builds its own prompt from texts, images and "
                        "{'text': ..., 'image': ...} dicts."
                    )
            config = self.model.config
            examples = [parse_input(item, index, config=config) for index, item in enumerate(inputs)]
            prompts = [build_prompt(config, text, visual, prompt or None, self.processor.tokenizer)
                       for text, visual in examples]
            features = dict(featurize(self.processor, config, prompts, [visual for _, visual in examples]))
            present = {visual_kind(visual) for _, visual in examples if visual is not None} \
                | {"text" for text, _ in examples if text}
            features["modality"] = tuple(sorted(present)) if len(present) > 1 else present.pop()
            return features


def write_sentence_transformers_files(out_dir: str, prompts: dict[str, str] | None = None) -> None:
    """Writes the files `SentenceTransformer(out_dir, trust_remote_code=True)` loads (Sentence Transformers >= 6).

    Module 0 is `modeling_puma.PumaSentenceTransformer` (in this file, which travels with the model); its
    `modality_config` reads `raw_embeddings` from the model's forward for every modality ("message" is listed so that
    batches mixing texts and images are accepted). Module 1 L2-normalises, like `PumaForEmbedding.encode`.
    """
    import importlib.metadata

    def version(distribution):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "modeling_puma.PumaSentenceTransformer"},
        {"idx": 1, "name": "1", "path": "1_Normalize",
         "type": "sentence_transformers.base.modules.normalize.Normalize"},
    ]
    transformer_config = {
        "transformer_task": "feature-extraction",
        "modality_config": {name: {"method": "forward", "method_output_name": "raw_embeddings"}
                            for name in ST_MODALITIES},
        "module_output_name": "sentence_embedding",
        "unpad_inputs": False,  # the families' 3-D rotary positions need padded batches
    }
    versions = {"transformers": transformers.__version__, "pytorch": version("torch")}
    if (st_version := version("sentence-transformers")) is not None:
        versions["sentence_transformers"] = st_version
    model_config = {
        "__version__": versions,
        "model_type": "SentenceTransformer",
        "prompts": dict(prompts or {}),
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
        "requirements": {
            "sentence-transformers": {
                "specifier": ST_REQUIREMENT,
                "reason": "modeling_puma.PumaSentenceTransformer extends the Transformer module of Sentence "
                          "Transformers 6.",
            },
        },
    }
    files = {"modules.json": modules, "sentence_bert_config.json": transformer_config,
             "config_sentence_transformers.json": model_config,
             os.path.join("1_Normalize", "config.json"): {"module_input_name": "sentence_embedding",
                                                          "module_output_name": "sentence_embedding"}}
    for relative, value in files.items():
        path = os.path.join(out_dir, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, ensure_ascii=False)
            f.write("\n")


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
# The keys of an input dict: a text, at most one visual, and a video's own sampling.
_VISUAL_KEYS = ("image", "video", "pdf")
_INPUT_KEYS = ("text", *_VISUAL_KEYS, "page", "fps", "max_frames")
# `path#page=N`, the PDF open parameter naming a page (pages numbered from 1)
_PDF_PAGE = re.compile(r"^(?P<path>.+\.pdf)#page=(?P<page>\d+)$", re.IGNORECASE | re.DOTALL)


def _is_url(item: str) -> bool:
    return item.strip().lower().startswith(URL_PREFIXES)


def _is_path_like(item: str) -> bool:
    return "\n" not in item.strip() and len(item.strip()) < 4096


def _looks_like_image_path(item: str) -> bool:
    """A one-line string ending in an image suffix: meant as an image path, whether or not the file exists."""
    return _is_path_like(item) and item.strip().lower().endswith(IMAGE_SUFFIXES)


def _looks_like_media_path(item: str) -> bool:
    """A one-line string ending in a video or PDF suffix (or naming a PDF page): meant as a path."""
    stripped = item.strip()
    return _is_path_like(item) and (stripped.lower().endswith(VIDEO_SUFFIXES + (".pdf",))
                                    or _PDF_PAGE.match(stripped) is not None)


def parse_input(item, index: int = 0, max_image_pixels: int | None = None, config: PumaConfig | None = None):
    """`(text, visual)` of one `encode` input (see `encode` for the rules): `visual` is an RGB `PIL.Image` (an image
    or a rendered PDF page), a `VideoInput` (decoded when featurized) or `None`. `config` sets how images are read
    (EXIF rotation, transparency) and the PDF resolution; without one, this repository's defaults."""
    from PIL import Image

    if item is None:
        raise ValueError(f"inputs[{index}] is None.")
    name = f"inputs[{index}]"
    if isinstance(item, dict):
        unknown = set(item) - set(_INPUT_KEYS)
        if unknown:
            raise ValueError(f"{name} has unknown keys {sorted(unknown)}; use 'text' and at most one of 'image', "
                             "'video' (with optional 'fps', 'max_frames') or 'pdf' (with 'page').")
        text = item.get("text")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{name}['text'] must be a string, got {type(text).__name__}.")
        given = [key for key in _VISUAL_KEYS if item.get(key) is not None]
        if len(given) > 1:
            raise ValueError(f"{name} has {' and '.join(repr(key) for key in given)}; an input holds one image, video "
                             "or PDF page (with a text).")
        for key, owner in (("page", "pdf"), ("fps", "video"), ("max_frames", "video")):
            if item.get(key) is not None and owner not in given:
                raise ValueError(f"{name}[{key!r}] applies to a {owner!r} input only.")
        if text is None and not given:
            raise ValueError(f"{name} has neither 'text' nor 'image', 'video' or 'pdf'.")
        visual = None
        if "image" in given:
            visual = load_image(item["image"], index, max_image_pixels, config)
        elif "video" in given:
            visual = video_input(item["video"], name, item.get("fps"), item.get("max_frames"), max_image_pixels)
        elif "pdf" in given:
            visual = load_pdf_page(item["pdf"], item.get("page"), name, max_image_pixels, config)
        return text, visual
    if isinstance(item, Image.Image):
        return None, load_image(item, index, max_image_pixels, config)
    if isinstance(item, (list, tuple)) or (hasattr(item, "ndim") and getattr(item, "ndim", 0) == 4):
        return None, video_input(item, name, max_pixels=max_image_pixels)
    if isinstance(item, os.PathLike):
        return None, _load_path(os.fspath(item), index, max_image_pixels, config)
    if isinstance(item, str):
        if not item.strip():
            raise ValueError(f"{name} is an empty string.")
        if os.path.isfile(item) or _is_url(item) or _looks_like_image_path(item) or _looks_like_media_path(item):
            return None, _load_path(item, index, max_image_pixels, config)
        return item, None
    raise ValueError(f"{name} has unsupported type {type(item).__name__}; use str, PIL.Image, a path, a list of "
                     "frames or a dict.")


def _load_path(path: str, index: int, max_image_pixels: int | None, config: PumaConfig | None):
    """The visual a path names, by its kind: a video, a PDF page or an image (an animated GIF is a video)."""
    name = f"inputs[{index}]"
    if not os.path.isfile(path) and not _is_url(path):
        match = _PDF_PAGE.match(path.strip())
        if match is not None:
            return load_pdf_page(match.group("path"), int(match.group("page")), name, max_image_pixels, config)
    lowered = path.strip().lower()
    if lowered.endswith(".pdf"):
        return load_pdf_page(path, None, name, max_image_pixels, config)
    if lowered.endswith(VIDEO_SUFFIXES) and not lowered.endswith(".gif"):
        return video_input(path, name, max_pixels=max_image_pixels)
    if lowered.endswith(".gif") and os.path.isfile(path) and _is_animated(path):
        return video_input(path, name, max_pixels=max_image_pixels)
    return load_image(path, index, max_image_pixels, config)


def media_file(path: str) -> str:
    """The file a media path names: `doc.pdf` of the page reference `doc.pdf#page=3`, else the path itself."""
    match = _PDF_PAGE.match(path.strip()) if not os.path.isfile(path) else None
    return match.group("path") if match is not None else path


def _is_animated(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1) > 1
    except (OSError, SyntaxError):
        return False  # not readable as an image: `load_image` names the problem


def load_image(image, index: int = 0, max_image_pixels: int | None = None, config: PumaConfig | None = None,
               name: str | None = None):
    """Opens an image (or renders a `doc.pdf#page=N` page), applies EXIF rotation and converts it to RGB as
    `config` says (`exif_transpose`, `alpha_mode`; without a config: rotated, transparency on white), refusing
    URLs and missing, corrupt and oversized files. `name` names it in errors (default `inputs[index]`)."""
    from PIL import Image, UnidentifiedImageError

    name = name or f"inputs[{index}]"
    limit = max_image_pixels if max_image_pixels is not None else Image.MAX_IMAGE_PIXELS
    if not isinstance(image, Image.Image):
        if not isinstance(image, (str, os.PathLike)):
            raise ValueError(f"{name} image must be a PIL.Image or a path, got {type(image).__name__}.")
        path = os.fspath(image)
        if _is_url(path):
            raise ValueError(f"{name}: {path!r} is a URL; URLs are not fetched. Download the image first and "
                             "pass its path or a PIL.Image.")
        if not os.path.isfile(path):
            match = _PDF_PAGE.match(path.strip())
            if match is not None:
                return load_pdf_page(match.group("path"), int(match.group("page")), name, max_image_pixels, config)
            raise FileNotFoundError(f"{name}: image file {path!r} does not exist (to embed this string as "
                                    "text, pass {'text': ...}).")
        if path.lower().endswith(".pdf"):
            return load_pdf_page(path, None, name, max_image_pixels, config)
        try:
            opened = Image.open(path)
            _check_pixels(opened, limit, f"{name} ({path})")
            opened.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"{name}: {path!r} is not a readable image ({err}); to embed this string as "
                             "text, pass {'text': ...}.") from err
        except Image.DecompressionBombError as err:
            raise ValueError(f"{name}: {path!r} exceeds the pixel limit ({err}).") from err
        image = opened
    else:
        _check_pixels(image, limit, name)
    return to_rgb(image, config)


def to_rgb(image, config: PumaConfig | None = None):
    """`image` as RGB, rotated by its EXIF orientation and its transparency handled as `config` says
    (`exif_transpose`, `alpha_mode`); without a config: rotated, every transparent mode composited on white."""
    from PIL import Image, ImageOps

    exif_transpose = config.exif_transpose if config is not None else True
    alpha_mode = config.alpha_mode if config is not None else "composite"
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    if alpha_mode == "composite" and image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    elif alpha_mode == "composite_rgba" and image.mode == "RGBA":
        # qwen-vl-utils' `to_rgb`: the alpha channel as the mask of a paste on white
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def _check_pixels(image, limit: int | None, name: str) -> None:
    if limit is not None and image.width * image.height > limit:
        raise ValueError(
            f"{name} has {image.width}x{image.height} = {image.width * image.height} pixels, over the limit of {limit} "
            "(a possible decompression bomb); raise max_image_pixels to accept it."
        )


# ----------------------------------------------------------------------------------------------------------------
# Videos and PDF pages
# ----------------------------------------------------------------------------------------------------------------
# A video is sampled and resized as qwen-vl-utils 0.0.14's `fetch_video` does (the release Qwen3-VL-Embedding's
# published code installs): frame indices, the frame-count and pixel rules, and its resize (torchvision's bicubic
# antialiased resize of uint8 frames, written here with torch's own interpolation). Files are decoded with PyAV
# (FFmpeg bundled in its wheel) or torchcodec; frame counts come from the container's packets, as torchcodec's exact
# mode reads them (`stream.frames` is 0 for WebM and MKV). Both decoders are optional imports.
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".gif")
# qwen-vl-utils' temporal factor: frame counts are even, a pair of frames is one temporal patch
FRAME_FACTOR = 2
# qwen-vl-utils' frame rate of a frame list (the timestamps of a list of frames assume it)
FRAME_LIST_FPS = 2.0
# qwen-vl-utils' image token range (at twice the merged patch: see `_frame_list_frame`)
_IMAGE_MIN_TOKENS, _IMAGE_MAX_TOKENS = 4, 16384
_MAX_RATIO = 200
# Environment variable choosing the decoder of video files: "pyav" or "torchcodec" (default: PyAV when installed)
VIDEO_DECODER_VARIABLE = "PUMA_VIDEO_DECODER"


@dataclass
class VideoInput:
    """A video of an input, as given: a file path or a sequence of frames; `sample_video` decodes, samples and
    resizes it.

    Args:
        source: a file path or a file's bytes, an open torchcodec `VideoDecoder`, or frames (`PIL.Image`s, image
            paths, `(H, W, 3)` arrays, or a `(T, H, W, 3)` / `(T, 3, H, W)` array or tensor).
        name: how errors name it (`"inputs[3] (clip.mp4)"`).
        fps, max_frames: this input's own sampling rate (files) and frame cap, over the recipe's.
        max_pixels: the largest frame accepted (decompression bombs); default `PIL.Image.MAX_IMAGE_PIXELS`.
    """

    source: object
    name: str
    fps: float | None = None
    max_frames: int | None = None
    max_pixels: int | None = None


@dataclass
class SampledVideo:
    """A video ready for the family's video processor.

    Args:
        frames (`torch.FloatTensor` of shape `(frames, 3, height, width)`): resized frames, values in 0..255.
        metadata (`dict`): `fps` (of the source; `FRAME_LIST_FPS` for frame lists), `frames_indices` (the sampled
            frames' indices in the source), `total_num_frames`, as transformers' `VideoMetadata` reads them.
        sample_fps (`float`): frames per second of the sampled frames.
        name (`str`): how errors name the video.
    """

    frames: torch.Tensor
    metadata: dict
    sample_fps: float
    name: str


def video_input(source, name: str, fps: float | None = None, max_frames: int | None = None,
                max_pixels: int | None = None) -> VideoInput:
    """Checks a video as an input gives it (a path or frames; see `VideoInput`) without decoding it."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
        raise ValueError(f"{name}['fps'] must be a positive number, got {fps!r}.")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                   or max_frames < FRAME_FACTOR):
        raise ValueError(f"{name}['max_frames'] must be an integer >= {FRAME_FACTOR}, got {max_frames!r}.")
    if is_video_decoder(source):
        return VideoInput(source, f"{name} (a {type(source).__name__})", fps, max_frames, max_pixels)
    if isinstance(source, (bytes, bytearray)):  # a file's content (an undecoded 🤗 `Video` value)
        if not source:
            raise ValueError(f"{name}: the video file is empty (0 bytes).")
        return VideoInput(bytes(source), f"{name} (video bytes)", fps, max_frames, max_pixels)
    if isinstance(source, str):
        if _is_url(source):
            raise ValueError(f"{name}: {source!r} is a URL; URLs are not fetched. Download the video first and pass "
                             "its path.")
        if os.path.isdir(source):  # a folder of frames (how MMEB-V2 and the demo store videos)
            frames = frame_files(source)
            if not frames:
                raise ValueError(f"{name}: the video folder {source!r} holds no frame image.")
            return VideoInput(frames, f"{name} ({source})", fps, max_frames, max_pixels)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{name}: video file {source!r} does not exist.")
        return VideoInput(source, f"{name} ({source})", fps, max_frames, max_pixels)
    if hasattr(source, "ndim"):
        if source.ndim != 4:
            raise ValueError(f"{name}: a video array must have 4 dimensions (frames, height, width, 3) or (frames, "
                             f"3, height, width), got shape {tuple(source.shape)}.")
        if len(source) == 0:
            raise ValueError(f"{name}: the video has no frames.")
        return VideoInput(source, name, fps, max_frames, max_pixels)
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError(f"{name}: the video has no frames (an empty list).")
        return VideoInput(list(source), name, fps, max_frames, max_pixels)
    raise ValueError(f"{name}: a video must be a file path or a list of frames, got {type(source).__name__}.")


def frame_files(folder: str) -> list[str]:
    """The image files of a folder of video frames, natural-sorted (`frame_2` before `frame_10`), as MMEB-V2's
    harnesses read them."""
    def natural(name: str) -> list:
        return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]

    names = sorted((name for name in os.listdir(folder) if name.lower().endswith(IMAGE_SUFFIXES)), key=natural)
    return [os.path.join(folder, name) for name in names]


def is_video_decoder(source) -> bool:
    """Whether `source` is an open video decoder with torchcodec's `VideoDecoder` API (`metadata`, `get_frames_at`):
    what 🤗 datasets' `Video` feature and mteb's video tasks hold. It is sampled as a file is."""
    return hasattr(source, "get_frames_at") and hasattr(source, "metadata")


def sample_video(video: VideoInput, config: PumaConfig) -> SampledVideo:
    """Decodes, samples and resizes `video` as `config`'s recipe says (qwen-vl-utils 0.0.14's `fetch_video`).

    A file: `video_fps` frames per second (the input's `fps` first), between `video_min_frames` and
    `video_max_frames` (the input's `max_frames` first), an even number, at `torch.linspace(0, n - 1, k).round()`;
    a file of one frame repeats it. Frames: thinned to the frame cap at `numpy.linspace(0, n - 1, k, dtype=int)`,
    each first resized as qwen-vl-utils' `fetch_image` does, the last repeated to an even count. Then every frame
    is resized to one size: each side a multiple of the merged patch, the pixel count within `video_min_pixels` and
    `min(video_max_pixels, 2 * video_total_pixels / frames)` (at least 1.05 x `video_min_pixels`)."""
    max_frames = video.max_frames or config.video_max_frames
    if isinstance(video.source, (str, bytes)) or is_video_decoder(video.source):
        frames, metadata, sample_fps = _sample_video_file(video, config, video.fps or config.video_fps, max_frames)
    else:
        frames, metadata, sample_fps = _sample_frame_list(video, config, max_frames)
    factor = config.vision_config.patch_size * config.vision_config.spatial_merge_size
    count, _, height, width = frames.shape
    max_pixels = max(min(config.video_max_pixels, config.video_total_pixels / count * FRAME_FACTOR),
                     int(config.video_min_pixels * 1.05))
    height, width = qwen_vl_smart_resize(height, width, factor, config.video_min_pixels, max_pixels, video.name)
    return SampledVideo(resize_frames(frames, height, width), metadata, sample_fps, video.name)


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`(T, 3, H, W)` uint8 frames resized to `height x width`, as float32 in 0..255: torchvision's bicubic
    antialiased resize of uint8 tensors (interpolate in float32, clamp, round to uint8), as qwen-vl-utils calls it."""
    if tuple(frames.shape[-2:]) != (height, width):
        frames = F.interpolate(frames.float(), size=[height, width], mode="bicubic", align_corners=False,
                               antialias=True)
        frames = frames.clamp(0, 255).round().to(torch.uint8)
    return frames.float()


def qwen_vl_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: float,
                         name: str = "a video") -> tuple[int, int]:
    """qwen-vl-utils' `smart_resize`: `(height, width)` with each side a multiple of `factor` (at least `factor`)
    and their product in `[min_pixels, max_pixels]`, the aspect ratio kept as nearly as possible."""
    if max(height, width) / min(height, width) > _MAX_RATIO:
        raise ValueError(f"{name}: {width}x{height} frames have an aspect ratio over {_MAX_RATIO}.")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _frame_count(total: int, source_fps: float, fps: float, config: PumaConfig, max_frames: int) -> int:
    """qwen-vl-utils' `smart_nframes` with `fps`, `min_frames` and `max_frames`: the number of frames sampled from a
    file of `total` frames at `source_fps`; 0 when the file has fewer than two frames."""
    min_frames = math.ceil(config.video_min_frames / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
    wanted = total / source_fps * fps if source_fps > 0 else min_frames
    wanted = min(min(max(wanted, min_frames), max_frames), total)
    return math.floor(wanted / FRAME_FACTOR) * FRAME_FACTOR


def _sample_video_file(video: VideoInput, config: PumaConfig, fps: float, max_frames: int):
    """`(frames uint8 (T, 3, H, W), metadata, sample_fps)` of a video file."""

    def choose(total: int, source_fps: float) -> list[int]:
        count = _frame_count(total, source_fps, fps, config, max_frames)
        if count < FRAME_FACTOR:  # a one-frame file: qwen-vl-utils raises; the frame is repeated instead
            return [0] * FRAME_FACTOR
        return torch.linspace(0, total - 1, count).round().long().tolist()

    frames, indices, total, source_fps = decode_video(video.source, choose, video.max_pixels, video.name)
    metadata = {"fps": source_fps, "frames_indices": indices, "total_num_frames": total}
    return frames, metadata, len(indices) / max(total, 1e-6) * source_fps


def _sample_frame_list(video: VideoInput, config: PumaConfig, max_frames: int):
    """`(frames uint8 (T, 3, H, W), metadata, sample_fps)` of a video given as frames."""
    import numpy as np

    source = video.source
    if hasattr(source, "ndim"):  # (T, H, W, 3) or (T, 3, H, W), uint8
        array = source.detach().cpu().numpy() if torch.is_tensor(source) else np.asarray(source)
        if array.shape[1] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(0, 2, 3, 1)
        source = list(array)
    if len(source) > max_frames:  # Qwen3-VL-Embedding's `sample_frames`
        source = [source[i] for i in np.linspace(0, len(source) - 1, max_frames, dtype=int).tolist()]
    images = [_frame_list_frame(frame, config, f"{video.name} frame {i}", video.max_pixels)
              for i, frame in enumerate(source)]
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"{video.name}: its frames differ in size ({sorted(sizes)}); give frames of one size.")
    images += [images[-1]] * (-len(images) % FRAME_FACTOR)
    frames = torch.stack([torch.from_numpy(np.array(image).transpose(2, 0, 1)) for image in images])
    metadata = {"fps": FRAME_LIST_FPS, "frames_indices": list(range(len(images))), "total_num_frames": len(images)}
    return frames, metadata, FRAME_LIST_FPS


def _frame_list_frame(frame, config: PumaConfig, name: str, max_pixels: int | None):
    """One frame of a frame list as qwen-vl-utils 0.0.14 reads it: RGB, then resized by `fetch_image` with the
    image token range at twice the merged patch (0.0.14 passes the merged patch size where `fetch_image` takes the
    patch size; the second resize, of the whole clip, sets the final size)."""
    import numpy as np
    from PIL import Image

    if isinstance(frame, np.ndarray) or torch.is_tensor(frame):
        array = frame.detach().cpu().numpy() if torch.is_tensor(frame) else frame
        if array.ndim != 3:
            raise ValueError(f"{name}: a frame array must be (height, width, 3), got shape {tuple(array.shape)}.")
        if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)
        frame = Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)).squeeze())
    image = load_image(frame, 0, max_pixels, config, name=name)
    factor = 2 * config.vision_config.patch_size * config.vision_config.spatial_merge_size
    height, width = qwen_vl_smart_resize(image.height, image.width, factor, _IMAGE_MIN_TOKENS * factor ** 2,
                                         _IMAGE_MAX_TOKENS * factor ** 2, name)
    return image.resize((width, height), resample=Image.BICUBIC)


def decode_video(path: str, choose, max_pixels: int | None = None, name: str | None = None):
    """Decodes the frames `choose(total_frames, fps)` picks from the video file at `path`; returns
    `(frames uint8 (T, 3, H, W), indices, total_frames, fps)`. `path` may be an open torchcodec `VideoDecoder`. The
    decoder is PyAV, or torchcodec when PyAV is not installed (the `PUMA_VIDEO_DECODER` environment variable picks
    one: `pyav` or `torchcodec`). An unreadable file, one without frames, or frames over `max_pixels` pixels raise a
    `ValueError` naming `name`."""
    from PIL import Image

    name = name or str(path)
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    if is_video_decoder(path):  # already open (a torchcodec VideoDecoder)
        return _frames_from_decoder(path, choose, limit, name)
    decoder = os.environ.get(VIDEO_DECODER_VARIABLE, "").strip().lower() or None
    if decoder not in (None, "pyav", "torchcodec"):
        raise ValueError(f"{VIDEO_DECODER_VARIABLE}={decoder!r}: use 'pyav' or 'torchcodec'.")
    if decoder is None:
        decoder = "pyav" if importlib.util.find_spec("av") is not None else \
            "torchcodec" if importlib.util.find_spec("torchcodec") is not None else "pyav"
    decode = _decode_with_torchcodec if decoder == "torchcodec" else _decode_with_pyav
    return decode(path, choose, limit, name)


def _decode_with_pyav(path: str, choose, limit: int | None, name: str):
    try:
        import av
    except ImportError as err:
        raise ImportError(f"Decoding {name} needs PyAV: pip install av (or pip install 'puma-embed[video]'); "
                          "torchcodec works too.") from err
    def opened():
        return av.open(io.BytesIO(path) if isinstance(path, bytes) else path)

    try:
        with opened() as container:
            stream = _video_stream(container, name, limit)
            # frames and the span of the stream from the packets, without decoding (as torchcodec's exact mode);
            # in exact fractions of the time base, so that a frame count at a boundary does not flip
            total, begin, end = 0, None, None
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's closing empty packet
                total += 1
                if packet.pts is not None:
                    start = packet.pts * stream.time_base
                    stop = start + (packet.duration or 0) * stream.time_base
                    begin, end = min(begin, start) if begin is not None else start, max(end or stop, stop)
        if total == 0:
            raise ValueError(f"{name} holds no video frames.")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(total / (end - begin)) if begin is not None and end > begin else float(rate or 0)
        indices = choose(total, fps)
        wanted = sorted(set(indices))
        decoded = {}
        with opened() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for position, frame in enumerate(container.decode(stream)):
                if position in wanted:
                    decoded[position] = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                if position >= wanted[-1]:
                    break
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{name} is not a readable video ({type(err).__name__}: {err}).") from err
    if not decoded:
        raise ValueError(f"{name} holds no decodable video frame.")
    if len(decoded) < len(wanted):  # fewer frames decode than the container lists: the last one stands in
        last = decoded[max(decoded)]
        logger.warning(f"{name}: {total} frames listed, {max(decoded) + 1} decoded; the last decoded frame stands in "
                       "for the missing ones.")
        decoded.update({position: last for position in wanted if position not in decoded})
    return torch.stack([decoded[i] for i in indices]), indices, total, fps


def _video_stream(container, name: str, limit: int | None):
    if not container.streams.video:
        raise ValueError(f"{name} has no video stream.")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if limit is not None and width * height > limit:
        raise ValueError(f"{name} has {width}x{height} = {width * height} pixels per frame, over the limit of "
                         f"{limit} (a possible decompression bomb); raise max_image_pixels to accept it.")
    return stream


def _decode_with_torchcodec(path: str, choose, limit: int | None, name: str):
    try:
        from torchcodec.decoders import VideoDecoder
    except ImportError as err:
        raise ImportError(f"Decoding {name} with torchcodec needs torchcodec and FFmpeg's libraries: pip install "
                          "torchcodec (or use PyAV: pip install av).") from err
    try:
        decoder = VideoDecoder(path, seek_mode="exact")
    except (RuntimeError, OSError, ValueError) as err:
        raise ValueError(f"{name} is not a readable video ({type(err).__name__}: {err}).") from err
    return _frames_from_decoder(decoder, choose, limit, name)


def _frames_from_decoder(decoder, choose, limit: int | None, name: str):
    """The frames `choose` picks from an open torchcodec `VideoDecoder` (its frame count and rate from its
    metadata)."""
    metadata = decoder.metadata
    width, height = metadata.width, metadata.height
    if limit is not None and width is not None and height is not None and width * height > limit:
        raise ValueError(f"{name} has {width}x{height} = {width * height} pixels per frame, over the limit of {limit} "
                         "(a possible decompression bomb); raise max_image_pixels to accept it.")
    total = metadata.num_frames
    if not total:
        raise ValueError(f"{name} holds no video frames.")
    indices = choose(total, metadata.average_fps)
    try:
        frames = decoder.get_frames_at(indices=indices).data
    except (RuntimeError, OSError) as err:
        raise ValueError(f"{name} is not a readable video ({type(err).__name__}: {err}).") from err
    return frames, indices, total, metadata.average_fps


def load_pdf_page(path, page: int | None, name: str, max_pixels: int | None = None, config: PumaConfig | None = None,
                  dpi: float | None = None):
    """Page `page` (from 1; `None` for a one-page PDF) of the PDF at `path`, rendered with pypdfium2 at `dpi`
    (default `config.pdf_dpi`, 200 without a config) on white, as an RGB `PIL.Image`. A missing or unreadable file,
    a page out of range or a rendering over `max_pixels` pixels raise, naming the file."""
    from PIL import Image

    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(path, str):
        raise ValueError(f"{name}: a PDF must be a file path, got {type(path).__name__}.")
    if page is not None and (isinstance(page, bool) or not isinstance(page, int)):
        raise ValueError(f"{name}['page'] must be an integer (pages are numbered from 1), got {page!r}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: PDF file {path!r} does not exist.")
    pdfium = _pypdfium2(name)
    dpi = dpi or (config.pdf_dpi if config is not None else PRESETS["puma"]["pdf_dpi"])
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        document = pdfium.PdfDocument(path)
    except pdfium.PdfiumError as err:
        raise ValueError(f"{name}: {path!r} is not a readable PDF ({err}).") from err
    try:
        pages = len(document)
        if page is None and pages != 1:
            raise ValueError(f"{name}: {path!r} has {pages} pages; name one with {{'pdf': path, 'page': n}} or "
                             f"'{path}#page=n' (pages numbered from 1).")
        page = 1 if page is None else page
        if not 1 <= page <= pages:
            raise ValueError(f"{name}: {path!r} has {pages} page{'s' if pages != 1 else ''}; there is no page {page} "
                             "(pages are numbered from 1).")
        pdf_page = document[page - 1]
        try:
            width, height = (math.ceil(side * dpi / 72) for side in pdf_page.get_size())
            if limit is not None and width * height > limit:
                raise ValueError(f"{name}: page {page} of {path!r} renders to {width}x{height} pixels at {dpi} dpi, "
                                 f"over the limit of {limit}; lower pdf_dpi or raise max_image_pixels.")
            image = pdf_page.render(scale=dpi / 72).to_pil()
        finally:
            pdf_page.close()
    except pdfium.PdfiumError as err:
        raise ValueError(f"{name}: page {page} of {path!r} could not be rendered ({err}).") from err
    finally:
        document.close()
    return image.convert("RGB")


def pdf_page_count(path) -> int:
    """The number of pages of the PDF at `path` (pypdfium2); an unreadable file raises a `ValueError` naming it."""
    pdfium = _pypdfium2(os.fspath(path))
    try:
        document = pdfium.PdfDocument(os.fspath(path))
    except pdfium.PdfiumError as err:
        raise ValueError(f"{os.fspath(path)!r} is not a readable PDF ({err}).") from err
    try:
        return len(document)
    finally:
        document.close()


def _pypdfium2(name: str):
    try:
        import pypdfium2
    except ImportError as err:
        raise ImportError(f"Rendering {name} needs pypdfium2: pip install pypdfium2 (or pip install "
                          "'puma-embed[pdf]').") from err
    return pypdfium2


# ----------------------------------------------------------------------------------------------------------------
# Loading helpers
# ----------------------------------------------------------------------------------------------------------------
def _puma_field_names() -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(PumaConfig.__init__).parameters
                 if p not in ("self", "kwargs", "kept_layers", "base_num_hidden_layers", "embedding_token_id",
                              "base_model_type", "text_config", "vision_config", "image_token_id", "video_token_id",
                              "vision_start_token_id", "vision_end_token_id", "preset")) \
        + tuple(PRESETS["puma"])


def _puma_fields(config: PumaConfig) -> dict:
    return {key: getattr(config, key) for key in _puma_field_names() + ("preset",) if hasattr(config, key)}


def _split_load_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """`(hub_kwargs, puma_overrides)` of `from_pretrained`'s keyword arguments: the Hub arguments and the PUMA config
    fields; what `AutoModel` forwards and needs no action is dropped, anything else is a `TypeError`."""
    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    puma_overrides = {key: kwargs[key] for key in kwargs if key in _puma_field_names()}
    unexpected = set(kwargs) - set(hub_kwargs) - set(puma_overrides) - _IGNORED_LOAD_KWARGS
    if unexpected:
        raise TypeError(f"PumaForEmbedding.from_pretrained got unexpected keyword arguments {sorted(unexpected)}.")
    return hub_kwargs, puma_overrides


def _target_config(name: str, source_config, hub_kwargs: dict, config: PumaConfig | None, num_layers: int | None,
                   kept_layers: list[int] | None, preset: str | None, overrides: dict) -> tuple[PumaConfig, list[int]]:
    """The pruned configuration of the checkpoint `name` (configuration `source_config`) and the kept layers in the
    checkpoint's own numbering. `config` is a PUMA configuration `AutoModel` loaded and modified with keywords: its
    fields carry over, and different `kept_layers` in it are a pruning request."""
    is_puma = isinstance(source_config, PumaConfig)
    if config is not None and is_puma and kept_layers is None and num_layers is None \
            and list(config.kept_layers) != list(source_config.kept_layers):
        kept_layers = list(config.kept_layers)
    local_layers = _select_local_layers(source_config, num_layers, kept_layers)
    if config is not None and is_puma:
        carried = _puma_fields(config)
        if carried.get("trained_depths") == source_config.trained_depths:
            # the checkpoint's own depths (the config AutoModel loaded): re-derived for the layers kept
            carried.pop("trained_depths", None)
        overrides = {**carried, **overrides}
    if preset is None and not is_puma:
        preset = detect_preset(name, hub_kwargs)
    if preset is not None:
        overrides.setdefault("preset", preset)
    return PumaConfig.from_base_config(source_config, local_layers, **overrides), local_layers


def detect_preset(name: str, hub_kwargs: dict | None = None) -> str:
    """The recipe of a stock checkpoint: `"qwen3_vl_embedding"` or `"gme"` when its name or files identify one of
    those trained embedders (e.g. `Qwen/Qwen3-VL-Embedding-2B`, `Alibaba-NLP/gme-Qwen2-VL-2B-Instruct`, or a folder
    holding GME's `gme_inference.py`), else `"puma"`. Pass `preset=` to `from_pretrained` to choose explicitly."""
    for preset, pattern in _PRESET_NAME_PATTERNS:
        if pattern.search(os.path.basename(os.path.normpath(name))) or pattern.search(name.replace("\\", "/")):
            logger.info(f"'{name}' is a {preset} checkpoint by its name: using the {preset!r} recipe.")
            return preset
    for preset, filename in _PRESET_MARKER_FILES:
        if _resolve_file(name, filename, hub_kwargs or {}, required=False) is not None:
            logger.info(f"'{name}' holds {filename}: using the {preset!r} recipe.")
            return preset
    return "puma"


def _hub_kwargs_for(name: str, hub_kwargs: dict) -> dict:
    """`hub_kwargs` for reading the checkpoint `name`: for a Hub id, with `local_files_only=True` when the Hub is off
    (HF_HUB_OFFLINE) or does not answer a probe within `HUB_PROBE_TIMEOUT_S`. Files then come from the local cache
    at once, and a missing one is a one-line error; otherwise huggingface_hub would retry each file for about 25 s."""
    if os.path.isdir(name) or hub_kwargs.get("local_files_only") or not _is_hub_id(name):
        return hub_kwargs
    if not hub_offline_mode():
        from huggingface_hub import constants

        failure = hub_probe_failure(constants.ENDPOINT)
        if failure is None:
            return hub_kwargs
        logger.warning(f"The Hugging Face Hub at {constants.ENDPOINT} did not answer ({failure}); reading '{name}' "
                       "from the local cache only.")
    return {**hub_kwargs, "local_files_only": True}


def _is_hub_id(name: str) -> bool:
    """Whether `name` is a valid Hub repository id (a mistyped local path is not asked of the Hub)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_probe_failure(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """`None` when the Hub at `endpoint` answers a HEAD request within `timeout` seconds (any status), else why not.
    One request without retries, through huggingface_hub's own session (its proxies and headers)."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as err:  # any transport failure (DNS, refused, timeout, proxy) means "unreachable"
        return f"{type(err).__name__}: {err}"
    return None


def _not_cached(name: str, filename: str) -> OSError:
    """The error for a file of a Hub checkpoint that is not in the local cache while the Hub is not used."""
    if hub_offline_mode():
        why, advice = "Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1)", "or unset HF_HUB_OFFLINE to download it"
    else:
        why = "the Hub did not answer or is not used (local_files_only=True; HF_HUB_OFFLINE=1 skips it at once)"
        advice = "or check the network"
    return OSError(f"Cannot load '{name}': it is not a local folder, {why}, and its {filename!r} is not in the local "
                   f"cache. Pass the path of a local checkpoint folder, {advice}.")


def _resolve_file(name: str, filename: str, hub_kwargs: dict, required: bool = True) -> str | None:
    """Local path of `filename` in the folder or Hub repository `name`; `None` when absent and not required.

    Written out rather than transformers' `cached_file`, which reports an absent optional file only through a private
    keyword (`_raise_exceptions_for_missing_entries`) and words its errors for model identifiers: this one says which
    file is missing and why (no such file, not in the cache while offline, the Hub failing). Either way only the
    requested file is downloaded, so the shards of dropped layers never are."""
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
        if kind == "LocalEntryNotFoundError" and (hub_kwargs.get("local_files_only") or hub_offline_mode()):
            raise _not_cached(name, filename) from None
        raise OSError(
            f"Could not load '{name}': it is not a local folder, and fetching {filename!r} from the Hugging Face Hub "
            f"failed ({kind}: {err}). Pass the path of a local checkpoint folder."
        ) from err


def backbone_class(base_model_type: str) -> type:
    """transformers' model class of the family `base_model_type` (`Qwen2VLModel`, ...), its modeling file imported."""
    name = FAMILIES[base_model_type]["model"]
    model_class = getattr(transformers, name, None)
    if model_class is None:
        raise ValueError(f"transformers {transformers.__version__} has no {name}; upgrade transformers to use a "
                         f"{base_model_type!r} model.")
    return model_class


def load_source_config(name: str, hub_kwargs: dict | None = None):
    """The checkpoint's configuration: `PumaConfig` for a PUMA checkpoint, else the family's own configuration."""
    path = _resolve_file(name, "config.json", hub_kwargs or {})
    with open(path, encoding="utf-8") as f:
        try:
            config_dict = json.load(f)
        except json.JSONDecodeError as err:
            raise OSError(f"{path} is not valid JSON ({err}).") from err
    model_type = config_dict.get("model_type")
    if model_type is None:
        raise ValueError(f"{path} has no 'model_type'; PumaForEmbedding loads checkpoints whose config.json names one "
                         f"of the model types {', '.join(map(repr, SUPPORTED_MODEL_TYPES))}.")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"'{name}' is a {model_type!r} checkpoint; PumaForEmbedding loads {', '.join(map(repr, FAMILIES))} and "
            "PUMA ('puma') checkpoints."
        )
    for key in ("auto_map", "transformers_version", "architectures", "model_type"):
        config_dict.pop(key, None)
    if model_type == "puma":
        return PumaConfig(**config_dict)
    config_class = getattr(transformers, FAMILIES[model_type]["config"], None)
    if config_class is None:
        raise ValueError(f"'{name}' is a {model_type!r} checkpoint, which transformers {transformers.__version__} "
                         "does not know; upgrade transformers.")
    config = config_class(**config_dict)
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
    validate_kept_layers(kept_layers, getattr(source_config, "base_num_hidden_layers", depth))
    absent = [layer for layer in kept_layers if layer not in available]
    if absent:
        raise ValueError(f"kept_layers {absent} are not in this checkpoint, which holds original layers {available}.")
    return [available.index(layer) for layer in kept_layers]


_LAYER_PREFIX = r"^(?:model\.language_model|model|language_model)\.layers\."
_MERGER_PREFIX = r"^(?:model\.)?visual\.deepstack_merger_list\."


def _num_mergers(config) -> int:
    return len(getattr(config.vision_config, "deepstack_visual_indexes", None) or [])


def _key_mapping(source_config, local_layers: list[int], has_model_prefix: bool | None) -> dict[str, str]:
    """transformers `key_mapping` from the checkpoint's tensor names to the pruned model's.

    Every key layout real checkpoints use is read: the transformers <= 4.51 one (`model.layers.N`, `visual.*`, as
    Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL are published), the >= 4.52 one (`model.language_model.*`,
    `model.visual.*`: Qwen3-VL, PUMA) and a base model's (`language_model.*`, `visual.*`). Kept layer i becomes
    layer `local_layers.index(i)`; Qwen3-VL's DeepStack merger j follows the layer it injects after; dropped layers,
    mergers and the LM head go to `puma_dropped.*`, which the model ignores.

    transformers 4.x applies the first matching pattern, 5.x applies every pattern in turn. The order below gives the
    same result under both: the pattern of dropped tensors comes first (its targets match no later pattern), then the
    renames of layers whose index changes, in increasing source index (a rename's target index is below its source's,
    so it matches no later rename), then the layout patterns, which map an already mapped key to itself. Pruning to
    the first k layers renames nothing, so it costs two patterns per key however deep the model.
    """
    prefix = key_mapping_prefix(has_model_prefix)
    mapping = {}
    layouts = {}
    for source_prefix, target_prefix, count, kept in (
        (_LAYER_PREFIX, "language_model.layers.", source_config.text_config.num_hidden_layers, local_layers),
        (_MERGER_PREFIX, "visual.deepstack_merger_list.", _num_mergers(source_config),
         [i for i in local_layers if i < _num_mergers(source_config)]),
    ):
        target = {source: position for position, source in enumerate(kept)}
        dropped = [str(index) for index in range(count) if index not in target]
        if dropped:
            mapping[source_prefix + f"({'|'.join(dropped)})\\."] = rf"{prefix}{_DROPPED}.{target_prefix}\1."
        for index in sorted(source for source, position in target.items() if source != position):
            mapping[source_prefix + rf"{index}\."] = f"{prefix}{target_prefix}{target[index]}."
        layouts[source_prefix] = f"{prefix}{target_prefix}"
    mapping.update(layouts)  # kept at their index: the layout alone changes
    mapping[r"^(?:model\.language_model|model|language_model)\.(embed_tokens|norm)\."] = rf"{prefix}language_model.\1."
    mapping[r"^(?:model\.)?visual\."] = f"{prefix}visual."
    mapping[r"^lm_head\."] = f"{prefix}{_DROPPED}.lm_head."
    return mapping


def _is_kept_key_function(source_config, local_layers: list[int]):
    """A predicate on checkpoint tensor names: does the pruned model load this tensor?"""
    layers, mergers = set(local_layers), {i for i in local_layers if i < _num_mergers(source_config)}
    layer_pattern, merger_pattern = re.compile(_LAYER_PREFIX + r"(\d+)\."), re.compile(_MERGER_PREFIX + r"(\d+)\.")

    def is_kept(key: str) -> bool:
        if key.startswith("lm_head."):
            return False
        for pattern, kept in ((layer_pattern, layers), (merger_pattern, mergers)):
            match = pattern.match(key)
            if match is not None:
                return int(match.group(1)) in kept
        return True

    return is_kept


class _CheckpointWeights:
    """The safetensors files of a checkpoint that hold kept tensors, resolved (downloaded only if needed)."""

    def __init__(self, name: str, files: dict[str, str], weight_map: dict[str, str] | None,
                 has_model_prefix: bool | None):
        self.name, self.files, self.weight_map, self.has_model_prefix = name, files, weight_map, has_model_prefix

    def lazy_state_dict(self, is_kept, stack: contextlib.ExitStack) -> dict:
        """`{name: lazy slice}` of the kept tensors, from memory-mapped files held open by `stack` (transformers 5's
        own loader reads `safe_open(...).get_slice(name)` the same way, so tensors stay file-backed until cast)."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        # under DeepSpeed ZeRO-3 transformers partitions each tensor as it loads it, and takes tensors only
        read = "get_tensor" if is_deepspeed_zero3_enabled() else "get_slice"
        state_dict = {}
        for path in self.files.values():
            handle = stack.enter_context(_open_safetensors(path))
            state_dict.update({key: getattr(handle, read)(key) for key in handle.keys() if is_kept(key)})
        return state_dict

    def write_view(self, folder: str, config: PumaConfig) -> None:
        """Writes a folder transformers loads from: the pruned config, links to the needed files and, for a
        sharded checkpoint, an index restricted to them (so the shards of dropped layers are not looked for)."""
        config.save_pretrained(folder)
        for filename, path in self.files.items():
            os.symlink(os.path.abspath(path), os.path.join(folder, filename))
        if self.weight_map is not None:
            with open(os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump({"metadata": {}, "weight_map": self.weight_map}, f)


def _checkpoint_weights(name: str, hub_kwargs: dict, is_kept, check_files: bool = True) -> _CheckpointWeights:
    """Finds the safetensors files holding kept tensors and resolves them (a Hub repository's other shards are never
    downloaded). `check_files` reads each file's header now, naming a file that is not valid safetensors; without it
    the names come from the index, and `lazy_state_dict`, which opens every file anyway, names an invalid one."""
    index_path = _resolve_file(name, SAFE_WEIGHTS_INDEX_NAME, hub_kwargs, required=False)
    if index_path is not None:
        with open(index_path, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise OSError(f"{index_path} is not a valid safetensors index ({type(err).__name__}: {err}).") from err
        by_file = defaultdict(list)
        for key, filename in weight_map.items():
            by_file[filename].append(key)
        needed = sorted(filename for filename, keys in by_file.items() if any(is_kept(key) for key in keys))
        weight_map = {key: filename for key, filename in weight_map.items() if filename in needed}
        keys = list(weight_map)
    else:
        if _resolve_file(name, SAFE_WEIGHTS_NAME, hub_kwargs, required=False) is None:
            if not os.path.isdir(name) and (hub_kwargs.get("local_files_only") or hub_offline_mode()):
                raise _not_cached(name, SAFE_WEIGHTS_NAME)
            raise OSError(
                f"'{name}' has no safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}); only "
                "safetensors are loaded. Convert .bin weights with transformers' save_pretrained(..., "
                "safe_serialization=True)."
            )
        needed, weight_map, keys = [SAFE_WEIGHTS_NAME], None, None
    files = {filename: _resolve_file(name, filename, hub_kwargs) for filename in needed}
    if check_files:
        for path in files.values():
            file_keys = _safetensors_keys(path)
            if keys is None:
                keys = file_keys
    # unknown (None) without the headers of a single-file checkpoint: transformers 5 needs no prefix (_key_mapping)
    has_model_prefix = None if keys is None else any(key.startswith("model") for key in keys)
    return _CheckpointWeights(name, files, weight_map, has_model_prefix)


def _safetensors_keys(path: str) -> list[str]:
    """The tensor names of a safetensors file; a file that is not one is an `OSError` naming it."""
    with _open_safetensors(path) as f:
        return list(f.keys())


def _open_safetensors(path: str):
    """`safe_open(path)` on CPU; a file that is not valid safetensors is an `OSError` naming it."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error type, or OverflowError/ValueError on garbage
        raise OSError(f"{path} is not a valid safetensors file ({type(err).__name__}: {err}); the checkpoint is "
                      "corrupt or incomplete: download or save it again.") from err


def load_processor(name: str, config, hub_kwargs: dict | None = None):
    """The family's own processor saved with the checkpoint `name` (a folder or Hub id) of configuration `config`, or
    `None` (with a log line) when it has none."""
    hub_kwargs = hub_kwargs or {}
    # transformers 5 saves one processor_config.json; earlier versions (and the Hub's checkpoints) preprocessor_config.json
    if all(_resolve_file(name, f, hub_kwargs, required=False) is None
           for f in ("processor_config.json", "preprocessor_config.json")):
        logger.warning(f"'{name}' holds no processor files; encode() needs model.set_processor(...).")
        return None
    family = config.base_model_type if isinstance(config, PumaConfig) else config.model_type
    kwargs = {key: value for key, value in hub_kwargs.items() if key != "force_download"}
    kwargs.update(processor_config_kwargs(config))
    # The family's own processor class; AutoProcessor would consult the PUMA config (remote code).
    return getattr(transformers, FAMILIES[family]["processor"]).from_pretrained(name, **kwargs)


def _ensure_embedding_token(processor, config: PumaConfig, is_puma: bool) -> tuple[int, int] | None:
    """Makes the tokenizer know the embedding token (recipes pooling at one) and records its id in `config`.

    Returns `(token_id, rows_before)` when the token was added now (its input row needs initialising), else `None`.
    A PUMA checkpoint must already carry the token with the id its config names.
    """
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"The processor {type(processor).__name__} has no tokenizer.")
    token = config.embedding_token
    if config.pooling != "token" or not token:
        return None
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
    if is_puma and config.embedding_token_id is not None:
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


def make_tokenizer_config_portable(path: str) -> None:
    """transformers 5 writes `extra_special_tokens` as a list, which transformers 4.57 cannot read (it expects a
    mapping); the tokens are also in `added_tokens_decoder`, so the list is dropped."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if isinstance(config.get("extra_special_tokens"), list):
        config.pop("extra_special_tokens")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")


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
        dtype = getattr(source_config, "dtype", None) or getattr(source_config.text_config, "dtype", None) \
            or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype.")
    return dtype


def _resolve_attn_implementation(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    if requested is not None:
        return requested
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


# ----------------------------------------------------------------------------------------------------------------
# transformers compatibility
# ----------------------------------------------------------------------------------------------------------------
# Every version branch, private attribute and model-module import of transformers (and huggingface_hub) that the
# project relies on, one documented helper each; configuration_puma.py's section of the same name holds the
# configuration's (`transformers_major`, `attn_implementation`, ...), reused here. The rest of the project imports
# these helpers rather than testing versions itself. A broken assumption raises `TransformersCompatibilityError`
# naming the installed version and the assumption; tests/test_compat.py checks each one.
def loads_lazy_state_dict() -> bool:
    """Whether `from_pretrained(None, state_dict=...)` is how the kept tensors are loaded (transformers 5): its loader
    takes lazy safetensors slices, applies every `key_mapping` pattern in turn and opens every file it is given.
    transformers 4 reads the files of a folder itself and applies the first matching pattern."""
    return transformers_major() >= 5


def key_mapping_prefix(has_model_prefix: bool | None) -> str:
    """The prefix of the pruning `key_mapping`'s targets: `"model."`, except for a checkpoint whose keys lack it on
    transformers 4, which adds it itself after the mapping."""
    return "model." if has_model_prefix or transformers_major() >= 5 else ""


def keep_pruned_names_on_save(model, key_mapping: dict[str, str]) -> None:
    """Keeps `save_pretrained` from undoing the pruning `key_mapping` of a model just loaded with it.

    transformers 5 records the renamings applied at load time in `model._weight_conversions` (one per pattern, with
    its `source_patterns`, kept unnormalised in `_original_source_patterns` from 5.6) and reverts them on save, which
    would renumber the kept layers back; the family's own format conversions are kept, those the load applied: under
    DeepSpeed ZeRO-3 transformers records every conversion it tried (`_load_state_dict_into_zero3_model`), and save
    would revert a renaming that never happened (the legacy `model.language_model.model.` prefix), where its regular
    loader records the used ones only. transformers 4 reverts only the class's own conversion mapping: nothing to
    do."""
    if transformers_major() < 5:
        return
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        raise incompatibility("from_pretrained records the key_mapping it applied in model._weight_conversions",
                              "the attribute is missing after the load")
    kept = []
    for conversion in conversions:
        patterns = getattr(conversion, "_original_source_patterns", None) or getattr(conversion, "source_patterns",
                                                                                     None)
        if patterns is None:
            raise incompatibility("each recorded weight conversion lists its source_patterns",
                                  f"{type(conversion).__name__} has none")
        if not set(patterns) & set(key_mapping):
            kept.append(conversion)
    if len(kept) == len(conversions):
        raise incompatibility("the key_mapping given to from_pretrained is among model._weight_conversions",
                              "no recorded conversion has its patterns")
    model._weight_conversions = [conversion for conversion in kept
                                 if not hasattr(conversion, "was_used") or conversion.was_used()]


def _tensors_in(value) -> list[torch.Tensor]:
    """The tensors in `value`, a tensor or nested lists and tuples of them (None skipped)."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors_in(item)]
    return []


def reuses_visual_outputs(model) -> bool:
    """Whether the backbone of `model` (a `PumaForEmbedding`) takes the vision tower's outputs of an earlier forward
    (`mm_encoder_outputs`) and returns them (`image_outputs`, `video_outputs`); transformers' recent 5.x releases do,
    older ones re-run the tower."""
    return "mm_encoder_outputs" in model._backbone_inputs


def vision_tower_outputs(backbone, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor):
    """The vision tower's outputs of `pixel_values`, in the form the backbone's forward takes back
    (`mm_encoder_outputs["image"]`): its `get_image_features(..., return_dict=True)`."""
    if not hasattr(backbone, "get_image_features"):
        raise incompatibility("the backbone computes image features with get_image_features", "it has no such method")
    outputs = backbone.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    if not isinstance(outputs, ModelOutput):
        raise incompatibility("get_image_features(..., return_dict=True) returns a ModelOutput",
                              f"it returned {type(outputs).__name__}")
    return outputs


def visual_outputs_of(outputs) -> dict:
    """`{"image": ..., "video": ...}` of the backbone's `outputs`, for the modalities it encoded."""
    found = {"image": getattr(outputs, "image_outputs", None), "video": getattr(outputs, "video_outputs", None)}
    return {modality: value for modality, value in found.items() if value is not None}


def copy_save_conversions(source, target) -> None:
    """Gives `target`, a model built from `source`'s configuration (e.g. to hold weights gathered from processes),
    the checkpoint-format conversions `source` reverts on save (transformers 5 records them at load time in
    `_weight_conversions`), so both save the same file format; nothing to do on transformers 4."""
    if transformers_major() >= 5 and hasattr(source, "_weight_conversions"):
        target._weight_conversions = list(source._weight_conversions)


def processor_config_kwargs(config) -> dict:
    """Keywords of the family processor's `from_pretrained`: transformers 5's tokenizer loader resolves the model
    configuration, which for a PUMA checkpoint is remote code, so it is handed over."""
    return {"config": config} if transformers_major() >= 5 else {}


def image_processor_pixel_kwargs(min_pixels: int, max_pixels: int) -> dict:
    """Keywords of a Qwen-VL image processor's call that resize into `[min_pixels, max_pixels]`: `size` (read by
    transformers 5), plus `min_pixels`/`max_pixels` on transformers 4, whose image processors read those first."""
    limits = {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}
    if transformers_major() < 5:
        limits.update(min_pixels=min_pixels, max_pixels=max_pixels)
    return limits


def set_image_processor_pixels(image_processor, min_pixels: int, max_pixels: int) -> None:
    """Saves the pixel range `[min_pixels, max_pixels]` into a Qwen-VL image (or video) processor so that both
    majors read it: `size` (transformers 5) and, where the processor has them, `min_pixels`/`max_pixels`
    (transformers 4 reads those before `size`)."""
    image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if hasattr(image_processor, "min_pixels"):
        image_processor.min_pixels, image_processor.max_pixels = min_pixels, max_pixels


def video_processor_kwargs(video_processor, sample_fps: list[float]) -> dict:
    """Video processor keywords of videos already sampled and resized, beside `do_resize=False` and
    `do_sample_frames=False`: each video's sampled frame rate where a processor reads it from a keyword
    (transformers 4's Qwen2.5-VL processor derives temporal positions from `fps`; transformers 5's from the videos'
    metadata, passed anyway), and `cap_pixels_per_frame=False` where the video processor has that option (later
    5.x, which warn without it; the frames are within their budget already)."""
    kwargs = {"fps": list(sample_fps)} if transformers_major() < 5 else {}
    if hasattr(type(video_processor), "cap_pixels_per_frame"):
        kwargs["cap_pixels_per_frame"] = False
    return kwargs


def holds_fused_experts_transposed() -> bool:
    """Whether transformers holds Qwen3-VL-MoE's fused expert weights (`mlp.experts.gate_up_proj`, `down_proj`)
    transposed relative to the Hub's checkpoints (transformers 5 converts them at load; 4.57 reads them as is)."""
    return transformers_major() >= 5


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """`(height, width)` with each side a multiple of `factor` and their product in `[min_pixels, max_pixels]`, the
    aspect ratio kept as nearly as possible: Qwen2-VL's `smart_resize`, which transformers keeps in the model's
    image processing module (it has no public home)."""
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as qwen2_vl_smart_resize
    except ImportError as err:
        raise incompatibility("transformers.models.qwen2_vl.image_processing_qwen2_vl defines smart_resize",
                              str(err)) from err
    return qwen2_vl_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def prepare_inputs(trainer, inputs: dict) -> dict:
    """`inputs` on the trainer's device (nested feature groups included; floats in the DeepSpeed dtype under
    ZeRO-3): `Trainer._prepare_inputs`, the step `training_step` and `prediction_step` take first, for overrides of
    those that replace the Trainer's own."""
    prepare = getattr(trainer, "_prepare_inputs", None)
    if prepare is None:
        raise incompatibility("Trainer prepares a batch with _prepare_inputs(inputs)",
                              f"{type(trainer).__name__} has no _prepare_inputs")
    return prepare(inputs)


def hub_offline_mode() -> bool:
    """Whether huggingface_hub's offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE): `is_offline_mode()`
    from huggingface_hub 1.0, the constant read at import before."""
    from huggingface_hub import constants

    return constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE


PumaConfig.register_for_auto_class()
PumaForEmbedding.register_for_auto_class("AutoModel")

__all__ = ["PumaEmbeddingOutput", "PumaForEmbedding", "PumaPreTrainedModel", "SampledVideo",
           "TransformersCompatibilityError", "VideoInput", "attn_implementation", "build_prompt",
           "copy_save_conversions", "decode_video", "detect_preset", "featurize", "format_string", "frame_files",
           "holds_fused_experts_transposed", "hub_offline_mode", "hub_probe_failure", "image_processor_pixel_kwargs",
           "is_video_decoder", "keep_pruned_names_on_save", "key_mapping_prefix", "load_image", "load_pdf_page",
           "load_processor", "load_source_config", "loads_lazy_state_dict", "make_tokenizer_config_portable",
           "media_file", "parse_input", "pdf_page_count", "pool_visual_grid", "prepare_inputs",
           "processor_config_kwargs", "processor_kwargs", "qwen_vl_smart_resize", "reduced_grid_thw", "resize_frames",
           "resize_image", "reuses_visual_outputs", "sample_video", "set_image_processor_pixels", "smart_resize",
           "to_rgb", "transformers_major", "video_input", "video_processor_kwargs", "vision_tower_outputs",
           "visual_keep_pattern", "visual_kind", "write_sentence_transformers_files"]

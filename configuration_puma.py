# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""PUMA configuration: a Qwen-VL family configuration (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) pruned to the kept decoder
layers, plus the prompt and pooling recipe of the embedder."""

import copy

import transformers
from transformers import AutoConfig, PretrainedConfig


# The Qwen-VL families PUMA prunes: transformers' own configuration, backbone and processor class of each.
FAMILIES = {
    "qwen2_vl": {"config": "Qwen2VLConfig", "model": "Qwen2VLModel", "processor": "Qwen2VLProcessor",
                 "generation": "Qwen2VLForConditionalGeneration"},
    "qwen2_5_vl": {"config": "Qwen2_5_VLConfig", "model": "Qwen2_5_VLModel", "processor": "Qwen2_5_VLProcessor",
                   "generation": "Qwen2_5_VLForConditionalGeneration"},
    "qwen3_vl": {"config": "Qwen3VLConfig", "model": "Qwen3VLModel", "processor": "Qwen3VLProcessor",
                 "generation": "Qwen3VLForConditionalGeneration"},
    "qwen3_vl_moe": {"config": "Qwen3VLMoeConfig", "model": "Qwen3VLMoeModel", "processor": "Qwen3VLProcessor",
                     "generation": "Qwen3VLMoeForConditionalGeneration"},
}
POOLING_MODES = ("token", "last", "mean")
INSTRUCTION_PLACEMENTS = ("user", "system")
MODALITIES = ("image", "text", "image,text")

# Prompt, image and pooling recipes. Each preset gives the values of the recipe fields of `PumaConfig`; a field
# passed explicitly overrides its preset value.
#
# "puma": the release (JiuTian-VL/PUMA `src/training/ret_oneword.py`, `src/utils.py`): the family's default system
#   turn; the user turn is the image, then `format_string(instruction) + "\n" + text` passed through `format_string`
#   and truncated to 450 tokens, then "\nSummarize above <modality> in one word: "; the assistant turn is "[RET].";
#   images are resized by qwen-vl-utils' `fetch_image` into [4, 300] x 28^2 pixels; the embedding is the final-norm
#   hidden state at the added [RET] token.
# "qwen3_vl_embedding": Qwen3-VL-Embedding (Qwen/Qwen3-VL-Embedding-2B/8B; QwenLM/Qwen3-VL-Embedding
#   `src/models/qwen3_vl_embedding.py`): the instruction, stripped and ended with a full stop unless it ends with
#   punctuation, is the system turn (default "Represent the user's input."); the input is the user turn (image, then
#   text); the generation prompt "<|im_start|>assistant\n" closes the prompt (the tokenizer may append its own end
#   token); images are resized by `fetch_image` into [4, 1800] x 32^2 pixels and not again by the processor; the
#   embedding is the last token's final-norm hidden state, L2-normalised, truncatable to Matryoshka sizes >= 64.
# "gme": GME (Alibaba-NLP/gme-Qwen2-VL-2B/7B-Instruct `gme_inference.py`): the instruction is the system turn (default
#   and candidates: "You are a helpful assistant."); the input is the user turn (image, then text); the assistant turn
#   is "<|endoftext|>"; images are resized by `fetch_image` into [4, 16384] x 28^2 pixels, then by the processor into
#   [256, 1280] x 28^2; every token, image tokens included, gets the sequential position 0..L-1 (GME runs the text
#   decoder with `position_ids=None`, so no 3-D M-RoPE); the embedding is the last token's final-norm hidden state.
#
# Image loading, truncation and instructions follow each published code too: qwen-vl-utils' `fetch_image` (used by
# Qwen3-VL-Embedding) composites RGBA images on white and converts other modes, GME's copy converts every mode
# (dropping alpha); neither applies EXIF rotation; both truncate the whole tokenised sequence (8192 and 1800 tokens);
# GME keeps an empty query instruction as an empty system turn, Qwen3-VL-Embedding strips it and falls back to its
# default. The release keeps this repository's choices (EXIF rotation, every transparent mode on white, the text
# truncated before the pooled token).
#
# Videos: Qwen3-VL-Embedding's recipe (`src/models/qwen3_vl_embedding.py` with qwen-vl-utils 0.0.14's `fetch_video`):
#   files sampled at 1 fps, 4 to 64 frames (an even number, `smart_nframes`), frame lists thinned to 64 frames; each
#   frame resized into [128, 768] x 32^2 pixels within a budget of 7,864,320 pixels for the whole clip. GME and the
#   release publish no video recipe: theirs are qwen-vl-utils' defaults for Qwen2-VL (2 fps, frames of [128, 768] x
#   28^2 pixels) with at most 16 frames and a budget that keeps a video within GME's largest image (1,280 tokens) or
#   within 1,024 tokens (the release). PDF pages are rendered at 200 dpi (vidore-benchmark's pdf2image default), then
#   resized as images.
PRESETS = {
    "puma": {
        "pooling": "token",
        "embedding_token": "[RET]",
        "system_prompt": "You are a helpful assistant.",
        "instruction_placement": "user",
        "instruction_template": "{instruction}\n{text}",
        "punctuate_instruction": False,
        "user_suffix_template": "\nSummarize above {modality} in one word: ",
        "modality_words": {"image": "image", "text": "sentence", "image,text": "image and sentence", "video": "video",
                           "text,video": "video and sentence"},
        "assistant_template": "{embedding_token}.<|im_end|>\n",
        "format_text": True,
        "max_text_tokens": 450,
        "max_prompt_tokens": None,
        "keep_empty_instruction": False,
        "min_pixels": 4 * 28 * 28,
        "max_pixels": 300 * 28 * 28,
        "processor_min_pixels": None,
        "processor_max_pixels": None,
        "exif_transpose": True,
        "alpha_mode": "composite",
        "video_fps": 2.0,
        "video_min_frames": 4,
        "video_max_frames": 16,
        "video_min_pixels": 128 * 28 * 28,
        "video_max_pixels": 768 * 28 * 28,
        "video_total_pixels": 1024 * 28 * 28,
        "pdf_dpi": 200,
        "position_mode": "mrope",
        "matryoshka_dims": None,
    },
    "qwen3_vl_embedding": {
        "pooling": "last",
        "embedding_token": None,
        "system_prompt": "Represent the user's input.",
        "instruction_placement": "system",
        "instruction_template": "{instruction}\n{text}",
        "punctuate_instruction": True,
        "user_suffix_template": "",
        "modality_words": {"image": "image", "text": "text", "image,text": "image and text", "video": "video",
                           "text,video": "video and text"},
        "assistant_template": "",
        "format_text": False,
        "max_text_tokens": None,
        "max_prompt_tokens": 8192,
        "keep_empty_instruction": False,
        "min_pixels": 4 * 32 * 32,
        "max_pixels": 1800 * 32 * 32,
        "processor_min_pixels": None,
        "processor_max_pixels": None,
        "exif_transpose": False,
        "alpha_mode": "composite_rgba",
        "video_fps": 1.0,
        "video_min_frames": 4,
        "video_max_frames": 64,
        "video_min_pixels": 128 * 32 * 32,
        "video_max_pixels": 768 * 32 * 32,
        "video_total_pixels": 7680 * 32 * 32,
        "pdf_dpi": 200,
        "position_mode": "mrope",
        "matryoshka_dims": "powers of two from 64",
    },
    "gme": {
        "pooling": "last",
        "embedding_token": None,
        "system_prompt": "You are a helpful assistant.",
        "instruction_placement": "system",
        "instruction_template": "{instruction}\n{text}",
        "punctuate_instruction": False,
        "user_suffix_template": "",
        "modality_words": {"image": "image", "text": "text", "image,text": "image and text", "video": "video",
                           "text,video": "video and text"},
        "assistant_template": "<|endoftext|>",
        "format_text": False,
        "max_text_tokens": None,
        "max_prompt_tokens": 1800,
        "keep_empty_instruction": True,
        "min_pixels": 4 * 28 * 28,
        "max_pixels": 16384 * 28 * 28,
        "processor_min_pixels": 256 * 28 * 28,
        "processor_max_pixels": 1280 * 28 * 28,
        "exif_transpose": False,
        "alpha_mode": "drop",
        "video_fps": 2.0,
        "video_min_frames": 4,
        "video_max_frames": 16,
        "video_min_pixels": 128 * 28 * 28,
        "video_max_pixels": 768 * 28 * 28,
        "video_total_pixels": 1280 * 28 * 28,
        "pdf_dpi": 200,
        "position_mode": "sequential",
        "matryoshka_dims": None,
    },
}
RECIPE_FIELDS = tuple(PRESETS["puma"])
POSITION_MODES = ("mrope", "sequential")
VISUAL_POOL_MODES = ("avg", "bilinear")
# How transparency becomes RGB: "composite": every mode with transparency (RGBA, LA, P, ...) on white; "composite_rgba":
# RGBA on white, any other mode converted (qwen-vl-utils' `to_rgb`); "drop": converted, alpha discarded (GME).
ALPHA_MODES = ("composite", "composite_rgba", "drop")


def preset_defaults(preset: str, base_model_type: str, hidden_size: int) -> dict:
    """The recipe field values of `preset` for a base of family `base_model_type` and width `hidden_size`."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {sorted(PRESETS)}.")
    values = copy.deepcopy(PRESETS[preset])
    if preset == "puma" and base_model_type.startswith("qwen3_vl"):
        values["system_prompt"] = None  # Qwen3-VL's chat template has no default system turn
    if values["matryoshka_dims"] == "powers of two from 64":
        values["matryoshka_dims"] = [2**i for i in range(6, 16) if 2**i < hidden_size] + [hidden_size]
    return values


# ----------------------------------------------------------------------------------------------------------------
# transformers compatibility
# ----------------------------------------------------------------------------------------------------------------
# What this file assumes of transformers beyond its public API, one helper each; modeling_puma.py's section of the
# same name reuses these and holds the rest. A broken assumption raises `TransformersCompatibilityError` naming the
# installed version and the assumption, where it is used; tests/test_compat.py checks each one on the installed
# transformers (CI runs it on 4.57, the oldest supported 5.x and the newest).
#
# The supported releases: 5.0 to 5.3 cannot load Qwen3-VL-MoE checkpoints as PUMA does (5.0 cannot build the model:
# its text configuration lacks `pad_token_id`; 5.1 cannot convert the Hub's fused experts; 5.2 and 5.3 apply the
# family's conversions only when the top model is of the family, not to PUMA's backbone).
SUPPORTED_TRANSFORMERS = ">=4.57,!=5.0.*,!=5.1.*,!=5.2.*,!=5.3.*,<6"


class TransformersCompatibilityError(RuntimeError):
    """The installed transformers breaks an assumption PUMA makes about its internals."""


def incompatibility(assumption: str, detail: str = "") -> TransformersCompatibilityError:
    """The error for a broken `assumption` ("what transformers was expected to do"), naming the installed version."""
    return TransformersCompatibilityError(
        f"transformers {transformers.__version__} breaks an assumption of PUMA: {assumption}"
        f"{f' ({detail})' if detail else ''}. PUMA supports transformers{SUPPORTED_TRANSFORMERS}; its "
        "'transformers compatibility' helpers need updating for this version."
    )


def transformers_major(version: str | None = None) -> int:
    """The major version of `version` (a transformers version string), by default of the installed transformers."""
    return int((version or transformers.__version__).split(".")[0])


def sub_config_declaration() -> dict:
    """The class attribute declaring `text_config` and `vision_config` as sub-configurations resolved by their
    `model_type`: `sub_configs_defaults` of `SubConfigSpec`s where transformers has them (later 5.x: it then saves
    each sub-configuration as a diff against its defaults), else the `sub_configs` mapping (4.x, early 5.x)."""
    try:
        from transformers.configuration_utils import SubConfigSpec
    except ImportError:
        return {"sub_configs": {"text_config": AutoConfig, "vision_config": AutoConfig}}
    if not hasattr(PretrainedConfig, "sub_configs_defaults"):
        raise incompatibility("a transformers with SubConfigSpec declares sub-configurations in sub_configs_defaults",
                              "PretrainedConfig has no sub_configs_defaults")
    return {"sub_configs_defaults": {
        "text_config": SubConfigSpec(AutoConfig, model_type="qwen2_vl_text"),
        "vision_config": SubConfigSpec(AutoConfig, model_type="qwen2_vl_vision"),
    }}


def attn_implementation(config: PretrainedConfig) -> str | None:
    """The attention implementation `config` selects (`"sdpa"`, `"eager"`, ...; `None` before a model resolves it):
    transformers' `config._attn_implementation`, which every modeling file reads."""
    try:
        return config._attn_implementation
    except AttributeError as err:
        raise incompatibility("a configuration holds its attention implementation in _attn_implementation",
                              f"{type(config).__name__} has none") from err


def set_attn_implementation(config: PretrainedConfig, value: str | None) -> None:
    """Sets `config`'s attention implementation (and its sub-configurations', which transformers' setter of
    `_attn_implementation` updates with it)."""
    if not isinstance(getattr(type(config), "_attn_implementation", None), property):
        raise incompatibility("PretrainedConfig._attn_implementation is a property whose setter updates the "
                              "sub-configurations")
    config._attn_implementation = value


class PumaConfig(PretrainedConfig):
    r"""
    Configuration of a [`PumaForEmbedding`]: the text and vision configurations of a Qwen-VL family model whose
    `text_config.num_hidden_layers` is the number of *kept* decoder layers, plus the PUMA fields below.

    The class is written with an explicit `__init__` (rather than as a dataclass) so that the same file loads as
    remote code on transformers 4.57 and 5.x.

    Args:
        base_model_type (`str`, *optional*, defaults to `"qwen2_vl"`):
            The family of the base model: `"qwen2_vl"`, `"qwen2_5_vl"`, `"qwen3_vl"` or `"qwen3_vl_moe"`. The backbone
            is that family's own transformers model class, and the processor its own processor.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            The family's text configuration (`model_type` `"<family>_text"`), with the kept depth.
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            The family's vision configuration. For Qwen3-VL, `deepstack_visual_indexes` lists only the vision blocks
            whose features are still injected (see [`PumaConfig.from_base_config`]).
        image_token_id, video_token_id, vision_start_token_id, vision_end_token_id (`int`, *optional*):
            The family's special token ids.
        kept_layers (`list[int]`, *optional*):
            Indices, in the numbering of the base (unpruned) model, of the decoder layers kept, sorted and unique.
            Layer `kept_layers[i]` of the base model is layer `i` of this model. Defaults to all
            `text_config.num_hidden_layers` layers.
        base_num_hidden_layers (`int`, *optional*):
            Depth of the base model the layers were taken from. Defaults to `max(kept_layers) + 1` or the text depth.
        trained_depths (`list[int]`, *optional*):
            Depths (numbers of first layers) this model was trained to embed at, deepest last; `None` for a model
            trained at its full depth only.
        preset (`str`, *optional*, defaults to `"puma"`):
            The prompt and pooling recipe: `"puma"` (the release), `"qwen3_vl_embedding"` or `"gme"` (see `PRESETS`).
            It sets the defaults of every field below; a field passed explicitly overrides it.
        pooling (`str`, *optional*):
            `"token"`: hidden state at the embedding token; `"last"`: at the last non-padding token; `"mean"`: mean
            over non-padding tokens.
        embedding_token (`str`, *optional*):
            Added token whose final-norm hidden state is the embedding (`"[RET]"` for `"puma"`; `None` without one).
        embedding_token_id (`int`, *optional*):
            Its id in the tokenizer saved with the model. Set when the token is added.
        normalize (`bool`, *optional*, defaults to `True`):
            L2-normalise the embeddings returned by `forward`.
        matryoshka_dims (`list[int]`, *optional*):
            Embedding sizes the model was trained to support when truncated.
        system_prompt (`str`, *optional*):
            System turn of prompts without an instruction there. `None` drops the system turn.
        instruction_placement (`str`, *optional*):
            Where a query instruction goes: `"user"` (before the text, through `instruction_template`) or
            `"system"` (it replaces `system_prompt`).
        instruction_template (`str`, *optional*):
            How a user-turn instruction is joined to the text.
        punctuate_instruction (`bool`, *optional*):
            Strip the instruction and end it with a full stop unless it ends with punctuation (Qwen3-VL-Embedding).
        user_suffix_template (`str`, *optional*):
            Appended to the user turn; `{modality}` is filled from `modality_words`.
        modality_words (`dict[str, str]`, *optional*):
            Word used for each input modality (`"image"`, `"text"`, `"image,text"`, and optionally `"video"`,
            `"text,video"`, which default to the preset's) in the suffix.
        assistant_template (`str`, *optional*):
            What follows `"<|im_start|>assistant\n"`; `{embedding_token}` is filled in. An empty string leaves the
            assistant turn open (the generation prompt).
        format_text (`bool`, *optional*):
            The release's `format_string` on the instruction and on the text: strip, drop `"\r"` and surrounding
            double quotes, capitalise the first letter, end with a full stop.
        max_text_tokens (`int`, *optional*):
            Instruction plus text are truncated to this many tokens before the suffix and assistant turn, so the
            pooled position is never cut off; `None`: not truncated.
        max_prompt_tokens (`int`, *optional*):
            The whole tokenised prompt (image and video tokens included) is truncated on the right to this many
            tokens, as the published embedders do (a long text then loses the pooled position); a cut into image or
            video tokens raises. `None`: not truncated.
        keep_empty_instruction (`bool`, *optional*):
            With `instruction_placement="system"`, a query instruction that is empty (after `punctuate_instruction`'s
            strip) is an empty system turn (GME); otherwise it falls back to `system_prompt`.
        min_pixels, max_pixels (`int`, *optional*):
            Images are resized (PIL bicubic, each side a multiple of the vision patch size times the merge size) to
            a pixel count in this range before the processor sees them, as qwen-vl-utils' `fetch_image` does.
        processor_min_pixels, processor_max_pixels (`int`, *optional*):
            If set, the processor resizes the images again into this range (GME); `None`: it does not resize.
        exif_transpose (`bool`, *optional*):
            Rotate images (and frames of frame lists) as their EXIF orientation says.
        alpha_mode (`str`, *optional*):
            How transparent images become RGB: `"composite"` (every mode with transparency on white),
            `"composite_rgba"` (RGBA on white, other modes converted: qwen-vl-utils) or `"drop"` (alpha discarded).
        video_fps (`float`, *optional*):
            Frames per second sampled from a video file (an input's own `"fps"` overrides it).
        video_min_frames, video_max_frames (`int`, *optional*):
            Bounds of the number of frames sampled from a file (rounded to even numbers, as qwen-vl-utils'
            `smart_nframes`); a frame list longer than `video_max_frames` is thinned evenly to it.
        video_min_pixels, video_max_pixels (`int`, *optional*):
            Range of the pixel count of each resized frame.
        video_total_pixels (`int`, *optional*):
            Pixel budget of a whole video: each frame gets at most `2 * video_total_pixels / frames` pixels (a pair
            of frames is one temporal patch), so a video has at most about `video_total_pixels / (patch * merge)^2`
            tokens.
        pdf_dpi (`float`, *optional*):
            Resolution at which PDF pages are rendered before the image resize.
        position_mode (`str`, *optional*):
            `"mrope"`: the family's 3-D multimodal rotary positions; `"sequential"`: position i for token i, image
            tokens included (GME's and the release's inference).
        visual_pool (`int`, *optional*, defaults to 1):
            Visual-token reduction factor k: after the vision tower's merger, each image's and each video frame's
            merged tokens are pooled k x k on their grid (a partial window at an odd edge averages the cells it
            covers: ceil pooling), so the decoder sees about 1/k^2 of them, with M-RoPE positions (and Qwen3-VL's
            DeepStack features) of the reduced grid. 1 leaves the model exactly as the family computes it.
        visual_pool_mode (`str`, *optional*, defaults to `"avg"`):
            `"avg"`: window averages (above); `"bilinear"`: bilinear resampling of each grid to the reduced size
            (antialiased, so it also averages when shrinking).
        trained_visual_pools (`list[int]`, *optional*):
            Reduction factors this model was trained to embed at (elastic reduction, like `trained_depths`); `None`
            for a model trained at `visual_pool` only.

    Example:

    ```python
    >>> from configuration_puma import PumaConfig

    >>> config = PumaConfig(text_config={"model_type": "qwen2_vl_text", "num_hidden_layers": 3},
    ...                     kept_layers=[0, 1, 27], base_num_hidden_layers=28)
    >>> config.text_config.num_hidden_layers, config.preset, config.pooling
    (3, 'puma', 'token')
    ```"""

    model_type = "puma"
    locals().update(sub_config_declaration())  # see "transformers compatibility" above

    def __init__(
        self,
        base_model_type: str = "qwen2_vl",
        text_config=None,
        vision_config=None,
        image_token_id: int = 151655,
        video_token_id: int = 151656,
        vision_start_token_id: int = 151652,
        vision_end_token_id: int = 151653,
        kept_layers: list[int] | None = None,
        base_num_hidden_layers: int | None = None,
        trained_depths: list[int] | None = None,
        preset: str = "puma",
        embedding_token_id: int | None = None,
        normalize: bool = True,
        visual_pool: int = 1,
        visual_pool_mode: str = "avg",
        trained_visual_pools: list[int] | None = None,
        **kwargs,
    ):
        if base_model_type not in FAMILIES:
            raise ValueError(f"base_model_type={base_model_type!r} is not one of {sorted(FAMILIES)}.")
        self.base_model_type = base_model_type
        self.text_config = _sub_config(text_config, base_model_type, "text_config")
        self.vision_config = _sub_config(vision_config, base_model_type, "vision_config")
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        self.kept_layers = list(kept_layers) if kept_layers is not None else None
        self.base_num_hidden_layers = base_num_hidden_layers
        self.trained_depths = list(trained_depths) if trained_depths is not None else None
        self.preset = preset
        self.embedding_token_id = embedding_token_id
        self.normalize = normalize
        self.visual_pool = visual_pool
        self.visual_pool_mode = visual_pool_mode
        self.trained_visual_pools = list(trained_visual_pools) if trained_visual_pools is not None else None
        defaults = preset_defaults(preset, base_model_type, self.text_config.hidden_size)
        for name in RECIPE_FIELDS:
            value = kwargs.pop(name) if name in kwargs else defaults[name]
            setattr(self, name, list(value) if name == "matryoshka_dims" and value is not None else value)
        kwargs.setdefault("tie_word_embeddings", False)  # an embedding model has no LM head to tie
        super().__init__(**kwargs)

        num_layers = self.text_config.num_hidden_layers
        if self.kept_layers is None:
            self.kept_layers = list(range(num_layers))
        if self.base_num_hidden_layers is None:
            self.base_num_hidden_layers = max(max(self.kept_layers) + 1, num_layers) if self.kept_layers else 0
        self.validate_puma()

    # ------------------------------------------------------------------------------------------------------------
    # The backbone's configuration
    # ------------------------------------------------------------------------------------------------------------
    def backbone_config(self) -> PretrainedConfig:
        """The family configuration transformers' own backbone class is built from; it shares `text_config` and
        `vision_config` with this configuration (so attention and dtype settings apply to both)."""
        config_class = getattr(transformers, FAMILIES[self.base_model_type]["config"])
        backbone = config_class(
            text_config=self.text_config.to_dict(), vision_config=self.vision_config.to_dict(),
            image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id, vision_end_token_id=self.vision_end_token_id,
            tie_word_embeddings=False,
        )
        # the same objects, not copies (transformers 4.x's constructors copy a given instance's fields, or ignore it)
        backbone.text_config, backbone.vision_config = self.text_config, self.vision_config
        set_attn_implementation(backbone, attn_implementation(self))
        return backbone

    @classmethod
    def from_base_config(cls, base_config, kept_layers: list[int], **puma_kwargs) -> "PumaConfig":
        """The configuration of `base_config` (a Qwen-VL family or PUMA configuration) pruned to `kept_layers`.

        `kept_layers` is in the numbering of `base_config`'s own layers; for a PUMA `base_config` it is mapped back
        to the original base model, so a PUMA checkpoint can be pruned further. Qwen3-VL injects the features of
        vision blocks `deepstack_visual_indexes[j]` into the hidden state after decoder layer j; pruned layer q keeps
        the injection that followed its source layer `kept_layers[q]`, if any. Since the injected layers are the
        first ones, the kept injections follow pruned layers 0, 1, ..., so the pruned model computes exactly the
        base model's stream into layer k when it keeps the first k layers (and the unused mergers are dropped).
        """
        base_depth = base_config.text_config.num_hidden_layers
        validate_kept_layers(kept_layers, base_depth)
        text_config = base_config.text_config.to_dict()
        text_config["num_hidden_layers"] = len(kept_layers)
        if getattr(base_config.text_config, "layer_types", None) is not None:
            text_config["layer_types"] = [base_config.text_config.layer_types[i] for i in kept_layers]
        if "decoder_sparse_step" in text_config:
            # Qwen3-VL-MoE decides per layer index whether a layer's MLP is sparse: keep each kept layer's kind
            sparse = [_is_sparse_layer(base_config.text_config, i) for i in kept_layers]
            text_config["decoder_sparse_step"] = 1
            text_config["mlp_only_layers"] = [position for position, is_sparse in enumerate(sparse) if not is_sparse]
        vision_config = base_config.vision_config.to_dict()
        if "deepstack_visual_indexes" in vision_config:
            indexes = list(vision_config["deepstack_visual_indexes"])
            vision_config["deepstack_visual_indexes"] = [indexes[i] for i in kept_layers if i < len(indexes)]
        if isinstance(base_config, PumaConfig):
            fields = {name: getattr(base_config, name) for name in RECIPE_FIELDS + (
                "preset", "normalize", "embedding_token_id", "visual_pool", "visual_pool_mode", "trained_visual_pools")}
            original = [base_config.kept_layers[i] for i in kept_layers]
            base_depth = base_config.base_num_hidden_layers
            base_model_type = base_config.base_model_type
            if base_config.trained_depths and list(kept_layers) == list(range(len(kept_layers))):
                # the first k layers of an elastic-depth model keep the depths it was trained at up to k
                fields["trained_depths"] = [d for d in base_config.trained_depths if d <= len(kept_layers)] or None
        else:
            fields, original = {}, list(kept_layers)
            base_model_type = base_config.model_type
        if "preset" in puma_kwargs and puma_kwargs["preset"] != fields.get("preset"):
            fields = {}  # a new recipe: its own defaults, not the source's
        fields.update(puma_kwargs)
        return cls(
            base_model_type=base_model_type, text_config=text_config, vision_config=vision_config,
            image_token_id=base_config.image_token_id, video_token_id=base_config.video_token_id,
            vision_start_token_id=base_config.vision_start_token_id,
            vision_end_token_id=base_config.vision_end_token_id, kept_layers=original,
            base_num_hidden_layers=base_depth, **fields,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Validation and serialisation
    # ------------------------------------------------------------------------------------------------------------
    def validate_puma(self):
        """Raises `ValueError` on a layer set, recipe or pixel range that cannot work."""
        validate_kept_layers(self.kept_layers, self.base_num_hidden_layers)
        if len(self.kept_layers) != self.text_config.num_hidden_layers:
            raise ValueError(
                f"kept_layers has {len(self.kept_layers)} entries but text_config.num_hidden_layers is "
                f"{self.text_config.num_hidden_layers}; they must agree."
            )
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLING_MODES}.")
        if self.pooling == "token" and not self.embedding_token:
            raise ValueError("pooling='token' needs an embedding_token.")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode={self.position_mode!r} is not one of {POSITION_MODES}.")
        if (self.processor_min_pixels is None) != (self.processor_max_pixels is None):
            raise ValueError("Set processor_min_pixels and processor_max_pixels together (or neither).")
        if self.processor_min_pixels is not None and not 0 < self.processor_min_pixels <= self.processor_max_pixels:
            raise ValueError(f"Need 0 < processor_min_pixels <= processor_max_pixels, got {self.processor_min_pixels} "
                             f"and {self.processor_max_pixels}.")
        if self.instruction_placement not in INSTRUCTION_PLACEMENTS:
            raise ValueError(f"instruction_placement={self.instruction_placement!r} is not one of "
                             f"{INSTRUCTION_PLACEMENTS}.")
        if not (0 < self.min_pixels <= self.max_pixels):
            raise ValueError(f"Need 0 < min_pixels <= max_pixels, got min_pixels={self.min_pixels}, max_pixels={self.max_pixels}.")
        for name in ("max_text_tokens", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        if self.alpha_mode not in ALPHA_MODES:
            raise ValueError(f"alpha_mode={self.alpha_mode!r} is not one of {ALPHA_MODES}.")
        self.validate_media()
        hidden_size = self.text_config.hidden_size
        for dim in self.matryoshka_dims or []:
            if not 0 < dim <= hidden_size:
                raise ValueError(f"matryoshka_dims entry {dim} is outside 1..{hidden_size} (the hidden size).")
        for depth in self.trained_depths or []:
            if not 0 < depth <= len(self.kept_layers):
                raise ValueError(f"trained_depths entry {depth} is outside 1..{len(self.kept_layers)} (the kept depth).")
        self.validate_visual_pool()
        missing = set(MODALITIES) - set(self.modality_words)
        if missing:
            raise ValueError(f"modality_words lacks the modalities {sorted(missing)}.")

    def validate_visual_pool(self):
        """Raises `ValueError` on a visual-token reduction that cannot work."""
        for factor in [self.visual_pool, *(self.trained_visual_pools or [])]:
            validate_visual_pool(factor)
        if self.visual_pool_mode not in VISUAL_POOL_MODES:
            raise ValueError(f"visual_pool_mode={self.visual_pool_mode!r} is not one of {VISUAL_POOL_MODES}.")

    def validate_media(self):
        """Raises `ValueError` on video sampling or PDF settings that cannot work."""
        if not (isinstance(self.video_fps, (int, float)) and self.video_fps > 0):
            raise ValueError(f"video_fps must be a positive number, got {self.video_fps!r}.")
        if not 1 <= self.video_min_frames <= self.video_max_frames or self.video_max_frames < 2:
            raise ValueError(f"Need 1 <= video_min_frames <= video_max_frames and video_max_frames >= 2 (a temporal "
                             f"patch is 2 frames), got {self.video_min_frames} and {self.video_max_frames}.")
        if not 0 < self.video_min_pixels <= self.video_max_pixels:
            raise ValueError(f"Need 0 < video_min_pixels <= video_max_pixels, got {self.video_min_pixels} and "
                             f"{self.video_max_pixels}.")
        if not self.video_total_pixels > 0:
            raise ValueError(f"video_total_pixels must be positive, got {self.video_total_pixels}.")
        if not (isinstance(self.pdf_dpi, (int, float)) and self.pdf_dpi > 0):
            raise ValueError(f"pdf_dpi must be a positive number, got {self.pdf_dpi!r}.")

    def to_dict(self) -> dict:
        """The configuration as a dict; sub-configurations also carry transformers 4's keys (`rope_scaling`,
        `rope_theta`, renamed fields), so that a folder saved with transformers 5 loads on 4.57."""
        output = super().to_dict()
        for name in ("text_config", "vision_config"):
            if isinstance(output.get(name), dict):
                with_legacy_keys(output[name])
        return output


def _is_sparse_layer(text_config, index: int) -> bool:
    """Whether decoder layer `index` of a Qwen3-VL-MoE text configuration has a mixture-of-experts MLP (the rule of
    transformers' `Qwen3VLMoeTextDecoderLayer`)."""
    return index not in (text_config.mlp_only_layers or []) and text_config.num_experts > 0 \
        and (index + 1) % text_config.decoder_sparse_step == 0


def _sub_config(value, base_model_type: str, key: str) -> PretrainedConfig:
    """The `text_config` or `vision_config` (`key`) of family `base_model_type` from a dict, an instance or `None`.

    The class comes from the family configuration's own `sub_configs` (the `model_type` a dict carries differs across
    transformers versions: 4.x names Qwen2-VL's vision configuration "qwen2_vl", 5.x "qwen2_vl_vision")."""
    if isinstance(value, PretrainedConfig):
        return value
    value = {name: item for name, item in (value or {}).items() if name != "model_type"}
    family_config = getattr(transformers, FAMILIES[base_model_type]["config"], None)
    if family_config is None:
        raise ValueError(f"This transformers {transformers.__version__} has no {FAMILIES[base_model_type]['config']}; "
                         f"upgrade transformers to load a {base_model_type!r} model.")
    return family_config.sub_configs[key](**value)


# transformers 5 names a few fields differently from 4.57: (5.x name, 4.57 name)
_RENAMED_FIELDS = (("num_local_experts", "num_experts"),)


def with_legacy_keys(config: dict) -> dict:
    """Adds transformers 4's names to a sub-configuration dict written by transformers 5: `rope_scaling`/`rope_theta`
    beside `rope_parameters`, and the 4.57 names of renamed fields (4.57 reads those, 5.x maps them back); returns
    the same dict."""
    for new, old in _RENAMED_FIELDS:
        if new in config:
            config.setdefault(old, config[new])
    parameters = config.get("rope_parameters")
    if not isinstance(parameters, dict):
        return config
    if "rope_theta" in parameters:
        config.setdefault("rope_theta", parameters["rope_theta"])
    if config.get("rope_scaling") is None:
        config["rope_scaling"] = {key: value for key, value in parameters.items() if key != "rope_theta"}
    return config


def validate_visual_pool(factor) -> None:
    """Raises `ValueError` unless `factor` is a visual-token reduction factor: a positive integer."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"visual_pool must be a positive integer (1: no reduction), got {factor!r}.")


def validate_kept_layers(kept_layers, base_depth: int) -> None:
    """Raises `ValueError` unless `kept_layers` is a non-empty, sorted, duplicate-free list of indices < `base_depth`."""
    if kept_layers is None or len(kept_layers) == 0:
        raise ValueError(f"kept_layers must name at least one decoder layer, got {kept_layers!r}.")
    if any(not isinstance(i, int) or isinstance(i, bool) for i in kept_layers):
        raise ValueError(f"kept_layers must be integers, got {kept_layers!r}.")
    if len(set(kept_layers)) != len(kept_layers):
        duplicates = sorted({i for i in kept_layers if kept_layers.count(i) > 1})
        raise ValueError(f"kept_layers has duplicates {duplicates}: {kept_layers!r}.")
    if list(kept_layers) != sorted(kept_layers):
        raise ValueError(f"kept_layers must be sorted in increasing order, got {kept_layers!r}.")
    if kept_layers[0] < 0 or kept_layers[-1] >= base_depth:
        raise ValueError(f"kept_layers {kept_layers!r} must lie in 0..{base_depth - 1} (the base model has {base_depth} layers).")


__all__ = ["ALPHA_MODES", "FAMILIES", "PRESETS", "PumaConfig", "TransformersCompatibilityError", "attn_implementation",
           "preset_defaults", "set_attn_implementation", "transformers_major", "validate_kept_layers",
           "validate_visual_pool", "with_legacy_keys"]

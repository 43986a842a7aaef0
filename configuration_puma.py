# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""PUMA configuration: a Qwen2-VL configuration plus the kept decoder layers, the embedding token and the prompts."""

from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLConfig


POOLING_MODES = ("token", "last", "mean")

# Release prompt format (JiuTian-VL/PUMA `ret_oneword.py`): the user turn is the optional image, the text, and
# "Summarize above <modality> in one word: "; the assistant turn is the embedding token followed by ".".
DEFAULT_MODALITY_WORDS = {"image": "image", "text": "sentence", "image,text": "image and sentence"}


class PumaConfig(Qwen2VLConfig):
    r"""
    Configuration of a [`PumaForEmbedding`]: a Qwen2-VL configuration whose `text_config.num_hidden_layers` is the
    number of *kept* decoder layers, plus the PUMA fields below. Every Qwen2-VL field (`text_config`,
    `vision_config`, `image_token_id`, ...) keeps its meaning.

    The class is written with an explicit `__init__` (rather than as a dataclass) so that the same file loads as
    remote code on transformers 4.57 and 5.x.

    Args:
        kept_layers (`list[int]`, *optional*):
            Indices, in the numbering of the base (unpruned) model, of the decoder layers kept, sorted and unique.
            Layer `kept_layers[i]` of the base model is layer `i` of this model. Defaults to all
            `text_config.num_hidden_layers` layers.
        base_num_hidden_layers (`int`, *optional*):
            Depth of the base model the layers were taken from. Defaults to `max(kept_layers) + 1` or the text depth.
        embedding_token (`str`, *optional*, defaults to `"[RET]"`):
            Added token whose final-norm hidden state is the embedding.
        embedding_token_id (`int`, *optional*):
            Its id in the tokenizer saved with the model. Set when the token is added.
        pooling (`str`, *optional*, defaults to `"token"`):
            `"token"`: hidden state at the embedding token; `"last"`: at the last non-padding token; `"mean"`: mean
            over non-padding tokens.
        normalize (`bool`, *optional*, defaults to `True`):
            L2-normalise the embeddings returned by `forward`.
        matryoshka_dims (`list[int]`, *optional*):
            Embedding sizes the model was trained to support when truncated (informational; `encode` accepts any
            `truncate_dim` up to the hidden size).
        system_prompt (`str`, *optional*, defaults to `"You are a helpful assistant."`):
            System turn of every prompt (Qwen2-VL's chat-template default). `None` drops the system turn.
        instruction_template (`str`, *optional*, defaults to `"{instruction}\n{text}"`):
            How a query instruction is joined to the query text.
        user_suffix_template (`str`, *optional*, defaults to `"\nSummarize above {modality} in one word: "`):
            Appended to the user turn; `{modality}` is filled from `modality_words`.
        modality_words (`dict[str, str]`, *optional*):
            Word used for each input modality (`"image"`, `"text"`, `"image,text"`) in the suffix.
        assistant_template (`str`, *optional*, defaults to `"{embedding_token}."`):
            The assistant turn.
        format_text (`bool`, *optional*, defaults to `True`):
            Strip the text, capitalise its first letter and end it with a full stop, as the release does.
        max_text_tokens (`int`, *optional*, defaults to 450):
            Instruction plus text are truncated to this many tokens before the suffix, so the embedding token is
            never cut off.
        min_pixels (`int`, *optional*, defaults to `4 * 28 * 28`):
            Lower bound on an image's pixel count after resizing.
        max_pixels (`int`, *optional*, defaults to `300 * 28 * 28`):
            Upper bound on an image's pixel count after resizing.

    Example:

    ```python
    >>> from configuration_puma import PumaConfig

    >>> config = PumaConfig(text_config={"num_hidden_layers": 3}, kept_layers=[0, 1, 27], base_num_hidden_layers=28)
    >>> config.text_config.num_hidden_layers
    3
    ```"""

    model_type = "puma"

    def __init__(
        self,
        kept_layers: list[int] | None = None,
        base_num_hidden_layers: int | None = None,
        embedding_token: str = "[RET]",
        embedding_token_id: int | None = None,
        pooling: str = "token",
        normalize: bool = True,
        matryoshka_dims: list[int] | None = None,
        system_prompt: str | None = "You are a helpful assistant.",
        instruction_template: str = "{instruction}\n{text}",
        user_suffix_template: str = "\nSummarize above {modality} in one word: ",
        modality_words: dict[str, str] | None = None,
        assistant_template: str = "{embedding_token}.",
        format_text: bool = True,
        max_text_tokens: int = 450,
        min_pixels: int = 4 * 28 * 28,
        max_pixels: int = 300 * 28 * 28,
        **kwargs,
    ):
        self.kept_layers = list(kept_layers) if kept_layers is not None else None
        self.base_num_hidden_layers = base_num_hidden_layers
        self.embedding_token = embedding_token
        self.embedding_token_id = embedding_token_id
        self.pooling = pooling
        self.normalize = normalize
        self.matryoshka_dims = list(matryoshka_dims) if matryoshka_dims is not None else None
        self.system_prompt = system_prompt
        self.instruction_template = instruction_template
        self.user_suffix_template = user_suffix_template
        self.modality_words = dict(modality_words) if modality_words is not None else dict(DEFAULT_MODALITY_WORDS)
        self.assistant_template = assistant_template
        self.format_text = format_text
        self.max_text_tokens = max_text_tokens
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        super().__init__(**kwargs)

        num_layers = self.text_config.num_hidden_layers
        if self.kept_layers is None:
            self.kept_layers = list(range(num_layers))
        if self.base_num_hidden_layers is None:
            self.base_num_hidden_layers = max(max(self.kept_layers) + 1, num_layers) if self.kept_layers else 0
        self.validate_puma()

    @classmethod
    def from_qwen2_vl_config(cls, base_config, kept_layers: list[int], **puma_kwargs) -> "PumaConfig":
        """Builds the configuration of `base_config` (a Qwen2-VL or PUMA configuration) pruned to `kept_layers`.

        `kept_layers` is in the numbering of `base_config`'s own layers; for a PUMA `base_config` it is mapped back
        to the original base model, so a PUMA checkpoint can be pruned further.
        """
        base_depth = base_config.text_config.num_hidden_layers
        validate_kept_layers(kept_layers, base_depth)
        text_config = base_config.text_config.to_dict()
        text_config["num_hidden_layers"] = len(kept_layers)
        if getattr(base_config.text_config, "layer_types", None) is not None:
            text_config["layer_types"] = [base_config.text_config.layer_types[i] for i in kept_layers]
        config_dict = base_config.to_dict()
        config_dict.pop("model_type", None)
        config_dict.pop("architectures", None)
        config_dict.pop("auto_map", None)
        config_dict["text_config"] = text_config
        if isinstance(base_config, PumaConfig):
            original = [base_config.kept_layers[i] for i in kept_layers]
            base_depth = base_config.base_num_hidden_layers
        else:
            original = list(kept_layers)
            for key in ("kept_layers", "base_num_hidden_layers"):
                config_dict.pop(key, None)
        config_dict.update(puma_kwargs)
        config_dict.update(kept_layers=original, base_num_hidden_layers=base_depth)
        return cls(**config_dict)

    def validate_puma(self):
        """Raises `ValueError` on a layer set, pooling mode or pixel range that cannot work."""
        validate_kept_layers(self.kept_layers, self.base_num_hidden_layers)
        if len(self.kept_layers) != self.text_config.num_hidden_layers:
            raise ValueError(
                f"kept_layers has {len(self.kept_layers)} entries but text_config.num_hidden_layers is "
                f"{self.text_config.num_hidden_layers}; they must agree."
            )
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLING_MODES}.")
        if not (0 < self.min_pixels <= self.max_pixels):
            raise ValueError(f"Need 0 < min_pixels <= max_pixels, got min_pixels={self.min_pixels}, max_pixels={self.max_pixels}.")
        if self.max_text_tokens <= 0:
            raise ValueError(f"max_text_tokens must be positive, got {self.max_text_tokens}.")
        hidden_size = self.text_config.hidden_size
        for dim in self.matryoshka_dims or []:
            if not 0 < dim <= hidden_size:
                raise ValueError(f"matryoshka_dims entry {dim} is outside 1..{hidden_size} (the hidden size).")
        missing = {"image", "text", "image,text"} - set(self.modality_words)
        if missing:
            raise ValueError(f"modality_words lacks the modalities {sorted(missing)}.")


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


__all__ = ["PumaConfig", "validate_kept_layers"]

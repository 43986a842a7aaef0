# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Sentence Transformers input module of a PUMA repository (`SentenceTransformer(repo, trust_remote_code=True)`).

Loading, the forward pass (through `modality_config`, reading `PumaEmbeddingOutput.raw_embeddings`) and saving are
Sentence Transformers' own `Transformer`; only `preprocess` is PUMA's. A chat template cannot reproduce PUMA's
prompt: the instruction goes inside the user turn, the suffix names the input's modality, and instruction + text are
truncated to `config.max_text_tokens` tokens *before* the suffix so the embedding token is never cut off. So the
prompt is built by the model's own `build_prompt`/`featurize`, and the embeddings equal `PumaForEmbedding.encode`.
"""

from sentence_transformers.base.modality import is_message_dict
from sentence_transformers.sentence_transformer.modules import Transformer

from .modeling_puma import build_prompt, featurize, parse_input


class PumaTransformer(Transformer):
    """`Transformer` whose inputs are PUMA prompts: texts, images (PIL or paths) and `{"text", "image"}` dicts.

    A `prompt` (from `encode(prompt=...)`, or a named entry of the model's `prompts` such as the one
    `encode_query` uses) is PUMA's query instruction.
    """

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict:
        # `task`, `processing_kwargs` and `max_length` are ignored: prompt length and pixel limits are config fields.
        for index, item in enumerate(inputs):
            if is_message_dict(item) or (isinstance(item, list) and item and is_message_dict(item[0])):
                raise ValueError(
                    f"inputs[{index}] is a chat message; PUMA builds its own prompt from texts, images and "
                    "{'text': ..., 'image': ...} dicts."
                )
        config = self.model.config
        examples = [parse_input(item, index) for index, item in enumerate(inputs)]
        prompts = [build_prompt(config, text, image is not None, prompt or None, self.processor.tokenizer)
                   for text, image in examples]
        features = dict(featurize(self.processor, config, prompts, [image for _, image in examples]))
        features["modality"] = _batch_modality(examples)
        return features


def _batch_modality(examples) -> str | tuple[str, str]:
    """The `modality_config` entry of a batch: the modalities present in it, as Sentence Transformers names them."""
    present = {"image" for _, image in examples if image is not None} | {"text" for text, _ in examples if text}
    return tuple(sorted(present)) if len(present) > 1 else present.pop()

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""PUMA behind mteb 2.x's encoder interface, so that `mteb.evaluate` runs it on any text, image or any-to-any task.

    import mteb
    from puma_eval.mteb_model import PumaMTEBEncoder

    model = PumaMTEBEncoder("my-puma", prompts={"query": "Find a passage that answers the question."})
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact", "MSCOCOT2IRetrieval"]))

Queries (and symmetric tasks: classification, clustering, STS) are encoded with the task's instruction, picked as
mteb's `AbsEncoder.get_instruction` picks it: `prompts[task name]`, `prompts[task type]`, `prompts["query"]`, then
the task's own prompt; documents (`PromptType.document`) without instruction, as PUMA encodes candidates. A batch
may hold `text` and an `image` or a `video` per item (mteb's any-to-any, document-understanding and video tasks);
per-query instructions (`instruction`, for instruction-retrieval tasks) are used when present. A video is what the
task's dataset holds: an open video decoder (torchcodec's, which 🤗 datasets' `Video` feature gives; sampled as the
recipe samples files), frames already sampled by a collator (a `(T, C, H, W)` tensor, sampled no further than the
recipe's frame cap), or an undecoded `{"path", "bytes"}` dict.
"""

import os
import tempfile

import numpy as np
import torch

from .encoding import encode_items


try:
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.types import PromptType
except ImportError as err:  # an optional extra
    raise ImportError("The MTEB wrapper needs mteb 2.x: pip install 'mteb>=2.0' (or pip install -e '.[mteb]').") \
        from err


PUMA_CITATION = """@inproceedings{lyu2025puma,
  title     = {PUMA: Layer-Pruned Language Model for Efficient Unified Multimodal Retrieval with Modality-Adaptive Learning},
  author    = {Lyu, Yibo and Shao, Rui and Chen, Gongwei and Zhu, Yijie and Guan, Weili and Nie, Liqiang},
  booktitle = {Proceedings of the 33rd ACM International Conference on Multimedia},
  year      = {2025}
}"""


def puma_model_meta(model, name: str | None = None, revision: str | None = None) -> ModelMeta:
    """mteb's `ModelMeta` of a loaded `PumaForEmbedding` (sizes read from the model; `name` defaults to its path)."""
    name = name or str(model.name_or_path)
    if "/" not in name:  # mteb wants "organization/name"
        name = f"local/{name}"
    return ModelMeta(
        loader=PumaMTEBEncoder, name=name, revision=revision, release_date=None, languages=None,
        n_parameters=sum(parameter.numel() for parameter in model.parameters()),
        memory_usage_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, max_tokens=None,
        embed_dim=model.config.text_config.hidden_size, license=None, open_weights=True, public_training_code=None,
        public_training_data=None, framework=["PyTorch", "Transformers"], similarity_fn_name="cosine",
        use_instructions=True, training_datasets=None, modalities=["image", "text", "video"], citation=PUMA_CITATION,
    )


class PumaMTEBEncoder(AbsEncoder):
    """mteb's `EncoderProtocol` over `PumaForEmbedding.encode`.

    Args:
        model_name: checkpoint folder or Hub id (what `mteb.get_model` passes), or the name given to `model`.
        revision: Hub revision of the checkpoint.
        model: an already loaded `PumaForEmbedding` (then nothing is loaded).
        prompts: instructions keyed by task name, task type (`"Retrieval"`, `"Any2AnyRetrieval"`, ...) or prompt type
            (`"query"`); the first match in that order is used, else the task's own prompt.
        batch_size: inputs per forward pass.
        device, dtype: passed to `PumaForEmbedding.from_pretrained`.
    """

    def __init__(self, model_name: str, revision: str | None = None, *, model=None,
                 prompts: dict[str, str] | None = None, batch_size: int = 16, device: str | None = None,
                 dtype=None, **kwargs):
        if model is None:
            from modeling_puma import PumaForEmbedding

            hub = {"revision": revision} if revision else {}
            model = PumaForEmbedding.from_pretrained(model_name, device_map=device, dtype=dtype, **hub, **kwargs)
        self.model = model
        self.batch_size = batch_size
        self.prompts_dict = dict(prompts or {})
        self.mteb_model_meta = puma_model_meta(model, model_name, revision)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type: PromptType | None = None,
               **kwargs) -> np.ndarray:
        """Embeds every batch of mteb's `DataLoader`: items with `text`, `image` (PIL) or both; `(n, dim)` float32."""
        is_query = prompt_type != PromptType.document
        task_instruction = (self.get_task_instruction(task_metadata, prompt_type) or None) if is_query else None
        batch_size = kwargs.get("batch_size") or self.batch_size
        embeddings = []
        with tempfile.TemporaryDirectory(prefix="puma-mteb-") as folder:  # videos given as bytes
            for batch in inputs:
                size = len(next(batch[key] for key in ("text", "image", "video") if key in batch))
                texts = batch.get("text") or [None] * size
                images = batch.get("image") or [None] * size
                videos = [_video(video, folder) for video in batch.get("video") or [None] * size]
                items = [{"text": text or None, "image": image, "video": video}
                         for text, image, video in zip(texts, images, videos)]
                instructions = [instruction or task_instruction for instruction in batch["instruction"]] \
                    if is_query and "instruction" in batch else [task_instruction] * size
                embeddings.append(encode_items(self.model, items, instructions, is_query, batch_size))
        return torch.cat(embeddings).numpy()


def _video(video, folder: str):
    """A video of an mteb batch as `encode` takes it: a decoder or frames as they are, an undecoded `{"path",
    "bytes"}` dict as its path (its bytes written to `folder` when it has no readable path)."""
    if not isinstance(video, dict):
        return video
    if video.get("path") and os.path.isfile(video["path"]):
        return video["path"]
    if video.get("bytes"):
        path = os.path.join(folder, f"video-{len(os.listdir(folder))}{os.path.splitext(video.get('path') or '')[1]}")
        with open(path, "wb") as f:
            f.write(video["bytes"])
        return path
    raise ValueError(f"An mteb video {sorted(video)} has neither a readable path nor bytes.")

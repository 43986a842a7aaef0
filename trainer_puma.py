# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""PUMA training: `PumaTrainer` (a `transformers.Trainer`), its arguments, the distillation teachers and GradCache.

Batches come from `data_puma.PumaCollator`: `{"query": features, "candidate": features, ["negative": features],
"modality": LongTensor[B], ["negative_modality": LongTensor[B*n]], "query_ids", "candidate_ids", ["negative_ids"]}`,
where each `features` is a dict of processor tensors for `PumaForEmbedding.forward`.

Teachers (the full-depth model whose embedding the pruned student distils):
- `SharedWeightTeacher`: one copy of the base weights. The student's kept layers (LoRA adapters disabled) are reused
  in place and only the dropped layers are added, so the teacher costs the dropped layers' memory only.
- `CachedTeacher`: embeddings precomputed once (`precompute_teacher_cache`) and stored as safetensors shards keyed
  by sample id, with a fingerprint of the teacher checkpoint, prompt template, pixel limits and data files.
- `SeparateTeacher`: an independent full model, as the release does (kept for comparison).
"""

import contextlib
import copy
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from mbeir_puma import checkpoint_fingerprint, file_fingerprint
from losses_puma import (
    PAIR_MODES,
    DistillationObjective,
    ElasticObjective,
    HiddenStateDistillLoss,
    KLDistillLoss,
    MACLoss,
    at_least_fp32,
    build_loss,
    tau_hard_schedule,
)
from modeling_puma import PumaForEmbedding, prepare_inputs


logger = logging.get_logger(__name__)

FEATURE_GROUPS = ("query", "candidate", "negative")
TEACHER_MODES = ("none", "shared", "cached", "separate")
DISTILL_METRICS = ("none", "mse", "cosine")


@dataclass
class PumaTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus PUMA's objective, teacher and batching options. Defaults are the release's stage 2."""

    loss: str = field(default="mac", metadata={"help": "Contrastive loss: 'mac' (modality-adaptive) or 'infonce'."})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature (release stage 1: 0.05)."})
    tau_norm: float = field(default=0.03, metadata={"help": "MAC inter-modality temperature (release: 0.03)."})
    tau_decay: float = field(default=0.5, metadata={"help": "MAC decay rate d of tau_hard (release: 0.5 and 0.2)."})
    tau_plateau: float = field(default=0.5, metadata={"help": "Fraction of training after which tau_hard stays flat."})
    tau_round_digits: int | None = field(default=3, metadata={"help": "Round tau_hard to this many digits; None: no rounding."})
    contrastive_weight: float = field(default=1.0, metadata={"help": "Weight of the contrastive loss (stage 1: 0.9)."})
    distill: str = field(default="none", metadata={"help": "Hidden-state distillation: 'none', 'mse' or 'cosine'."})
    distill_scale: float = field(default=0.05, metadata={"help": "Factor inside the hidden-state loss (release: 0.05)."})
    distill_weight: float = field(default=0.0, metadata={"help": "Weight of the hidden-state loss (stage 1: 0.1)."})
    kl_weight: float = field(default=0.0, metadata={"help": "Weight of the in-batch KL distillation (0: off)."})
    kl_teacher_temperature: float | None = field(default=None, metadata={"help": "Teacher temperature of the KL loss; default: the student's."})
    teacher: str = field(default="none", metadata={"help": "Teacher: 'none', 'shared' (LoRA base reused), 'cached', 'separate'."})
    teacher_model: str | None = field(default=None, metadata={"help": "Full-depth base checkpoint of the teacher ('shared', 'separate')."})
    teacher_cache: str | None = field(default=None, metadata={"help": "Folder of precomputed teacher embeddings ('cached')."})
    gather_across_devices: bool = field(default=True, metadata={"help": "All-gather embeddings so negatives span the global batch."})
    local_loss: bool = field(default=False, metadata={"help": "With gather_across_devices, score only this rank's queries against the global candidates: (B/W) x B logits instead of B x B, same gradient."})
    gather_with_grad: bool = field(default=True, metadata={"help": "Gather embeddings with gradient (each rank's gradient is the global batch's). False: the release's plain all-gather, whose applied gradient is 1/world_size of it."})
    grad_cache_chunk_size: int | None = field(default=None, metadata={"help": "GradCache: embed in chunks of this many inputs (None: off)."})
    module_learning_rates: dict | str | None = field(default=None, metadata={"help": "Per-module learning rates: a mapping of regular expression to rate (a JSON object on the command line), e.g. {\"language_model\\\\.layers\\\\.0\\\\.\": 1e-4}. The first pattern found (re.search) in a trainable parameter's name sets its rate; the others use learning_rate. A pattern that matches no trainable parameter is an error."})
    embedding_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the input-embedding parameters (the embedding token's row): shorthand for a first module_learning_rates rule 'embed_tokens'."})
    merge_lora_on_save: bool = field(default=True, metadata={"help": "Merge LoRA into the base on the final save_model()."})
    depths: list[int] | None = field(default=None, metadata={"help": "Elastic depth: also train the embedding of the model truncated after each of these numbers of first layers, all from the same forward pass; increasing, ending at the model's kept depth (e.g. 4 8 12). The saved config records them (trained_depths)."})
    depth_weights: list[float] | None = field(default=None, metadata={"help": "Weight of the contrastive loss at each depth, in the order of depths (default: 1 each)."})
    matryoshka_dims: list[int] | None = field(default=None, metadata={"help": "Matryoshka: also train the embedding truncated to each of these sizes, increasing (e.g. 256 512 1536). The saved config records them."})
    matryoshka_weights: list[float] | None = field(default=None, metadata={"help": "Weight of the contrastive loss at each size, in the order of matryoshka_dims (default: 1 each)."})
    elastic_pairs: str = field(default="grid", metadata={"help": "(depth, size) pairs trained: 'grid' (every pair) or 'diagonal' (the i-th depth at the i-th size, Starbucks; as many sizes as depths)."})
    self_distill: str = field(default="none", metadata={"help": "Self-distillation of each shallower depth's embedding towards the deepest one's: 'none', 'mse' or 'cosine'."})
    self_distill_weight: float = field(default=0.0, metadata={"help": "Weight of the self-distillation (summed over the shallower depths)."})
    self_kl_weight: float = field(default=0.0, metadata={"help": "Weight of the in-batch KL of every other (depth, size) pair towards the deepest depth at full size (Starbucks); 0: off."})
    elastic_sample_pairs: int | None = field(default=None, metadata={"help": "Schedule of the (depth, size) pairs: unset, every pair at every step; n, the deepest depth at full size plus n of the other pairs drawn at each step (seeded by seed)."})

    def __post_init__(self):
        super().__post_init__()
        self.remove_unused_columns = False  # batches are nested dicts built by the collator
        if self.loss not in ("mac", "infonce"):
            raise ValueError(f"loss={self.loss!r} is not one of 'mac', 'infonce'.")
        if self.distill not in DISTILL_METRICS:
            raise ValueError(f"distill={self.distill!r} is not one of {DISTILL_METRICS}.")
        if self.teacher not in TEACHER_MODES:
            raise ValueError(f"teacher={self.teacher!r} is not one of {TEACHER_MODES}.")
        distilling = (self.distill != "none" and self.distill_weight > 0) or self.kl_weight > 0
        if distilling and self.teacher == "none":
            raise ValueError("Distillation (distill_weight > 0 or kl_weight > 0) needs a teacher: set teacher=shared|cached|separate.")
        if self.distill == "none" and self.distill_weight > 0:
            raise ValueError(f"distill_weight={self.distill_weight} needs distill='mse' or 'cosine'.")
        if self.teacher == "cached" and not self.teacher_cache:
            raise ValueError("teacher='cached' needs teacher_cache (a folder written by precompute_teacher_cache).")
        if self.teacher in ("shared", "separate") and not self.teacher_model:
            raise ValueError(f"teacher={self.teacher!r} needs teacher_model (the full-depth base checkpoint).")
        if self.grad_cache_chunk_size is not None and self.grad_cache_chunk_size <= 0:
            raise ValueError(f"grad_cache_chunk_size must be positive, got {self.grad_cache_chunk_size}.")
        if self.local_loss and not (self.gather_across_devices and self.gather_with_grad):
            raise ValueError("local_loss=True scores local queries against gathered candidates: it needs gather_across_devices=True and gather_with_grad=True.")
        self.module_learning_rates = _parse_learning_rate_rules(self.module_learning_rates)
        if self.embedding_learning_rate is not None and not (0 < self.embedding_learning_rate < math.inf):
            raise ValueError(f"embedding_learning_rate must be a positive number, got {self.embedding_learning_rate!r}.")
        if self.elastic_pairs not in PAIR_MODES:
            raise ValueError(f"elastic_pairs={self.elastic_pairs!r} is not one of {PAIR_MODES}.")
        if self.self_distill not in DISTILL_METRICS:
            raise ValueError(f"self_distill={self.self_distill!r} is not one of {DISTILL_METRICS}.")
        if self.self_distill == "none" and self.self_distill_weight > 0:
            raise ValueError(f"self_distill_weight={self.self_distill_weight} needs self_distill='mse' or 'cosine'.")
        if (self.self_distill_weight > 0 or self.self_kl_weight > 0) and not self.depths and not self.matryoshka_dims:
            raise ValueError("self_distill_weight and self_kl_weight distil towards the deepest depth at full size: set "
                             "depths (and/or matryoshka_dims).")
        if self.depths or self.matryoshka_dims:
            # the list settings fail now, naming the option, rather than when the trainer starts
            self.build_objective(num_layers=self.depths[-1] if self.depths else 1)

    def learning_rate_rules(self) -> list[tuple[str, float]]:
        """`(pattern, rate)` rules for `parameter_groups`, in order: `embedding_learning_rate`, then
        `module_learning_rates`."""
        rules = [(r"embed_tokens", self.embedding_learning_rate)] if self.embedding_learning_rate else []
        return rules + list((self.module_learning_rates or {}).items())

    def build_objective(self, num_layers: int | None = None) -> DistillationObjective | ElasticObjective:
        """The loss module these arguments describe: a `DistillationObjective`, wrapped in an `ElasticObjective` when
        `depths` or `matryoshka_dims` are set. `num_layers`, the model's kept depth, is the only depth trained when
        `matryoshka_dims` comes without `depths`."""
        kwargs = {"gather_across_devices": self.gather_across_devices, "local_loss": self.local_loss,
                  "gather_with_grad": self.gather_with_grad}
        contrastive = build_loss(self.loss, **({"tau_norm": self.tau_norm} if self.loss == "mac" else {"temperature": self.temperature}), **kwargs)
        hidden = HiddenStateDistillLoss(self.distill, self.distill_scale) if self.distill != "none" else None
        temperature = self.tau_norm if self.loss == "mac" else self.temperature
        kl = KLDistillLoss(temperature, self.kl_teacher_temperature, **kwargs) if self.kl_weight > 0 else None
        objective = DistillationObjective(contrastive, hidden, kl, self.contrastive_weight,
                                          self.distill_weight if hidden is not None else 0.0, self.kl_weight)
        if not self.depths and not self.matryoshka_dims:
            return objective
        if not self.depths and num_layers is None:
            raise ValueError("matryoshka_dims without depths trains the model's kept depth: pass num_layers.")
        self_distill = HiddenStateDistillLoss(self.self_distill, 1.0) if self.self_distill != "none" else None
        self_kl = KLDistillLoss(temperature, self.kl_teacher_temperature, **kwargs) if self.self_kl_weight > 0 else None
        return ElasticObjective(objective, self.depths or [num_layers], self.matryoshka_dims, self.depth_weights,
                                self.matryoshka_weights, self.elastic_pairs, self_distill, self_kl,
                                self.self_distill_weight if self_distill is not None else 0.0, self.self_kl_weight,
                                self.elastic_sample_pairs, self.seed)


def _parse_learning_rate_rules(rules) -> dict[str, float] | None:
    """`module_learning_rates` from YAML (a mapping) or the command line (a JSON object), validated."""
    if rules is None or rules == "":
        return None
    if isinstance(rules, str):
        try:
            rules = json.loads(rules)
        except json.JSONDecodeError as err:
            raise ValueError(f"module_learning_rates must be a JSON object of pattern -> rate, got {rules!r} ({err.msg}).") from err
    if not isinstance(rules, dict):
        raise ValueError(f"module_learning_rates must be a mapping of pattern -> rate, got {type(rules).__name__}: {rules!r}.")
    parsed = {}
    for pattern, rate in rules.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"module_learning_rates: {pattern!r} is not a regular expression ({err}).") from err
        try:
            rate = float(rate)  # YAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError):
            rate = math.nan
        if not (0 < rate < math.inf):
            raise ValueError(f"module_learning_rates: the rate of {pattern!r} must be a positive number, got {rules[pattern]!r}.")
        parsed[pattern] = rate
    return parsed


# --------------------------------------------------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------------------------------------------------
class SeparateTeacher:
    """An independent full-depth model, frozen (the release's recipe: a second copy of the base in memory)."""

    def __init__(self, model: PumaForEmbedding):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def embed(self, features: dict, ids: list[str]) -> torch.Tensor:
        return self.model(**features).raw_embeddings


class SharedWeightTeacher:
    """The full-depth teacher built from the LoRA student's own modules plus the layers pruning dropped.

    The vision tower, token embeddings, final norm and kept layers are the student's modules; the teacher runs them
    with the LoRA adapters disabled, so it sees the frozen base weights, and adds only the dropped layers.
    """

    def __init__(self, peft_model, teacher_model: PumaForEmbedding):
        self.peft_model, self.model = peft_model, teacher_model

    @classmethod
    def from_student(cls, peft_model, base_path: str) -> "SharedWeightTeacher":
        if not hasattr(peft_model, "disable_adapter"):
            raise ValueError("teacher='shared' needs a LoRA (peft) student: with full fine-tuning the shared weights change.")
        student: PumaForEmbedding = peft_model.get_base_model()
        kept, depth = list(student.config.kept_layers), student.config.base_num_hidden_layers
        dropped = [i for i in range(depth) if i not in kept]
        if not dropped:
            return cls(peft_model, student)
        # Load the dropped layers only; the duplicate vision tower and embeddings this loads are released below.
        holder = PumaForEmbedding.from_pretrained(base_path, kept_layers=dropped, processor=student.processor,
                                                  dtype=student.dtype, device_map=student.device)
        if holder.config.base_num_hidden_layers != depth:
            raise ValueError(f"teacher_model {base_path} has {holder.config.base_num_hidden_layers} layers; the student's base had {depth}.")
        injected = len(getattr(holder.config.vision_config, "deepstack_visual_indexes", None) or []) \
            + len(getattr(student.config.vision_config, "deepstack_visual_indexes", None) or [])
        if any(index not in kept for index in range(injected)):
            # The teacher reuses the student's vision tower, which holds the DeepStack mergers of kept layers only.
            raise ValueError(f"teacher='shared' needs the student to keep the {injected} layers Qwen3-VL injects visual "
                             f"features after (0..{injected - 1}); it keeps {kept}. Use teacher='cached' or 'separate'.")
        sources = [(student.model.language_model.layers, student.config.text_config),
                   (holder.model.language_model.layers, holder.config.text_config)]
        positions, layers, types = [0, 0], [], []
        for index in range(depth):
            source = 0 if index in kept else 1
            modules, text_config = sources[source]
            layers.append(modules[positions[source]])
            if getattr(text_config, "layer_types", None) is not None:
                types.append(text_config.layer_types[positions[source]])
            positions[source] += 1
        text = holder.model.language_model
        text.layers = nn.ModuleList(layers)
        text.embed_tokens, text.norm = student.model.language_model.embed_tokens, student.model.language_model.norm
        holder.model.visual = student.model.visual
        holder.config.text_config.num_hidden_layers = depth
        if len(types) == depth:
            holder.config.text_config.layer_types = types
        holder.config.kept_layers = list(range(depth))
        for layer in holder.model.language_model.layers:
            if layer not in student.model.language_model.layers:
                layer.requires_grad_(False)
        return cls(peft_model, holder)

    @torch.no_grad()
    def embed(self, features: dict, ids: list[str]) -> torch.Tensor:
        with self.peft_model.disable_adapter():
            return self.model(**features).raw_embeddings


def teacher_fingerprint(teacher_path: str, config, data_files: list[str]) -> dict:
    """What a cached teacher embedding depends on: the teacher checkpoint's content, prompt template, pixel limits
    and the data files' content (`mbeir_puma.checkpoint_fingerprint` / `file_fingerprint`)."""
    prompt_fields = ("embedding_token", "system_prompt", "instruction_template", "user_suffix_template",
                     "modality_words", "assistant_template", "format_text", "max_text_tokens", "pooling")
    # the reading of images and the sampling of videos and PDF pages (fields of later versions, absent: defaults)
    media_fields = ("max_prompt_tokens", "keep_empty_instruction", "exif_transpose", "alpha_mode", "video_fps",
                    "video_min_frames", "video_max_frames", "video_min_pixels", "video_max_pixels",
                    "video_total_pixels", "pdf_dpi")
    return {
        "teacher_checkpoint": checkpoint_fingerprint(teacher_path),
        "prompt_template": {name: getattr(config, name) for name in prompt_fields},
        "pixel_limits": {"min_pixels": config.min_pixels, "max_pixels": config.max_pixels},
        "media": {name: getattr(config, name, None) for name in media_fields},
        "data_files": {os.path.basename(path): file_fingerprint(path) for path in data_files},
    }


def teacher_cache_is_fresh(cache_dir: str, fingerprint: dict) -> bool:
    """Whether `cache_dir` holds a complete teacher cache written for exactly this `fingerprint`."""
    path = os.path.join(cache_dir, "fingerprint.json")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(cache_dir, "index.json"))):
        return False
    with open(path, encoding="utf-8") as f:
        return json.load(f) == json.loads(json.dumps(fingerprint, sort_keys=True))


@torch.no_grad()
def precompute_teacher_cache(teacher: PumaForEmbedding, dataloader, out_dir: str, fingerprint: dict,
                             shard_size: int = 65536) -> int:
    """Embeds every query, candidate and negative of `dataloader` once with `teacher`; returns the number of ids.

    Writes `fingerprint.json`, `index.json` (id -> [shard, row]) and `embeddings-XXXXX.safetensors` shards.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    teacher.eval()
    index, rows, shard = {}, [], 0

    def flush():
        nonlocal rows, shard
        if rows:
            save_file({"embeddings": torch.stack(rows)}, os.path.join(out_dir, f"embeddings-{shard:05d}.safetensors"))
            rows, shard = [], shard + 1

    for batch in tqdm(dataloader, desc="Teacher cache"):
        for group in FEATURE_GROUPS:
            if group not in batch:
                continue
            ids = batch[f"{group}_ids"]
            fresh = [i for i, sample_id in enumerate(ids) if sample_id not in index]
            if not fresh:
                continue
            features = {k: v.to(teacher.device) for k, v in batch[group].items()}
            embeddings = teacher(**features).raw_embeddings.float().cpu()
            for i in fresh:
                if ids[i] in index:
                    continue
                index[ids[i]] = [shard, len(rows)]
                rows.append(embeddings[i])
                if len(rows) == shard_size:
                    flush()
    flush()
    with open(os.path.join(out_dir, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f)
    with open(os.path.join(out_dir, "fingerprint.json"), "w", encoding="utf-8") as f:
        json.dump(fingerprint, f, indent=2, sort_keys=True)
    return len(index)


class CachedTeacher:
    """Teacher embeddings looked up by sample id; refuses a cache whose fingerprint differs from the run's."""

    def __init__(self, cache_dir: str, expected_fingerprint: dict | None = None):
        from safetensors.torch import load_file

        with open(os.path.join(cache_dir, "fingerprint.json"), encoding="utf-8") as f:
            stored = json.load(f)
        if expected_fingerprint is not None:
            expected = json.loads(json.dumps(expected_fingerprint, sort_keys=True))
            differing = [key for key in sorted(set(stored) | set(expected)) if stored.get(key) != expected.get(key)]
            if differing:
                details = "; ".join(f"{key}: cache {stored.get(key)} != run {expected.get(key)}" for key in differing)
                raise ValueError(f"The teacher cache {cache_dir} is stale ({details}). Recompute it with precompute_teacher_cache.")
        with open(os.path.join(cache_dir, "index.json"), encoding="utf-8") as f:
            index = json.load(f)
        shards = sorted(name for name in os.listdir(cache_dir) if name.startswith("embeddings-"))
        shards = [load_file(os.path.join(cache_dir, name))["embeddings"] for name in shards]
        # One table and one row number per id, so a batch is a single gather rather than a stack of slices.
        offsets = [0]
        for shard in shards[:-1]:
            offsets.append(offsets[-1] + shard.shape[0])
        self.embeddings = torch.cat(shards)
        self.rows = {sample_id: offsets[shard] + row for sample_id, (shard, row) in index.items()}

    def embed(self, features: dict, ids: list[str]) -> torch.Tensor:
        missing = [sample_id for sample_id in ids if sample_id not in self.rows]
        if missing:
            raise KeyError(f"The teacher cache lacks {len(missing)} ids of this batch, e.g. {missing[:5]}; it is incomplete.")
        rows = torch.tensor([self.rows[sample_id] for sample_id in ids])
        return self.embeddings.index_select(0, rows).to(features["input_ids"].device)


# --------------------------------------------------------------------------------------------------------------------
# GradCache helpers
# --------------------------------------------------------------------------------------------------------------------
class RandContext:
    """Captures the CPU and device RNG states at construction and restores them on entry, so a re-run forward
    draws the same dropout masks (GradCache, arXiv 2101.06983)."""

    def __init__(self, *tensors: torch.Tensor):
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        set_device_states(self.devices, self.device_states)

    def __exit__(self, *exc):
        self._fork.__exit__(*exc)


def split_features(features: dict, chunk_size: int, image_token_id: int,
                   video_token_id: int | None = None) -> list[dict]:
    """Splits a batch of processor features into row chunks, with each chunk's images and videos and trimmed right
    padding.

    Patches are flattened across images in `pixel_values` (and videos in `pixel_values_videos`); a row's images
    (videos) are the next ones in order whose placeholder tokens add up to the row's count of image (video) tokens
    (a Qwen3-VL video's tokens come in one run per frame pair, so runs do not count videos).
    """
    ids = features["input_ids"]
    visuals = [(kind, _row_visuals(features, token_id, grid_key))
               for kind, token_id, grid_key in (("image", image_token_id, "image_grid_thw"),
                                                ("video", video_token_id, "video_grid_thw"))
               if token_id is not None and features.get(grid_key) is not None]
    chunks = []
    for start in range(0, ids.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        width = int(features["attention_mask"][rows].sum(dim=1).max())
        chunk = {key: value[rows, :width] for key, value in features.items() if key in ("input_ids", "attention_mask", "mm_token_type_ids")}
        for kind, (spans, offsets) in visuals:
            first, last = spans[start][0], spans[min(start + chunk_size, len(spans)) - 1][1]
            if last == first:
                continue
            grid_key, values_key = ("image_grid_thw", "pixel_values") if kind == "image" else \
                ("video_grid_thw", "pixel_values_videos")
            chunk[grid_key] = features[grid_key][first:last]
            chunk[values_key] = features[values_key][offsets[first]:offsets[last]]
            if kind == "video" and features.get("second_per_grid_ts") is not None:
                chunk["second_per_grid_ts"] = features["second_per_grid_ts"][first:last]
        chunks.append(chunk)
    return chunks


def _row_visuals(features: dict, token_id: int, grid_key: str) -> tuple[list[tuple[int, int]], list[int]]:
    """`([(first, end) visual of each row], patch offsets)` of the images or videos of `grid_key`."""
    grid = features[grid_key]
    patches = grid.prod(-1).tolist()
    is_token = features["input_ids"] == token_id
    per_token = sum(patches) // max(int(is_token.sum()), 1)  # patches per placeholder token: the merge area
    spans, visual = [], 0
    for count in is_token.sum(dim=1).tolist():
        first, covered = visual, 0
        while covered < count:
            covered += patches[visual] // per_token
            visual += 1
        spans.append((first, visual))
    return spans, [0, *torch.cumsum(grid.prod(-1), 0).tolist()]


# --------------------------------------------------------------------------------------------------------------------
# Optimizer groups
# --------------------------------------------------------------------------------------------------------------------
def parameter_groups(model: nn.Module, learning_rate: float, weight_decay: float, decay_names: set[str],
                     lr_rules: list[tuple[str, float]]) -> list[dict]:
    """Optimizer groups keyed by (learning rate, weight decay): the first regex of `lr_rules` found in a trainable
    parameter's name sets its rate; parameters outside `decay_names` (biases, norms) get no weight decay. A rule that
    matches no trainable parameter raises `ValueError` (a typo would otherwise leave every rate unchanged)."""
    groups, used, names = defaultdict(list), set(), []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        names.append(name)
        rule = next((i for i, (pattern, _) in enumerate(lr_rules) if re.search(pattern, name)), None)
        lr = learning_rate if rule is None else lr_rules[rule][1]
        used.add(rule)
        groups[(lr, weight_decay if name in decay_names else 0.0)].append(parameter)
    unused = [pattern for i, (pattern, _) in enumerate(lr_rules) if i not in used]
    if unused:
        raise ValueError(f"Learning-rate rules match no trainable parameter (or only parameters an earlier rule took): "
                         f"{', '.join(unused)}. Trainable parameters are named like {names[:3]}.")
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------------
# Callbacks: readable log lines, per-epoch draws
# ----------------------------------------------------------------------------------------------------------------
def format_log(logs: dict, state) -> str:
    """A Trainer log as one line: `step 20/120 | epoch 0.33 | loss 1.234 | contrastive_loss 1.1 | ... | lr 2.00e-03`
    (total loss, then its components, then the other scalars), or the end-of-training summary."""
    if "train_runtime" in logs:
        rate = logs.get("train_steps_per_second")
        return (f"finished {state.global_step} steps in {logs['train_runtime']:.1f} s"
                + (f" ({rate:.3g} steps/s)" if rate else "")
                + (f", mean loss {logs['train_loss']:.4g}" if "train_loss" in logs else ""))
    losses = sorted((key for key in logs if "loss" in key), key=lambda key: (key != "loss", key))
    others = [key for key in logs if key not in losses and key not in ("epoch", "total_flos")]
    parts = [f"step {state.global_step}/{state.max_steps}"]
    if "epoch" in logs:
        parts.append(f"epoch {logs['epoch']:.2f}")
    for key in losses + others:
        value = logs[key]
        if key == "learning_rate":
            parts.append(f"lr {value:.2e}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


class ReadableProgressCallback(ProgressCallback):
    """transformers' progress bar (steps done of the total, elapsed time, ETA) with each log written above it as
    one `format_log` line instead of a Python dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_log(logs, state))


class ReadableLogCallback(PrinterCallback):
    """The log printer of `disable_tqdm` runs, printing `format_log` lines."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(format_log(logs, state), flush=True)


class SetEpochCallback(TrainerCallback):
    """Gives datasets with per-epoch draws (M-BEIR positives, instructions) the current epoch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


class PumaTrainer(Trainer):
    """`Trainer` for PUMA embeddings: contrastive (MAC or InfoNCE) + distillation, gathered negatives, GradCache.

    With `grad_cache_chunk_size`, a step embeds the batch in chunks without a graph, computes the loss and its gradient
    with respect to the embeddings, then re-embeds each chunk with a graph (replaying the RNG state captured right
    before that chunk's first forward, so dropout masks match) and backpropagates its share. The cost is a second
    forward per step; the peak memory is one chunk's activations (GradCache, arXiv 2101.06983). Under DDP every
    backward but the last runs under `no_sync`: one all-reduce per optimizer step.

    With `depths` and/or `matryoshka_dims` (an `ElasticObjective`), each forward returns the embedding at every
    listed depth (`PumaForEmbedding.forward(output_depths=...)`, one pass), the loss covers every (depth, size) pair,
    GradCache caches every depth's embedding, and the saved config records `trained_depths` and `matryoshka_dims`.

    Args (beyond `Trainer`'s):
        objective (`DistillationObjective` or `ElasticObjective`, *optional*): defaults to `args.build_objective()`.
        teacher (*optional*): an object with `embed(features, ids) -> Tensor`; defaults to the one `args.teacher`
            names (`SharedWeightTeacher`, `CachedTeacher` or `SeparateTeacher`).
    """

    # compute_loss returns a per-batch mean: let the Trainer divide by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, objective: DistillationObjective | ElasticObjective | None = None, teacher=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, PumaTrainingArguments):
            raise TypeError("PumaTrainer needs PumaTrainingArguments.")
        for stock, readable in ((ProgressCallback, ReadableProgressCallback), (PrinterCallback, ReadableLogCallback)):
            if self.pop_callback(stock) is not None:  # the Trainer adds one of the two, by disable_tqdm
                self.add_callback(readable)
        self.objective = objective if objective is not None else self.args.build_objective(
            num_layers=self._embedding_model().config.text_config.num_hidden_layers)
        self.teacher = teacher if teacher is not None else self._default_teacher()
        self._tracked, self._eval_tracked = defaultdict(list), defaultdict(list)  # logged components
        self._check_startup()

    def _embedding_model(self) -> PumaForEmbedding:
        """The `PumaForEmbedding` inside the trained model's wrappers (DDP, peft)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _default_teacher(self):
        args = self.args
        if args.teacher == "cached":
            return CachedTeacher(args.teacher_cache)
        if args.teacher == "shared":
            return SharedWeightTeacher.from_student(self.model, args.teacher_model)
        if args.teacher == "separate":
            student = self._embedding_model()
            # Loaded with its own processor, so its embedding-token row is initialised as the student's was.
            return SeparateTeacher(PumaForEmbedding.from_pretrained(args.teacher_model, dtype=student.dtype,
                                                                    device_map=student.device))
        return None

    def _check_startup(self):
        """Inconsistent settings fail here, before the first step, not mid-run."""
        needs_teacher = self.objective.hidden_state is not None or self.objective.kl is not None
        if needs_teacher and self.teacher is None:
            raise ValueError("The objective distils but no teacher is configured.")
        if isinstance(self.objective.contrastive, MACLoss) and self.train_dataset is not None and hasattr(self.train_dataset, "__getitem__"):
            if "modality" not in self.train_dataset[0]:
                raise ValueError("loss='mac' needs modality labels, but the training examples have no 'modality' field.")
        if self.args.grad_cache_chunk_size and self.is_deepspeed_enabled:
            raise ValueError("GradCache (grad_cache_chunk_size) runs several backward passes per step, which DeepSpeed does not allow.")
        if isinstance(self.objective, ElasticObjective):
            config = self._embedding_model().config
            depth, hidden = config.text_config.num_hidden_layers, config.text_config.hidden_size
            if self.objective.depths[-1] != depth:
                raise ValueError(f"depths must end at the model's kept depth {depth} (its number of decoder layers), "
                                 f"got {self.objective.depths}: end them at {depth}, or load the model with "
                                 f"num_layers={self.objective.depths[-1]}.")
            too_wide = [dim for dim in self.objective.matryoshka_dims or [] if dim > hidden]
            if too_wide:
                raise ValueError(f"matryoshka_dims {too_wide} exceed the embedding size {hidden}.")

    # ---- loss -------------------------------------------------------------------------------------------------
    def _training_progress(self) -> tuple[float, float]:
        """`(done, total)` in the unit the run's length is set in: optimizer steps when `max_steps > 0` (which a
        streaming dataset requires), else epochs."""
        if self.args.max_steps > 0:
            return float(self.state.global_step), float(self.args.max_steps)
        return float(self.state.epoch or 0.0), float(self.args.num_train_epochs)

    def _update_temperature(self):
        if isinstance(self.objective.contrastive, MACLoss):
            args = self.args
            self.objective.contrastive.tau_hard = tau_hard_schedule(
                *self._training_progress(), args.tau_norm, args.tau_decay, args.tau_plateau, args.tau_round_digits)

    def _teacher_embeddings(self, inputs: dict, chunks: dict | None = None) -> dict[str, torch.Tensor]:
        """The teacher's embedding of each feature group; with `chunks` (GradCache), one chunk at a time, so the
        teacher's activations never exceed one chunk's."""
        if self.teacher is None:
            return {}
        embeddings = {}
        for group in FEATURE_GROUPS:
            if group not in inputs:
                continue
            ids = inputs.get(f"{group}_ids")
            if chunks is None:
                embeddings[group] = self.teacher.embed(inputs[group], ids)
                continue
            size = self.args.grad_cache_chunk_size
            embeddings[group] = torch.cat([
                self.teacher.embed(chunk, None if ids is None else ids[i * size:(i + 1) * size])
                for i, chunk in enumerate(chunks[group])])
        return embeddings

    def _objective(self, embeddings: dict, teacher: dict, inputs: dict, tracked: dict) -> dict[str, torch.Tensor]:
        """The objective's outputs; its logged components are appended to `tracked` (training or evaluation)."""
        self._update_temperature()
        outputs = self.objective(
            embeddings["query"], embeddings["candidate"],
            teacher_query=teacher.get("query"), teacher_positive=teacher.get("candidate"),
            modality=inputs.get("modality"), negatives=embeddings.get("negative"),
            negative_modality=inputs.get("negative_modality"), teacher_negatives=teacher.get("negative"),
        )
        # A non-finite embedding makes the loss non-finite too, so the loss alone is checked (one sync per step).
        if not torch.isfinite(outputs["loss"]):
            parts = {k: float(v.detach()) for k, v in outputs.items() if v.numel() == 1}
            raise FloatingPointError(f"Non-finite loss or embeddings at step {self.state.global_step}: {parts}.")
        self._track(outputs, tracked)
        return outputs

    def _embed(self, model, features: dict) -> torch.Tensor | dict[int, torch.Tensor]:
        """The raw embeddings of `features`; for an `ElasticObjective`, `{depth: raw embeddings}` at each of its
        depths, from the same forward pass."""
        if not isinstance(self.objective, ElasticObjective):
            return model(**features).raw_embeddings
        return model(**features, output_depths=self.objective.depths).depth_embeddings

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        embeddings = {group: self._embed(model, inputs[group]) for group in FEATURE_GROUPS if group in inputs}
        outputs = self._objective(embeddings, self._teacher_embeddings(inputs), inputs, self._tracked)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    # ---- evaluation -------------------------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = prepare_inputs(self, inputs)
        with torch.no_grad():
            embeddings = {group: self._embed(model, inputs[group]) for group in FEATURE_GROUPS if group in inputs}
            # Evaluation batches feed the eval_ metrics only, never the logged training components.
            outputs = self._objective(embeddings, self._teacher_embeddings(inputs), inputs, self._eval_tracked)
        return outputs["loss"].detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The Trainer's loop, plus the mean of each loss component over the evaluation set as
        `{metric_key_prefix}_{component}` (e.g. `eval_contrastive_loss`, `eval_accuracy`)."""
        self._eval_tracked.clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in _means(self._eval_tracked).items()})
        self._eval_tracked.clear()
        return output

    # ---- GradCache --------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.args.grad_cache_chunk_size:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = prepare_inputs(self, inputs)
        size = self.args.grad_cache_chunk_size
        config = self.accelerator.unwrap_model(model).config
        chunks = {group: split_features(inputs[group], size, config.image_token_id, config.video_token_id)
                  for group in FEATURE_GROUPS if group in inputs}
        # 1. Embed every chunk without a graph. Each chunk's RNG state is captured right before its own forward, so
        #    its replay in 3. draws the dropout masks this forward drew. Every group's embeddings are kept as
        #    {depth: tensor} (the key None without elastic depths): with depths, each depth's embedding is cached.
        states, leaves = defaultdict(list), {}
        with torch.no_grad():
            for group, group_chunks in chunks.items():
                embedded = []
                for chunk in group_chunks:
                    states[group].append(RandContext(*chunk.values()))
                    embedded.append(_by_depth(self._embed(model, chunk)))
                leaves[group] = {key: torch.cat([e[key] for e in embedded]).requires_grad_() for key in embedded[0]}
        # 2. The loss on all embeddings; its gradients with respect to them are the cache.
        with self.compute_loss_context_manager():
            teacher = self._teacher_embeddings(inputs, chunks)
            loss = self._objective({group: _from_depth(e) for group, e in leaves.items()}, teacher, inputs,
                                   self._tracked)["loss"]
        loss = loss / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        keys = [(group, key) for group, by_key in leaves.items() for key in by_key]
        grads = torch.autograd.grad(loss, [leaves[group][key] for group, key in keys], allow_unused=True)
        cached = defaultdict(dict)
        for (group, key), grad in zip(keys, grads):  # an unused embedding (a weight of 0 keeps it in the graph) gets 0
            cached[group][key] = (grad if grad is not None else torch.zeros_like(leaves[group][key])).split(size)
        # 3. Re-embed each chunk with a graph and the same dropout, and backpropagate its cached gradient. Under DDP
        #    only the last backward all-reduces (the Trainer keeps earlier accumulation steps in no_sync too).
        replays = [(chunk, state, {key: parts[i] for key, parts in cached[group].items()})
                   for group, group_chunks in chunks.items()
                   for i, (chunk, state) in enumerate(zip(group_chunks, states[group]))]
        for i, (chunk, state, grad) in enumerate(replays):
            sync = contextlib.nullcontext() if i == len(replays) - 1 else self.accelerator.no_sync(model)
            with sync:
                with state, self.compute_loss_context_manager():
                    embedded = _by_depth(self._embed(model, chunk))
                    # never below float32 (bf16 dot products), never below the model's own precision either
                    surrogate = sum(torch.dot(at_least_fp32(embedded[key].flatten()),
                                              at_least_fp32(grad[key].flatten())) for key in grad)
                self.accelerator.backward(surrogate)
        return loss.detach()

    # ---- logging ----------------------------------------------------------------------------------------------
    def _track(self, outputs: dict, tracked: dict):
        for key, value in outputs.items():
            if key != "loss" and value.numel() == 1:
                tracked[key].append(value.detach())  # kept on device: converted once per log, not per step
        if isinstance(self.objective.contrastive, MACLoss):
            tracked["tau_hard"].append(self.objective.contrastive.tau_hard)
            tracked["tau_norm"].append(self.args.tau_norm)

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs and self._tracked:  # a training log: add the mean of each component since the last one
            logs.update(_means(self._tracked))
            self._tracked.clear()
        super().log(logs, start_time)

    # ---- optimizer and saving ---------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = parameter_groups(model, self.args.learning_rate, self.args.weight_decay,
                                      set(self.get_decay_parameter_names(model)), self.args.learning_rate_rules())
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _record_trained_sizes(self) -> None:
        """Writes into the model's config the depths (`trained_depths`, when more than one) and the Matryoshka sizes
        this run trains, so that every save records them; a run that trains neither leaves both fields as loaded."""
        if isinstance(self.objective, ElasticObjective):
            config = self._embedding_model().config
            if len(self.objective.depths) > 1:
                config.trained_depths = list(self.objective.depths)
            if self.objective.matryoshka_dims:
                config.matryoshka_dims = list(self.objective.matryoshka_dims)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Checkpoints during training keep the adapters (for resuming); the final save merges LoRA into the base
        when `merge_lora_on_save`, writing a PUMA checkpoint that `AutoModel(trust_remote_code=True)` loads. The
        merge happens on a copy (`merged_copy`), so the trainer's model keeps its adapters and training can go on.
        The saved config records the depths and Matryoshka sizes trained."""
        self._record_trained_sizes()
        model = self.accelerator.unwrap_model(self.model)
        if _internal_call or not self.args.merge_lora_on_save or not hasattr(model, "merge_and_unload"):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            merged_copy(model).save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))


    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None,
                    revision=None, **kwargs):
        """Pushes the final model as a complete Hub repository (`hub_puma.push_to_hub`: weights, remote code,
        processor, model card, endpoint handler, sentence-transformers files) to `args.hub_model_id`."""
        if not self.is_world_process_zero():
            return None
        from hub_puma import push_to_hub  # the Hub packaging module sits beside this one; imported only when pushing

        self._record_trained_sizes()
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "merge_and_unload"):
            model = merged_copy(model)
        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        return push_to_hub(model, repo_id, token=token or self.args.hub_token, private=self.args.hub_private_repo,
                           revision=revision or getattr(self.args, "hub_revision", None), commit_message=commit_message,
                           **kwargs)


def merged_copy(model: nn.Module) -> nn.Module:
    """The base model of a PEFT `model` with its adapters merged in, built on a copy: peft's `merge_and_unload`
    rewrites the model it is called on (its layers lose their adapters), which would end training. Holds a second
    copy of the weights for as long as the result lives."""
    return copy.deepcopy(model).merge_and_unload()


def _by_depth(embeddings: torch.Tensor | dict) -> dict:
    """Embeddings as `{depth: tensor}`; a single tensor (no elastic depths) under the key `None`."""
    return embeddings if isinstance(embeddings, dict) else {None: embeddings}


def _from_depth(embeddings: dict) -> torch.Tensor | dict:
    """The inverse of `_by_depth`."""
    return embeddings[None] if list(embeddings) == [None] else embeddings


def _means(tracked: dict) -> dict[str, float]:
    return {key: round(float(sum(values)) / len(values), 6) for key, values in tracked.items()}


__all__ = ["CachedTeacher", "PumaTrainer", "PumaTrainingArguments", "ReadableLogCallback", "ReadableProgressCallback",
           "SeparateTeacher", "SetEpochCallback", "SharedWeightTeacher", "format_log", "merged_copy", "parameter_groups",
           "precompute_teacher_cache", "split_features", "teacher_cache_is_fresh", "teacher_fingerprint"]

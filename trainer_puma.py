# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""PUMA training: `PumaTrainer` (a `transformers.Trainer`), its arguments, the distillation teachers and GradCache.

Batches come from `data_puma.PumaCollator`: `{"query": features, "candidate": features, ["negative": features],
"modality": LongTensor[B], ["negative_modality": LongTensor[B*n]], "query_ids", "candidate_ids", ["negative_ids"]}`,
where each `features` is a dict of processor tensors for `PumaForEmbedding.forward`.

Teachers (the full-depth model whose embedding the pruned student distils):
- `SharedWeightTeacher`: one copy of the base weights. The student's kept layers (LoRA adapters disabled) are reused
  in place and only the dropped layers are added, so the teacher costs the dropped layers' memory only.
- `CachedTeacher`: embeddings precomputed once (`precompute_teacher_cache`, by every process of the run) and read
  memory-mapped by sample id, with a fingerprint of the teacher checkpoint, prompt template, pixel limits and data
  files (`teacher_cache_puma`).
- `SeparateTeacher`: an independent full model, as the release does (kept for comparison).
- `UnreducedTeacher` (`teacher="self"`): the student itself, without gradient, embedding every visual token
  (`visual_pool=1`): self-distillation of a model trained to reduce visual tokens (`visual_pools`).
Every teacher embeds at `visual_pool=1`: the reduction is the student's, the target is the unreduced embedding.
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
from modeling_puma import PumaForEmbedding, copy_save_conversions, prepare_inputs, reuses_visual_outputs
from teacher_cache_puma import CachedTeacher, precompute_teacher_cache, teacher_cache_is_fresh, teacher_fingerprint


logger = logging.get_logger(__name__)

FEATURE_GROUPS = ("query", "candidate", "negative")
TEACHER_MODES = ("none", "shared", "cached", "separate", "self")
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
    teacher: str = field(default="none", metadata={"help": "Teacher: 'none', 'shared' (LoRA base reused), 'cached', 'separate', 'self' (the student itself without visual-token reduction)."})
    teacher_model: str | None = field(default=None, metadata={"help": "Full-depth base checkpoint of the teacher ('shared', 'separate')."})
    teacher_cache: str | None = field(default=None, metadata={"help": "Folder of precomputed teacher embeddings ('cached')."})
    gather_across_devices: bool = field(default=True, metadata={"help": "All-gather embeddings so negatives span the global batch."})
    local_loss: bool = field(default=False, metadata={"help": "With gather_across_devices, score only this rank's queries against the global candidates: (B/W) x B logits instead of B x B, same gradient."})
    gather_with_grad: bool = field(default=True, metadata={"help": "Gather embeddings with gradient (each rank's gradient is the global batch's). False: the release's plain all-gather, whose applied gradient is 1/world_size of it."})
    grad_cache_chunk_size: int | None = field(default=None, metadata={"help": "GradCache: embed in chunks of this many inputs (None: off)."})
    grad_cache_reuse_visual: bool = field(default=True, metadata={"help": "GradCache: keep the frozen vision tower's outputs of the first pass (the batch's image features) for the second, instead of running the tower twice. Off: less memory, one more vision forward. Ignored when the tower trains."})
    module_learning_rates: dict | str | None = field(default=None, metadata={"help": "Per-module learning rates: a mapping of regular expression to rate (a JSON object on the command line), e.g. {\"language_model\\\\.layers\\\\.0\\\\.\": 1e-4}. The first pattern found (re.search) in a trainable parameter's name sets its rate; the others use learning_rate. A pattern that matches no trainable parameter is an error."})
    embedding_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the input-embedding parameters (the embedding token's row): shorthand for a first module_learning_rates rule 'embed_tokens'."})
    merge_lora_on_save: bool = field(default=True, metadata={"help": "Merge LoRA into the base on the final save_model()."})
    depths: list[int] | None = field(default=None, metadata={"help": "Elastic depth: also train the embedding of the model truncated after each of these numbers of first layers, all from the same forward pass; increasing, ending at the model's kept depth (e.g. 4 8 12). The saved config records them (trained_depths)."})
    visual_pools: list[int] | None = field(default=None, metadata={"help": "Elastic visual-token reduction: each optimizer step's student forwards pool visual tokens by the next of these factors in turn (e.g. 1 2 4; see PumaConfig.visual_pool). The saved config records them (trained_visual_pools)."})
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
            raise ValueError("Distillation (distill_weight > 0 or kl_weight > 0) needs a teacher: set teacher=shared|cached|separate|self.")
        if self.distill == "none" and self.distill_weight > 0:
            raise ValueError(f"distill_weight={self.distill_weight} needs distill='mse' or 'cosine'.")
        if self.teacher == "cached" and not self.teacher_cache:
            raise ValueError("teacher='cached' needs teacher_cache (a folder written by precompute_teacher_cache).")
        for factor in self.visual_pools or []:
            if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
                raise ValueError(f"visual_pools entries must be positive integers (1: no reduction), got {factor!r}.")
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
        self.forward_kwargs = {}  # keywords of every forward (the trainer sets them, e.g. for sharded runs)

    @torch.no_grad()
    def embed(self, features: dict, ids: list[str]) -> torch.Tensor:
        with gathered(self.model.parameters()):
            return self.model(**features, **self.forward_kwargs, visual_pool=1).raw_embeddings


class UnreducedTeacher:
    """The student itself, without gradient, embedding every visual token (`visual_pool=1`): the target of a student
    trained to pool visual tokens (`visual_pools`) is its own unreduced embedding, at no extra memory. With a LoRA
    student it includes the adapters (the model as it is being trained, unlike `SharedWeightTeacher`)."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def embed(self, features: dict, ids: list[str]) -> torch.Tensor:
        return self.model(**features, visual_pool=1).raw_embeddings


class SharedWeightTeacher:
    """The full-depth teacher built from the LoRA student's own modules plus the layers pruning dropped.

    The vision tower, token embeddings, final norm and kept layers are the student's modules; the teacher runs them
    with the LoRA adapters disabled, so it sees the frozen base weights, and adds only the dropped layers.
    """

    def __init__(self, peft_model, teacher_model: PumaForEmbedding):
        self.peft_model, self.model = peft_model, teacher_model
        self.forward_kwargs = {}  # keywords of every forward (the trainer sets them, e.g. for sharded runs)

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
        # Under FSDP2 the student's own weights (token embeddings, final norm, what is not a layer of its own) are
        # gathered by its forward only: the teacher, which runs those modules itself, gathers them around its call.
        student = {id(parameter) for parameter in self.peft_model.parameters()}
        own = [parameter for parameter in self.model.parameters() if id(parameter) not in student]  # dropped layers
        with self.peft_model.disable_adapter(), unsharded(self.peft_model), gathered(own):
            return self.model(**features, **self.forward_kwargs, visual_pool=1).raw_embeddings


@contextlib.contextmanager
def without_zero3(plugin=None):
    """Within: transformers and peft build models as without DeepSpeed ZeRO-3, whole on each process, for a model one
    process builds alone (the final save's copy and the pushed model on the main process) or one each process runs
    by itself outside DeepSpeed's engine (the teacher filling the cache). While the ZeRO-3 config is registered,
    transformers builds every model inside `deepspeed.zero.Init`, partitioned, and peft sets up a trained token row
    by gathering it, both collectives every process must enter. `plugin`: the run's accelerate `DeepSpeedPlugin`,
    which registers the config again on leaving; by default that of accelerate's state (TrainingArguments taking a
    state configured before them hold none)."""
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if not is_deepspeed_zero3_enabled():
        yield
        return
    if plugin is None:
        from accelerate.state import AcceleratorState, is_initialized

        plugin = AcceleratorState().deepspeed_plugin if is_initialized() else None
    if plugin is None:
        raise ValueError("A DeepSpeed ZeRO-3 config is registered, but neither the TrainingArguments nor accelerate's "
                         "state hold the DeepSpeed plugin that registers it again.")
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # registers the run's config again


@contextlib.contextmanager
def gathered(parameters):
    """Within: the whole `parameters` on every process where DeepSpeed ZeRO-3 partitioned them at load (transformers
    partitions every model it loads while a ZeRO-3 config is active, and a frozen teacher has no engine to gather
    them around its forward). A collective every process enters; nothing for parameters ZeRO-3 does not hold."""
    partitioned = [parameter for parameter in parameters if hasattr(parameter, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


@contextlib.contextmanager
def unsharded(module: nn.Module):
    """Within: the weights FSDP2 holds at `module` itself (not those of its sharded submodules, which their own
    calls gather) are gathered; nothing for a module FSDP2 does not shard."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


# --------------------------------------------------------------------------------------------------------------------
# GradCache helpers
# --------------------------------------------------------------------------------------------------------------------
class RandContext:
    """Captures the CPU and device RNG states at construction and restores them on entry, so a re-run forward
    draws the same dropout masks (GradCache, arXiv 2101.06983)."""

    def __init__(self, *tensors: torch.Tensor):
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)

    def restore(self) -> None:
        """Sets the captured states (inside a `fork_rng` of `self.devices`, which puts the caller's back)."""
        torch.set_rng_state(self.cpu_state)
        set_device_states(self.devices, self.device_states)

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        self.restore()

    def __exit__(self, *exc):
        self._fork.__exit__(*exc)


@contextlib.contextmanager
def rand_context_at(module: nn.Module, state: RandContext | None = None):
    """Within this context, the next forward of `module` (a submodule) starts with the RNG states of `state`, or,
    without `state`, records them: yields a list that then holds the captured `RandContext`.

    GradCache replays a chunk without re-running its frozen vision tower: the dropout masks of the language model
    must be those its first forward drew after the tower, so the states are taken and put back at its entry.
    """
    captured = []

    def hook(_module, args, kwargs):
        if state is not None:
            state.restore()
        elif not captured:
            captured.append(RandContext(*[value for value in (*args, *kwargs.values())
                                          if isinstance(value, torch.Tensor)]))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        if state is None:
            yield captured
        else:
            with torch.random.fork_rng(devices=state.devices, enabled=True):
                yield captured
    finally:
        handle.remove()


def split_features(features: dict, chunk_size: int, image_token_id: int, video_token_id: int | None = None, *,
                   order: list[int] | None = None) -> list[dict]:
    """Splits a batch of processor features into chunks of `chunk_size` rows, taken in `order` (a permutation of the
    rows; default: as they are), each with its rows' images and videos and its own right padding trimmed.

    Patches are flattened across images in `pixel_values` (and videos in `pixel_values_videos`); a row's images
    (videos) are the next ones in order whose placeholder tokens add up to the row's count of image (video) tokens
    (a Qwen3-VL video's tokens come in one run per frame pair, so runs do not count videos).
    """
    ids = features["input_ids"]
    order = list(range(ids.shape[0])) if order is None else list(order)
    visuals = [(kind, _row_visuals(features, token_id, grid_key))
               for kind, token_id, grid_key in (("image", image_token_id, "image_grid_thw"),
                                                ("video", video_token_id, "video_grid_thw"))
               if token_id is not None and features.get(grid_key) is not None]
    lengths = features["attention_mask"].sum(dim=1)
    chunks = []
    for start in range(0, len(order), chunk_size):
        rows = order[start:start + chunk_size]
        index = torch.tensor(rows, device=ids.device)
        width = int(lengths[index].max())
        chunk = {key: value.index_select(0, index)[:, :width] for key, value in features.items()
                 if key in ("input_ids", "attention_mask", "mm_token_type_ids")}
        for kind, (spans, offsets) in visuals:
            items = [item for row in rows for item in range(*spans[row])]
            if not items:
                continue
            grid_key, values_key = ("image_grid_thw", "pixel_values") if kind == "image" else \
                ("video_grid_thw", "pixel_values_videos")
            chunk[grid_key] = features[grid_key][items]
            chunk[values_key] = torch.cat([features[values_key][offsets[i]:offsets[i + 1]] for i in items])
            seconds = features.get("second_per_grid_ts") if kind == "video" else None
            if seconds is not None:
                chunk["second_per_grid_ts"] = (seconds[items] if torch.is_tensor(seconds)
                                               else [seconds[i] for i in items])
        chunks.append(chunk)
    return chunks


def length_order(features: dict) -> list[int]:
    """The rows of a feature batch from the shortest to the longest (ties in their order): GradCache chunks of rows of
    similar length carry less padding than the batch, whose rows are all padded to its longest."""
    lengths = features["attention_mask"].sum(dim=1).tolist()
    return sorted(range(len(lengths)), key=lambda row: lengths[row])


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
        if hasattr(self.teacher, "forward_kwargs"):
            self.teacher.forward_kwargs = self._forward_kwargs()
        self._tracked, self._eval_tracked = defaultdict(list), defaultdict(list)  # logged components
        self._check_startup()

    def _is_sharded(self) -> bool:
        """Whether several processes hold shards of the model (FSDP, DeepSpeed ZeRO)."""
        return (self.is_fsdp_enabled or self.is_deepspeed_enabled) and self.accelerator.num_processes > 1

    def _forward_kwargs(self) -> dict:
        """Keywords of every student and teacher forward: with the model sharded, each process runs the vision tower
        in every forward (on a placeholder image when its inputs hold none), since the sharded tower gathers its
        weights in a collective every process must join (`PumaForEmbedding.forward(run_vision_tower=True)`)."""
        return {"run_vision_tower": True} if self._is_sharded() else {}

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
        if args.teacher == "self":
            return UnreducedTeacher(self.model)
        if args.teacher == "separate":
            student = self._embedding_model()
            # Loaded with its own processor, so its embedding-token row is initialised as the student's was.
            return SeparateTeacher(PumaForEmbedding.from_pretrained(args.teacher_model, dtype=student.dtype,
                                                                    device_map=student.device))
        return None

    def _check_startup(self):
        """Inconsistent settings fail here, before the first step, not mid-run."""
        if self.args.visual_pools and set(self.args.visual_pools) != {1} and (
                self.args.grad_cache_chunk_size or self._forward_kwargs().get("run_vision_tower")):
            raise ValueError("visual_pools does not combine with GradCache (grad_cache_chunk_size) or sharded training "
                             "(FSDP, ZeRO-3) yet: both reuse or force the vision tower's unreduced outputs.")
        needs_teacher = self.objective.hidden_state is not None or self.objective.kl is not None
        if needs_teacher and self.teacher is None:
            raise ValueError("The objective distils but no teacher is configured.")
        if isinstance(self.objective.contrastive, MACLoss) and self.train_dataset is not None and hasattr(self.train_dataset, "__getitem__"):
            if "modality" not in self.train_dataset[0]:
                raise ValueError("loss='mac' needs modality labels, but the training examples have no 'modality' field.")
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

    def _teacher_embeddings(self, inputs: dict, chunks: list | None = None) -> dict[str, torch.Tensor]:
        """The teacher's embedding of each feature group; with `chunks` (GradCache's `(group, rows, features)`), one
        chunk at a time, so the teacher's activations never exceed one chunk's, put back in the batch's row order."""
        if self.teacher is None:
            return {}
        if chunks is None:
            return {group: self.teacher.embed(inputs[group], inputs.get(f"{group}_ids"))
                    for group in FEATURE_GROUPS if group in inputs}
        pieces = defaultdict(list)
        for group, rows, features in chunks:
            ids = inputs.get(f"{group}_ids")
            pieces[group].append((rows, self.teacher.embed(features, None if ids is None else [ids[r] for r in rows])))
        return {group: _in_row_order(parts) for group, parts in pieces.items()}

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

    def _embed(self, model, features: dict, visual_outputs: dict | None = None, output_visual_outputs: bool = False):
        """The raw embeddings of `features`; for an `ElasticObjective`, `{depth: raw embeddings}` at each of its
        depths, from the same forward pass. With `output_visual_outputs`, `(embeddings, the vision tower's outputs)`;
        `visual_outputs` (of an earlier forward of the same features) skips the tower. With `visual_pools`, the
        step's visual-token reduction factor applies."""
        kwargs = dict(self._forward_kwargs())
        if self.args.visual_pools:
            kwargs["visual_pool"] = self._visual_pool()
        if visual_outputs is not None:  # empty: the inputs hold no image, and the tower must not run again
            kwargs["visual_outputs"] = visual_outputs
        if output_visual_outputs:
            kwargs["output_visual_outputs"] = True
        if isinstance(self.objective, ElasticObjective):
            kwargs["output_depths"] = self.objective.depths
        outputs = model(**features, **kwargs)
        embeddings = outputs.depth_embeddings if isinstance(self.objective, ElasticObjective) else outputs.raw_embeddings
        return (embeddings, outputs.visual_outputs) if output_visual_outputs else embeddings

    def _visual_pool(self) -> int:
        """The visual-token reduction factor of this optimizer step: `visual_pools` in turn, so every factor gets
        the same share of steps (and GradCache's replay of a step uses the factor of its first pass)."""
        return self.args.visual_pools[self.state.global_step % len(self.args.visual_pools)]

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
    def _trains_visual(self) -> bool:
        return any(parameter.requires_grad for parameter in self._embedding_model().model.visual.parameters())

    def _grad_cache_chunks(self, inputs: dict) -> list[tuple[str, list[int], dict]]:
        """`(group, rows, features)` of every GradCache chunk: each group's rows from the shortest to the longest
        (`length_order`), `grad_cache_chunk_size` at a time."""
        size, config = self.args.grad_cache_chunk_size, self._embedding_model().config
        chunks = []
        for group in FEATURE_GROUPS:
            if group in inputs:
                order = length_order(inputs[group])
                parts = split_features(inputs[group], size, config.image_token_id,
                                       getattr(config, "video_token_id", None), order=order)
                chunks += [(group, order[i * size:(i + 1) * size], part) for i, part in enumerate(parts)]
        return chunks

    def _chunk_backward(self, model, surrogate: torch.Tensor, last: bool) -> None:
        """Backpropagates one GradCache chunk's surrogate. accelerate's backward steps a DeepSpeed engine at the end of
        an optimizer step, so every chunk but the step's last goes through the engine alone, marked as inside the
        accumulation (ZeRO reduces each backward's gradients into its partitions; only the boundary steps)."""
        if not self.is_deepspeed_enabled:
            self.accelerator.backward(surrogate)
        elif last:
            self.accelerator.backward(surrogate, scale_wrt_gas=False)  # the loss is already divided, as the Trainer does
        else:
            engine = self.accelerator.deepspeed_engine_wrapped.engine
            engine.set_gradient_accumulation_boundary(is_boundary=False)
            engine.backward(surrogate, scale_wrt_gas=False)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.args.grad_cache_chunk_size:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = prepare_inputs(self, inputs)
        chunks = self._grad_cache_chunks(inputs)
        # The frozen vision tower's outputs are the same in both passes: kept from the first for the second.
        reuse_visual = (self.args.grad_cache_reuse_visual and not self._trains_visual()
                        and reuses_visual_outputs(self._embedding_model()))
        # The last chunk embedded keeps its graph from the first pass (it is the one re-embedded first otherwise):
        # one chunk's activations, what every replay holds anyway. Alone, it is the step's only (synced) backward.
        keep_last = len(chunks) > 1
        # 1. Embed every chunk, each group from its shortest rows to its longest; all but the kept chunk without a
        #    graph. Each chunk's RNG state is captured right before its own forward, so its replay in 3. draws the
        #    dropout masks this forward drew. Embeddings are kept as {depth: tensor} (the key None without elastic
        #    depths): with depths, each depth's embedding is cached.
        language_model = self._embedding_model().model.language_model
        states, visual, pieces, kept = [], [], defaultdict(list), None
        for i, (group, rows, features) in enumerate(chunks):
            keep = keep_last and i == len(chunks) - 1
            reuse = reuse_visual and not keep
            # a replay that skips the vision tower restores the RNG where the language model starts
            capture = (rand_context_at(language_model) if reuse
                       else contextlib.nullcontext([RandContext(*features.values())]))
            sync = self.accelerator.no_sync(model) if keep else contextlib.nullcontext()
            with sync, capture as state, torch.set_grad_enabled(keep), self.compute_loss_context_manager():
                result = self._embed(model, features, output_visual_outputs=reuse)
            embedded, outputs = result if reuse else (result, None)
            states.append(state[0])
            visual.append(outputs)
            embedded = _by_depth(embedded)
            if keep:
                kept = embedded
            else:
                embedded = {key: value.requires_grad_() for key, value in embedded.items()}
            pieces[group].append((rows, embedded))
        # 2. The loss on all embeddings, in the batch's row order; its gradients with respect to them are the cache.
        with self.compute_loss_context_manager():
            teacher = self._teacher_embeddings(inputs, chunks)
            embeddings = {group: _from_depth({key: _in_row_order([(rows, e[key]) for rows, e in parts])
                                              for key in parts[0][1]})
                          for group, parts in pieces.items()}
            loss = self._objective(embeddings, teacher, inputs, self._tracked)["loss"]
        loss = loss / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        cached = [embedded for parts in pieces.values() for _, embedded in parts]  # in the order of `chunks`
        flat = iter(torch.autograd.grad(loss, [value for embedded in cached for value in embedded.values()],
                                        allow_unused=True))
        # an unused embedding (a weight of 0 keeps it in the graph) gets 0
        grads = [{key: _or_zeros(next(flat), value) for key, value in embedded.items()} for embedded in cached]
        # 3. Backpropagate each chunk's cached gradient: the kept chunk first, through the graph it holds, then every
        #    other chunk re-embedded with a graph, the same dropout and the first pass's vision outputs. Under DDP and
        #    FSDP only the step's last backward synchronises (the Trainer keeps earlier accumulation steps in no_sync).
        replays = list(range(len(chunks)))
        if keep_last:
            replays = [replays[-1]] + replays[:-1]
        for position, i in enumerate(replays):
            last = position == len(replays) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                if keep_last and i == len(chunks) - 1:
                    embedded = kept
                else:
                    rand = rand_context_at(language_model, states[i]) if visual[i] is not None else states[i]
                    with rand, self.compute_loss_context_manager():
                        embedded = _by_depth(self._embed(model, chunks[i][2], visual_outputs=visual[i]))
                # never below float32 (bf16 dot products), never below the model's own precision either
                surrogate = sum(torch.dot(at_least_fp32(embedded[key].flatten()), at_least_fp32(grad.flatten()))
                                for key, grad in grads[i].items())
                self._chunk_backward(model, surrogate, last)
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
        if self.args.visual_pools and len(self.args.visual_pools) > 1:
            self._embedding_model().config.trained_visual_pools = sorted(set(self.args.visual_pools))
        if isinstance(self.objective, ElasticObjective):
            config = self._embedding_model().config
            if len(self.objective.depths) > 1:
                config.trained_depths = list(self.objective.depths)
            if self.objective.matryoshka_dims:
                config.matryoshka_dims = list(self.objective.matryoshka_dims)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Checkpoints during training keep the adapters (for resuming; sharded runs write sharded checkpoints); the
        final save merges LoRA into the base when `merge_lora_on_save`, writing a PUMA checkpoint that
        `AutoModel(trust_remote_code=True)` loads. The merge happens on a copy (`merged_copy`), so the trainer's model
        keeps its adapters and training can go on. A sharded run (FSDP, DeepSpeed ZeRO-3) gathers the full weights
        on the main process for the final save, which every process must call. The saved config records the depths
        and Matryoshka sizes trained."""
        self._record_trained_sizes()
        model = self.accelerator.unwrap_model(self.model)
        merge = self.args.merge_lora_on_save and hasattr(model, "merge_and_unload")
        if _internal_call or not (merge or self._is_sharded()):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self._is_sharded():
            # a collective: every process hands over its shards, the main process receives the full weights
            state_dict = self.accelerator.get_state_dict(self.model_wrapped if self.is_deepspeed_enabled
                                                         else self.model)
            if self.args.should_save:
                with without_zero3(self.accelerator.state.deepspeed_plugin):
                    final = unsharded_copy(model, state_dict)
                    (final.merge_and_unload() if merge else final).save_pretrained(output_dir)
        elif self.args.should_save:
            merged_copy(model).save_pretrained(output_dir)
        if self.args.should_save:
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        self._final_save = output_dir

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None,
                    revision=None, **kwargs):
        """Pushes the final model as a complete Hub repository (`hub_puma.push_to_hub`: weights, remote code,
        processor, model card, endpoint handler, sentence-transformers files) to `args.hub_model_id`."""
        if not self.is_world_process_zero():
            return None
        from hub_puma import push_to_hub  # the Hub packaging module sits beside this one; imported only when pushing

        self._record_trained_sizes()
        model = self.accelerator.unwrap_model(self.model)
        if self._is_sharded():  # the main process holds a shard only: push the final save, which gathered them
            final = getattr(self, "_final_save", None)
            if final is None:
                raise ValueError("A sharded run pushes its final save: call trainer.save_model() on every process "
                                 "first (train.py does).")
            with without_zero3(self.accelerator.state.deepspeed_plugin):  # loaded whole, by this process alone
                model = PumaForEmbedding.from_pretrained(final)
        elif hasattr(model, "merge_and_unload"):
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


def unsharded_copy(model: nn.Module, state_dict: dict) -> nn.Module:
    """A copy of `model` (a `PumaForEmbedding`, or a PEFT model of one, whose weights are sharded over processes)
    holding `state_dict`, its full weights gathered on this process: built on the meta device from the model's
    configuration (and adapter configuration), then given the tensors, so no second copy is initialised. It saves
    like the model (same names and checkpoint format) and merges its adapters like it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.device("meta"):
        copy_model = type(base)(base.config)
    copy_base = copy_model
    if base is not model:
        from peft import get_peft_model

        adapter = model.active_adapter
        with torch.device("meta"):
            copy_model = get_peft_model(copy_base, model.peft_config[adapter], adapter_name=adapter)
    copy_model.load_state_dict(state_dict, strict=True, assign=True)
    copy_base.processor, copy_base.name_or_path = base.processor, base.name_or_path
    copy_save_conversions(base, copy_base)
    return copy_model.eval()


def _by_depth(embeddings: torch.Tensor | dict) -> dict:
    """Embeddings as `{depth: tensor}`; a single tensor (no elastic depths) under the key `None`."""
    return embeddings if isinstance(embeddings, dict) else {None: embeddings}


def _from_depth(embeddings: dict) -> torch.Tensor | dict:
    """The inverse of `_by_depth`."""
    return embeddings[None] if list(embeddings) == [None] else embeddings


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return grad if grad is not None else torch.zeros_like(like)


def _in_row_order(parts: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """The rows of `(rows, tensor)` chunks put back in the batch's order (differentiable)."""
    rows = [row for chunk_rows, _ in parts for row in chunk_rows]
    stacked = torch.cat([tensor for _, tensor in parts])
    inverse = torch.empty(len(rows), dtype=torch.long)
    inverse[torch.tensor(rows)] = torch.arange(len(rows))
    return stacked.index_select(0, inverse.to(stacked.device))


def _means(tracked: dict) -> dict[str, float]:
    return {key: round(float(sum(values)) / len(values), 6) for key, values in tracked.items()}


__all__ = ["CachedTeacher", "PumaTrainer", "PumaTrainingArguments", "ReadableLogCallback", "ReadableProgressCallback",
           "SeparateTeacher", "SetEpochCallback", "SharedWeightTeacher", "UnreducedTeacher", "format_log", "merged_copy", "parameter_groups",
           "gathered", "unsharded", "unsharded_copy", "without_zero3",
           "precompute_teacher_cache", "length_order", "split_features", "teacher_cache_is_fresh", "teacher_fingerprint"]

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Memory plan of a training run, from the checkpoint's `config.json` alone (`python train.py --config X --plan`).

Per process: the student's parameters, gradients and optimizer state under each sharding (DDP; ZeRO-2: gradients
and optimizer state sharded; ZeRO-3 / FSDP: parameters too, plus the layers gathered for the running forward), its
activations for the configured batch (all rows, or one GradCache chunk; every layer's saved tensors, or each
layer's input with gradient checkpointing), the teacher's weights by mode, and the largest per-device batch that
fits a memory size. Nothing here imports torch or transformers: the plan prints in a second, before any weight loads.

The counts are exact for the supported families (the parameters of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE
as transformers builds them; tests/test_memory_plan.py checks them against the models); the activation bytes model
the tensors autograd saves in a decoder layer (checked against the saved tensors and the peak memory of measured
steps). What the plan leaves out: the framework's own memory (CUDA context, NCCL buffers, allocator fragmentation:
keep 10-20% of the device free) and the dataloader's host memory.
"""

import json
import math
import os
import re
from dataclasses import dataclass, field


GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
SHARDINGS = ("ddp", "zero2", "zero3")  # zero3: DeepSpeed ZeRO-3 and FSDP (full sharding) alike
SHARDING_NAMES = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3 / FSDP"}
# Template tokens of a row beside its text and visual tokens (system prompt, instruction, role markers; measured on
# the recipes' prompts: 20-60).
TEMPLATE_TOKENS = 64
# Tensors autograd keeps per token of a decoder layer, counted in widths (h: hidden size, q: the attention's query
# width, i: the MLP's width, r: a LoRA rank per adapted linear): the two RMSNorms' inputs and outputs and the residual
# sum (5 h), the rotated query, key and value attention saves, keys and values as wide as the query (attention
# repeats them over grouped heads; 3 q) and Qwen3's query/key norms' inputs (2 q), the SwiGLU's gate, up, activation
# and product (4 i), each adapter's down-projection (7 r). Once per forward: the padding mask (rows x tokens^2) and
# the rotary tables. Checked against the tensors autograd saves in tests/test_memory_plan.py.
SAVED_WIDTHS = {"h": 5, "q": 3, "qk_norm": 2, "i": 4, "r": 7}


@dataclass
class ModelShape:
    """The shape of a Qwen-VL checkpoint as its `config.json` gives it (the family's defaults where it is silent)."""

    family: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    depth: int  # decoder layers in the checkpoint
    kept_layers: list[int] | None = None  # original numbering of the checkpoint's layers (a pruned PUMA checkpoint)
    base_depth: int | None = None  # decoder layers of the base the checkpoint was pruned from
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    vision: dict = field(default_factory=dict)

    @property
    def qkv_bias(self) -> bool:
        return self.family in ("qwen2_vl", "qwen2_5_vl")

    @property
    def qk_norm(self) -> bool:
        return self.family.startswith("qwen3_vl")

    def is_sparse(self, layer: int) -> bool:
        """Whether base layer `layer` (original numbering) is a mixture-of-experts layer."""
        return (self.experts > 0 and layer not in self.mlp_only_layers and (layer + 1) % self.sparse_step == 0)

    def layer_parameters(self, layer: int) -> int:
        """Parameters of decoder layer `layer` (original numbering)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        attention += 2 * self.head_dim if self.qk_norm else 0
        if self.is_sparse(layer):
            mlp = self.experts * h + 3 * self.experts * h * self.moe_intermediate
        else:
            mlp = 3 * h * self.intermediate
        return attention + mlp + 2 * h

    def lora_parameters(self, layer: int, rank: int) -> int:
        """LoRA parameters of rank `rank` on every linear of decoder layer `layer` (the default targets: q, k, v, o
        and a dense MLP's gate, up and down; a sparse layer's fused experts are not linears)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        widths = [(h, q), (h, kv), (h, kv), (q, h)]
        if not self.is_sparse(layer):
            widths += [(h, self.intermediate)] * 2 + [(self.intermediate, h)]
        return rank * sum(a + b for a, b in widths)

    def vision_parameters(self) -> int:
        """Parameters of the vision tower (patch embedding, blocks, merger and DeepStack mergers)."""
        v = self.vision
        d, merged = v["width"], v["width"] * v["merge"] ** 2
        patch = v["in_channels"] * v["temporal_patch"] * v["patch"] ** 2 * d
        attention = 3 * d * d + 3 * d + d * d + d
        if self.family == "qwen2_vl":
            m = d * v["mlp_ratio"]
            block = 4 * d + attention + 2 * d * m + m + d
            merger = 2 * d + merged * merged + merged + merged * v["out"] + v["out"]
            return patch + v["depth"] * block + merger
        if self.family == "qwen2_5_vl":
            i = v["intermediate"]
            block = 2 * d + attention + 3 * d * i + 2 * i + d
            merger = d + merged * merged + merged + merged * v["out"] + v["out"]
            return patch + v["depth"] * block + merger
        i = v["intermediate"]  # Qwen3-VL: biased patch embedding, learned positions, DeepStack mergers
        block = 4 * d + attention + 2 * d * i + i + d
        mlp = merged * merged + merged + merged * v["out"] + v["out"]
        merger = 2 * d + mlp
        deepstack = len(v["deepstack"]) * (2 * merged + mlp)
        return patch + d + v["positions"] * d + v["depth"] * block + merger + deepstack

    def visual_tokens(self, pixels: int) -> int:
        """Tokens the language model receives for an image of `pixels` pixels (one per merged patch group)."""
        side = self.vision["patch"] * self.vision["merge"]
        return max(1, pixels // (side * side))


def read_config(path: str) -> dict:
    """`config.json` of a checkpoint folder (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} does not exist: the plan reads the checkpoint's config.json")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def model_shape(config: dict) -> ModelShape:
    """The `ModelShape` of a Qwen-VL or PUMA `config.json` (a dict): Hub layouts with a flat text configuration
    (Qwen2-VL) or a `text_config`."""
    family = config.get("base_model_type") or config.get("model_type")
    if family not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        raise ValueError(f"model_type {family!r} is not a supported Qwen-VL family (qwen2_vl, qwen2_5_vl, qwen3_vl, "
                         "qwen3_vl_moe)")
    text = config.get("text_config") or config
    heads = text["num_attention_heads"]
    vision = config.get("vision_config", {})
    qwen3 = family.startswith("qwen3_vl")
    width = vision.get("embed_dim", 1280) if family == "qwen2_vl" else vision.get("hidden_size", 1152)
    shape = ModelShape(
        family=family, hidden=text["hidden_size"], intermediate=text["intermediate_size"], heads=heads,
        kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or text["hidden_size"] // heads, vocab=text.get("vocab_size", 151936),
        depth=text["num_hidden_layers"], kept_layers=config.get("kept_layers"),
        base_depth=config.get("base_num_hidden_layers"), experts=text.get("num_experts", 0) or 0,
        experts_per_token=text.get("num_experts_per_tok", 0) or 0,
        moe_intermediate=text.get("moe_intermediate_size", 0) or 0, sparse_step=text.get("decoder_sparse_step", 1),
        mlp_only_layers=list(text.get("mlp_only_layers") or []),
        vision=dict(width=width, depth=vision.get("depth", 32), merge=vision.get("spatial_merge_size", 2),
                    patch=vision.get("patch_size", 16 if qwen3 else 14),
                    temporal_patch=vision.get("temporal_patch_size", 2),
                    in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
                    mlp_ratio=vision.get("mlp_ratio", 4), intermediate=vision.get("intermediate_size", 0),
                    out=(vision.get("hidden_size", text["hidden_size"]) if family == "qwen2_vl"
                         else vision.get("out_hidden_size", text["hidden_size"])),
                    positions=vision.get("num_position_embeddings", 2304),
                    deepstack=list(vision.get("deepstack_visual_indexes", [8, 16, 24]) if qwen3 else [])))
    return shape


@dataclass
class TrainingShape:
    """What of a training config the plan depends on (`plan_settings` reads it from the config and command line)."""

    num_layers: int | None = None  # pruning: the first k layers (None: the checkpoint's)
    kept_layers: list[int] | None = None
    dtype: str = "bfloat16"  # weights' dtype
    lora_rank: int | None = 128  # None: full fine-tuning
    lora_dropout: float = 0.0
    batch: int = 1  # per-device batch (queries)
    hard_negatives: int = 0
    max_text_tokens: int = 450
    max_pixels: int = 235200
    gradient_checkpointing: bool = False
    grad_cache: int | None = None  # chunk size
    teacher: str = "none"
    teacher_depth: int | None = None
    optimizer: str = "adamw_torch"

    @property
    def rows(self) -> int:
        """Rows embedded per step and device: each query, its positive and its hard negatives."""
        return self.batch * (2 + self.hard_negatives)


@dataclass
class MemoryPlan:
    """Bytes per process of one sharding; `total` sums them."""

    sharding: str
    processes: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    teacher: int
    loss: int
    details: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.teacher + self.loss


def student_layers(shape: ModelShape, training: TrainingShape) -> list[int]:
    """The student's decoder layers in the base's numbering."""
    base = shape.kept_layers or list(range(shape.depth))
    if training.kept_layers:
        return list(training.kept_layers)
    return base[:training.num_layers] if training.num_layers else base


def tokens_per_row(shape: ModelShape, training: TrainingShape) -> int:
    """The longest row the collator builds: the text truncated to `max_text_tokens`, an image at `max_pixels` and
    the template (the plan budgets every row at this length: a batch's rows are padded to its longest)."""
    return training.max_text_tokens + shape.visual_tokens(training.max_pixels) + TEMPLATE_TOKENS


def layer_activation_bytes(shape: ModelShape, training: TrainingShape, layer: int, tokens: int) -> int:
    """Bytes autograd saves in one decoder layer for `tokens` tokens (`SAVED_WIDTHS`; LoRA dropout adds each
    adapted linear's dropped input and its mask)."""
    size = DTYPE_BYTES[training.dtype]
    q = shape.heads * shape.head_dim
    mlp = (shape.experts_per_token * shape.moe_intermediate if shape.is_sparse(layer) else shape.intermediate)
    widths = SAVED_WIDTHS["h"] * shape.hidden + SAVED_WIDTHS["q"] * q + SAVED_WIDTHS["i"] * mlp
    widths += SAVED_WIDTHS["qk_norm"] * q if shape.qk_norm else 0
    per_token = size * widths
    if training.lora_rank:
        per_token += 4 * SAVED_WIDTHS["r"] * training.lora_rank  # the adapters compute in float32
        if training.lora_dropout > 0:  # q, k, v, o, gate, up: h wide; down: i wide
            per_token += (size + 1) * (6 * shape.hidden + (0 if shape.is_sparse(layer) else shape.intermediate))
    return tokens * per_token


def forward_activation_bytes(shape: ModelShape, training: TrainingShape, rows: int, tokens: int) -> int:
    """Bytes saved once per forward of `rows` rows of `tokens` tokens: the padding mask and the rotary tables."""
    return DTYPE_BYTES[training.dtype] * rows * tokens * (tokens + 2 * shape.head_dim)


def vision_activation_bytes(shape: ModelShape, training: TrainingShape, images: int) -> int:
    """Bytes the vision tower keeps for `images` images at `max_pixels`: its blocks' saved tensors when it is
    trained (full fine-tuning), else the working set of one block (a frozen tower saves nothing)."""
    v, size = shape.vision, DTYPE_BYTES[training.dtype]
    patches = images * shape.visual_tokens(training.max_pixels) * v["merge"] ** 2
    mlp = v["width"] * v["mlp_ratio"] if shape.family == "qwen2_vl" else v["intermediate"]
    per_block = patches * size * (8 * v["width"] + 2 * mlp)
    return per_block * (v["depth"] if training.lora_rank is None else 1)


def plan(shape: ModelShape, training: TrainingShape, processes: int = 1, sharding: str = "ddp",
         tokens: int | None = None) -> MemoryPlan:
    """The `MemoryPlan` of one process of `processes` under `sharding` ("ddp", "zero2" or "zero3"), every row
    `tokens` long (default: `tokens_per_row`, the longest the collator builds)."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding {sharding!r} is not one of {SHARDINGS}")
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    layers = student_layers(shape, training)
    size = DTYPE_BYTES[training.dtype]
    layer_params = [shape.layer_parameters(layer) for layer in layers]
    frozen = sum(layer_params) + shape.vocab * shape.hidden + shape.hidden + shape.vision_parameters()
    if training.lora_rank:  # adapters in float32 (peft casts them up), beside the frozen weights
        trainable = sum(shape.lora_parameters(layer, training.lora_rank) for layer in layers) + shape.hidden
        trainable_size = 4
    else:
        trainable, frozen, trainable_size = frozen, 0, size
    states = 0 if training.optimizer.startswith("sgd") else 2  # AdamW: two moments per trainable parameter
    weights = frozen * size + trainable * trainable_size
    gradients = trainable * trainable_size
    optimizer = states * trainable * trainable_size
    shard = max(processes, 1)
    details = {"parameters": frozen + trainable, "trainable": trainable, "layers": len(layers)}
    if sharding in ("zero2", "zero3"):
        gradients, optimizer = math.ceil(gradients / shard), math.ceil(optimizer / shard)
    if sharding == "zero3":  # every weight sharded; the running layer and the prefetched next one gathered whole
        gathered = 2 * max(layer_params) * size
        weights = math.ceil(weights / shard) + (gathered if processes > 1 else 0)
        details["gathered"] = gathered if processes > 1 else 0
    tokens = tokens or tokens_per_row(shape, training)
    rows = min(training.rows, training.grad_cache) if training.grad_cache else training.rows
    if training.gradient_checkpointing:  # each layer's input kept, one layer's tensors during its recomputation
        activations = (len(layers) * rows * tokens * shape.hidden * size
                       + max(layer_activation_bytes(shape, training, layer, rows * tokens) for layer in layers))
    else:
        activations = sum(layer_activation_bytes(shape, training, layer, rows * tokens) for layer in layers)
    activations += forward_activation_bytes(shape, training, rows, tokens)
    activations += vision_activation_bytes(shape, training, rows)
    details.update(tokens_per_row=tokens, rows=rows)
    # the loss: each query's similarities to the gathered candidates (float32), with their softmax and gradient
    loss = 3 * 4 * training.batch * training.rows * processes
    teacher = teacher_bytes(shape, training, layers)
    return MemoryPlan(sharding, processes, weights, gradients, optimizer, activations, teacher, loss, details)


def teacher_bytes(shape: ModelShape, training: TrainingShape, layers: list[int]) -> int:
    """The teacher's weights on each process (it is not sharded): the full-depth layers the student lacks
    ("shared": the student's own weights are the rest), a whole full-depth model ("separate"), nothing ("cached":
    read from the memory-mapped cache, "none")."""
    if training.teacher in ("none", "cached"):
        return 0
    depth = training.teacher_depth or shape.base_depth or shape.depth
    size = DTYPE_BYTES[training.dtype]
    full = [shape.layer_parameters(layer) for layer in range(depth)]
    if training.teacher == "shared":
        return size * sum(count for layer, count in enumerate(full) if layer not in layers)
    return size * (sum(full) + shape.vocab * shape.hidden + shape.hidden + shape.vision_parameters())


def largest_batch(shape: ModelShape, training: TrainingShape, memory: int, processes: int, sharding: str,
                  limit: int = 1 << 20) -> int:
    """The largest per-device batch whose plan fits `memory` bytes (0: not even one query)."""
    def fits(batch: int) -> bool:
        return plan(shape, _with_batch(training, batch), processes, sharding).total <= memory

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _with_batch(training: TrainingShape, batch: int) -> TrainingShape:
    from dataclasses import replace

    return replace(training, batch=batch)


def parse_memory(text: str) -> int:
    """Bytes of a size like `80GiB`, `80GB`, `79.6G` or `512MiB` (GB and G read as GiB, as device specs are)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--plan-memory {text!r} is not a size like 80GiB or 512MiB")
    exponent = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024**exponent)


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def format_plan(shape: ModelShape, training: TrainingShape, processes: int, memory: int | None) -> str:
    """The plan as text: the run's shape, then one column per sharding of the components per process and, with
    `memory`, the largest per-device batch that fits it."""
    plans = [plan(shape, training, processes, sharding) for sharding in SHARDINGS]
    first = plans[0].details
    mode = f"LoRA r{training.lora_rank}" if training.lora_rank else "full fine-tuning"
    activation = ("one GradCache chunk of " + str(training.grad_cache) + " rows" if training.grad_cache
                  else f"{training.rows} rows") + (", gradient checkpointing" if training.gradient_checkpointing
                                                    else "")
    lines = [
        f"Memory plan per process ({processes} process{'es' if processes > 1 else ''}; GiB):",
        f"  model: {shape.family}, {first['layers']} decoder layers of {shape.hidden}, "
        f"{first['parameters'] / 1e9:.3f} B parameters ({first['trainable'] / 1e6:.1f} M trained, {mode}), "
        f"weights in {training.dtype}",
        f"  batch: {training.batch} queries per device x {2 + training.hard_negatives} sides = {training.rows} rows "
        f"of up to {first['tokens_per_row']} tokens; activations of {activation}",
        f"  teacher: {training.teacher}",
    ]
    headers = ["", *(SHARDING_NAMES[p.sharding] for p in plans)]
    rows = [["parameters", *(_gib(p.parameters) for p in plans)],
            ["gradients", *(_gib(p.gradients) for p in plans)],
            ["optimizer state", *(_gib(p.optimizer) for p in plans)],
            ["activations", *(_gib(p.activations) for p in plans)],
            ["teacher", *(_gib(p.teacher) for p in plans)],
            ["loss", *(_gib(p.loss) for p in plans)],
            ["total", *(_gib(p.total) for p in plans)]]
    if memory:
        rows.append([f"largest batch in {_gib(memory)} GiB",
                     *(str(largest_batch(shape, training, memory, processes, p.sharding)) for p in plans)])
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        lines.append("  " + "  ".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                                      for i, (cell, width) in enumerate(zip(row, widths))))
    lines.append("  Not counted: the framework's own memory (CUDA context, communication buffers, fragmentation: "
                 "keep 10-20% free).")
    return "\n".join(lines)


def _truthy(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")


def plan_settings(settings: dict, teacher_config: dict | None = None) -> TrainingShape:
    """The `TrainingShape` of a run's settings (`{option: value}` as the config and command line set them)."""
    def get(name, default, convert=lambda value: value):
        return convert(settings[name]) if settings.get(name) is not None else default

    use_peft = get("use_peft", False, _truthy)
    bf16 = get("bf16", False, _truthy)
    dtype = get("dtype", "bfloat16" if bf16 else "float32", str)
    if dtype == "auto":
        dtype = "bfloat16" if bf16 else "float32"
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    kept = get("kept_layers", None)
    if isinstance(kept, str):
        kept = [int(item) for item in re.split(r"[\s,]+", kept.strip("[] ")) if item]
    teacher_depth = None
    if teacher_config is not None:
        teacher_depth = (teacher_config.get("text_config") or teacher_config)["num_hidden_layers"]
    return TrainingShape(
        num_layers=get("num_layers", None, int), kept_layers=kept, dtype=dtype,
        lora_rank=get("lora_r", 16, int) if use_peft else None, lora_dropout=get("lora_dropout", 0.05, float),
        batch=get("per_device_train_batch_size", 8, int), hard_negatives=get("num_hard_negatives", 0, int),
        max_text_tokens=get("max_text_tokens", 450, int), max_pixels=get("max_pixels", 235200, int),
        gradient_checkpointing=get("gradient_checkpointing", False, _truthy),
        grad_cache=get("grad_cache_chunk_size", None, int), teacher=get("teacher", "none", str),
        teacher_depth=teacher_depth, optimizer=get("optim", "adamw_torch", str))


# the options `plan_settings` reads (train_puma's --plan reads them from the config and command line)
PLAN_OPTIONS = ("model_name_or_path", "num_layers", "kept_layers", "dtype", "bf16", "use_peft", "lora_r",
                "lora_dropout", "per_device_train_batch_size", "num_hard_negatives", "max_text_tokens", "max_pixels",
                "gradient_checkpointing", "grad_cache_chunk_size", "teacher", "teacher_model", "optim")


__all__ = ["MemoryPlan", "ModelShape", "PLAN_OPTIONS", "SHARDINGS", "TrainingShape", "format_plan",
           "forward_activation_bytes", "largest_batch", "layer_activation_bytes", "model_shape", "parse_memory",
           "plan", "plan_settings", "read_config", "student_layers", "tokens_per_row", "vision_activation_bytes"]

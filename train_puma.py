# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Training of a PUMA embedding model from one YAML file per stage (trl's `TrlParser`: `--config x.yaml` sets the
defaults, command-line flags override them): the pruned student, its data, its teacher and `PumaTrainer`.

Run as `python train.py` / `accelerate launch train.py` in a checkout (train.py shows the launch commands of every
stage) or as the installed `puma-train` command, which takes the same arguments.
"""

import json
import os
from dataclasses import dataclass, field

from transformers import TrainerCallback, enable_full_determinism, set_seed
from transformers.utils import logging
from trl import ModelConfig, TrlParser, get_peft_config

from data_puma import ColumnPairDataset, MBEIRTrainDataset, NLIDataset, PumaCollator
from mbeir_puma import join_path
from modeling_puma import PumaForEmbedding
from trainer_puma import (CachedTeacher, PumaTrainer, PumaTrainingArguments, precompute_teacher_cache,
                          teacher_cache_is_fresh, teacher_fingerprint)


logger = logging.get_logger(__name__)


@dataclass
class ScriptArguments:
    """Model pruning, data and teacher-cache options (training options live in `PumaTrainingArguments`)."""

    num_layers: int | None = field(default=None, metadata={"help": "Keep the first k decoder layers of the base."})
    kept_layers: list[int] | None = field(default=None, metadata={"help": "Keep these base layers (original numbering)."})
    dataset: str = field(default="mbeir", metadata={"help": "'mbeir', 'nli' or 'hf' (a datasets dataset)."})
    mbeir_root: str | None = field(default=None, metadata={"help": "M-BEIR root; files and image paths are relative to it."})
    train_queries: str | None = field(default=None, metadata={"help": "M-BEIR training query file."})
    candidate_pool: str | None = field(default=None, metadata={"help": "M-BEIR candidate pool holding every training candidate."})
    instructions: str | None = field(default=None, metadata={"help": "M-BEIR query_instructions.tsv."})
    num_hard_negatives: int = field(default=0, metadata={"help": "Hard negatives per query (M-BEIR neg_cand_list, NLI hard_neg)."})
    nli_file: str | None = field(default=None, metadata={"help": "SimCSE nli_for_simcse.csv."})
    hf_dataset: str | None = field(default=None, metadata={"help": "A datasets name or folder (dataset 'hf')."})
    hf_split: str = field(default="train", metadata={"help": "Split of hf_dataset."})
    hf_streaming: bool = field(default=False, metadata={"help": "Stream hf_dataset instead of downloading it whole."})
    columns: dict | str | None = field(default=None, metadata={"help": "ColumnPairDataset columns as a mapping (JSON on the command line), e.g. {\"query_text\": \"q\", \"positive_image\": \"img\"}."})
    image_root: str | None = field(default=None, metadata={"help": "Folder relative image paths resolve against (default: mbeir_root)."})
    min_pixels: int | None = field(default=None, metadata={"help": "Override the model's min_pixels."})
    max_pixels: int | None = field(default=None, metadata={"help": "Override the model's max_pixels."})
    max_text_tokens: int | None = field(default=None, metadata={"help": "Override the model's text truncation (release: 450)."})
    position_mode: str | None = field(default=None, metadata={"help": "Override the recipe's positions: 'mrope' (the family's 3-D rotary positions) or 'sequential' (the release's and GME's 1-D positions)."})
    train_embedding_token: bool = field(default=True, metadata={"help": "Train the embedding token's input row with LoRA."})
    precompute_teacher: bool = field(default=False, metadata={"help": "Fill teacher_cache with the teacher's embeddings, then train."})
    license: str | None = field(default=None, metadata={"help": "License for the model card on --push_to_hub (default: the base's)."})
    seed_data: int = field(default=0, metadata={"help": "Seed of the per-epoch positive, instruction and negative draws."})


class SetEpochCallback(TrainerCallback):
    """Gives datasets with per-epoch draws (M-BEIR positives, instructions) the current epoch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


REQUIRED_OPTIONS = {"mbeir": ("mbeir_root", "train_queries", "candidate_pool", "instructions"), "nli": ("nli_file",),
                    "hf": ("hf_dataset", "columns")}
# Data files each dataset reads, relative to mbeir_root for M-BEIR (absolute paths stay as they are).
DATA_FILE_OPTIONS = {"mbeir": ("train_queries", "candidate_pool", "instructions"), "nli": ("nli_file",)}


def data_files(args: ScriptArguments) -> dict[str, str]:
    """`{option: path}` of the data files the arguments name, resolved as the datasets open them."""
    root = args.mbeir_root if args.dataset == "mbeir" else None
    return {name: join_path(root, getattr(args, name)) for name in DATA_FILE_OPTIONS.get(args.dataset, ())}


def check_data_paths(args: ScriptArguments, training_args: PumaTrainingArguments | None = None) -> None:
    """Fails before any model loads when an option is missing or names a file or folder that does not exist; the
    error lists each one with the option that set it, e.g.
    `train_queries=query/train/x.jsonl: /data/M-BEIR/query/train/x.jsonl does not exist`."""
    if args.dataset not in REQUIRED_OPTIONS:
        raise ValueError(f"dataset={args.dataset!r} is not one of {sorted(REQUIRED_OPTIONS)}.")
    unset = [name for name in REQUIRED_OPTIONS[args.dataset] if not getattr(args, name)]
    if unset:
        raise ValueError(f"dataset {args.dataset!r} needs {', '.join(unset)}.")
    problems = []
    folders = {"mbeir_root": args.mbeir_root if args.dataset == "mbeir" else None, "image_root": args.image_root}
    for name, folder in folders.items():
        if folder and not os.path.isdir(folder):
            problems.append(f"{name}={folder}: {os.path.abspath(folder)} is not a folder")
    for name, path in data_files(args).items():
        if not os.path.isfile(path):
            problems.append(f"{name}={getattr(args, name)}: {os.path.abspath(path)} does not exist")
    if training_args is not None and training_args.teacher == "cached" and not args.precompute_teacher:
        fingerprint = os.path.join(training_args.teacher_cache, "fingerprint.json")
        if not os.path.isfile(fingerprint):
            problems.append(f"teacher_cache={training_args.teacher_cache}: {os.path.abspath(fingerprint)} does not "
                            "exist (fill the cache with --precompute_teacher)")
    if problems:
        raise FileNotFoundError("Data paths that do not exist:\n  " + "\n  ".join(problems))


def build_dataset(args: ScriptArguments):
    """The training dataset the script arguments name; missing arguments and paths are named in the error."""
    check_data_paths(args)
    files = data_files(args)
    if args.dataset == "mbeir":
        return MBEIRTrainDataset(files["train_queries"], files["candidate_pool"], files["instructions"],
                                 args.image_root or args.mbeir_root, num_hard_negatives=args.num_hard_negatives,
                                 seed=args.seed_data)
    if args.dataset == "nli":
        return NLIDataset(files["nli_file"], use_hard_negatives=args.num_hard_negatives > 0)
    if args.dataset == "hf":
        import datasets

        columns = json.loads(args.columns) if isinstance(args.columns, str) else args.columns
        data = datasets.load_dataset(args.hf_dataset, split=args.hf_split, streaming=args.hf_streaming)
        return ColumnPairDataset(data, image_root=args.image_root, **columns)


def lora_config(model_args: ModelConfig, model: PumaForEmbedding, train_embedding_token: bool):
    """trl's LoRA config, targeting every linear of the kept decoder layers (not the vision tower) by default."""
    config = get_peft_config(model_args)
    if config is None:
        return None
    if model_args.lora_target_modules is None:
        config.target_modules = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
    if config.task_type == "CAUSAL_LM":  # trl's default; an embedding model has no LM head
        config.task_type = "FEATURE_EXTRACTION"
    if train_embedding_token and model.config.embedding_token_id is not None:  # recipes pooling at an added token
        config.trainable_token_indices = {"embed_tokens": [model.config.embedding_token_id]}
    return config


def main(script_args: ScriptArguments, training_args: PumaTrainingArguments, model_args: ModelConfig):
    check_data_paths(script_args, training_args)  # a wrong path fails now, not after minutes of model loading
    # Seeded before the model exists: new parameters (LoRA matrices) are drawn before the Trainer seeds.
    (enable_full_determinism if training_args.full_determinism else set_seed)(training_args.seed)
    overrides = {k: getattr(script_args, k) for k in ("min_pixels", "max_pixels", "max_text_tokens", "position_mode")
                 if getattr(script_args, k)}
    model = PumaForEmbedding.from_pretrained(
        model_args.model_name_or_path, num_layers=script_args.num_layers, kept_layers=script_args.kept_layers,
        revision=model_args.model_revision, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
        **overrides)
    dataset = build_dataset(script_args)
    collator = PumaCollator(model.processor, model.config)  # the datasets resolve image paths against their roots

    teacher = None
    if training_args.teacher == "cached":
        fingerprint = teacher_fingerprint(training_args.teacher_model or model_args.model_name_or_path, model.config,
                                          list(data_files(script_args).values()))
        # The main process fills the cache (when asked) while the others wait, then every process reads it.
        with training_args.main_process_first(desc="teacher cache"):
            fresh = teacher_cache_is_fresh(training_args.teacher_cache, fingerprint)
            if script_args.precompute_teacher and fresh:
                logger.info(f"The teacher cache {training_args.teacher_cache} matches this run; reusing it.")
            if script_args.precompute_teacher and not fresh and training_args.process_index == 0:
                from torch.utils.data import DataLoader

                full = PumaForEmbedding.from_pretrained(training_args.teacher_model or model_args.model_name_or_path,
                                                        dtype=model.dtype, device_map=training_args.device, **overrides)
                loader = DataLoader(dataset, batch_size=training_args.per_device_train_batch_size, collate_fn=collator)
                precompute_teacher_cache(full, loader, training_args.teacher_cache, fingerprint)
                del full
            teacher = CachedTeacher(training_args.teacher_cache, fingerprint)

    # The Trainer's own push would upload output_dir only; hub_puma pushes the complete repository (card, handler,
    # sentence-transformers files) after the final merged save, so the Trainer must not open a Hub repo at start.
    push, training_args.push_to_hub = training_args.push_to_hub, False

    peft_config = lora_config(model_args, model, script_args.train_embedding_token)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    trainer = PumaTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator, teacher=teacher)
    if hasattr(dataset, "set_epoch"):
        trainer.add_callback(SetEpochCallback(dataset))
    resume = training_args.resume_from_checkpoint
    resume = True if str(resume).lower() in ("true", "last") else resume  # True: the newest checkpoint in output_dir
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():  # the log history, for training curves (eval_puma.py curves)
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))
    if push:
        trainer.push_to_hub(base_model=model_args.model_name_or_path, license=script_args.license)
    return trainer


def make_parser() -> TrlParser:
    return TrlParser((ScriptArguments, PumaTrainingArguments, ModelConfig))


def cli(argv: list[str] | None = None):
    """The `puma-train` command and `python train.py`: parse `--config` and the command line, then train."""
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    return main(script_args, training_args, model_args)


# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Train a PUMA embedding model: one YAML file per stage, every field overridable on the command line.

    # stage 1: NLI text pairs, InfoNCE + distillation from the full-depth model (LoRA on the first 12 layers)
    accelerate launch --config_file configs/accelerate/ddp.yaml train.py --config configs/puma_stage1_nli.yaml
    # stage 2: M-BEIR with MAC-Loss, from stage 1's merged output
    accelerate launch --config_file configs/accelerate/ddp.yaml train.py --config configs/puma_stage2_mbeir.yaml
    # any field from the command line, e.g. a short run:
    python train.py --config configs/puma_stage2_mbeir.yaml --max_steps 10 --output_dir /tmp/try
    # fill the teacher cache for a dataset (teacher: cached), then train without running the teacher
    python train.py --config configs/puma_stage1_nli.yaml --teacher cached --teacher_cache cache/nli --precompute_teacher
    # push the final model as a complete Hub repository (card, handler, sentence-transformers files)
    python train.py --config configs/puma_stage2_mbeir.yaml --push_to_hub --hub_model_id you/puma-7b
"""

import json
import os
from dataclasses import dataclass, field

from transformers import TrainerCallback
from trl import ModelConfig, TrlParser, get_peft_config

from data_puma import ColumnPairDataset, MBEIRTrainDataset, NLIDataset, PumaCollator
from modeling_puma import PumaForEmbedding
from trainer_puma import CachedTeacher, PumaTrainer, PumaTrainingArguments, precompute_teacher_cache, teacher_fingerprint


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


def _path(root: str | None, path: str | None) -> str | None:
    return os.path.join(root, path) if root and path and not os.path.isabs(path) else path


def build_dataset(args: ScriptArguments):
    """The training dataset the script arguments name; missing arguments are named in the error."""
    if args.dataset == "mbeir":
        missing = [n for n in ("mbeir_root", "train_queries", "candidate_pool", "instructions") if getattr(args, n) is None]
        if missing:
            raise ValueError(f"dataset 'mbeir' needs {missing}.")
        return MBEIRTrainDataset(_path(args.mbeir_root, args.train_queries), _path(args.mbeir_root, args.candidate_pool),
                                 _path(args.mbeir_root, args.instructions), args.image_root or args.mbeir_root,
                                 num_hard_negatives=args.num_hard_negatives, seed=args.seed_data)
    if args.dataset == "nli":
        if args.nli_file is None:
            raise ValueError("dataset 'nli' needs nli_file.")
        return NLIDataset(args.nli_file, use_hard_negatives=args.num_hard_negatives > 0)
    if args.dataset == "hf":
        import datasets

        if args.hf_dataset is None or not args.columns:
            raise ValueError("dataset 'hf' needs hf_dataset and columns.")
        columns = json.loads(args.columns) if isinstance(args.columns, str) else args.columns
        data = datasets.load_dataset(args.hf_dataset, split=args.hf_split, streaming=args.hf_streaming)
        return ColumnPairDataset(data, image_root=args.image_root, **columns)
    raise ValueError(f"dataset={args.dataset!r} is not one of 'mbeir', 'nli', 'hf'.")


def lora_config(model_args: ModelConfig, model: PumaForEmbedding, train_embedding_token: bool):
    """trl's LoRA config, targeting every linear of the kept decoder layers (not the vision tower) by default."""
    config = get_peft_config(model_args)
    if config is None:
        return None
    if model_args.lora_target_modules is None:
        config.target_modules = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
    if config.task_type == "CAUSAL_LM":  # trl's default; an embedding model has no LM head
        config.task_type = "FEATURE_EXTRACTION"
    if train_embedding_token:
        config.trainable_token_indices = {"embed_tokens": [model.config.embedding_token_id]}
    return config


def data_files(args: ScriptArguments) -> list[str]:
    names = {"mbeir": ("train_queries", "candidate_pool", "instructions"), "nli": ("nli_file",)}.get(args.dataset, ())
    return [_path(args.mbeir_root, getattr(args, name)) for name in names]


def main(script_args: ScriptArguments, training_args: PumaTrainingArguments, model_args: ModelConfig):
    overrides = {k: getattr(script_args, k) for k in ("min_pixels", "max_pixels", "max_text_tokens") if getattr(script_args, k)}
    model = PumaForEmbedding.from_pretrained(
        model_args.model_name_or_path, num_layers=script_args.num_layers, kept_layers=script_args.kept_layers,
        revision=model_args.model_revision, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
        **overrides)
    dataset = build_dataset(script_args)
    collator = PumaCollator(model.processor, model.config)  # the datasets resolve image paths against their roots

    teacher = None
    if training_args.teacher == "cached":
        fingerprint = teacher_fingerprint(training_args.teacher_model or model_args.model_name_or_path, model.config,
                                          data_files(script_args))
        # The main process fills the cache (when asked) while the others wait, then every process reads it.
        with training_args.main_process_first(desc="teacher cache"):
            if script_args.precompute_teacher and training_args.process_index == 0:
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


if __name__ == "__main__":
    parser = make_parser()
    main(*parser.parse_args_and_config())

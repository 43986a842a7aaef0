# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Training of a PUMA embedding model from one YAML file per stage (trl's `TrlParser`: `--config x.yaml` sets the
defaults, command-line flags override them): the pruned student, its data, its teacher and `PumaTrainer`.

Run as `python train.py` / `accelerate launch train.py` in a checkout (train.py shows the launch commands of every
stage) or as the installed `puma-train` command, which takes the same arguments. `--help` lists PUMA's options and
the most used ones of transformers and trl; `--help-all` lists every option.

The command checks what it can before the training stack loads (torch, transformers and the model take tens of
seconds to import): the config file, every data path, the model path and whether the machine computes in bfloat16.
A mistake is answered with one line (`cli_puma`).
"""

import argparse
import inspect
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field, fields
from typing import get_type_hints

from trl import TrlParser

from cli_puma import (USAGE_EXIT_STATUS, OneLineErrors, UsageError, check_model_path, invocation, run_command, to_bool,
                      to_int)
from mbeir_puma import join_path


logger = logging.getLogger(__name__)


TEACHER_CACHE_DTYPES = ("float32", "bfloat16", "float16")


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
    video_max_frames: int | None = field(default=None, metadata={"help": "Override the model's frames per video."})
    video_min_pixels: int | None = field(default=None, metadata={"help": "Override the model's least pixels per video frame."})
    video_max_pixels: int | None = field(default=None, metadata={"help": "Override the model's most pixels per video frame."})
    video_total_pixels: int | None = field(default=None, metadata={"help": "Override the model's pixel budget per video."})
    position_mode: str | None = field(default=None, metadata={"help": "Override the recipe's positions: 'mrope' (the family's 3-D rotary positions) or 'sequential' (the release's and GME's 1-D positions)."})
    train_embedding_token: bool = field(default=True, metadata={"help": "Train the embedding token's input row with LoRA."})
    precompute_teacher: bool = field(default=False, metadata={"help": "Fill teacher_cache with the teacher's embeddings (every process encodes its share; a killed build resumes), then train."})
    teacher_cache_dtype: str | None = field(default=None, metadata={"help": "dtype the teacher cache stores: 'float32', 'bfloat16' or 'float16' (default: the model's)."})
    teacher_cache_shard_size: int = field(default=65536, metadata={"help": "Embeddings per teacher cache shard (each written once, by one process)."})
    license: str | None = field(default=None, metadata={"help": "License for the model card on --push_to_hub (default: the base's)."})
    seed_data: int = field(default=0, metadata={"help": "Seed of the per-epoch positive, instruction and negative draws."})

    def __post_init__(self):
        if self.teacher_cache_dtype is not None and self.teacher_cache_dtype not in TEACHER_CACHE_DTYPES:
            raise ValueError(f"teacher_cache_dtype={self.teacher_cache_dtype!r} is not one of {TEACHER_CACHE_DTYPES}.")
        if self.teacher_cache_shard_size < 1:
            raise ValueError(f"teacher_cache_shard_size must be positive, got {self.teacher_cache_shard_size}.")


REQUIRED_OPTIONS = {"mbeir": ("mbeir_root", "train_queries", "candidate_pool", "instructions"), "nli": ("nli_file",),
                    "hf": ("hf_dataset", "columns")}
# Data files each dataset reads, relative to mbeir_root for M-BEIR (absolute paths stay as they are).
DATA_FILE_OPTIONS = {"mbeir": ("train_queries", "candidate_pool", "instructions"), "nli": ("nli_file",)}


def data_files(args: ScriptArguments) -> dict[str, str]:
    """`{option: path}` of the data files the arguments name, resolved as the datasets open them."""
    root = args.mbeir_root if args.dataset == "mbeir" else None
    return {name: join_path(root, getattr(args, name)) for name in DATA_FILE_OPTIONS.get(args.dataset, ())}


def check_data_paths(args: ScriptArguments, training_args=None) -> None:
    """Fails before any model loads when an option is missing or names a file or folder that does not exist; the
    error lists each one with the option that set it, e.g.
    `train_queries=query/train/x.jsonl: /data/M-BEIR/query/train/x.jsonl does not exist`.

    `training_args` (`PumaTrainingArguments`, or any object with `teacher` and `teacher_cache`) adds the teacher
    cache to the checks."""
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
    missing_root = folders["mbeir_root"] and not os.path.isdir(folders["mbeir_root"])
    for name, path in data_files(args).items():
        if missing_root and not os.path.isabs(getattr(args, name)):
            continue  # under the missing root, which is named already
        if not os.path.isfile(path):
            problems.append(f"{name}={getattr(args, name)}: {os.path.abspath(path)} does not exist")
    if training_args is not None and training_args.teacher == "cached" and not args.precompute_teacher:
        fingerprint = os.path.join(training_args.teacher_cache, "fingerprint.json")
        if not os.path.isfile(fingerprint):
            problems.append(f"teacher_cache={training_args.teacher_cache}: {os.path.abspath(fingerprint)} does not "
                            "exist (fill the cache with --precompute_teacher)")
    if problems:
        raise FileNotFoundError("Data paths that do not exist: " + "; ".join(problems))


def build_dataset(args: ScriptArguments):
    """The training dataset the script arguments name; missing arguments and paths are named in the error."""
    from data_puma import ColumnPairDataset, MBEIRTrainDataset, NLIDataset

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


def lora_config(model_args, model, train_embedding_token: bool):
    """trl's LoRA config, targeting every linear of the kept decoder layers (not the vision tower) by default."""
    from trl import get_peft_config

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


def eval_command(output_dir: str, mbeir_root: str | None) -> str:
    """The command that evaluates the model saved in `output_dir` on M-BEIR: `python eval_puma.py ...` in a checkout
    (train.py sits beside this module), the installed `puma-eval` command otherwise."""
    here = os.path.dirname(os.path.abspath(__file__))
    program = (f"python {shlex.quote(os.path.relpath(os.path.join(here, 'eval_puma.py')))}"
               if os.path.isfile(os.path.join(here, "train.py")) else "puma-eval")
    root = shlex.quote(mbeir_root) if mbeir_root else "PATH/TO/M-BEIR"
    return f"{program} --model {shlex.quote(output_dir)} --mbeir-root {root} --out {shlex.quote(output_dir)}/eval"


def main(script_args: ScriptArguments, training_args, model_args):
    """Trains with parsed arguments (`make_parser().parse_args_and_config(...)`) and returns the `PumaTrainer`."""
    check_data_paths(script_args, training_args)  # a wrong path fails now, not after minutes of model loading
    # The training stack is imported here rather than at the top, so that the command's checks (`cli`) answer a
    # mistake in seconds instead of after torch and transformers have loaded.
    from transformers import enable_full_determinism, set_seed

    from data_puma import PumaCollator
    from modeling_puma import PumaForEmbedding
    import torch

    from trainer_puma import (CachedTeacher, PumaTrainer, SetEpochCallback, precompute_teacher_cache,
                              teacher_cache_is_fresh, teacher_fingerprint, without_zero3)

    # Seeded before the model exists: new parameters (LoRA matrices) are drawn before the Trainer seeds.
    (enable_full_determinism if training_args.full_determinism else set_seed)(training_args.seed)
    overrides = {k: getattr(script_args, k) for k in ("min_pixels", "max_pixels", "max_text_tokens", "position_mode",
                                                      "video_max_frames", "video_min_pixels", "video_max_pixels",
                                                      "video_total_pixels")
                 if getattr(script_args, k)}
    model = PumaForEmbedding.from_pretrained(
        model_args.model_name_or_path, num_layers=script_args.num_layers, kept_layers=script_args.kept_layers,
        revision=model_args.model_revision, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
        **overrides)
    dataset = build_dataset(script_args)
    collator = PumaCollator(model.processor, model.config)  # the datasets resolve image paths against their roots

    teacher = None
    if training_args.teacher == "cached":
        from teacher_cache_puma import describe_teacher_cache, teacher_items

        teacher_path = training_args.teacher_model or model_args.model_name_or_path
        fingerprint = teacher_fingerprint(teacher_path, model.config, list(data_files(script_args).values()))
        fresh = teacher_cache_is_fresh(training_args.teacher_cache, fingerprint)
        if script_args.precompute_teacher and fresh:
            logger.info(f"The teacher cache {training_args.teacher_cache} matches this run; reusing it.")
        if script_args.precompute_teacher and not fresh:
            # Every process encodes its share of the shards (a killed build resumes at the first missing shard);
            # the size is printed before the teacher loads.
            items = teacher_items(dataset)
            dtype = getattr(torch, script_args.teacher_cache_dtype) if script_args.teacher_cache_dtype else model.dtype
            if training_args.process_index == 0:
                print(describe_teacher_cache(items, model.config.text_config.hidden_size, dtype,
                                             training_args.teacher_cache, script_args.teacher_cache_shard_size),
                      flush=True)
            # Inference only, outside DeepSpeed's engine: a full copy per process even under ZeRO-3, which would
            # partition it at load and leave each process's forward a shard of the weights
            with without_zero3(training_args.deepspeed_plugin):
                full = PumaForEmbedding.from_pretrained(teacher_path, dtype=model.dtype,
                                                        device_map=training_args.device, **overrides)
            precompute_teacher_cache(full, dataset, training_args.teacher_cache, fingerprint, items=items,
                                     batch_size=training_args.per_device_train_batch_size,
                                     shard_size=script_args.teacher_cache_shard_size, dtype=dtype)
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


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------
USAGE = "%(prog)s --config CONFIG.yaml [--OPTION VALUE ...]"
DESCRIPTION = ("Train a PUMA embedding model: --config names a YAML file of options (configs/ holds one per stage), "
               "and any option given on the command line overrides it. Boolean options take true or false. "
               "--plan prints the run's memory per process instead of training (--plan-memory 80GiB: the largest "
               "batch that fits; --plan-processes N).")
# Titles of the help sections of PUMA's own options, by the dataclass declaring them.
PUMA_SECTIONS = {"ScriptArguments": "PUMA: pruning, data and teacher cache (ScriptArguments)",
                 "PumaTrainingArguments": "PUMA: objective, teacher and elastic depth (PumaTrainingArguments)"}
# Options of transformers' TrainingArguments and trl's ModelConfig that `--help` lists beside PUMA's own.
COMMON_OPTIONS = ("model_name_or_path", "dtype", "output_dir", "num_train_epochs", "max_steps",
                  "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "bf16", "use_cpu",
                  "use_peft", "lora_r", "logging_steps", "save_steps", "resume_from_checkpoint", "push_to_hub",
                  "hub_model_id")
COMMON_SECTION = "Most used options of transformers' TrainingArguments and trl's ModelConfig"
# Options read before the training stack loads: the data paths, the teacher cache, the model and the precision.
PRECHECKED_OPTIONS = (*(f.name for f in fields(ScriptArguments)), "teacher", "teacher_cache", "model_name_or_path",
                      "bf16", "bf16_full_eval", "use_cpu")


class _HelpSection:
    """An argument group whose options `--help` lists, or leaves to `--help-all` (`help=argparse.SUPPRESS`)."""

    def __init__(self, group, listed: bool):
        self.group, self.listed = group, listed

    def add_argument(self, *names, **kwargs):
        if not self.listed:
            kwargs["help"] = argparse.SUPPRESS
        return self.group.add_argument(*names, **kwargs)


class TrainParser(OneLineErrors, TrlParser):
    """trl's parser (`--config x.yaml`, then command-line overrides) whose help shows PUMA's options first: each
    option goes to the group of the dataclass that declares it (`PUMA_SECTIONS`), then `COMMON_OPTIONS`, then the
    rest of transformers' and trl's, listed only with `full_help`. A wrong command line is answered with one line."""

    def __init__(self, dataclass_types, full_help: bool = True, **kwargs):
        self.full_help, self._sections, self.unlisted = full_help, {}, 0
        super().__init__(dataclass_types, **kwargs)
        if self.unlisted:
            self.epilog = (f"transformers' TrainingArguments and trl's ModelConfig take {self.unlisted} more options: "
                           "--help-all lists every one.")

    def parse_args_into_dataclasses(self, args=None, return_remaining_strings=False, **kwargs):
        # an unknown option is a wrong command line (HfArgumentParser raises a ValueError listing the leftovers)
        *outputs, remaining = super().parse_args_into_dataclasses(args, return_remaining_strings=True, **kwargs)
        if return_remaining_strings:
            return (*outputs, remaining)
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        return tuple(outputs)

    def _section(self, title: str, listed: bool = True) -> _HelpSection:
        if not self._sections:  # PUMA's sections first, whichever dataclass comes first
            for first in (*PUMA_SECTIONS.values(), COMMON_SECTION):
                self._sections[first] = self.add_argument_group(first)
        if title not in self._sections:
            self._sections[title] = self.add_argument_group(title)
        return _HelpSection(self._sections[title], listed or self.full_help)

    def _add_dataclass_arguments(self, dtype):
        # HfArgumentParser puts a dataclass's fields in one group; PumaTrainingArguments' fields are PUMA's own
        # and transformers' inherited ones, so each field is placed by the class that declares it.
        hints = get_type_hints(dtype)
        for item in fields(dtype):
            if not item.init:
                continue
            item.type = hints[item.name]
            owner = next(cls for cls in dtype.__mro__ if item.name in inspect.get_annotations(cls))
            if owner.__name__ in PUMA_SECTIONS:
                section = self._section(PUMA_SECTIONS[owner.__name__])
            elif item.name in COMMON_OPTIONS:
                section = self._section(COMMON_SECTION)
            else:
                library = owner.__module__.split(".")[0]
                possessive = f"{library}'" if library.endswith("s") else f"{library}'s"
                section = self._section(f"{possessive} {owner.__name__}", listed=False)
                self.unlisted += not section.listed
            self._parse_dataclass_field(section, item)


def make_parser(full_help: bool = True) -> TrainParser:
    """The parser of `ScriptArguments`, `PumaTrainingArguments` and trl's `ModelConfig`. `full_help=False` leaves
    transformers' and trl's options out of `--help`, but for `COMMON_OPTIONS`."""
    from trl import ModelConfig

    from trainer_puma import PumaTrainingArguments

    return TrainParser((ScriptArguments, PumaTrainingArguments, ModelConfig), full_help=full_help, usage=USAGE,
                       description=DESCRIPTION)


def read_settings(argv: list[str], names) -> tuple[dict, dict]:
    """`({name: value}, {name: where it was set})` of the options `names` as `--config` and the command line set
    them (the command line wins), read without the training stack: YAML values keep their types, command-line values
    are strings (`True` for a bare flag)."""
    settings, config, rest = {}, None, list(argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
            raise UsageError("--config needs a YAML file, e.g. --config configs/demo_stage1.yaml")
        config, rest = argv[index + 1], argv[:index] + argv[index + 2:]
        if not os.path.isfile(config):
            raise UsageError(f"--config {config}: {os.path.abspath(config)} "
                             f"{'is a folder' if os.path.isdir(config) else 'does not exist'}")
        import yaml

        try:
            with open(config, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise UsageError(f"--config {config} is not valid YAML ({err})") from err
        if not isinstance(loaded, dict):
            raise UsageError(f"--config {config} must hold a YAML mapping of option: value")
        settings.update({name: loaded[name] for name in names if name in loaded})
    sources = dict.fromkeys(settings, config)
    reader = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in names:  # HfArgumentParser takes --mbeir_root and --mbeir-root alike
        spellings = dict.fromkeys((f"--{name}", f"--{name.replace('_', '-')}"))
        reader.add_argument(*spellings, dest=name, nargs="?", const=True, default=argparse.SUPPRESS)
    from_command_line = vars(reader.parse_known_args(rest)[0])
    settings.update(from_command_line)
    sources.update(dict.fromkeys(from_command_line, "the command line"))
    return settings, sources


def check_before_loading(argv: list[str]) -> None:
    """The checks that need neither the model nor transformers' training stack: the config file, the dataset's
    options and data paths (`check_data_paths`), the model path, and bf16 on a machine that cannot compute in it.
    Raises `UsageError` or `FileNotFoundError` naming the option."""
    settings, sources = read_settings(argv, PRECHECKED_OPTIONS)
    values = {f.name: settings[f.name] for f in fields(ScriptArguments) if f.name in settings}
    for name in ("precompute_teacher", "hf_streaming", "train_embedding_token"):
        if name in values:
            values[name] = to_bool(values[name], name)
    if "teacher_cache_shard_size" in values:  # compared in ScriptArguments.__post_init__
        values["teacher_cache_shard_size"] = to_int(values["teacher_cache_shard_size"], "teacher_cache_shard_size")
    teacher = argparse.Namespace(teacher=settings.get("teacher", "none"), teacher_cache=settings.get("teacher_cache"))
    if teacher.teacher == "cached" and not teacher.teacher_cache:
        raise UsageError("--teacher cached needs --teacher_cache (a folder written by --precompute_teacher)")
    try:
        check_data_paths(ScriptArguments(**values), teacher)
    except ValueError as err:  # an unknown dataset or one without its options
        raise UsageError(f"{err} Set it in the config or on the command line (--help lists the options).") from err
    if not settings.get("model_name_or_path"):
        raise UsageError("--model_name_or_path is not set: the checkpoint to prune or train (a folder or Hub id)")
    check_model_path(str(settings["model_name_or_path"]), "--model_name_or_path")
    bf16 = [name for name in ("bf16", "bf16_full_eval") if to_bool(settings.get(name, False), name)]
    if bf16 and not to_bool(settings.get("use_cpu", False), "use_cpu"):
        # transformers' own test (TrainingArguments would fail on it after the parse, with a traceback)
        from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

        if not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
            raise UsageError(f"--{bf16[0]} true (from {sources[bf16[0]]}) needs a GPU that computes in bfloat16 "
                             f"(NVIDIA Ampere or newer) and this machine has none: pass --{bf16[0]} false to train in "
                             "float32")


def print_plan(argv: list[str]) -> None:
    """`--plan`: the memory per process of the run `argv` describes (`memory_plan_puma`), from the checkpoint's
    config.json alone; `--plan-memory 80GiB` adds the largest per-device batch that fits, `--plan-processes N` the
    process count (default: WORLD_SIZE, else 1)."""
    from memory_plan_puma import PLAN_OPTIONS, format_plan, model_shape, parse_memory, plan_settings, read_config

    reader = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    reader.add_argument("--plan", action="store_true")
    reader.add_argument("--plan-memory", "--plan_memory", dest="memory")
    reader.add_argument("--plan-processes", "--plan_processes", dest="processes", type=int,
                        default=int(os.environ.get("WORLD_SIZE", 1)))
    options, rest = reader.parse_known_args(argv)
    settings, _ = read_settings(rest, PLAN_OPTIONS)
    if not settings.get("model_name_or_path"):
        raise UsageError("--model_name_or_path is not set: --plan reads its config.json")
    if options.processes < 1:
        raise UsageError(f"--plan-processes {options.processes}: needs at least 1 process")
    try:
        memory = parse_memory(options.memory) if options.memory else None
        config = read_config(_config_file(str(settings["model_name_or_path"]), "--model_name_or_path"))
        teacher = settings.get("teacher_model") if settings.get("teacher") in ("shared", "separate") else None
        teacher_config = read_config(_config_file(str(teacher), "--teacher_model")) if teacher else None
        print(format_plan(model_shape(config), plan_settings(settings, teacher_config), options.processes, memory))
    except (ValueError, KeyError) as err:
        raise UsageError(f"--plan: {err}") from err


def _config_file(path: str, option: str) -> str:
    """config.json of a checkpoint folder, or of a Hub id (that one file downloaded)."""
    check_model_path(path, option)
    if os.path.isdir(os.path.expanduser(path)):
        return os.path.join(os.path.expanduser(path), "config.json")
    from huggingface_hub import constants, hf_hub_download

    try:
        return hf_hub_download(path, "config.json")
    except Exception as err:  # offline, unknown repository, no network: one line naming the option
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if constants.HF_HUB_OFFLINE
               else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}")
        raise UsageError(f"{option} {path}: its config.json could not be fetched from the Hub ({why}); give a local "
                         "checkpoint folder, or download it first.") from None


def _train(argv: list[str] | None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        prog = invocation()
        print(f"usage: {USAGE % {'prog': prog}}\n  e.g. {prog} --config configs/demo_stage1.yaml --max_steps 10\n"
              f"  {prog} --help lists PUMA's options, {prog} --help-all every option", file=sys.stderr)
        sys.exit(USAGE_EXIT_STATUS)
    if "--help-all" in argv or "-h" in argv or "--help" in argv:
        make_parser(full_help="--help-all" in argv).print_help()
        return None
    if "--plan" in argv:  # the memory plan reads config.json only: no check of data paths, nothing loaded
        return print_plan(argv)
    check_before_loading(argv)
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    trainer = main(script_args, training_args, model_args)
    if trainer.is_world_process_zero():
        print(f"\nSaved the trained model to {os.path.abspath(training_args.output_dir)}. Evaluate it with:\n  "
              f"{eval_command(training_args.output_dir, script_args.mbeir_root)}", flush=True)
    return trainer


def cli(argv: list[str] | None = None):
    """The `puma-train` command and `python train.py`: check the arguments, parse `--config` and the command line,
    then train; a mistake ends the command with one line on stderr."""
    return run_command(_train, argv)

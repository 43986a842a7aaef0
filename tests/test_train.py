"""train.py end to end: both stages from YAML configs, two CPU processes with gathered negatives, exact resume."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from numerics import assert_close

pytest.importorskip("trl", reason="train.py parses its arguments with trl.TrlParser")
pytest.importorskip("peft", reason="the stage configs train LoRA adapters")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from demo_data_puma import make_demo_benchmark

    root = tmp_path_factory.mktemp("demo")
    make_demo_benchmark(str(root), num_train=48, num_test=4, num_negatives=1, num_nli=48, image_size=48)
    return str(root)


def stage2_args(checkpoint, data, out, *extra):
    return ["--config", os.path.join(ROOT, "configs", "demo_stage2.yaml"), "--model_name_or_path", checkpoint,
            "--mbeir_root", data, "--output_dir", out, "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--dataloader_num_workers", "0", *extra]


def run_train(args, env=None, **kwargs):
    environment = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_stage1_then_stage2_from_the_merged_output(tiny_checkpoint, demo_data, tmp_path):
    from transformers import AutoModel

    from train_puma import main, make_parser

    stage1 = str(tmp_path / "stage1")
    main(*make_parser().parse_args_and_config([
        "--config", os.path.join(ROOT, "configs", "demo_stage1.yaml"), "--model_name_or_path", tiny_checkpoint,
        "--teacher_model", tiny_checkpoint, "--nli_file", os.path.join(demo_data, "nli_demo.csv"),
        "--output_dir", stage1, "--max_steps", "2", "--per_device_train_batch_size", "4"]))
    stage1_config = json.loads(open(os.path.join(stage1, "config.json")).read())
    assert stage1_config["kept_layers"] == [0, 1, 2] and "auto_map" in stage1_config
    trainer = main(*make_parser().parse_args_and_config(stage2_args(stage1, demo_data, str(tmp_path / "stage2"), "--max_steps", "2")))
    logged = [entry for entry in trainer.state.log_history if "tau_hard" in entry]
    assert logged and all("contrastive_loss" in entry for entry in logged)
    model = AutoModel.from_pretrained(str(tmp_path / "stage2"), trust_remote_code=True)
    assert model.config.kept_layers == [0, 1, 2]
    assert os.path.isfile(tmp_path / "stage2" / "trainer_state.json")


def test_a_run_is_reproducible_whatever_the_rng_state_before_it(tiny_checkpoint, demo_data, tmp_path):
    # LoRA matrices are drawn when the adapters are added, before the Trainer seeds: main() must seed first.
    from train_puma import main, make_parser

    weights = []
    for outer_seed in (1, 2):
        torch.manual_seed(outer_seed)
        out = str(tmp_path / f"run{outer_seed}")
        main(*make_parser().parse_args_and_config([
            "--config", os.path.join(ROOT, "configs", "demo_stage1.yaml"), "--model_name_or_path", tiny_checkpoint,
            "--teacher_model", tiny_checkpoint, "--nli_file", os.path.join(demo_data, "nli_demo.csv"),
            "--output_dir", out, "--max_steps", "1", "--warmup_steps", "0", "--per_device_train_batch_size", "4",
            "--num_layers", "2"]))
        weights.append(_weights(out))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_gather_negatives_across_ranks(tiny_checkpoint, demo_data, tmp_path):
    out = str(tmp_path / "ddp")
    # accelerate's torchrun launcher (--multi_gpu) spawns the processes; use_cpu (in the config) picks gloo on CPU
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               os.path.join(ROOT, "train.py"), *stage2_args(tiny_checkpoint, demo_data, out, "--max_steps", "2",
                                                            "--num_layers", "2", "--use_peft", "false")]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = json.loads(open(os.path.join(out, "trainer_state.json")).read())["log_history"]
    # each query is scored against the positives of both ranks: 2 processes x 4 per device
    assert [entry["num_candidates"] for entry in history if "num_candidates" in entry] == [8.0, 8.0]


KILL_AFTER_STEP_4 = """
import os, signal, sys
import train_puma
import trainer_puma
from transformers import TrainerCallback


class KillAfterStep4(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)


class KilledTrainer(trainer_puma.PumaTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(KillAfterStep4())


trainer_puma.PumaTrainer = KilledTrainer  # train_puma.main imports the trainer when it runs
train_puma.main(*train_puma.make_parser().parse_args_and_config(sys.argv[1:]))
"""


def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def _last_step_loss(folder):
    history = json.loads(open(os.path.join(folder, "trainer_state.json")).read())["log_history"]
    return [entry["loss"] for entry in history if entry.get("step") == 6 and "loss" in entry][-1]


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights_and_loss(tiny_checkpoint, demo_data, tmp_path):
    common = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--num_layers", "2",
              "--seed", "3", "--num_train_epochs", "1"]
    straight = str(tmp_path / "straight")
    done = run_train(stage2_args(tiny_checkpoint, demo_data, straight, *common))
    output = done.communicate(timeout=600)[0]
    assert done.returncode == 0, output[-3000:]
    # one readable line per log, the progress bar, and at the end the saved folder and the command evaluating it
    assert [line.split(" | ")[0] for line in output.splitlines() if line.startswith("step ")] == \
        [f"step {step}/6" for step in range(1, 7)]
    assert re.search(r"100%\|[^|\n]*\| 6/6", output)  # tqdm's bar, full, at 6 of 6 steps
    lines = output.splitlines()
    evaluate = lines[lines.index(f"Saved the trained model to {straight}. Evaluate it with:") + 1].split()
    assert evaluate[:2] == ["python", "eval_puma.py"]
    assert evaluate[2:] == ["--model", straight, "--mbeir-root", demo_data, "--out", f"{straight}/eval"]

    killed = str(tmp_path / "killed")
    # The run kills itself (SIGKILL, no clean-up) right after writing its step-4 checkpoint, in the middle of the epoch.
    wrapper = tmp_path / "killed_train.py"
    wrapper.write_text(KILL_AFTER_STEP_4)
    process = subprocess.run([sys.executable, str(wrapper), *stage2_args(tiny_checkpoint, demo_data, killed, *common)],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"},
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == -signal.SIGKILL, process.stdout[-2000:] + process.stderr[-2000:]
    assert os.path.isdir(os.path.join(killed, "checkpoint-4"))
    assert not os.path.isfile(os.path.join(killed, "model.safetensors"))  # it really died before the end
    resumed = run_train(stage2_args(tiny_checkpoint, demo_data, killed, *common, "--resume_from_checkpoint", "true"))
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()[-3000:]

    expected, got = _weights(straight), _weights(killed)
    assert expected.keys() == got.keys()
    # float32 weights after the same steps on the same batches, the optimizer state and RNG read back from disk:
    # equal on CPU; 2 ulps of the largest weight (~4) allow one rounding of another reduction order
    for key in expected:
        assert_close(got[key], expected[key], ulps=2, name=key)
    assert _last_step_loss(killed) == pytest.approx(_last_step_loss(straight), abs=1e-6)


def test_precompute_teacher_fills_the_cache_that_training_then_reads(tiny_checkpoint, demo_data, tmp_path):
    from train_puma import main, make_parser
    from trainer_puma import CachedTeacher

    cache = str(tmp_path / "cache")
    trainer = main(*make_parser().parse_args_and_config([
        "--config", os.path.join(ROOT, "configs", "demo_stage1.yaml"), "--model_name_or_path", tiny_checkpoint,
        "--teacher_model", tiny_checkpoint, "--teacher", "cached", "--teacher_cache", cache, "--precompute_teacher", "true",
        "--nli_file", os.path.join(demo_data, "nli_demo.csv"), "--output_dir", str(tmp_path / "out"),
        "--max_steps", "1", "--per_device_train_batch_size", "8"]))
    assert isinstance(trainer.teacher, CachedTeacher) and len(trainer.teacher.rows) == 2 * 48  # sent0 + sent1 rows
    fingerprint = json.loads(open(os.path.join(cache, "fingerprint.json")).read())
    assert set(fingerprint) == {"teacher_checkpoint", "prompt_template", "pixel_limits", "media", "data_files"}
    # a changed pixel limit makes the cache stale: the run refuses it at start-up
    with pytest.raises(ValueError, match="stale"):
        main(*make_parser().parse_args_and_config([
            "--config", os.path.join(ROOT, "configs", "demo_stage1.yaml"), "--model_name_or_path", tiny_checkpoint,
            "--teacher_model", tiny_checkpoint, "--teacher", "cached", "--teacher_cache", cache, "--max_pixels", "6272",
            "--nli_file", os.path.join(demo_data, "nli_demo.csv"), "--output_dir", str(tmp_path / "out2"),
            "--max_steps", "1"]))


def test_push_to_hub_uploads_the_complete_hub_folder(tiny_checkpoint, demo_data, tmp_path, monkeypatch):
    import hub_puma
    from train_puma import main, make_parser

    sent = {}
    monkeypatch.setattr(hub_puma, "check_hub_reachable", lambda endpoint, repo_id, **kw: None)
    monkeypatch.setattr(hub_puma.HfApi, "create_repo", lambda self, repo_id, **kw: sent.setdefault("repo", repo_id))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        sent["files"] = {p for p in os.listdir(folder_path)}
        return "commit"

    monkeypatch.setattr(hub_puma.HfApi, "upload_folder", upload_folder)
    main(*make_parser().parse_args_and_config(stage2_args(
        tiny_checkpoint, demo_data, str(tmp_path / "out"), "--max_steps", "1", "--num_layers", "2",
        "--push_to_hub", "true", "--hub_model_id", "someone/puma-demo", "--license", "apache-2.0")))
    assert sent["repo"] == "someone/puma-demo"
    assert {"README.md", "handler.py", "modeling_puma.py", "configuration_puma.py", "model.safetensors",
            "modules.json", "config.json"} <= sent["files"]

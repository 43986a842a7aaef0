"""Every YAML file in configs/ runs: parsed by train.py's own parser and trained for one step on a tiny model, with its
own data paths resolved in a workspace laid out like the real data (UniIR's M-BEIR, SimCSE's NLI file, the demo
benchmark). A config naming a file the real dataset lacks fails here."""

import glob
import json
import math
import os

import pytest
import yaml

from conftest import ROOT, TINY_DEPTH
from mbeir_layout import write_mbeir_tree, write_simcse_nli

pytest.importorskip("trl", reason="train.py parses its arguments with trl.TrlParser")
pytest.importorskip("peft", reason="the stage configs train LoRA adapters")

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
# Data roots the configs name, relative to the working directory they are launched from.
MBEIR_ROOT, NLI_FILE, DEMO_DATA = "data/M-BEIR", "data/nli_for_simcse.csv", "demo_out/data"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A working directory holding the data trees at the paths the shipped configs name."""
    from demo_data_puma import make_demo_benchmark

    root = tmp_path_factory.mktemp("workspace")
    write_mbeir_tree(root / MBEIR_ROOT)
    write_simcse_nli(root / NLI_FILE)
    make_demo_benchmark(root / DEMO_DATA, num_train=7, num_test=1, num_negatives=1, num_nli=8, image_size=32)
    return root


def test_every_config_is_covered():
    names = {os.path.basename(path) for path in CONFIGS}
    assert {"puma_stage1_nli.yaml", "puma_stage2_mbeir.yaml", "puma2b_stage1_nli.yaml", "puma2b_stage2_mbeir.yaml",
            "demo_stage1.yaml", "demo_stage2.yaml", "demo_elastic.yaml", "demo_budget.yaml",
            "qwen3vl_embedding2b_stage1_nli.yaml",
            "qwen3vl_embedding2b_stage2_mbeir.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_config_trains_one_step_on_data_laid_out_like_the_real_one(config, workspace, tiny_checkpoint,
                                                                   embedder_checkpoints, tmp_path, monkeypatch):
    from train_puma import main, make_parser

    with open(config, encoding="utf-8") as f:
        settings = yaml.safe_load(f)
    # A tiny base of the config's own kind: Qwen2-VL, or the trained embedder it prunes (with its recipe).
    names = f"{settings.get('model_name_or_path')} {settings.get('teacher_model')}"
    base = embedder_checkpoints["qwen3_vl_embedding"] if "Qwen3-VL-Embedding" in names else tiny_checkpoint
    # Only the model and the run's size change; every data path is the config's own.
    overrides = ["--model_name_or_path", base, "--teacher_model", base, "--dtype", "float32",
                 "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--bf16", "false",
                 "--dataloader_num_workers", "0", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
                 "--output_dir", str(tmp_path / "out")]
    if "depths" in settings:  # an elastic config keeps its depths, which end at its num_layers: within the tiny base
        assert settings["num_layers"] <= TINY_DEPTH
    elif "num_layers" in settings:  # the tiny base has 6 layers (Qwen3-VL: DeepStack injects after the first 3)
        overrides += ["--num_layers", "4" if base != tiny_checkpoint else "2"]
    monkeypatch.chdir(workspace)
    trainer = main(*make_parser().parse_args_and_config(["--config", config, *overrides]))

    assert trainer.state.global_step == 1
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert os.path.isfile(tmp_path / "out" / "config.json")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    if "depths" in settings:  # every depth's loss is logged and the saved model records the depths it was trained at
        logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
        assert all(math.isfinite(logged[f"contrastive_loss_d{depth}"]) for depth in settings["depths"])
        assert saved["trained_depths"] == settings["depths"]
    if "visual_pools" in settings:  # the reduction factors are recorded too
        assert saved["trained_visual_pools"] == sorted(set(settings["visual_pools"]))
    # per-module learning rates took effect (a rule matching no parameter would have failed the run)
    rates = {group["initial_lr"] for group in trainer.optimizer.param_groups}
    assert rates == {float(settings["learning_rate"]), *map(float, settings.get("module_learning_rates", {}).values())}


def test_a_wrong_data_path_fails_before_the_model_loads_naming_the_option(workspace, tmp_path, monkeypatch):
    from train_puma import main, make_parser

    monkeypatch.chdir(workspace)
    args = make_parser().parse_args_and_config([
        "--config", os.path.join(ROOT, "configs", "puma_stage2_mbeir.yaml"), "--use_cpu", "true", "--bf16", "false",
        "--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(tmp_path / "no-such-model"),
        # the file names an earlier version of the config used: they are not in UniIR's M-BEIR
        "--train_queries", "query/train/mbeir_union_up_train.jsonl",
        "--candidate_pool", "cand_pool/global/mbeir_union_up_train_cand_pool.jsonl",
        "--image_root", "data/M-BEIR/images"])
    with pytest.raises(FileNotFoundError) as error:
        main(*args)
    message = str(error.value)
    root = os.path.join(str(workspace), MBEIR_ROOT)
    assert (f"train_queries=query/train/mbeir_union_up_train.jsonl: "
            f"{root}/query/train/mbeir_union_up_train.jsonl does not exist") in message
    assert (f"candidate_pool=cand_pool/global/mbeir_union_up_train_cand_pool.jsonl: "
            f"{root}/cand_pool/global/mbeir_union_up_train_cand_pool.jsonl does not exist") in message
    assert f"image_root=data/M-BEIR/images: {root}/images is not a folder" in message
    assert "instructions=" not in message  # the path that exists is not named


def test_a_missing_teacher_cache_or_nli_file_is_named(workspace, tmp_path, monkeypatch):
    from train_puma import check_data_paths, make_parser

    monkeypatch.chdir(workspace)
    script_args, training_args, _ = make_parser().parse_args_and_config([
        "--config", os.path.join(ROOT, "configs", "puma_stage1_nli.yaml"), "--use_cpu", "true", "--bf16", "false",
        "--output_dir", str(tmp_path / "out"), "--nli_file", "data/nli.csv", "--teacher", "cached",
        "--teacher_cache", "cache/nli"])
    with pytest.raises(FileNotFoundError, match=r"nli_file=data/nli.csv: .*/data/nli.csv does not exist; "
                                                r"teacher_cache=cache/nli: .*/cache/nli/fingerprint.json does not exist"):
        check_data_paths(script_args, training_args)
    script_args.nli_file = None
    with pytest.raises(ValueError, match="dataset 'nli' needs nli_file"):
        check_data_paths(script_args, training_args)

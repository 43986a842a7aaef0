"""The commands as a user types them (`python train.py`, `python eval_puma.py`, `python demo.py`,
`python space/app.py`): a mistake (no arguments, a missing config, data path, benchmark root or corpus, an unknown
task or option, bf16 on a machine without it) ends the command before any model loads, with one line on stderr that
names the option, a non-zero status and no traceback; `PUMA_DEBUG=1` shows the traceback."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from cli_puma import UsageError, one_line, run_command


def run(script, *args, cwd=ROOT, env=None, timeout=300):
    environment = {key: value for key, value in os.environ.items() if key != "PUMA_DEBUG"}
    environment.update({"PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})})
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *expected):
    """The command failed with one `prog: error: ...` line, the last on stderr, holding each `expected` text."""
    assert result.returncode not in (0, None), result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from demo_data_puma import make_demo_benchmark

    root = tmp_path_factory.mktemp("cli-demo")
    make_demo_benchmark(str(root), num_train=7, num_test=1, num_negatives=1, num_nli=8, image_size=32)
    return str(root)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A folder standing for a checkpoint: the commands check that it exists before they load anything."""
    return str(tmp_path_factory.mktemp("some-checkpoint"))


# ---- the shared handling ------------------------------------------------------------------------------------------
def test_one_line_joins_a_listing_into_one_line():
    assert one_line("Data paths that do not exist:\n  a: x\n  b: y") == "Data paths that do not exist: a: x; b: y"


def test_a_mistake_exits_with_one_line_and_a_bug_keeps_its_traceback(capsys, monkeypatch):
    monkeypatch.delenv("PUMA_DEBUG", raising=False)

    def mistaken(argv):
        raise FileNotFoundError("--corpus photos/: /home/me/photos is not a folder")

    with pytest.raises(SystemExit) as exit_info:
        run_command(mistaken, prog="puma-eval")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == ("puma-eval: error: --corpus photos/: /home/me/photos is not a folder "
                                       "(PUMA_DEBUG=1 shows where)\n")

    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda argv: (_ for _ in ()).throw(UsageError("--tasks: unknown task x")), prog="puma-eval")
    assert exit_info.value.code == 2

    def buggy(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_command(buggy)
    monkeypatch.setenv("PUMA_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run_command(mistaken)


# ---- train.py -----------------------------------------------------------------------------------------------------
def test_train_without_arguments_prints_a_short_usage():
    result = run("train.py")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: python train.py --config CONFIG.yaml")
    assert "--help-all" in result.stderr and len(result.stderr.splitlines()) <= 4


def test_train_names_a_missing_config_file(tmp_path):
    assert_one_line_error(run("train.py", "--config", "configs/no_such_stage.yaml"),
                          "--config configs/no_such_stage.yaml", os.path.join(ROOT, "configs/no_such_stage.yaml"),
                          "does not exist")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_name_or_path: [unclosed\n")
    assert_one_line_error(run("train.py", "--config", str(broken)), f"--config {broken} is not valid YAML")


def test_train_names_missing_data_paths_before_the_bf16_check(tmp_path):
    # puma_stage2_mbeir.yaml asks for bf16 and reads data/M-BEIR, which this working directory lacks
    line = assert_one_line_error(run("train.py", "--config", os.path.join(ROOT, "configs", "puma_stage2_mbeir.yaml"),
                                     cwd=tmp_path), "mbeir_root=data/M-BEIR", f"{tmp_path}/data/M-BEIR is not a folder")
    assert "bf16" not in line


def test_train_names_the_data_file_a_dataset_lacks(demo_data, model_folder):
    config = os.path.join(ROOT, "configs", "demo_stage2.yaml")
    assert_one_line_error(run("train.py", "--config", config, "--mbeir_root", demo_data, "--model_name_or_path",
                              model_folder, "--train_queries", "query/train/missing.jsonl"),
                          "train_queries=query/train/missing.jsonl", "missing.jsonl does not exist")
    assert_one_line_error(run("train.py", "--config", config, "--dataset", "nli"), "dataset 'nli' needs nli_file")


def test_train_names_a_model_folder_that_does_not_exist(demo_data, tmp_path):
    assert_one_line_error(run("train.py", "--config", os.path.join(ROOT, "configs", "demo_stage2.yaml"),
                              "--mbeir_root", demo_data, "--model_name_or_path", str(tmp_path / "no-model")),
                          f"--model_name_or_path {tmp_path / 'no-model'}", "does not exist")


def test_train_with_bf16_on_a_machine_without_it_says_to_turn_it_off(demo_data, model_folder):
    from transformers.utils import is_torch_bf16_gpu_available

    if is_torch_bf16_gpu_available():
        pytest.skip("this machine computes in bfloat16")
    assert_one_line_error(run("train.py", "--config", os.path.join(ROOT, "configs", "demo_stage2.yaml"),
                              "--mbeir_root", demo_data, "--model_name_or_path", model_folder, "--bf16", "true",
                              "--use_cpu", "false"),
                          "--bf16 true (from the command line)", "pass --bf16 false")


def test_train_reads_an_integer_option_from_the_command_line_and_names_one_that_is_not(demo_data, model_folder):
    from train_puma import check_before_loading

    options = ["--config", os.path.join(ROOT, "configs", "demo_stage1.yaml"), "--nli_file",
               os.path.join(demo_data, "nli_demo.csv"), "--model_name_or_path", model_folder, "--teacher", "cached",
               "--teacher_cache", model_folder, "--precompute_teacher", "true"]
    check_before_loading([*options, "--teacher_cache_shard_size", "8"])  # a string, compared as the number
    with pytest.raises(UsageError, match="--teacher_cache_shard_size eight: not an integer"):
        check_before_loading([*options, "--teacher_cache_shard_size", "eight"])
    with pytest.raises(UsageError, match="teacher_cache_shard_size must be positive, got 0"):
        check_before_loading([*options, "--teacher_cache_shard_size", "0"])


def test_train_names_an_unknown_option(demo_data, model_folder):
    assert_one_line_error(run("train.py", "--config", os.path.join(ROOT, "configs", "demo_stage2.yaml"),
                              "--mbeir_root", demo_data, "--model_name_or_path", model_folder, "--max_stepz", "3"),
                          "unrecognized arguments: --max_stepz 3", "--help")


def test_train_help_lists_pumas_options_first_and_leaves_the_rest_to_help_all():
    from train_puma import make_parser

    short, full = make_parser(full_help=False).format_help(), make_parser().format_help()
    sections = [line for line in short.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert sections[1:4] == ["PUMA: pruning, data and teacher cache (ScriptArguments):",
                             "PUMA: objective, teacher and elastic depth (PumaTrainingArguments):",
                             "Most used options of transformers' TrainingArguments and trl's ModelConfig:"]
    for option in ("--mbeir_root", "--tau_norm", "--depths", "--model_name_or_path", "--learning_rate", "--bf16"):
        assert option in short
    assert "--adam_beta1" not in short and "--lora_dropout" not in short  # transformers' and trl's rest
    assert short.rstrip().endswith("--help-all lists every one.")
    assert "--adam_beta1" in full and "--lora_dropout" in full and "--help-all lists" not in full
    assert len(short.splitlines()) < len(full.splitlines()) / 2


# ---- eval_puma.py -------------------------------------------------------------------------------------------------
def test_eval_without_arguments_prints_a_short_usage():
    result = run("eval_puma.py")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: python eval_puma.py [eval] --model MODEL --mbeir-root DIR")


@pytest.mark.parametrize("arguments, expected", [
    (["--mbeir-root", "{missing}"], ["--mbeir-root {missing}", "is not a folder"]),
    (["--mbeir-root", "{demo}", "--tasks", "DemoParaphrase", "no_such_task"],
     ["--tasks: unknown task no_such_task", "DemoParaphrase"]),
    (["--mbeir-root", "{demo}", "--baseline", "{missing}"], ["--baseline {missing}", "is not a file"]),
    (["--mbeir-root", "{demo}", "--baseline", "{demo}/demo_benchmark.json", "--baseline", "{demo}/demo_benchmark.json",
      "--baseline-name", "untrained"], ["--baseline-name is given 1 times for 2 --baseline files"]),
    (["--mbeir-root", "{demo}", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["mmeb", "--mmeb-root", "{missing}"], ["--mmeb-root {missing}", "is not a folder"]),
    (["search", "--corpus", "{missing}", "--query", "a dog"], ["--corpus {missing}", "does not exist"]),
    (["search", "--corpus", "{demo}"], ["search needs --query, --image or --video, or --query with one of them"]),
    (["analyze"], ["analyze needs exactly one of --mbeir-root, --hf-dataset, --pairs-folder"]),
    (["analyze", "--pairs-folder", "{missing}"], ["--pairs-folder {missing}", "is not a folder"]),
], ids=["mbeir-root", "tasks", "baseline", "baseline-names", "unknown-option", "mmeb-root", "corpus", "no-query",
        "analyze-source", "pairs-folder"])
def test_eval_names_the_bad_option_before_loading_the_model(arguments, expected, demo_data, model_folder, tmp_path):
    missing = str(tmp_path / "missing")

    def fill(text):
        return text.format(missing=missing, demo=demo_data)

    command = [fill(arg) for arg in arguments]
    if command[0] in ("mmeb", "search", "analyze"):
        command = [command[0], "--model", model_folder, *command[1:]]
    else:
        command = ["--model", model_folder, *command]
    assert_one_line_error(run("eval_puma.py", *command), *[fill(text) for text in expected])


def test_eval_names_a_model_path_that_does_not_exist(demo_data, tmp_path):
    assert_one_line_error(run("eval_puma.py", "--model", str(tmp_path / "no-model"), "--mbeir-root", demo_data),
                          f"--model {tmp_path / 'no-model'}", "does not exist")


def test_curves_names_a_missing_trainer_state(tmp_path):
    assert_one_line_error(run("eval_puma.py", "curves", "--trainer-state", str(tmp_path / "trainer_state.json"),
                              "--out", str(tmp_path / "curves.png")), "--trainer-state", "is not a file")


def test_puma_debug_shows_the_traceback_of_a_mistake(tmp_path, model_folder):
    result = run("eval_puma.py", "--model", model_folder, "--mbeir-root", str(tmp_path / "missing"),
                 env={"PUMA_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr and "FileNotFoundError" in result.stderr


# ---- demo.py and the Space ----------------------------------------------------------------------------------------
def test_demo_names_a_bad_option():
    assert_one_line_error(run("demo.py", "--threads", "0"), "--threads 0")
    assert_one_line_error(run("demo.py", "--family", "qwen9"), "argument --family: invalid choice: 'qwen9'")


def test_space_names_a_gallery_that_does_not_exist_before_loading_the_model(tmp_path, model_folder):
    pytest.importorskip("gradio", reason="the Space needs gradio")
    result = run(os.path.join("space", "app.py"), cwd=tmp_path,
                 env={"PUMA_MODEL": model_folder, "PUMA_GALLERY": "photos/"})
    assert_one_line_error(result, "Gallery photos/", f"{tmp_path}/photos does not exist")
    result = run(os.path.join("space", "app.py"), cwd=tmp_path, env={"PUMA_MODEL": "", "PUMA_GALLERY": "photos/"})
    assert_one_line_error(result, "No model: set PUMA_MODEL")

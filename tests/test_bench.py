"""The benchmark scripts run end to end at their smallest settings (tiny random checkpoints, test-sized workloads) and
write their result tables with `--markdown`, stamped with how they were measured. Timings are not checked: only the
stamp, the tables' columns and rows, and that ratios carry their spread."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_puma import build_tiny_checkpoint


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = ("- command: `python bench/", "- date (UTC): ", "- versions: python ", "torch ", "transformers ",
         "- machine: CPU: ", "cores: ", "memory: ", "GPU: ", "OMP_NUM_THREADS: 1", "- load average (1, 5, 15 min): ")
SPREAD = re.compile(r"^-?\d+\.\d+ \(-?\d+\.\d+--?\d+\.\d+\)x?$")  # "median (min-max)"


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    """A --data folder holding the tiny checkpoints the scripts would otherwise write (as `tiny_puma.py` does)."""
    folder = tmp_path_factory.mktemp("bench")
    build_tiny_checkpoint(str(folder / "qwen2_vl_tiny"), "qwen2_vl", "old", 4, dtype=torch.bfloat16)  # load, encode
    build_tiny_checkpoint(str(folder / "qwen2vl-tiny"), "qwen2_vl", "old", 2)  # training step
    return folder


def run_bench(script: str, *args, out) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Runs `bench/<script> ... --markdown <out>`; checks the stamp; returns `{title: (headers, rows)}` of its tables."""
    command = [sys.executable, os.path.join("bench", script), *map(str, args), "--markdown", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    for field in STAMP:
        assert field in text, f"{field!r} missing from the stamp:\n{text[:1500]}"
    assert "--markdown MARKDOWN`" in text  # the command line, the path outside the repository by its option
    tables, title = {}, None
    for block in text.split("\n\n"):
        if block.startswith("### "):
            title = block[4:]
        elif block.startswith("| "):
            lines = block.splitlines()
            cells = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
            assert set(lines[1]) <= {"|", "-", ":"}, lines[1]
            assert all(len(row) == len(cells[0]) for row in cells[2:]), block
            tables[title] = (cells[0], cells[2:])
    assert tables, text
    # the tables printed are the tables written
    assert all(table_line in result.stdout for table_line in text.split("\n\n")[2:] if table_line.startswith("| "))
    return tables


def one(tables: dict, prefix: str):
    found = [value for title, value in tables.items() if title.startswith(prefix)]
    assert len(found) == 1, (prefix, list(tables))
    return found[0]


def test_load_benchmark_writes_each_setting_with_ratios_to_transformers(bench_data, tmp_path):
    tables = run_bench("bench_load.py", "--families", "qwen2_vl_tiny", "--quick", "--data", bench_data,
                       out=tmp_path / "docs" / "load.md")
    headers, rows = one(tables, "Load benchmark")
    assert headers == ["checkpoint", "kept", "setting", "time (s)", "anonymous peak (GiB)", "time ratio",
                       "memory ratio", "goal"]
    assert [row[2] for row in rows] == ["transformers", "puma", "transformers + processor", "puma + processor"]
    assert {row[0] for row in rows} == {"qwen2_vl_tiny"} and {row[1] for row in rows} == {"k=3"}
    assert all(SPREAD.match(row[5]) and SPREAD.match(row[6]) for row in rows), rows
    assert rows[0][5].startswith("1.00 (1.00-1.00)")  # the baseline against itself
    assert re.fullmatch(r"time (PASS|FAIL), memory (PASS|FAIL)", rows[1][7])


def test_encode_benchmark_writes_text_bucketing_and_image_tables(bench_data, tmp_path):
    tables = run_bench("bench_encode.py", "--family", "qwen2_vl_tiny", "--quick", "--data", bench_data,
                       out=tmp_path / "encode.md")
    headers, rows = one(tables, "(a) Text throughput")
    assert headers == ["layers", "texts/s", "GFLOP/s", "CPU s", "goal"]
    assert [row[0] for row in rows] == ["k=6", "k=3", "speed-up k=3 vs 6"]
    assert SPREAD.match(rows[2][1]) and SPREAD.match(rows[2][3]) and rows[2][2].startswith("FLOP-ideal 2.000")
    headers, rows = one(tables, "(b) Length-bucketed")
    assert [row[0] for row in rows] == ["naive (given order)", "length-bucketed (encode)", "speed-up"]
    assert SPREAD.match(rows[2][1]) and re.match(r"(PASS|FAIL) \(", rows[2][4])
    headers, rows = one(tables, "(c) Images")
    assert headers[:3] == ["max_pixels", "image tokens (all images)", "images/s"]
    assert [row[0] for row in rows] == ["64*28*28", "256*28*28", "ratio 64 vs 256"] and SPREAD.match(rows[2][2])


def test_the_encode_benchmark_can_run_the_pruned_model_on_the_full_models_tensors(bench_data):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import bench_encode
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    args = bench_encode.make_parser().parse_args(["--checkpoint", str(bench_data / "qwen2_vl_tiny"), "--layers", "3"])
    full = bench_encode.load(args, 6)
    shared, own = bench_encode.load_sharing(args, full), bench_encode.load(args, 3)
    assert shared.num_layers == 3 and shared.config.kept_layers == own.config.kept_layers == [0, 1, 2]
    assert full.num_layers == 6 and len(full.model.language_model.layers) == 6  # the full model is left whole
    full_storage = {p.data_ptr() for p in full.parameters()}
    assert all(p.data_ptr() in full_storage for p in shared.parameters())  # no copy of its own
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (56, 56, 3), dtype=np.uint8))
    for inputs in (["a dog on a mat", "two cats"], [image]):
        torch.testing.assert_close(shared.encode(inputs), own.encode(inputs), rtol=0, atol=0)


def test_encode_benchmark_writes_the_video_tables(bench_data, tmp_path):
    pytest.importorskip("av", reason="the benchmark writes its clips with PyAV")
    tables = run_bench("bench_encode.py", "--family", "qwen2_vl_tiny", "--quick", "--video", "--data", bench_data,
                       out=tmp_path / "encode_video.md")
    headers, rows = one(tables, "(d) Videos")
    assert headers == ["layers", "video tokens per clip", "videos/s", "GFLOP/video", "CPU s", "note"]
    assert [row[0] for row in rows] == ["k=6", "k=3", "speed-up k=3 vs 6"]
    assert SPREAD.match(rows[2][2]) and rows[2][3].startswith("FLOP-ideal ") and rows[0][1] == rows[1][1]
    headers, rows = one(tables, "(e) Frames and pixels")
    assert headers[:4] == ["frames", "pixels per frame", "video tokens per clip", "GFLOP/video"]
    assert [row[0] for row in rows] == ["2", "4"] and rows[0][6] == "1.000" and float(rows[1][6]) > 1
    assert int(rows[1][2]) == 2 * int(rows[0][2])  # twice the frames, twice the video tokens


def test_training_step_benchmark_writes_configurations_and_checks(bench_data, tmp_path):
    tables = run_bench("bench_train_step.py", "--shape", "tiny", "--quick", "--configs", "mac", "--data",
                       bench_data, out=tmp_path / "train_step.md")
    headers, rows = one(tables, "tiny shape, 3 of 6 layers kept")
    assert headers == ["configuration", "step (s)", "step / (d), median (min-max) over steps", "peak memory (GiB)",
                       "peak / (a)"]
    # the baselines run even when not asked for
    assert [row[0] for row in rows] == ["(a) separate full teacher (release)", "(d) student alone, InfoNCE",
                                        "(d) student alone, MAC"]
    assert all(SPREAD.match(row[2]) for row in rows) and rows[1][2] == "1.00 (1.00-1.00)" and rows[0][4] == "1.00"
    headers, rows = one(tables, "Checks")
    assert [row[0] for row in rows] == ["MAC step / InfoNCE step - 1 (%)"]  # only the checks of what ran


def test_elastic_training_step_benchmark_writes_steps_and_ratio_check(bench_data, tmp_path):
    tables = run_bench("bench_train_step.py", "--shape", "tiny", "--elastic", "--steps", "2", "--batch", "4",
                       "--data", bench_data, out=tmp_path / "elastic.md")
    headers, rows = one(tables, "qwen2vl-tiny: LoRA r16 student keeping 3 of 6 layers")
    assert [row[0] for row in rows] == ["plain (3 layers, full size)",
                                        "3 depths x 3 sizes (1, 2, 3 layers x 16, 32, 64)"]
    # student forwards per step: queries and candidates once each; the depths read the same forward
    assert [row[4] for row in rows] == ["2", "2"]
    headers, rows = one(tables, "Elastic step against the plain step")
    assert [row[0] for row in rows] == ["elastic step / plain step (wall)", "elastic step / plain step (CPU)"]
    assert all(SPREAD.match(row[1]) for row in rows)


@pytest.mark.parametrize("sections, titles", [("abc", ["(a) Pool encoding", "(b) Exact search", "(c) Index kinds"]),
                                              ("d", ["(d) Sharded encoding"])])
def test_eval_benchmark_writes_each_section(tmp_path, sections, titles):
    tables = run_bench("bench_eval.py", "--tiny", "--sections", sections, "--data-dir", tmp_path / "vectors",
                       out=tmp_path / "eval.md")
    assert len(tables) == len(titles) and all(found.startswith(title) for found, title in zip(tables, titles))
    if "a" in sections:
        _, rows = one(tables, "(a)")
        assert rows[-1][0] == "ratio bucketed / naive" and SPREAD.match(rows[-1][1])
        _, rows = one(tables, "(b)")
        assert [row[0] for row in rows] == ["1,000"] and SPREAD.match(rows[0][3]) and rows[0][4].startswith("PASS")
        headers, rows = one(tables, "(c)")
        assert headers[:4] == ["data", "index", "candidates", "Recall@10 vs flat"]
        kinds = [row[1] for row in rows if row[0] == "random"]
        assert kinds[0] == "flat" and "ivf-flat, nprobe 4" in kinds and "hnsw" in kinds
        assert {row[0] for row in rows} == {"clustered", "random"}
        assert all(row[3] == "1.0000" for row in rows if row[1] == "flat")  # flat is its own reference
    else:
        _, rows = one(tables, "(d)")
        # (processes x threads): one process on one thread, then two processes sharing the cores (--tiny leaves out
        # one process on every core, the same code as on one)
        assert [row[0] for row in rows] == ["1 x 1", f"2 x {max(1, (os.cpu_count() or 2) // 2)}"]
        assert rows[0][3] == "1.000 (1.000-1.000)" and all(SPREAD.match(row[3]) for row in rows)


def test_a_stamp_shows_paths_outside_the_repository_as_the_options_name():
    from bench.common import ROOT, portable_arguments

    assert portable_arguments(["--data", "/somewhere/else", "--vllm-python=/opt/env/bin/python", "--steps", "3",
                               "--markdown", os.path.join(ROOT, "docs", "x.md"), "/lone/path"]) == \
        ["--data", "DATA", "--vllm-python=VLLM_PYTHON", "--steps", "3", "--markdown", "docs/x.md", "PATH"]


def test_the_elastic_study_trains_each_variant_per_seed_and_the_references_named():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import elastic_tax
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))

    def names(variant, kinds, alone=None):
        return [(run["name"], run["seed"], run["points"]) for run in
                elastic_tax.runs(variant, [0, 1], kinds, alone)]

    # every depth and size point has its reference trained alone, per seed (depth 3 at full size once), unless the
    # study names a subset
    assert [n for n, s, _ in names("alone", {"depth", "size"}) if s == 0] == \
        ["alone-d1", "alone-d2", "alone-d3", "alone-d3-m16", "alone-d3-m32"]
    assert names("alone", {"depth"}, {"d3"}) == [("alone-d3", 0, [(3, None)]), ("alone-d3", 1, [(3, None)])]
    assert names("alone", {"size"}, {"d3_m16"}) == [("alone-d3-m16", 0, [(3, 16)]), ("alone-d3-m16", 1, [(3, 16)])]
    # a variant is one training per seed, scored at each of its points
    assert names("elastic", {"depth"}) == [("elastic", s, [(1, None), (2, None), (3, None)]) for s in (0, 1)]
    # the equal-weight variant names its weights: the demo config it starts from weighs the full depth more
    assert elastic_tax.runs("elastic", [0], {"depth"})[0]["args"] == ["--depth_weights", "1", "1", "1"]
    matryoshka = elastic_tax.runs("matryoshka-deep", [0], {"size"})[0]
    assert matryoshka["points"] == [(3, 16), (3, 32), (3, None)]  # the full size too, against depth 3 alone
    assert matryoshka["args"] == ["--matryoshka_dims", "16", "32", "64", "--matryoshka_weights", "0.5", "0.5", "1"]

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""`accelerate launch eval_puma.py` on two CPU processes (gloo), as a user runs it on a machine without GPUs: the
same embeddings, rankings and metrics as one process, each item encoded by one process only, results written once,
and a run killed half-way resumes from the shards it wrote."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch

pytest.register_assert_rewrite("eval_fixtures")
from eval_fixtures import candidate, query, write_jsonl  # noqa: E402
from conftest import ROOT  # noqa: E402
from puma_eval import evaluate_mbeir  # noqa: E402


pytest.importorskip("accelerate", reason="multi-process evaluation runs under accelerate launch")
pytest.importorskip("faiss", reason="evaluation needs faiss-cpu")

pytest_plugins = ("eval_fixtures",)  # puma_checkpoint, model

SHARD_SIZE = 1  # many small shards, so that the run can be killed half-way
WORDS = "red green blue small large circle square star triangle two three on under near a the".split()
# Items to encode per cache name: two text->text tasks of 60 candidates and 15 queries
POOL_SIZES = {f"{name}_{kind}": size for name in ("alpha_task1", "beta_task1")
              for kind, size in (("cand_pool", 60), ("test", 15))}
ENCODED = re.compile(r"INFO puma_eval\.encoding: (\S+): process (\d) of 2 encoded (\d+) items")


@pytest.fixture
def benchmark(tmp_path):
    """Two text->text tasks with their own task table, in M-BEIR's format."""
    root, tasks = tmp_path / "bench", []
    for dataset, name in enumerate(("alpha_task1", "beta_task1"), 1):
        texts = [" ".join(WORDS[(i * 7 + j * (dataset + 2)) % len(WORDS)] for j in range(3 + i % 5)) for i in range(60)]
        write_jsonl(str(root / f"{name}_cand_pool.jsonl"),
                    [candidate(f"{dataset}:{i}", t) for i, t in enumerate(texts)])
        write_jsonl(str(root / f"{name}_test.jsonl"), [query(f"{dataset}:{i}", texts[4 * i][::-1], f"{dataset}:{4 * i}")
                                                      for i in range(15)])
        tasks.append({"name": name, "test_file": f"{name}_test.jsonl", "local_pool_file": f"{name}_cand_pool.jsonl",
                      "query_modality": "text", "cand_modality": "text"})
    (root / "tasks.json").write_text(json.dumps({"tasks": tasks, "instructions_file": "instructions.tsv"}))
    (root / "instructions.tsv").write_text("query_modality\tcand_modality\tdataset\tdataset_id\tprompt\n"
                                           "text\ttext\tAlpha\t1\tFind the sentence.\n"
                                           "text\ttext\tBeta\t2\tFind the words.\n")
    return root


def launch(checkpoint, benchmark, out, **popen):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               os.path.join(ROOT, "eval_puma.py"), "--model", checkpoint, "--mbeir-root", str(benchmark),
               "--out", str(out), "--shard-size", str(SHARD_SIZE), "--save-rankings"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def kill_family(process) -> None:
    """SIGKILL to the launcher and every worker (torch's elastic agent starts workers in sessions of their own), as
    when a node is lost."""
    import psutil

    try:
        family = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_tree(process) -> None:
    """`kill_family`, then waits for the launcher and reads the rest of its output."""
    kill_family(process)
    process.communicate()


def cached_embeddings(cache) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {os.path.relpath(path, cache): load_file(path)["embeddings"]
            for path in sorted(glob.glob(os.path.join(cache, "*", "*", "shard-*.safetensors")))}


def encoded_counts(output: str) -> dict[str, int]:
    counts = {}
    for name, _, count in ENCODED.findall(output):
        counts[name] = counts.get(name, 0) + int(count)
    return counts


def test_two_cpu_processes_resume_a_killed_run_and_match_one_process(puma_checkpoint, model, benchmark, tmp_path):
    # Given the reference: one process, one thread, the same shard size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rankings = {}
        reference = evaluate_mbeir(model, benchmark, cache_dir=tmp_path / "one", shard_size=SHARD_SIZE,
                                   show_progress_bar=False, rankings=rankings)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "two"
    cache = out / "embeddings"

    # When a two-process run is killed as soon as it reports its first encoded pool (those shards are on disk, the
    # other pools are still to come)
    killed = launch(puma_checkpoint, benchmark, out)
    # Only against a hang (never a measure of speed): a run that never reports is killed, its output ends, and the
    # assertion below fails
    watchdog = threading.Timer(600, kill_family, [killed])
    watchdog.start()
    seen = []
    try:
        for line in killed.stdout:
            seen.append(line)
            if ENCODED.search(line):
                break
    finally:
        watchdog.cancel()
    assert killed.poll() is None, "the run ended before it could be killed:\n" + "".join(seen)[-3000:]
    kill_tree(killed)
    written = set(cached_embeddings(cache))
    total = sum(-(-size // SHARD_SIZE) for size in POOL_SIZES.values())
    assert 0 < len(written) < total

    # and run again
    resumed = launch(puma_checkpoint, benchmark, out)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]

    # Then it encodes only the missing items, each in one process, and both processes take part
    counts = encoded_counts(output)
    reused = {name: sum(e.shape[0] for path, e in cached_embeddings(cache).items()
                        if path in written and path.startswith(name + os.sep)) for name in POOL_SIZES}
    assert {name: counts.get(name, 0) + reused[name] for name in POOL_SIZES} == POOL_SIZES
    assert {process for _, process, _ in ENCODED.findall(output)} == {"0", "1"}
    # results are printed and written once, by the main process
    assert output.count("| average (2 tasks) |") == 1 and output.count("Wrote results_local.md") == 1
    # and embeddings, rankings and metrics equal the single process's, bit for bit
    one, two = cached_embeddings(tmp_path / "one"), cached_embeddings(cache)
    assert one.keys() == two.keys() and len(one) == total
    for path in one:
        assert torch.equal(one[path], two[path]), path
    assert json.loads((out / "rankings_local.json").read_text()) == rankings
    assert json.loads((out / "results_local.json").read_text())["tasks"] == reference

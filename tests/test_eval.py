# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Tests of the M-BEIR evaluation (`puma_eval`, `eval_puma.py`: protocol, strict checks, resumable encoding cache,
faiss search, CLIs) and of the local `evaluate` metric module, offline on CPU with hand-written M-BEIR files and the
tiny random model."""

import json
import logging
import math
import os

import numpy as np
import pytest
import torch

pytest.register_assert_rewrite("eval_fixtures")
from eval_fixtures import COLOURS, INSTRUCTIONS, EncodeCounter, candidate, query, write_images, write_jsonl
from eval_puma import main
from puma_eval import (
    MBEIR_TASKS,
    PUBLISHED_FIGURES,
    build_index,
    encode_cached,
    evaluate_mbeir,
    load_metric,
    mbeir_summary,
    model_fingerprint,
    plot_training_curves,
    search_index,
    torch_search,
)
from puma_eval.metrics import METRIC_PATH, results_markdown
from puma_eval.tasks import MBEIR_INSTRUCTIONS
from modeling_puma import PumaForEmbedding
from numerics import assert_close


pytest.importorskip("faiss", reason="eval tests need faiss-cpu (pip install -e '.[eval]')")
pytest.importorskip("evaluate", reason="eval tests need evaluate (pip install -e '.[eval]')")
pytest.importorskip("matplotlib", reason="eval tests need matplotlib")

pytest_plugins = ("eval_fixtures",)  # puma_checkpoint, model, benchmark


# ---------------------------------------------------------------- metrics


def test_metric_module_matches_hand_computed_recall_mrr_ndcg_offline(monkeypatch):
    # Given the metric loaded by path with the Hub switched off
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = __import__("evaluate").load(METRIC_PATH, keep_in_memory=True)
    # When four queries are scored: hit at rank 2, hits at ranks 2 and 3, hit at rank 1, no hit
    scores = metric.compute(predictions=[["a", "b", "c"], ["x", "y", "z"], ["n", "p", "q"], ["p", "q", "r"]],
                            references=[["b"], ["z", "y"], ["n"], ["m"]], k_values=[1, 2, 3])
    # Then every value equals the hand computation (binary gains, discount 1/log2(rank + 1))
    d2, d3 = 1 / math.log2(3), 1 / math.log2(4)
    expected = {
        "recall@1": 1 / 4, "recall@2": 3 / 4, "recall@3": 3 / 4,
        "mrr": (1 / 2 + 1 / 2 + 1 + 0) / 4,
        "ndcg@1": (0 + 0 + 1 + 0) / 4,
        "ndcg@2": (d2 / 1 + d2 / (1 + d2) + 1 + 0) / 4,
        "ndcg@3": (d2 / 1 + (d2 + d3) / (1 + d2) + 1 + 0) / 4,
    }
    assert scores.keys() == expected.keys()
    for key, value in expected.items():
        assert_close(scores[key], value, ulps=16, name=key)  # float64 sums of a few terms


def test_metric_rejects_queries_without_relevant_ids_and_repeated_predictions():
    metric = load_metric()
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        metric.compute(predictions=[["a"], ["b"]], references=[["a"], []])
    with pytest.raises(ValueError, match=r"predictions\[0\] repeats ids \['a'\]"):
        metric.compute(predictions=[["a", "b", "a"]], references=[["a"]])


# ---------------------------------------------------------------- search


def test_faiss_flat_top_k_equals_torch_brute_force():
    generator = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(2000, 32, generator=generator), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(50, 32, generator=generator), dim=-1)

    scores, indices = search_index(build_index(corpus, "flat"), queries, 10, batch_size=16)
    reference_scores, reference_indices = torch_search(queries, corpus, 10, chunk_size=300)

    assert np.array_equal(indices, reference_indices.numpy())
    # float32 dot products of 32 terms, summed in another order by faiss and by torch
    assert_close(scores, reference_scores, ulps=32, name="scores")
    # the chunked merge of torch_search equals one full topk
    assert torch.equal(reference_indices, (queries @ corpus.T).topk(10, dim=1).indices)


@pytest.mark.parametrize("kind", ["ivf-flat", "hnsw"])
def test_approximate_indexes_find_each_vector_itself(kind):
    corpus = torch.nn.functional.normalize(torch.randn(1000, 16), dim=-1)
    _, indices = search_index(build_index(corpus, kind), corpus[:20], 5)
    assert indices[:, 0].tolist() == list(range(20))


def test_search_returns_at_most_the_pool_size():
    corpus = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    scores, indices = search_index(build_index(corpus), corpus, 10)
    assert scores.shape == indices.shape == (3, 3)


# ---------------------------------------------------------------- M-BEIR protocol


def test_global_pool_recall_is_at_most_local_recall(model, benchmark, tmp_path):
    cache = tmp_path / "cache"
    local = evaluate_mbeir(model, benchmark, pool="local", cache_dir=cache, show_progress_bar=False)
    global_ = evaluate_mbeir(model, benchmark, pool="global", cache_dir=cache, show_progress_bar=False)

    assert [r["task"] for r in local] == [r["task"] for r in global_] == ["shapes_task1", "pictures_task0"]
    assert [r["pool_size"] for r in local] == [5, 3]
    assert [r["pool_size"] for r in global_] == [16, 16]
    assert [r["metric"] for r in local] == ["recall@5", "recall@1"]
    for local_row, global_row in zip(local, global_):
        for k in (1, 5, 10):
            assert global_row[f"recall@{k}"] <= local_row[f"recall@{k}"]
        assert local_row["published"] == {}  # published figures belong to the M-BEIR table only
    # a local pool smaller than k holds every positive in the top k
    assert local[0]["recall@5"] == local[1]["recall@10"] == 100.0


def test_mbeir_root_without_task_table_uses_uniir_file_names_and_published_figures(model, tmp_path):
    # Given WebQA t->t (dataset id 2) written under UniIR's file names, with no tasks.json
    root = tmp_path / "M-BEIR"
    pool = [candidate(f"2:{i}", text) for i, text in enumerate(["a bridge", "a river", "a castle"])]
    write_jsonl(str(root / "query/test/mbeir_webqa_task1_test.jsonl"),
                [query("2:0", "what spans the river", "2:0"), query("2:1", "which water flows", "2:1")])
    write_jsonl(str(root / "cand_pool/local/mbeir_webqa_task1_cand_pool.jsonl"), pool)
    os.makedirs(root / "instructions")
    (root / "instructions/query_instructions.tsv").write_text(
        "query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\ntext\ttext\tWebQA\t2\tRetrieve a passage.\n")

    results = evaluate_mbeir(model, root, tasks=["webqa_task1"], show_progress_bar=False)

    assert results[0]["label"] == "WebQA t→t"
    assert results[0]["published"] == {"PUMA": 86.2, "LamRA-Ret": 82.5, "CLIP-SF": 84.7}
    average = mbeir_summary(results)
    assert average["published"]["PUMA"] == 86.2  # one task: the mean of its published figures
    assert "| WebQA t→t | R@5 |" in results_markdown(results, average)


def test_mbeir_task_table_follows_the_paper_columns():
    labels = [task.label for task in MBEIR_TASKS]
    assert labels[:4] == ["VisualNews t→i", "MSCOCO t→i", "Fashion200K t→i", "WebQA t→t"]
    assert len(MBEIR_TASKS) == 16 and len({task.name for task in MBEIR_TASKS}) == 16
    assert [task.name for task in MBEIR_TASKS if task.metric_k == 10] == ["fashion200k_task0", "fashion200k_task3",
                                                                         "fashioniq_task7"]
    mscoco = next(task for task in MBEIR_TASKS if task.name == "mscoco_task0")
    assert mscoco.query_file == "query/test/mbeir_mscoco_task0_test.jsonl"
    assert mscoco.pool_file == "cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl"
    puma = PUBLISHED_FIGURES["PUMA"]
    assert sum(puma[task.name] for task in MBEIR_TASKS) / 16 == pytest.approx(puma["average"], abs=0.05)


def _edit_jsonl(path, edit):
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    write_jsonl(str(path), edit(records))


STRICT_CASES = {
    "duplicate candidate id": (
        lambda root: _edit_jsonl(root / "cand_pool/local/shapes_task1_cand_pool.jsonl", lambda r: r + [r[1]]),
        ValueError, r"duplicate candidate ids.*'1:1'"),
    "duplicate query id": (
        lambda root: _edit_jsonl(root / "query/test/shapes_task1_test.jsonl", lambda r: r + [r[0]]),
        ValueError, r"duplicate qids.*'1:0'"),
    "missing positive": (
        lambda root: _edit_jsonl(root / "query/test/shapes_task1_test.jsonl",
                                 lambda r: r[:2] + [{**r[2], "pos_cand_list": ["1:9"]}]),
        ValueError, r"positives absent from the pool .*shapes_task1_cand_pool.jsonl.*'1:2->1:9'"),
    "wrong query modality": (
        lambda root: _edit_jsonl(root / "query/test/shapes_task1_test.jsonl",
                                 lambda r: [{**r[0], "query_modality": "image,text"}] + r[1:]),
        ValueError, r"queries whose modality is not 'text'.*'1:0 \(image,text\)'"),
    "wrong candidate modality": (
        lambda root: _edit_jsonl(root / "cand_pool/local/shapes_task1_cand_pool.jsonl",
                                 lambda r: r + [candidate("1:5", img_path="images/red.png")]),
        ValueError, r"candidates of the local pool whose modality is not 'text'.*'1:5 \(image\)'"),
    "positive of wrong modality": (
        lambda root: _edit_jsonl(root / "query/test/pictures_task0_test.jsonl",
                                 lambda r: [{**r[0], "pos_cand_list": ["2:0", "2:9"]}] + r[1:])
        or _edit_jsonl(root / "cand_pool/local/pictures_task0_cand_pool.jsonl",
                       lambda r: r + [candidate("2:9", "a caption")]),
        ValueError, r"positives whose modality is not 'image'.*'2:0->2:9 \(text\)'"),
    "missing task file": (
        lambda root: os.remove(root / "query/test/shapes_task1_test.jsonl"),
        FileNotFoundError, r"Task shapes_task1 query file: .*shapes_task1_test.jsonl does not exist"),
    "empty pool": (
        lambda root: (root / "cand_pool/local/shapes_task1_cand_pool.jsonl").write_text(""),
        ValueError, r"Task shapes_task1 local pool: the candidate pool .*shapes_task1_cand_pool.jsonl is empty"),
    "missing instruction": (
        lambda root: (root / MBEIR_INSTRUCTIONS).write_text(INSTRUCTIONS.rsplit("text\timage", 1)[0]),
        ValueError, r"Task pictures_task0: 2 queries without an instruction .*\('2', 'text', 'image'\)"),
}


@pytest.mark.parametrize("case", list(STRICT_CASES))
def test_invalid_benchmark_input_raises_an_error_naming_it(case, model, benchmark, monkeypatch):
    corrupt, error, message = STRICT_CASES[case]
    corrupt(benchmark)
    counter = EncodeCounter(model, monkeypatch)
    tasks = ["pictures_task0"] if case in ("positive of wrong modality", "missing instruction") else ["shapes_task1"]
    with pytest.raises(error, match=message):
        evaluate_mbeir(model, benchmark, tasks=tasks, show_progress_bar=False)
    assert counter.count == 0  # checks run before any encoding


def test_unknown_task_name_lists_the_available_tasks(model, benchmark):
    with pytest.raises(ValueError, match=r"Unknown tasks \['cirr_task7'\].*'pictures_task0', 'shapes_task1'"):
        evaluate_mbeir(model, benchmark, tasks=["cirr_task7"])


# ---------------------------------------------------------------- resumable encoding cache

TEXTS = [{"text": text, "image": None} for text in
         ["a red circle", "two blue squares next to a green triangle", "a star", "three small yellow hexagons on grey",
          "a cross", "a purple pentagon in the top left corner of a white background"]]
IDS = [f"9:{i}" for i in range(len(TEXTS))]


def test_interrupted_encoding_resumes_with_the_remaining_shards_only(model, tmp_path, monkeypatch):
    reference = encode_cached(model, TEXTS, IDS, tmp_path / "uninterrupted", shard_size=2, show_progress_bar=False)

    def interrupt(shard, num_shards):
        raise KeyboardInterrupt(f"stopped after shard {shard} of {num_shards}")

    with pytest.raises(KeyboardInterrupt):
        encode_cached(model, TEXTS, IDS, tmp_path / "cache", shard_size=2, show_progress_bar=False, on_shard=interrupt)
    (folder,) = (tmp_path / "cache" / "items").iterdir()
    assert sorted(os.listdir(folder)) == ["shard-00000.safetensors"]

    counter = EncodeCounter(model, monkeypatch)
    resumed = encode_cached(model, TEXTS, IDS, tmp_path / "cache", shard_size=2, show_progress_bar=False)
    assert counter.count == 4  # shards 1 and 2 only
    assert torch.equal(resumed, reference)

    reused = encode_cached(model, TEXTS, IDS, tmp_path / "cache", shard_size=2, show_progress_bar=False)
    assert counter.count == 4  # a finished encoding is reused
    assert torch.equal(reused, reference)


def test_corrupt_or_mismatched_shards_are_reencoded_with_a_warning(model, tmp_path, monkeypatch, caplog):
    from safetensors.torch import save_file

    reference = encode_cached(model, TEXTS, IDS, tmp_path, shard_size=2, show_progress_bar=False)
    (folder,) = (tmp_path / "items").iterdir()
    with open(folder / "shard-00001.safetensors", "r+b") as f:  # truncated mid-file
        f.truncate(40)
    save_file({"embeddings": reference[4:]}, str(folder / "shard-00002.safetensors"),
              metadata={"fingerprint": "another model", "ids": json.dumps(IDS[4:])})

    counter = EncodeCounter(model, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="puma_eval"):
        again = encode_cached(model, TEXTS, IDS, tmp_path, shard_size=2, show_progress_bar=False)

    assert counter.count == 4
    assert torch.equal(again, reference)
    messages = "\n".join(record.getMessage() for record in caplog.records)
    assert "shard-00001.safetensors is unreadable" in messages
    assert "shard-00002.safetensors is from another model, input set or setting (fingerprint mismatch)" in messages


def test_cache_is_keyed_by_instructions(model, tmp_path, monkeypatch):
    encode_cached(model, TEXTS, IDS, tmp_path, is_query=True, instructions=["Find it."] * 6, show_progress_bar=False)
    counter = EncodeCounter(model, monkeypatch)
    encode_cached(model, TEXTS, IDS, tmp_path, is_query=True, instructions=["Find another."] * 6,
                  show_progress_bar=False)
    assert counter.count == 6


def test_model_fingerprint_tells_retrained_weights_and_config_overrides_apart(puma_checkpoint, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    trained = PumaForEmbedding.from_pretrained(puma_checkpoint)
    trained.save_pretrained(first)
    with torch.no_grad():  # a training step: every weight moves, every shape and file size stays
        for parameter in trained.parameters():
            parameter.add_(1e-3 * torch.randn_like(parameter))
    trained.save_pretrained(second)
    assert os.path.getsize(first / "model.safetensors") == os.path.getsize(second / "model.safetensors")
    fingerprints = {model_fingerprint(PumaForEmbedding.from_pretrained(folder, **overrides))
                    for folder, overrides in [(first, {}), (second, {}), (first, {"max_pixels": 64 * 28 * 28})]}
    assert len(fingerprints) == 3
    assert model_fingerprint(PumaForEmbedding.from_pretrained(first)) in fingerprints


# ---------------------------------------------------------------- command line


def search_output(capsys) -> list[str]:
    """The hit lines the search CLI printed below its header."""
    lines = capsys.readouterr().out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[-4:] == ["rank", "score", "id", "content"])
    return lines[header + 1:]


def test_search_cli_prints_the_top_hits_of_a_folder_corpus(puma_checkpoint, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    write_images(corpus / "photos")
    (corpus / "notes").mkdir()
    (corpus / "notes" / "circle.txt").write_text("a red circle on white\n")
    (corpus / "notes" / "square.txt").write_text("two blue squares")
    (corpus / "README.md").write_text("not indexed")

    main(["search", "--model", puma_checkpoint, "--corpus", str(corpus), "--query", "a red circle", "--top-k", "3"])

    hits = [line.split() for line in search_output(capsys)]
    assert [hit[0] for hit in hits] == ["1", "2", "3"]
    scores = [float(hit[1]) for hit in hits]
    assert scores == sorted(scores, reverse=True)
    indexed = {f"photos/{name}.png" for name in COLOURS} | {"notes/circle.txt", "notes/square.txt"}
    assert {hit[2] for hit in hits} <= indexed


def test_search_cli_reads_a_jsonl_corpus_and_an_image_query(puma_checkpoint, tmp_path, capsys):
    write_images(tmp_path / "images")
    write_jsonl(str(tmp_path / "corpus.jsonl"), [{"id": "doc-a", "text": "a green field"},
                                                  {"id": "doc-b", "image": "images/green.png"},
                                                  {"id": "doc-c", "text": "a red light", "image": "images/red.png"}])
    main(["search", "--model", puma_checkpoint, "--corpus", str(tmp_path / "corpus.jsonl"),
          "--image", str(tmp_path / "images" / "green.png"), "--top-k", "10"])
    hits = search_output(capsys)
    assert sorted(line.split()[2] for line in hits) == ["doc-a", "doc-b", "doc-c"]  # top-k capped at the corpus


def test_eval_cli_on_the_demo_benchmark_writes_table_json_and_plots(puma_checkpoint, tmp_path, capsys):
    from demo_data_puma import make_demo_benchmark

    manifest = make_demo_benchmark(tmp_path / "demo", num_train=7, num_test=2, num_nli=1, image_size=32)
    names = [task["name"] for task in manifest["tasks"]][:2]
    out = tmp_path / "out"

    main(["--model", puma_checkpoint, "--mbeir-root", str(tmp_path / "demo"), "--out", str(out), "--tasks", *names])

    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("| task | metric | score | R@1 | R@5 | R@10 |")
    results = json.loads((out / "results_local.json").read_text())
    assert [row["task"] for row in results["tasks"]] == names
    assert all(0.0 <= row[key] <= 100.0 for row in results["tasks"] for key in ("recall@1", "recall@5", "ndcg@10"))
    assert results["average"]["label"] == "average (2 tasks)"
    assert (out / "results_local.md").read_text().strip() == printed.split("\n\nWrote")[0].strip()
    assert sorted(os.listdir(out / "plots")) == sorted(f"local_{name}.png" for name in names + ["average"])
    assert os.listdir(out / "embeddings")  # the cache defaults to OUT/embeddings


@pytest.mark.parametrize("config, error, message", [
    (None, (OSError, ValueError), "config.json"),  # from_pretrained's own errors name what is wrong
    ({"model_type": "bert"}, (OSError, ValueError), "bert"),
    ("absent", FileNotFoundError, "not-a-model does not exist"),
])
def test_eval_cli_rejects_a_model_path_that_is_not_a_checkpoint(config, error, message, benchmark, tmp_path):
    folder = tmp_path / "not-a-model"
    if config != "absent":
        folder.mkdir()
    if isinstance(config, dict):
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=message):
        main(["--model", str(folder), "--mbeir-root", str(benchmark), "--out", str(tmp_path / "out")])


def test_curves_cli_plots_the_loss_and_its_logged_components(tmp_path, capsys):
    history = [{"loss": 2.0 - 0.1 * step, "contrastive_loss": 1.5 - 0.1 * step, "distill_loss": 0.5, "tau_hard": 0.05,
                "learning_rate": 1e-4, "grad_norm": 3.0, "epoch": step / 10, "step": step} for step in range(1, 6)]
    history += [{"eval_loss": 1.4, "eval_runtime": 2.0, "eval_samples_per_second": 9.0, "epoch": 0.5, "step": 5},
                {"train_runtime": 60.0, "train_loss": 1.8, "total_flos": 1e12, "epoch": 0.5, "step": 5}]
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": history, "global_step": 5}))

    main(["curves", "--trainer-state", str(state), "--out", str(tmp_path / "plots" / "curves.png")])

    assert (tmp_path / "plots" / "curves.png").stat().st_size > 0
    assert "Plotted loss, contrastive_loss, distill_loss, eval_loss, grad_norm, learning_rate, tau_hard" in \
        capsys.readouterr().out
    state.write_text(json.dumps({"log_history": [{"learning_rate": 1e-4, "step": 1}]}))
    with pytest.raises(ValueError, match="logs no loss"):
        plot_training_curves(state, tmp_path / "empty.png")


def test_items_fingerprint_hashes_in_memory_images_by_content():
    from PIL import Image

    from puma_eval.encoding import items_fingerprint

    def fingerprint(image):
        return items_fingerprint(["a"], [{"text": "x", "image": image}], [None])

    red, also_red, blue = (Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (255, 0, 0), (0, 0, 255)))
    assert fingerprint(red) == fingerprint(also_red) != fingerprint(blue)  # content decides, not the object
    assert fingerprint(red) != fingerprint(red.resize((8, 9))) and fingerprint(red) != fingerprint("red.png")
    assert fingerprint({"bytes": b"png bytes", "path": None}) != fingerprint({"bytes": b"other", "path": None})
    assert fingerprint({"bytes": None, "path": "red.png"}) == fingerprint("red.png")
    with pytest.raises(TypeError, match="Cannot fingerprint an image of type object"):
        fingerprint(object())


def drawn_figures(monkeypatch) -> list:
    """The matplotlib figures the code under test closes (after saving them), kept for inspection."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close

    def keep_and_close(figure=None):
        figures.append(figure)
        close(figure)

    monkeypatch.setattr(plt, "close", keep_and_close)
    return figures


def test_curves_show_the_total_loss_beside_a_component_equal_to_it(tmp_path, monkeypatch):
    # stage 2: one loss with weight 1, so contrastive_loss == loss at every step
    history = [{"loss": 2.0 - 0.1 * step, "contrastive_loss": 2.0 - 0.1 * step, "tau_hard": 0.05, "step": step}
               for step in range(1, 6)]
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": history}))
    figures = drawn_figures(monkeypatch)
    plot_training_curves(state, tmp_path / "curves.png")
    losses = figures[0].axes[0]
    assert [text.get_text() for text in losses.get_legend().get_texts()] == ["loss", "contrastive_loss (= loss)"]
    total, component = losses.get_lines()
    # the total is a wide translucent band under the dashed component: both stay visible
    assert list(total.get_ydata()) == list(component.get_ydata())
    assert total.get_linewidth() > 2 * component.get_linewidth() and total.get_alpha() < 1
    assert component.get_zorder() > total.get_zorder() and component.get_linestyle() == "--"


def test_eval_cli_draws_a_baseline_beside_the_model_in_the_table_and_the_charts(puma_checkpoint, benchmark, tmp_path,
                                                                               monkeypatch):
    first = tmp_path / "untrained"
    main(["--model", puma_checkpoint, "--mbeir-root", str(benchmark), "--out", str(first)])
    baseline = json.loads((first / "results_local.json").read_text())
    for row in [*baseline["tasks"], baseline["average"]]:  # a weaker baseline, so that the two bars differ
        row["score"] = row["score"] / 2
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))
    expected = {row["task"]: row["score"] for row in [*baseline["tasks"], baseline["average"]]}

    figures = drawn_figures(monkeypatch)
    out = tmp_path / "trained"
    main(["--model", puma_checkpoint, "--mbeir-root", str(benchmark), "--out", str(out), "--baseline",
          str(tmp_path / "baseline.json"), "--baseline-name", "untrained", "--model-name", "trained"])
    results = json.loads((out / "results_local.json").read_text())
    scores = {row["task"]: row["score"] for row in [*results["tasks"], results["average"]]}
    bars = [([label.get_text() for label in figure.axes[0].get_xticklabels()],
             [patch.get_height() for patch in figure.axes[0].patches]) for figure in figures]
    assert bars == [(["untrained", "trained"], [pytest.approx(expected[task]), pytest.approx(scores[task])])
                    for task in scores]  # one chart per task, then the average
    table = (out / "results_local.md").read_text().splitlines()
    assert table[0].startswith("| task | metric | score | untrained | R@1 |")
    assert all(f"| {scores[task]:.1f} | {expected[task]:.1f} |" in line for task, line in zip(scores, table[2:]))

    # one task of the two: its chart keeps the baseline; the average does not (the baseline averaged both tasks)
    figures.clear()
    main(["--model", puma_checkpoint, "--mbeir-root", str(benchmark), "--out", str(tmp_path / "one"), "--tasks",
          "shapes_task1", "--baseline", str(tmp_path / "baseline.json"), "--baseline-name", "untrained"])
    assert [[label.get_text() for label in figure.axes[0].get_xticklabels()] for figure in figures] == \
        [["untrained", "this model"], ["this model"]]


def test_eval_cli_refuses_a_baseline_of_the_other_pool(puma_checkpoint, benchmark, tmp_path):
    from cli_puma import UsageError

    (tmp_path / "global.json").write_text(json.dumps({"tasks": [{"task": "shapes_task1", "score": 1.0,
                                                                  "pool": "global"}], "average": {"score": 1.0}}))
    with pytest.raises(UsageError, match="holds global-pool results and this run scores the local pool"):
        main(["--model", puma_checkpoint, "--mbeir-root", str(benchmark), "--baseline", str(tmp_path / "global.json")])
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="is not a results file of eval_puma.py"):
        main(["--model", puma_checkpoint, "--mbeir-root", str(benchmark), "--baseline", str(tmp_path / "other.json")])

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Tests of `puma_eval.mmeb` on tiny MMEB-format task files (VLM2Vec's fields, parquet and JSONL) and a tiny MMEB-V2
tree in its released layout (video frame folders, page images, each task's 🤗 annotations) written here: hit@1 and
nDCG@5 equal a brute-force computation with `model.encode`, the CLI writes the per-task, meta-task, modality and
leaderboard tables, bad records and missing frames are named."""

import json
import math
import os

import pytest
import torch

pytest.register_assert_rewrite("eval_fixtures")
from eval_fixtures import COLOURS, write_images, write_jsonl  # noqa: E402
from eval_puma import main  # noqa: E402
from puma_eval.mmeb import evaluate_mmeb, load_mmeb_task, score_mmeb  # noqa: E402


pytest.importorskip("datasets", reason="MMEB files are read with datasets")
pytest.importorskip("faiss", reason="evaluation needs faiss-cpu")

pytest_plugins = ("eval_fixtures",)  # puma_checkpoint, model

NAMES = list(COLOURS)
# ImageNet-1K (classification, MMEB-V2 fields): an image query, class names as candidates, the target first
CLASSIFICATION = [{"qry_inst": "<|image_1|> Represent the given image for classification", "qry_text": "",
                   "qry_img_path": f"images/{name}.png", "tgt_inst": "",
                   "tgt_text": [name] + [other for other in NAMES if other != name],
                   "tgt_img_path": [""] * len(NAMES)} for name in NAMES]
# MSCOCO_t2i (retrieval, MMEB-V1 fields): the instruction inside qry_text, images as candidates
RETRIEVAL = [{"qry_text": f"Find me an everyday image that matches the given caption: a {name} square",
              "qry_img_path": "", "tgt_text": ["<|image_1|> Represent the given image."] * 3,
              "tgt_img_path": [f"images/{name}.png", f"images/{NAMES[(i + 1) % 5]}.png",
                               f"images/{NAMES[(i + 2) % 5]}.png"]} for i, name in enumerate(NAMES)]


@pytest.fixture
def mmeb_root(tmp_path):
    import pandas as pd

    root = tmp_path / "MMEB-eval"
    write_images(root / "images" / "images")
    (root / "ImageNet-1K").mkdir(parents=True)
    pd.DataFrame(CLASSIFICATION).to_parquet(root / "ImageNet-1K" / "test-00000-of-00001.parquet")
    write_jsonl(str(root / "MSCOCO_t2i.jsonl"), RETRIEVAL)
    return root


def brute_force_hit_at_1(model, records, image_root) -> float:
    hits = 0
    for record in records:
        instruction = record.get("qry_inst", "").replace("<|image_1|>", "").strip() or None
        text = record["qry_text"].replace("<|image_1|>", "").strip() or None
        image = str(image_root / record["qry_img_path"]) if record["qry_img_path"] else None
        query = model.encode([{"text": text, "image": image}], instruction=instruction, is_query=True)[0]
        candidates = model.encode([{"text": t.replace("<|image_1|>", "").strip() or None,
                                    "image": str(image_root / p) if p else None}
                                   for t, p in zip(record["tgt_text"], record["tgt_img_path"])])
        hits += int(torch.argmax(candidates @ query)) == 0
    return 100.0 * hits / len(records)


def test_mmeb_hit_at_1_equals_brute_force_encoding(model, mmeb_root):
    results = evaluate_mmeb(model, mmeb_root, show_progress_bar=False)

    assert [(row["task"], row["category"], row["num_queries"], row["pool_size"]) for row in results] == [
        ("ImageNet-1K", "classification", 5, 5), ("MSCOCO_t2i", "retrieval", 5, 3)]
    for row, records in zip(results, (CLASSIFICATION, RETRIEVAL)):
        assert row["hit@1"] == pytest.approx(brute_force_hit_at_1(model, records, mmeb_root / "images"), abs=1e-9)
        assert row["hit@1"] <= row["hit@5"] == 100.0  # every list is at most 5 long


def test_identical_candidates_are_encoded_once_and_ties_go_to_the_target(mmeb_root):
    task = load_mmeb_task(mmeb_root / "MSCOCO_t2i.jsonl")
    assert len(task.candidates) == 5 and task.candidate_lists[0] == [0, 1, 2]
    assert task.candidates[0] == {"text": "Represent the given image.", "image": "images/red.png"}
    assert task.query_instructions == [None] * 5  # MMEB-V1: the instruction is part of qry_text
    # every candidate scores the same: the target counts as found (numpy's argmax picks the first)
    row = score_mmeb(task, torch.ones(5, 4), torch.ones(5, 4))
    assert row["hit@1"] == row["mrr"] == 100.0
    # the target strictly below one candidate: rank 2
    candidates = torch.tensor([[0.5, 0, 0, 0], [1.0, 0, 0, 0]] + [[0.0] * 4] * 3)
    row = score_mmeb(task, torch.eye(5, 4)[:1].repeat(5, 1), candidates)
    assert row["hit@1"] < 100.0 and row["hit@5"] == 100.0


def test_mmeb_records_with_mismatched_candidate_lists_are_named(tmp_path):
    write_jsonl(str(tmp_path / "VOC2007.jsonl"), [
        {"qry_text": "a", "qry_img_path": "", "tgt_text": ["x", "y"], "tgt_img_path": [""]},
        {"qry_text": "", "qry_img_path": "", "tgt_text": ["x"], "tgt_img_path": [""]}])
    with pytest.raises(ValueError, match=r"VOC2007 .*record 0 \(2 texts, 1 images\).*query of record 1"):
        load_mmeb_task(tmp_path / "VOC2007.jsonl")


def test_mmeb_cli_writes_the_table_with_meta_task_averages(puma_checkpoint, mmeb_root, tmp_path, capsys):
    out = tmp_path / "out"
    main(["mmeb", "--model", puma_checkpoint, "--mmeb-root", str(mmeb_root), "--out", str(out)])
    table = capsys.readouterr().out
    assert table.splitlines()[0] == "| task | metric | score | hit@1 | hit@5 | MRR | nDCG@5 | queries | candidates |"
    for label in ("| ImageNet-1K | hit@1 |", "| classification (1 tasks) | mean |", "| retrieval (1 tasks) | mean |",
                  "| average (2 tasks) | mean |"):
        assert label in table
    saved = json.loads((out / "results_mmeb.json").read_text())
    assert [row["task"] for row in saved["tasks"]][:2] == ["ImageNet-1K", "MSCOCO_t2i"]
    assert saved["average"]["score"] == pytest.approx(sum(row["score"] for row in saved["tasks"][:2]) / 2)
    assert (out / "plots" / "mmeb_ImageNet-1K.png").is_file()


# ---------------------------------------------------------------------------------------------------------------
# MMEB-V2: video and visual-document tasks in the released layout
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mmeb_v2_root(tmp_path_factory):
    pytest.importorskip("pypdfium2", reason="the document pages are rendered from PDFs with pypdfium2")
    from mmeb_v2_layout import write_mmeb_v2_tree

    return write_mmeb_v2_tree(tmp_path_factory.mktemp("MMEB-V2"))


@pytest.fixture(scope="module")
def small_video_checkpoint(puma_checkpoint, tmp_path_factory):
    """The tiny PUMA checkpoint with videos of a few merged patches per frame."""
    from modeling_puma import PumaForEmbedding

    folder = str(tmp_path_factory.mktemp("small-video") / "tiny-puma")
    PumaForEmbedding.from_pretrained(puma_checkpoint, video_min_pixels=4 * 28 * 28, video_max_pixels=8 * 28 * 28,
                                     video_total_pixels=32 * 28 * 28).save_pretrained(folder)
    return folder


V2_EXPECTED = {  # task: (modality, meta-task, queries, distinct candidates, ranked against all)
    "ImageNet-1K": ("image", "classification", 3, 3, False), "UCF101": ("video", "video classification", 4, 3, True),
    "SmthSmthV2": ("video", "video classification", 2, 5, False), "MSR-VTT": ("video", "video retrieval", 3, 3, True),
    "QVHighlight": ("video", "moment retrieval", 2, 6, False),
    "MomentSeeker": ("video", "moment retrieval", 3, 8, False),
    "Video-MME": ("video", "video QA", 1, 4, False), "NExTQA": ("video", "video QA", 1, 5, False),
    "EgoSchema": ("video", "video QA", 1, 5, False), "MVBench": ("video", "video QA", 1, 3, False),
    "ActivityNetQA": ("video", "video QA", 2, 2, False), "ViDoRe_arxivqa": ("visdoc", "ViDoRe v1", 3, 5, True),
    "VisRAG_ArxivQA": ("visdoc", "VisRAG", 2, 3, True),
}


def test_mmeb_v2_layout_is_read_as_the_harness_builds_each_task(mmeb_v2_root):
    from puma_eval.mmeb import find_mmeb_tasks, load_any_task
    from puma_eval.mmeb_v2 import load_frames

    root = mmeb_v2_root["root"]
    found = find_mmeb_tasks(root)
    assert sorted(found) == sorted(V2_EXPECTED)
    tasks = {name: load_any_task(found[name], name, root, os.path.join(root, "image-tasks")) for name in found}
    for name, (modality, category, queries, candidates, is_global) in V2_EXPECTED.items():
        task = tasks[name]
        assert (task.modality, task.category, len(task.query_items), len(task.candidates)) == \
            (modality, category, queries, candidates), name
        assert all(listed is None for listed in task.candidate_lists) == is_global, name
    # frames in natural order (frame_2 before frame_10), all of them: the model thins them
    frames = tasks["UCF101"].query_items[0]["video"]
    assert [os.path.basename(path) for path in frames] == [f"frame_{i}.jpg" for i in range(1, 13)]
    assert frames == load_frames(os.path.dirname(frames[0]))
    # each QA format as Qwen3-VL-Embedding's harness writes it
    assert tasks["Video-MME"].query_items[0]["text"] == \
        "Which way does the shape move?\nA. Left.\nB. Right.\nC. Up.\nD. Down."
    assert [c["text"] for c in tasks["Video-MME"].candidates] == ["Left", "Right", "Up", "Down"]
    assert tasks["Video-MME"].relevance == [{1: 1.0}]
    assert tasks["NExTQA"].query_items[0]["text"].endswith(
        "Options:\n(A) red\n(B) green\n(C) blue\n(D) yellow\n(E) black")
    assert tasks["NExTQA"].candidates[2] == {"text": "(C) blue"} and tasks["NExTQA"].relevance == [{2: 1.0}]
    assert tasks["ActivityNetQA"].query_items[1]["text"] == "is the shape red? (A) yes; (B) no."
    assert tasks["ActivityNetQA"].relevance[1] == {1: 1.0}
    # moment retrieval: the query's own frames and text, its video's clips; MomentSeeker's three query kinds
    assert set(tasks["QVHighlight"].query_items[0]) == {"text", "video"}
    assert tasks["QVHighlight"].relevance[0] == {2: 1.0}  # negative_1, negative_2, positive_1
    assert [sorted(item) for item in tasks["MomentSeeker"].query_items] == [["text"], ["text", "video"],
                                                                           ["image", "text"]]
    assert len(tasks["MomentSeeker"].relevance[2]) == 2
    # documents: graded qrels (the highest of repeated pairs, score 0 left out); pages from files or the corpus
    vidore = tasks["ViDoRe_arxivqa"]
    assert vidore.relevance == [{0: 1.0, 3: 2.0}, {1: 3.0}, {4: 1.0}] and vidore.metric == "ndcg_linear@5"
    assert vidore.candidates[0]["image"].endswith(os.path.join("visdoc-tasks", "ViDoRe_arxivqa", "p0.png"))
    assert hasattr(tasks["VisRAG_ArxivQA"].candidates[0]["image"], "size")  # the corpus's own image


def test_ndcg_at_5_is_linear_gain_over_the_ideal_order():
    from puma_eval.mmeb import MMEBTask, score_mmeb

    # 6 candidates, graded 0, 2, 0, 1, 0, 3; the query ranks them 5, 3, 1, 4, 0, 2 (candidate 2 falls out of the top 5)
    task = MMEBTask("t", "ViDoRe v1", [{"text": "q"}], [None], [{"text": str(i)} for i in range(6)], [None],
                    relevance=[{1: 2.0, 3: 1.0, 5: 3.0}], modality="visdoc", metric="ndcg_linear@5")
    candidates = torch.tensor([[0.1], [0.4], [0.0], [0.5], [0.2], [0.9]])
    row = score_mmeb(task, torch.ones(1, 1), candidates)
    dcg = 3 / math.log2(2) + 1 / math.log2(3) + 2 / math.log2(4)
    ideal = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert row["ndcg_linear@5"] == pytest.approx(100 * dcg / ideal, rel=1e-12)
    assert row["score"] == row["ndcg_linear@5"] and row["hit@1"] == 100.0


def brute_force_v2(model, task) -> tuple[float, float]:
    """hit@1 and nDCG@5 of a task from `model.encode` directly: every query (with its instruction) against its
    candidates, sorted by score."""
    candidates = model.encode(task.candidates)
    hits, ndcg = 0.0, 0.0
    for item, instruction, listed, relevant in zip(task.query_items, task.query_instructions, task.candidate_lists,
                                                   task.relevance or [None] * len(task.query_items)):
        listed = list(range(len(task.candidates))) if listed is None else listed
        relevant = relevant or {listed[0]: 1.0}
        scores = (candidates[listed] @ model.encode([item], instruction=instruction, is_query=True)[0]).tolist()
        ranked = [listed[j] for j in sorted(range(len(listed)), key=lambda j: -scores[j])]
        hits += ranked[0] in relevant
        gains = [relevant.get(c, 0.0) / math.log2(rank + 2) for rank, c in enumerate(ranked[:5])]
        ideal = [g / math.log2(rank + 2) for rank, g in enumerate(sorted(relevant.values(), reverse=True)[:5])]
        ndcg += sum(gains) / sum(ideal)
    return 100 * hits / len(task.query_items), 100 * ndcg / len(task.query_items)


def test_mmeb_v2_scores_equal_brute_force_encoding(small_video_checkpoint, mmeb_v2_root):
    from modeling_puma import PumaForEmbedding
    from puma_eval.mmeb import find_mmeb_tasks, load_any_task

    model = PumaForEmbedding.from_pretrained(small_video_checkpoint)
    root = mmeb_v2_root["root"]
    tasks = ["MSR-VTT", "MomentSeeker", "Video-MME", "ViDoRe_arxivqa", "SmthSmthV2"]
    results = {row["task"]: row for row in evaluate_mmeb(model, root, tasks=tasks, show_progress_bar=False)}
    found = find_mmeb_tasks(root)
    for name in tasks:
        hit1, ndcg = brute_force_v2(model, load_any_task(found[name], name, root))
        assert results[name]["hit@1"] == pytest.approx(hit1, abs=1e-9), name
        assert results[name]["ndcg_linear@5"] == pytest.approx(ndcg, abs=1e-6), name
        assert results[name]["score"] == results[name]["ndcg_linear@5" if name == "ViDoRe_arxivqa" else "hit@1"]


def test_mmeb_v2_cli_prints_meta_task_modality_overall_and_leaderboard_tables(small_video_checkpoint, mmeb_v2_root,
                                                                               tmp_path, capsys):
    root = mmeb_v2_root["root"]
    out = tmp_path / "out"
    main(["mmeb", "--model", small_video_checkpoint, "--mmeb-root", root, "--out", str(out), "--num-frames", "4"])
    printed = capsys.readouterr().out
    saved = json.loads((out / "results_mmeb.json").read_text())
    rows = {row["task"]: row for row in saved["tasks"]}
    tasks = [rows[name] for name in V2_EXPECTED]
    assert saved["average"]["score"] == pytest.approx(sum(row["score"] for row in tasks) / len(tasks))
    for label in ("| video QA (5 tasks) | mean |", "| moment retrieval (2 tasks) | mean |",
                  "| VisRAG (1 tasks) | mean |", "| image (1 tasks) | mean |", "| video (10 tasks) | mean |",
                  "| visdoc (2 tasks) | mean |",
                  f"| average ({len(V2_EXPECTED)} tasks) | mean |", "| ViDoRe_arxivqa | ndcg_linear@5 |"):
        assert label in printed, label
    # a modality's average is over its tasks (MMEB-V2's leaderboard), not over its meta-task averages
    video = [row["score"] for row in tasks if row["modality"] == "video"]
    assert rows["average_video"]["score"] == pytest.approx(sum(video) / len(video))
    board = [line for line in printed.splitlines() if line.startswith("| model |")][0]
    assert board == "| model | Overall | Image | I-CLS | Video | V-CLS | V-QA | V-RET | V-MRET | VisDoc | VDRv1 | VR |"
    values = [line for line in printed.splitlines() if line.startswith("| this model |")][0].split(" | ")
    assert float(values[1]) == pytest.approx(saved["average"]["score"], abs=0.05)
    assert float(values[4]) == pytest.approx(rows["average_video"]["score"], abs=0.05)
    assert "| model | Overall |" in (out / "results_mmeb.md").read_text()


def test_mmeb_v2_tasks_without_frames_or_annotations_are_named(mmeb_v2_root, tmp_path, puma_checkpoint):
    import shutil

    from cli_puma import UsageError
    from puma_eval.mmeb_v2 import V2_TASKS, load_v2_task

    copy = tmp_path / "copy"
    shutil.copytree(mmeb_v2_root["root"], copy)
    shutil.rmtree(copy / "video-tasks" / "frames" / "video_ret" / "MSR-VTT" / "video1")
    with pytest.raises(ValueError, match=r"MSR-VTT: 1 videos without frames under .*MSR-VTT, e\.g\. \['video1'\]"):
        load_v2_task(V2_TASKS["MSR-VTT"], copy, copy / "annotations")
    with pytest.raises(UsageError, match=r"--tasks: MMEB-V2 task VATEX \(it lacks its annotations .*VLM2Vec/VATEX "
                                         r"\(huggingface-cli download VLM2Vec/VATEX"):
        main(["mmeb", "--model", puma_checkpoint, "--mmeb-root", str(copy), "--tasks", "VATEX"])

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Tests of `puma_eval.mmeb` on tiny MMEB-format task files (VLM2Vec's fields, parquet and JSONL) written here: hit@1
equals a brute-force computation with `model.encode`, the CLI writes the table, bad records are named."""

import json

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
        assert row["precision@1"] == pytest.approx(brute_force_hit_at_1(model, records, mmeb_root / "images"),
                                                   abs=1e-9)
        assert row["precision@1"] <= row["hit@5"] == 100.0  # every list is at most 5 long


def test_identical_candidates_are_encoded_once_and_ties_go_to_the_target(mmeb_root):
    task = load_mmeb_task(mmeb_root / "MSCOCO_t2i.jsonl")
    assert len(task.candidates) == 5 and task.candidate_lists[0] == [0, 1, 2]
    assert task.candidates[0] == {"text": "Represent the given image.", "image": "images/red.png"}
    assert task.query_instructions == [None] * 5  # MMEB-V1: the instruction is part of qry_text
    # every candidate scores the same: the target counts as found (numpy's argmax picks the first)
    row = score_mmeb(task, torch.ones(5, 4), torch.ones(5, 4))
    assert row["precision@1"] == row["mrr"] == 100.0
    # the target strictly below one candidate: rank 2
    candidates = torch.tensor([[0.5, 0, 0, 0], [1.0, 0, 0, 0]] + [[0.0] * 4] * 3)
    row = score_mmeb(task, torch.eye(5, 4)[:1].repeat(5, 1), candidates)
    assert row["precision@1"] < 100.0 and row["hit@5"] == 100.0


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
    assert table.splitlines()[0] == "| task | metric | score | P@1 | hit@5 | MRR | queries | candidates |"
    for label in ("| ImageNet-1K | P@1 |", "| classification (1 tasks) | mean |", "| retrieval (1 tasks) | mean |",
                  "| average (2 tasks) | mean |"):
        assert label in table
    saved = json.loads((out / "results_mmeb.json").read_text())
    assert [row["task"] for row in saved["tasks"]][:2] == ["ImageNet-1K", "MSCOCO_t2i"]
    assert saved["average"]["score"] == pytest.approx(sum(row["score"] for row in saved["tasks"][:2]) / 2)
    assert (out / "plots" / "mmeb_ImageNet-1K.png").is_file()

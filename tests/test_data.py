# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Tests of `data_puma` (M-BEIR, NLI and column datasets, the collator) and of the demo benchmark generator, on
small hand-written files and the tiny offline model."""

import copy
import filecmp
import json
import logging
import os
import zlib

import pytest
import torch
from PIL import Image

import losses_puma
from data_puma import ColumnPairDataset, MBEIRTrainDataset, NLIDataset, PumaCollator
from mbeir_puma import (
    MODALITY_IDS,
    load_mbeir_pool,
    load_mbeir_queries,
    load_query_instructions,
    markdown_table,
    mbeir_eval_queries,
    modality_id,
    read_jsonl,
)
from demo_data_puma import TASKS, make_demo_benchmark
from modeling_puma import PumaForEmbedding


# ---------------------------------------------------------------- hand-written M-BEIR files

POOL = [
    {"did": "1:0", "txt": "a red circle", "img_path": None, "modality": "text"},
    {"did": "1:1", "txt": None, "img_path": "images/red.png", "modality": "image"},
    {"did": "1:2", "txt": "blue square", "img_path": "images/blue.png", "modality": "image,text"},
    {"did": "1:3", "txt": "a green star", "img_path": "", "modality": "text"},
    {"did": "1:4", "txt": "", "img_path": "images/green.png", "modality": "image"},
    {"did": "2:0", "txt": "a star", "img_path": None, "modality": "text"},
]
QUERIES = [
    {"qid": "1:0", "query_txt": "something red", "query_img_path": None, "query_modality": "text",
     "pos_cand_list": ["1:1", "1:0"], "neg_cand_list": ["1:3", "1:4"], "task_id": 0},
    {"qid": "1:1", "query_txt": None, "query_img_path": "images/blue.png", "query_modality": "image",
     "pos_cand_list": ["1:2"], "neg_cand_list": ["1:4"], "task_id": 5},
    {"qid": "2:0", "query_txt": "what is this shape", "query_img_path": "images/green.png",
     "query_modality": "image,text", "pos_cand_list": ["2:0"], "neg_cand_list": ["1:0", "1:3", "1:4"], "task_id": 6},
]
INSTRUCTIONS = [
    ("text", "image", "One", "1", ["Find the image.", "Retrieve a picture.", "Show me the drawing."]),
    ("text", "text", "One", "1", ["Find the sentence."]),
    ("image", "image,text", "One", "1", ["Find the entry."]),
    ("image,text", "text", "Two", "2", ["Answer it.", "", "Respond."]),
]
COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 160, 20)}


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_mbeir(root, queries=QUERIES, pool=POOL, instructions=INSTRUCTIONS):
    """Writes query, pool and instruction files plus the images under `root`; returns the three paths."""
    os.makedirs(root / "images", exist_ok=True)
    for name, colour in COLOURS.items():
        Image.new("RGB", (48, 40), colour).save(root / "images" / f"{name}.png")
    write_jsonl(root / "queries.jsonl", queries)
    write_jsonl(root / "pool.jsonl", pool)
    with open(root / "query_instructions.tsv", "w", encoding="utf-8") as f:
        f.write("query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2\tprompt_3\n")
        for query_modality, cand_modality, name, dataset_id, prompts in instructions:
            f.write("\t".join([query_modality, cand_modality, name, dataset_id, *prompts]) + "\n")
    return root / "queries.jsonl", root / "pool.jsonl", root / "query_instructions.tsv"


@pytest.fixture
def mbeir(tmp_path):
    return write_mbeir(tmp_path) + (tmp_path,)


@pytest.fixture(scope="module")
def puma(tiny_checkpoint):
    return PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)


# ---------------------------------------------------------------- modality labels and readers


def test_modality_ids_are_fixed_for_known_labels_and_crc32_based_for_others():
    assert MODALITY_IDS == {"text": 0, "image": 1, "image,text": 2, "video": 3, "text,video": 4}
    labels = ("text", "image", "image,text", "text,image", " Image , TEXT", "video", "video,text")
    assert [modality_id(label) for label in labels] == [0, 1, 2, 2, 2, 3, 4]
    # Not Python's salted hash: the same on every process, so labels gathered across ranks agree
    assert modality_id("audio") == 1000 + zlib.crc32(b"audio")
    assert modality_id("audio,text") == modality_id("text,audio") >= 1000
    # one vocabulary for the whole library: the losses consume these ids and define none of their own
    assert not hasattr(losses_puma, "modality_ids")
    with pytest.raises(ValueError, match="non-empty"):
        modality_id("")


def test_read_jsonl_names_file_and_line_of_invalid_json(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"qid": "1:0"}\n\n{"qid": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 3: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"qid": "1:0"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: expected a JSON object"):
        read_jsonl(path)


def test_markdown_table_formats_cells_aligns_columns_and_rejects_ragged_rows():
    table = markdown_table(["task", "R@5", "note"], [["WebQA", 81.25, None], ["a|b", 3, "x"]],
                           align=[None, "right", "center"])
    assert table.splitlines() == ["| task | R@5 | note |", "|---|---:|:---:|", "| WebQA | 81.2 |  |",
                                  "| a\\|b | 3 | x |"]  # floats by float_format, ints as written, pipes escaped
    assert markdown_table(["x"], [[0.5]], float_format=".1f").splitlines()[-1] == "| 0.5 |"
    with pytest.raises(ValueError, match=r"Row 1 of the table has 1 cells for 2 columns"):
        markdown_table(["a", "b"], [[1, 2], [3]])
    with pytest.raises(ValueError, match="align"):
        markdown_table(["a"], [], align=["middle"])


def test_mbeir_readers_normalise_absent_fields_and_key_the_pool_by_did(mbeir):
    query_file, pool_file, _, _ = mbeir
    queries = load_mbeir_queries(query_file)
    assert [q["qid"] for q in queries] == ["1:0", "1:1", "2:0"]
    assert queries[1]["query_txt"] is None and queries[1]["query_img_path"] == "images/blue.png"
    assert queries[2]["task_id"] == 6 and queries[0]["neg_cand_list"] == ["1:3", "1:4"]
    pool = load_mbeir_pool(pool_file)
    assert list(pool) == [c["did"] for c in POOL]
    assert pool["1:3"]["img_path"] is None and pool["1:4"]["txt"] is None
    assert pool["1:2"]["modality"] == "image,text"


def test_duplicate_did_raises_naming_the_ids(tmp_path):
    path = tmp_path / "pool.jsonl"
    write_jsonl(path, POOL + [dict(POOL[2]), dict(POOL[0], txt="another")])
    with pytest.raises(ValueError, match=r"2 duplicate candidate ids \(did\), e\.g\. \['1:0', '1:2'\]"):
        load_mbeir_pool(path)


def test_query_instructions_are_keyed_by_dataset_id_and_modalities_as_uniir_reads_them(mbeir):
    instructions = load_query_instructions(mbeir[2])
    assert instructions[("1", "text", "image")] == ["Find the image.", "Retrieve a picture.", "Show me the drawing."]
    assert instructions[("2", "image,text", "text")] == ["Answer it.", "Respond."]  # empty cells are ignored
    assert ("One", "text", "image") not in instructions  # the dataset name is not part of the key


# ---------------------------------------------------------------- M-BEIR training dataset


def test_train_draws_are_deterministic_per_epoch_and_vary_across_epochs(mbeir):
    query_file, pool_file, instructions_file, root = mbeir
    first = MBEIRTrainDataset(query_file, pool_file, instructions_file, root, num_hard_negatives=2, seed=3)
    second = MBEIRTrainDataset(query_file, pool_file, instructions_file, root, num_hard_negatives=2, seed=3)
    epochs = []
    for epoch in range(6):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        items = [first[i] for i in range(len(first))]
        assert items == [second[i] for i in range(len(second))]
        epochs.append(items)
    assert any(epochs[0] != items for items in epochs[1:])
    first.set_epoch(0)
    assert [first[i] for i in range(len(first))] == epochs[0]  # a resumed run sees the same examples
    other_seed = MBEIRTrainDataset(query_file, pool_file, instructions_file, root, num_hard_negatives=2, seed=4)
    other_epochs = []
    for epoch in range(6):
        other_seed.set_epoch(epoch)
        other_epochs.append([other_seed[i] for i in range(len(other_seed))])
    assert other_epochs != epochs


def test_target_modality_and_instruction_follow_the_drawn_positive(mbeir):
    query_file, pool_file, instructions_file, root = mbeir
    dataset = MBEIRTrainDataset(query_file, pool_file, instructions_file, root)
    pool, instructions = load_mbeir_pool(pool_file), load_query_instructions(instructions_file)
    drawn = set()
    for epoch in range(20):
        dataset.set_epoch(epoch)
        item = dataset[0]  # "1:0" has an image and a text positive
        drawn.add(item["positive_id"])
        assert item["modality"] == pool[item["positive_id"]]["modality"]
        prompts = instructions[("1", "text", item["modality"])]
        index = prompts.index(item["instruction"])
        # the id names the exact query input: its positives have two modalities, whose instruction lists differ
        assert item["query_id"] == f"1:0#{item['modality']}#i{index}"
    assert drawn == {"1:0", "1:1"}


def test_teacher_inputs_list_every_input_any_epoch_draws_once_under_its_id(mbeir):
    # Given the training set with hard negatives, read over many epochs
    query_file, pool_file, instructions_file, root = mbeir
    dataset = MBEIRTrainDataset(query_file, pool_file, instructions_file, root, num_hard_negatives=2)
    listed = {}
    for part, item_id, item, instruction in dataset.teacher_inputs():
        assert item_id not in listed, item_id  # one input per id
        listed[item_id] = (part, item, instruction)
    drawn = {}
    for epoch in range(30):
        dataset.set_epoch(epoch)
        for example in (dataset[i] for i in range(len(dataset))):
            drawn[example["query_id"]] = ("queries", example["query"], example["instruction"])
            drawn[example["positive_id"]] = ("candidates", example["positive"], None)
            drawn.update({did: ("candidates", negative, None)
                          for did, negative in zip(example["negative_ids"], example["negatives"])})
    # Then every drawn input is listed under its id, as drawn, and nothing is listed that no draw can reach
    assert all(listed[item_id] == value for item_id, value in drawn.items())
    assert set(listed) == set(drawn)


def test_examples_are_plain_dicts_with_paths_under_image_root_and_instructions_on_queries_only(mbeir):
    query_file, pool_file, instructions_file, root = mbeir
    item = MBEIRTrainDataset(query_file, pool_file, instructions_file, root, num_hard_negatives=1)[2]
    assert item["query"] == {"text": "what is this shape", "image": os.path.join(root, "images/green.png")}
    assert item["instruction"] in ("Answer it.", "Respond.")
    assert item["positive"] == {"text": "a star", "image": None} and item["modality"] == "text"
    assert len(item["negatives"]) == len(item["negative_ids"]) == len(item["negative_modalities"]) == 1
    assert set(item) == {"query", "instruction", "query_id", "positive", "positive_id", "modality", "negatives",
                         "negative_ids", "negative_modalities"}


def test_hard_negatives_come_from_neg_cand_list_repeating_only_when_short(mbeir):
    query_file, pool_file, instructions_file, root = mbeir
    dataset = MBEIRTrainDataset(query_file, pool_file, instructions_file, root, num_hard_negatives=3)
    for epoch in range(5):
        dataset.set_epoch(epoch)
        three = dataset[2]["negative_ids"]  # "2:0" lists exactly three
        assert sorted(three) == ["1:0", "1:3", "1:4"]
        two = dataset[0]["negative_ids"]  # "1:0" lists two: both, then one repeated
        assert len(two) == 3 and set(two) == {"1:3", "1:4"}
        assert dataset[0]["negative_modalities"] == ["text" if d == "1:3" else "image" for d in two]


def test_invalid_references_are_counted_and_logged_not_fatal(tmp_path, caplog):
    queries = QUERIES + [
        {"qid": "1:5", "query_txt": "gone", "query_modality": "text", "pos_cand_list": ["9:9"], "neg_cand_list": []},
        {"qid": "1:6", "query_txt": "none", "query_modality": "text", "pos_cand_list": [], "neg_cand_list": []},
        {"qid": "3:0", "query_txt": "no instruction", "query_modality": "text", "pos_cand_list": ["1:0"]},
        {"qid": "1:7", "query_img_path": "images/missing.png", "query_modality": "image", "pos_cand_list": ["1:2"]},
        {"qid": "1:8", "query_txt": "partly fine", "query_modality": "text", "pos_cand_list": ["8:8", "1:0"]},
    ]
    paths = write_mbeir(tmp_path, queries)
    with caplog.at_level(logging.WARNING, logger="data_puma"):
        dataset = MBEIRTrainDataset(*paths, tmp_path)
    assert [example[0] for example in dataset.examples] == ["1:0", "1:1", "2:0", "1:8"]
    message = caplog.text
    assert "kept 4 of 8 queries" in message
    assert "1 queries whose image file is missing (e.g. 1:7)" in message
    assert "3 queries without a usable positive (e.g. 1:5, 1:6, 3:0)" in message
    assert "2 positive ids absent from the pool (e.g. 9:9, 8:8)" in message
    assert "no instruction for (dataset id, query modality, candidate modality)" in message
    dataset.set_epoch(1)
    assert dataset[3]["positive_id"] == "1:0"  # the absent positive was dropped, the query kept


def test_queries_without_a_hard_negative_are_skipped_only_when_negatives_are_asked_for(tmp_path, caplog):
    queries = [dict(QUERIES[0], neg_cand_list=["7:7"]), QUERIES[2]]
    paths = write_mbeir(tmp_path, queries)
    assert len(MBEIRTrainDataset(*paths, tmp_path)) == 2
    with caplog.at_level(logging.WARNING, logger="data_puma"):
        dataset = MBEIRTrainDataset(*paths, tmp_path, num_hard_negatives=1)
    assert len(dataset) == 1
    assert "1 queries without a usable hard negative (e.g. 1:0)" in caplog.text
    assert "1 negative ids absent from the pool (e.g. 7:7)" in caplog.text


def test_every_query_skipped_raises_a_clear_error(tmp_path):
    paths = write_mbeir(tmp_path, instructions=[("video", "text", "X", "9", ["Nothing matches."])])
    with pytest.raises(ValueError, match="every one of its 3 queries was skipped"):
        MBEIRTrainDataset(*paths, tmp_path)


def test_eval_queries_get_one_fixed_instruction_per_qid(mbeir, caplog):
    query_file, pool_file, instructions_file, _ = mbeir
    queries, pool = load_mbeir_queries(query_file), load_mbeir_pool(pool_file)
    instructions = load_query_instructions(instructions_file)
    first = mbeir_eval_queries(queries, pool, instructions, seed=0)
    assert first == mbeir_eval_queries(queries, pool, instructions, seed=0)
    assert first[1:] == mbeir_eval_queries(queries[1:], pool, instructions, seed=0)  # per qid, not per position
    assert [item["query_id"] for item in first] == ["1:0", "1:1", "2:0"]
    assert first[0]["modality"] == "image" and first[0]["instruction"] in instructions[("1", "text", "image")]
    assert first[1]["query"] == {"text": None, "image": "images/blue.png"} and first[1]["task_id"] == 5
    with caplog.at_level(logging.WARNING, logger="data_puma"):
        unmatched = mbeir_eval_queries(queries, {}, instructions)
    assert all(item["instruction"] is None for item in unmatched)
    assert "3 queries with no positive in the pool" in caplog.text


# ---------------------------------------------------------------- NLI and column datasets


def test_nli_rows_become_text_triplets_with_row_ids_and_empty_rows_are_skipped(tmp_path, caplog):
    path = tmp_path / "nli_for_simcse.csv"
    path.write_text('sent0,sent1,hard_neg\nA man plays.,"Someone, playing.",Nobody plays.\n'
                    "Empty positive.,,Something.\nNo negative.,Without one.,\nTwo dogs run.,Dogs run.,Cats sleep.\n",
                    encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="data_puma"):
        dataset = NLIDataset(path)
    assert len(dataset) == 2 and "2 rows with an empty field (e.g. row 1, row 2)" in caplog.text
    assert dataset[0] == {
        "query": {"text": "A man plays.", "image": None}, "instruction": None, "query_id": "nli:0",
        "positive": {"text": "Someone, playing.", "image": None}, "positive_id": "nli:0:sent1", "modality": "text",
        "negatives": [{"text": "Nobody plays.", "image": None}], "negative_ids": ["nli:0:hard_neg"],
        "negative_modalities": ["text"]}
    assert dataset[1]["query_id"] == "nli:3"
    pairs = NLIDataset(path, use_hard_negatives=False)
    assert len(pairs) == 3 and pairs[1]["negatives"] == [] and pairs[1]["query_id"] == "nli:2"
    (tmp_path / "bad.csv").write_text("premise,hypothesis\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lacks the columns \['sent0', 'sent1', 'hard_neg'\]"):
        NLIDataset(tmp_path / "bad.csv")


def _caption_rows(tmp_path):
    for name, colour in COLOURS.items():
        Image.new("RGB", (30, 30), colour).save(tmp_path / f"{name}.png")
    return {"caption": ["a red image", "a blue image", ""], "file": ["red.png", "blue.png", "green.png"],
            "title": ["red", "", "green"], "negative": [["blue", "green"], ["red", "green"], ["red", "blue"]],
            "key": ["r", "b", "g"]}


def test_column_pair_dataset_maps_columns_and_derives_the_target_modality(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _caption_rows(tmp_path)
    dataset = ColumnPairDataset(datasets.Dataset.from_dict(rows), query_text="caption", positive_text="title",
                                positive_image="file", negative_text="negative", id_column="key", image_root=tmp_path)
    assert len(dataset) == 3
    first = dataset[0]
    assert first["query"] == {"text": "a red image", "image": None} and first["query_id"] == "r"
    assert first["positive"] == {"text": "red", "image": os.path.join(tmp_path, "red.png")}
    assert first["modality"] == "image,text" and dataset[1]["modality"] == "image"
    assert first["negative_ids"] == ["r:neg0", "r:neg1"] and first["negative_modalities"] == ["text", "text"]
    assert dataset[2]["query"] == {"text": None, "image": None}  # left to the collator to count and skip
    labelled = ColumnPairDataset(datasets.Dataset.from_dict(dict(rows, kind=["text", "text", "text"])),
                                 query_text="caption", positive_text="title", modality_column="kind")
    assert labelled[0]["modality"] == "text" and labelled[0]["query_id"] == "0"


def test_column_pair_dataset_names_missing_and_required_columns():
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"q": ["x"], "p": ["y"]})
    missing = r"\{'positive_image': 'img'\} are not in the dataset, whose columns are \['q', 'p'\]"
    with pytest.raises(ValueError, match=missing):
        ColumnPairDataset(data, query_text="q", positive_image="img")
    with pytest.raises(ValueError, match="query_text and/or query_image"):
        ColumnPairDataset(data, positive_text="p")
    with pytest.raises(ValueError, match="positive_text and/or positive_image"):
        ColumnPairDataset(data, query_text="q")


def test_streaming_column_pair_dataset_is_a_torch_iterable_with_the_same_examples(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _caption_rows(tmp_path)
    kwargs = dict(query_text="caption", positive_text="title", positive_image="file", image_root=tmp_path)
    streaming = ColumnPairDataset(datasets.Dataset.from_dict(rows).to_iterable_dataset(), **kwargs)
    assert isinstance(streaming, torch.utils.data.IterableDataset)
    mapped = ColumnPairDataset(datasets.Dataset.from_dict(rows), **kwargs)
    assert list(streaming) == [mapped[i] for i in range(len(mapped))]
    with pytest.raises(TypeError):
        len(streaming)
    sharded = ColumnPairDataset(datasets.Dataset.from_dict(rows).to_iterable_dataset(num_shards=3), **kwargs)
    loader = torch.utils.data.DataLoader(sharded, batch_size=None, num_workers=2)
    ids = [example["query_id"] for example in loader]
    assert len(ids) == len(set(ids)) == 3  # each worker numbers its own rows: positional ids name the worker
    undeclared = datasets.IterableDataset.from_generator(lambda: iter([{"caption": "x", "other": "y"}]))
    with pytest.raises(ValueError, match="are not in the dataset"):
        list(ColumnPairDataset(undeclared, **kwargs))


# ---------------------------------------------------------------- collator


def _rows_with_token_once(features, token_id):
    return ((features["input_ids"] == token_id) & features["attention_mask"].bool()).sum(dim=1).tolist()


def test_collator_batch_holds_every_side_with_the_embedding_token_once_per_row(puma, mbeir):
    query_file, pool_file, instructions_file, root = mbeir
    dataset = MBEIRTrainDataset(query_file, pool_file, instructions_file, root, num_hard_negatives=2)
    examples = [dataset[i] for i in range(len(dataset))]
    batch = PumaCollator(puma.processor, puma.config)(examples)
    token_id = puma.config.embedding_token_id
    for side, rows in (("query", 3), ("candidate", 3), ("negative", 6)):
        assert _rows_with_token_once(batch[side], token_id) == [1] * rows
    assert batch["modality"].dtype == torch.long
    assert batch["modality"].tolist() == [MODALITY_IDS[e["modality"]] for e in examples]
    assert batch["negative_modality"].tolist() == [MODALITY_IDS[m] for e in examples for m in e["negative_modalities"]]
    assert batch["query_ids"] == [e["query_id"] for e in examples]
    assert batch["candidate_ids"] == [e["positive_id"] for e in examples]
    assert batch["negative_ids"] == [d for e in examples for d in e["negative_ids"]]  # query-major, B * n
    with torch.no_grad():  # the model accepts every side as it is
        assert puma(**batch["negative"]).embeddings.shape[0] == 6


def test_collator_query_rows_equal_the_models_own_prompts_and_candidates_get_no_instruction(puma, images):
    examples = [{"query": {"text": "a red circle", "image": images[0]}, "instruction": "Find the image.",
                 "query_id": "q", "positive": {"text": "a red circle", "image": None}, "positive_id": "p",
                 "modality": "text", "negatives": [], "negative_ids": [], "negative_modalities": []}]
    batch = PumaCollator(puma.processor, puma.config)(examples)
    from modeling_puma import featurize

    expected_query = featurize(puma.processor, puma.config,
                               [puma.build_prompt("a red circle", True, "Find the image.")], [images[0]])
    expected_candidate = featurize(puma.processor, puma.config, [puma.build_prompt("a red circle", False)], [None])
    assert torch.equal(batch["query"]["input_ids"], expected_query["input_ids"])
    assert torch.equal(batch["query"]["pixel_values"], expected_query["pixel_values"])
    assert torch.equal(batch["candidate"]["input_ids"], expected_candidate["input_ids"])
    assert "negative" not in batch and batch["negative_modality"].shape == (0,) and batch["negative_ids"] == []
    # the same features for one side, as evaluation encodes queries and pools
    features = PumaCollator(puma.processor, puma.config).featurize_inputs([examples[0]["query"]], ["Find the image."])
    assert torch.equal(features["input_ids"], expected_query["input_ids"])


def test_collator_pixel_tensors_are_present_exactly_when_a_side_has_images(puma, tmp_path):
    nli = tmp_path / "nli.csv"
    nli.write_text("sent0,sent1,hard_neg\nA dog runs.,A dog is running.,A cat sleeps.\nIt rains.,Rain falls.,Sun.\n",
                   encoding="utf-8")
    collator = PumaCollator(puma.processor, puma.config)
    text_batch = collator([NLIDataset(nli)[i] for i in range(2)])
    for side in ("query", "candidate", "negative"):
        assert "pixel_values" not in text_batch[side] and "image_grid_thw" not in text_batch[side]
    assert text_batch["modality"].tolist() == [0, 0]
    paths = write_mbeir(tmp_path)
    dataset = MBEIRTrainDataset(*paths, tmp_path)
    batch = collator([dataset[1], dataset[2]])  # queries: image, image+text; positives: image+text, text
    assert batch["query"]["image_grid_thw"].shape[0] == 2
    assert batch["candidate"]["image_grid_thw"].shape[0] == 1
    assert batch["modality"].tolist() == [MODALITY_IDS["image,text"], MODALITY_IDS["text"]]


def test_collator_truncates_long_text_but_keeps_the_embedding_token(puma):
    config = copy.deepcopy(puma.config)
    config.max_text_tokens = 8
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
    example = {"query": {"text": long_text, "image": None}, "instruction": "Retrieve a passage.", "query_id": "q",
               "positive": {"text": long_text, "image": None}, "positive_id": "p", "modality": "text",
               "negatives": [], "negative_ids": [], "negative_modalities": []}
    short = PumaCollator(puma.processor, config)([example])
    full = PumaCollator(puma.processor, puma.config)([example])
    for side in ("query", "candidate"):
        assert short[side]["input_ids"].shape[1] < full[side]["input_ids"].shape[1]
        assert _rows_with_token_once(short[side], config.embedding_token_id) == [1]
        text = puma.processor.tokenizer.decode(short[side]["input_ids"][0])
        assert text.rstrip().endswith(f"{config.embedding_token}.<|im_end|>")


def test_collator_skips_unreadable_examples_with_a_count_and_raises_on_an_empty_batch(puma, tmp_path, caplog):
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    good = {"query": {"text": "a query", "image": None}, "instruction": None, "query_id": "good",
            "positive": {"text": "a text", "image": None}, "positive_id": "p0", "modality": "text",
            "negatives": [], "negative_ids": [], "negative_modalities": []}
    corrupt = dict(good, query_id="corrupt", positive={"text": None, "image": "corrupt.png"}, modality="image")
    absent = dict(good, query_id="absent", query={"text": None, "image": "absent.png"})
    empty = dict(good, query_id="empty", query={"text": " ", "image": None})
    collator = PumaCollator(puma.processor, puma.config, image_root=tmp_path)
    with caplog.at_level(logging.WARNING, logger="data_puma"):
        batch = collator([corrupt, good, absent, empty])
    assert batch["query_ids"] == ["good"] and batch["query"]["input_ids"].shape[0] == 1
    assert collator.num_skipped == 3
    assert "Skipped example 'corrupt'" in caplog.text and "Skipped example 'absent'" in caplog.text
    assert "3 skipped by this collator so far" in caplog.text
    with pytest.raises(ValueError, match="Every one of the 2 examples of this batch was skipped"):
        collator([corrupt, absent])
    with pytest.raises(ValueError, match="negatives, negative_ids and negative_modalities differ"):
        collator([dict(good, negatives=[{"text": "x", "image": None}])])  # a malformed example is a bug: no skip


def test_collator_reads_undecoded_image_feature_dicts(puma, images):
    import io

    buffer = io.BytesIO()
    images[1].save(buffer, format="PNG")
    example = {"query": {"text": None, "image": {"bytes": buffer.getvalue(), "path": None}}, "instruction": None,
               "query_id": "q", "positive": {"text": "a green ellipse", "image": None}, "positive_id": "p",
               "modality": "text", "negatives": [], "negative_ids": [], "negative_modalities": []}
    batch = PumaCollator(puma.processor, puma.config)([example])
    expected = PumaCollator(puma.processor, puma.config).featurize_inputs([{"text": None, "image": images[1]}])
    assert torch.equal(batch["query"]["pixel_values"], expected["pixel_values"])


def test_collator_refuses_a_processor_without_the_models_embedding_token(puma, tiny_checkpoint):
    from transformers import AutoProcessor

    with pytest.raises(ValueError, match="pass the model's own processor and config"):
        PumaCollator(AutoProcessor.from_pretrained(tiny_checkpoint), puma.config)


# ---------------------------------------------------------------- demo benchmark


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_demo_benchmark_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path):
    sizes = dict(num_train=30, num_test=4, num_nli=20, image_size=64)
    make_demo_benchmark(tmp_path / "a", seed=1, **sizes)
    make_demo_benchmark(tmp_path / "b", seed=1, **sizes)
    make_demo_benchmark(tmp_path / "c", seed=2, **sizes)
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b")
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert mismatch == [] and errors == []
    assert (tmp_path / "a" / "query/train/mbeir_demo_train.jsonl").read_bytes() != \
        (tmp_path / "c" / "query/train/mbeir_demo_train.jsonl").read_bytes()


def test_demo_benchmark_covers_every_task_and_loads_cleanly_into_training(tmp_path, puma, caplog):
    manifest = make_demo_benchmark(tmp_path, num_train=60, num_test=5, num_nli=16, image_size=64)
    assert [t["task_id"] for t in manifest["tasks"]] == [0, 1, 2, 3, 4, 7, 10]
    assert [t["dataset_id"] for t in manifest["tasks"]] == ["10", "11", "12", "13", "14", "15", "16"]
    with caplog.at_level(logging.WARNING, logger="data_puma"):
        train = MBEIRTrainDataset(tmp_path / manifest["train_file"], tmp_path / manifest["train_pool_file"],
                                  tmp_path / manifest["instructions_file"], tmp_path, num_hard_negatives=2)
    assert caplog.text == "" and len(train) == 60  # nothing to skip
    queries = load_mbeir_queries(tmp_path / manifest["train_file"])
    assert sorted({q["task_id"] for q in queries}) == [0, 1, 2, 3, 4, 7, 10]
    assert {(q["query_modality"]) for q in queries} == {"text", "image", "image,text"}

    union = load_mbeir_pool(tmp_path / manifest["union_test_pool_file"])
    assert {c["modality"] for c in union.values()} == {"text", "image", "image,text", "video"}
    clip = next(c for c in union.values() if c["modality"] == "video")  # a folder of 4 frames
    assert sorted(os.listdir(tmp_path / clip["video_path"])) == [f"frame_{i}.png" for i in range(1, 5)]
    train_pool = load_mbeir_pool(tmp_path / manifest["train_pool_file"])
    for task, spec in zip(TASKS, manifest["tasks"]):
        test = load_mbeir_queries(tmp_path / spec["test_file"])
        local = load_mbeir_pool(tmp_path / spec["local_pool_file"])
        assert len(test) == 5 and all(q["task_id"] == task.task_id for q in test)
        assert {c["modality"] for c in local.values()} == {task.cand_modality}
        assert len(local) > len(test)  # positives plus distractors
        positives = {did for q in test for did in q["pos_cand_list"]}
        assert positives <= set(local) <= set(union) and not positives & set(train_pool)  # unseen in training
        qrels = (tmp_path / spec["qrels_file"]).read_text().split("\n")[:-1]
        assert qrels == [f"{q['qid']} 0 {q['pos_cand_list'][0]} 1 {task.task_id}" for q in test]
    assert len(NLIDataset(tmp_path / manifest["nli_file"])) == 16

    batch = PumaCollator(puma.processor, puma.config)([train[i] for i in range(8)])
    assert batch["negative"]["input_ids"].shape[0] == 16
    with torch.no_grad():
        assert puma(**batch["query"]).embeddings.shape[0] == 8
    clips = [train[i] for i in range(len(train)) if train[i]["modality"] == "video"][:2]
    batch = PumaCollator(puma.processor, puma.config)(clips)
    assert batch["candidate"]["video_grid_thw"].shape[0] == 2 and batch["negative"]["video_grid_thw"].shape[0] == 4

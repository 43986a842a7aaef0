"""Hard-negative mining (`eval_puma.py mine`) against an independent computation on an M-BEIR-layout fixture: the
negatives, the margin's drops, the rank range, the written query file and columns, and the loaders that read them."""

import json
import os
import zlib

import numpy as np
import pytest
import torch

from mbeir_puma import load_mbeir_pool, load_mbeir_queries, load_query_instructions, mbeir_eval_queries


pytest.importorskip("faiss", reason="mining searches with faiss")
pytest.importorskip("accelerate", reason="mining encodes through the evaluation's cache")

TRAIN_QUERIES = "query/union_train/mbeir_union_up_train.jsonl"
TRAIN_POOL = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
INSTRUCTIONS = "instructions/query_instructions.tsv"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from mbeir_layout import write_mbeir_tree

    root = tmp_path_factory.mktemp("M-BEIR")
    write_mbeir_tree(root, num_train=6)
    return str(root)


def expected_negatives(model, root, num_negatives, first, last, margin, relative_margin, seed):
    """The mining rule written out directly: exact scores of every candidate by numpy, no index, no cache."""
    pool = load_mbeir_pool(os.path.join(root, TRAIN_POOL))
    queries = mbeir_eval_queries(load_mbeir_queries(os.path.join(root, TRAIN_QUERIES)), pool,
                                 load_query_instructions(os.path.join(root, INSTRUCTIONS)))
    dids = list(pool)
    candidates = model.encode([{"text": pool[d]["txt"], "image": pool[d]["img_path"] and os.path.join(
        root, pool[d]["img_path"])} for d in dids]).numpy()
    expected, dropped = {}, {}
    for item in queries:
        qid = item["query_id"]
        image = item["query"]["image"] and os.path.join(root, item["query"]["image"])
        vector = model.encode([{"text": item["query"]["text"], "image": image}], instruction=item["instruction"],
                              is_query=True).numpy()[0]
        scores = candidates @ vector
        positives = [d for d in item["pos_cand_list"] if d in pool]
        modalities = {pool[d]["modality"] for d in positives}
        positive = min(scores[dids.index(d)] for d in positives)
        ranked = sorted((i for i in range(len(dids)) if pool[dids[i]]["modality"] in modalities),
                        key=lambda i: (-scores[i], i))
        ranked = [i for i in ranked if dids[i] not in positives]
        limit = min(positive - (margin if margin is not None else -np.inf),
                    positive - (relative_margin * abs(positive) if relative_margin is not None else -np.inf))
        survivors = [dids[i] for i in ranked if scores[i] <= limit]
        dropped[qid] = len(ranked) - len(survivors)
        kept = survivors[first - 1:last]  # the rank range counts after the margin (NV-Retriever's TopK-PercPos)
        rng = np.random.default_rng([seed, zlib.crc32(qid.encode())])
        picks = sorted(rng.choice(len(kept), size=min(num_negatives, len(kept)), replace=False).tolist())
        expected[qid] = [kept[i] for i in picks]
    return expected, dropped, pool


@pytest.mark.parametrize("margin, relative_margin, first, last", [(1e-4, None, 1, 40), (None, 1e-3, 1, 40),
                                                                   (1e-4, None, 2, 3)],
                         ids=["absolute", "relative", "past-the-first-search"])
def test_mined_negatives_equal_the_rule_computed_independently(tiny_checkpoint, tree, tmp_path, margin,
                                                             relative_margin, first, last):
    from modeling_puma import PumaForEmbedding
    from puma_eval.mining import MiningSettings, mine_negatives

    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3)
    # (a random model ranks positives anywhere: the margin drops those that score above or near the positive; with
    # ranks 2-3, the first search, 3 + positives deep, holds too few survivors for many queries and must go deeper)
    settings = MiningSettings(num_negatives=2, rank_range=(first, last), margin=margin,
                              relative_margin=relative_margin, seed=5)
    # When the negatives are mined (pool and queries encoded in shards of 4 through the evaluation's cache)
    summary = mine_negatives(model, os.path.join(tree, TRAIN_QUERIES), os.path.join(tree, TRAIN_POOL),
                             os.path.join(tree, INSTRUCTIONS), str(tmp_path / "mined"), settings=settings,
                             image_root=tree, cache_dir=str(tmp_path / "cache"), shard_size=4,
                             show_progress_bar=False)
    expected, dropped, pool = expected_negatives(model, tree, 2, first, last, margin, relative_margin, seed=5)
    # Then each query's neg_cand_list is what the rule gives, computed directly
    lines = open(os.path.join(tree, TRAIN_QUERIES)).read().splitlines()
    written = [json.loads(line) for line in open(tmp_path / "mined" / os.path.basename(TRAIN_QUERIES))]
    assert len(written) == len(lines) == len(expected)
    assert {record["qid"]: record["neg_cand_list"] for record in written} == expected
    # the margin did drop candidates near or above the positive, every one counted
    assert summary["dropped_by_margin"] == sum(dropped.values()) > 0
    for line, record in zip(lines, written):  # every other field as it was, in the file's order
        assert {**json.loads(line), "neg_cand_list": record["neg_cand_list"]} == record
        assert not set(record["neg_cand_list"]) & set(record["pos_cand_list"])
    # a query is short only where its modalities hold too few candidates under the margin
    assert sum(len(negatives) == 2 for negatives in expected.values()) > len(expected) / 2
    if last == 3:
        assert max(dropped.values()) > 2 * (last + 2)  # past the first search's depth (and its first doubling)


def test_the_cli_writes_files_the_mbeir_and_column_loaders_read(tiny_checkpoint, tree, tmp_path, capsys):
    import datasets

    from data_puma import ColumnPairDataset, MBEIRTrainDataset
    from eval_puma import main
    from modeling_puma import PumaForEmbedding

    checkpoint = str(tmp_path / "puma")
    PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2).save_pretrained(checkpoint)
    out = tmp_path / "mined"
    main(["mine", "--model", checkpoint, "--mbeir-root", tree, "--queries", TRAIN_QUERIES, "--pool", TRAIN_POOL,
          "--out", str(out), "--num-negatives", "3", "--rank-range", "1", "8", "--shard-size", "8"])
    printed = capsys.readouterr().out
    assert printed.startswith("Mined ") and "--num_hard_negatives 3" in printed
    summary = json.loads((out / "mining.json").read_text())
    assert summary["settings"] == {"num_negatives": 3, "rank_range": [1, 8], "margin": None,
                                   "relative_margin": 0.05, "seed": 0}
    pool = load_mbeir_pool(os.path.join(tree, TRAIN_POOL))
    # The M-BEIR loader trains on the mined negatives
    dataset = MBEIRTrainDataset(str(out / os.path.basename(TRAIN_QUERIES)), os.path.join(tree, TRAIN_POOL),
                                os.path.join(tree, INSTRUCTIONS), tree, num_hard_negatives=2)
    mined = {json.loads(line)["qid"]: json.loads(line)["neg_cand_list"]
             for line in open(out / os.path.basename(TRAIN_QUERIES))}
    for index in range(len(dataset)):
        example = dataset[index]
        qid = example["query_id"].split("#")[0]
        assert set(example["negative_ids"]) <= set(mined[qid])
    # and the generic loader reads the columns file with the columns the summary names
    rows = datasets.load_dataset(str(out / "columns"), split="train")
    columns = ColumnPairDataset(rows, image_root=tree, **summary["columns"])
    assert len(columns) == len(mined)
    for example in columns:
        negatives = mined[example["query_id"]]
        assert example["negatives"] == [{"text": pool[d]["txt"], "image": pool[d]["img_path"] and os.path.join(
            tree, pool[d]["img_path"])} for d in negatives]
        assert example["modality"] in ("text", "image", "image,text")


def test_bad_mining_settings_are_named(tiny_checkpoint, tree, tmp_path):
    from cli_puma import UsageError
    from eval_puma import main
    from puma_eval.mining import MiningSettings

    with pytest.raises(ValueError, match=r"rank_range must be \(first, last\) with 1 <= first <= last, got \(5, 2\)"):
        MiningSettings(rank_range=(5, 2))
    with pytest.raises(ValueError, match="relative_margin must be a non-negative number or None, got -0.1"):
        MiningSettings(relative_margin=-0.1)
    common = ["mine", "--model", tiny_checkpoint, "--mbeir-root", tree, "--queries", TRAIN_QUERIES, "--pool",
              TRAIN_POOL, "--out", str(tmp_path / "out")]
    with pytest.raises(UsageError, match="--rank-range 0 5: give FIRST LAST"):
        main(common + ["--rank-range", "0", "5"])
    with pytest.raises(FileNotFoundError, match="--pool"):
        main(common[:-4] + ["--pool", "nope.jsonl", "--out", str(tmp_path / "out")])


def test_a_pool_with_videos_is_mined_and_its_video_queries_stay_out_of_the_image_columns(tiny_checkpoint, tmp_path):
    # Given the demo benchmark, whose clip task has videos (folders of frames) as candidates
    from demo_data_puma import TASKS, make_demo_benchmark
    from modeling_puma import PumaForEmbedding
    from puma_eval.mining import MiningSettings, mine_negatives

    root = tmp_path / "demo"
    make_demo_benchmark(root, num_train=2 * len(TASKS), num_test=1, num_nli=1, image_size=32)
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2, video_min_frames=2, video_max_frames=2,
                                             video_min_pixels=3136, video_max_pixels=3136, video_total_pixels=6272)
    # When negatives are mined from its training pool
    summary = mine_negatives(model, str(root / "query/train/mbeir_demo_train.jsonl"),
                             str(root / "cand_pool/global/mbeir_demo_train_cand_pool.jsonl"),
                             str(root / "instructions/query_instructions.tsv"), str(tmp_path / "mined"),
                             settings=MiningSettings(num_negatives=1), image_root=str(root), show_progress_bar=False)
    # Then the clip task's queries get video negatives, and the columns file leaves those queries out, counted
    pool = load_mbeir_pool(str(root / "cand_pool/global/mbeir_demo_train_cand_pool.jsonl"))
    mined = {str(r["qid"]): r for r in map(json.loads, open(summary["query_file"], encoding="utf-8"))}
    video_queries = [qid for qid, r in mined.items()
                     if any(pool[str(d)].get("video_path") for d in r["pos_cand_list"])]
    assert video_queries and all(pool[d]["video_path"] for q in video_queries for d in mined[q]["neg_cand_list"])
    rows = [json.loads(line) for line in open(summary["columns_file"], encoding="utf-8")]
    assert summary["columns_skipped_video"] == len(video_queries)
    assert not {row["id"] for row in rows} & set(video_queries) and len(rows) == len(mined) - len(video_queries)

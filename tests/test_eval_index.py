# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Tests of `puma_eval.index`: every index kind against exact search, memory estimates against faiss's own
serialised sizes, the on-disk index reused only for the same embeddings and parameters, and the CLI's cache switch."""

import logging
import os

import numpy as np
import pytest
import torch

from eval_puma import main
from puma_eval.index import INDEX_KINDS, IndexSpec, build_index, index_memory_bytes, load_or_build_index, \
    search_index, torch_search


faiss = pytest.importorskip("faiss", reason="index tests need faiss-cpu (pip install -e '.[eval]')")

pytest_plugins = ("eval_fixtures",)  # puma_checkpoint, benchmark


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> torch.Tensor:
    """Unit vectors around `clusters` random centres: neighbours are close, as in real embedding pools."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    labels = torch.randint(clusters, (n,), generator=generator)
    points = centres[labels] + 0.5 * torch.randn(n, dim, generator=generator)
    return torch.nn.functional.normalize(points, dim=-1)


@pytest.fixture(scope="module")
def pool():
    vectors = clustered(6000, 64, 50)
    return vectors[:5800], vectors[5800:]  # candidates, queries from the same distribution


@pytest.mark.parametrize("kind, min_recall", [("flat", 1.0), ("flat-fp16", 0.98), ("flat-sq8", 0.95), ("ivf-flat", 0.9),
                                              ("ivf-sq8", 0.9), ("ivf-pq", 0.3), ("hnsw", 0.9), ("hnsw-sq8", 0.9)])
def test_each_index_kind_recalls_the_exact_top_10(kind, min_recall, pool):
    candidates, queries = pool
    _, exact = torch_search(queries, candidates, 10)
    _, found = search_index(build_index(candidates, kind, nprobe=16), queries, 10)
    recall = np.mean([len(set(row) & set(truth)) / 10 for row, truth in zip(found.tolist(), exact.tolist())])
    assert recall >= min_recall
    if kind == "flat":
        assert np.array_equal(found, exact.numpy())


def test_every_kind_is_tested():
    assert set(INDEX_KINDS) == {"flat", "flat-fp16", "flat-sq8", "ivf-flat", "ivf-sq8", "ivf-pq", "hnsw", "hnsw-sq8"}


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_memory_estimate_is_within_10_percent_of_the_serialised_index(kind, pool):
    candidates, _ = pool
    index = build_index(candidates, kind)
    actual = len(faiss.serialize_index(index))
    estimate = index_memory_bytes(IndexSpec(kind, *candidates.shape))
    assert abs(estimate - actual) <= 0.1 * actual, (estimate, actual)


def test_memory_estimate_is_logged_before_building_and_scales_to_the_global_pool(pool, caplog):
    with caplog.at_level(logging.INFO, logger="puma_eval"):
        build_index(pool[0], "ivf-sq8")
    assert "Building a ivf-sq8 index (IVF148,SQ8) of 5,800 x 64 vectors: about" in caplog.text
    # M-BEIR's union pool at the 7B width: float32 does not fit 24 GiB, 8-bit codes do
    n, dim = 5_600_000, 3584
    assert index_memory_bytes(IndexSpec("flat", n, dim)) == n * dim * 4
    assert index_memory_bytes(IndexSpec("ivf-sq8", n, dim)) < 24 * 2**30 < \
        index_memory_bytes(IndexSpec("flat-fp16", n, dim))


def test_on_disk_index_is_reused_only_for_the_same_embeddings_and_parameters(pool, tmp_path, monkeypatch, caplog):
    import puma_eval.index as index_module

    candidates, queries = pool
    path = tmp_path / "pool.faiss"
    built = []
    original = index_module.build_index
    monkeypatch.setattr(index_module, "build_index", lambda *a, **k: built.append(a[1]) or original(*a, **k))

    first = load_or_build_index(candidates, "ivf-flat", path, "embeddings-A", nprobe=8)
    again = load_or_build_index(candidates, "ivf-flat", path, "embeddings-A", nprobe=32)
    assert built == ["ivf-flat"] and path.is_file()
    assert faiss.extract_index_ivf(again).nprobe == 32  # search parameters apply to the loaded index
    faiss.extract_index_ivf(first).nprobe = 32
    assert np.array_equal(search_index(first, queries, 10)[1], search_index(again, queries, 10)[1])

    with caplog.at_level(logging.WARNING, logger="puma_eval"):
        load_or_build_index(candidates, "ivf-flat", path, "embeddings-B")
        load_or_build_index(candidates, "ivf-flat", path, "embeddings-B", nlist=20)
    assert built == ["ivf-flat"] * 3
    assert "fingerprint mismatch" in caplog.text and "it was built as IVF148,Flat, not IVF20,Flat" in caplog.text


def test_global_pool_index_is_saved_and_reused_by_the_next_evaluation(model, benchmark, tmp_path, caplog):
    from puma_eval import evaluate_mbeir

    cache = tmp_path / "cache"
    first = evaluate_mbeir(model, benchmark, pool="global", cache_dir=cache, index="hnsw", show_progress_bar=False)
    (saved,) = cache.glob("mbeir_union_test_cand_pool/*/index-hnsw.faiss")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="puma_eval"):
        second = evaluate_mbeir(model, benchmark, pool="global", cache_dir=cache, index="hnsw",
                                show_progress_bar=False)
    assert f"Reusing the hnsw index {saved}" in caplog.text and "Building" not in caplog.text
    assert first == second
    exact = evaluate_mbeir(model, benchmark, pool="global", cache_dir=cache, show_progress_bar=False)
    assert [row["recall@10"] for row in exact] == [row["recall@10"] for row in first]  # 16 candidates: HNSW is exact


def test_eval_cli_turns_the_cache_off_with_no_cache_and_refuses_an_empty_cache_dir(puma_checkpoint, benchmark,
                                                                                    tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--model", puma_checkpoint, "--mbeir-root", str(benchmark), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        main(args + ["--cache-dir", ""])
    assert "--cache-dir is empty; give a folder, or --no-cache" in capsys.readouterr().err

    main(args + ["--no-cache"])
    assert (tmp_path / "out" / "results_local.json").is_file()
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing cached, in the working directory or OUT
    assert sorted(os.listdir(tmp_path)) == ["bench", "out"]

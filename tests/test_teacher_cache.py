"""The teacher cache at scale: written by several processes at once, equal to one process's, read memory-mapped,
its size stated before it is built, and a build that stops half-way resumes where it stopped."""

import json
import os
import socket

import numpy as np
import pytest
import torch

from numerics import assert_close


def mbeir_dataset(root):
    from data_puma import MBEIRTrainDataset
    from mbeir_layout import write_mbeir_tree

    paths = write_mbeir_tree(root) if not os.path.isdir(os.path.join(root, "query")) else None
    paths = paths or {"train_queries": "query/union_train/mbeir_union_up_train.jsonl",
                      "candidate_pool": "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
                      "instructions": "instructions/query_instructions.tsv"}
    return MBEIRTrainDataset(*(os.path.join(root, paths[key]) for key in ("train_queries", "candidate_pool",
                                                                           "instructions")), root,
                             num_hard_negatives=1)


def _build_worker(rank, world_size, port, checkpoint, root, out):
    """One of two gloo ranks building the cache together, as `accelerate launch train.py --precompute_teacher`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), ACCELERATE_USE_CPU="true")
    torch.set_num_threads(1)
    from modeling_puma import PumaForEmbedding
    from teacher_cache_puma import precompute_teacher_cache

    teacher = PumaForEmbedding.from_pretrained(checkpoint)
    precompute_teacher_cache(teacher, mbeir_dataset(root), out, {"teacher": "tiny"}, shard_size=4, batch_size=4,
                             dtype=torch.bfloat16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shards(folder):
    from safetensors import safe_open

    found = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(directory, name), framework="pt") as f:
                    found[os.path.relpath(os.path.join(directory, name), folder)] = (f.get_tensor("embeddings"),
                                                                                     f.metadata())
    return found


def test_two_processes_write_the_cache_one_process_writes_and_it_is_read_memory_mapped(tiny_checkpoint, tmp_path,
                                                                                      capsys):
    import torch.multiprocessing as mp

    from modeling_puma import PumaForEmbedding
    from teacher_cache_puma import CachedTeacher, precompute_teacher_cache, teacher_items

    root = str(tmp_path / "M-BEIR")
    dataset = mbeir_dataset(root)
    teacher = PumaForEmbedding.from_pretrained(tiny_checkpoint)
    # Given the cache built by one process, and by two gloo processes splitting its shards
    single = str(tmp_path / "single")
    count = precompute_teacher_cache(teacher, dataset, single, {"teacher": "tiny"}, shard_size=4, batch_size=4,
                                     dtype=torch.bfloat16)
    two = str(tmp_path / "two")
    mp.spawn(_build_worker, args=(2, _free_port(), tiny_checkpoint, root, two), nprocs=2)
    # Then both hold the same files, bit for bit: the same shards (each written by one process), index and manifest
    expected, got = _shards(single), _shards(two)
    assert expected.keys() == got.keys() and len(expected) >= 4
    for name in expected:
        assert torch.equal(got[name][0], expected[name][0]) and got[name][1] == expected[name][1], name
    for name in ("index/ids.npy", "index/rows.npy", "manifest.json", "fingerprint.json"):
        assert open(os.path.join(two, name), "rb").read() == open(os.path.join(single, name), "rb").read(), name
    # and the cache holds every input a run can draw, as the teacher embeds it (raw, not normalised), read from
    # memory-mapped shards
    items = teacher_items(dataset)
    cache = CachedTeacher(two, {"teacher": "tiny"})
    assert len(cache) == count == len(items["queries"].ids) + len(items["candidates"].ids)
    for part, is_query in (("queries", True), ("candidates", False)):
        ids, inputs, instructions = items[part].ids, items[part].inputs, items[part].instructions
        direct = torch.empty(len(ids), 64)
        for instruction in set(instructions):
            rows = [i for i, value in enumerate(instructions) if value == instruction]
            direct[rows] = teacher.encode([inputs[i] for i in rows], instruction=instruction, is_query=is_query,
                                          normalize=False)
        # stored in bfloat16: within one bfloat16 rounding of the teacher's float32 embedding
        assert_close(cache.lookup(ids), direct, dtype=torch.bfloat16, ulps=1, name=part)
    assert cache._mapped and all(isinstance(array, np.memmap) for array in cache._mapped.values())
    with pytest.raises(KeyError, match=r"lacks 2 ids of this batch, e.g. \['nope', '9:9#i0-and-much-longer-"):
        cache.lookup([items["queries"].ids[0], "nope", "9:9#i0-and-much-longer-than-any-cached-id"])


def test_the_size_is_printed_before_anything_is_encoded_and_a_stopped_build_resumes(tiny_checkpoint, tmp_path,
                                                                                   caplog):
    import logging

    from modeling_puma import PumaForEmbedding
    from teacher_cache_puma import (CachedTeacher, describe_teacher_cache, precompute_teacher_cache,
                                    teacher_cache_is_fresh, teacher_items)

    dataset = mbeir_dataset(str(tmp_path / "M-BEIR"))
    items = teacher_items(dataset)
    total = len(items["queries"].ids) + len(items["candidates"].ids)
    line = describe_teacher_cache(items, 64, torch.float32, str(tmp_path / "cache"), shard_size=4)
    assert line.startswith(f"Teacher cache: {len(items['queries'].ids):,} query inputs")
    width = max(len(i.encode()) for part in items.values() for i in part.ids)
    assert f"= {(total * 64 * 4 + total * (width + 8)) / 2**20:.1f} MiB" in line and "free there" in line

    class StopsAfter(PumaForEmbedding):
        """The teacher, stopping the build (as a kill would) after `limit` encoded shards."""

        calls, limit = 0, None

        def encode(self, *args, **kwargs):
            type(self).calls += 1
            if self.limit is not None and type(self).calls > self.limit:
                raise KeyboardInterrupt("stopped")
            return super().encode(*args, **kwargs)

    teacher = StopsAfter.from_pretrained(tiny_checkpoint)
    fingerprint = {"teacher": "tiny", "data": 1}
    fresh = str(tmp_path / "fresh")
    with caplog.at_level(logging.INFO, logger="teacher_cache_puma"):
        precompute_teacher_cache(teacher, dataset, fresh, fingerprint, shard_size=4)
    assert caplog.records[0].message.startswith("Teacher cache: ")  # said before anything is encoded
    # Given a build stopped half-way (as a kill would stop it)
    calls, StopsAfter.calls, StopsAfter.limit = StopsAfter.calls, 0, StopsAfter.calls // 2
    with pytest.raises(KeyboardInterrupt):
        precompute_teacher_cache(teacher, dataset, str(tmp_path / "cache"), fingerprint, shard_size=4)
    assert not teacher_cache_is_fresh(str(tmp_path / "cache"), fingerprint)
    with pytest.raises(FileNotFoundError, match="incomplete or absent"):
        CachedTeacher(str(tmp_path / "cache"), fingerprint)
    written = _shards(str(tmp_path / "cache"))
    assert 0 < len(written) < len(_shards(fresh))
    # When it is run again
    StopsAfter.calls, StopsAfter.limit = 0, None
    precompute_teacher_cache(teacher, dataset, str(tmp_path / "cache"), fingerprint, shard_size=4)
    # Then it encodes only what was missing, keeps the shards written before, and equals the build never stopped
    assert 0 < StopsAfter.calls < calls
    resumed = _shards(str(tmp_path / "cache"))
    assert all(torch.equal(resumed[name][0], tensor) for name, (tensor, _) in written.items())
    assert resumed.keys() == _shards(fresh).keys()
    assert all(torch.equal(resumed[name][0], _shards(fresh)[name][0]) for name in resumed)
    assert teacher_cache_is_fresh(str(tmp_path / "cache"), fingerprint)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["dtype"] == "float32" and sum(part["rows"] for part in manifest["parts"]) == total

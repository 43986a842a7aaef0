"""Videos and PDF pages in training: M-BEIR-style JSONL records (`query_video_path`, `video_path`, `img_path` naming a
page) and 🤗 dataset columns reach the collator, which batches them as `encode` embeds them; GradCache splits video
batches row by row; the trainer takes a step on them."""

import json
import os

import pytest
import torch

from media_fixtures import decode_all, draw_page, moving_shape_frames, write_pdf, write_video
from modeling_puma import PumaForEmbedding
from numerics import assert_close


pytest.importorskip("av", reason="videos are written and decoded with PyAV")
pytest.importorskip("pypdfium2", reason="PDF pages are rendered with pypdfium2")
peft = pytest.importorskip("peft", reason="the training step trains LoRA adapters with peft")

SMALL_VIDEO = {"video_max_frames": 4, "video_min_pixels": 4 * 28 * 28, "video_max_pixels": 8 * 28 * 28,
               "video_total_pixels": 16 * 28 * 28}
CAPTIONS = ["a red square moving right", "a blue circle moving down", "a green triangle moving up",
            "a yellow square moving left"]


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    """Four clips, a PDF of four pages, and M-BEIR-style files: video -> text, text -> video and text -> page
    queries over one pool."""
    root = tmp_path_factory.mktemp("video-mbeir")
    shapes = [("square", "red", (1, 0)), ("circle", "blue", (0, 1)), ("triangle", "green", (0, -1)),
              ("square", "yellow", (-1, 0))]
    for i, (shape, colour, direction) in enumerate(shapes):
        write_video(root / f"clip{i}.mp4", moving_shape_frames(8, (48, 36), shape, colour, direction))
    write_pdf(root / "slides.pdf", [draw_page(n) for n in range(4)])
    pool = [{"did": f"1:{i}", "txt": text, "img_path": None, "modality": "text"} for i, text in enumerate(CAPTIONS)]
    pool += [{"did": f"2:{i}", "txt": None, "img_path": None, "video_path": f"clip{i}.mp4", "modality": "video"}
             for i in range(4)]
    pool += [{"did": f"3:{i}", "txt": None, "img_path": f"slides.pdf#page={i + 1}", "modality": "image"}
             for i in range(4)]
    queries = [{"qid": f"1:{i}", "query_txt": None, "query_img_path": None, "query_video_path": f"clip{i}.mp4",
                "query_modality": "video", "pos_cand_list": [f"1:{i}"], "neg_cand_list": [f"1:{(i + 1) % 4}"],
                "task_id": 0} for i in range(4)]
    queries += [{"qid": f"2:{i}", "query_txt": CAPTIONS[i], "query_img_path": None, "query_modality": "text",
                 "pos_cand_list": [f"2:{i}"], "neg_cand_list": [f"2:{(i + 1) % 4}"], "task_id": 1} for i in range(4)]
    queries += [{"qid": f"3:{i}", "query_txt": f"page {i}", "query_img_path": None, "query_modality": "text",
                 "pos_cand_list": [f"3:{i}"], "neg_cand_list": [f"3:{(i + 1) % 4}"], "task_id": 2} for i in range(4)]
    for name, records in (("pool.jsonl", pool), ("queries.jsonl", queries)):
        (root / name).write_text("".join(json.dumps(record) + "\n" for record in records))
    (root / "instructions.tsv").write_text(
        "query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\n"
        "video\ttext\tClipCaptions\t1\tFind the caption of this clip.\n"
        "text\tvideo\tCaptionClips\t2\tFind the clip of this caption.\n"
        "text\timage\tSlides\t3\tFind the slide.\n")
    return root


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2, **SMALL_VIDEO)


def test_mbeir_style_videos_and_pdf_pages_reach_the_batch_as_encode_embeds_them(model, media_root):
    from data_puma import MBEIRTrainDataset, PumaCollator

    dataset = MBEIRTrainDataset(media_root / "queries.jsonl", media_root / "pool.jsonl",
                                media_root / "instructions.tsv", str(media_root), num_hard_negatives=1)
    assert len(dataset) == 12  # every file found, page references included
    examples = [dataset[i] for i in range(12)]
    by_qid = {example["query_id"].split("#")[0]: example for example in examples}
    assert by_qid["1:2"]["query"]["video"] == os.path.join(str(media_root), "clip2.mp4")
    assert by_qid["2:1"]["positive"]["video"].endswith("clip1.mp4") and by_qid["2:1"]["modality"] == "video"
    assert by_qid["3:0"]["positive"]["image"].endswith("slides.pdf#page=1")
    collator = PumaCollator(model.processor, model.config)
    batch = collator([by_qid["1:0"], by_qid["2:1"], by_qid["3:2"]])
    assert collator.num_skipped == 0
    assert batch["modality"].tolist() == [0, 3, 1]  # text, video, image targets
    assert batch["query"]["video_grid_thw"].shape[0] == 1 and batch["candidate"]["video_grid_thw"].shape[0] == 1
    with torch.no_grad():
        queries = torch.nn.functional.normalize(model(**batch["query"]).raw_embeddings, dim=-1)
        candidates = torch.nn.functional.normalize(model(**batch["candidate"]).raw_embeddings, dim=-1)
    expected_queries = torch.cat([model.encode([example["query"]], instruction=example["instruction"])
                                  for example in (by_qid["1:0"], by_qid["2:1"], by_qid["3:2"])])
    expected_candidates = model.encode([by_qid[q]["positive"] for q in ("1:0", "2:1", "3:2")])
    assert_close(queries, expected_queries, ulps=100)
    assert_close(candidates, expected_candidates, ulps=100)


def test_a_missing_video_drops_its_query_and_an_unreadable_one_skips_its_example(model, media_root, tmp_path):
    from data_puma import MBEIRTrainDataset, PumaCollator

    queries = [json.loads(line) for line in (media_root / "queries.jsonl").read_text().splitlines()]
    queries[0]["query_video_path"] = "missing.mp4"
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(record) + "\n" for record in queries))
    dataset = MBEIRTrainDataset(tmp_path / "queries.jsonl", media_root / "pool.jsonl",
                                media_root / "instructions.tsv", str(media_root))
    assert len(dataset) == 11
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 20)
    collator = PumaCollator(model.processor, model.config)
    good = {"query": {"text": "a caption"}, "positive": {"video": str(media_root / "clip0.mp4")}, "modality": "video",
            "query_id": "good", "positive_id": "c0", "negatives": [], "negative_ids": [], "negative_modalities": []}
    bad = {**good, "positive": {"video": str(tmp_path / "broken.mp4")}, "query_id": "bad"}
    batch = collator([good, bad])
    assert batch["query_ids"] == ["good"] and collator.num_skipped == 1


def test_dataset_video_columns_of_paths_frames_and_bytes_are_one_video(model, media_root):
    from datasets import Dataset

    from data_puma import ColumnPairDataset, PumaCollator

    path = str(media_root / "clip1.mp4")
    frames = [torch.from_numpy(frame).permute(2, 0, 1) for frame in decode_all(path)]
    paths = Dataset.from_list([{"caption": CAPTIONS[1], "clip": path,
                                "negative": [str(media_root / "clip2.mp4"), str(media_root / "clip3.mp4")]}])
    # an undecoded 🤗 `Video` value: the file's bytes
    contents = Dataset.from_list([{"caption": CAPTIONS[1], "clip": {"path": None, "bytes": open(path, "rb").read()}}])
    first = ColumnPairDataset(paths, query_text="caption", positive_video="clip", negative_video="negative")[0]
    assert first["modality"] == "video" and first["negative_modalities"] == ["video", "video"]
    assert [negative["video"] for negative in first["negatives"]][1].endswith("clip3.mp4")
    second = ColumnPairDataset(contents, query_text="caption", positive_video="clip")[0]
    collator = PumaCollator(model.processor, model.config)
    by_path, by_bytes = (collator.featurize_inputs([example["positive"]]) for example in (first, second))
    by_frames = collator.featurize_inputs([{"video": frames}])
    with torch.no_grad():
        path_embedding, bytes_embedding = (model(**f).raw_embeddings for f in (by_path, by_bytes))
    assert torch.equal(path_embedding, bytes_embedding)
    assert_close(path_embedding, model.encode([{"video": path}], normalize=False), ulps=100)
    assert by_frames["video_grid_thw"].shape == (1, 3)


def test_grad_cache_splits_video_batches_row_by_row(family_checkpoints, images, media_root):
    from trainer_puma import split_features

    for family in ("qwen2_5_vl", "qwen3_vl"):
        model = PumaForEmbedding.from_pretrained(family_checkpoints[family], num_layers=2, **{
            **SMALL_VIDEO, "video_min_pixels": 4 * 32 * 32, "video_max_pixels": 8 * 32 * 32,
            "video_total_pixels": 16 * 32 * 32})
        from modeling_puma import featurize, parse_input

        items = [str(media_root / "clip0.mp4"), "a caption", {"video": str(media_root / "clip1.mp4"), "text": "x"},
                 str(media_root / "clip2.mp4")]
        if family == "qwen3_vl":  # (Qwen2.5-VL cannot place images and videos in one batch before transformers 5.2x)
            items.insert(1, images[0])
        examples = [parse_input(item, i, config=model.config) for i, item in enumerate(items)]
        features = featurize(model.processor, model.config, [model.build_prompt(t, v) for t, v in examples],
                             [v for _, v in examples])
        with torch.no_grad():
            whole = model(**features).raw_embeddings
            parts = torch.cat([model(**chunk).raw_embeddings for chunk in split_features(
                features, 2, model.config.image_token_id, model.config.video_token_id)])
        # float32 forwards of one batch and of its parts (other padding, other kernel shapes)
        assert_close(whole, parts, ulps=100, name=family)


def test_the_trainer_takes_steps_on_videos_and_pdf_pages(tiny_checkpoint, media_root, tmp_path):
    from data_puma import MBEIRTrainDataset, PumaCollator
    from trainer_puma import PumaTrainer, PumaTrainingArguments

    student = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2, **SMALL_VIDEO)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.\d+\.self_attn\.\w+_proj")
    student = peft.get_peft_model(student, config)
    dataset = MBEIRTrainDataset(media_root / "queries.jsonl", media_root / "pool.jsonl",
                                media_root / "instructions.tsv", str(media_root), num_hard_negatives=1)
    base = student.get_base_model()
    args = PumaTrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, max_steps=2,
                                 learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                 dataloader_num_workers=0, seed=0, disable_tqdm=True, loss="mac",
                                 grad_cache_chunk_size=4)
    before = {name: parameter.detach().clone() for name, parameter in student.named_parameters()
              if parameter.requires_grad}
    trainer = PumaTrainer(model=student, args=args, train_dataset=dataset,
                          data_collator=PumaCollator(base.processor, base.config))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    changed = [name for name, parameter in student.named_parameters()
               if parameter.requires_grad and not torch.equal(parameter, before[name])]
    assert changed and all("lora" in name for name in changed)

# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""`mteb.evaluate` runs PUMA through `PumaMTEBEncoder` on a text-to-image retrieval task defined here from local
files, offline; its scores equal the project's own evaluation of the same data in M-BEIR format. A document task of
PDF pages scores as brute-force encoding does, and mteb's video batches (decoders, sampled frames, undecoded bytes)
embed as `encode` embeds the same videos."""

import json
import os

import numpy as np
import pytest
import torch

from eval_puma import main


mteb = pytest.importorskip("mteb", reason="the MTEB wrapper needs mteb 2.x (pip install -e '.[mteb]')")

from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402

from puma_eval.mteb_model import PumaMTEBEncoder  # noqa: E402
from numerics import assert_close  # noqa: E402


pytest_plugins = ("eval_fixtures",)  # puma_checkpoint, model

INSTRUCTION = "Find the picture that matches the caption."
COLOURS = {f"c{i}": ((37 * i) % 256, (91 * i + 40) % 256, (53 * i + 120) % 256) for i in range(14)}
QUERIES = {f"q{i}": f"a square painted in colour number {i} of the palette" for i in range(0, 14, 2)}


def write_local_dataset(root) -> None:
    """Queries, an image corpus and qrels as plain files: what a user's own retrieval data looks like."""
    from PIL import Image, ImageDraw

    (root / "images").mkdir(parents=True)
    for did, colour in COLOURS.items():
        image = Image.new("RGB", (48, 40), colour)
        ImageDraw.Draw(image).rectangle([8, 6, 30 + int(did[1:]), 30], fill=colour[::-1])
        image.save(root / "images" / f"{did}.png")
    (root / "queries.jsonl").write_text("".join(json.dumps({"id": q, "text": t}) + "\n" for q, t in QUERIES.items()))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"id": d, "image": f"images/{d}.png"}) + "\n"
                                               for d in COLOURS))
    (root / "qrels.tsv").write_text("".join(f"{q}\tc{q[1:]}\t1\n" for q in QUERIES))


class LocalPaletteT2IRetrieval(AbsTaskRetrieval):
    """A text-to-image retrieval task whose data are local files."""

    metadata = TaskMetadata(
        name="LocalPaletteT2IRetrieval", description="Captions to drawn squares, from local files.",
        reference=None, dataset={"path": "local/palette", "revision": "local"}, type="Any2AnyRetrieval",
        category="t2i", modalities=["text", "image"], eval_splits=["test"], eval_langs=["eng-Latn"],
        main_score="ndcg_at_10", date=("2026-01-01", "2026-01-01"), domains=[], task_subtypes=[],
        license="cc-by-4.0", annotations_creators="derived", dialect=[], sample_creation="created",
        bibtex_citation="")
    root = None

    def load_data(self, num_proc=None, **kwargs) -> None:
        from datasets import Dataset, Features, Image, Value

        with open(os.path.join(self.root, "queries.jsonl")) as f:
            queries = [json.loads(line) for line in f]
        with open(os.path.join(self.root, "corpus.jsonl")) as f:
            corpus = [json.loads(line) for line in f]
        qrels = {}
        with open(os.path.join(self.root, "qrels.tsv")) as f:
            for line in f:
                qid, did, score = line.split()
                qrels.setdefault(qid, {})[did] = int(score)
        images = Dataset.from_dict({"id": [d["id"] for d in corpus],
                                    "image": [os.path.join(self.root, d["image"]) for d in corpus]},
                                   features=Features({"id": Value("string"), "image": Image()}))
        self.dataset = {"default": {"test": RetrievalSplitData(
            queries=Dataset.from_dict({"id": [q["id"] for q in queries], "text": [q["text"] for q in queries]}),
            corpus=images, relevant_docs=qrels, top_ranked=None)}}
        self.data_loaded = True


def write_mbeir_copy(source, root) -> None:
    """The same queries, corpus and qrels in M-BEIR's format with a task table."""
    root.mkdir()
    (root / "pool.jsonl").write_text("".join(json.dumps(
        {"did": f"1:{d[1:]}", "txt": None, "img_path": os.path.join(source, "images", f"{d}.png"), "modality": "image"})
        + "\n" for d in COLOURS))
    (root / "queries.jsonl").write_text("".join(json.dumps(
        {"qid": f"1:{q[1:]}", "query_txt": t, "query_img_path": None, "query_modality": "text",
         "pos_cand_list": [f"1:{q[1:]}"]}) + "\n" for q, t in QUERIES.items()))
    (root / "instructions.tsv").write_text(f"q\tc\tdataset\tid\tprompt\ntext\timage\tPalette\t1\t{INSTRUCTION}\n")
    (root / "tasks.json").write_text(json.dumps({"instructions_file": "instructions.tsv", "tasks": [
        {"name": "palette", "test_file": "queries.jsonl", "local_pool_file": "pool.jsonl", "query_modality": "text",
         "cand_modality": "image"}]}))


def test_mteb_evaluate_runs_puma_offline_and_equals_the_project_evaluation(puma_checkpoint, model, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_local_dataset(tmp_path / "palette")
    task = LocalPaletteT2IRetrieval()
    task.root = str(tmp_path / "palette")

    encoder = PumaMTEBEncoder(puma_checkpoint, model=model, prompts={"query": INSTRUCTION})
    result = mteb.evaluate(encoder, [task], cache=None, show_progress_bar=False)
    scores = result.task_results[0].scores["test"][0]

    write_mbeir_copy(tmp_path / "palette", tmp_path / "mbeir")
    main(["--model", puma_checkpoint, "--mbeir-root", str(tmp_path / "mbeir"), "--out", str(tmp_path / "out"),
          "--no-cache"])
    (ours,) = json.loads((tmp_path / "out" / "results_local.json").read_text())["tasks"]
    assert 0 < ours["recall@5"] < 100  # a ranking with something to get right and wrong
    for k in (1, 5, 10):
        # mteb rounds its scores to 5 decimals
        assert scores[f"recall_at_{k}"] == pytest.approx(ours[f"recall@{k}"] / 100, abs=1e-5)
        assert scores[f"ndcg_at_{k}"] == pytest.approx(ours[f"ndcg@{k}"] / 100, abs=1e-5)
    assert scores["mrr_at_10"] == pytest.approx(ours["mrr@10"] / 100, abs=1e-5)
    assert encoder.mteb_model_meta.embed_dim == model.config.text_config.hidden_size


def test_documents_are_encoded_without_instruction_and_queries_with_the_task_prompt(model):
    from mteb.types import PromptType

    encoder = PumaMTEBEncoder("local/puma", model=model, prompts={"Any2AnyRetrieval": "Find the image."})
    metadata = LocalPaletteT2IRetrieval.metadata
    batches = [{"text": ["a red square", "a blue circle"]}]
    as_query = encoder.encode(batches, task_metadata=metadata, hf_split="test", hf_subset="default",
                              prompt_type=PromptType.query)
    as_document = encoder.encode(batches, task_metadata=metadata, hf_split="test", hf_subset="default",
                                 prompt_type=PromptType.document)
    expected_query = model.encode(["a red square", "a blue circle"], instruction="Find the image.", is_query=True)
    expected_document = model.encode(["a red square", "a blue circle"])
    assert as_query.shape == (2, model.config.text_config.hidden_size)
    # the same float32 encoding behind mteb's interface (100 ulps: batching may differ)
    assert_close(as_query, expected_query, ulps=100, name="queries")
    assert_close(as_document, expected_document, ulps=100, name="documents")
    assert abs(as_query - as_document).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Document-image and video tasks
# ---------------------------------------------------------------------------------------------------------------
PAGE_QUERIES = {"q1": "the second page of the report", "q2": "a page with a blue circle", "q3": "the last page"}
PAGE_QRELS = {"q1": {"p2": 1}, "q2": {"p3": 1}, "q3": {"p5": 1, "p4": 1}}


class LocalPagesDocumentRetrieval(AbsTaskRetrieval):
    """A document-understanding task (as mteb's ViDoRe tasks are: text queries, a corpus of page images, nDCG@5)
    whose pages are a PDF's, rendered offline."""

    metadata = TaskMetadata(
        name="LocalPagesDocumentRetrieval", description="Queries to the pages of a drawn PDF.", reference=None,
        dataset={"path": "local/pages", "revision": "local"}, type="DocumentUnderstanding", category="t2i",
        modalities=["text", "image"], eval_splits=["test"], eval_langs=["eng-Latn"], main_score="ndcg_at_5",
        date=("2026-01-01", "2026-01-01"), domains=[], task_subtypes=[], license="cc-by-4.0",
        annotations_creators="derived", dialect=[], sample_creation="created", bibtex_citation="")
    pages = None

    def load_data(self, num_proc=None, **kwargs) -> None:
        from datasets import Dataset, Features, Image, Value

        corpus = Dataset.from_dict({"id": [f"p{i}" for i in range(1, len(self.pages) + 1)], "image": self.pages},
                                   features=Features({"id": Value("string"), "image": Image()}))
        queries = Dataset.from_dict({"id": list(PAGE_QUERIES), "text": list(PAGE_QUERIES.values())})
        self.dataset = {"default": {"test": RetrievalSplitData(queries=queries, corpus=corpus,
                                                               relevant_docs=PAGE_QRELS, top_ranked=None)}}
        self.data_loaded = True


def test_mteb_document_task_of_pdf_pages_scores_as_brute_force_encoding(model, tmp_path, monkeypatch):
    import math

    pdfium = pytest.importorskip("pypdfium2", reason="the pages are rendered from a PDF with pypdfium2")
    from media_fixtures import draw_page, write_pdf

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    document = pdfium.PdfDocument(write_pdf(tmp_path / "report.pdf", [draw_page(n) for n in range(1, 6)]))
    pages = [document[i].render(scale=1).to_pil().convert("RGB") for i in range(len(document))]
    document.close()
    task = LocalPagesDocumentRetrieval()
    task.pages = pages
    encoder = PumaMTEBEncoder("local/puma", model=model, prompts={"DocumentUnderstanding": INSTRUCTION})
    scores = mteb.evaluate(encoder, [task], cache=None, show_progress_bar=False).task_results[0].scores["test"][0]

    corpus = model.encode(pages)
    ndcg = 0.0
    for qid, text in PAGE_QUERIES.items():
        similarity = corpus @ model.encode([text], instruction=INSTRUCTION, is_query=True)[0]
        ranked = [f"p{i + 1}" for i in torch.argsort(-similarity).tolist()]
        dcg = sum(1 / math.log2(rank + 2) for rank, pid in enumerate(ranked[:5]) if pid in PAGE_QRELS[qid])
        ndcg += dcg / sum(1 / math.log2(rank + 2) for rank in range(min(5, len(PAGE_QRELS[qid]))))
    assert scores["ndcg_at_5"] == pytest.approx(ndcg / len(PAGE_QUERIES), abs=1e-5)  # mteb rounds to 5 decimals
    assert "video" in encoder.mteb_model_meta.modalities


class FramesDecoder:
    """An open video decoder with torchcodec's API (`metadata`, `get_frames_at`) over frames decoded by PyAV: what a
    🤗 `Video` column holds, without needing torchcodec's FFmpeg libraries."""

    def __init__(self, path):
        from types import SimpleNamespace

        from media_fixtures import decode_all

        self.frames = torch.from_numpy(np.stack(decode_all(path))).permute(0, 3, 1, 2)
        self.metadata = SimpleNamespace(num_frames=len(self.frames), average_fps=10.0, width=self.frames.shape[3],
                                        height=self.frames.shape[2])

    def get_frames_at(self, indices):
        from types import SimpleNamespace

        return SimpleNamespace(data=self.frames[indices])


def test_mteb_video_batches_are_encoded_as_encode_embeds_the_same_videos(model, tmp_path):
    pytest.importorskip("av", reason="the videos are written and decoded with PyAV")
    from mteb.types import PromptType

    from media_fixtures import decode_all, moving_shape_frames, write_video

    path = write_video(tmp_path / "clip.mp4", moving_shape_frames(12))
    frames = torch.from_numpy(np.stack(decode_all(path))).permute(0, 3, 1, 2)  # (T, C, H, W), as collators give
    encoder = PumaMTEBEncoder("local/puma", model=model, prompts={"Any2AnyRetrieval": "Find the clip."})
    metadata = LocalPaletteT2IRetrieval.metadata
    batches = [{"video": [FramesDecoder(path), frames, {"path": None, "bytes": open(path, "rb").read()}],
                "text": ["a red square", "a red square", ""]}]
    got = encoder.encode(batches, task_metadata=metadata, hf_split="test", hf_subset="default",
                         prompt_type=PromptType.document)
    expected = model.encode([{"video": path, "text": "a red square"}, {"video": list(frames), "text": "a red square"},
                             {"video": path}])
    assert_close(got, expected, ulps=100)
    queries = encoder.encode([{"video": [frames]}], task_metadata=metadata, hf_split="test", hf_subset="default",
                             prompt_type=PromptType.query)
    assert_close(queries, model.encode([{"video": list(frames)}], instruction="Find the clip.", is_query=True),
                 ulps=100)

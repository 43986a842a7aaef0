# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""MMEB-V2's video and visual-document tasks (VLM2Vec-V2, arXiv 2507.04590), read from the layout TIGER-Lab/MMEB-V2
is released in, each task's annotations from its own 🤗 dataset, the queries and candidates built as
Qwen3-VL-Embedding's MMEB-V2 harness builds them (`src/evaluation/mmeb_v2/data/datasets/*.py`: the instruction apart
from the query text, candidates without one).

Layout, under ROOT (TIGER-Lab/MMEB-V2 with its archives extracted, as its `download_data.sh` does) and ANNOTATIONS
(each task's 🤗 dataset downloaded under its id, e.g. `huggingface-cli download VLM2Vec/MSR-VTT --repo-type dataset
--local-dir ANNOTATIONS/VLM2Vec/MSR-VTT`):

    ROOT/video-tasks/frames/video_cls/{SSv2,HMDB51,UCF101,K700,Breakfast}/<video_id>/*.jpg
    ROOT/video-tasks/frames/video_ret/<task>/<video_id>/      (or video_ret/data/ziyan/video_retrieval/<task>/frames/)
    ROOT/video-tasks/frames/video_mret/<task>/<video>/{query,positive*,negative*}/
    ROOT/video-tasks/frames/video_mret/MomentSeeker/video_frames/<clip>/ and query_<image>.jpg
    ROOT/video-tasks/frames/video_qa/<task>/<video_id>/       (MVBench: <subset>/<video>/; ActivityNetQA: v_<name>/)
    ROOT/visdoc-tasks/[images/]<task>/<corpus-id>.png         (absent: the corpus dataset's own images)
    ANNOTATIONS/<org>/<name>/                                  (VLM2Vec/*, lmms-lab/YouCook2, vidore/*, openbmb/*)

A video is the natural-sorted frame images of its folder, given to the model as a frame list, which
thins it to its `video_max_frames` (`num_frames` thins it first, e.g. to VLM2Vec's 8). Classification candidates are
the class names found in the annotations.
"""

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field

from .tasks import violation


logger = logging.getLogger(__name__)

QA_INSTRUCTION = ("Given a video and a question, select the most accurate answer from the provided candidates. Return "
                  "only the exact text of your chosen answer.")
VISDOC_INSTRUCTION = "Find a document image that matches the given query."
CLASSIFICATION_INSTRUCTIONS = {
    "K700": "Recognize the category of the video content.",
    "SmthSmthV2": "What actions or object interactions are being performed by the person in the video?",
    "UCF101": "What activities or sports are being performed by the person in the video?",
    "HMDB51": "What actions or objects interactions are the person in the video doing?",
    "Breakfast": "Recognize the breakfast type that the person is cooking in the video. ",
}


@dataclass
class MMEBTask:
    """One MMEB task ready to encode: queries (`encode` inputs) and their instructions, the task's distinct
    candidates, each query's candidate list (indices into `candidates`; `None`: every candidate, as MMEB-V2's global
    tasks rank) and the graded relevance of its candidates (`{index: grade}`; default: the first of its list, MMEB's
    target), the task's `modality` and reported `metric` (`"hit@1"` or `"ndcg_linear@5"`)."""

    name: str
    category: str
    query_items: list[dict]
    query_instructions: list[str | None]
    candidates: list[dict]
    candidate_lists: list[list[int] | None]
    relevance: list[dict[int, float]] | None = None
    modality: str = "image"
    metric: str = "hit@1"


@dataclass(frozen=True)
class V2Task:
    """One MMEB-V2 task: its leaderboard `name`, meta-task `category`, `modality` ("video" or "visdoc"), reader
    `kind`, 🤗 annotation `(repo, subset, split)`, the folders its frames or images may be in (relative to ROOT, the
    first present is read) and reader `options`."""

    name: str
    category: str
    modality: str
    kind: str
    annotation: tuple[str, str | None, str]
    roots: tuple[str, ...]
    options: dict = field(default_factory=dict)


def _video_ret(name: str, **options) -> V2Task:
    return V2Task(name, "video retrieval", "video", "retrieval", options.pop("annotation"),
                  (f"video-tasks/frames/video_ret/{name}", f"video-tasks/frames/video_ret/data/ziyan/video_retrieval/"
                                                           f"{name}/frames"), options)


def _qa(name: str, annotation, folder: str | None = None, **options) -> V2Task:
    return V2Task(name, "video QA", "video", "qa", annotation, (f"video-tasks/frames/video_qa/{folder or name}",),
                  {"format": name, **options})


def _visdoc(name: str, category: str, repo: str, split: str = "test", folder: str | None = None,
            language: str | None = None, hashed_names: bool = False) -> V2Task:
    folder = folder or name
    return V2Task(name, category, "visdoc", "visdoc", (repo, None, split),
                  (f"visdoc-tasks/{folder}", f"visdoc-tasks/images/{folder}"),
                  {"language": language, "hashed_names": hashed_names})


_VIDORE_V1 = ("arxivqa_test_subsampled", "docvqa_test_subsampled", "infovqa_test_subsampled",
              "tabfquad_test_subsampled", "tatdqa_test", "shiftproject_test",
              "syntheticDocQA_artificial_intelligence_test", "syntheticDocQA_energy_test",
              "syntheticDocQA_government_reports_test", "syntheticDocQA_healthcare_industry_test")
_VISRAG = ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA")

# The 42 video and visual-document tasks MMEB-V2's leaderboard scores, by meta-task (Qwen3-VL-Embedding's
# `gather_results.py`; annotations as VLM2Vec's `src/constant/dataset_hf_path.py` names them).
V2_TASKS = {task.name: task for task in [
    V2Task("SmthSmthV2", "video classification", "video", "ssv2", ("VLM2Vec/SmthSmthV2", None, "test"),
           ("video-tasks/frames/video_cls/SSv2",), {"max_queries": 1000}),
    *[V2Task(name, "video classification", "video", "classification", (f"VLM2Vec/{repo}", None, "test"),
             (f"video-tasks/frames/video_cls/{name}",))
      for name, repo in (("HMDB51", "HMDB51"), ("UCF101", "UCF101"), ("K700", "Kinetics-700"),
                         ("Breakfast", "Breakfast"))],
    _qa("Video-MME", ("VLM2Vec/Video-MME", None, "test")),
    _qa("NExTQA", ("VLM2Vec/NExTQA", "MC", "test")),
    _qa("EgoSchema", ("VLM2Vec/EgoSchema", "Subset", "test")),
    _qa("MVBench", ("VLM2Vec/MVBench", None, "train")),
    _qa("ActivityNetQA", ("VLM2Vec/ActivityNetQA", None, "test")),
    _video_ret("MSR-VTT", annotation=("VLM2Vec/MSR-VTT", "test_1k", "test"), id="video_id", text="caption"),
    _video_ret("MSVD", annotation=("VLM2Vec/MSVD", None, "test"), id="video_id", text="caption"),
    _video_ret("DiDeMo", annotation=("VLM2Vec/DiDeMo", None, "test"), id="video", text="caption"),
    _video_ret("YouCook2", annotation=("lmms-lab/YouCook2", None, "val"), id="id", text="sentence"),
    _video_ret("VATEX", annotation=("VLM2Vec/VATEX", None, "test"), id="videoID", text="enCap"),
    *[V2Task(name, "moment retrieval", "video", "moment", (f"VLM2Vec/{name}", None, "test"),
             (f"video-tasks/frames/video_mret/{name}", f"video-tasks/frames/video_mret/{name.replace('-', '_')}"))
      for name in ("QVHighlight", "Charades-STA")],
    V2Task("MomentSeeker", "moment retrieval", "video", "momentseeker", ("VLM2Vec/MomentSeeker", None, "test"),
           ("video-tasks/frames/video_mret/MomentSeeker",)),
    *[_visdoc(f"ViDoRe_{name.replace('_test_subsampled', '').replace('_test', '')}", "ViDoRe v1",
              f"vidore/{name}_beir") for name in _VIDORE_V1],
    _visdoc("ViDoRe_esg_reports_human_labeled_v2", "ViDoRe v2", "vidore/esg_reports_human_labeled_v2",
            folder="esg_reports_human_labeled_v2"),
    *[_visdoc(f"ViDoRe_{name}_v2_multilingual", "ViDoRe v2", f"vidore/{name}_v2", folder=f"{name}_v2_multilingual")
      for name in ("biomedical_lectures", "economics_reports", "esg_reports")],
    *[_visdoc(f"VisRAG_{name}", "VisRAG", f"openbmb/VisRAG-Ret-Test-{name}", split="train", hashed_names=True)
      for name in _VISRAG],
    _visdoc("ViDoSeek-page", "VisDoc OOD", "VLM2Vec/ViDoSeek-page-fixed"),
    _visdoc("ViDoSeek-doc", "VisDoc OOD", "VLM2Vec/ViDoSeek"),
    _visdoc("MMLongBench-doc", "VisDoc OOD", "VLM2Vec/MMLongBench-doc"),
    _visdoc("MMLongBench-page", "VisDoc OOD", "VLM2Vec/MMLongBench-page-fixed"),
]}


def v2_task_status(task: V2Task, root: str, annotations: str) -> str | None:
    """`None` when `task` can be read under `root` and `annotations`, else what is missing."""
    repo = os.path.join(annotations, *task.annotation[0].split("/"))
    if not os.path.isdir(repo):
        return f"its annotations {repo} (huggingface-cli download {task.annotation[0]} --repo-type dataset " \
               f"--local-dir {repo})"
    if task.modality == "video" and _first_root(task, root) is None:
        return f"its frames {os.path.join(root, task.roots[0])}"
    return None


def _first_root(task: V2Task, root: str) -> str | None:
    return next((os.path.join(root, folder) for folder in task.roots if os.path.isdir(os.path.join(root, folder))),
                None)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def load_frames(folder: str) -> list[str]:
    """The frame images of a video folder, natural-sorted (`frame_2` before `frame_10`); `[]` when absent."""
    from modeling_puma import frame_files

    return frame_files(folder) if os.path.isdir(folder) else []


def thin_frames(frames: list[str], count: int | None) -> list[str]:
    """`count` frames evenly picked (`numpy.linspace(0, n - 1, count, dtype=int)`, the harnesses' `sample_frames`),
    or all when there are no more than `count` (or `count` is `None`)."""
    import numpy as np

    if count is None or len(frames) <= count:
        return frames
    return [frames[i] for i in np.linspace(0, len(frames) - 1, count, dtype=int).tolist()]


def _annotation(task: V2Task, annotations: str, subset: str | None = None):
    """The task's annotation split (`subset` overrides its configuration, for BEIR's queries/corpus/qrels)."""
    from datasets import load_dataset

    repo, default_subset, split = task.annotation
    path = os.path.join(annotations, *repo.split("/"))
    return load_dataset(path, subset or default_subset, split=split)


class _Builder:
    """Collects a task's queries and its distinct candidates (by key), with each query's list and relevance."""

    def __init__(self, task: V2Task, frames_root: str | None, num_frames: int | None):
        self.task, self.frames_root, self.num_frames = task, frames_root, num_frames
        self.queries, self.instructions, self.candidates, self.lists, self.relevance = [], [], [], [], []
        self.index, self.missing = {}, []

    def video(self, *parts: str) -> list[str] | None:
        """The (thinned) frames of the video folder `frames_root/parts...`; `None`, noted, when it has none."""
        folder = os.path.join(self.frames_root, *parts)
        frames = load_frames(folder)
        if not frames:
            self.missing.append(os.path.relpath(folder, self.frames_root))
            return None
        return thin_frames(frames, self.num_frames)

    def candidate(self, key, item: dict) -> int:
        if key not in self.index:
            self.index[key] = len(self.candidates)
            self.candidates.append(item)
        return self.index[key]

    def query(self, item: dict, instruction: str, candidates: list[int] | None, relevant: dict[int, float]) -> None:
        self.queries.append(item)
        self.instructions.append(instruction)
        self.lists.append(candidates)
        self.relevance.append(relevant)

    def task_of(self, path: str) -> MMEBTask:
        if self.missing:
            raise ValueError(f"MMEB-V2 task {self.task.name}: " + violation(
                f"videos without frames under {self.frames_root}", self.missing) + ".")
        if not self.queries:
            raise ValueError(f"MMEB-V2 task {self.task.name} ({path}) holds no query.")
        return MMEBTask(self.task.name, self.task.category, self.queries, self.instructions, self.candidates,
                        self.lists, relevance=self.relevance, modality=self.task.modality,
                        metric="ndcg_linear@5" if self.task.modality == "visdoc" else "hit@1")


def load_v2_task(task: V2Task, root, annotations, num_frames: int | None = None) -> MMEBTask:
    """Reads one MMEB-V2 video or visual-document task (see the module docstring for the layout)."""
    root, annotations = os.fspath(root), os.fspath(annotations)
    status = v2_task_status(task, root, annotations)
    if status is not None:
        raise FileNotFoundError(f"MMEB-V2 task {task.name} lacks {status}.")
    builder = _Builder(task, _first_root(task, root), num_frames)
    reader = {"classification": _classification, "ssv2": _ssv2, "retrieval": _retrieval, "moment": _moment,
              "momentseeker": _momentseeker, "qa": _qa_task, "visdoc": _visdoc_task}[task.kind]
    reader(builder, task, root, annotations)
    return builder.task_of(os.path.join(annotations, task.annotation[0]))


def _fields(rows, task: V2Task, names: tuple[str, ...]) -> None:
    missing = [name for name in names if name not in rows.column_names]
    if missing:
        raise ValueError(f"MMEB-V2 task {task.name}: its annotations lack the fields {missing} (they have "
                         f"{rows.column_names}).")


def _classification(builder: _Builder, task: V2Task, root: str, annotations: str) -> None:
    """A video against every class name (global): `video_id`, `pos_text`."""
    rows = _annotation(task, annotations)
    _fields(rows, task, ("video_id", "pos_text"))
    labels = sorted(set(rows["pos_text"]))
    for label in labels:
        builder.candidate(("text", label), {"text": label})
    for row in rows:
        frames = builder.video(str(row["video_id"]))
        builder.query({"video": frames}, CLASSIFICATION_INSTRUCTIONS[task.name], None,
                      {builder.index[("text", row["pos_text"])]: 1.0})


def _ssv2(builder: _Builder, task: V2Task, root: str, annotations: str) -> None:
    """A video against its own candidate texts `neg_text` (which hold the label `pos_text`), the first 1000."""
    rows = _annotation(task, annotations)
    _fields(rows, task, ("video_id", "pos_text", "neg_text"))
    rows = rows.select(range(min(len(rows), task.options["max_queries"])))
    for row in rows:
        frames = builder.video(str(row["video_id"]))
        texts = list(row["neg_text"])
        listed = [builder.candidate(("text", text), {"text": text}) for text in texts]
        relevant = {index: 1.0 for index, text in zip(listed, texts) if text == row["pos_text"]}
        builder.query({"video": frames}, CLASSIFICATION_INSTRUCTIONS[task.name], listed, relevant)


_RETRIEVAL_INSTRUCTIONS = {
    "MSR-VTT": "Find a video that contains the following visual content.",
    "MSVD": "Find the video snippet that corresponds to the given summary.",
    "DiDeMo": "Find a video that includes the following described scenes.",
    "YouCook2": "Find a video that demonstrates the following action while making a recipe.",
    "VATEX": "Select a video that fits the description provided.",
}


def _retrieval(builder: _Builder, task: V2Task, root: str, annotations: str) -> None:
    """A caption against every video (global); the video's folder is its id without folders and suffix."""
    rows = _annotation(task, annotations)
    id_field, text_field = task.options["id"], task.options["text"]
    _fields(rows, task, (id_field, text_field))
    queries = []
    for row in rows:
        name = os.path.splitext(os.path.basename(str(row[id_field])))[0]
        text = row[text_field][0] if isinstance(row[text_field], list) else row[text_field]
        frames = builder.video(name)
        queries.append((text, builder.candidate(("video", name), {"video": frames})))
    for text, target in queries:
        builder.query({"text": text}, _RETRIEVAL_INSTRUCTIONS[task.name], None, {target: 1.0})


def _clips(builder: _Builder, folder: str) -> tuple[list[int], dict[int, float]]:
    """The clip folders of a moment-retrieval video folder (all but `query`), and which are positive."""
    names = sorted((name for name in os.listdir(os.path.join(builder.frames_root, folder))
                    if name != "query" and os.path.isdir(os.path.join(builder.frames_root, folder, name))),
                   key=_natural_key)
    listed = [builder.candidate(("clip", folder, name), {"video": builder.video(folder, name)}) for name in names]
    return listed, {index: 1.0 for index, name in zip(listed, names) if name.startswith("positive")}


def _moment(builder: _Builder, task: V2Task, root: str, annotations: str) -> None:
    """A video's `query` frames and a text against that video's clips (local): `query`, `video_path`."""
    rows = _annotation(task, annotations)
    _fields(rows, task, ("query", "video_path"))
    for row in rows:
        folder = os.path.splitext(os.path.basename(row["video_path"]))[0]
        frames = builder.video(folder, "query")
        listed, relevant = _clips(builder, folder) if frames is not None else ([], {})
        builder.query({"text": row["query"], "video": frames},
                      "Find the clip that corresponds to the described scene in the given video.", listed, relevant)


def _momentseeker(builder: _Builder, task: V2Task, root: str, annotations: str) -> None:
    """A text, with a video segment or an image, against clips (local): `query`, `input_frames` ('', a `.mp4` or a
    `.jpg`), `positive_frames` and `negative_frames` (`[{"output_path": ...}]`)."""
    rows = _annotation(task, annotations)
    _fields(rows, task, ("query", "input_frames", "positive_frames", "negative_frames"))
    for row in rows:
        given = row["input_frames"] or ""
        if given.endswith(".mp4"):
            query = {"text": row["query"], "video": builder.video("video_frames", given[:-4].replace("/", "_"))}
            instruction = "Find the clip that corresponds to the given sentence and video segment."
        elif given.endswith(".jpg"):
            query = {"text": row["query"], "image": os.path.join(builder.frames_root, f"query_{given}")}
            instruction = "Select the video clip that aligns with the given text and image."
        else:
            query, instruction = {"text": row["query"]}, "Find the clip that corresponds to the given text."
        listed, relevant = [], {}
        for entries, grade in ((row["positive_frames"], 1.0), (row["negative_frames"], 0.0)):
            for entry in entries:
                name = entry["output_path"].replace("/", "_").split(".mp4")[0]
                index = builder.candidate(("clip", name), {"video": builder.video("video_frames", name)})
                listed.append(index)
                if grade:
                    relevant[index] = grade
        builder.query(query, instruction, listed, relevant)


def _qa_candidates(options: list[str]) -> list[str]:
    """Option texts without their `"A. "` prefixes (Video-MME, EgoSchema)."""
    return [option[option.find(". "):].strip(". ") if ". " in option else option for option in options]


def _qa_template(question: str, candidates: list[str]) -> tuple[str, list[str]]:
    """VLM2Vec's `qa_template`: the question, "Options:" and "(A) text" lines; the candidates as "(A) text"."""
    options = [f"({chr(ord('A') + index)}) {candidate}" for index, candidate in enumerate(candidates)]
    return "\n".join([question, "Options:", *options]), options


def _qa_task(builder: _Builder, task: V2Task, root: str, annotations: str) -> None:
    """A video and a question against its answer options (local), each set in its own format."""
    rows = _annotation(task, annotations)
    fmt = task.options["format"]
    fields = {"Video-MME": ("question", "videoID", "options", "answer"),
              "NExTQA": ("video", "question", "answer", "a0", "a1", "a2", "a3", "a4"),
              "EgoSchema": ("video_idx", "question", "answer", "option"),
              "MVBench": ("subset", "question", "video", "candidates", "answer"),
              "ActivityNetQA": ("video_name", "question", "answer")}[fmt]
    _fields(rows, task, fields)
    for row in rows:
        if fmt == "Video-MME":
            folder, text = [str(row["videoID"])], row["question"] + "\n" + "\n".join(row["options"])
            candidates, answer = _qa_candidates(row["options"]), "ABCD".index(row["answer"])
        elif fmt == "NExTQA":
            text, candidates = _qa_template(row["question"], [row[f"a{i}"] for i in range(5)])
            folder, answer = [str(row["video"])], int(row["answer"])
        elif fmt == "EgoSchema":
            folder, text = [str(row["video_idx"])], row["question"] + " " + " ".join(row["option"])
            candidates, answer = _qa_candidates(row["option"]), int(row["answer"])
        elif fmt == "MVBench":
            text, candidates = _qa_template(row["question"], list(row["candidates"]))
            folder, answer = [row["subset"], row["video"]], list(row["candidates"]).index(row["answer"])
        else:  # ActivityNetQA
            folder, text = [f"v_{row['video_name']}"], row["question"] + "? (A) yes; (B) no."
            candidates, answer = ["yes", "no"], ["yes", "no"].index(row["answer"])
        listed = [builder.candidate(("text", candidate), {"text": candidate}) for candidate in candidates]
        builder.query({"text": text, "video": builder.video(*folder)}, QA_INSTRUCTION, listed,
                      {listed[answer]: 1.0})


def _visdoc_image_name(corpus_id: str, hashed: bool) -> str:
    """The file a corpus page is saved as: `<corpus-id>.png`, or VisRAG's shortened name (its first 50 characters,
    `_`, 8 hex digits of its MD5, its suffix)."""
    if not hashed:
        return f"{corpus_id}.png"
    base, suffix = os.path.splitext(corpus_id)
    return base[:50] + "_" + hashlib.md5(corpus_id.encode("utf-8")).hexdigest()[:8] + suffix


def _visdoc_task(builder: _Builder, task: V2Task, root: str, annotations: str) -> None:
    """BEIR queries against the whole corpus of page images (global), graded by the qrels (score > 0, the highest
    of repeated pairs); the pages are read from `visdoc-tasks/.../<corpus-id>.png` when present, else from the corpus
    dataset's `image` column."""
    queries = _annotation(task, annotations, "queries")
    qrels = _annotation(task, annotations, "qrels")
    corpus = _annotation(task, annotations, "corpus")
    _fields(queries, task, ("query-id", "query"))
    _fields(qrels, task, ("query-id", "corpus-id", "score"))
    _fields(corpus, task, ("corpus-id",))
    if task.options["language"] is not None:
        queries = queries.filter(lambda row: row["language"] == task.options["language"])
    folder = _first_root(task, root)
    for position, corpus_id in enumerate(corpus["corpus-id"]):
        path = os.path.join(folder, _visdoc_image_name(str(corpus_id), task.options["hashed_names"])) \
            if folder else None
        if path is not None and os.path.isfile(path):
            image = path
        elif "image" in corpus.column_names:
            image = corpus[position]["image"]
        else:
            raise ValueError(f"MMEB-V2 task {task.name}: corpus page {corpus_id} has no image (neither {path} nor an "
                             "'image' column in its corpus).")
        builder.candidate(("page", str(corpus_id)), {"image": image})
    grades = {}
    for row in qrels:
        if row["score"] > 0 and ("page", str(row["corpus-id"])) in builder.index:
            relevant = grades.setdefault(str(row["query-id"]), {})
            index = builder.index[("page", str(row["corpus-id"]))]
            relevant[index] = max(relevant.get(index, 0.0), float(row["score"]))
    skipped = 0
    for row in queries:
        relevant = grades.get(str(row["query-id"]))
        if not relevant:
            skipped += 1
            continue
        builder.query({"text": row["query"]}, VISDOC_INSTRUCTION, None, relevant)
    if skipped:
        logger.info(f"MMEB-V2 {task.name}: {skipped} queries without a relevant page are left out")


__all__ = ["MMEBTask", "V2_TASKS", "V2Task", "load_frames", "load_v2_task", "thin_frames", "v2_task_status"]

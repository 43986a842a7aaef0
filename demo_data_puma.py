# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Writes PUMA's demo benchmark: a small M-BEIR-format retrieval benchmark of drawn shapes, offline and
deterministic (the same seed gives byte-identical files).

    python demo_data_puma.py OUT_DIR [--seed 0] [--num-train 480] [--num-test 40] [--image-size 96]

A scene is a shape (8 kinds) in a colour (8), a count (1-3), a position (5) and a background (2): 1,920 scenes,
split in half between training and test, so test queries never show a training scene. Captions name all five
attributes, so each caption matches exactly one scene; paraphrases use other templates and synonyms.

Tasks, with UniIR's task ids; dataset ids continue after M-BEIR's 0-9 so the two can be pooled:

| task | query -> candidate  | dataset id | name                     | query                  | positive           |
|------|---------------------|------------|--------------------------|------------------------|--------------------|
| 0    | text -> image       | 10         | DemoCaptionToImage       | caption                | image              |
| 1    | text -> text        | 11         | DemoParaphrase           | caption                | paraphrase         |
| 2    | text -> image,text  | 12         | DemoCaptionToTitledImage | caption                | image + "red star" |
| 3    | image -> text       | 13         | DemoImageToCaption       | image                  | caption            |
| 4    | image -> image      | 14         | DemoSameScene            | jittered re-rendering  | image              |
| 7    | image,text -> image | 15         | DemoComposed             | image + edit text      | edited scene       |
| 10   | text -> video       | 16         | DemoCaptionToClip        | caption + motion       | clip               |

Edit texts read like "the same but red", "the same but moved to the top left", "the same on a grey background".
A clip is a scene's shapes moving left, right, up or down over 4 frames, stored as a folder of PNG frames (a video
`encode` reads without a video decoder); its caption adds the motion ("..., moving left"), which no single frame
shows. Task 10 is not one of UniIR's (M-BEIR has no video).

Training queries carry hard negatives (scenes one attribute away; for task 7 also the reference image); each test
task's local pool holds its positives plus one such near miss per query (and, for task 7, the reference images).

Layout under OUT_DIR (M-BEIR's; image paths are relative to OUT_DIR):

    mbeir_images/demo_images/*.png
    mbeir_images/demo_clips/<scene>_<motion>/frame_{1..4}.png
    instructions/query_instructions.tsv
    query/train/mbeir_demo_train.jsonl                  all tasks, shuffled
    query/test/mbeir_demo_task{t}_test.jsonl
    qrels/test/mbeir_demo_task{t}_test_qrels.txt        "qid 0 did 1 task_id" per positive
    cand_pool/global/mbeir_demo_train_cand_pool.jsonl   every candidate the training queries name
    cand_pool/global/mbeir_union_test_cand_pool.jsonl   union of the local test pools (mixed modalities)
    cand_pool/local/mbeir_demo_task{t}_cand_pool.jsonl
    nli_demo.csv                                        stage-1 triplets: sent0, sent1 (paraphrase), hard_neg
    demo_benchmark.json                                 manifest: tasks, files, sizes
"""

import argparse
import csv
import itertools
import json
import math
import os
import random
import zlib
from collections import namedtuple

from PIL import Image, ImageDraw


Scene = namedtuple("Scene", "shape colour count position background")
DemoTask = namedtuple("DemoTask", "task_id dataset_id name query_modality cand_modality instructions")

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "pentagon")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20),
           "orange": (245, 130, 20), "purple": (140, 50, 170), "black": (20, 20, 20), "pink": (245, 120, 180)}
COUNTS = (1, 2, 3)
# Position name -> centre as a fraction of the image side, and its wordings (the first is the caption's).
POSITIONS = {
    "top left": ((0.27, 0.27), ("at the top left", "in the top-left corner", "in the upper left")),
    "top right": ((0.73, 0.27), ("at the top right", "in the top-right corner", "in the upper right")),
    "bottom left": ((0.27, 0.73), ("at the bottom left", "in the bottom-left corner", "in the lower left")),
    "bottom right": ((0.73, 0.73), ("at the bottom right", "in the bottom-right corner", "in the lower right")),
    "centre": ((0.5, 0.5), ("in the centre", "in the middle", "at the centre")),
}
BACKGROUNDS = {"white": (255, 255, 255), "grey": (190, 190, 190)}
COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of"), 3: ("three", "a group of three")}
# Object centres in units of the object radius, per count.
LAYOUTS = {1: ((0.0, 0.0),), 2: ((-1.2, 0.0), (1.2, 0.0)), 3: ((-1.2, 0.9), (1.2, 0.9), (0.0, -1.1))}

TASKS = (
    DemoTask(0, 10, "DemoCaptionToImage", "text", "image", (
        "Find an image that matches the given description of shapes.",
        "Retrieve the picture described by this caption.",
        "Identify the drawing that shows the described shapes.")),
    DemoTask(1, 11, "DemoParaphrase", "text", "text", (
        "Find a sentence that says the same thing as this caption.",
        "Retrieve a paraphrase of the given description.",
        "Identify another way of writing this caption.")),
    DemoTask(2, 12, "DemoCaptionToTitledImage", "text", "image,text", (
        "Find the titled picture that matches the description.",
        "Retrieve an image and its title that fit this caption.",
        "Identify the labelled drawing this sentence describes.")),
    DemoTask(3, 13, "DemoImageToCaption", "image", "text", (
        "Find a caption that describes this drawing.",
        "Retrieve the sentence describing the shapes in this image.",
        "Identify the description of this picture.")),
    DemoTask(4, 14, "DemoSameScene", "image", "image", (
        "Find another rendering of the same scene.",
        "Retrieve the image showing the same shapes in the same place.",
        "Identify the picture of this exact scene.")),
    DemoTask(7, 15, "DemoComposed", "image,text", "image", (
        "Find the image that applies the requested change to this picture.",
        "Retrieve the drawing edited as the text says.",
        "Identify the picture that looks like this one after the described change.")),
    DemoTask(10, 16, "DemoCaptionToClip", "text", "video", (
        "Find the clip that matches the given description of moving shapes.",
        "Retrieve the video described by this caption.",
        "Identify the animation that shows the described motion.")),
)

IMAGE_DIR = "mbeir_images/demo_images"
CLIP_DIR = "mbeir_images/demo_clips"
# Motion name -> step per frame in units of the image side
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
CLIP_FRAMES = 4
CLIP_STEP = 0.07


# ----------------------------------------------------------------------------------------------------------------
# Words
# ----------------------------------------------------------------------------------------------------------------
def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _counted(scene: Scene, count_word: str) -> str:
    """`"two red circles"`, `"an orange star"`."""
    noun = scene.shape if scene.count == 1 else _plural(scene.shape)
    if count_word == "a" and scene.colour[0] in "aeiou":
        count_word = "an"
    return f"{count_word} {scene.colour} {noun}"


def caption(scene: Scene) -> str:
    """The canonical caption: names every attribute of the scene."""
    where = POSITIONS[scene.position][1][0]
    return f"{_counted(scene, COUNT_WORDS[scene.count][0])} {where} on a {scene.background} background"


def paraphrase(scene: Scene) -> str:
    """Another wording of `caption(scene)`, fixed per scene."""
    choice = zlib.crc32(repr(scene).encode())
    counted = _counted(scene, COUNT_WORDS[scene.count][choice % len(COUNT_WORDS[scene.count])])
    wordings = POSITIONS[scene.position][1]
    where = wordings[1 + (choice >> 4) % (len(wordings) - 1)]
    templates = (
        f"{where}, {counted} against {scene.background}",
        f"a {scene.background} canvas with {counted} {where}",
        f"{counted} placed {where}; the background is {scene.background}",
    )
    return templates[(choice >> 8) % len(templates)]


def title(scene: Scene) -> str:
    """The short title of a task-2 candidate: colour and shape only, so the image must settle count and place."""
    return f"{scene.colour} {scene.shape}"


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------
def _polygon(cx: float, cy: float, radii: list[float], rotation: float = -math.pi / 2) -> list[tuple[float, float]]:
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.cos(rotation + i * step), cy + r * math.sin(rotation + i * step))
            for i, r in enumerate(radii)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
    elif shape == "cross":
        w = 0.35 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        radii = {"triangle": [r] * 3, "diamond": [r] * 4, "pentagon": [r] * 5, "hexagon": [r] * 6,
                 "star": [r, 0.45 * r] * 5}[shape]
        draw.polygon(_polygon(cx, cy, radii), fill=fill)


def clip_caption(scene: Scene, motion: str) -> str:
    """The caption of a clip: the scene's, and where its shapes move."""
    return f"{caption(scene)}, moving {motion}"


def render(scene: Scene, size: int, jitter: random.Random | None = None,
           offset: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """The scene drawn on a `size` x `size` RGB canvas, its shapes shifted by `offset` (in units of the side);
    `jitter` shifts, rescales and recolours it slightly."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    (fx, fy), _ = POSITIONS[scene.position]
    radius = size * (0.13 if scene.count == 1 else 0.085)
    dx, dy = offset[0] * size, offset[1] * size
    fill = COLOURS[scene.colour]
    if jitter is not None:
        dx, dy = (d + jitter.uniform(-0.04, 0.04) * size for d in (dx, dy))
        radius *= jitter.uniform(0.85, 1.15)
        fill = tuple(min(255, max(0, c + jitter.randint(-15, 15))) for c in fill)
    for ox, oy in LAYOUTS[scene.count]:
        _draw_shape(draw, scene.shape, fx * size + dx + ox * radius, fy * size + dy + oy * radius, radius, fill)
    return image


def _slug(scene: Scene) -> str:
    return f"{scene.shape}_{scene.colour}_{scene.count}_{scene.position.replace(' ', '')}_{scene.background}"


# ----------------------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------------------
class _Benchmark:
    """Collects images, candidates (one registry per dataset, so equal content shares a did) and queries."""

    def __init__(self, out_dir: str, seed: int, image_size: int):
        self.out_dir = out_dir
        self.rng = random.Random(seed)
        self.image_size = image_size
        self.num_jittered = 0
        self.rendered = set()
        self.candidates = {}  # did -> record
        self.dids = {}  # (dataset_id, txt, img_path) -> did
        self.next_did = {task.dataset_id: 0 for task in TASKS}
        self.next_qid = {task.dataset_id: 0 for task in TASKS}
        os.makedirs(os.path.join(out_dir, IMAGE_DIR), exist_ok=True)

    def image(self, scene: Scene, jittered: bool = False) -> str:
        """Path (relative to the benchmark root) of a rendering of `scene`, drawn on first use."""
        if jittered:
            self.num_jittered += 1
            name = f"{_slug(scene)}_v{self.num_jittered}.png"
        else:
            name = f"{_slug(scene)}.png"
        path = f"{IMAGE_DIR}/{name}"
        if path not in self.rendered:
            self.rendered.add(path)
            render(scene, self.image_size, self.rng if jittered else None).save(os.path.join(self.out_dir, path),
                                                                              format="PNG")
        return path

    def clip(self, scene: Scene, motion: str) -> str:
        """Path (relative to the benchmark root) of the folder of frames of `scene` moving `motion`, drawn on first
        use: the shapes step across the frame, centred on the scene's position."""
        path = f"{CLIP_DIR}/{_slug(scene)}_{motion}"
        if path not in self.rendered:
            self.rendered.add(path)
            os.makedirs(os.path.join(self.out_dir, path), exist_ok=True)
            step_x, step_y = MOTIONS[motion]
            for frame in range(CLIP_FRAMES):
                shift = (frame - (CLIP_FRAMES - 1) / 2) * CLIP_STEP
                render(scene, self.image_size, offset=(step_x * shift, step_y * shift)).save(
                    os.path.join(self.out_dir, path, f"frame_{frame + 1}.png"), format="PNG")
        return path

    def candidate(self, task: DemoTask, scene: Scene, motion: str | None = None) -> str:
        """The did of `task`'s candidate for `scene` (moving `motion`, for a clip), created on first use."""
        txt, img_path, video_path = None, None, None
        if task.cand_modality == "text":
            txt = paraphrase(scene) if task.task_id == 1 else caption(scene)
        elif task.cand_modality == "image,text":
            txt = title(scene)
        if task.cand_modality == "video":
            video_path = self.clip(scene, motion)
        elif task.cand_modality != "text":
            img_path = self.image(scene)
        key = (task.dataset_id, txt, img_path, video_path)
        if key not in self.dids:
            did = f"{task.dataset_id}:{self.next_did[task.dataset_id]}"
            self.next_did[task.dataset_id] += 1
            self.dids[key] = did
            record = {"txt": txt, "img_path": img_path, "modality": task.cand_modality, "did": did,
                      "src_content": None}
            if video_path is not None:
                record["video_path"] = video_path
            self.candidates[did] = record
        return self.dids[key]

    def near_miss(self, scene: Scene, split: set, avoid: set) -> Scene:
        """A scene of `split` one attribute away from `scene` (any other scene of `split` if none is free)."""
        options = {"shape": SHAPES, "colour": tuple(COLOURS), "count": COUNTS, "position": tuple(POSITIONS),
                   "background": tuple(BACKGROUNDS)}
        attributes = list(options)
        self.rng.shuffle(attributes)
        for attribute in attributes:
            values = [v for v in options[attribute] if v != getattr(scene, attribute)]
            self.rng.shuffle(values)
            for value in values:
                other = scene._replace(**{attribute: value})
                if other in split and other not in avoid:
                    return other
        return self.rng.choice(sorted(split - avoid - {scene}))

    def edit(self, scene: Scene, split: set) -> tuple[Scene, str]:
        """A task-7 edit of `scene` that lands in `split`: the edited scene and the query text."""
        edits = [(scene._replace(colour=c), f"the same but {c}") for c in COLOURS if c != scene.colour]
        edits += [(scene._replace(shape=s), f"the same but as {_plural(s) if scene.count > 1 else 'a ' + s}")
                  for s in SHAPES if s != scene.shape]
        edits += [(scene._replace(position=p), f"the same but moved to the {p}")
                  for p in POSITIONS if p != scene.position]
        edits += [(scene._replace(count=n), f"the same but with {COUNT_WORDS[n][0] if n > 1 else 'only one'} of them")
                  for n in COUNTS if n != scene.count]
        edits += [(scene._replace(background=b), f"the same on a {b} background")
                  for b in BACKGROUNDS if b != scene.background]
        self.rng.shuffle(edits)
        # Some edit almost surely stays in the split; if none does, the first is used and crosses it.
        return next(((edited, text) for edited, text in edits if edited in split), edits[0])

    def query(self, task: DemoTask, scene: Scene, split: set, num_negatives: int) -> tuple[dict, list[str]]:
        """A query record (hard negatives in `neg_cand_list` when `num_negatives`) and its distractor dids.

        Distractors are candidates a test pool adds: a near miss of the positive, and task 7's reference image.
        """
        target, text, image = scene, None, None
        if task.cand_modality == "video":
            return self.clip_query(task, scene, split, num_negatives)
        if task.task_id == 7:
            target, text = self.edit(scene, split)
            image = self.image(scene)
        elif task.query_modality == "text":
            text = caption(scene)
        else:
            image = self.image(scene, jittered=task.task_id == 4)
        positive = self.candidate(task, target)
        misses = []
        for _ in range(max(num_negatives, 1)):
            misses.append(self.near_miss(target, split, avoid={target, scene, *misses}))
        distractors = [self.candidate(task, miss) for miss in misses]
        if task.task_id == 7:  # the reference image is the natural hard negative of composed retrieval
            distractors.insert(0, self.candidate(task, scene))
        qid = f"{task.dataset_id}:{self.next_qid[task.dataset_id]}"
        self.next_qid[task.dataset_id] += 1
        record = {"qid": qid, "query_txt": text, "query_img_path": image, "query_modality": task.query_modality,
                  "query_src_content": None, "pos_cand_list": [positive],
                  "neg_cand_list": distractors[:num_negatives], "task_id": task.task_id}
        return record, distractors[: 2 if task.task_id == 7 else 1]


    def clip_query(self, task: DemoTask, scene: Scene, split: set, num_negatives: int) -> tuple[dict, list[str]]:
        """A caption -> clip query: the scene moving one way; its near misses move the same scene another way (what
        only the frames together tell apart), then move a scene one attribute away the same way."""
        motions = list(MOTIONS)
        motion = self.rng.choice(motions)
        positive = self.candidate(task, scene, motion)
        others = [other for other in motions if other != motion]
        self.rng.shuffle(others)
        misses = [(scene, others[0])]
        while len(misses) < max(num_negatives, 1):
            misses.append((self.near_miss(scene, split, avoid={scene, *(m for m, _ in misses)}), motion))
        distractors = [self.candidate(task, miss, miss_motion) for miss, miss_motion in misses]
        qid = f"{task.dataset_id}:{self.next_qid[task.dataset_id]}"
        self.next_qid[task.dataset_id] += 1
        record = {"qid": qid, "query_txt": clip_caption(scene, motion), "query_img_path": None,
                  "query_modality": task.query_modality, "query_src_content": None, "pos_cand_list": [positive],
                  "neg_cand_list": distractors[:num_negatives], "task_id": task.task_id}
        return record, distractors[:1]


def _write_jsonl(path: str, records) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _split_sizes(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _did_order(did: str) -> tuple[int, int]:
    dataset_id, number = did.split(":")
    return int(dataset_id), int(number)


def make_demo_benchmark(out_dir, seed: int = 0, num_train: int = 480, num_test: int = 40, num_negatives: int = 2,
                        num_nli: int = 512, image_size: int = 96) -> dict:
    """Writes the demo benchmark to `out_dir` (see the module docstring); returns the manifest.

    Args:
        out_dir: output folder (created; files of an earlier run with other sizes are not removed).
        seed: seed of every random choice; the same seed and sizes give byte-identical files.
        num_train: training queries in all, spread evenly over the tasks.
        num_test: test queries per task.
        num_negatives: hard negatives listed per training query.
        num_nli: rows of `nli_demo.csv`.
        image_size: side of the square PNG images, in pixels.
    """
    scenes = [Scene(*values) for values in itertools.product(SHAPES, COLOURS, COUNTS, POSITIONS, BACKGROUNDS)]
    half = len(scenes) // 2
    if not len(TASKS) <= num_train <= half * len(TASKS):
        raise ValueError(f"num_train={num_train} must lie in {len(TASKS)}..{half * len(TASKS)} "
                         f"(training scenes per task: {half}).")
    if not 1 <= num_test <= half:
        raise ValueError(f"num_test={num_test} must lie in 1..{half} (test scenes per task).")
    if num_negatives < 0 or num_nli < 1 or image_size < 32:
        raise ValueError(f"Need num_negatives >= 0, num_nli >= 1 and image_size >= 32; got {num_negatives}, "
                         f"{num_nli}, {image_size}.")
    out_dir = os.fspath(out_dir)
    bench = _Benchmark(out_dir, seed, image_size)
    bench.rng.shuffle(scenes)
    splits = {"train": scenes[:half], "test": scenes[half:]}
    split_sets = {name: set(values) for name, values in splits.items()}

    train_queries = []
    for task, count in zip(TASKS, _split_sizes(num_train, len(TASKS))):
        for scene in bench.rng.sample(splits["train"], count):
            train_queries.append(bench.query(task, scene, split_sets["train"], num_negatives)[0])
    train_pool_dids = sorted({did for q in train_queries for did in q["pos_cand_list"] + q["neg_cand_list"]},
                             key=_did_order)
    bench.rng.shuffle(train_queries)

    test_files = {}
    for task in TASKS:
        queries, local = [], []
        for scene in bench.rng.sample(splits["test"], num_test):
            record, distractors = bench.query(task, scene, split_sets["test"], num_negatives=0)
            queries.append(record)
            local += record["pos_cand_list"] + distractors
        test_files[task] = (queries, sorted(set(local), key=_did_order))

    paths = {
        "train_file": "query/train/mbeir_demo_train.jsonl",
        "train_pool_file": "cand_pool/global/mbeir_demo_train_cand_pool.jsonl",
        "union_test_pool_file": "cand_pool/global/mbeir_union_test_cand_pool.jsonl",
        "instructions_file": "instructions/query_instructions.tsv",
        "nli_file": "nli_demo.csv",
    }
    for folder in ("query/train", "query/test", "qrels/test", "cand_pool/global", "cand_pool/local", "instructions"):
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    _write_jsonl(os.path.join(out_dir, paths["train_file"]), train_queries)
    _write_jsonl(os.path.join(out_dir, paths["train_pool_file"]), (bench.candidates[d] for d in train_pool_dids))

    manifest_tasks, union = [], set()
    for task, (queries, local) in test_files.items():
        stem = f"mbeir_demo_task{task.task_id}"
        files = {"test_file": f"query/test/{stem}_test.jsonl", "qrels_file": f"qrels/test/{stem}_test_qrels.txt",
                 "local_pool_file": f"cand_pool/local/{stem}_cand_pool.jsonl"}
        _write_jsonl(os.path.join(out_dir, files["test_file"]), queries)
        _write_jsonl(os.path.join(out_dir, files["local_pool_file"]), (bench.candidates[d] for d in local))
        with open(os.path.join(out_dir, files["qrels_file"]), "w", encoding="utf-8", newline="\n") as f:
            for query in queries:
                for did in query["pos_cand_list"]:
                    f.write(f"{query['qid']} 0 {did} 1 {task.task_id}\n")
        union.update(local)
        manifest_tasks.append({
            "task_id": task.task_id, "dataset_id": str(task.dataset_id), "name": task.name,
            "query_modality": task.query_modality, "cand_modality": task.cand_modality,
            "num_train": sum(q["task_id"] == task.task_id for q in train_queries), "num_test": len(queries),
            "local_pool_size": len(local), **files,
        })
    _write_jsonl(os.path.join(out_dir, paths["union_test_pool_file"]),
                 (bench.candidates[d] for d in sorted(union, key=_did_order)))

    with open(os.path.join(out_dir, paths["instructions_file"]), "w", encoding="utf-8", newline="\n") as f:
        f.write("query_modality\tcand_modality\tdataset\tdataset_id\t"
                + "\t".join(f"prompt_{i + 1}" for i in range(max(len(t.instructions) for t in TASKS))) + "\n")
        for task in TASKS:
            f.write("\t".join([task.query_modality, task.cand_modality, task.name, str(task.dataset_id),
                               *task.instructions]) + "\n")

    with open(os.path.join(out_dir, paths["nli_file"]), "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["sent0", "sent1", "hard_neg"])
        for i in range(num_nli):
            scene = splits["train"][i % half]
            miss = bench.near_miss(scene, split_sets["train"], avoid={scene})
            writer.writerow([caption(scene), paraphrase(scene), caption(miss)])

    manifest = {
        "seed": seed, "image_size": image_size, "image_root": ".", "num_train": len(train_queries),
        "train_pool_size": len(train_pool_dids), "union_test_pool_size": len(union),
        "num_images": sum(path.startswith(IMAGE_DIR) for path in bench.rendered),
        "num_clips": sum(path.startswith(CLIP_DIR) for path in bench.rendered), **paths, "tasks": manifest_tasks,
    }
    with open(os.path.join(out_dir, "demo_benchmark.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=480, help="training queries in all")
    parser.add_argument("--num-test", type=int, default=40, help="test queries per task")
    parser.add_argument("--num-negatives", type=int, default=2, help="hard negatives per training query")
    parser.add_argument("--num-nli", type=int, default=512, help="rows of nli_demo.csv")
    parser.add_argument("--image-size", type=int, default=96)
    args = parser.parse_args()
    manifest = make_demo_benchmark(args.out_dir, args.seed, args.num_train, args.num_test, args.num_negatives,
                                   args.num_nli, args.image_size)
    print(f"wrote the demo benchmark to {args.out_dir}: {manifest['num_train']} training queries, "
          f"{len(manifest['tasks'])} test tasks of {args.num_test} queries, union test pool of "
          f"{manifest['union_test_pool_size']} candidates, {manifest['num_images']} images, "
          f"{manifest['num_clips']} clips")


if __name__ == "__main__":
    main()

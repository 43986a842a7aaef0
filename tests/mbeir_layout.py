"""Tiny data trees laid out exactly like the real datasets, for tests that run shipped configs and the CLIs.

`write_mbeir_tree(root)` writes a few records per task in UniIR's M-BEIR layout (TIGER-Lab/M-BEIR on the Hub: file
names, record fields, dataset ids, qrels format, image folders), so a path that is wrong for the real dataset is wrong
here too:

    mbeir_images/{dataset}_images/{split}/{dataset}_{n}.jpg     JPEG files; records hold these relative paths
    instructions/query_instructions.tsv
    query/train/mbeir_{dataset}_train.jsonl
    query/union_train/mbeir_union_up_train.jsonl                 every training query (the release's stage 2)
    query/test/mbeir_{dataset}_task{t}_test.jsonl
    qrels/test/mbeir_{dataset}_task{t}_test_qrels.txt            "qid 0 did 1 task_id" per positive
    cand_pool/global/mbeir_union_train_cand_pool.jsonl           every candidate a training query names
    cand_pool/global/mbeir_union_test_cand_pool.jsonl            union of the local test pools
    cand_pool/local/mbeir_{pool}_cand_pool.jsonl                 {dataset}_task{t}; MSCOCO's is {dataset}_task{t}_test

`write_simcse_nli(path)` writes SimCSE's `nli_for_simcse.csv` (sent0, sent1, hard_neg).
"""

import csv
import json
import os
import random

from PIL import Image, ImageDraw


# UniIR's dataset ids (src/data/preprocessing/utils.py, DATASET_IDS).
DATASET_IDS = {"visualnews": 0, "fashion200k": 1, "webqa": 2, "edis": 3, "nights": 4, "oven": 5, "infoseek": 6,
               "fashioniq": 7, "cirr": 8, "mscoco": 9}
# (dataset, task id, query modality, candidate modality, instruction): a subset covering every modality pair shape.
TASKS = (
    ("visualnews", 0, "text", "image", "Identify the news photo for the given caption."),
    ("webqa", 1, "text", "text", "Retrieve passages from Wikipedia that provide answers to the following question."),
    ("webqa", 2, "text", "image,text", "Find a Wikipedia image that answers this question."),
    ("mscoco", 3, "image", "text", "Find an image caption describing the following everyday image."),
    ("nights", 4, "image", "image", "Find a day-to-day image that looks similar to the provided image."),
    ("cirr", 7, "image,text", "image", "Retrieve a day-to-day image that aligns with the modification instructions of the provided image."),
)
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "pink")
SHAPES = ("circle", "square", "triangle", "star")


def _local_pool_name(dataset: str, task_id: int) -> str:
    return f"{dataset}_task{task_id}_test" if dataset == "mscoco" else f"{dataset}_task{task_id}"


def _write_jsonl(path: str, records) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


class _Tree:
    def __init__(self, root: str, seed: int, image_size: int):
        self.root, self.rng, self.image_size = root, random.Random(seed), image_size
        self.candidates = {}  # did -> record
        self.next_did = {name: 0 for name in DATASET_IDS}
        self.next_qid = {name: 0 for name in DATASET_IDS}
        self.next_image = {name: 0 for name in DATASET_IDS}

    def image(self, dataset: str, split: str, colour: str, shape: str) -> str:
        """A new JPEG of a coloured shape; returns its path relative to the root."""
        self.next_image[dataset] += 1
        path = f"mbeir_images/{dataset}_images/{split}/{dataset}_{self.next_image[dataset]}.jpg"
        os.makedirs(os.path.join(self.root, os.path.dirname(path)), exist_ok=True)
        image = Image.new("RGB", (self.image_size, self.image_size), "white")
        box = [4, 4, self.image_size - 4, self.image_size - 4]
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape in ("circle", "star") else draw.rectangle)(box, fill=colour)
        image.save(os.path.join(self.root, path), format="JPEG")
        return path

    def candidate(self, dataset: str, split: str, modality: str, colour: str, shape: str) -> str:
        did = f"{DATASET_IDS[dataset]}:{self.next_did[dataset]}"
        self.next_did[dataset] += 1
        text = f"A {colour} {shape}." if modality != "image" else None
        image = self.image(dataset, split, colour, shape) if modality != "text" else None
        self.candidates[did] = {"txt": text, "img_path": image, "modality": modality, "did": did,
                                "src_content": None}
        return did

    def query(self, dataset: str, task_id: int, split: str, query_modality: str, cand_modality: str) -> dict:
        colour, shape = self.rng.choice(COLOURS), self.rng.choice(SHAPES)
        other = self.rng.choice([c for c in COLOURS if c != colour])
        qid = f"{DATASET_IDS[dataset]}:{self.next_qid[dataset]}"
        self.next_qid[dataset] += 1
        text = f"What shows a {colour} {shape}?" if "text" in query_modality else None
        image = self.image(dataset, split, colour if query_modality == "image" else other, shape) \
            if "image" in query_modality else None
        if query_modality == "image,text":
            text = f"Make it {colour}."
        return {"qid": qid, "query_txt": text, "query_img_path": image, "query_modality": query_modality,
                "query_src_content": None,
                "pos_cand_list": [self.candidate(dataset, split, cand_modality, colour, shape)],
                "neg_cand_list": [self.candidate(dataset, split, cand_modality, other, shape)],
                "task_id": task_id}


def write_mbeir_tree(root, num_train: int = 4, num_test: int = 3, seed: int = 0, image_size: int = 32) -> dict:
    """Writes a tiny M-BEIR tree under `root` (see the module docstring) and returns its paths, relative to `root`:
    `train_queries`, `candidate_pool`, `instructions`, `union_test_pool`, and `tasks` (one dict per task with
    `name`, `query_file`, `pool_file`, `qrels_file`)."""
    root = os.fspath(root)
    tree = _Tree(root, seed, image_size)
    train = {}
    for dataset, task_id, query_modality, cand_modality, _ in TASKS:
        train.setdefault(dataset, []).extend(
            tree.query(dataset, task_id, "train", query_modality, cand_modality) for _ in range(num_train))
    for dataset, queries in train.items():
        _write_jsonl(os.path.join(root, f"query/train/mbeir_{dataset}_train.jsonl"), queries)
    union = [query for queries in train.values() for query in queries]
    tree.rng.shuffle(union)
    paths = {"train_queries": "query/union_train/mbeir_union_up_train.jsonl",
             "candidate_pool": "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
             "instructions": "instructions/query_instructions.tsv",
             "union_test_pool": "cand_pool/global/mbeir_union_test_cand_pool.jsonl", "tasks": []}
    _write_jsonl(os.path.join(root, paths["train_queries"]), union)
    train_dids = sorted({did for q in union for did in q["pos_cand_list"] + q["neg_cand_list"]},
                        key=lambda did: tuple(map(int, did.split(":"))))
    _write_jsonl(os.path.join(root, paths["candidate_pool"]), (tree.candidates[did] for did in train_dids))

    test_dids = []
    for dataset, task_id, query_modality, cand_modality, _ in TASKS:
        name = f"{dataset}_task{task_id}"
        queries = [tree.query(dataset, task_id, "test", query_modality, cand_modality) for _ in range(num_test)]
        pool = [did for q in queries for did in q["pos_cand_list"] + q["neg_cand_list"]]
        task = {"name": name, "query_file": f"query/test/mbeir_{name}_test.jsonl",
                "pool_file": f"cand_pool/local/mbeir_{_local_pool_name(dataset, task_id)}_cand_pool.jsonl",
                "qrels_file": f"qrels/test/mbeir_{name}_test_qrels.txt"}
        _write_jsonl(os.path.join(root, task["query_file"]), queries)
        _write_jsonl(os.path.join(root, task["pool_file"]), (tree.candidates[did] for did in pool))
        os.makedirs(os.path.join(root, "qrels/test"), exist_ok=True)
        with open(os.path.join(root, task["qrels_file"]), "w", encoding="utf-8", newline="\n") as f:
            f.writelines(f"{q['qid']} 0 {did} 1 {task_id}\n" for q in queries for did in q["pos_cand_list"])
        paths["tasks"].append(task)
        test_dids += pool
    _write_jsonl(os.path.join(root, paths["union_test_pool"]), (tree.candidates[did] for did in test_dids))

    os.makedirs(os.path.join(root, "instructions"), exist_ok=True)
    with open(os.path.join(root, paths["instructions"]), "w", encoding="utf-8", newline="\n") as f:
        f.write("query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1\tprompt_2\n")
        for dataset, _, query_modality, cand_modality, instruction in TASKS:
            f.write(f"{query_modality}\t{cand_modality}\t{dataset}\t{DATASET_IDS[dataset]}\t{instruction}\t"
                    f"Please {instruction[0].lower()}{instruction[1:]}\n")
    return paths


def write_simcse_nli(path, num_rows: int = 16, seed: int = 0) -> str:
    """Writes SimCSE's `nli_for_simcse.csv` format: `sent0`, `sent1` (entailment), `hard_neg` (contradiction)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["sent0", "sent1", "hard_neg"])
        for _ in range(num_rows):
            colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
            other = rng.choice([c for c in COLOURS if c != colour])
            writer.writerow([f"A {colour} {shape} lies on the table.", f"There is a {colour} {shape}.",
                             f"There is a {other} {shape}."])
    return path

"""A tiny MMEB-V2 tree in the layout TIGER-Lab/MMEB-V2 is released in, written offline: video frame folders (JPEG
frames of moving drawn shapes), visual-document pages (drawn PDF pages rendered to PNG), an image task, and each
task's annotations as a 🤗 dataset folder (parquet files and the README configurations the Hub's datasets carry),
one task of every reader kind and every video QA format."""

import os

from PIL import Image

from media_fixtures import draw_page, moving_shape_frames, write_pdf

SHAPES = [("square", "red", (1, 0)), ("circle", "blue", (0, 1)), ("triangle", "green", (1, 1)),
          ("square", "yellow", (-1, 0)), ("circle", "red", (0, -1)), ("triangle", "blue", (-1, 1))]


def write_frames(folder, variant: int, count: int = 6, size=(32, 24)) -> None:
    """`count` JPEG frames `frame_1.jpg`, ..., `frame_N.jpg` of a moving shape (natural order differs from the
    lexical one past 9 frames)."""
    os.makedirs(folder, exist_ok=True)
    shape, colour, direction = SHAPES[variant % len(SHAPES)]
    for number, frame in enumerate(moving_shape_frames(count, size, shape, colour, direction), 1):
        Image.fromarray(frame).save(os.path.join(folder, f"frame_{number}.jpg"), quality=95)


def write_hf_dataset(folder, configs: dict[str, dict[str, list[dict]]], features=None) -> None:
    """A 🤗 dataset folder as the Hub holds one: `<config>/<split>-00000-of-00001.parquet` and a README.md whose
    `configs` name each configuration's files (`default` is loaded without a configuration name)."""
    from datasets import Dataset

    os.makedirs(folder, exist_ok=True)
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            os.makedirs(os.path.join(folder, config), exist_ok=True)
            Dataset.from_list(rows, features=(features or {}).get(config)).to_parquet(
                os.path.join(folder, config, f"{split}-00000-of-00001.parquet"))
            card += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(card + ["---", ""]))


def write_mmeb_v2_tree(root) -> dict:
    """Writes the tree under `root` (annotations under `root/annotations`); returns what the tests check against."""
    from datasets import Features, Image as ImageFeature, Value

    root = os.fspath(root)
    annotations = os.path.join(root, "annotations")
    frames = os.path.join(root, "video-tasks", "frames")

    def dataset(repo, configs, features=None):
        write_hf_dataset(os.path.join(annotations, *repo.split("/")), configs, features)

    # video classification: UCF101 against every label; SSv2 against its own candidate texts
    ucf = [{"video_id": f"v_{i}", "pos_text": label}
           for i, label in enumerate(["Archery", "Bowling", "Diving", "Archery"])]
    for i, row in enumerate(ucf):
        write_frames(os.path.join(frames, "video_cls", "UCF101", row["video_id"]), i, count=12)
    dataset("VLM2Vec/UCF101", {"default": {"test": ucf}})
    ssv2 = [{"video_id": 100 + i, "pos_text": pos, "neg_text": negatives}
            for i, (pos, negatives) in enumerate([("Pushing something", ["Pulling something", "Pushing something"]),
                                                  ("Opening something", ["Opening something", "Closing something",
                                                                         "Folding something"])])]
    for i, row in enumerate(ssv2):
        write_frames(os.path.join(frames, "video_cls", "SSv2", str(row["video_id"])), i + 2)
    dataset("VLM2Vec/SmthSmthV2", {"default": {"test": ssv2}})

    # video retrieval: MSR-VTT's test_1k captions against every video
    msrvtt = [{"video_id": f"video{i}", "video": f"video{i}.mp4", "caption": caption}
              for i, caption in enumerate(["a red square moves right", "a blue circle falls", "a green triangle"])]
    for i, row in enumerate(msrvtt):
        write_frames(os.path.join(frames, "video_ret", "MSR-VTT", row["video_id"]), i)
    dataset("VLM2Vec/MSR-VTT", {"test_1k": {"test": msrvtt}})

    # moment retrieval: QVHighlight (query frames and clip folders per video), MomentSeeker (text, image or video)
    qvh = [{"query": "the circle reaches the bottom", "video_path": "clips/qv1.mp4"},
           {"query": "a square appears", "video_path": "clips/qv2.mp4"}]
    for i, row in enumerate(qvh):
        video = os.path.splitext(os.path.basename(row["video_path"]))[0]
        folder = os.path.join(frames, "video_mret", "QVHighlight", video)
        for j, clip in enumerate(["query", "positive_1", "negative_1", "negative_2"]):
            write_frames(os.path.join(folder, clip), i + j, count=4)
    dataset("VLM2Vec/QVHighlight", {"default": {"test": qvh}})
    seeker_root = os.path.join(frames, "video_mret", "MomentSeeker")
    seeker = [{"query": "a triangle moving", "input_frames": "",
               "positive_frames": [{"output_path": "ms/a/pos.mp4"}],
               "negative_frames": [{"output_path": "ms/a/neg1.mp4"}, {"output_path": "ms/a/neg2.mp4"}]},
              {"query": "the same shape later", "input_frames": "ms/b/input.mp4",
               "positive_frames": [{"output_path": "ms/b/pos.mp4"}],
               "negative_frames": [{"output_path": "ms/b/neg1.mp4"}]},
              {"query": "this shape in motion", "input_frames": "still.jpg",
               "positive_frames": [{"output_path": "ms/c/pos.mp4"}, {"output_path": "ms/c/pos2.mp4"}],
               "negative_frames": [{"output_path": "ms/c/neg1.mp4"}]}]
    for i, clip in enumerate(["ms_a_pos", "ms_a_neg1", "ms_a_neg2", "ms_b_input", "ms_b_pos", "ms_b_neg1", "ms_c_pos",
                              "ms_c_pos2", "ms_c_neg1"]):
        write_frames(os.path.join(seeker_root, "video_frames", clip), i, count=4)
    Image.fromarray(moving_shape_frames(1, (32, 24), "circle", "green")[0]).save(
        os.path.join(seeker_root, "query_still.jpg"))
    dataset("VLM2Vec/MomentSeeker", {"default": {"test": seeker}})

    # video QA, one task of each format
    qa = os.path.join(frames, "video_qa")
    videomme = [{"question": "Which way does the shape move?", "videoID": "mme1", "question_id": "1-1",
                 "options": ["A. Left.", "B. Right.", "C. Up.", "D. Down."], "answer": "B", "domain": "x",
                 "sub_category": "y"}]
    write_frames(os.path.join(qa, "Video-MME", "mme1"), 0, count=10)
    dataset("VLM2Vec/Video-MME", {"default": {"test": videomme}})
    nextqa = [{"video": 4010, "question": "what colour is the shape", "answer": 2, "qid": 7, "type": "DC",
               **{f"a{i}": option for i, option in enumerate(["red", "green", "blue", "yellow", "black"])}}]
    write_frames(os.path.join(qa, "NExTQA", "4010"), 1)
    dataset("VLM2Vec/NExTQA", {"MC": {"test": nextqa}})
    ego = [{"video_idx": "ego-1", "question": "What is the shape doing?", "answer": "0", "question_idx": "q0",
            "option": ["A. moving down", "B. standing still", "C. spinning", "D. growing", "E. fading"]}]
    write_frames(os.path.join(qa, "EgoSchema", "ego-1"), 1)
    dataset("VLM2Vec/EgoSchema", {"Subset": {"test": ego}})
    mvbench = [{"subset": "action_sequence", "question": "What happened first?", "video": "clip7.mp4",
                "candidates": ["it moved", "it stopped", "it vanished"], "answer": "it moved"}]
    write_frames(os.path.join(qa, "MVBench", "action_sequence", "clip7.mp4"), 2)
    dataset("VLM2Vec/MVBench", {"default": {"train": mvbench}})
    anet = [{"video_name": "abc", "question": "is the shape red", "answer": "yes", "question_id": "a1"},
            {"video_name": "abd", "question": "is the shape red", "answer": "no", "question_id": "a2"}]
    for i, row in enumerate(anet):
        write_frames(os.path.join(qa, "ActivityNetQA", f"v_{row['video_name']}"), [0, 1][i])
    dataset("VLM2Vec/ActivityNetQA", {"default": {"test": anet}})

    # visual documents: ViDoRe's pages saved as PNGs in visdoc-tasks (rendered from a PDF), VisRAG's in its corpus
    import pypdfium2

    pdf = write_pdf(os.path.join(root, "pages.pdf"), [draw_page(n) for n in range(1, 6)])
    document = pypdfium2.PdfDocument(pdf)
    pages = [document[i].render(scale=1).to_pil().convert("RGB") for i in range(len(document))]
    document.close()
    os.makedirs(os.path.join(root, "visdoc-tasks", "ViDoRe_arxivqa"))
    for i, page in enumerate(pages):
        page.save(os.path.join(root, "visdoc-tasks", "ViDoRe_arxivqa", f"p{i}.png"))
    beir_queries = [{"query-id": f"q{i}", "query": text} for i, text in enumerate(
        ["revenue by region", "a blue circle on page two", "the title bar", "nothing relevant"])]
    qrels = [{"query-id": "q0", "corpus-id": "p0", "score": 1}, {"query-id": "q0", "corpus-id": "p3", "score": 2},
             {"query-id": "q1", "corpus-id": "p1", "score": 1}, {"query-id": "q1", "corpus-id": "p1", "score": 3},
             {"query-id": "q2", "corpus-id": "p4", "score": 1}, {"query-id": "q3", "corpus-id": "p2", "score": 0}]
    dataset("vidore/arxivqa_test_subsampled_beir", {
        "queries": {"test": beir_queries}, "qrels": {"test": qrels},
        "corpus": {"test": [{"corpus-id": f"p{i}"} for i in range(len(pages))]}})
    visrag_ids = [f"a_very_long_page_name_{'x' * 60}_{i}.png" for i in range(3)]
    dataset("openbmb/VisRAG-Ret-Test-ArxivQA", {
        "queries": {"train": beir_queries[:2]},
        "qrels": {"train": [{"query-id": "q0", "corpus-id": visrag_ids[2], "score": 1},
                            {"query-id": "q1", "corpus-id": visrag_ids[0], "score": 1}]},
        "corpus": {"train": [{"corpus-id": cid, "image": page} for cid, page in zip(visrag_ids, pages)]}},
        features={"corpus": Features({"corpus-id": Value("string"), "image": ImageFeature()})})

    # an image task: MMEB-eval's ImageNet-1K records, images under image-tasks/
    os.makedirs(os.path.join(root, "image-tasks", "ImageNet-1K"))
    names = ["red", "blue", "green"]
    for i, name in enumerate(names):
        Image.fromarray(moving_shape_frames(1, (32, 32), "square", name)[0]).save(
            os.path.join(root, "image-tasks", "ImageNet-1K", f"{name}.png"))
    dataset("TIGER-Lab/MMEB-eval", {"ImageNet-1K": {"test": [
        {"qry_inst": "<|image_1|> Represent the given image for classification", "qry_text": "",
         "qry_img_path": f"ImageNet-1K/{name}.png", "tgt_inst": "",
         "tgt_text": [name] + [other for other in names if other != name], "tgt_img_path": [""] * 3}
        for name in names]}})
    return {"root": root, "annotations": annotations, "visrag_ids": visrag_ids}

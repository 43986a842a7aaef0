"""Layer analysis (`puma_eval.analysis`, `eval_puma.py analyze`): statistics on a model built to have a known answer,
per-depth quality against the models pruned to each depth, budgets, and the command line on every data source."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_puma import PumaForEmbedding
from numerics import tolerance
from puma_eval.analysis import analysis_markdown, analyze, folder_pairs, mbeir_sample, pair_task, recommend
from puma_eval.encoding import encode_items
from puma_eval.mbeir import score_task

pytest.importorskip("faiss", reason="the analysis scores depths with the evaluation's faiss search")


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    from demo_data_puma import make_demo_benchmark

    root = tmp_path_factory.mktemp("demo_benchmark")
    make_demo_benchmark(root, num_train=6, num_test=6, num_negatives=1, num_nli=8, image_size=40)
    return str(root)


@pytest.fixture(scope="module")
def identity_layer_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny Qwen2-VL with decoder layer 3 turned into the identity: its attention output and MLP down
    projections are zero, so the residual stream leaves it as it entered."""
    folder = tmp_path_factory.mktemp("identity") / "qwen2vl"
    shutil.copytree(tiny_checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        tensors[f"model.layers.3.{name}"] = torch.zeros_like(tensors[f"model.layers.3.{name}"])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


def test_a_layer_whose_output_equals_its_input_ranks_least_important(identity_layer_checkpoint, benchmark):
    model = PumaForEmbedding.from_pretrained(identity_layer_checkpoint)
    tasks = mbeir_sample(benchmark, ["DemoCaptionToImage", "DemoImageToCaption"], max_queries=4, max_candidates=12)
    result = analyze(model, tasks, tasks_image_root(benchmark), batch_size=4, max_layers=5, show_progress_bar=False)
    influence = [layer["block_influence"] for layer in result["layers"]]
    identity = tolerance(torch.float32, ulps=8)  # 1 - cos(x, x) in float32: a few roundings over 64 dimensions
    assert influence[3] <= identity and min(i for i in influence if i > identity) > 1e-3
    assert result["recommendation"]["least_important_layer"] == 3
    assert 3 not in result["recommendation"]["block_influence_layers"] or result["recommendation"]["depth"] == 6
    # the stream after 3 layers is the stream after 4: no angular distance, and the same retrieval quality
    assert result["layers"][3]["angular_distance"][1] <= 1e-4
    assert result["removable_blocks"][1] == 3
    by_depth = {row["depth"]: row for row in result["depths"]}
    assert by_depth[3]["scores"] == by_depth[4]["scores"]


def test_layer_statistics_do_not_depend_on_the_depths_scored(tiny_checkpoint, benchmark):
    # scoring shallower depths runs the final norm again on their streams: the stream after the last layer must stay
    # the model's own (the angular distance of the last layer is not zero on a random model)
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint)
    tasks = mbeir_sample(benchmark, ["DemoCaptionToImage", "DemoSameScene"], max_queries=4, max_candidates=12)
    every = analyze(model, tasks, tasks_image_root(benchmark), batch_size=4, show_progress_bar=False)
    last_only = analyze(model, tasks, tasks_image_root(benchmark), depths=[model.num_layers], batch_size=4,
                        show_progress_bar=False)
    assert len(every["depths"]) == model.num_layers and len(last_only["depths"]) == 1
    assert every["layers"] == last_only["layers"]
    assert every["layers"][-1]["angular_distance"][1] > 1e-3


def tasks_image_root(benchmark):
    from puma_eval.tasks import load_benchmark

    return load_benchmark(benchmark).image_root


def test_per_depth_quality_equals_the_model_pruned_to_that_depth(family_checkpoints, benchmark):
    # Qwen3-VL, whose DeepStack injections make the truncated streams the delicate case
    checkpoint = family_checkpoints["qwen3_vl"]
    full = PumaForEmbedding.from_pretrained(checkpoint)
    tasks = mbeir_sample(benchmark, ["DemoCaptionToImage", "DemoSameScene", "DemoComposed"], max_queries=6,
                         max_candidates=40)
    image_root = tasks_image_root(benchmark)
    result = analyze(full, tasks, image_root, depths=[1, 2, 4], batch_size=4, show_progress_bar=False)
    assert [row["depth"] for row in result["depths"]] == [1, 2, 4, 6]  # the full depth is always scored
    for row in result["depths"]:
        pruned = PumaForEmbedding.from_pretrained(checkpoint, num_layers=row["depth"])
        for data in tasks:
            queries = encode_items(pruned, data.query_items, data.query_instructions, True, 4, image_root)
            pool = encode_items(pruned, data.pool_items, None, False, 4, image_root)
            expected, _ = score_task(data, queries, pool)
            assert row["scores"][data.task.name] == pytest.approx(expected["score"]), (row["depth"], data.task.name)
    costs = [row["cost_text"] for row in result["depths"]]
    assert costs == sorted(costs) and costs[-1] == pytest.approx(1.0) and 0 < costs[0] < 0.5
    assert all(row["cost_image"] >= row["cost_text"] for row in result["depths"])  # the vision tower always runs


def _result(means, costs):
    return {"depths": [{"depth": d, "mean": m, "cost": c} for d, m, c in zip(range(1, len(means) + 1), means, costs)],
            "layers": [{"block_influence": b} for b in (0.5, 0.1, 0.4, 0.3)], "kept_layers": [0, 1, 2, 3]}


@pytest.mark.parametrize("budget,expected_depth,best", [
    (dict(), 3, 4),                            # best 4 (50.0); 3 is within a point of it
    (dict(max_layers=2), 2, 2),
    (dict(max_cost=0.5), 2, 2),                # depth 3 costs 0.6
    (dict(max_layers=4, tolerance=0.0), 4, 4),
])
def test_the_recommendation_is_the_smallest_depth_near_the_best_within_budget(budget, expected_depth, best):
    tolerance = budget.pop("tolerance", 1.0)
    recommendation = recommend(_result([10.0, 30.0, 49.5, 50.0], [0.2, 0.4, 0.6, 1.0]), tolerance=tolerance,
                               **budget)
    assert (recommendation["depth"], recommendation["best_depth"]) == (expected_depth, best)
    assert recommendation["kept_layers"] == list(range(expected_depth))
    # the layers of highest block influence, in order: 0.5, 0.4, 0.3, 0.1
    assert recommendation["block_influence_layers"] == sorted([0, 2, 3, 1][:expected_depth])
    assert recommendation["least_important_layer"] == 1


@pytest.mark.parametrize("depth, tolerance, keep, influence, within", [
    (1, 1.0, "keep the first layer:", "the layer of highest block influence", "within 1 point of it"),
    (3, 0.5, "keep the first 3 layers:", "the 3 layers of highest block influence", "within 0.5 points of it"),
])
def test_the_recommendation_reads_in_the_right_number(depth, tolerance, keep, influence, within):
    from puma_eval.analysis import analysis_markdown

    result = {**_result([10.0, 30.0, 49.5, 50.0], [0.2, 0.4, 0.6, 1.0]), "model": "base", "tasks": [],
              "budget": {"max_layers": depth, "max_cost": None, "tolerance": tolerance}, "removable_blocks": {1: 2, 2: 0}}
    for row in result["depths"]:
        row.update(scores={}, cost_text=row["cost"], cost_image=row["cost"])
    for index, layer in enumerate(result["layers"]):
        layer.update(layer=index, original_layer=index, angular_distance={1: 0.1, 2: 0.2} if index < 3 else {1: 0.1})
    result["recommendation"] = recommend(result, max_layers=depth, tolerance=tolerance)
    markdown = analysis_markdown(result)
    assert keep in markdown and influence in markdown and within in markdown
    assert f"(at most {'1 layer' if depth == 1 else f'{depth} layers'})" in markdown
    assert "angular distance, 1 layer |" in markdown and "angular distance, 2 layers |" in markdown
    assert "n=1: layer 2, n=2: layers 0..1" in markdown
    assert "(s)" not in markdown and "first 1 layers" not in markdown


def test_a_budget_no_depth_fits_is_a_clear_error():
    with pytest.raises(ValueError, match=r"No depth fits the budget .*max_cost=0.1.*cheapest analysed depth, 1, "
                                         r"costs 0\.200"):
        recommend(_result([10.0, 30.0], [0.2, 1.0]), max_cost=0.1)


def test_analyze_refuses_impossible_budgets(tiny_checkpoint):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)
    with pytest.raises(ValueError, match=r"max_layers=3 is outside 1\.\.2"):
        analyze(model, [object()], max_layers=3)
    with pytest.raises(ValueError, match=r"max_cost=1.5 must be a FLOP ratio"):
        analyze(model, [object()], max_cost=1.5)
    with pytest.raises(ValueError, match="not both"):
        analyze(model, [object()], max_layers=1, max_cost=0.5)


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory):
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("pairs")
    for index, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "circle"),
                                             ("yellow", "square"), ("purple", "circle")]):
        image = Image.new("RGB", (48, 40), "white")
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)([8, 6, 40, 34], fill=colour)
        image.save(folder / f"item{index}.png")
        (folder / f"item{index}.txt").write_text(f"a {colour} {shape}")
    image.save(folder / "no_caption.png")  # skipped: no caption beside it
    return folder


def test_the_command_line_analyses_a_folder_of_captioned_images(tiny_checkpoint, pairs_folder, tmp_path):
    from eval_puma import main

    assert len(folder_pairs(pairs_folder)) == 5
    main(["analyze", "--model", tiny_checkpoint, "--pairs-folder", str(pairs_folder), "--max-layers", "4",
          "--batch-size", "3", "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert [row["depth"] for row in result["depths"]] == [1, 2, 3, 4, 5, 6]
    assert result["tasks"][0]["num_queries"] == 5 and result["tasks"][0]["pool_size"] == 5
    assert result["recommendation"]["depth"] <= 4 and len(result["layers"]) == 6
    markdown = (tmp_path / "out" / "analysis.md").read_text()
    assert "### Recommendation (at most 4 layers)" in markdown and "| layer | base layer | block influence |" in markdown
    assert (tmp_path / "out" / "analysis.png").stat().st_size > 10_000


def test_the_command_line_analyses_a_datasets_dataset(tiny_checkpoint, pairs_folder, tmp_path):
    pytest.importorskip("datasets", reason="the 🤗 datasets source")
    from eval_puma import main

    dataset = tmp_path / "my_pairs"
    dataset.mkdir()
    rows = [{"caption": (pairs_folder / f"item{i}.txt").read_text(), "image": str(pairs_folder / f"item{i}.png")}
            for i in range(5)]
    (dataset / "test.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    main(["analyze", "--model", tiny_checkpoint, "--hf-dataset", str(dataset), "--depths", "2", "--max-cost", "1",
          "--columns", json.dumps({"query_text": "caption", "positive_image": "image"}),
          "--out", str(tmp_path / "out"), "--batch-size", "5"])
    result = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert [row["depth"] for row in result["depths"]] == [2, 6] and result["tasks"][0]["num_queries"] == 5


def test_pair_tasks_rank_each_query_against_every_positive():
    examples = [{"query": {"text": f"q{i}", "image": None}, "positive": {"text": f"p{i}", "image": None},
                 "modality": "text", "instruction": None} for i in range(4)]
    data = pair_task(examples, "pairs", instruction="Find the match.", max_pairs=3)
    assert len(data.query_ids) == 3 and data.relevant == [[pool_id] for pool_id in data.pool_ids]
    assert data.query_instructions == ["Find the match."] * 3
    with pytest.raises(ValueError, match="no examples"):
        pair_task([], "empty")


def test_video_pairs_are_scored_per_depth_and_costed_by_their_median_video(family_checkpoints, tmp_path):
    pytest.importorskip("av", reason="the videos are written and decoded with PyAV")
    from cost_puma import depth_costs
    from media_fixtures import moving_shape_frames, write_video

    shapes = [("square", "red", (1, 0)), ("circle", "blue", (0, 1)), ("triangle", "green", (-1, 0))]
    for i, (shape, colour, direction) in enumerate(shapes):
        write_video(tmp_path / f"clip{i}.mp4", moving_shape_frames(20, (64, 48), shape, colour, direction))
        (tmp_path / f"clip{i}.txt").write_text(f"a {colour} {shape} moving")
    examples = folder_pairs(tmp_path)
    assert [example["modality"] for example in examples] == ["video"] * 3
    checkpoint = family_checkpoints["qwen3_vl"]
    settings = dict(video_max_frames=4, video_min_pixels=4 * 32 * 32, video_max_pixels=8 * 32 * 32,
                    video_total_pixels=16 * 32 * 32)
    full = PumaForEmbedding.from_pretrained(checkpoint, **settings)
    data = pair_task(examples, "clips", "Find the clip.")
    result = analyze(full, [data], str(tmp_path), depths=[1, 3], show_progress_bar=False)
    for row in result["depths"]:
        pruned = PumaForEmbedding.from_pretrained(checkpoint, num_layers=row["depth"], **settings)
        queries = encode_items(pruned, data.query_items, data.query_instructions, True, 4, str(tmp_path))
        pool = encode_items(pruned, data.pool_items, None, False, 4, str(tmp_path))
        assert row["scores"]["clips"] == pytest.approx(score_task(data, queries, pool)[0]["score"])
    # 20 frames at 10 fps sampled at 2 fps: 4 frames (2 temporal patches) of the recipe's resized size
    frames, height, width = result["video_frames_pixels"]
    assert frames == 4 and result["video_share"] == 0.5
    expected = depth_costs(full.config, [1, 3, 6], result["text_tokens"], video=(frames, height, width))
    assert [row["cost_video"] for row in result["depths"]] == [expected[d]["video"] for d in (1, 3, 6)]
    assert all(row["cost_video"] >= row["cost_text"] for row in result["depths"])
    assert "| depth | clips | mean | FLOP ratio (text) | FLOP ratio (image) | FLOP ratio (video) |" in \
        analysis_markdown(result)

"""The budget planner (`puma_eval.budget`): the frontier is the Pareto set of the sweep's points, the recommendation
the best-quality point within the budget, a budget nothing fits a clear error; a swept setting's quality is the
model loaded at that setting, its FLOPs those of its own inputs at the reduced token count."""

import json
import random
import re

import pytest
from cost_puma import text_flops_per_sequence, vision_flops_per_image
from modeling_puma import PumaForEmbedding
from puma_eval.analysis import folder_pairs, pair_task
from puma_eval.budget import frontier, plan, recommend_setting, sweep, write_budget
from puma_eval.mbeir import score_task


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory):
    """16 captioned images (colour x shape x place): with Recall@5 over 16 candidates, scores are not all 100."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("pairs16")
    index = 0
    for colour in ("red", "blue", "green", "yellow"):
        for shape, place in (("circle", "left"), ("square", "left"), ("circle", "right"), ("square", "right")):
            image = Image.new("RGB", (56, 44), "white")
            x = 4 if place == "left" else 26
            (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(
                [x, 8, x + 24, 36], fill=colour)
            image.save(folder / f"item{index}.png")
            (folder / f"item{index}.txt").write_text(f"a {colour} {shape} on the {place}")
            index += 1
    return folder


def random_points(count, seed):
    rng = random.Random(seed)
    # few distinct values, so ties in cost, in quality and in both occur
    return [{"mean": rng.choice([10.0, 20.0, 30.0, 40.0]), "gflops": rng.choice([1.0, 2.0, 3.0, 4.0]),
             "latency_ms": rng.choice([5.0, 7.0, 9.0]), "memory_mb": rng.choice([100.0, 200.0]),
             "depth": i, "max_pixels": 1000, "visual_pool": 1, "dim": 8} for i in range(count)]


def pareto_by_definition(points, cost):
    """Indices no other point dominates; of exact duplicates in (cost, mean), the first."""
    kept = []
    for i, p in enumerate(points):
        dominated = any((q[cost] <= p[cost] and q["mean"] >= p["mean"] and (q[cost] < p[cost] or q["mean"] > p["mean"]))
                        for q in points)
        duplicate_before = any(q[cost] == p[cost] and q["mean"] == p["mean"] for q in points[:i])
        if not dominated and not duplicate_before:
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("cost", ["gflops", "latency_ms", "memory_mb"])
def test_the_frontier_is_the_pareto_set_of_the_points(seed, cost):
    points = random_points(15, seed)
    assert sorted(frontier(points, cost)) == pareto_by_definition(points, cost)


@pytest.mark.parametrize("seed", range(20))
def test_the_recommendation_is_the_best_quality_point_within_every_budget(seed):
    points = random_points(15, seed)
    rng = random.Random(seed)
    flops, latency = rng.choice([1.5e9, 2.5e9, 4e9]), rng.choice([6.0, 8.0, 10.0])
    within = [p for p in points if p["gflops"] * 1e9 <= flops and p["latency_ms"] <= latency]
    if not within:
        with pytest.raises(ValueError, match="No swept setting fits the budget"):
            recommend_setting(points, budget_flops=flops, budget_latency_ms=latency)
        return
    chosen = recommend_setting(points, budget_flops=flops, budget_latency_ms=latency)
    assert chosen["gflops"] * 1e9 <= flops and chosen["latency_ms"] <= latency
    assert chosen["mean"] == max(p["mean"] for p in within)
    assert chosen["gflops"] == min(p["gflops"] for p in within if p["mean"] == chosen["mean"])


def test_a_budget_nothing_fits_is_a_clear_error_naming_it():
    points = random_points(6, 0)
    cheapest = min(p["gflops"] for p in points) * 1e9
    needs = re.escape(f"{cheapest:.4g}")
    with pytest.raises(ValueError, match=rf"budget_flops=1e\+08 \(the cheapest setting, depth \d+.*needs {needs}"):
        recommend_setting(points, budget_flops=1e8)
    with pytest.raises(ValueError, match="budget_memory_mb=-1 must be positive"):
        recommend_setting(points, budget_memory_mb=-1)


@pytest.fixture(scope="module")
def swept(tiny_checkpoint, pairs_folder):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint)
    data = pair_task(folder_pairs(pairs_folder), "pairs", "Find the image.")
    result = plan(model, [data], str(pairs_folder), depths=[2, 6], max_pixels=[28 * 28 * 4, 28 * 28 * 16],
                  visual_pools=[1, 2], batch_size=3, probe_size=3, latency_repeats=1)
    return model, data, result


def test_the_sweep_covers_every_setting_and_scores_each_as_the_model_loaded_at_it(tiny_checkpoint, pairs_folder,
                                                                                swept):
    model, data, result = swept
    points = result["points"]
    assert len(points) == 2 * 2 * 2
    assert {(p["depth"], p["max_pixels"], p["visual_pool"]) for p in points} == {
        (d, px, k) for d in (2, 6) for px in (28 * 28 * 4, 28 * 28 * 16) for k in (1, 2)}
    assert any(p["mean"] < 100 for p in points)  # the scores discriminate
    # one setting, independently: the model loaded at that depth, resolution and reduction, through encode
    point = next(p for p in points if (p["depth"], p["max_pixels"], p["visual_pool"]) == (2, 28 * 28 * 16, 2))
    loaded = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2, max_pixels=28 * 28 * 16, visual_pool=2)
    queries = loaded.encode([{"text": item["text"]} for item in data.query_items], instruction="Find the image.")
    pool = loaded.encode([str(pairs_folder / item["image"]) for item in data.pool_items])
    expected, _ = score_task(data, queries, pool)
    assert point["scores"]["pairs"] == pytest.approx(expected["score"])


def test_the_counted_flops_are_each_inputs_own_at_the_reduced_token_count(tiny_checkpoint, swept,
                                                                          pairs_folder):
    from modeling_puma import build_prompt, featurize, load_image

    model, data, result = swept
    by_setting = {(p["depth"], p["max_pixels"], p["visual_pool"]): p for p in result["points"]}
    for depth, pixels, factor in by_setting:
        loaded = PumaForEmbedding.from_pretrained(tiny_checkpoint, max_pixels=pixels)
        config, tokenizer = loaded.config, loaded.processor.tokenizer
        flops = []
        for item in data.query_items:  # texts: the decoder on the prompt's tokens
            prompt = build_prompt(config, item["text"], None, "Find the image.", tokenizer)
            length = featurize(loaded.processor, config, [prompt], [None])["input_ids"].shape[1]
            flops.append(text_flops_per_sequence(config.text_config, depth, length))
        for item in data.pool_items:  # images: the tower on the grid, the decoder on text + pooled visual tokens
            image = load_image(str(pairs_folder / item["image"]))
            features = featurize(loaded.processor, config, [build_prompt(config, None, image, None, tokenizer)],
                                 [image])
            _, h, w = features["image_grid_thw"][0].tolist()
            visual = (h // 2) * (w // 2)
            reduced = -(-(h // 2) // factor) * -(-(w // 2) // factor)
            length = features["input_ids"].shape[1] - visual + reduced
            flops.append(vision_flops_per_image(config.vision_config, h, w)
                         + text_flops_per_sequence(config.text_config, depth, length))
        expected = sum(flops) / len(flops) / 1e9
        assert by_setting[(depth, pixels, factor)]["gflops"] == pytest.approx(expected, rel=1e-12)
    assert by_setting[(6, 28 * 28 * 16, 2)]["gflops"] < by_setting[(6, 28 * 28 * 16, 1)]["gflops"]


def test_the_report_labels_the_frontier_and_the_recommendation(swept, tmp_path):
    _, _, result = swept
    markdown = write_budget(result, tmp_path)
    assert "### Recommendation (no budget)" in markdown and "| frontier |" in markdown
    assert result["recommendation"]["mean"] == max(p["mean"] for p in result["points"])
    assert sorted(result["frontier"]) == pareto_by_definition(result["points"], "gflops")
    assert json.loads((tmp_path / "budget.json").read_text())["frontier"] == result["frontier"]
    assert (tmp_path / "budget.png").stat().st_size > 10_000


def test_the_command_line_plans_for_a_flop_budget(tiny_checkpoint, pairs_folder, tmp_path):
    from eval_puma import main

    main(["analyze", "--model", tiny_checkpoint, "--pairs-folder", str(pairs_folder), "--depths", "1", "3",
          "--visual-pools", "1", "2", "--budget-flops", "1e12", "--batch-size", "3", "--probe-size", "2",
          "--latency-repeats", "1", "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "budget.json").read_text())
    assert result["budget"]["budget_flops"] == 1e12 and len(result["points"]) == 4
    assert "### Recommendation (budget_flops = 1e+12)" in (tmp_path / "out" / "budget.md").read_text()
    with pytest.raises(SystemExit, match="No swept setting fits the budget: budget_flops=1 "):
        main(["analyze", "--model", tiny_checkpoint, "--pairs-folder", str(pairs_folder), "--depths", "1",
              "--budget-flops", "1", "--batch-size", "3", "--latency-repeats", "1", "--out", str(tmp_path / "o2")])
    assert "### No recommendation" in (tmp_path / "o2" / "budget.md").read_text()


def test_a_matryoshka_size_is_a_swept_setting_scored_as_encode_truncates(tiny_checkpoint, pairs_folder):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)
    data = pair_task(folder_pairs(pairs_folder), "pairs", "Find the image.")
    result = sweep(model, [data], str(pairs_folder), depths=[2], matryoshka_dims=[16], batch_size=3, probe_size=2,
                   latency_repeats=1)
    assert [p["dim"] for p in result["points"]] == [16, 64]
    small, full = result["points"]
    assert small["gflops"] == full["gflops"] and small["latency_ms"] == full["latency_ms"]
    queries = model.encode([{"text": item["text"]} for item in data.query_items], instruction="Find the image.",
                           truncate_dim=16)
    pool = model.encode([str(pairs_folder / item["image"]) for item in data.pool_items], truncate_dim=16)
    expected, _ = score_task(data, queries, pool)
    assert small["scores"]["pairs"] == pytest.approx(expected["score"])
    with pytest.raises(ValueError, match="matryoshka_dims"):
        sweep(model, [data], str(pairs_folder), depths=[2], matryoshka_dims=[65])

"""demo.py end to end at smoke size: benchmark, base, both stages, evaluation, table and curves."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("faiss", reason="the demo evaluates with faiss")
pytest.importorskip("matplotlib", reason="the demo plots training curves")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_quick_demo_runs_every_step_and_writes_its_outputs(tmp_path, family):
    out = tmp_path / "demo"
    command = [sys.executable, os.path.join(ROOT, "demo.py"), "--out", str(out), "--quick", "--family", family]
    elastic = family == "qwen2_vl"  # the elastic-depth evidence, once
    mined = family == "qwen3_vl"  # the mined-negatives evidence, once
    command += ["--elastic"] if elastic else ["--mined"]
    result = subprocess.run(command, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = (out / "results.md").read_text()
    for task in ("DemoCaptionToImage", "DemoParaphrase", "DemoCaptionToTitledImage", "DemoImageToCaption",
                 "DemoSameScene", "DemoComposed", "DemoCaptionToClip", "average (7 tasks)"):
        assert task in table
    assert (out / "curves_stage1.png").stat().st_size > 0 and (out / "curves_stage2.png").stat().st_size > 0
    assert json.loads((out / "stage2" / "config.json").read_text())["base_model_type"] == family
    assert (out / "eval" / "results_local.md").is_file() and list((out / "eval" / "plots").glob("*.png"))
    if mined:
        table = (out / "mined.md").read_text()
        assert "| task | no negatives | 2 near misses (the benchmark's) | 2 mined" in table
        assert "average (7 tasks)" in table
        mined_queries = [json.loads(line) for line in (out / "mined" / "mbeir_demo_train.jsonl").open()]
        assert mined_queries and all(len(q["neg_cand_list"]) <= 2 for q in mined_queries)
        assert (out / "stage2-mined" / "config.json").is_file() and (out / "stage2-near-misses" / "config.json").is_file()
    if elastic:
        table = (out / "elastic.md").read_text()
        assert "depth 1 elastic | depth 1 separate" in table and "average (7 tasks)" in table
        assert json.loads((out / "elastic" / "config.json").read_text())["trained_depths"] == [1, 2, 3]
        for name in ("untrained", "elastic"):
            result = json.loads((out / f"analysis_{name}" / "analysis.json").read_text())
            assert result["num_layers"] == (6 if name == "untrained" else 3)
            assert (out / f"analysis_{name}" / "analysis.png").is_file()
            assert all("cost_video" in row for row in result["depths"])  # the demo's clips are costed too

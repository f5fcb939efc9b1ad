"""experiments/eval_vs_kvpress.py runs end to end on a few cases: both sides answer the same cases and
agree where the selections are the same."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def _run(*flags):
    return subprocess.run([sys.executable, "experiments/eval_vs_kvpress.py", "--config=configs/eval_vs_kvpress.py",
                           *flags], capture_output=True, text=True, cwd=ROOT, timeout=900)


@pytest.mark.slow(reason="loads SmolLM2 in both JAX and PyTorch and runs kvpress's pipeline next to ours")
def test_smoke_run_compares_both_sides_on_the_same_cases(tmp_path):
    output = tmp_path / "side_by_side.json"
    run = _run("--config.num_cases=2", "--config.presses=none,knorm", "--config.length=200",
               f"--config.output={output}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "machine:" in run.stdout and "kvpress/ours" in run.stdout
    rows = json.loads(output.read_text())["rows"]
    assert [(r["press"], r["cases"]) for r in rows] == [("none", 2), ("knorm", 2)]
    for row in rows:
        assert row["ours_seconds_per_case"] > 0 and row["kvpress_seconds_per_case"] > 0
        assert len(row["answers"]) == 2 and all(a["kvpress"] and a["ours"] for a in row["answers"])
    # The same greedy answers on the full cache and on Knorm's (the same entries kept as kvpress).
    assert rows[0]["same_answer"] == 100.0 and rows[1]["same_answer"] == 100.0
    assert rows[0]["ours_accuracy"] == rows[0]["kvpress_accuracy"]


def test_presses_without_a_pipeline_run_are_refused():
    run = _run("--config.presses=none,pyramidkv")
    assert run.returncode != 0
    assert "kvpress's pipeline cannot decode PyramidKV's caches" in run.stderr, run.stderr[-2000:]

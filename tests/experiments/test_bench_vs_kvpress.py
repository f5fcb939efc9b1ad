"""experiments/bench_vs_kvpress.py runs end to end at a small size: every (length, press, batch) row
has both sides' times, the prefill table its rates, and the sweep its cold and warm times."""
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow(reason="loads SmolLM2 in both JAX and PyTorch, times kvpress's pipeline and ours, and a sweep "
                         "in a second process")
def test_smoke_run_times_both_sides_and_a_sweep(tmp_path):
    output = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "experiments/bench_vs_kvpress.py", "--config=configs/bench_vs_kvpress.py",
                          "--config.lengths=128", "--config.batches=2", "--config.kvpress_cases=1",
                          "--config.repeats=1", "--config.max_new_tokens=4", "--config.sweep_lengths=128",
                          "--config.sweep_cases=2", "--config.sweep_batch=2", f"--config.output={output}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "machine:" in run.stdout and "GFLOP/s" in run.stdout and "cold / warm" in run.stdout
    numbers = json.loads(output.read_text())
    assert "bench_vs_kvpress.py" in numbers["command"] and numbers["gemm_flops_per_second"] > 1e8
    rows = numbers["rows"]
    assert [(r["length"], r["press"], r["batch"]) for r in rows] == [(128, "none", 2), (128, "snapkv", 2)]
    for row in rows:
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("ours_cold", "ours_warm", "kvpress", "floor"))
        assert row["floor"] < row["ours_warm"]  # no run beats its FLOPs at the measured GEMM rate
    (prefill,) = numbers["prefill"]
    assert prefill["length"] == 128 and prefill["tokens_per_second"] > 0 and 0 < prefill["attention_share"] < 0.5
    assert numbers["sweep"]["cases"] == 2 and numbers["sweep"]["warm_seconds_per_case"] > 0

"""experiments/bench_presses.py runs end to end in its smoke mode and prints one row per press."""
import math
import subprocess
import sys

import pytest

from conftest import ROOT


def _bench(*flags):
    return subprocess.run([sys.executable, "experiments/bench_presses.py", "--config=configs/bench_presses.py", *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow(reason="loads SmolLM2 in both JAX and PyTorch and times every press on both")
def test_smoke_run_prints_a_row_per_press():
    run = _bench("--config.lengths=32,", "--config.presses=knorm,streaming_llm", "--config.repeats=1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "machine:" in run.stdout and "jax" in run.stdout
    rows = {line.split()[0]: line.split()[1:] for line in run.stdout.splitlines()
            if line.split()[:1] in (["knorm"], ["streaming_llm"])}
    assert sorted(rows) == ["knorm", "streaming_llm"], run.stdout
    for name, cells in rows.items():
        length, ours, ours_pressed, ours_overhead, theirs, theirs_pressed, theirs_overhead, *ratios = map(float, cells)
        assert length == 32 and len(ratios) == 2, (name, cells)
        assert all(math.isfinite(x) and x > 0 for x in (ours, ours_pressed, theirs, theirs_pressed, *ratios)), cells
        assert math.isfinite(ours_overhead) and math.isfinite(theirs_overhead), cells  # noise may make these < 0


def test_unknown_press_names_the_known_ones():
    run = _bench("--config.presses=knorm,nope")
    assert run.returncode != 0
    assert "unknown press names ['nope']" in run.stderr and "snapkv" in run.stderr, run.stderr[-2000:]

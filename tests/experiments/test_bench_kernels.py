"""experiments/bench_kernels.py runs end to end in interpret mode on tiny shapes and prints its
three tables with finite ratios."""
import math
import subprocess
import sys

from conftest import ROOT

SMOKE = ["--config.lengths=256,", "--config.batch_sizes=1,", "--config.ratios=0,0.75", "--config.prefill_lengths=128,",
         "--config.window_prefill_length=256", "--config.num_heads=4", "--config.num_kv_heads=2",
         "--config.head_dim=64", "--config.dtype=float32", "--config.repeats=1", "--config.copy_mib=8"]


def _rows(text: str, header: str) -> list[list[float]]:
    """The numeric rows of the table under the line that starts with `header`."""
    lines = text.split(header, 1)[1].splitlines()[2:]
    rows = []
    for line in lines:
        try:
            rows.append([float(cell) for cell in line.split()])
        except ValueError:
            break
        if not line.strip():
            break
    return [row for row in rows if row]


def test_smoke_run_prints_every_table():
    run = subprocess.run([sys.executable, "experiments/bench_kernels.py", "--config=configs/bench_kernels.py", *SMOKE],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "device: cpu" in run.stdout and "interpret mode" in run.stdout and "copy bandwidth:" in run.stdout
    decode = _rows(run.stdout, "1. decode")
    assert [row[2] for row in decode] == [0.0, 0.75], run.stdout
    full, compressed = decode
    assert compressed[3] < full[3]  # cache MB read: the kept quarter
    assert full[-1] == 1.0 and all(math.isfinite(x) and x > 0 for row in decode for x in row[3:]), run.stdout
    (window,) = _rows(run.stdout, "2. window scoring")
    assert all(math.isfinite(x) and x > 0 for x in window)
    (prefill,) = _rows(run.stdout, "3. prefill attention")
    assert prefill[0] == 128 and all(math.isfinite(x) and x > 0 for x in prefill[1:])

"""experiments/profile_prefill.py runs end to end at a small size: XLA's counts of the chunk's program
agree with the FLOP model, and every layer part is timed."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow(reason="loads SmolLM2 and compiles its prefill at two lengths and two depths")
def test_smoke_run_profiles_the_last_chunk_and_one_layer(tmp_path):
    output = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, "experiments/profile_prefill.py", "--config=configs/profile_prefill.py",
                          "--config.lengths=512", "--config.chunk=256", "--config.repeats=1",
                          "--config.compile_layers=1,2", "--config.compile_length=512", f"--config.output={output}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    numbers = json.loads(output.read_text())
    (row,) = numbers["rows"]
    # XLA counts the projections and MLP the FLOP model counts, plus elementwise work (norms, RoPE,
    # softmax), and the attention's loop bodies once.
    model_flops = row["model_linear_flops"] + row["model_attention_flops"]
    assert row["model_linear_flops"] < row["xla_flops"] < 1.5 * model_flops, row
    assert set(row["layer_parts_seconds"]) == {"blockwise attention", "dense attention", "q, k, v, o projections",
                                               "MLP"}
    assert all(seconds > 0 for seconds in row["layer_parts_seconds"].values())
    assert [c["layers"] for c in numbers["compile"]] == [1, 2] and "machine:" in run.stdout

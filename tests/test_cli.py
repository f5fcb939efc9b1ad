"""The `tokcomp-jax` command, run as a user would."""
import os
import re
import subprocess
import sys

import pytest


def _cli(*args, cache_home=None):
    """Runs the command; its persistent compilation cache goes under `cache_home` (default: off)."""
    if cache_home is None:
        args = (*args, "--compilation_cache=")
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home or "/nonexistent")}
    return subprocess.run([sys.executable, "-m", "tokcomp_jax.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _compile_seconds(stderr: str) -> float:
    return float(re.search(r"of these, compilation ([0-9.]+) s", stderr).group(1))


@pytest.mark.parametrize("attn_impl", ["xla", "pallas"])
def test_generate_answers_paris(attn_impl):
    result = _cli("generate", "--prompt", "What is the capital of France?", "--max_new_tokens", "16",
                  "--attn_impl", attn_impl)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and f"attention {attn_impl}" in result.stderr
    assert "prefill:" in result.stderr and "decode:" in result.stderr and _compile_seconds(result.stderr) > 0


def test_compiled_programs_persist_in_the_user_cache_directory(tmp_path):
    """By default compiled programs go to $XDG_CACHE_HOME/tokcomp_jax/xla, and a second run reads
    them instead of compiling; --compilation_cache= turns that off."""
    args = ("generate", "--prompt", "Hi", "--max_new_tokens", "4")
    first = _cli(*args, cache_home=tmp_path)
    assert first.returncode == 0, first.stderr
    assert len(list((tmp_path / "tokcomp_jax" / "xla").iterdir())) >= 2  # prefill and decode
    second = _cli(*args, cache_home=tmp_path)
    assert second.returncode == 0, second.stderr
    assert _compile_seconds(second.stderr) < 0.6 * _compile_seconds(first.stderr)
    assert second.stdout == first.stdout


def test_generate_with_a_press_reports_a_smaller_cache(tmp_path):
    result = _cli("generate", "--prompt", "What is the capital of France?", "--max_new_tokens", "8",
                  "--press", "streaming_llm", "--ratio", "0.5", "--compilation_cache=", cache_home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "tokcomp_jax").exists()  # the cache was turned off
    cache_mib = float(result.stderr.split("cache: ")[1].split(" MiB")[0])
    # Without a press: 37 prompt tokens padded to 64, plus 8 new, at 46,440 bytes per token.
    assert cache_mib < 0.8 * (64 + 8) * 46440 / 2**20


@pytest.mark.slow(reason="the command twice in fresh processes: each loads SmolLM2, the first compiles and runs a "
                         "sweep of two presses, the second finds it done")
def test_eval_sweeps_writes_the_report_and_resumes(tmp_path):
    args = ("eval", "--presses", "none,knorm", "--ratios", "0.5", "--lengths", "256", "--num_cases", "2",
            "--output_dir", str(tmp_path))
    result = _cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| press | ratio | acc. @256 | cache MiB | cache % of full |" in result.stdout
    knorm = next(line for line in result.stdout.splitlines() if line.startswith("| knorm | 0.50 |"))
    assert 45 < float(knorm.split("|")[5]) <= 50  # cache % of full: half the context's entries
    assert f"Plot: {tmp_path / 'report.png'}" in result.stdout and (tmp_path / "report.png").stat().st_size > 10_000
    assert "eval: 100%" in result.stderr  # the progress bar, with its ETA while running
    report = (tmp_path / "report.md").read_text()
    assert report.count("\n| ") >= 3 and "Command: `tokcomp-jax eval --presses none,knorm" in report
    results = (tmp_path / "results.jsonl").read_text()
    assert results.count("\n") == 4
    again = _cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "results.jsonl").read_text() == results  # nothing was run again
    assert again.stdout.split("Plot:")[0] == result.stdout.split("Plot:")[0]


def test_info_reports_parameters_and_cache_bytes_per_token():
    result = _cli("info")
    assert result.returncode == 0, result.stderr
    assert "134,515,008" in result.stdout
    # 30 layers x 3 KV heads x (keys + values: 2 x 64 floats x 4 bytes + a 4-byte position)
    assert f"{30 * 3 * (2 * 64 * 4 + 4):,}" in result.stdout


@pytest.mark.parametrize("args, message", [
    (("generate", "--prompt", "hi", "--dtype", "float8"), "dtype 'float8' is not supported"),
    (("generate", "--prompt", "hi", "--model", "/no/such/model.gguf"), "neither a known model"),
    (("generate", "--prompt", "hi", "--top_p", "0"), "top_p must be in (0, 1]"),
    (("generate",), "generate needs --prompt"),
    (("summarize",), "usage: tokcomp-jax {generate|eval|info}"),
    (("eval", "--presses", "none,zip"), "presses must name presses of none, streaming_llm"),
    (("eval", "--ratios", "0.5,x"), "--ratios takes comma-separated floats"),
    (("eval", "--ratios", "1"), "ratios must be fractions of entries removed"),
    (("eval", "--lengths", "64"), "lengths must be context lengths in tokens, each >= 128"),
    (("eval", "--data", "/no/such.jsonl"), "data: /no/such.jsonl is not a file"),
    (("eval", "--task", "perplexity", "--presses", "snapkv,expected_attention"),
     "press 'expected_attention' cannot"),
    (("generate", "--prompt", "hi", "--press", "zip"), "--press 'zip' is not a press"),
    (("generate", "--prompt", "hi", "--press", "knorm", "--ratio", "1.5"), "ratio is the fraction"),
])
def test_bad_input_gets_a_message_not_a_traceback(args, message):
    result = _cli(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr

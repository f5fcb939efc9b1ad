"""The `tokcomp-jax` command, run as a user would."""
import subprocess
import sys

import pytest


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tokcomp_jax.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_answers_paris():
    result = _cli("generate", "--prompt", "What is the capital of France?", "--max_new_tokens", "16")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "prefill:" in result.stderr and "tok/s" in result.stderr


def test_generate_with_a_press_reports_a_smaller_cache():
    result = _cli("generate", "--prompt", "What is the capital of France?", "--max_new_tokens", "8",
                  "--press", "streaming_llm", "--ratio", "0.5")
    assert result.returncode == 0, result.stderr
    cache_mib = float(result.stderr.split("cache: ")[1].split(" MiB")[0])
    # Without a press: 37 prompt tokens padded to 64, plus 8 new, at 46,440 bytes per token.
    assert cache_mib < 0.8 * (64 + 8) * 46440 / 2**20


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
    (("summarize",), "usage: tokcomp-jax {generate|info}"),
    (("generate", "--prompt", "hi", "--press", "zip"), "--press 'zip' is not a press"),
    (("generate", "--prompt", "hi", "--press", "knorm", "--ratio", "1.5"), "ratio is the fraction"),
])
def test_bad_input_gets_a_message_not_a_traceback(args, message):
    result = _cli(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr

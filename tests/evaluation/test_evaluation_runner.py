"""The sweep runner: records, memory accounting, resuming after a kill, reports and compile timing."""
import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import tokcomp_jax as tc
from tokcomp_jax.checkpoints import GGUFFile, resolve_model_path
from tokcomp_jax.evaluation import paired_interval, reports, runner
from tokcomp_jax.evaluation.runner import Sweep, read_results, record_key, run_sweep

SMALL = dict(presses=("none", "knorm", "streaming_llm"), ratios=(0.25, 0.5), lengths=(200, 260), task="passkey",
             num_cases=3, batch_size=2, max_new_tokens=4)


@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer Llama over SmolLM2's vocabulary, and SmolLM2's tokenizer (chat template included)."""
    tokenizer = tc.Tokenizer.from_gguf(GGUFFile(resolve_model_path("smollm2-135m-instruct")))
    return tc.testing.tiny_llama(vocab_size=tokenizer.vocab_size), tokenizer


@pytest.mark.slow(reason="30 cases through 5 press settings at 2 lengths, each program compiled")
def test_a_sweep_records_every_case_once_with_the_bytes_its_cache_holds(tiny, tmp_path):
    model, tokenizer = tiny
    sweep = Sweep(**SMALL)
    records = run_sweep(model, tokenizer, sweep, tmp_path / "r.jsonl", model_name="tiny")
    assert len(records) == (1 + 2 * 2) * 2 * 3  # (full + 2 presses x 2 ratios) x 2 lengths x 3 cases
    assert len({record_key(r) for r in records}) == len(records)
    assert len(read_results(tmp_path / "r.jsonl")) == len(records)
    per_token = 2 * 2 * (2 * 8 * 4 + 4)  # layers x KV heads x (key + value + position)
    for r in records:
        assert r["length"] - 50 <= r["context_tokens"] <= r["length"]  # whole sentences
        assert r["full_cache_bytes"] == r["context_tokens"] * per_token
        kept = r["context_tokens"] if r["press"] == "none" else max(1, int(r["context_tokens"] * (1 - r["ratio"])))
        assert r["cache_bytes"] == kept * per_token
        assert 0 <= r["score"] <= 1 and r["new_tokens"] <= 4
        assert r["prefill_seconds"] > 0 and r["decode_seconds"] > 0
    depths = [r["depth"] for r in records if r["press"] == "none" and r["length"] == 200]
    assert depths == pytest.approx([1 / 6, 0.5, 5 / 6], abs=5e-5)  # the sweep rounds depths to 4 decimals


def test_a_sweep_cut_short_resumes_without_redoing_or_losing_cases(tiny, tmp_path):
    model, tokenizer = tiny
    sweep = Sweep(**SMALL)
    whole = run_sweep(model, tokenizer, sweep, tmp_path / "whole.jsonl", model_name="tiny")

    def stop_after(n):
        def progress(batches):
            for i, batch in enumerate(batches):
                if i == n:
                    raise KeyboardInterrupt
                yield batch
        return progress

    path = tmp_path / "cut.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, tokenizer, sweep, path, model_name="tiny", progress=stop_after(3))
    finished = read_results(path)
    assert len(finished) == 2 + 1 + 2  # 3 batches: 2 + 1 cases at 200 tokens, 2 at 260
    with open(path, "a") as f:
        f.write('{"model": "tiny", "dtype": "float32", "task": "pas')  # a line cut by a kill
    ran = []

    def count(batches):
        for batch in batches:
            ran.append(batch)
            yield batch

    resumed = run_sweep(model, tokenizer, sweep, path, model_name="tiny", progress=count)
    assert sum(len(b.cases) for b in ran) == len(whole) - len(finished)
    drop = ("prefill_seconds", "decode_seconds", "compile_seconds", "wall_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in drop} for r in whole]
    with open(path) as f:
        lines = f.read().splitlines()
    assert len(lines) == len(whole) and all(json.loads(line) for line in lines)
    assert run_sweep(model, tokenizer, sweep, path, model_name="tiny", progress=count) == resumed
    assert sum(len(b.cases) for b in ran) == len(whole) - len(finished)  # nothing ran the third time


KILLED_SWEEP = textwrap.dedent("""
    import sys
    import tokcomp_jax as tc
    from tokcomp_jax.checkpoints import GGUFFile, resolve_model_path
    from tokcomp_jax.evaluation.runner import Sweep, run_sweep
    tokenizer = tc.Tokenizer.from_gguf(GGUFFile(resolve_model_path("smollm2-135m-instruct")))
    model = tc.testing.tiny_llama(vocab_size=tokenizer.vocab_size)
    sweep = Sweep(presses=("none", "knorm"), ratios=(0.5,), lengths=(160,), task="passkey",
                  num_cases=4, batch_size=1, max_new_tokens=4)
    records = run_sweep(model, tokenizer, sweep, sys.argv[1], model_name="tiny")
    print(len(records))
""")


def test_a_sweep_killed_with_sigkill_resumes(tmp_path):
    path = tmp_path / "results.jsonl"
    command = [sys.executable, "-c", KILLED_SWEEP, str(path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if path.exists() and path.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, f"the sweep ended before it was killed: {process.communicate()[1][-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = read_results(path)
    assert 3 <= len(before) < 8
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "8"
    after = read_results(path)
    assert len(after) == 8 and path.read_text().count("\n") == 8
    assert all(after[k] == v for k, v in before.items())  # finished cases were kept, not redone


@pytest.mark.parametrize("kwargs, message", [
    (dict(presses=("zip",)), "presses must name presses"),
    (dict(ratios=(1.0,)), "ratios must be fractions"),
    (dict(ratios=("0.5",)), "ratios must be fractions"),
    (dict(lengths=(64,)), "lengths must be context lengths"),
    (dict(task="summaries"), "task must be one of"),
    (dict(data="/no/such/file.jsonl"), "is not a file"),
    (dict(batch_size=0), "batch_size must be a positive int"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
])
def test_bad_sweeps_are_refused_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sweep(**kwargs)


def test_a_results_file_that_is_not_a_sweeps_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"context": "a", "question": "b", "answers": ["c"]}\n')
    with pytest.raises(ValueError, match=r"other.jsonl, line 1: not a sweep result"):
        read_results(path)


def test_user_data_runs_as_a_sweep(tiny, tmp_path):
    model, tokenizer = tiny
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"context": f"The code is {n}. " * 20, "question": "What is the code?",
                                          "answers": [str(n)]}) for n in (17, 42, 99)))
    sweep = Sweep(presses=("none", "knorm"), ratios=(0.5,), data=str(data), max_new_tokens=3)
    records = run_sweep(model, tokenizer, sweep, tmp_path / "r.jsonl", model_name="tiny")
    assert [(r["press"], r["task"], r["answers"]) for r in records] == \
        [("none", "user:mine.jsonl", [str(n)]) for n in (17, 42, 99)] + \
        [("knorm", "user:mine.jsonl", [str(n)]) for n in (17, 42, 99)]


def test_the_perplexity_task_reads_text_within_the_budget(tiny, tmp_path):
    model, tokenizer = tiny
    sweep = Sweep(presses=("none", "streaming_llm"), ratios=(0.5,), lengths=(200,), task="perplexity", num_cases=2,
                  chunk_size=32)
    records = run_sweep(model, tokenizer, sweep, tmp_path / "r.jsonl", model_name="tiny")
    per_token = 2 * 2 * (2 * 8 * 4 + 4)
    assert [r["press"] for r in records] == ["none", "none", "streaming_llm", "streaming_llm"]
    for r in records:
        assert r["scored_tokens"] == r["context_tokens"] - 1 and r["nll"] > 0
        kept = r["context_tokens"] if r["press"] == "none" else 100
        assert r["cache_bytes"] == kept * per_token
    assert records[2]["nll"] != records[0]["nll"]
    table = reports.markdown_table(records)
    assert "| press | ratio | ppl @200 |" in table
    with pytest.raises(ValueError, match="task perplexity compresses the cache while it fills"):
        Sweep(presses=("observed_attention",), task="perplexity")


def _record(press, ratio, length, score, kept):
    return {"press": press, "ratio": ratio, "length": length, "score": score, "cache_bytes": kept * 10,
            "full_cache_bytes": length * 10, "context_tokens": length - 8, "question_tokens": 8, "new_tokens": 5,
            "prefill_seconds": 0.5, "decode_seconds": 0.25, "compile_seconds": 0.125, "wall_seconds": 1.0}


def test_the_report_table_holds_accuracy_memory_and_throughput(tmp_path):
    records = [_record("none", 0.0, 512, 1.0, 512), _record("none", 0.0, 1024, 1.0, 1024),
               _record("knorm", 0.5, 512, 1.0, 256), _record("knorm", 0.5, 512, 0.0, 256),
               _record("knorm", 0.5, 1024, 0.5, 512)]
    rows = reports.summary(records)
    assert [(r["press"], r["ratio"], r["cases"]) for r in rows] == [("none", 0.0, 2), ("knorm", 0.5, 3)]
    knorm = rows[1]
    assert knorm["by_length"] == {512: 50.0, 1024: 50.0} and knorm["overall"] == 50.0
    assert knorm["cache_percent"] == pytest.approx(100 * (256 + 256 + 512) / (512 + 512 + 1024))
    assert knorm["prefill_tps"] == pytest.approx((512 + 512 + 1024) / 1.5)
    assert knorm["decode_tps"] == pytest.approx(15 / 0.75)
    assert knorm["compile_seconds"] == 3 * 0.125 and knorm["wall_seconds"] == 1.0
    table = reports.markdown_table(records)
    assert table.splitlines()[0].startswith("| press | ratio | acc. @512 | acc. @1024 | acc. (all) |")
    assert table.splitlines()[0].endswith("| compile s | wall s/case | cases |")
    assert "| knorm | 0.50 | 50.0 | 50.0 | 50.0 |" in table and table.splitlines()[-1].endswith("| 0.4 | 1.00 | 3 |")
    older = {k: v for k, v in records[0].items() if k != "wall_seconds"}  # records written before wall time was kept
    assert reports.wall_seconds(older) == 0.5 + 0.25 + 0.125
    path = reports.plot(records, tmp_path / "report.png", "a title")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="records is empty"):
        reports.summary([])


@pytest.mark.parametrize("records", [
    [_record("none", 0.0, 512, 1.0, 512), _record("knorm", 0.25, 512, 1.0, 384), _record("knorm", 0.5, 512, 0.0, 256)],
    [_record("none", 0.0, 512, 1.0, 512), _record("none", 0.0, 1024, 0.0, 1024)],
    [{**_record("none", 0.0, 512, 0, 512), "nll": 2.0, "scored_tokens": 511},
     {**_record("streaming_llm", 0.5, 512, 0, 256), "nll": 2.5, "scored_tokens": 511}],
], ids=["ratios", "lengths", "perplexity"])
def test_every_kind_of_sweep_plots(records, tmp_path, monkeypatch):
    import matplotlib.figure

    titles, save = [], matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        titles.append(fig._suptitle.get_text())
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    with open(reports.plot(records, tmp_path / "report.png", "the sweep"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert titles == ["the sweep"]


def test_the_compile_clock_counts_compilation_only():
    clock = runner.CompileClock()
    f = jax.jit(lambda x: jnp.sin(x) * 3 + x.sum())
    x, y = jnp.arange(17.0), jnp.ones(17)
    start = time.time()
    jax.block_until_ready(f(x))
    middle = time.time()
    jax.block_until_ready(f(y))
    end = time.time()
    assert 0 < clock.within(start, middle) <= middle - start
    assert clock.within(middle, end) == 0


def test_batches_of_nearby_lengths_run_the_same_compiled_programs(tiny):
    """Capacities are rounded up to the attention's block, so the sweep's batches of one length (whose
    contexts differ by a sentence or two) compile once."""
    _, tokenizer = tiny
    model = tc.testing.tiny_llama(vocab_size=tokenizer.vocab_size, num_layers=1)  # compiled by no other test
    sweep = Sweep(presses=("none",), lengths=(150, 180), task="passkey", num_cases=2, max_new_tokens=3)
    shorter, longer = (runner.make_cases(tokenizer, sweep, length) for length in sweep.lengths)
    clock = runner.CompileClock()
    for press in (None, tc.presses.make_press("snapkv", 0.5, model)):  # a press compiles what it compresses to
        first = runner.run_batch(model, tokenizer, shorter, press, max_new_tokens=3, clock=clock)
        second = runner.run_batch(model, tokenizer, longer, press, max_new_tokens=3, clock=clock)
        assert max(r["context_tokens"] for r in first) + 20 < min(r["context_tokens"] for r in second)
        assert min(r["compile_seconds"] for r in first) > 0
        assert [r["compile_seconds"] for r in second] == [0, 0]
        for r in first + second:
            assert r["wall_seconds"] >= r["prefill_seconds"] + r["decode_seconds"] + r["compile_seconds"] - 1e-6


def test_a_corpus_other_than_the_essays_is_part_of_the_task_name(tiny, tmp_path):
    model, tokenizer = tiny
    sweep = Sweep(presses=("none",), lengths=(200,), task="passkey", num_cases=1, max_new_tokens=2, corpus="python")
    (record,) = run_sweep(model, tokenizer, sweep, tmp_path / "r.jsonl", model_name="tiny")
    assert record["task"] == "passkey@python" and record["context_tokens"] <= 200
    with pytest.raises(ValueError, match="corpus must be one of essays, shakespeare, python"):
        Sweep(corpus="poems")


def test_the_compile_clock_counts_overlapping_events_once():
    clock = runner.CompileClock()
    spans = list(runner.CompileClock._spans)
    runner.CompileClock._spans[:] = [(10.0, 14.0), (11.0, 12.0), (13.0, 16.0), (20.0, 21.0)]
    try:
        assert clock.within(0.0, 30.0) == 7.0 and clock.within(12.0, 20.5) == 4.5 and clock.within(16.0, 20.0) == 0
    finally:
        runner.CompileClock._spans[:] = spans


def test_the_paired_interval_covers_the_true_ratio_and_narrows_with_pairing():
    rng = np.random.default_rng(0)
    hardness = rng.normal(3.0, 1.0, 200)  # per-text difficulty, shared by both methods
    reference = hardness + rng.normal(0, 0.05, 200)
    better = hardness - 0.1 + rng.normal(0, 0.05, 200)
    ratio, low, high = paired_interval(better, reference)
    assert low < ratio < high < 1 and low < np.exp(-0.1) < high
    # The texts' difficulty, 20x the effect, cancels in the pairs: the interval is the paired
    # noise's (a 95% interval, 2 x 1.96 standard errors of a mean of 200 differences of sd
    # 0.05·√2, in log space, times the ratio), up to the sampling error of a standard deviation
    # estimated from 200 pairs (6 of its standard errors, 1/√(2·200) relative); unpaired, it
    # would be the difficulty's (sd 1, 20 times wider).
    paired = 2 * 1.96 * 0.05 * np.sqrt(2) / np.sqrt(200) * np.exp(-0.1)
    assert high - low < paired * (1 + 6 / np.sqrt(2 * 200))
    with pytest.raises(ValueError, match="equal-length"):
        paired_interval(better, reference[:10])

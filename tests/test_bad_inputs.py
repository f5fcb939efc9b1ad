"""The catalogue of bad inputs: one test per class of mistake, each asserting the error type and that
the message names the argument (and the fix), before any model loads or any program compiles.
Property tests check the validators on every input hypothesis draws.

Classes covered elsewhere: a damaged checkpoint (tests/training/test_training.py), prompts past the
model's context and tc.decode's ids (tests/test_generation.py), damaged model files
(tests/checkpoints/test_checkpoint_errors.py), malformed JSONL rows (tests/evaluation/test_evaluation_tasks.py)."""
import re

import numpy as np
import pytest
from absl import flags
from hypothesis import given, settings
from hypothesis import strategies as st

import tokcomp_jax as tc
from tokcomp_jax import cli
from tokcomp_jax.batching import check_token_ids
from tokcomp_jax.checkpoints import read_context_length, resolve_model_path
from tokcomp_jax.checkpoints.gguf import GGUFFile
from tokcomp_jax.evaluation.data import read_jsonl
from tokcomp_jax.evaluation.runner import Sweep
from tokcomp_jax.generation import check_context
from tokcomp_jax.learned.artifacts import export_trained, load_trained
from tokcomp_jax.presses import Budget
from conftest import ROOT
from training_worker import tiny_config

ROW = '{"context": "The key is 7.", "question": "What is the key?", "answers": ["7"]}\n'


def data_file(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Runs `tokcomp-jax ARGS` in this process with loading a model forbidden; returns its exit code
    and stderr (no persistent compilation cache, so this process's JAX settings stay as they are)."""
    def load(*args, **kwargs):
        raise AssertionError("the model loaded before the error")

    monkeypatch.setattr(cli, "load", load)

    def run(*args):
        flags.FLAGS.unparse_flags()
        flags.FLAGS.set_gnu_getopt(True)
        argv = flags.FLAGS(["tokcomp-jax", *args, "--compilation_cache="])
        compiled = tc.generation._forward_jit._cache_size()
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert tc.generation._forward_jit._cache_size() == compiled
        return exit_.value.code, capsys.readouterr().err

    yield run
    flags.FLAGS.unparse_flags()


# (args; a function of tmp_path giving more args, or None; what the message says)
CLI_CATALOGUE = [
    (("generate", "--prompt", "hi", "--ratio", "0.3"), None, "--ratio is the fraction of entries a press removes, "
     "and no --press is given; add --press"),
    (("generate", "--prompt", "hi", "--press", "knorm", "--ratio", "1.5"), None, "ratio is the fraction of entries "
     "removed and must be in [0, 1), got 1.5"),
    (("generate", "--prompt", "hi", "--chunk_size", "0"), None, "--chunk_size must be a positive number of tokens, "
     "got 0"),
    (("eval", "--chunk_size", "0"), None, "--chunk_size must be a positive number of tokens, got 0"),
    (("generate", "--prompt", "hi", "--max_new_tokens", "0"), None, "--max_new_tokens must be a positive number"),
    (("generate", "--prompt", "hi", "--dtype", "float8"), None, "dtype 'float8' is not supported"),
    (("eval", "--press", "snapkv"), None, "eval does not read --press (a flag of generate); leave it out"),
    (("generate", "--prompt", "hi", "--lengths", "512"), None, "generate does not read --lengths (a flag of eval)"),
    (("info", "--max_new_tokens", "8"), None, "info does not read --max_new_tokens (a flag of generate and eval)"),
    (("eval", "--lengths", "100000"), None, "--lengths: lengths go up to 100000 tokens, which with 32 new tokens "
     "(max_new_tokens) run past the model's context of 8192; keep lengths below 8160"),
    (("eval",), lambda tmp: ("--output_dir", data_file(tmp, "a_file", b"")), "is a file; give a directory"),
    (("eval", "--output_dir", "/proc"), None, "--output_dir /proc is not writable"),
    (("eval",), lambda tmp: ("--data", data_file(tmp, "empty.jsonl", b"\n \n")), "empty.jsonl holds no rows; "
     "write one JSON object per line"),
    (("eval",), lambda tmp: ("--data", data_file(tmp, "latin1.jsonl", ROW.replace("key", "cl\xe9").encode("latin-1"))),
     "latin1.jsonl is not UTF-8 text (byte 19 is b'\\xe9'); save it as UTF-8 JSON Lines"),
    (("eval", "--lengths", "512"), lambda tmp: ("--data", data_file(tmp, "rows.jsonl", ROW.encode())),
     "--data replaces --lengths: its rows are the cases"),
]


@pytest.mark.parametrize("args, more, message", CLI_CATALOGUE)
def test_cli_flags_are_checked_before_the_model_loads(run_cli, tmp_path, args, more, message):
    code, stderr = run_cli(*args, *(more(tmp_path) if more else ()))
    assert code == 1 and stderr.startswith("tokcomp-jax: error: ") and message in stderr, stderr


def test_the_context_length_is_read_from_the_gguf_header_as_the_loader_reads_it(tmp_path):
    """What `eval` checks --lengths against, without the seconds GGUFReader takes over the vocabulary."""
    path = resolve_model_path("smollm2-135m-instruct")
    assert read_context_length("smollm2-135m-instruct") == GGUFFile(path).config.max_position_embeddings == 8192
    cut = tmp_path / "cut.gguf"
    with open(path, "rb") as f:
        cut.write_bytes(f.read(300))
    with pytest.raises(tc.CheckpointError, match="cut.gguf is truncated: its metadata ends early"):
        read_context_length(str(cut))
    with pytest.raises(tc.CheckpointError, match="README.md is neither a .gguf file nor a Hugging Face directory"):
        read_context_length(str(ROOT / "README.md"))


def test_a_bad_output_dir_is_reported_before_a_batch_is_lost(run_cli, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the directory's parent should be")
    code, stderr = run_cli("eval", "--output_dir", str(blocked / "results"))
    assert code == 1 and f"--output_dir {blocked / 'results'} cannot be created: {blocked} is a file" in stderr
    assert not (blocked.parent / "results.jsonl").exists()


@pytest.mark.parametrize("workdir, message", [
    (lambda tmp: tmp / "a_file", "workdir {} is a file; give a directory"),
    (lambda tmp: "/proc/run", "workdir {} is not writable"),
])
def test_a_training_workdir_that_cannot_be_written_fails_before_the_model_loads(tmp_path, monkeypatch, workdir,
                                                                               message):
    workdir = workdir(tmp_path)
    if str(workdir).endswith("a_file"):
        workdir.write_text("")
    monkeypatch.setattr(tc.training.loop, "Trainer", None)  # nothing is built before the error
    with pytest.raises(tc.training.ConfigError, match=re.escape(message.format(workdir))):
        tc.training.train(tiny_config({"steps": 2}), str(workdir))


def test_an_export_to_a_directory_that_cannot_be_written_fails_before_the_run_is_read(tmp_path):
    with pytest.raises(ValueError, match=re.escape("path's directory /proc is not writable")):
        export_trained(str(tmp_path / "no_run"), "/proc/gist.safetensors")


@pytest.mark.parametrize("make_bad, message", [
    (lambda tmp: tmp / "missing.safetensors", "missing.safetensors is not a file; give a .safetensors file"),
    (lambda tmp: ROOT / "compressors" / "gist_smollm2_k8.safetensors", None),  # truncated copy, below
    (lambda tmp: ROOT / "README.md", "is truncated or not a safetensors file"),
])
def test_a_compressor_file_that_is_missing_truncated_or_of_another_kind_raises_naming_it(tmp_path, make_bad, message):
    path = make_bad(tmp_path)
    if message is None:  # the committed file cut to half its bytes
        source = path
        path = tmp_path / source.name
        path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
        message = "gist_smollm2_k8.safetensors is truncated or not a safetensors file"
    with pytest.raises(ValueError, match=message):
        load_trained(str(path))


def test_a_safetensors_file_without_a_training_config_is_not_taken_for_a_compressor(tmp_path):
    from safetensors.numpy import save_file
    path = str(tmp_path / "weights.safetensors")
    save_file({"w": np.zeros(3, np.float32)}, path)
    with pytest.raises(ValueError, match="weights.safetensors holds no training config: it is not a trained "
                                         "compressor"):
        load_trained(path)


@pytest.mark.parametrize("content, message", [
    (b"", "holds no rows; write one JSON object per line"),
    (b"\xff\xfe{}", "is not UTF-8 text (byte 0 is b'\\xff'); save it as UTF-8 JSON Lines"),
])
def test_data_files_that_are_empty_or_not_utf8_name_the_file_and_the_fix(tmp_path, content, message):
    path = data_file(tmp_path, "cases.jsonl", content)
    with pytest.raises(ValueError, match=re.escape(f"{path} {message}")):
        read_jsonl(path)
    with pytest.raises(ValueError, match="^" + re.escape(f"data: {path} {message}")):
        Sweep(data=path)


def test_a_sweep_past_the_models_context_raises_before_its_first_batch(tmp_path):
    model = tc.testing.tiny_llama(max_position_embeddings=256)
    sweep = Sweep(presses=("none",), lengths=(128, 240), num_cases=1)
    with pytest.raises(ValueError, match=r"lengths go up to 240 tokens, which with 32 new tokens \(max_new_tokens\) "
                                         r"run past the model's context of 256; keep lengths below 224"):
        tc.evaluation.run_sweep(model, None, sweep, tmp_path / "results.jsonl", model_name="tiny")
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.parametrize("call, message", [
    (lambda m: tc.prefill(m, [[1, 2]], chunk_size=0), "chunk_size must be a positive number of tokens, got 0"),
    (lambda m: tc.generate_ids(m, [[1, 2]], chunk_size=0), "chunk_size must be a positive number of tokens, got 0"),
    (lambda m: tc.generate_ids(m, [[1, 2]], max_new_tokens=0), "max_new_tokens must be a whole number of tokens >= 1"),
    (lambda m: tc.generate_ids(m, [[1, 2]], max_new_tokens=2.5), "max_new_tokens must be a whole number"),
    (lambda m: tc.generate_ids(m, [[1, 99]]), r"ids must be token ids in \[0, 64\), got values in \[1, 99\]"),
    (lambda m: tc.prefill(m, [[1, 2]], capacity=1), "the prompt has 2 tokens but capacity is 1; raise capacity"),
])
def test_api_arguments_are_checked_before_anything_compiles(call, message):
    model = tc.testing.tiny_llama()
    compiled = tc.generation._forward_jit._cache_size()
    with pytest.raises(ValueError, match=message):
        call(model)
    assert tc.generation._forward_jit._cache_size() == compiled


def test_check_finite_names_the_first_layer_that_holds_a_nan_or_inf():
    """A NaN weight in layer 0's MLP: layer 0's keys and values are finite (they come from its input),
    layer 1's are not. Without the guard, the NaN reaches the logits with no word."""
    model = tc.testing.tiny_llama(seed=3)
    ids = [[1, 2, 3, 4], [5, 6, 7, 8]]
    tc.prefill(model, ids, check_finite=True)  # a sound model passes
    kernel = model.layers[0].mlp.down_proj.kernel
    kernel.set_value(kernel.get_value().at[0, 0].set(np.nan))
    logits, _ = tc.prefill(model, ids)
    assert np.isnan(np.asarray(logits)).all()
    with pytest.raises(tc.NonFiniteError, match=r"after prefill: layer 1 is the first whose keys or values hold a "
                                                r"NaN or inf \(rows \[0, 1\]\)"):
        tc.prefill(model, ids, check_finite=True)
    with pytest.raises(tc.NonFiniteError, match="after prefill: layer 1"):
        tc.generate_ids(model, ids, max_new_tokens=2, check_finite=True)


def test_check_finite_rejects_a_cache_passed_in_with_an_inf_and_the_evaluation_records_a_failed_case():
    model = tc.testing.tiny_llama(seed=3)
    _, cache = tc.prefill(model, [[1, 2, 3], [4, 5, 6]], capacity=8)
    layer = cache.layers[0]
    damaged = tc.KVCache(layers=(type(layer)(keys=layer.keys.at[1, 0, 2, 0].set(np.inf), values=layer.values,
                                             positions=layer.positions, lengths=layer.lengths), *cache.layers[1:]),
                         num_seen=cache.num_seen)
    with pytest.raises(tc.NonFiniteError, match=r"the cache passed to prefill: layer 0 .* \(rows \[1\]\)"):
        tc.prefill(model, [[7], [8]], cache=damaged, check_finite=True)
    with pytest.raises(tc.NonFiniteError, match=r"after decode: layer 0 .* \(rows \[1\]\)"):
        tc.decode(model, [7, 8], damaged, check_finite=True)
    np.testing.assert_array_equal(damaged.nonfinite(), [[False, True], [False, False]])


def test_an_evaluated_case_whose_cache_holds_a_nan_fails_instead_of_scoring(tmp_path):
    tokenizer = tc.Tokenizer.from_gguf(GGUFFile(resolve_model_path("smollm2-135m-instruct")))
    model = tc.testing.tiny_llama(seed=3, vocab_size=tokenizer.vocab_size)
    kernel = model.layers[0].mlp.down_proj.kernel
    kernel.set_value(kernel.get_value().at[0, 0].set(np.nan))
    path = data_file(tmp_path, "rows.jsonl", ROW.encode())
    (record,) = tc.evaluation.runner.run_batch(model, tokenizer, read_jsonl(path), None, max_new_tokens=2)
    assert record["score"] == 0.0 and record["error"] == "NaN or inf in the cache from layer 1 on"


# Property tests of the validators: each raises exactly on the inputs outside its domain.
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 70), min_size=1, max_size=12))
def test_check_token_ids_raises_exactly_on_ids_outside_the_vocabulary(ids):
    outside = any(i < 0 or i >= 64 for i in ids)
    if outside:
        with pytest.raises(ValueError, match=r"ids must be token ids in \[0, 64\)"):
            check_token_ids(np.asarray(ids), 64)
    else:
        check_token_ids(np.asarray(ids), 64)


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2), st.booleans(),
                 st.text(max_size=3)))
def test_budget_ratio_is_taken_exactly_in_zero_to_one(ratio):
    valid = not isinstance(ratio, (bool, str)) and 0 <= ratio < 1
    if valid:
        assert Budget(ratio=ratio).ratio == ratio
    else:
        with pytest.raises(ValueError, match="ratio is the fraction of entries removed"):
            Budget(ratio=ratio)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20_000), st.integers(1, 10_000))
def test_check_context_raises_exactly_past_the_context(positions, limit):
    model = type("Model", (), {"config": type("Config", (), {"max_position_embeddings": limit})()})()
    if positions > limit:
        with pytest.raises(ValueError, match=rf"needs {positions} positions but the model's context is {limit}"):
            check_context(model, positions, "the prompt", "shorten it")
    else:
        check_context(model, positions, "the prompt", "shorten it")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 63), max_size=6), min_size=1, max_size=4))
def test_pad_batch_takes_rows_of_one_or_more_ids_and_keeps_them(rows):
    if any(not row for row in rows):
        with pytest.raises(ValueError, match=r"ids: row \d+ is empty; every prompt needs at least one token"):
            tc.pad_batch(rows)
        return
    ids, lengths = tc.pad_batch(rows)
    assert lengths.tolist() == [len(row) for row in rows]
    assert [ids[i, :n].tolist() for i, n in enumerate(lengths)] == rows


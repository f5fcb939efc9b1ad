"""Bad checkpoints and arguments get a `tc.CheckpointError` / `ValueError` that names the problem.

Each case asserts the exception type and a message fragment naming the file, key, tensor or
argument at fault, so that no raw numpy / gguf / safetensors / XLA exception leaks to the user.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tokcomp_jax as tc
from tokcomp_jax.models.config import ModelConfig

from checkpoint_fixtures import (
    LLAMA_HPARAMS, random_llama_tensors, write_hf_dir, write_llama_gguf)


def _expect(match: str, fn, *args, exc=tc.CheckpointError, **kwargs) -> str:
    """Runs `fn`, checks it raises exactly `exc` (or a subclass) whose message contains `match`."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert match in message, f"{match!r} not in {message!r}"
    return message


@pytest.fixture(scope="module")
def tensors():
    return random_llama_tensors(LLAMA_HPARAMS, seed=0)


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory, tensors):
    return write_llama_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"), LLAMA_HPARAMS, tensors)


@pytest.fixture
def hf_dir(tmp_path, tensors):
    """A fresh, valid HF directory (config.json, model.safetensors, tokenizer.json) per test."""
    directory = write_hf_dir(str(tmp_path / "hf"), LLAMA_HPARAMS, tensors)
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(
        os.path.join(directory, "tokenizer.json"))
    return directory


def _copy_with(src: str, dst: str, data: bytes) -> str:
    with open(dst, "wb") as f:
        f.write(data)
    return dst


# --- the fixtures themselves load ---------------------------------------------------------------


def test_valid_checkpoints_load(good_gguf, hf_dir):
    model, tokenizer = tc.load(good_gguf)
    assert model.config.num_layers == 2 and tokenizer.vocab_size == LLAMA_HPARAMS["vocab_size"]
    model, tokenizer = tc.load(hf_dir)
    assert model.config.num_kv_heads == 2 and tokenizer is not None


# --- names and paths -----------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nowhere" / "model.gguf")
    message = _expect("neither a known model", tc.load, missing)
    assert missing in message


def test_unknown_model_name():
    message = _expect("'no-such-model-7b'", tc.load, "no-such-model-7b")
    assert "smollm2-135m-instruct" in message  # lists the names that exist


def test_file_that_is_not_gguf(tmp_path):
    path = _copy_with("", str(tmp_path / "weights.bin"), b"\0" * 64)
    _expect("neither a .gguf file nor a Hugging Face directory", tc.load, path)


def test_path_objects_are_accepted(good_gguf):
    import pathlib
    model, _ = tc.load(pathlib.Path(good_gguf), load_tokenizer=False)
    assert model.config.vocab_size == LLAMA_HPARAMS["vocab_size"]


def test_wrong_dtype_name(good_gguf):
    _expect("dtype 'float8' is not supported", tc.load, good_gguf, dtype="float8", exc=ValueError)
    _expect("is not supported", tc.load, good_gguf, dtype=np.int32, exc=ValueError)


# --- GGUF files ----------------------------------------------------------------------------------


def test_gguf_truncated(good_gguf, tmp_path):
    data = open(good_gguf, "rb").read()
    half = _copy_with(good_gguf, str(tmp_path / "half.gguf"), data[: len(data) // 2])
    message = _expect("truncated", tc.load, half)
    assert half in message
    # Cut inside the metadata: the reader itself fails.
    head = _copy_with(good_gguf, str(tmp_path / "head.gguf"), data[:200])
    _expect(f"{head} is not a readable GGUF file", tc.load, head)
    # One byte short at the very end: the last tensor does not fit.
    short = _copy_with(good_gguf, str(tmp_path / "short.gguf"), data[:-1])
    _expect("truncated", tc.load, short)


def test_gguf_corrupt(good_gguf, tmp_path):
    rng = np.random.default_rng(0)
    noise = _copy_with("", str(tmp_path / "noise.gguf"), rng.bytes(4096))
    _expect(f"{noise} is not a readable GGUF file", tc.load, noise)
    data = open(good_gguf, "rb").read()
    bad_magic = _copy_with(good_gguf, str(tmp_path / "magic.gguf"), b"GGML" + data[4:])
    _expect(f"{bad_magic} is not a readable GGUF file", tc.load, bad_magic)
    empty = _copy_with("", str(tmp_path / "empty.gguf"), b"")
    _expect(f"{empty} is not a readable GGUF file", tc.load, empty)


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_gguf_unsupported_architecture(tmp_path, tensors, arch):
    path = write_llama_gguf(str(tmp_path / f"{arch}.gguf"), LLAMA_HPARAMS, tensors, arch=arch)
    message = _expect(f"architecture {arch!r} is not supported", tc.load, path)
    assert path in message and "llama" in message


def test_gguf_missing_metadata(tmp_path, tensors):
    path = write_llama_gguf(str(tmp_path / "m.gguf"), LLAMA_HPARAMS, tensors, skip_keys=("block_count",))
    _expect("lacks the metadata key llama.'block_count'", tc.load, path)


def test_gguf_tensor_shape_mismatch(tmp_path):
    small = {**LLAMA_HPARAMS, "hidden_size": 32}
    path = write_llama_gguf(str(tmp_path / "m.gguf"), LLAMA_HPARAMS, random_llama_tensors(small))
    message = _expect("has shape", tc.load, path, load_tokenizer=False)
    assert "model.embed_tokens.weight" in message and "(128, 64)" in message


def test_gguf_missing_tensor(tmp_path, tensors):
    partial = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    path = write_llama_gguf(str(tmp_path / "m.gguf"), LLAMA_HPARAMS, partial)
    _expect("layers.1.mlp.up_proj.kernel", tc.load, path, load_tokenizer=False)


def test_gguf_unexpected_tensors(tmp_path, tensors):
    unknown = write_llama_gguf(str(tmp_path / "u.gguf"), LLAMA_HPARAMS, tensors,
                               extra_tensors={"blk.0.ffn_gate_inp.weight": np.zeros((4, 64))})
    _expect("unexpected tensor 'blk.0.ffn_gate_inp.weight'", tc.load, unknown, load_tokenizer=False)
    # A bias the metadata does not announce is loaded (llama.cpp reads optional biases); one on a
    # tensor that takes none is an error naming it.
    biased = dict(tensors, **{"model.norm.bias": np.zeros(64, np.float32)})
    path = write_llama_gguf(str(tmp_path / "b.gguf"), LLAMA_HPARAMS, biased)
    _expect("model.norm.bias", tc.load, path, load_tokenizer=False)


def test_gguf_block_count_disagrees_with_tensors(tmp_path, tensors):
    extra_layer = dict(tensors, **{"model.layers.2.mlp.up_proj.weight": np.zeros((128, 64), np.float32)})
    path = write_llama_gguf(str(tmp_path / "x.gguf"), LLAMA_HPARAMS, extra_layer)
    _expect("llama.block_count is 2 but the file has tensors for 3 blocks", tc.load, path)
    path = write_llama_gguf(str(tmp_path / "y.gguf"), {**LLAMA_HPARAMS, "num_hidden_layers": 3}, tensors)
    _expect("llama.block_count is 3 but the file has tensors for 2 blocks", tc.load, path)
    # A corrupt count (here 2**30 + 2) fails fast instead of building a billion-layer model.
    path = write_llama_gguf(str(tmp_path / "z.gguf"), {**LLAMA_HPARAMS, "num_hidden_layers": 2**30 + 2}, tensors)
    _expect("block_count is 1073741826", tc.load, path)


def test_gguf_corrupt_metadata_string(good_gguf, tmp_path):
    data = bytearray(open(good_gguf, "rb").read())
    at = data.index(b"llama", 40)  # the value of general.architecture
    data[at] = 0xC3  # a lone UTF-8 lead byte
    path = _copy_with(good_gguf, str(tmp_path / "s.gguf"), bytes(data))
    _expect("metadata 'general.architecture' is corrupt", tc.load, path)


def test_gguf_unsupported_rope(tmp_path, tensors):
    freqs = write_llama_gguf(str(tmp_path / "f.gguf"), LLAMA_HPARAMS, tensors,
                             extra_tensors={"rope_freqs.weight": np.ones(8)})
    _expect("rope_freqs", tc.load, freqs)
    yarn = write_llama_gguf(str(tmp_path / "y.gguf"), LLAMA_HPARAMS, tensors, configure=lambda w: (
        w.add_rope_scaling_type(__import__("gguf").RopeScalingType.YARN), w.add_rope_scaling_factor(4.0)))
    _expect("RoPE scaling 'yarn' is not supported", tc.load, yarn)


def test_gguf_linear_rope_scaling_is_read(tmp_path, tensors):
    path = write_llama_gguf(str(tmp_path / "l.gguf"), LLAMA_HPARAMS, tensors, configure=lambda w: (
        w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR), w.add_rope_scaling_factor(4.0)))
    model, _ = tc.load(path, load_tokenizer=False)
    assert model.config.rope_scaling.rope_type == "linear" and model.config.rope_scaling.factor == 4.0


def test_gguf_without_tokenizer(tmp_path, tensors):
    path = write_llama_gguf(str(tmp_path / "m.gguf"), LLAMA_HPARAMS, tensors, tokenizer=False)
    message = _expect("load_tokenizer=False", tc.load, path)
    assert path in message
    model, tokenizer = tc.load(path, load_tokenizer=False)
    assert tokenizer is None and model.config.vocab_size == LLAMA_HPARAMS["vocab_size"]


# --- Hugging Face directories --------------------------------------------------------------------


def _write_config(directory: str, **changes) -> None:
    config = {**LLAMA_HPARAMS, **changes}
    config = {k: v for k, v in config.items() if v is not None}
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def test_hf_missing_config(hf_dir):
    os.remove(os.path.join(hf_dir, "config.json"))
    _expect(f"{os.path.join(hf_dir, 'config.json')} is missing", tc.load, hf_dir)


def test_hf_config_not_json(hf_dir):
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        f.write("{ not json")
    _expect("config.json is not valid JSON", tc.load, hf_dir)


@pytest.mark.parametrize("model_type", ["gpt2", None])
def test_hf_unsupported_model_type(hf_dir, model_type):
    _write_config(hf_dir, model_type=model_type)
    message = _expect(f"model_type {model_type!r}", tc.load, hf_dir)
    assert "config.json" in message and "llama" in message


def test_hf_config_lacks_key(hf_dir):
    _write_config(hf_dir, hidden_size=None)
    message = _expect("lacks 'hidden_size'", tc.load, hf_dir)
    assert os.path.join(hf_dir, "config.json") in message
    _write_config(hf_dir, hidden_size="64")
    _expect("hidden_size='64' must be integers", tc.load, hf_dir)


def test_hf_config_inconsistent_heads(hf_dir):
    _write_config(hf_dir, num_attention_heads=6, num_key_value_heads=4)
    message = _expect("num_heads (6) must be a multiple of num_kv_heads (4)", tc.load, hf_dir)
    assert "config.json" in message


def test_hf_unsupported_rope(hf_dir):
    _write_config(hf_dir, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    _expect("rope_scaling type 'yarn' is not supported", tc.load, hf_dir)


def test_hf_missing_weights(hf_dir):
    os.remove(os.path.join(hf_dir, "model.safetensors"))
    message = _expect("missing", tc.load, hf_dir)
    assert "model.safetensors" in message and hf_dir in message
    open(os.path.join(hf_dir, "pytorch_model.bin"), "wb").close()
    _expect("only .safetensors weights load", tc.load, hf_dir)


def test_hf_index_names_missing_shard(tmp_path, tensors):
    directory = write_hf_dir(str(tmp_path / "sharded"), LLAMA_HPARAMS, tensors, shards=3)
    assert tc.load(directory, load_tokenizer=False)[0].config.num_layers == 2  # valid as written
    os.remove(os.path.join(directory, "model-00002-of-00003.safetensors"))
    message = _expect("model-00002-of-00003.safetensors", tc.load, directory, load_tokenizer=False)
    assert "missing" in message
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}}, f)
    _expect("model.safetensors.index.json has no weight_map", tc.load, directory, load_tokenizer=False)


def test_hf_truncated_safetensors(hf_dir):
    path = os.path.join(hf_dir, "model.safetensors")
    data = open(path, "rb").read()
    for cut in (len(data) // 2, len(data) - 1, 6):
        _copy_with(path, path, data[:cut])
        message = _expect("is truncated or corrupt", tc.load, hf_dir, load_tokenizer=False)
        assert path in message


def test_hf_corrupt_safetensors(hf_dir):
    path = os.path.join(hf_dir, "model.safetensors")
    _copy_with(path, path, np.random.default_rng(1).bytes(2048))
    _expect(f"{path} is truncated or corrupt", tc.load, hf_dir, load_tokenizer=False)


def test_hf_tensor_wrong_shape(tmp_path):
    # config.json says hidden 64; the weights are those of a hidden-32 model.
    small = random_llama_tensors({**LLAMA_HPARAMS, "hidden_size": 32})
    directory = write_hf_dir(str(tmp_path / "m"), LLAMA_HPARAMS, small)
    message = _expect("has shape", tc.load, directory, load_tokenizer=False)
    assert "(128, 32)" in message and "(128, 64)" in message and directory in message


def test_hf_missing_tensor(tmp_path, tensors):
    partial = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    directory = write_hf_dir(str(tmp_path / "m"), LLAMA_HPARAMS, partial)
    message = _expect("lacks 1 tensors", tc.load, directory, load_tokenizer=False)
    assert "layers.1.self_attn.k_proj" in message and directory in message


def test_hf_untied_model_without_lm_head(tmp_path, tensors):
    partial = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    directory = write_hf_dir(str(tmp_path / "m"), LLAMA_HPARAMS, partial)
    _expect("lm_head.kernel", tc.load, directory, load_tokenizer=False)
    # Tied, the same files load; an lm_head.weight beside tied embeddings is ignored too.
    _write_config(directory, tie_word_embeddings=True)
    assert tc.load(directory, load_tokenizer=False)[0].config.tie_word_embeddings
    directory = write_hf_dir(str(tmp_path / "t"), {**LLAMA_HPARAMS, "tie_word_embeddings": True}, tensors)
    assert tc.load(directory, load_tokenizer=False)[0].config.tie_word_embeddings


def test_hf_tensors_the_config_does_not_use(tmp_path, tensors):
    # Biases that the config (attention_bias=false) says nothing of must not be dropped silently.
    biased = dict(tensors, **{"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
    directory = write_hf_dir(str(tmp_path / "m"), LLAMA_HPARAMS, biased)
    message = _expect("the config does not use", tc.load, directory, load_tokenizer=False)
    assert "model.layers.0.self_attn.q_proj.bias" in message
    # So must a layer beyond num_hidden_layers.
    extra = dict(tensors, **{"model.layers.2.mlp.up_proj.weight": np.zeros((128, 64), np.float32)})
    directory = write_hf_dir(str(tmp_path / "x"), LLAMA_HPARAMS, extra)
    _expect("model.layers.2.mlp.up_proj.weight", tc.load, directory, load_tokenizer=False)


def test_hf_missing_tokenizer(hf_dir):
    os.remove(os.path.join(hf_dir, "tokenizer.json"))
    message = _expect("load_tokenizer=False", tc.load, hf_dir)
    assert "tokenizer.json is missing" in message
    model, tokenizer = tc.load(hf_dir, load_tokenizer=False)
    assert tokenizer is None and model.config.hidden_size == 64


def test_hf_corrupt_tokenizer(hf_dir):
    with open(os.path.join(hf_dir, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0", "model": 42}')
    _expect("tokenizer.json is not a valid tokenizer file", tc.load, hf_dir)


def test_hf_empty_directory(tmp_path):
    directory = tmp_path / "empty"
    directory.mkdir()
    _expect("config.json is missing", tc.load, str(directory))


# --- ModelConfig validation ----------------------------------------------------------------------


_BASE = dict(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
             num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.mark.parametrize("changes, match", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads (6) must be a multiple of num_kv_heads (4)"),
    (dict(num_kv_heads=0), "num_kv_heads must be positive"),
    (dict(num_layers=-1), "num_layers must be positive"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(architecture="gpt2"), "architecture 'gpt2' is not supported"),
])
def test_model_config_validation(changes, match):
    _expect(match, ModelConfig, **{**_BASE, **changes}, exc=ValueError)


def test_rope_scaling_validation():
    from tokcomp_jax.models.config import RopeScaling
    _expect("rope_scaling type 'dynamic' is not supported", RopeScaling, rope_type="dynamic", exc=ValueError)

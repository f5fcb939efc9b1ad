"""Meshes, logical-axis rules and sharded Llama states. The multi-device checks run once in a
subprocess with 8 fake CPU devices (tests/sharding_worker.py); this process keeps its one device."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from filelock import FileLock
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

import tokcomp_jax as tc
from tokcomp_jax.sharding import (DEFAULT_RULES, MESH_AXES, initialize_distributed, logical_to_spec, make_mesh,
                                  param_logical_axes)
from tolerances import model_tolerance, training_losses

SHAPES = dict(head_dim=32, num_heads=4, num_kv_heads=2, hidden_size=64, intermediate_size=128)

# By the last two keys of a parameter's path.
EXPECTED_AXES = {
    "embed_tokens/embedding": ("vocab", "embed"),
    "q_proj/kernel": ("embed", "heads"),
    "k_proj/kernel": ("embed", "kv_heads"),
    "v_proj/kernel": ("embed", "kv_heads"),
    "o_proj/kernel": ("heads", "embed"),
    "q_proj/bias": ("heads",),
    "k_proj/bias": ("kv_heads",),
    "v_proj/bias": ("kv_heads",),
    "o_proj/bias": ("embed",),
    "q_norm/weight": ("norm",),
    "k_norm/weight": ("norm",),
    "gate_proj/kernel": ("embed", "mlp"),
    "up_proj/kernel": ("embed", "mlp"),
    "down_proj/kernel": ("mlp", "embed"),
    "gate_proj/bias": ("mlp",),
    "up_proj/bias": ("mlp",),
    "down_proj/bias": ("embed",),
    "input_layernorm/weight": ("norm",),
    "post_attention_layernorm/weight": ("norm",),
    "norm/weight": ("norm",),
    "lm_head/kernel": ("embed", "vocab"),
}
# What DEFAULT_RULES make of them when every dimension divides.
EXPECTED_SPECS = {
    "embed_tokens/embedding": ["tensor", "fsdp"],
    "q_proj/kernel": ["fsdp", "tensor"], "k_proj/kernel": ["fsdp", "tensor"], "v_proj/kernel": ["fsdp", "tensor"],
    "o_proj/kernel": ["tensor", "fsdp"],
    "gate_proj/kernel": ["fsdp", "tensor"], "up_proj/kernel": ["fsdp", "tensor"],
    "down_proj/kernel": ["tensor", "fsdp"],
    "input_layernorm/weight": [None], "post_attention_layernorm/weight": [None], "norm/weight": [None],
    "lm_head/kernel": ["fsdp", "tensor"],
}
VARIANTS = {
    "llama": {}, "qwen2": dict(qkv_bias=True), "biases": dict(o_bias=True, mlp_bias=True),
    "qwen3": dict(qk_norm=True), "tied": dict(tie_word_embeddings=True),
}


def _axes_by_path(state, extra_axes=None) -> dict[tuple[str, ...], tuple]:
    """param_logical_axes by path, each path as a tuple of strings."""
    axes = param_logical_axes(state, extra_axes)
    leaves = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {tuple(str(entry.key) for entry in path): variable.get_value() for path, variable in leaves}


def _model(**overrides):
    return tc.testing.tiny_llama(**{**SHAPES, **overrides})


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_has_logical_axes(variant):
    """Fails when the model grows a parameter that the table doesn't know."""
    model = _model(**VARIANTS[variant])
    params = {tuple(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    axes = _axes_by_path(nnx.split(model)[1])
    assert axes.keys() == params.keys()
    for path, variable in params.items():
        names = axes[path]
        assert len(names) == variable.get_value().ndim, path
        assert all(name in DEFAULT_RULES for name in names), (path, names)
        assert names == EXPECTED_AXES["/".join(path[-2:])], path


def test_unknown_parameter_raises_and_extra_axes_name_it():
    class Gist(nnx.Module):
        def __init__(self):
            self.llm = _model()
            self.gist_tokens = nnx.Param(np.zeros((4, 64), np.float32))

    state = nnx.split(Gist())[1]
    with pytest.raises(ValueError, match="gist_tokens.*extra_axes"):
        param_logical_axes(state)
    axes = _axes_by_path(state, {"gist_tokens": ("length", "embed")})
    assert axes[("gist_tokens",)] == ("length", "embed")
    assert axes[("llm", "layers", "1", "mlp", "down_proj", "kernel")] == ("mlp", "embed")


def test_lora_parameters_take_their_layer_axes_and_the_rank():
    model = _model()
    model.layers[0].self_attn.q_proj = nnx.LoRALinear(64, 128, lora_rank=4, use_bias=False, rngs=nnx.Rngs(0))
    axes = _axes_by_path(nnx.split(model)[1])
    prefix = ("layers", "0", "self_attn", "q_proj")
    assert axes[prefix + ("kernel",)] == ("embed", "heads")
    assert axes[prefix + ("lora", "lora_a")] == ("embed", "lora_rank")
    assert axes[prefix + ("lora", "lora_b")] == ("lora_rank", "heads")


def test_logical_to_spec_falls_back_to_replication():
    mesh = AbstractMesh((2, 4, 1), MESH_AXES)
    assert logical_to_spec(("batch", "length"), mesh, shape=(8, 16)) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "length"), mesh, shape=(2, 16)) == P("data", None)  # longest prefix
    assert logical_to_spec(("batch", "length"), mesh, shape=(3, 16)) == P(None, None)
    assert logical_to_spec(("batch", "length"), mesh) == P(("data", "fsdp"), None)
    cube = AbstractMesh((2, 2, 2), MESH_AXES)
    assert logical_to_spec(("embed", "vocab"), cube, shape=(64, 63)) == P("fsdp", None)
    assert logical_to_spec(("embed", "heads"), cube, shape=(63, 128)) == P(None, "tensor")
    # A mesh axis serves one dimension of an array: "embed" finds "fsdp" taken by "batch".
    assert logical_to_spec(("batch", "length", "embed"), cube, shape=(8, 4, 64)) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("batch", None), cube, shape=(8, 4)) == P(("data", "fsdp"), None)


def test_logical_to_spec_errors_name_the_problem():
    mesh = AbstractMesh((2, 2, 2), MESH_AXES)
    with pytest.raises(ValueError, match="'experts' has no sharding rule"):
        logical_to_spec(("experts",), mesh)
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        logical_to_spec(("embed",), mesh, rules={"embed": "model"})
    with pytest.raises(ValueError, match="name 2 dimensions but the array has shape"):
        logical_to_spec(("embed", "mlp"), mesh, shape=(64,))


def test_make_mesh_on_one_device():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    with pytest.raises(ValueError, match=r"data=2 \* fsdp=1 \* tensor=1 = 2 devices, but there are 1"):
        make_mesh(data=2)
    with pytest.raises(ValueError, match="fsdp must be a positive number"):
        make_mesh(fsdp=0)
    with pytest.raises(ValueError, match="tensor must be a positive number"):
        make_mesh(tensor=1.5)
    with pytest.raises(ValueError, match="-1 for data and tensor"):
        make_mesh(data=-1, tensor=-1)


def test_initialize_distributed_is_a_no_op_for_one_process():
    initialize_distributed(num_processes=1)
    assert jax.process_count() == 1 and not jax.distributed.is_initialized()


def _run_worker() -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    # The worker checks that initialize_distributed is a no-op outside a cluster: keep the test
    # runner's own cluster manager, if any, out of its environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "KUBERNETES_"))}
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("sharding_worker.py"))], env=env,
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr[-5000:]
    return json.loads(run.stdout)


@pytest.fixture(scope="session")
def worker(tmp_path_factory):
    """The results of tests/sharding_worker.py, run on 8 fake CPU devices once per test session
    (pytest-xdist workers share them through a file)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return _run_worker()
    path = tmp_path_factory.getbasetemp().parent / "sharding_worker.json"
    with FileLock(f"{path}.lock"):
        if not path.is_file():
            path.write_text(json.dumps(_run_worker()))
        return json.loads(path.read_text())


def test_worker_runs_one_process_on_8_devices(worker):
    assert worker["devices"] == 8 and worker["processes"] == 1


def test_make_mesh_layouts(worker):
    shapes = {name: mesh["shape"] for name, mesh in worker["meshes"].items()}
    assert shapes == {"8": {"data": 8, "fsdp": 1, "tensor": 1}, "2x4": {"data": 2, "fsdp": 4, "tensor": 1},
                      "2x2x2": {"data": 2, "fsdp": 2, "tensor": 2}, "fill": {"data": 4, "fsdp": 1, "tensor": 2}}
    for mesh in worker["meshes"].values():
        assert mesh["devices"] == list(range(8))
        assert mesh["axis_types"] == ["AxisType.Auto"] * 3


def test_make_mesh_errors_name_the_arguments(worker):
    errors = worker["mesh_errors"]
    assert "data=-1" in errors["fsdp3"] and "fsdp=3" in errors["fsdp3"] and "8 devices" in errors["fsdp3"]
    assert "data=4 * fsdp=4 * tensor=1 = 16 devices, but there are 8" in errors["4x4"]
    assert "tensor=3" in errors["2x2x3"]
    assert "-1 for data and fsdp" in errors["two_fills"]


def _spec_key(path: str) -> str:
    return "/".join(path.split("/")[-2:])


@pytest.mark.parametrize("layout", ["8x1x1", "2x2x2", "2x4x1"])
def test_params_are_sharded_by_the_rules(worker, layout):
    specs = worker["param_specs"][layout]
    assert len(specs) == 21
    for path, spec in specs.items():
        assert spec == EXPECTED_SPECS[_spec_key(path)], path


def test_model_created_sharded_from_its_abstract_state(worker):
    """jit(init, out_shardings=param_shardings(abstract state)): no device holds the whole model."""
    assert worker["created_sharded"]["specs"] == worker["param_specs"]["2x2x2"]
    assert worker["created_sharded"]["equal"]


def test_dims_that_do_not_divide_are_replicated(worker):
    """vocab_size 63 on tensor=2: the embedding's and lm_head's vocab dimension is replicated."""
    specs = worker["odd_vocab_specs"]
    assert specs["embed_tokens/embedding"] == [None, "fsdp"]
    assert specs["lm_head/kernel"] == ["fsdp", None]
    assert specs["layers/0/self_attn/q_proj/kernel"] == ["fsdp", "tensor"]


def test_batch_sharding_splits_rows_over_data_and_fsdp(worker):
    assert worker["batch_spec"] == [["data", "fsdp"], None]


def test_sharded_forward_matches_unsharded(worker):
    assert set(worker["forward_max_diff"]) == {"2x2x2", "2x4x1"}
    # The worker's 8 rows of 16 tokens; tensor and FSDP shards sum the layers' products in other orders.
    tolerance = model_tolerance(tc.testing.tiny_llama(**SHAPES).config, 16, worker["forward_magnitude"])
    for layout, diff in worker["forward_max_diff"].items():
        assert diff <= tolerance, layout


@pytest.mark.parametrize("which", ["adamw_specs", "adamw_placed_specs", "nnx_optimizer_specs"])
def test_optimizer_state_mirrors_param_shardings(worker, which):
    params = worker["param_specs"]["2x2x2"]
    specs = worker[which]
    mirrored = 0
    for path, spec in specs.items():
        keys = path.split("/")
        if "mu" in keys or "nu" in keys:
            param = "/".join(keys[keys.index("mu" if "mu" in keys else "nu") + 1:])
            assert spec == params[param], path
            mirrored += 1
        else:
            assert keys[-1] in ("count", "step") and spec == [], path
    assert mirrored == 2 * len(params)


def test_sharded_train_steps_match_one_device(worker):
    losses = worker["losses"]
    assert losses["1"][-1] < losses["1"][0]
    # 5 AdamW steps on the worker's 8 rows of 17 tokens: the meshes sum in other orders.
    tolerance = training_losses(tc.testing.tiny_llama(**SHAPES).config, 16, 8 * 16, losses["1"],
                                worker["train_logits_magnitude"])
    for layout in ("2x2x2", "2x4x1"):
        np.testing.assert_array_less(np.abs(np.subtract(losses[layout], losses["1"])), tolerance)
        assert worker["trained_state_keeps_sharding"][layout]


def test_config_variants_cover_every_option():
    """VARIANTS switch on every boolean parameter option of ModelConfig."""
    options = {f.name for f in dataclasses.fields(tc.ModelConfig) if f.type in ("bool", bool)}
    assert options == {key for overrides in VARIANTS.values() for key in overrides}

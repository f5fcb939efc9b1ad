"""The multi-device half of test_sharding.py, run in a subprocess with 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`); prints one JSON object of results.

It also holds the seed of the learned-compressor trainer: a data-parallel + FSDP train step.
"""
import functools
import json
import sys

from tokcomp_jax.sharding import initialize_distributed

initialize_distributed()  # before any other JAX call, as in a real run; a no-op in one process
initialize_distributed(num_processes=1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import tokcomp_jax as tc  # noqa: E402
from tokcomp_jax.sharding import (batch_sharding, make_mesh, param_shardings, shard_state,  # noqa: E402
                                  shardings_like)

SHAPES = dict(head_dim=32, num_heads=4, num_kv_heads=2, hidden_size=64, intermediate_size=128)
LAYOUTS = {"2x2x2": dict(data=2, fsdp=2, tensor=2), "2x4x1": dict(data=2, fsdp=4)}


def spec_json(spec: PartitionSpec) -> list:
    return [list(axes) if isinstance(axes, tuple) else axes for axes in spec]


def keystr(path) -> str:
    return "/".join(str(getattr(e, "key", getattr(e, "idx", getattr(e, "name", e)))) for e in path)


def leaf_specs(tree) -> dict[str, list]:
    """The spec of every array (or sharding) of a tree, by "/"-joined path."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {keystr(path).removesuffix("/value"): spec_json(getattr(x, "sharding", x).spec) for path, x in leaves}


def forward(graphdef, state, ids):
    model = nnx.merge(graphdef, state)
    logits, _, _ = model(ids, model.init_cache(*ids.shape), jnp.ones(ids.shape, bool))
    return logits


def train_step(graphdef, tx, params, opt_state, ids):
    """One AdamW step of next-token cross-entropy."""
    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        logits, _, _ = model(inputs, model.init_cache(*inputs.shape), jnp.ones(inputs.shape, bool))
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train(graphdef, params, ids, mesh=None, steps=5):
    """Losses of `steps` train steps on one device, or sharded over `mesh`; and the sharded state."""
    tx = optax.adamw(1e-2)
    step = functools.partial(train_step, graphdef, tx)
    if mesh is None:
        step, opt_state = jax.jit(step), tx.init(params)
    else:
        ps = param_shardings(params, mesh)
        os_ = shardings_like(jax.eval_shape(tx.init, params), ps)
        # A copy: the step donates its inputs, device_put may alias a replicated array's device-0
        # shard with its source, and the other runs start from the same `params`.
        params = jax.device_put(jax.tree.map(jnp.copy, params), ps)
        ids = jax.device_put(ids, batch_sharding(mesh))
        opt_state = jax.jit(tx.init, out_shardings=os_)(params)
        step = jax.jit(step, in_shardings=(ps, os_, batch_sharding(mesh)),
                       out_shardings=(ps, os_, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0, 1))
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, ids)
        losses.append(float(loss))
    return losses, params, opt_state


def main():
    results = {"devices": jax.device_count(), "processes": jax.process_count()}

    meshes = {"8": dict(data=8), "2x4": dict(data=2, fsdp=4), "2x2x2": dict(data=2, fsdp=2, tensor=2),
              "fill": dict(data=-1, tensor=2)}
    results["meshes"] = {}
    for name, kwargs in meshes.items():
        mesh = make_mesh(**kwargs)
        results["meshes"][name] = dict(shape=dict(mesh.shape), axis_types=[str(t) for t in mesh.axis_types],
                                       devices=sorted(d.id for d in mesh.devices.flat))
    results["mesh_errors"] = {}
    for name, kwargs in {"fsdp3": dict(fsdp=3), "4x4": dict(data=4, fsdp=4),
                         "2x2x3": dict(data=2, fsdp=2, tensor=3), "two_fills": dict(data=-1, fsdp=-1)}.items():
        try:
            make_mesh(**kwargs)
            results["mesh_errors"][name] = None
        except ValueError as e:
            results["mesh_errors"][name] = str(e)

    model = tc.testing.tiny_llama(**SHAPES)
    graphdef, state = nnx.split(model)
    ids = jax.random.randint(jax.random.key(0), (8, 17), 0, model.config.vocab_size)

    results["param_specs"], results["forward_max_diff"] = {}, {}
    reference = np.asarray(jax.jit(functools.partial(forward, graphdef))(state, ids[:, :16]))
    results["forward_magnitude"] = float(np.max(np.abs(reference)))
    for name, kwargs in {"8x1x1": dict(data=8), **LAYOUTS}.items():
        mesh = make_mesh(**kwargs)
        sharded = shard_state(state, mesh)
        results["param_specs"][name] = leaf_specs(sharded)
        batch = jax.device_put(ids[:, :16], batch_sharding(mesh))
        if name in LAYOUTS:
            logits = jax.jit(functools.partial(forward, graphdef))(sharded, batch)
            results["forward_max_diff"][name] = float(np.max(np.abs(np.asarray(logits) - reference)))
            results["batch_spec"] = spec_json(batch.sharding.spec)

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    make_model = functools.partial(tc.testing.tiny_llama, **SHAPES)
    abstract = nnx.state(nnx.eval_shape(make_model))
    created = jax.jit(lambda: nnx.state(make_model()), out_shardings=param_shardings(abstract, mesh))()
    results["created_sharded"] = dict(
        specs=leaf_specs(created),
        equal=all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(created), jax.tree.leaves(state))))

    odd = nnx.split(tc.testing.tiny_llama(**{**SHAPES, "vocab_size": 63}))[1]
    results["odd_vocab_specs"] = leaf_specs(shard_state(odd, make_mesh(data=2, fsdp=2, tensor=2)))

    ps = param_shardings(state, mesh)
    tx = optax.adamw(1e-3)
    results["adamw_specs"] = leaf_specs(shardings_like(tx.init(state), ps))
    placed = jax.jit(tx.init, out_shardings=shardings_like(jax.eval_shape(tx.init, state), ps))(
        jax.device_put(state, ps))
    results["adamw_placed_specs"] = leaf_specs(placed)
    optimizer_state = nnx.state(nnx.Optimizer(model, tx, wrt=nnx.Param))
    results["nnx_optimizer_specs"] = leaf_specs(shardings_like(optimizer_state, ps))

    losses, trained, _ = train(graphdef, jax.tree.map(jnp.copy, state), ids)
    results["losses"] = {"1": losses}
    # The largest |logit| of the training's inputs, at its first and its last parameters.
    results["train_logits_magnitude"] = max(float(np.max(np.abs(np.asarray(forward(graphdef, params, ids[:, :-1])))))
                                            for params in (state, trained))
    for name, kwargs in LAYOUTS.items():
        mesh = make_mesh(**kwargs)
        losses, params, opt_state = train(graphdef, state, ids, mesh)
        results["losses"][name] = losses
        expected = param_shardings(state, mesh)
        expected = (expected, shardings_like(opt_state, expected))
        results.setdefault("trained_state_keeps_sharding", {})[name] = all(
            a.sharding.is_equivalent_to(s, a.ndim)
            for a, s in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves(expected)))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()

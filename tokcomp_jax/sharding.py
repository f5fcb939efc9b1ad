"""Device meshes and logical-axis sharding rules, from one CPU to a TPU pod.

A mesh has three axes: "data" (pure data parallelism), "fsdp" (data parallelism whose parameters
and optimizer states are sharded too, ZeRO-3 style) and "tensor" (Megatron-style model
parallelism, innermost so that it maps to the fastest links). Arrays name their dimensions with
logical axes ("batch", "embed", "heads", ...); a table of rules maps those to mesh axes, as in
MaxText and Flax's `logical_axis_rules`.

A dimension whose size does not divide by the mesh axes its rule names keeps the longest prefix of
those axes that divides it, and is replicated if none does; a mesh axis already used by an earlier
dimension of the same array is skipped. So every rule applies to every model, and tiny test models
shard on any mesh.

>>> import jax, tokcomp_jax as tc
>>> from flax import nnx
>>> mesh = make_mesh(devices=jax.devices()[:1])
>>> _, state = nnx.split(tc.testing.tiny_llama())
>>> state = shard_state(state, mesh)
>>> state["layers"][0]["self_attn"]["q_proj"]["kernel"][...].sharding.spec
P('fsdp', 'tensor')
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, str | tuple[str, ...] | None]
AxesTable = Mapping[str, tuple[str | None, ...]]

DEFAULT_RULES: Rules = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "activation_embed": None,  # hidden states [B, T, E]: whole on each device that holds their rows
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
    "norm": None,
    "lora_rank": None,
}

# (input, output) logical axes of the Linear layers, by Hugging Face module name.
LINEAR_AXES: dict[str, tuple[str, str]] = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"),
}
NORMS = frozenset({"input_layernorm", "post_attention_layernorm", "norm", "q_norm", "k_norm"})


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (all of them, on every host, by default).

    One size may be -1: it takes the devices the others leave. The device order is
    topology-aware on TPUs (`jax.make_mesh`). Axes are of type `Auto`: jit propagates shardings.
    Within one TPU slice: across slices (multislice), build the mesh with
    `mesh_utils.create_hybrid_device_mesh`.

    >>> dict(make_mesh(devices=jax.devices()[:1]).shape)
    {'data': 1, 'fsdp': 1, 'tensor': 1}
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"{name} must be a positive number of devices, or -1 for those left, got {size!r}.")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got -1 for {' and '.join(fill)}; give the others sizes.")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    product = " * ".join(f"{name}={size}" for name, size in sizes.items() if size != -1)
    if fill:
        if len(devices) % fixed:
            raise ValueError(f"{fill[0]}=-1 takes the devices left by {product}, but {len(devices)} devices do not "
                             f"divide by {fixed}; pick sizes whose product divides {len(devices)}.")
        sizes[fill[0]] = len(devices) // fixed
    elif fixed != len(devices):
        raise ValueError(f"{product} = {fixed} devices, but there are {len(devices)}; make the product "
                         f"{len(devices)}, or set one of data, fsdp, tensor to -1.")
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """The PartitionSpec that `rules` give an array with these logical axes (None: replicated).

    With `shape`, each dimension keeps only the mesh axes it divides by (see the module docstring).
    """
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical_axes {tuple(logical_axes)} name {len(logical_axes)} dimensions but the array "
                         f"has shape {tuple(shape)}.")
    used, spec = set(), []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; add it to rules (known: {sorted(rules)}).")
        axes = _as_tuple(rules[name])
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ValueError(f"rule {name!r} -> {rules[name]!r} names mesh axis {axis!r}, but the mesh has "
                                 f"{mesh.axis_names}.")
        axes = tuple(axis for axis in axes if axis not in used)
        if shape is not None:
            while axes and shape[dim] % math.prod(mesh.shape[axis] for axis in axes):
                axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_to_sharding(logical_axes: Sequence[str | None], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                        shape: Sequence[int] | None = None) -> NamedSharding:
    """The NamedSharding of `logical_to_spec`.

    >>> mesh = make_mesh(devices=jax.devices()[:1])
    >>> logical_to_sharding(("batch", "length", "embed"), mesh).spec
    P(('data', 'fsdp'), None, None)
    """
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, rules, shape))


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """The sharding of `[B, S]` token batches: rows over ("data", "fsdp") by default.

    On several hosts, build the global batch from each host's rows with
    `jax.make_array_from_process_local_data(batch_sharding(mesh), local_rows)`.
    """
    return logical_to_sharding(("batch", "length"), mesh, rules)


def activation_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """The sharding of the `[B, T, E]` hidden states between decoder layers (`Llama`'s
    `activation_sharding`): rows over ("data", "fsdp") and each row whole, by default.

    >>> activation_sharding(make_mesh(devices=jax.devices()[:1])).spec
    P(('data', 'fsdp'), None, None)
    """
    return logical_to_sharding(("batch", "length", "activation_embed"), mesh, rules)


def _as_tuple(axes: str | Sequence[str] | None) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _key(entry) -> Any:
    for field in ("key", "idx", "name"):
        if hasattr(entry, field):
            return getattr(entry, field)
    raise TypeError(f"unexpected pytree path entry {entry!r}")


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _keys(path) -> tuple:
    return tuple(_key(entry) for entry in path)


def _map(fn, tree):
    """Maps fn(path, leaf) over the arrays and nnx Variables of a tree (a Variable keeps its type and
    metadata and gets fn's result as its value)."""
    def leaf(path, x):
        out = fn(_keys(path), x)
        return x.replace(out) if _is_variable(x) else out
    return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=_is_variable)


def _shape(x) -> tuple[int, ...]:
    return tuple((x.get_value() if _is_variable(x) else x).shape)


def param_axes(path: Sequence[Any], extra_axes: AxesTable | None = None) -> tuple[str | None, ...]:
    """The logical axes of the Llama parameter at `path` (its keys in the model's state).

    `extra_axes` maps a "/"-joined path suffix (e.g. "gist_tokens") to the axes of parameters the
    table doesn't know; it is looked up first.

    >>> param_axes(("layers", 0, "self_attn", "k_proj", "kernel"))
    ('embed', 'kv_heads')
    """
    names = tuple(str(key) for key in path)
    for suffix, axes in (extra_axes or {}).items():
        wanted = tuple(suffix.split("/"))
        if names[-len(wanted):] == wanted:
            return tuple(axes)
    module, name = names[-2:] if len(names) >= 2 else ("", names[-1])
    if (module, name) == ("embed_tokens", "embedding"):
        return ("vocab", "embed")
    if module in NORMS and name == "weight":
        return ("norm",)
    if module in LINEAR_AXES and name in ("kernel", "bias"):
        fan_in, fan_out = LINEAR_AXES[module]
        return (fan_in, fan_out) if name == "kernel" else (fan_out,)
    if module == "lora" and len(names) >= 3 and names[-3] in LINEAR_AXES and name in ("lora_a", "lora_b"):
        fan_in, fan_out = LINEAR_AXES[names[-3]]
        return (fan_in, "lora_rank") if name == "lora_a" else ("lora_rank", fan_out)
    raise ValueError(f"no logical axes for parameter {'/'.join(names)}; pass them in extra_axes, e.g. "
                     f"{{{'/'.join(names[-2:])!r}: ('embed',)}}.")


def _leaf_axes(path, x, extra_axes) -> tuple[str | None, ...]:
    if _is_variable(x) and not isinstance(x, nnx.Param):
        return (None,) * len(_shape(x))
    return param_axes(path, extra_axes)


def param_logical_axes(state, extra_axes: AxesTable | None = None):
    """The logical axes of every parameter of a model state (`nnx.split(model)[1]`), as a tree like
    it; variables that aren't `nnx.Param`s (RNG state) get None axes: replicated."""
    return _map(lambda path, x: _leaf_axes(path, x, extra_axes), state)


def param_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES, extra_axes: AxesTable | None = None):
    """The NamedShardings of a model state, as a tree like it.

    `state` may be abstract, `nnx.state(nnx.eval_shape(make_model))`: create a model too big for
    one device already sharded with `jax.jit(lambda: nnx.state(make_model()), out_shardings=...)`.
    """
    return _map(lambda path, x: logical_to_sharding(_leaf_axes(path, x, extra_axes), mesh, rules, _shape(x)),
                state)


def shard_state(state, mesh: Mesh, rules: Rules = DEFAULT_RULES, extra_axes: AxesTable | None = None):
    """`state` placed on `mesh` by `param_shardings` (on several hosts, each must hold all of it)."""
    return jax.device_put(state, param_shardings(state, mesh, rules, extra_axes))


def shardings_like(tree, param_sharding):
    """Shardings for a tree whose leaves mirror parameters, such as an optax optimizer state.

    A leaf whose path ends with a parameter's path (`mu/layers/0/.../kernel`) and whose rank
    matches gets the parameter's sharding if its shape divides the same way; every other leaf
    (`count`, factored statistics) is replicated. Works for `tx.init(params)`, its
    `jax.eval_shape`, and `nnx.state(nnx.Optimizer(...))`.
    """
    leaves = jax.tree_util.tree_flatten_with_path(param_sharding, is_leaf=_is_variable)[0]
    by_path = {_keys(path): s.get_value() if _is_variable(s) else s for path, s in leaves}
    if not by_path:
        raise ValueError("param_sharding holds no shardings; pass param_shardings(state, mesh).")
    mesh = next(iter(by_path.values())).mesh

    def fits(shape, spec) -> bool:
        return len(spec) == len(shape) and all(
            size % math.prod(mesh.shape[axis] for axis in _as_tuple(axes)) == 0 for size, axes in zip(shape, spec))

    def sharding(path, x):
        for start in range(len(path)):
            match = by_path.get(path[start:])
            if match is not None and fits(_shape(x), match.spec):
                return match
        return NamedSharding(mesh, PartitionSpec())
    return _map(sharding, tree)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Connects the processes of a multi-host run (`jax.distributed.initialize`); a no-op for one.

    Call it first, before any other JAX call, in every process; then `jax.devices()` lists the
    devices of all hosts and `make_mesh()` spans them.

    - TPU pod slice: run the same script on every host
      (`gcloud compute tpus tpu-vm ssh NAME --worker=all --command="python train.py"`) and call
      `initialize_distributed()` with no arguments: JAX finds the hosts itself.
    - GPU cluster under SLURM or Open MPI (`srun` / `mpirun`, one process per host or per GPU):
      no arguments either.
    - Elsewhere: `initialize_distributed("host0:1234", num_processes=N, process_id=i)` in process i.

    With no arguments and no cluster found, or with `num_processes=1`, or when already
    initialized, it does nothing.
    """
    if num_processes == 1 or jax.distributed.is_initialized():
        return
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except ValueError:
        if explicit:
            raise

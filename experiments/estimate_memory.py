"""Per-device memory and step time of a training config, estimated without weights or devices.

  python experiments/estimate_memory.py --config=configs/train_llama3_8b_gist_v5p.py --shape=llama3-8b
  python experiments/estimate_memory.py --config=configs/train_tiny.py --num_devices=8 --config.mesh.fsdp=8

The model is built abstractly (`nnx.eval_shape`) and sharded on an `AbstractMesh` of `--num_devices`
by `tokcomp_jax.sharding`'s rules, so the parameter, gradient and optimizer bytes are those the
trainer allocates. Activations are what `jax.grad` of the loss keeps for the backward pass, as
XLA's buffer assignment keeps them (tests/test_estimate_memory.py compares the two on CPU), for each
row a device holds: the trainer keeps the hidden states sharded by rows (over data * fsdp; heads, MLP
and vocabulary split over tensor). The "no remat" column keeps every layer's norms, projections and
MLP intermediates and the XLA attention path's [H, S, S] probabilities; the "remat" column is what
`config.remat` keeps instead: each layer's input, plus one layer's activations while it is
recomputed. The column `config.remat` picks is marked with a *; `--config.remat=True` picks the other.

The step time is the executed FLOPs (6 per matmul weight and token, the full S x S attention
scores and values, the forward again under remat) over `num_devices * peak * mfu`.
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx
from jax.sharding import AbstractMesh
from ml_collections import config_flags

from tokcomp_jax.models.config import TINY_CONFIG, ModelConfig
from tokcomp_jax.models.llama import Llama
from tokcomp_jax.sharding import MESH_AXES, param_shardings, shardings_like
from tokcomp_jax.training.config import names
from tokcomp_jax.training.loop import split_parameters
from tokcomp_jax.training.optim import make_optimizer
from tokcomp_jax.training.tasks import make_task

GIB = 2 ** 30
TASKS = ("lm", "gist")
# Models whose weights need not be on this machine, by the name --shape takes.
SHAPES = {
    "llama3-8b": ModelConfig(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                             rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
}
GIST_AXES = {"embeddings": (None, "embed")}  # the gist task's parameter, [num_tokens, hidden]


@dataclasses.dataclass(frozen=True)
class Rows:
    """What each row runs: `length` tokens through the model (logits for all of them), a loss over
    the last `loss_tokens`; `gist_mask`: an extra [S, S] attention mask per row."""

    length: int
    loss_tokens: int
    gist_mask: bool
    description: str


def resolve_mesh(mesh: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """`config.mesh`'s axis sizes on `num_devices` devices, its -1 filled in."""
    sizes = {axis: mesh[axis] for axis in MESH_AXES}
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1 or any(not isinstance(size, int) or (size < 1 and size != -1) for size in sizes.values()):
        raise ValueError(f"config.mesh {sizes}: give every axis a size >= 1, and -1 to one of them at most.")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill and num_devices % fixed == 0:
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"config.mesh {sizes} does not fill --num_devices={num_devices}; make the product of its "
                         f"sizes {num_devices}, or set one of them to -1.")
    return sizes


def model_config(config: ml_collections.ConfigDict, shape: str = "") -> ModelConfig:
    """The model's shapes: `SHAPES[shape]`, or those `config.model.name` names ("tiny" with its
    overrides, a known model, a .gguf file or a Hugging Face directory; no weights are read)."""
    if shape:
        if shape not in SHAPES:
            raise ValueError(f"--shape={shape!r} is unknown; use one of {sorted(SHAPES)}, or leave it empty to read "
                             f"config.model.name's config.")
        return SHAPES[shape]
    if config.model.name == "tiny":
        return dataclasses.replace(TINY_CONFIG, **config.model.overrides.to_dict())
    from tokcomp_jax.checkpoints import CheckpointError, hf, resolve_model_path
    from tokcomp_jax.checkpoints.gguf import GGUFFile

    try:
        path = resolve_model_path(config.model.name)
        return hf.read_config(path) if os.path.isdir(path) else GGUFFile(path).config
    except CheckpointError as e:
        raise ValueError(f"config.model.name: {e} Pass --shape (one of {sorted(SHAPES)}) to estimate without "
                         f"it.") from e


def rows_of(config: ml_collections.ConfigDict) -> Rows:
    """The rows `config.task` runs, from the config's fields (the task itself is not built)."""
    window = config.data.window
    if config.task == "lm":
        return Rows(window - 1, window - 1, False, f"{window - 1} tokens")
    if config.task == "gist":
        gist = config.get("gist")
        if gist is None or not all(isinstance(gist.get(f), int) and gist.get(f) >= 1
                                   for f in ("num_tokens", "context_tokens")):
            raise ValueError("config.task 'gist' reads config.gist.num_tokens and config.gist.context_tokens; set "
                             "both to integers >= 1.")
        k, n = gist.num_tokens, gist.context_tokens
        if window <= n:
            raise ValueError(f"config.data.window ({window}) must exceed config.gist.context_tokens ({n}).")
        return Rows(window + k, window - n, True,
                    f"{window + k} tokens ({n} context + {k} gists + {window - n} continuation)")
    raise ValueError(f"config.task {config.task!r} has no estimate; estimate_memory.py knows {', '.join(TASKS)}.")


def _per_device(tree, shardings) -> int:
    def nbytes(x, sharding):
        return math.prod(sharding.shard_shape(tuple(x.shape))) * jnp.dtype(x.dtype).itemsize
    return sum(jax.tree.leaves(jax.tree.map(nbytes, tree, shardings)))


def _as(tree, dtype):
    """Abstract `tree` with its floating-point leaves in `dtype`."""
    def leaf(x):
        return jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype)
    return jax.tree.map(leaf, tree)


def layer_matmul_params(c: ModelConfig) -> int:
    """Parameters of one decoder layer's projections."""
    return c.hidden_size * (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim + 3 * c.hidden_size * c.intermediate_size


def model_params(c: ModelConfig) -> int:
    """All parameters: embeddings, layers with their norms, final norm, LM head."""
    head = 0 if c.tie_word_embeddings else c.hidden_size * c.vocab_size
    norms = 2 * c.hidden_size + (2 * c.head_dim if c.qk_norm else 0)
    return c.vocab_size * c.hidden_size + c.num_layers * (layer_matmul_params(c) + norms) + c.hidden_size + head


def _gathered_bytes(c: ModelConfig, mesh: dict[str, int], compute) -> int:
    """FSDP's transients: the larger of two decoder layers (one in use, the next prefetched) and the
    LM head, gathered whole in the compute dtype, with a float32 gradient of it before the
    reduce-scatter; split over tensor."""
    if mesh["fsdp"] == 1:
        return 0
    b = jnp.dtype(compute).itemsize
    return max(layer_matmul_params(c) * (2 * b + 4), c.hidden_size * c.vocab_size * (b + 4)) // mesh["tensor"]


def state_bytes(config: ml_collections.ConfigDict, c: ModelConfig, mesh: dict[str, int]) -> dict[str, int]:
    """Per-device bytes of the trained parameters (float32), their gradients, the optimizer state, the
    frozen parameters and the weights in the compute dtype, sharded as the trainer shards them."""
    abstract = AbstractMesh(tuple(mesh.values()), tuple(mesh))
    compute = jnp.dtype(config.compute_dtype)
    base = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llama(c, dtype=jnp.float32, rngs=nnx.Rngs(0)))))
    base = _as(base, jnp.float32)
    task, no_decay, extra_axes = {}, (), None
    if config.task == "gist":
        task = {"embeddings": jax.ShapeDtypeStruct((config.gist.num_tokens, c.hidden_size), jnp.float32)}
        no_decay, extra_axes = ("embeddings",), GIST_AXES
    if config.trainable not in ("full", "lora", "none"):
        raise ValueError(f"config.trainable must be 'full', 'lora' or 'none', got {config.trainable!r}.")
    model, frozen = jax.eval_shape(  # the trainer's own split, on shapes
        lambda p: split_parameters(config, p, compute, keep_base=make_task(config).reads_base_model), base)
    trained = {"model": model, "task": task}
    trained_shardings = param_shardings(trained, abstract, extra_axes=extra_axes)
    frozen_shardings = param_shardings(frozen, abstract)
    tx, _ = make_optimizer(config.optim, config.steps, no_decay)
    opt_state = jax.eval_shape(tx.init, trained)
    params = _per_device(trained, trained_shardings)
    if config.trainable == "full":  # the loss's cast of the trained parameters (a float32 cast is free)
        weights = _per_device(_as(trained, compute), trained_shardings) if compute.itemsize != 4 else 0
    elif config.trainable == "lora":  # the merged copies of the adapted kernels
        targets = names(config.lora.targets)
        adapted = jax.tree_util.tree_map_with_path(
            lambda path, x: x if set(map(str, (getattr(k, "key", k) for k in path))) & set(targets) else None, frozen)
        weights = _per_device(adapted, param_shardings(adapted, abstract))
    else:
        weights = 0
    return {
        "trained": params,
        "gradients": (2 if config.grad_accum_steps > 1 else 1) * params,  # the sum and a micro-batch's
        "optimizer": _per_device(opt_state, shardings_like(opt_state, trained_shardings)),
        "frozen": _per_device(frozen, frozen_shardings),
        "weights": weights + _gathered_bytes(c, mesh, compute),
    }


def _split(size: int, tensor: int) -> int:
    return tensor if size % tensor == 0 else 1


def activation_bytes(c: ModelConfig, rows: Rows, compute_dtype, tensor: int = 1) -> dict[str, int]:
    """Bytes per row and device (heads, MLP and vocabulary split over `tensor`) of what the backward
    pass needs: `layers`, what all layers keep without remat (`attention`: their [H, S, S] part,
    `layer`: one layer's); `top`, what the final norm and the loss keep; `top_backward` and
    `layer_backward`, the largest transients of the loss's and of one layer's backward;
    `remat_layers`, what `config.remat` keeps instead (each layer's input)."""
    s, e, b = rows.length, c.hidden_size, jnp.dtype(compute_dtype).itemsize
    v = c.vocab_size // _split(c.vocab_size, tensor)
    cast = b if b != 4 else 0  # a float32 copy of a float32 array is no copy
    heads = c.num_heads // _split(c.num_kv_heads, tensor)
    kv_heads = c.num_kv_heads // _split(c.num_kv_heads, tensor)
    mlp = c.intermediate_size // _split(c.intermediate_size, tensor)
    norm = 4 * e + cast * e + b * e  # float32 input, normalised (cast back), scaled
    per_token = 2 * norm + b * (2 * heads + 2 * kv_heads) * c.head_dim + 3 * b * mlp  # q k v out; gate up product
    # Per [H, S, S] element: float32 exponentials and probabilities, the probabilities cast, the mask.
    attention = heads * s * s * (4 + 4 + cast + 1) + (s * s if rows.gist_mask else 0)
    layer = s * per_token + attention
    return {
        "layers": c.num_layers * layer,
        "attention": c.num_layers * attention,
        "layer": layer,
        "top": s * norm + 4 * rows.loss_tokens * v,  # final norm, float32 log-probabilities
        "top_backward": s * v * (4 + b) + 4 * rows.loss_tokens * v,  # the logits' gradient, float32 and cast
        "layer_backward": 2 * 4 * heads * s * s,  # gradients of the probabilities and of the scores
        "remat_layers": c.num_layers * s * b * e,
    }


def peak_activations(act: dict[str, int], remat: bool) -> int:
    """Peak bytes per row: what is kept, and the largest transient of the backward pass (under
    remat, one layer's activations recomputed)."""
    kept = act["top"] + (act["remat_layers"] + act["layer"] if remat else act["layers"])
    return kept + max(act["top_backward"], act["layer_backward"])


def step_flops(c: ModelConfig, rows: Rows, batch_size: int, remat: bool) -> float:
    """FLOPs of one update of `batch_size` rows: 2 per matmul weight and token forward, 4 backward;
    attention over all S x S (the XLA path computes masked scores too); remat runs each layer's
    forward twice."""
    tokens = batch_size * rows.length
    layer = 2 * layer_matmul_params(c) * tokens + 4 * c.num_heads * c.head_dim * rows.length ** 2 * batch_size
    head = 2 * c.hidden_size * c.vocab_size * tokens
    return c.num_layers * layer * (4 if remat else 3) + 3 * head


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What `estimate` found; `table()` prints it."""

    config: ml_collections.ConfigDict
    model: ModelConfig
    mesh: dict[str, int]
    rows: Rows
    rows_per_device: int
    state: dict[str, int]
    activations: dict[str, int]
    hbm_bytes: float
    peak_flops: float
    mfu: float

    def total(self, remat: bool, rows: int | None = None) -> int:
        """Bytes per device."""
        rows = self.rows_per_device if rows is None else rows
        return sum(self.state.values()) + rows * peak_activations(self.activations, remat)

    def max_rows(self, remat: bool) -> int:
        """The most rows per device whose total fits in HBM."""
        return max(int((self.hbm_bytes - self.total(remat, 0)) // peak_activations(self.activations, remat)), 0)

    def step_seconds(self, remat: bool) -> float:
        flops = step_flops(self.model, self.rows, self.config.batch_size, remat)
        return flops / (math.prod(self.mesh.values()) * self.peak_flops * self.mfu)

    def table(self) -> str:
        c, cfg, devices, state = self.model, self.config, math.prod(self.mesh.values()), self.state
        accum, per_device, act = cfg.grad_accum_steps, self.rows_per_device, self.activations
        dtype = cfg.compute_dtype

        def row(name, no_remat, remat):
            cell = (lambda x: f"{x / GIB:10.2f}") if isinstance(no_remat, (int, float)) else (lambda x: f"{x:>10}")
            return f"{name:46s}{cell(no_remat)}{cell(remat)}"

        def fits(x):
            return "yes" if x <= self.hbm_bytes else "NO"

        both = (self.total(False), self.total(True))
        chosen = ("", " *") if cfg.remat else (" *", "")
        lines = [
            (f"model: {model_params(c) / 1e9:.2f}B parameters: {c.num_layers} layers, hidden {c.hidden_size}, "
             f"{c.num_heads} heads ({c.num_kv_heads} KV) of {c.head_dim}, MLP {c.intermediate_size}, "
             f"vocab {c.vocab_size}"),
            f"training: task {cfg.task}, trainable {cfg.trainable}, compute {dtype}",
            f"mesh: {' x '.join(f'{a}={s}' for a, s in self.mesh.items())} = {devices} devices",
            (f"batch: {cfg.batch_size} rows of {self.rows.description}; {accum} micro-batch"
             f"{'es' if accum > 1 else ''} of {cfg.batch_size // accum} rows, {per_device} per device"),
            "",
            row("per device (GiB)", "no remat" + chosen[0], "remat" + chosen[1]),
            row("trained parameters (float32)", state["trained"], state["trained"]),
            row("gradients (float32" + (": sum + micro-batch)" if accum > 1 else ")"), state["gradients"],
                state["gradients"]),
            row("optimizer state (AdamW mu, nu)", state["optimizer"], state["optimizer"]),
            row(f"frozen parameters ({dtype})", state["frozen"], state["frozen"]),
            row(f"weights in {dtype} (shards, FSDP gathers)", state["weights"], state["weights"]),
            row(f"activations ({per_device} row{'s' if per_device > 1 else ''})",
                per_device * peak_activations(act, False), per_device * peak_activations(act, True)),
            row("  of which attention [H, S, S] kept", per_device * act["attention"],
                per_device * act["attention"] // c.num_layers),
            row("total", *both),
            row(f"fits in {self.hbm_bytes / GIB:g} GiB", *map(fits, both)),
            row("most rows per device that fit", str(self.max_rows(False)), str(self.max_rows(True))),
            f"* config.remat = {cfg.remat}: the column the trainer runs",
            "",
        ]
        tokens = cfg.batch_size * self.rows.length
        for remat in (False, True):
            flops, seconds = step_flops(c, self.rows, cfg.batch_size, remat), self.step_seconds(remat)
            lines.append(f"{'remat' if remat else 'no remat'}: {flops:.3g} FLOPs per step; at MFU {self.mfu:g} of "
                         f"{devices} x {self.peak_flops / 1e12:g} TFLOP/s: {seconds:.2f} s per step, "
                         f"{tokens / seconds:,.0f} tokens/s ({tokens / seconds / devices:,.0f} per device), "
                         f"{cfg.batch_size * self.rows.loss_tokens / seconds:,.0f} loss tokens/s")
        return "\n".join(lines)


def estimate(config: ml_collections.ConfigDict, num_devices: int, *, shape: str = "", hbm_gib: float = 95.0,
             peak_tflops: float = 459.0, mfu: float = 0.4) -> Estimate:
    """The estimate for `config` on `num_devices` devices of `hbm_gib` GiB and `peak_tflops` each."""
    mesh = resolve_mesh(config.mesh, num_devices)
    if config.batch_size % config.grad_accum_steps:
        raise ValueError(f"config.batch_size ({config.batch_size}) must divide by config.grad_accum_steps "
                         f"({config.grad_accum_steps}).")
    micro_batch, replicas = config.batch_size // config.grad_accum_steps, mesh["data"] * mesh["fsdp"]
    if micro_batch % replicas:
        raise ValueError(f"a micro-batch of {micro_batch} rows must divide by data * fsdp = {replicas} devices; "
                         f"change config.batch_size, config.grad_accum_steps or config.mesh.")
    c, rows = model_config(config, shape), rows_of(config)
    return Estimate(config, c, mesh, rows, micro_batch // replicas, state_bytes(config, c, mesh),
                    activation_bytes(c, rows, config.compute_dtype, mesh["tensor"]), hbm_gib * GIB,
                    peak_tflops * 1e12, mfu)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/train_*.py file.", lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 64, "Devices (chips) of the mesh: 64 on a v5p-128 slice.")
_SHAPE = flags.DEFINE_string("shape", "", f"Model shapes by name ({', '.join(SHAPES)}) instead of "
                             "config.model.name's config.json.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 95.0, "Memory per device in GiB (TPU v5p: 95).")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 459.0, "Peak bfloat16 TFLOP/s per device (TPU v5p: 459).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Assumed fraction of the peak FLOP/s that a step achieves.")


def main(argv):
    del argv
    try:
        result = estimate(_CONFIG.value, _NUM_DEVICES.value, shape=_SHAPE.value, hbm_gib=_HBM_GIB.value,
                          peak_tflops=_PEAK_TFLOPS.value, mfu=_MFU.value)
    except ValueError as e:
        raise SystemExit(f"estimate_memory.py: {e}") from e
    print(result.table())


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)

"""The fields of a training config, their defaults, and their checks.

Experiment files (`configs/train_*.py`) start from `base_config()` and change what they need;
`check_config` validates every field before a model is loaded or a step compiled, with errors that
name the field.
"""
from __future__ import annotations

import json
import numbers

import ml_collections

from tokcomp_jax.sharding import LINEAR_AXES
from tokcomp_jax.training.errors import ConfigError
from tokcomp_jax.training.tasks import make_task

TRAINABLE = ("full", "lora", "none")
COMPUTE_DTYPES = ("float32", "bfloat16")
TOKENIZERS = ("model", "bytes")


def base_config() -> ml_collections.ConfigDict:
    """The defaults of every training field (a tiny random model on byte-level essays)."""
    c = ml_collections.ConfigDict()
    c.seed = 0                        # model init (tiny), adapters, task parameters, data order
    c.task = "lm"                     # a name registered with `register_task`
    c.trainable = "full"              # "full": every model parameter; "lora": adapters only; "none": task's only
    c.compute_dtype = "float32"       # forward/backward dtype; trained parameters stay float32
    c.steps = 30                      # optimizer updates
    c.batch_size = 8                  # global rows per update, over all processes and micro-batches
    c.grad_accum_steps = 1            # micro-batches per update (batch_size must divide by it)
    c.remat = False                   # recompute each decoder layer's forward in the backward pass: less memory
    c.log_every = 1                   # updates between metrics lines
    c.eval_every = 0                  # updates between held-out evaluations (and after the last); 0: none
    c.eval_batches = 4                # held-out batches of batch_size rows per evaluation (the same each time)
    c.init_from = ""                  # a run's workdir: its newest checkpoint's trained parameters start this
                                      # run (with a new optimizer state and schedule); "": fresh parameters

    c.model = ml_collections.ConfigDict()
    c.model.name = "tiny"             # "tiny" (a random models.config.TINY_CONFIG) or a name/path for tc.load
    c.model.overrides = ml_collections.ConfigDict()  # TINY_CONFIG fields replaced, for "tiny"

    c.data = ml_collections.ConfigDict()
    c.data.corpus = "essays"          # "essays", "shakespeare" or "python"
    c.data.tokenizer = "model"        # "model": the loaded model's; "bytes": UTF-8 bytes (ByteTokenizer)
    c.data.window = 64                # tokens per row; the LM task predicts the last window - 1 of them
    c.data.held_out_every = 10        # every n-th document is held out of training
    c.data.shift_windows = False      # later epochs cut the training windows at a new offset each

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-4                 # peak learning rate
    c.optim.warmup_steps = 0          # linear warmup to the peak, then cosine decay to the last step
    c.optim.end_lr_ratio = 0.1        # the last step's learning rate, as a fraction of the peak
    c.optim.weight_decay = 0.01       # AdamW's, on matrices only (not norms, biases, new-token embeddings)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0           # global gradient-norm clipping; 0 turns it off

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 8
    c.lora.alpha = 16.0               # the update is A @ B * alpha / rank
    c.lora.targets = ("q_proj", "v_proj")

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                  # devices per mesh axis; one of them may be -1: the rest
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100          # updates between checkpoints (the last step is always saved)
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True
    return c


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """A run's saved config, with the defaults of fields added since it ran."""
    config = base_config()
    config.update(json.loads(text))
    return config


def names(value) -> tuple[str, ...]:
    """A tuple of names from a tuple field (`--config.lora.targets=q_proj,v_proj` gives one string)."""
    items = (value,) if isinstance(value, str) else tuple(value)
    return tuple(name.strip() for item in items for name in str(item).split(",") if name.strip())


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _require(ok: bool, field: str, value, must: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field} must be {must}, got {value!r}.")


def check_lora_fields(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` for a `config.lora` rank, alpha or targets that cannot work."""
    lora = config.lora
    check_count(lora.rank, "lora.rank")
    _require(_is_number(lora.alpha) and lora.alpha > 0, "lora.alpha", lora.alpha, "a number > 0")
    targets = names(lora.targets)
    _require(bool(targets) and set(targets) <= set(LINEAR_AXES), "lora.targets", lora.targets,
             f"projection names among {', '.join(LINEAR_AXES)}")


def check_count(value, field: str) -> None:
    """Raises `ConfigError` unless `config.<field>` is an integer >= 1."""
    _require(_is_int(value) and value >= 1, field, value, "an integer >= 1")


def check_fraction(value, field: str) -> None:
    """Raises `ConfigError` unless `config.<field>` is a number in [0, 1]."""
    _require(_is_number(value) and 0 <= value <= 1, field, value, "a number in [0, 1]")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError`, naming the field and what it takes, for a value that cannot work."""
    _require(config.trainable in TRAINABLE, "trainable", config.trainable, f"one of {TRAINABLE}")
    _require(config.compute_dtype in COMPUTE_DTYPES, "compute_dtype", config.compute_dtype,
             f"one of {COMPUTE_DTYPES}")
    _require(_is_int(config.seed) and config.seed >= 0, "seed", config.seed, "an integer >= 0")
    _require(isinstance(config.remat, bool), "remat", config.remat, "True or False")
    _require(isinstance(config.init_from, str), "init_from", config.init_from, "'' or an earlier run's workdir")
    for field in ("steps", "batch_size", "grad_accum_steps", "log_every", "eval_batches"):
        check_count(config[field], field)
    _require(_is_int(config.eval_every) and config.eval_every >= 0, "eval_every", config.eval_every,
             "an integer >= 0 (0: no held-out evaluation)")
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(f"config.batch_size ({config.batch_size}) must divide by config.grad_accum_steps "
                          f"({config.grad_accum_steps}): every micro-batch has batch_size / grad_accum_steps rows.")

    _require(isinstance(config.model.name, str) and config.model.name, "model.name", config.model.name,
             "'tiny' or a model name or path for tc.load")
    if config.model.name != "tiny" and config.model.overrides:
        raise ConfigError(f"config.model.overrides apply to config.model.name 'tiny' only, not to "
                          f"{config.model.name!r}; remove them.")
    _require(config.data.tokenizer in TOKENIZERS, "data.tokenizer", config.data.tokenizer, f"one of {TOKENIZERS}")
    if config.model.name == "tiny" and config.data.tokenizer == "model":
        raise ConfigError("config.data.tokenizer 'model' needs a pretrained model, and config.model.name 'tiny' "
                          "has no tokenizer; use 'bytes'.")
    _require(_is_int(config.data.window) and config.data.window >= 2, "data.window", config.data.window,
             "an integer >= 2")
    _require(_is_int(config.data.held_out_every) and config.data.held_out_every >= 2, "data.held_out_every",
             config.data.held_out_every, "an integer >= 2")

    o = config.optim
    _require(_is_number(o.lr) and o.lr > 0, "optim.lr", o.lr, "a number > 0")
    _require(_is_int(o.warmup_steps) and 0 <= o.warmup_steps < config.steps, "optim.warmup_steps",
             o.warmup_steps, f"an integer in [0, config.steps={config.steps})")
    check_fraction(o.end_lr_ratio, "optim.end_lr_ratio")
    _require(_is_number(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay,
             "a number >= 0")
    for field in ("b1", "b2"):
        _require(_is_number(o[field]) and 0 <= o[field] < 1, f"optim.{field}", o[field], "a number in [0, 1)")
    _require(_is_number(o.eps) and o.eps > 0, "optim.eps", o.eps, "a number > 0")
    _require(_is_number(o.clip_norm) and o.clip_norm >= 0, "optim.clip_norm", o.clip_norm,
             "a number >= 0 (0: no clipping)")

    if config.trainable == "lora":
        check_lora_fields(config)

    for axis in ("data", "fsdp", "tensor"):
        size = config.mesh[axis]
        _require(_is_int(size) and (size >= 1 or size == -1), f"mesh.{axis}", size,
                 "a number of devices >= 1, or -1 for the devices the other axes leave")
    for field in ("every", "max_to_keep"):
        value = config.checkpoint[field]
        check_count(value, f"checkpoint.{field}")
    make_task(config)  # unknown task names, and the task's own fields

"""LoRA adapters (Hu et al., 2021, arXiv:2106.09685) as pure functions of a parameter tree.

The adapters of a projection live beside its kernel's path, `.../q_proj/lora/lora_a` `[in, r]` and
`.../lora_b` `[r, out]`, in a tree of their own that only they train; `merge_lora` gives the
effective parameters W + A @ B * alpha / r, which the unchanged model runs with. B starts at zero,
so training starts from the base model exactly.

>>> import jax, jax.numpy as jnp
>>> params = {"layers": {0: {"self_attn": {"q_proj": {"kernel": jnp.ones((4, 6))}}}}}
>>> adapters = init_lora(params, ("q_proj",), rank=2, key=jax.random.key(0))
>>> adapters["layers"][0]["self_attn"]["q_proj"]["lora"]["lora_a"].shape
(4, 2)
>>> merged = merge_lora(params, adapters, scale=8.0)
>>> bool((merged["layers"][0]["self_attn"]["q_proj"]["kernel"] == 1).all())  # B = 0
True
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp


def init_lora(params: Mapping, targets: Sequence[str], rank: int, key: jax.Array) -> dict:
    """Adapters for the kernels of the projections named in `targets`, wherever they are in `params`
    (a pure dict, `nnx.to_pure_dict(nnx.state(model))`): A uniform in ±1/sqrt(in) as in PEFT, B zero.

    Raises if a target names no kernel of `params`.
    """
    found = set()

    def walk(tree: Mapping, path: tuple) -> dict:
        adapters = {}
        for name, sub in tree.items():
            if not isinstance(sub, Mapping):
                continue
            if name in targets and "kernel" in sub:
                fan_in, fan_out = sub["kernel"].shape
                leaf_key = jax.random.fold_in(key, zlib.crc32("/".join(map(str, path + (name,))).encode()) % 2**31)
                bound = 1 / fan_in ** 0.5
                adapters[name] = {"lora": {
                    "lora_a": jax.random.uniform(leaf_key, (fan_in, rank), jnp.float32, -bound, bound),
                    "lora_b": jnp.zeros((rank, fan_out), jnp.float32)}}
                found.add(name)
            elif (inner := walk(sub, path + (name,))):
                adapters[name] = inner
        return adapters

    adapters = walk(params, ())
    missing = [name for name in targets if name not in found]
    if missing:
        raise ValueError(f"LoRA targets {missing} name no projection kernel of the model "
                         f"(a model with tied embeddings has no lm_head).")
    return adapters


def merge_lora(params: Mapping, adapters: Mapping, scale: float) -> dict:
    """`params` with each adapted kernel replaced by W + A @ B * scale (scale = alpha / rank),
    computed in the adapters' dtype and cast back to the kernel's."""
    merged = dict(params)
    for name, sub in adapters.items():
        if name == "lora":
            kernel = params["kernel"]
            update = (sub["lora_a"] @ sub["lora_b"]) * scale
            merged["kernel"] = (kernel.astype(update.dtype) + update).astype(kernel.dtype)
        else:
            merged[name] = merge_lora(params[name], sub, scale)
    return merged

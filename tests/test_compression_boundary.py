"""The compression boundary (`tc.compression`): a decoder that is not Llama, written here against
the protocol alone, gets the presses, `tc.prefill` and chunked-prefill compression, and keeps the
entries a dense float64 oracle of the same decoder keeps."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tokcomp_jax as tc
from press_helpers import random_rows
from tokcomp_jax.attention import attention
from tokcomp_jax.compression import Observation, init_states

HEADS, KV_HEADS, HEAD_DIM, WIDTH, LAYERS = 4, 2, 8, 32, 2


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 64
    num_heads: int = HEADS


class Block(nnx.Module):
    def __init__(self, rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(WIDTH, rngs=rngs), nnx.LayerNorm(WIDTH, rngs=rngs)
        self.q = nnx.Linear(WIDTH, HEADS * HEAD_DIM, rngs=rngs)
        self.kv = nnx.Linear(WIDTH, 2 * KV_HEADS * HEAD_DIM, rngs=rngs)
        self.o = nnx.Linear(HEADS * HEAD_DIM, WIDTH, rngs=rngs)
        self.up, self.down = nnx.Linear(WIDTH, 4 * WIDTH, rngs=rngs), nnx.Linear(4 * WIDTH, WIDTH, rngs=rngs)


class TinyGPT(nnx.Module):
    """GPT-2-style: learned absolute positions, LayerNorm, GELU MLP, fused KV projection, no RoPE."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.config = Config()
        self.wte, self.wpe = nnx.Embed(64, WIDTH, rngs=rngs), nnx.Embed(128, WIDTH, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
        self.ln_f = nnx.LayerNorm(WIDTH, rngs=rngs)

    def init_cache(self, batch, capacity):
        return tc.KVCache.empty(LAYERS, batch, KV_HEADS, capacity, HEAD_DIM)

    def __call__(self, ids, cache, valid, *, all_logits=True, press=None, press_states=None, room=0, last_chunk=True):
        batch, steps = ids.shape
        positions = cache.num_seen[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
        states = init_states(press, cache) if press_states is None else press_states
        x = self.wte(ids) + self.wpe(jnp.maximum(positions, 0))
        layers, new_states = [], []
        for index, (block, layer) in enumerate(zip(self.blocks, cache.layers)):
            h = block.ln1(x)
            q = block.q(h).reshape(batch, steps, HEADS, HEAD_DIM)
            k, v = jnp.split(block.kv(h).reshape(batch, steps, 2 * KV_HEADS, HEAD_DIM).transpose(0, 2, 1, 3), 2, axis=1)
            layer = layer.append(k, v, positions, valid)
            out, stats = attention(q, layer, positions)
            if press is not None:
                obs = Observation(q, q, h, positions, valid, index, room, last_chunk, None, attention=stats)
                layer, state = press.compress(layer, obs, states[index])
                new_states.append(state)
            x = x + block.o(out.reshape(batch, steps, HEADS * HEAD_DIM))
            x = x + block.down(jax.nn.gelu(block.up(block.ln2(x))))
            layers.append(layer)
        x = self.ln_f(x if all_logits else x[:, -1])
        num_seen = cache.num_seen + jnp.sum(valid, axis=1, dtype=jnp.int32)
        return self.wte.attend(x), tc.KVCache(tuple(layers), num_seen), tuple(new_states) if press is not None else None


def _params(module):
    return jax.tree.map(lambda p: np.asarray(p, np.float64), nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def _layer_norm(x, p):
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    return x * p["scale"] + p["bias"]


def _linear(x, p):
    return x @ p["kernel"] + p["bias"]


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def oracle(model, row, chunk, keep):
    """The decoder in float64 on one row, in the chunks `tc.prefill` cuts (rows end-aligned to a
    padded width); after each chunk `keep(layer_index, keys, queries, positions, last_chunk)` -> per
    KV head the indices of the entries to keep. Returns the positions each layer and KV head keeps."""
    p = _params(model)
    cached = [([np.zeros((0, HEAD_DIM))] * KV_HEADS, [np.zeros((0, HEAD_DIM))] * KV_HEADS,
               [np.zeros(0, int)] * KV_HEADS) for _ in range(LAYERS)]
    width = tc.batching.padded_length(len(row), chunk)
    chunk = min(chunk, width)
    for start in range(len(row) - width, len(row), chunk):
        if start + chunk <= 0:
            continue  # a chunk of padding only
        pos = np.arange(max(start, 0), start + chunk)
        ids = np.asarray(row)[pos]
        x = p["wte"]["embedding"][ids] + p["wpe"]["embedding"][pos]
        for index, b in enumerate(p["blocks"][i] for i in range(LAYERS)):
            h = _layer_norm(x, b["ln1"])
            q = _linear(h, b["q"]).reshape(len(ids), HEADS, HEAD_DIM)
            kv = _linear(h, b["kv"]).reshape(len(ids), 2 * KV_HEADS, HEAD_DIM)
            keys, values, kept_pos = cached[index]
            keys = [np.concatenate([keys[g], kv[:, g]]) for g in range(KV_HEADS)]
            values = [np.concatenate([values[g], kv[:, KV_HEADS + g]]) for g in range(KV_HEADS)]
            kept_pos = [np.concatenate([kept_pos[g], pos]) for g in range(KV_HEADS)]
            out = np.zeros((len(ids), HEADS, HEAD_DIM))
            for head in range(HEADS):
                g = head // (HEADS // KV_HEADS)
                logits = q[:, head] @ keys[g].T / np.sqrt(HEAD_DIM)
                logits[kept_pos[g][None] > pos[:, None]] = -np.inf
                w = np.exp(logits - logits.max(-1, keepdims=True))
                out[:, head] = (w / w.sum(-1, keepdims=True)) @ values[g]
            last = start + chunk >= len(row)
            chosen = keep(index, keys, q, kept_pos, last)
            cached[index] = tuple([a[g][chosen[g]] for g in range(KV_HEADS)] for a in (keys, values, kept_pos))
            x = x + _linear(out.reshape(len(ids), -1), b["o"])
            x = x + _linear(_gelu(_linear(_layer_norm(x, b["ln2"]), b["up"])), b["down"])
    return [[sorted(layer[2][g].tolist()) for g in range(KV_HEADS)] for layer in cached]


def knorm_scores(keys, *_):
    return [-np.linalg.norm(k, axis=-1) for k in keys]


def snapkv_scores(keys, q, kept_pos, window=8):
    """SnapKV: window attention averaged over the window and the group, avg-pooled over 5 keys, the
    window itself kept first."""
    n = len(kept_pos[0])
    scores = []
    for g in range(KV_HEADS):
        total = np.zeros(n)
        for head in range(g * HEADS // KV_HEADS, (g + 1) * HEADS // KV_HEADS):
            logits = q[-window:, head] @ keys[g].T / np.sqrt(HEAD_DIM)
            logits[kept_pos[g][None] > kept_pos[g][-window:, None]] = -np.inf
            w = np.exp(logits - logits.max(-1, keepdims=True))
            total += (w / w.sum(-1, keepdims=True)).mean(0) / (HEADS // KV_HEADS)
        outside = np.where(np.arange(n) < n - window, total, 0.0)
        pooled = np.convolve(np.pad(outside, 2), np.ones(5) / 5, mode="valid")
        scores.append(np.where(np.arange(n) < n - window, pooled, 2.0 + np.arange(n) / n))
    return scores


def top(scores, count):
    return [np.sort(np.argsort(-s, kind="stable")[:count]) for s in scores]


def at_the_end(score, ratio):
    def keep(index, keys, q, kept_pos, last):
        if not last:
            return [np.arange(len(p)) for p in kept_pos]
        return top(score(keys, q, kept_pos), max(1, int(len(kept_pos[0]) * (1 - ratio))))
    return keep


def adakv_at_the_end(score, ratio, alpha=0.2):
    """AdaKV: each head's best `safe` entries, then the layer's budget to the best over all heads."""
    def keep(index, keys, q, kept_pos, last):
        n = len(kept_pos[0])
        if not last:
            return [np.arange(n) for _ in kept_pos]
        n_kept = max(1, int(n * (1 - ratio)))
        scores = np.stack(score(keys, q, kept_pos))
        forced = np.zeros_like(scores, bool)
        for g in range(KV_HEADS):
            forced[g, np.argsort(-scores[g])[:max(1, int(n_kept * alpha))]] = True
        flat = np.where(forced, np.inf, scores).ravel()
        chosen = np.zeros(flat.shape, bool)
        chosen[np.argsort(-flat, kind="stable")[:KV_HEADS * n_kept]] = True
        return [np.flatnonzero(c) for c in chosen.reshape(scores.shape)]
    return keep


def kept(cache, row=0):
    return [[sorted(np.asarray(layer.head_positions()[row, g])[np.asarray(layer.valid_mask()[row, g])].tolist())
             for g in range(KV_HEADS)] for layer in cache.layers]


@pytest.fixture(scope="module")
def gpt():
    return TinyGPT(seed=1)


@pytest.mark.parametrize("name, press, keep", [
    ("knorm", tc.presses.knorm(0.5), at_the_end(knorm_scores, 0.5)),
    ("snapkv", tc.presses.snapkv(0.6, window_size=8), at_the_end(snapkv_scores, 0.6)),
    ("adakv", tc.presses.adakv(tc.presses.knorm(0.5)), adakv_at_the_end(knorm_scores, 0.5)),
])
def test_a_second_decoder_keeps_what_the_dense_oracle_keeps(gpt, name, press, keep):
    rows = random_rows([37, 24], seed=2)
    _, cache = tc.prefill(gpt, rows, press=press, chunk_size=16)
    for row_index, row in enumerate(rows):
        assert kept(cache, row_index) == oracle(gpt, row, 16, keep), (name, row_index)


def test_a_second_decoder_compresses_while_its_cache_fills(gpt):
    """chunkwise: after every chunk each head keeps its 10 lowest key norms; the cache holds the
    budget plus one chunk, and later chunks attend to what was kept."""
    rows = random_rows([45], seed=3)
    press = tc.presses.chunkwise(tc.presses.knorm(tokens=10))
    _, cache = tc.prefill(gpt, rows, press=press, chunk_size=8)
    assert cache.capacities == (10, 10)
    compress_all = lambda index, keys, q, kept_pos, last: top(knorm_scores(keys), 10)  # noqa: E731
    assert kept(cache) == oracle(gpt, rows[0], 8, compress_all)
    assert kept(cache) != oracle(gpt, rows[0], 64, compress_all)  # one chunk: compression reached later ones


def test_a_second_decoder_generates_with_a_press(gpt):
    rows = random_rows([20, 13], seed=4)
    result = tc.generate_ids(gpt, rows, max_new_tokens=4, press=tc.presses.snapkv(0.5, window_size=4), chunk_size=8)
    assert [len(t) for t in result.tokens] == [4, 4]
    # SnapKV keeps half of each prompt, then each of the 4 new tokens is appended.
    assert result.cache.lengths[0].tolist() == [[10 + 4] * KV_HEADS, [6 + 4] * KV_HEADS]

"""No S x S attention matrix for a 4k context in any press (DESIGN: "Never materialize S x S").

Every program is only traced (`jax.make_jaxpr`), never run: each intermediate value of the jaxpr,
sub-jaxprs (jit, scan, cond, while, custom_jvp/vjp, ...) included, must have at most one axis of
4096 or more. The chunk-by-cache values of a 512-token chunk (`[.., 512, 4096]`) are fine.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tokcomp_jax as tc
import tokcomp_jax.generation as generation
from tokcomp_jax.presses import Budget

CONTEXT, CHUNK = 4096, 512
LONG = CONTEXT  # an axis this long or longer is an S axis


def _presses():
    presses = {name: factory(0.5) for name, factory in tc.presses.PRESSES.items()}
    presses["pyramidkv"] = tc.presses.pyramidkv(0.5, num_layers=2)
    presses["lacache"] = tc.presses.lacache(0.5, num_layers=2, span=1)
    filters = np.random.default_rng(0).normal(size=(2, 2, 8)).astype(np.float32)
    presses["qfilter"] = tc.presses.qfilter(0.5, filters=filters)
    presses["chunkwise_snapkv"] = tc.presses.chunkwise(tc.presses.snapkv(tokens=1024))
    return presses


PRESSES = _presses()


def _jaxprs_in(value):
    """The jaxprs held by an equation parameter (a Jaxpr, a ClosedJaxpr, or tuples/lists of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _jaxprs_in(item)


def long_by_long_values(closed_jaxpr, limit: int = LONG) -> list[tuple[str, tuple[int, ...]]]:
    """(where, shape) of every value in the jaxpr, sub-jaxprs included, with two or more axes of at
    least `limit`."""
    found, seen = [], set()

    def check(var, where):
        shape = tuple(getattr(getattr(var, "aval", None), "shape", ()))
        if sum(int(d) >= limit for d in shape) >= 2:
            found.append((where, shape))

    def walk(jaxpr, path):
        if id(jaxpr) in seen:
            return
        seen.add(id(jaxpr))
        for var in list(jaxpr.invars) + list(jaxpr.constvars):
            check(var, "/".join(path + ("input",)))
        for eqn in jaxpr.eqns:
            where = path + (eqn.primitive.name,)
            for var in eqn.outvars:
                check(var, "/".join(where))
            for value in eqn.params.values():
                for sub in _jaxprs_in(value):
                    walk(sub, where)

    walk(closed_jaxpr.jaxpr, ())
    return found


def all_shapes(closed_jaxpr) -> set[tuple[int, ...]]:
    shapes = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for value in eqn.params.values():
                for sub in _jaxprs_in(value):
                    walk(sub)

    walk(closed_jaxpr.jaxpr)
    return shapes


# The checker --------------------------------------------------------------------------------------

def _dense_attention(q, k, v):
    return jax.nn.softmax(q @ k.T / np.sqrt(q.shape[-1]), axis=-1) @ v


def test_the_checker_flags_dense_attention_over_4096_queries():
    x = jax.ShapeDtypeStruct((CONTEXT, 8), jnp.float32)
    found = long_by_long_values(jax.make_jaxpr(_dense_attention)(x, x, x))
    assert (CONTEXT, CONTEXT) in [shape for _, shape in found]


@jax.custom_jvp
def _custom_scores(x):
    return x @ x.T


@_custom_scores.defjvp
def _custom_scores_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return x @ x.T, t @ x.T + x @ t.T


@pytest.mark.parametrize("wrap", ["jit", "scan", "cond", "while", "custom_jvp", "vmap"])
def test_the_checker_finds_a_4096_square_inside_sub_jaxprs(wrap):
    def square(x):
        return jnp.sum(jax.nn.softmax(x @ x.T, axis=-1))

    wrapped = {
        "jit": lambda x: jax.jit(square)(x),
        "scan": lambda x: jax.lax.scan(lambda c, _: (c + square(x), None), 0.0, None, length=2)[0],
        "cond": lambda x: jax.lax.cond(x[0, 0] > 0, square, lambda x: 0.0, x),
        "while": lambda x: jax.lax.fori_loop(0, 2, lambda i, c: c + square(x), 0.0),
        "custom_jvp": lambda x: jnp.sum(jax.jit(_custom_scores)(x)),
        "vmap": lambda x: jax.vmap(lambda row: jnp.sum(x @ (row[:, None] * x.T)))(x[:2]),
    }[wrap]
    found = long_by_long_values(jax.make_jaxpr(wrapped)(jax.ShapeDtypeStruct((CONTEXT, 8), jnp.float32)))
    assert found, f"the {wrap} S x S value was missed"


def test_the_checker_accepts_chunk_by_cache_attention():
    q = jax.ShapeDtypeStruct((CHUNK, 8), jnp.float32)
    kv = jax.ShapeDtypeStruct((CONTEXT, 8), jnp.float32)
    closed = jax.make_jaxpr(_dense_attention)(q, kv, kv)
    assert (CHUNK, CONTEXT) in all_shapes(closed)
    assert long_by_long_values(closed) == []


# The presses ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    model = tc.testing.tiny_llama()
    graphdef, state = nnx.split(model)
    return model, graphdef, state


def trace_last_chunk(tiny, press, batch=2):
    """The jaxpr of the tiny model's forward over the last 512-token chunk of a 4096-token prompt,
    appended to a 4096-slot cache and compressed by `press`; and the shapes of (the input cache, the
    output cache)."""
    model, graphdef, state = tiny
    cache = jax.eval_shape(lambda: model.init_cache(batch, CONTEXT))
    ids = jax.ShapeDtypeStruct((batch, CHUNK), jnp.int32)
    valid = jax.ShapeDtypeStruct((batch, CHUNK), jnp.bool_)

    def last_chunk(state, ids, cache, valid):
        return nnx.merge(graphdef, state)(ids, cache, valid, all_logits=False, press=press, press_states=None,
                                          room=0, last_chunk=True)

    closed, (_, out_cache, _) = jax.make_jaxpr(last_chunk, return_shape=True)(state, ids, cache, valid)
    return closed, cache, out_cache


def test_the_checker_flags_a_press_that_scores_with_key_by_key_attention(tiny):
    """Control: a scorer that builds the `[C, C]` key-key attention of the cache is caught."""
    def score(layer, obs, state):
        keys = layer.keys.astype(jnp.float32)
        return jnp.sum(jax.nn.softmax(jnp.einsum("bhcd,bhkd->bhck", keys, keys), axis=-1), axis=-2)

    closed, _, _ = trace_last_chunk(tiny, tc.presses.scorer_press(score, Budget(0.5)))
    assert (2, 2, CONTEXT, CONTEXT) in [shape for _, shape in long_by_long_values(closed)]


@pytest.mark.parametrize("name", list(PRESSES))
def test_compressing_a_4096_token_prompt_builds_no_s_by_s_value(tiny, name):
    """The last 512-token chunk of a 4096-token prompt, appended to a 4096-slot cache and compressed."""
    closed, cache, out_cache = trace_last_chunk(tiny, PRESSES[name])
    assert long_by_long_values(closed) == []
    # A [T, C] value only where the scorer reads the chunk's attention weights (H2O, A2SF): the
    # attention itself goes block by block.
    chunk_by_context = any(CHUNK in shape and CONTEXT in shape for shape in all_shapes(closed))
    assert chunk_by_context == (name in ("observed_attention", "a2sf"))
    assert all(layer.keys.size < cache.layers[0].keys.size for layer in out_cache.layers)  # it compressed


@pytest.mark.parametrize("name", list(PRESSES))
def test_a_whole_prefill_of_4096_tokens_in_chunks_of_512_builds_no_s_by_s_value(tiny, name, monkeypatch):
    """`tc.prefill` itself, with every chunk's jitted forward replaced by its trace: 8 chunks of 512
    tokens (the states carried from chunk to chunk as shapes), the last one compressing."""
    model, _, _ = tiny
    press = PRESSES[name]
    traces = []

    def trace_instead(graphdef, state, ids, cache, valid, all_logits, press=None, press_states=None, room=0,
                      last_chunk=True, inputs_embeds=None):
        closed, shapes = jax.make_jaxpr(generation._forward, static_argnums=(0, 5, 6, 8, 9), return_shape=True)(
            graphdef, state, ids, cache, valid, all_logits, press, press_states, room, last_chunk, inputs_embeds)
        traces.append((last_chunk, closed))
        return shapes

    monkeypatch.setattr(generation, "_forward_jit", trace_instead)
    monkeypatch.setattr(generation, "_forward_jit_donating", trace_instead)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, CONTEXT))
    _, cache = tc.prefill(model, ids, lengths=[CONTEXT, CONTEXT - 700], chunk_size=CHUNK, press=press)
    assert [last for last, _ in traces] == [False] * 7 + [True]
    for index, (_, closed) in enumerate(traces):
        assert long_by_long_values(closed) == [], f"chunk {index}"
    if press.bounded is None and name != "pyramidkv":
        budget = Budget(0.5).kept_count(CONTEXT)
        assert {layer.positions.shape[-1] for layer in cache.layers} <= {budget, 2 * budget}  # ragged: 2 KV heads

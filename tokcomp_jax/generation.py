"""Prefill and decode over an explicit KV cache, and batched, jitted text generation."""
from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokcomp_jax.batching import DEFAULT_CHUNK_SIZE, check_token_ids, pad_batch, padded_length, quantized
from tokcomp_jax.cache import KVCache
from tokcomp_jax.checkpoints.tokenizer import Tokenizer
from tokcomp_jax.compression import CompressibleModel, LayerCompressor, LearnedSuffix
from tokcomp_jax.presses.online import every_n_steps
from tokcomp_jax.sampling import SamplingConfig, sample

Compressor = LayerCompressor | LearnedSuffix  # what prefill and generation take as `press`

def _forward(graphdef, state, ids, cache, valid, all_logits, press=None, press_states=None, room=0,
             last_chunk=True, inputs_embeds=None):
    model = nnx.merge(graphdef, state)
    embeds = {} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}  # only models that take learned tokens
    return model(ids, cache, valid, all_logits=all_logits, press=press, press_states=press_states, room=room,
                 last_chunk=last_chunk, **embeds)


_STATIC = ("graphdef", "all_logits", "press", "room", "last_chunk")
_forward_jit = jax.jit(_forward, static_argnames=_STATIC)
# Same computation, writing the new cache into the old one's buffers (for caches we own).
_forward_jit_donating = jax.jit(_forward, static_argnames=_STATIC, donate_argnames=("cache",))


class NonFiniteError(FloatingPointError):
    """A NaN or inf in a cache or the logits, found by `check_finite=True`."""


def raise_if_nonfinite(cache: KVCache, logits, where: str) -> None:
    """Raises `NonFiniteError` naming the first layer whose cache entries hold a NaN or inf, and
    the rows, or the rows of `logits` (None: not checked) that hold one."""
    bad = cache.nonfinite()  # [L, B]
    if bad.any():
        layer = int(np.argmax(bad.any(axis=1)))
        raise NonFiniteError(f"{where}: layer {layer} is the first whose keys or values hold a NaN or inf "
                             f"(rows {np.flatnonzero(bad[layer]).tolist()}); the layers before it, or the "
                             f"input, produced it.")
    if logits is not None:
        rows = np.flatnonzero(~np.isfinite(np.asarray(logits)).reshape(len(bad[0]), -1).all(axis=1))
        if rows.size:
            raise NonFiniteError(f"{where}: the logits of rows {rows.tolist()} hold a NaN or inf, while every "
                                 f"layer's keys and values are finite: the last layer or the output head "
                                 f"overflowed.")


def context_length(model: CompressibleModel) -> int | None:
    """The most positions `model` reads (`config.max_position_embeddings`; None: not bounded)."""
    return getattr(model.config, "max_position_embeddings", None)


def check_context(model: CompressibleModel, positions: int, what: str, fix: str) -> None:
    """Raises `ValueError` if `what` needs more than the model's context of positions."""
    limit = context_length(model)
    if limit is not None and positions > limit:
        raise ValueError(f"{what} needs {positions} positions but the model's context is {limit} "
                         f"(config.max_position_embeddings); {fix}.")


def prefill(model: CompressibleModel, ids, *, lengths=None, cache: KVCache | None = None,
            capacity: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE, all_logits: bool = False,
            press: Compressor | None = None, slot_quantum: int = 1, check_finite: bool = False):
    """Runs the model over prompts in chunks of `chunk_size` tokens and returns (logits, cache).

    `ids` are token ids: one list, a list of lists of different lengths, or an `[B, S]` array with
    optional `lengths` (right padding). Tokens are appended to `cache` (a new one of `capacity`
    slots, default S, when none is given). Logits are `[B, V]` at each row's last token, or
    `[B, S, V]` with `all_logits=True`. A `press` (any `tc.compression.LayerCompressor`)
    compresses each layer's cache as soon as the layer has seen the whole prompt, keeping the free
    slots that `capacity` asked for; a `LearnedSuffix` (e.g. gist tokens) first runs its learned
    tokens after the prompt. `slot_quantum` rounds the new cache's slots for the prompt and the
    free slots up to its multiples, so that the shapes a press compiles for (before and after
    compression) are shared by prompts of nearby lengths, at the price of up to that many unused
    slots of each kind (the evaluation uses `tc.batching.CAPACITY_QUANTUM`). `check_finite=True`
    raises `NonFiniteError` naming the first layer whose entries hold a NaN or inf (in `cache` as
    given, or after the prompt), at the price of a pass over the cache.

    >>> import tokcomp_jax as tc
    >>> model = tc.testing.tiny_llama()
    >>> logits, cache = tc.prefill(model, [[1, 2, 3], [4, 5]])
    >>> logits.shape, cache.lengths[0].tolist()
    ((2, 64), [[3, 3], [2, 2]])
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
    if isinstance(slot_quantum, bool) or not isinstance(slot_quantum, int) or slot_quantum < 1:
        raise ValueError(f"slot_quantum must be a whole number of slots >= 1 (1: no rounding), got {slot_quantum!r}.")
    ids, lengths = pad_batch(ids, lengths)
    batch, steps = ids.shape
    check_token_ids(ids, model.config.vocab_size)
    suffix = press.embeddings if isinstance(press, LearnedSuffix) else None  # learned tokens (gists)
    press = press.press if isinstance(press, LearnedSuffix) else press
    added = 0 if suffix is None else suffix.shape[0]
    if suffix is not None and all_logits:
        raise ValueError("all_logits is not available with a press that appends learned tokens (gists); "
                         "prefill the prompt without it for every position's logits.")
    longest = int(lengths.max())
    seen = 0 if cache is None else int(np.max(cache.num_seen))
    check_context(model, seen + longest + added, f"the prompt ({longest} tokens"
                  + (f" after the cache's {seen}" if seen else "") + (f", {added} learned" if added else "") + ")",
                  "shorten it (tc.generate takes truncate_left=True)")
    # Rows are aligned to the end, so that every row's last tokens are in the last chunk.
    width = padded_length(steps, chunk_size)
    chunk = min(chunk_size, width)
    if cache is None:
        capacity = longest if capacity is None else capacity
        if longest > capacity:
            raise ValueError(f"the prompt has {longest} tokens but capacity is {capacity}; raise capacity.")
        room = capacity - longest
        if press is not None and slot_quantum > 1:  # the shapes that compression sees, bucketed
            room, capacity = quantized(room, slot_quantum), quantized(longest, slot_quantum)
            capacity += room
        capacity += added
        longest += added
        bounded = getattr(press, "bounded", None)  # compressed after every chunk to this many entries
        if bounded is not None:
            capacity = min(capacity, bounded + max(chunk, room))
        cache = model.init_cache(batch, capacity)
        owned = True
    else:
        if capacity is not None:
            raise ValueError("pass either cache or capacity, not both.")
        if cache.batch_size != batch:
            raise ValueError(f"cache holds {cache.batch_size} rows but ids has {batch}.")
        if check_finite:
            raise_if_nonfinite(cache, None, "the cache passed to prefill")
        longest += added
        room = int(cache.free_slots().min()) - longest
        if room < 0:
            cache.check_room(longest)  # raises, naming the layer
        owned = False
    room = room if press is not None else 0
    starts = width - lengths
    aligned = np.zeros((batch, width), np.int32)
    for row in range(batch):
        aligned[row, starts[row]:] = ids[row, :lengths[row]]
    valid = np.arange(width) >= starts[:, None]
    chunks = [(aligned[:, start:start + chunk], valid[:, start:start + chunk], None)
              for start in range(0, width, chunk)]
    if suffix is not None:
        embeds = jnp.broadcast_to(suffix, (batch, *suffix.shape))
        chunks.append((np.zeros((batch, added), np.int32), np.ones((batch, added), bool), embeds))
    graphdef, state = nnx.split(model)
    pieces, press_states = [], None
    for index, (chunk_ids, chunk_valid, embeds) in enumerate(chunks):
        # Only a press tells the last chunk apart (without one, every chunk runs one program).
        last_chunk = press is None or index == len(chunks) - 1
        compresses = press is not None and last_chunk  # a smaller cache comes out: nothing to reuse
        forward = _forward_jit_donating if owned and not compresses else _forward_jit
        logits, cache, press_states = forward(graphdef, state, chunk_ids, cache, chunk_valid, all_logits, press,
                                              press_states, room, last_chunk, embeds)
        owned = True
        if all_logits:
            pieces.append(logits)
    if all_logits:
        every = jnp.concatenate(pieces, axis=1)  # [B, width, V], rows end-aligned
        index = np.minimum(starts[:, None] + np.arange(steps), width - 1)
        logits = jnp.take_along_axis(every, jnp.asarray(index)[:, :, None], axis=1)
    if check_finite:
        raise_if_nonfinite(cache, logits, "after prefill")
    return logits, cache


def decode(model: CompressibleModel, tokens, cache: KVCache, *, check_finite: bool = False):
    """Appends one token per row (`tokens` `[B]`) and returns (`[B, V]` logits, cache);
    `check_finite` as `prefill`'s."""
    tokens = np.asarray(tokens)
    if tokens.shape != (cache.batch_size,) or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be one integer token id per row of the cache, shaped [{cache.batch_size}]; "
                         f"got shape {tokens.shape} and dtype {tokens.dtype}.")
    check_token_ids(tokens, model.config.vocab_size)
    check_context(model, int(np.max(cache.num_seen)) + 1, "one more token", "the cache has reached it")
    cache.check_room(1)
    tokens = jnp.asarray(tokens, jnp.int32).reshape(-1, 1)
    graphdef, state = nnx.split(model)
    logits, cache, _ = _forward_jit(graphdef, state, tokens, cache, jnp.ones(tokens.shape, bool), False)
    if check_finite:
        raise_if_nonfinite(cache, logits, "after decode")
    return logits, cache


def _sample_and_decode_step(graphdef, state, logits, cache, key, done, stop_ids, sampling, press=None):
    """Samples each row's next token, marks rows that stopped, and feeds the token back (through
    `press`, if given, which compresses each layer)."""
    key, subkey = jax.random.split(key)
    token = sample(logits, subkey, sampling)
    done = done | jnp.isin(token, stop_ids)
    model = nnx.merge(graphdef, state)
    logits, cache, _ = model(token[:, None], cache, jnp.ones((token.shape[0], 1), bool), all_logits=False,
                             press=press)
    return token, done, logits, cache, key


_DECODE_STATIC = ("graphdef", "sampling", "press")
_sample_and_decode = jax.jit(_sample_and_decode_step, static_argnames=_DECODE_STATIC, donate_argnames=("cache",))
# A compressing step returns a smaller cache: nothing to donate.
_sample_decode_and_compress = jax.jit(_sample_and_decode_step, static_argnames=_DECODE_STATIC)


@dataclasses.dataclass
class Generation:
    """Generated token ids per row (stop token excluded), the final cache and timings."""

    tokens: list[list[int]]
    cache: KVCache
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        generated = sum(len(t) for t in self.tokens)
        return generated / self.decode_seconds if self.decode_seconds else float("nan")


def generate_ids(model: CompressibleModel, ids, *, max_new_tokens: int = 32,
                 sampling: SamplingConfig = SamplingConfig(), stop_ids: Sequence[int] = (), seed: int = 0,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, pad_id: int = 0,
                 on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None, press: Compressor | None = None,
                 cache: KVCache | None = None, decoding_press: LayerCompressor | None = None,
                 compress_every: int = 512, truncate_left: bool = False, check_finite: bool = False) -> Generation:
    """Batched generation from token ids; rows may have different lengths. A `press` compresses
    the prompt's cache after prefill, leaving room for `max_new_tokens`. With `cache`, the prompts
    continue it (e.g. questions on a compressed context); it is left unchanged.

    A `decoding_press` (a scoring press with a budget in tokens, e.g. `knorm(tokens=2048)`)
    compresses the cache every `compress_every` steps back to its budget, scoring on that step's
    observation (kvpress `DecodingPress(base_press, compression_interval, target_size)` without a
    hidden-states buffer), so the cache never holds more than the budget plus `compress_every`.

    `on_tokens(tokens [B], active [B])` is called after every step (for streaming); without it the
    host checks for finished rows only every few steps, so decoding runs ahead asynchronously.

    A prompt whose tokens and `max_new_tokens` run past the model's context raises, before anything
    compiles; with `truncate_left=True` it loses its first tokens instead, with a warning.
    `check_finite=True` checks the cache after prefill and after decoding (see `prefill`).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number of tokens >= 1, got {max_new_tokens!r}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
    room = max_new_tokens
    if decoding_press is not None:
        decoding_press = every_n_steps(decoding_press, compress_every)
        room = min(max_new_tokens, compress_every)
    ids, lengths = pad_batch(ids, pad_id=pad_id)
    check_token_ids(ids, model.config.vocab_size)
    ids, lengths = _fit_context(model, ids, lengths, max_new_tokens, cache, truncate_left, pad_id)
    start = time.perf_counter()
    if cache is None:
        capacity = padded_length(int(lengths.max()), chunk_size) + room
        logits, cache = prefill(model, ids, lengths=lengths, capacity=capacity, chunk_size=chunk_size, press=press,
                                check_finite=check_finite)
    else:
        cache.check_room(int(lengths.max()) + room)
        logits, cache = prefill(model, ids, lengths=lengths, cache=cache, chunk_size=chunk_size, press=press,
                                check_finite=check_finite)
    jax.block_until_ready(logits)
    prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    graphdef, state = nnx.split(model)
    key = jax.random.PRNGKey(seed)
    done = jnp.zeros((ids.shape[0],), bool)
    stop = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    steps = []
    for step in range(max_new_tokens):
        was_done = done
        if decoding_press is not None and (step + 1) % compress_every == 0:
            token, done, logits, cache, key = _sample_decode_and_compress(
                graphdef, state, logits, cache, key, done, stop, sampling, decoding_press)
        else:
            token, done, logits, cache, key = _sample_and_decode(graphdef, state, logits, cache, key, done, stop,
                                                                 sampling)
        steps.append((token, was_done))
        if on_tokens is not None:
            on_tokens(np.asarray(token), ~np.asarray(done))
        if (on_tokens is not None or step % 8 == 7) and bool(done.all()):
            break
    if check_finite:
        raise_if_nonfinite(cache, logits, "after decoding")
    tokens = np.stack([np.asarray(t) for t, _ in steps], axis=1)
    active = ~np.stack([np.asarray(d) for _, d in steps], axis=1)
    stopped = np.isin(tokens, np.asarray(stop_ids))
    rows = [row[keep & ~halt].tolist() for row, keep, halt in zip(tokens, active, stopped)]
    return Generation(rows, cache, lengths.tolist(), prefill_seconds, time.perf_counter() - start)


def _fit_context(model: CompressibleModel, ids: np.ndarray, lengths: np.ndarray, max_new_tokens: int,
                 cache: KVCache | None, truncate_left: bool, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`ids` and `lengths`, checked against the model's context; with `truncate_left`, rows that
    would run past it keep their last tokens (with a warning)."""
    limit = context_length(model)
    seen = 0 if cache is None else int(np.max(cache.num_seen))
    longest = int(lengths.max())
    if limit is None or seen + longest + max_new_tokens <= limit:
        return ids, lengths
    keep = limit - seen - max_new_tokens
    after = f" after the cache's {seen}" if seen else ""
    what = f"the prompt ({longest} tokens{after}) and max_new_tokens ({max_new_tokens})"
    if not truncate_left or keep < 1:
        fix = "shorten the prompt or lower max_new_tokens"
        if keep >= 1:
            fix += f", or pass truncate_left=True to keep each prompt's last {keep} tokens"
        check_context(model, seen + longest + max_new_tokens, what, fix)
    warnings.warn(f"{what} run past the model's context of {limit}: each prompt keeps its last {keep} tokens.",
                  stacklevel=3)
    return pad_batch([row[max(0, length - keep):length] for row, length in zip(ids, lengths)], pad_id=pad_id)


def answer_questions(model: CompressibleModel, tokenizer: Tokenizer, context: str, questions: Sequence[str], *,
                     press: Compressor | None = None, max_new_tokens: int = 50, answer_prefix: str = "",
                     chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[str]:
    """Compresses `context` once and answers every question on the compressed cache (greedy,
    batched), as kvpress's `kv-press-text-generation` pipeline does: the chat template's user turn
    holds the context then the question, and only the context is compressed.

    Example (SmolLM2)::

        tc.answer_questions(model, tokenizer, essay, ["Who wrote it?", "When?"], press=tc.presses.snapkv(0.5))
    """
    context_ids, question_ids = split_context_and_questions(tokenizer, context, questions, answer_prefix)
    room = max(map(len, question_ids)) + max_new_tokens
    _, cache = prefill(model, [context_ids], press=press, capacity=len(context_ids) + room, chunk_size=chunk_size)
    batch = jax.tree.map(lambda x: jnp.repeat(x, len(question_ids), axis=0), cache)
    result = generate_ids(model, question_ids, max_new_tokens=max_new_tokens, stop_ids=tokenizer.eos_ids,
                          chunk_size=chunk_size, pad_id=tokenizer.pad_id, cache=batch)
    return [tokenizer.decode(tokens) for tokens in result.tokens]


def split_context_and_questions(tokenizer: Tokenizer, context: str, questions: Sequence[str],
                                answer_prefix: str = "") -> tuple[list[int], list[list[int]]]:
    """Token ids of a context and of the questions that follow it, in the chat template when the
    tokenizer has one (the question ends the user turn; the assistant turn opens)."""
    if not questions:
        raise ValueError("questions is empty; give at least one question.")
    if tokenizer.chat_template:
        separator = "#" * (len(context) + 10)  # a marker that cannot occur in the context
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": context + separator}])
        context, suffix = prompt.split(separator)
    else:
        context = (tokenizer.backend.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else "") + context
        suffix = "\n"
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    return encode(context), [encode(q + suffix + answer_prefix) for q in questions]


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt, wrapped in the chat template as a user turn when `chat`."""
    if chat:
        return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}]),
                                 add_special_tokens=False) for p in prompts]
    return [tokenizer.encode(p) for p in prompts]


def stop_token_ids(tokenizer: Tokenizer, stop_tokens: Sequence[int | str]) -> list[int]:
    """The tokenizer's end-of-sequence ids plus `stop_tokens` given as ids or single-token strings."""
    ids = list(tokenizer.eos_ids)
    for token in stop_tokens:
        token_id = token if isinstance(token, int) else tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"stop token {token!r} is not a single token of this vocabulary; give its id.")
        ids.append(token_id)
    return ids


def generate(model: CompressibleModel, tokenizer: Tokenizer, prompts: str | Sequence[str], *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: Sequence[int | str] = (), chat: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE,
             stream: Callable[[int, str], None] | None = None, press: Compressor | None = None,
             truncate_left: bool = False) -> str | list[str]:
    """Generates a continuation of each prompt (batched); a single string gives a single string.

    `chat=True` wraps each prompt in the model's chat template. `stream(row, text)` receives each
    new piece of text as soon as it is decoded. `press` compresses the prompt's KV cache. A prompt
    that with `max_new_tokens` runs past the model's context raises; `truncate_left=True` keeps its
    last tokens instead (as the token ids that the template and tokenizer made).

    Example (SmolLM2, greedy)::

        model, tokenizer = tc.load()
        tc.generate(model, tokenizer, "What is the capital of France?")  # 'The capital of France is Paris.'
    """
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt.")
    sampling = SamplingConfig(temperature, top_k, top_p)
    chat = chat and tokenizer.chat_template is not None
    on_tokens = text_streamer(tokenizer, len(prompts), stream) if stream else None
    result = generate_ids(model, encode_prompts(tokenizer, prompts, chat), max_new_tokens=max_new_tokens,
                          sampling=sampling, stop_ids=stop_token_ids(tokenizer, stop_tokens), seed=seed,
                          chunk_size=chunk_size, pad_id=tokenizer.pad_id, on_tokens=on_tokens, press=press,
                          truncate_left=truncate_left)
    texts = [tokenizer.decode(row) for row in result.tokens]
    return texts[0] if single else texts


def text_streamer(tokenizer: Tokenizer, batch: int, stream: Callable[[int, str], None]):
    """An `on_tokens` callback for `generate_ids` that calls `stream(row, text)` with each new
    piece of text, decoding each row's whole output so far so that characters split across tokens
    come out whole."""
    ids = [[] for _ in range(batch)]
    shown = [""] * batch

    def on_tokens(tokens, active):
        for row in range(batch):
            if active[row]:
                ids[row].append(int(tokens[row]))
                text = tokenizer.decode(ids[row])
                if len(text) > len(shown[row]) and not text.endswith("\ufffd"):
                    stream(row, text[len(shown[row]):])
                    shown[row] = text

    return on_tokens

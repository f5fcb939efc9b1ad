"""H2O / observed attention: a numpy oracle over the full attention matrix, and a selection that
depends neither on the prefill chunk size nor on the other rows of a batch (kvpress parity:
test_presses_kvpress.py)."""
import jax
import numpy as np
import pytest

import tokcomp_jax as tc
from tokcomp_jax.presses.observed_attention import h2o, mass_scores, observed_attention
from press_helpers import EIGHT_ROWS, kept_positions, oracle_mass_rtol, random_rows
from tolerances import attention_mass_tolerance, model_tolerance, score_magnitude



_CAPTURED = {}  # layer index -> [(layer, queries, positions, valid, state)] of the current spied prefill


def _capture(layer, queries, positions, valid, state, index):
    _CAPTURED.setdefault(int(index), []).append((layer, queries, positions, valid, state))


def _spied_compress(layer, obs, state, **extra):
    """H2O at ratio 0.5, handing each layer's cache, queries, positions and updated state of every
    chunk to the host (one module-level press: its programs compile once per shape)."""
    new_layer, new_state = observed_attention(0.5).compress(layer, obs, state, **extra)
    jax.debug.callback(_capture, layer, obs.queries, obs.positions, obs.valid, new_state, obs.layer_index)
    return new_layer, new_state


SPIED = tc.presses.Press(observed_attention(0.5).init, _spied_compress)


def _spied_prefill(model, rows, chunk_size):
    """Prefill with `SPIED`: the kept positions per row and, per layer, the chunks' captures in
    order and the final `[B, Hkv, C]` scores and cache positions."""
    _CAPTURED.clear()
    _, cache = tc.prefill(model, rows, press=SPIED, chunk_size=chunk_size)
    jax.effects_barrier()
    group = model.config.num_heads // model.config.num_kv_heads
    chunks, scores, positions = {}, [], []
    for index in sorted(_CAPTURED):
        calls = sorted(_CAPTURED[index], key=lambda call: int(np.max(np.asarray(call[2]))))  # chunk order
        chunks[index] = calls
        layer, _, _, _, state = calls[-1]
        scores.append(np.asarray(mass_scores(state, group)))
        positions.append(np.asarray(layer.positions))
    return [kept_positions(cache, row) for row in range(len(rows))], chunks, scores, positions


def _scores_rtol(model, chunks):
    """Relative tolerance between the scores of two prefills of the same rows (other chunks, other
    batches): each computes the mass in float32 (`attention_mass_tolerance`, relative: the
    probabilities are positive) from queries and keys that went through the model in other orders,
    which moves each score by `model_tolerance` of the scores' magnitude, and each probability by
    twice that (its score and its normaliser's). Lengths, chunks and scores from the captures."""
    config, calls = model.config, next(iter(chunks.values()))
    length = sum(int(np.asarray(call[3]).sum(axis=1).max()) for call in calls)
    group = config.num_heads // config.num_kv_heads
    scores = max(score_magnitude(np.concatenate([np.asarray(call[1]) for call in layer_calls], axis=1),
                                 np.asarray(layer_calls[-1][0].keys).reshape(len(calls[0][1]), -1, config.head_dim),
                                 config.head_dim ** -0.5) for layer_calls in chunks.values())
    return (attention_mass_tolerance(length, config.head_dim, length * group + len(calls), 1.0, scores)
            + 2 * model_tolerance(config, length, scores))


def _same_selection(kept, reference, scores, positions, row, rtol):
    """Kept positions equal, except between entries whose scores tie within `rtol` of each other
    (twice the scores' relative tolerance: two scores within it of their values in the other run
    can swap only then)."""
    for layer, (layer_kept, layer_reference) in enumerate(zip(kept, reference)):
        for head, (ours, theirs) in enumerate(zip(layer_kept, layer_reference)):
            if ours == theirs:
                continue
            by_position = dict(zip(positions[layer][row, head].tolist(), scores[layer][row, head].tolist()))
            swapped = [by_position[p] for p in set(ours) ^ set(theirs)]
            assert max(swapped) - min(swapped) <= rtol * max(swapped), (layer, head, ours, theirs)


# numpy oracle -----------------------------------------------------------------------------------

def _oracle_scores(queries, keys, group):
    """kvpress's score from the full `[H, S, S]` causal attention matrix, in float64:
    `[Hkv, S]` attention summed over the queries, divided by the number of queries that see each
    key, averaged over each KV head's query group. queries `[S, H, D]`, keys `[Hkv, S, D]`."""
    length, heads, dim = queries.shape
    per_head = np.zeros((heads, length))
    for h in range(heads):
        logits = queries[:, h] @ keys[h // group].T / np.sqrt(dim)
        logits[np.arange(length)[None] > np.arange(length)[:, None]] = -np.inf
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        per_head[h] = probs.sum(0) / np.arange(length, 0, -1)
    return per_head.reshape(heads // group, group, length).mean(1)


CHUNKED_ROWS = (100, 37, 64)
CHUNK_SIZES = (512, 8, 16, 64)  # 512: the whole prompt (128 wide) in one chunk; 8: 13 chunks of 8


@pytest.fixture(scope="module")
def chunked(model):
    """`_spied_prefill` of the same ragged rows with every chunk size."""
    rows = random_rows(CHUNKED_ROWS, seed=5)
    return rows, {chunk_size: _spied_prefill(model, rows, chunk_size) for chunk_size in CHUNK_SIZES}


def test_scores_and_selection_match_a_numpy_oracle(model, chunked):
    _, runs = chunked
    kept, chunks, scores, _ = runs[8]
    group = model.config.num_heads // model.config.num_kv_heads
    assert sorted(chunks) == [0, 1] and all(len(calls) == 13 for calls in chunks.values())  # 104 = 13 x 8
    for index, calls in chunks.items():
        queries = np.concatenate([np.asarray(call[1], np.float64) for call in calls], axis=1)  # [B, 104, H, D]
        valid = np.concatenate([np.asarray(call[3]) for call in calls], axis=1)
        final_layer = calls[-1][0]
        for row, length in enumerate(CHUNKED_ROWS):
            assert valid[row].sum() == length
            keys = np.asarray(final_layer.keys[row, :, :length], np.float64)  # a fresh cache: slot == position
            expected = _oracle_scores(queries[row, valid[row]], keys, group)
            rtol = oracle_mass_rtol(queries[row, valid[row]], keys, group, chunks=len(calls))
            np.testing.assert_allclose(scores[index][row, :, :length], expected, rtol=rtol, atol=0)
            for head in range(expected.shape[0]):
                top = sorted(np.argsort(-expected[head], kind="stable")[:length // 2].tolist())
                assert kept[row][index][head] == top, (index, row, head)


def test_selection_does_not_depend_on_the_chunk_size(model, chunked):
    rows, runs = chunked
    reference, reference_chunks, reference_scores, reference_positions = runs[512]
    for chunk_size in CHUNK_SIZES[1:]:
        kept, chunks, scores, positions = runs[chunk_size]
        rtol = max(_scores_rtol(model, chunks), _scores_rtol(model, reference_chunks))
        for index in range(len(scores)):  # a fresh cache: one slot per position whatever the chunks
            np.testing.assert_array_equal(positions[index], reference_positions[index])
            np.testing.assert_allclose(scores[index], reference_scores[index], rtol=rtol, atol=0)
        for row in range(len(rows)):
            _same_selection(kept[row], reference[row], scores, positions, row, 2 * rtol)


def test_batch_of_ragged_rows_keeps_what_each_row_keeps_alone(model):
    rows = random_rows(EIGHT_ROWS)
    kept, chunks, scores, positions = _spied_prefill(model, rows, 16)
    rtol = _scores_rtol(model, chunks)
    for index, row in enumerate(rows):
        _, alone = tc.prefill(model, [row], press=h2o(0.5), chunk_size=16)
        _same_selection(kept[index], kept_positions(alone, 0), scores, positions, index, 2 * rtol)
        assert all(len(head) == len(row) // 2 for layer in kept[index] for head in layer)


def test_budget_in_tokens_and_room_for_generation(model):
    rows = random_rows((30, 12))
    result = tc.generate_ids(model, rows, max_new_tokens=3, press=h2o(tokens=8))
    assert [len(t) for t in result.tokens] == [3, 3]
    assert np.asarray(result.cache.layers[0].lengths).tolist() == [[8 + 3] * 2, [8 + 3] * 2]

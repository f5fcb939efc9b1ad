"""Q-Filters: the calibration against a NumPy SVD of the queries and across chunk sizes, parity
with kvpress 0.5.5's `QFilterPress` given the same filters (the same entries kept, layer by layer
and KV head by KV head, on a tiny random Llama and on the real SmolLM2), ragged batches, and the
validation of the filters."""
import inspect
import textwrap

import jax
import kvpress
import numpy as np
import pytest
import torch

import tokcomp_jax as tc
from conftest import essay
from kvpress_parity import full_keys, kvpress_kept, ours_kept, overlap
from press_helpers import EIGHT_ROWS, kept_positions, random_rows
from tolerances import gamma, network, roundoff
from tokcomp_jax.presses.base import Press
from tokcomp_jax.presses.qfilter import calibrate_qfilters, qfilter


def kvpress_qfilter(ratio, filters):
    """kvpress's press with our filters, in place of the ones it would download from the hub."""
    press = kvpress.QFilterPress(compression_ratio=ratio)
    press.post_init_from_model = lambda model: None
    press.q_filters = torch.tensor(filters)  # [layers, KV heads, head_dim], as the hub's
    return press


def captured_queries(model, rows, chunk_size=512):
    """Per layer, the `[N, H, D]` post-RoPE queries of the rows' real tokens, from a prefill in
    chunks of `chunk_size` (in any order of the tokens)."""
    captured = {}

    def keep(q, valid, index):
        captured.setdefault(int(index), []).append(np.asarray(q)[np.asarray(valid)])

    def spy(layer, obs, state, **extra):
        jax.debug.callback(keep, obs.queries, obs.valid, obs.layer_index)
        return layer, state

    tc.prefill(model, rows, press=Press(lambda layer, index: None, spy), chunk_size=chunk_size)
    jax.effects_barrier()
    return [np.concatenate(captured[index]) for index in sorted(captured)]


def numpy_filters(queries, kv_heads):
    """The paper's filters from an SVD of each query head's stacked queries (float64)."""
    filters = []
    for layer in queries:
        heads = []
        for q in np.moveaxis(layer.astype(np.float64), 1, 0):  # [N, D] per query head
            first = np.linalg.svd(q, full_matrices=False)[2][0]
            heads.append(-first if (q @ first).mean() > 0 else first)
        filters.append(np.reshape(heads, (kv_heads, -1, layer.shape[-1])).mean(axis=1))
    return np.stack(filters)


def filter_tolerance(config, queries, longest: int, chunks: int, networks_differ: bool) -> float:
    """Largest difference of a calibrated filter from another computation of it, by the variant of
    Davis-Kahan of Yu, Wang and Samworth (Biometrika 2015): a top eigenvector moves by at most
    2^(3/2) ||E|| / (λ1 - λ2) under a perturbation E of the matrix, here the float32 moments Q^T Q
    of each query head's N queries `[N, H, D]` (per layer). E: the moments' sum of N terms (and one
    merge per chunk) carries γ̃ of that times |Q|^T |Q|; on one side only against the float64 SVD
    of the same queries (the same model call on the same chunk), on both when `networks_differ`
    (other chunks), where the queries themselves differ by `network` over the layers up to theirs
    (δQ entrywise within it of max |Q|: 2 ||δQ|| ||Q|| + ||δQ||^2 per side). A group's mean of
    unit vectors moves no more than its worst; the filter's rounding to float32 adds u·|filter|."""
    worst = 0.0
    sides = 2 if networks_differ else 1
    for index, layer in enumerate(queries):
        relative = network(max(config.hidden_size, config.intermediate_size, longest), index + 1, 1.0)
        for q in np.moveaxis(np.asarray(layer, np.float64), 1, 0):  # [N, D] per query head
            eigenvalues = np.linalg.eigvalsh(q.T @ q)
            error = sides * gamma(len(q) + chunks) * np.linalg.norm(np.abs(q).T @ np.abs(q), 2)
            if networks_differ:
                moved = relative * np.abs(q).max() * np.sqrt(q.size)  # a bound on ||δQ||_F
                error += sides * (2 * moved * np.linalg.norm(q, 2) + moved ** 2)
            worst = max(worst, 2 ** 1.5 * error / (eigenvalues[-1] - eigenvalues[-2]))
    return worst + roundoff(np.float32)


@pytest.fixture(scope="module")
def tiny_filters(tiny_pair):
    return calibrate_qfilters(tiny_pair[1], random_rows([400], seed=1, vocab=128), chunk_size=128)


@pytest.fixture(scope="module")
def tiny_essay(tiny_pair):
    ids = np.random.default_rng(0).integers(0, 128, 300).tolist()
    return ids, full_keys(tiny_pair[0], ids)


def test_calibration_is_the_svd_of_the_queries(tiny_pair):
    """Ragged rows: only the real tokens' queries count."""
    model = tiny_pair[1]
    rows = random_rows([300, 180], seed=2, vocab=128)
    queries = captured_queries(model, rows)
    expected = numpy_filters(queries, kv_heads=2)
    tolerance = filter_tolerance(model.config, queries, 300, chunks=1, networks_differ=False)
    np.testing.assert_allclose(calibrate_qfilters(model, rows, chunk_size=512), expected, rtol=0, atol=tolerance)


def test_calibration_does_not_depend_on_the_chunk_size(tiny_pair, tiny_filters):
    """Other chunks give other queries (`network`), which the ill-conditioned top eigenvectors of a
    tiny random model's near-isotropic queries (λ1 - λ2 down to 5% of λ1) amplify: the bound between
    chunk sizes is loose. So each chunk size is also held to the SVD of its own queries (512 tokens:
    the prefill's chunks, aligned to the end, are the calibration's), where only the moments' sums
    differ."""
    model = tiny_pair[1]
    rows = random_rows([400], seed=1, vocab=128)
    tolerance = filter_tolerance(model.config, captured_queries(model, rows), 400, chunks=400 // 64,
                                 networks_differ=True)
    for chunk_size in (64, 512):
        np.testing.assert_allclose(calibrate_qfilters(model, rows, chunk_size=chunk_size), tiny_filters,
                                   rtol=0, atol=tolerance)
    rows = random_rows([512], seed=1, vocab=128)
    for chunk_size in (64, 128, 512):
        queries = captured_queries(model, rows, chunk_size)
        tolerance = filter_tolerance(model.config, queries, 512, chunks=512 // chunk_size, networks_differ=False)
        np.testing.assert_allclose(calibrate_qfilters(model, rows, chunk_size=chunk_size),
                                   numpy_filters(queries, kv_heads=2), rtol=0, atol=tolerance)


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_tiny_llama_keeps_what_kvpress_keeps(tiny_pair, tiny_essay, tiny_filters, ratio):
    hf_model, model = tiny_pair
    ids, uncompressed = tiny_essay
    theirs = kvpress_kept(hf_model, kvpress_qfilter(ratio, tiny_filters), ids, uncompressed)
    assert overlap(ours_kept(model, qfilter(ratio, filters=tiny_filters), ids), theirs) >= 0.99


def test_smollm2_keeps_what_kvpress_keeps(smollm2, hf_smollm2):
    model, tokenizer = smollm2
    calibration = tokenizer.encode(inspect.getsource(textwrap))[:512]  # other text than the test's
    filters = calibrate_qfilters(model, [calibration], chunk_size=512)
    assert filters.shape == (30, 3, 64)
    ids = tokenizer.encode(essay("worked.txt"))[:300]
    theirs = kvpress_kept(hf_smollm2[0], kvpress_qfilter(0.5, filters), ids, full_keys(hf_smollm2[0], ids))
    _, cache = tc.prefill(model, [ids], press=qfilter(0.5, filters=filters))  # one chunk: one compilation
    assert overlap([[set(head) for head in layer] for layer in kept_positions(cache, 0)], theirs) >= 0.99


def test_batch_of_ragged_rows_keeps_what_each_row_keeps_alone(model):
    press = qfilter(0.5, filters=calibrate_qfilters(model, random_rows([100], seed=9)))
    rows = random_rows(EIGHT_ROWS)
    _, cache = tc.prefill(model, rows, press=press, chunk_size=64)
    for index, row in enumerate(rows):
        _, alone = tc.prefill(model, [row], press=press, chunk_size=64)
        assert kept_positions(cache, index) == kept_positions(alone, 0), f"row {index}"


def test_equal_filters_give_the_same_press(tiny_filters):
    press = qfilter(0.5, filters=tiny_filters)
    assert press is qfilter(0.5, filters=tiny_filters.copy()) is qfilter(0.5, filters=tiny_filters.tolist())
    assert press is not qfilter(0.5, filters=-tiny_filters) and press is not qfilter(0.25, filters=tiny_filters)


@pytest.mark.parametrize("shape", [(1, 2, 8), (2, 3, 8), (2, 2, 16)])
def test_filters_of_another_model_are_rejected(model, shape):
    with pytest.raises(ValueError, match="filters is shaped"):
        tc.prefill(model, [[1, 2, 3, 4]], press=qfilter(0.5, filters=np.ones(shape)))


def test_invalid_arguments_are_rejected(model):
    with pytest.raises(ValueError, match=r"filters must be shaped \[num_layers, num_kv_heads, head_dim\]"):
        qfilter(0.5, filters=np.ones((2, 8)))
    with pytest.raises(ValueError, match="filters holds NaN"):
        qfilter(0.5, filters=np.full((2, 2, 8), np.nan))
    with pytest.raises(ValueError, match="ratio"):
        qfilter(1.5, filters=np.ones((2, 2, 8)))
    with pytest.raises(ValueError, match="chunk_size"):
        calibrate_qfilters(model, [[1, 2, 3]], chunk_size=0)
    with pytest.raises(ValueError, match="ids must be token ids"):
        calibrate_qfilters(model, [[1, 2, 300]])


def test_the_registry_builds_qfilter_from_given_or_calibrated_filters(model, tiny_filters):
    """By name, Q-Filters are either given (estimated once for many presses) or estimated on the
    calibration ids through the model's own call; nothing is cached behind the caller's back."""
    ids = random_rows([64], seed=5)[0]
    assert tc.presses.make_press("qfilter", 0.5, model, qfilters=tiny_filters) is qfilter(0.5, filters=tiny_filters)
    calibrated = tc.presses.make_press("qfilter", 0.5, model, ids)
    assert calibrated is qfilter(0.5, filters=calibrate_qfilters(model, [ids]))
    with pytest.raises(ValueError, match="qfilters= .* or calibration_ids"):
        tc.presses.make_press("qfilter", 0.5, model)

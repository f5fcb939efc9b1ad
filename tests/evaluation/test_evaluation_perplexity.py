"""Perplexity with the cache compressed while it fills, against transformers with the equivalent
attention mask (a dense oracle: StreamingLLM's kept set is known in advance)."""
import numpy as np
import pytest
import torch

import tokcomp_jax as tc
from tokcomp_jax.evaluation.perplexity import perplexity
from tolerances import log_probability, model_tolerance, reordered_sum

IDS = np.random.default_rng(1).integers(0, 128, 120).tolist()


def streaming_mask(length: int, budget: int, chunk: int, n_sink: int = 4) -> np.ndarray:
    """`[S, S]` True where token t sees position p when a StreamingLLM cache of `budget` entries
    (n_sink sinks + the most recent) is compressed after every chunk: t's chunk sees the sinks, the
    `budget - n_sink` positions just before the chunk, and the chunk's tokens up to t. Prefill aligns
    the text to the end of a whole number of chunks, so the first chunk may be short."""
    pad = -length % chunk
    t, p = np.arange(length)[:, None], np.arange(length)[None, :]
    start = np.maximum((t + pad) // chunk * chunk - pad, 0)
    kept_before = (p < n_sink) | (p >= start - (budget - n_sink)) | (start <= budget)
    return (p <= t) & ((p >= start) | kept_before)


def hf_logits(hf_model, ids, mask=None):
    tokens = torch.tensor([ids])
    kwargs = {}
    if mask is not None:
        additive = np.where(mask, 0.0, np.finfo(np.float32).min).astype(np.float32)
        kwargs["attention_mask"] = torch.from_numpy(additive)[None, None]
    with torch.no_grad():
        return hf_model(tokens, **kwargs).logits[0, :-1].float()


def hf_token_nll(hf_model, ids, mask=None):
    logits = hf_logits(hf_model, ids, mask)
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").numpy()


def nll_tolerance(model, ids, logits) -> float:
    """Two float32 computations of a token's NLL (ours in chunks, transformers' at once): the
    network's bound on logits up to `logits`' largest, through a log-softmax."""
    logits_tolerance = model_tolerance(model.config, len(ids), np.abs(np.asarray(logits)).max())
    return log_probability(logits_tolerance, model.config.vocab_size)


def test_full_cache_perplexity_matches_transformers(tiny_pair):
    hf_model, model = tiny_pair
    result = perplexity(model, IDS, chunk_size=16)
    expected = hf_token_nll(hf_model, IDS)
    tolerance = nll_tolerance(model, IDS, hf_logits(hf_model, IDS))
    np.testing.assert_allclose(result.token_nll[0], expected, atol=tolerance, rtol=0)
    # exp of a mean of len(IDS) - 1 NLLs: the NLL's bound and the mean's, relative after exp.
    mean_tolerance = tolerance + reordered_sum(len(expected), expected.mean())
    assert result.perplexity == pytest.approx(np.exp(expected.mean()), rel=np.expm1(mean_tolerance), abs=0)


@pytest.mark.parametrize("budget, chunk", [(24, 8), (40, 16), (17, 1)])
def test_streaming_perplexity_matches_the_masked_dense_oracle(tiny_pair, budget, chunk):
    hf_model, model = tiny_pair
    ids = IDS[:60] if chunk == 1 else IDS
    result = perplexity(model, ids, press=tc.presses.streaming_llm(tokens=budget), chunk_size=chunk)
    mask = streaming_mask(len(ids), budget, chunk)
    expected = hf_token_nll(hf_model, ids, mask)
    tolerance = nll_tolerance(model, ids, hf_logits(hf_model, ids, mask))
    np.testing.assert_allclose(result.token_nll[0], expected, atol=tolerance, rtol=0)
    # Compression changed the predictions beyond the computation's error (the check has teeth), and
    # the cache holds the budget.
    full_tolerance = nll_tolerance(model, ids, hf_logits(hf_model, ids))
    assert np.abs(result.token_nll[0] - hf_token_nll(hf_model, ids)).max() > max(tolerance, full_tolerance)
    assert result.cache_bytes.tolist() == [budget * 2 * 2 * (2 * 16 * 4 + 4)]


def test_rows_of_different_lengths_score_as_alone(model):
    press = tc.presses.knorm(tokens=12)
    rows = [[i % 64 for i in row] for row in (IDS[:50], IDS[60:90], IDS[:7])]  # the fixture has 64 tokens
    together = perplexity(model, rows, press=press, chunk_size=8)
    for row, nll in zip(rows, together.token_nll):
        # A row alone and in a padded batch: the network in two orders. The logits' magnitude is
        # that of the uncompressed cache's (the same weights on the same tokens).
        logits, _ = tc.prefill(model, [row], all_logits=True)
        tolerance = nll_tolerance(model, row, logits)
        np.testing.assert_allclose(nll, perplexity(model, row, press=press, chunk_size=8).token_nll[0],
                                   atol=tolerance, rtol=0)


def test_bad_input_is_refused(model):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [[5], [1, 2, 3]])
    with pytest.raises(ValueError, match="budget in tokens"):
        perplexity(model, IDS, press=tc.presses.knorm(0.5))

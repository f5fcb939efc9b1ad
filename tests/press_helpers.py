"""Helpers shared by the press tests."""
import numpy as np

from tolerances import attention_mass_tolerance, score_magnitude

RAGGED = (40, 17, 64, 29)  # row lengths of ragged batches
EIGHT_ROWS = (40, 17, 64, 29, 51, 12, 33, 60)  # a batch of 8 rows of different lengths


def random_rows(lengths, seed=0, vocab=64, distinct=False):
    """Rows of random token ids of the given lengths; with `distinct`, no id repeats within a row."""
    rng = np.random.default_rng(seed)
    if distinct:
        if max(lengths) > vocab:
            raise ValueError(f"distinct rows need vocab >= the longest row ({max(lengths)}), got vocab={vocab}.")
        return [rng.permutation(vocab)[:n].tolist() for n in lengths]
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def kept_positions(cache, row=0):
    """Per layer and KV head, the sorted positions that row `row` of the cache holds."""
    return [[sorted(np.asarray(layer.positions[row, h, :int(layer.lengths[row, h])]).tolist())
             for h in range(layer.lengths.shape[1])] for layer in cache.layers]


def oracle_mass_rtol(queries, keys, group: int, chunks: int = 1) -> float:
    """Relative tolerance of a float32 attention mass (H2O, A2SF) of one row against a float64
    oracle over the same queries `[n, H, D]` and keys `[Hkv, n, D]`: only the float32 side carries
    error, half of `attention_mass_tolerance` over n keys, n * group probabilities and one rounding
    per chunk (the chunks' decays and additions); the probabilities summed are positive, so the
    bound holds for each entry relative to itself."""
    length, heads, dim = queries.shape
    grouped = np.asarray(queries).transpose(1, 0, 2).reshape(heads // group, group * length, dim)
    scores = score_magnitude(grouped, keys, dim ** -0.5)
    return attention_mass_tolerance(length, dim, length * group + chunks, 1.0, scores) / 2

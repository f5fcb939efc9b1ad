"""Tolerances of numeric comparisons, derived from the computation compared rather than read off one run.

Two float computations of one quantity differ when they sum in different orders (a chunked
prefill, a batch padded differently, a fused kernel, another library). Rounding errors of a sum of
n terms behave as independent zero-mean variables: with probability at least
1 - 2n·exp(-λ²/2) (with λ = 10: 1 - n·4e-22) the computed sum is within
γ̃(n) · Σ|x_i| of the exact one, γ̃(n) = exp(λ·√n·u + n·u²) - 1 ≈ λ·√n·u, u the unit roundoff
(Higham and Mary, "A New Approach to Probabilistic Rounding Error Analysis", SIAM J. Sci. Comput.
2019, Theorem 3.1). A dot product of length n is such a sum. Two computations of the same sum each
carry that error, so they differ by at most twice it.

A network's output gathers the errors of its layers: each layer sums at most `n` terms (hidden
size, MLP width or sequence length, whichever is longest) and adds its result to the residual
stream, which the next layer's RMSNorm rescales without amplifying relative errors. The bound
adds the errors of the layers linearly, 2·layers·γ̃(n) relative to the output's largest magnitude:
independent errors of the layers would add as √layers, and that margin covers sums whose terms
are larger than the output they cancel to.
"""
import math

import ml_dtypes
import numpy as np

LAMBDA = 10.0  # confidence of the probabilistic bound: failure probability 2n·exp(-50) per sum


def roundoff(dtype=np.float32) -> float:
    """Unit roundoff u of `dtype`: 2**-24 for float32, 2**-8 for bfloat16, 2**-53 for float64."""
    return float(ml_dtypes.finfo(dtype).eps) / 2


def gamma(n: int, dtype=np.float32) -> float:
    """Relative error bound γ̃(n) of a sum of `n` terms in `dtype` (Higham and Mary 2019)."""
    u = roundoff(dtype)
    return math.expm1(LAMBDA * math.sqrt(n) * u + n * u * u)


def reordered_sum(n: int, magnitude, dtype=np.float32) -> float:
    """Largest difference between two computations of one sum of `n` terms whose absolute values
    sum to `magnitude` (Σ|x_i|; |Σx_i| where terms do not cancel)."""
    return 2 * gamma(n, dtype) * float(magnitude)


def network(n: int, layers: int, magnitude, dtype=np.float32) -> float:
    """Largest difference between two computations of a network's output of `magnitude` whose
    `layers` layers each sum at most `n` terms."""
    return layers * reordered_sum(n, magnitude, dtype)


def model_tolerance(config, sequence_length: int, magnitude, dtype=np.float32) -> float:
    """`network` for a decoder with `config` (a ModelConfig) over `sequence_length` tokens."""
    n = max(config.hidden_size, config.intermediate_size, sequence_length)
    return network(n, config.num_layers, magnitude, dtype)


def attention_tolerance(keys: int, head_dim: int, value_magnitude, score_magnitude=1.0, dtype=np.float32) -> float:
    """Largest difference between two computations of softmax attention over `keys` keys, values of
    at most `value_magnitude`: the weighted sum of values and the sum of weights each carry γ̃(keys)
    relative; a score, a dot product of `head_dim` terms whose absolute values sum to
    `score_magnitude` (Σ_j|q_j·k_j| times the softmax scale), carries γ̃(head_dim)·score_magnitude,
    which moves its weight, in the sum and in the normaliser, by that relative amount. Each of the
    two computations carries all of it; exp's own error (an ulp or two) is below these."""
    u_sums = 2 * gamma(keys, dtype)
    u_scores = 2 * gamma(head_dim, dtype) * float(score_magnitude)
    return 2 * float(value_magnitude) * (u_sums + u_scores)


def binomial(trials: int, probability: float = 0.5, deviations: float = 6.0) -> float:
    """Width of a frequency estimated from `trials` draws: `deviations` standard deviations of a
    binomial proportion (6: fails once in ~5e8 runs)."""
    return deviations * math.sqrt(probability * (1 - probability) / trials)


def log_probability(logits_tolerance, vocab: int, dtype=np.float32) -> float:
    """Largest difference between two computations of a log-probability z_v - logsumexp(z) over
    `vocab` logits that differ by at most `logits_tolerance`: z_v and the logsumexp each move by it,
    and the logsumexp's sum of `vocab` positive terms carries its reordered bound relative, which
    its log turns into the same absolute error. A mean cross-entropy over n tokens adds
    `reordered_sum(n, its value)`."""
    return 2 * float(logits_tolerance) + reordered_sum(vocab, 1.0, dtype)


def kl_divergence(teacher_tolerance, student_tolerance, log_ratio, vocab: int, dtype=np.float32) -> float:
    """Largest difference between two computations of KL(p || q) = Σ_v p_v (log p_v - log q_v) over
    `vocab` entries whose log-probabilities differ by at most `teacher_tolerance` (log p) and
    `student_tolerance` (log q), with |log p_v - log q_v| <= `log_ratio`: each log-ratio moves by
    their sum, each weight p_v by `teacher_tolerance` relative, and the sum carries its reordered
    bound. A mean over n tokens adds `reordered_sum(n, its value)`."""
    t, s, r = float(teacher_tolerance), float(student_tolerance), float(log_ratio)
    return t + s + t * r + reordered_sum(vocab, r, dtype)


def score_magnitude(q, keys, scale) -> float:
    """The `score_magnitude` of `attention_tolerance`: the largest Σ_j|q_j·k_j|·scale of a query
    row of `q` [B, ..., D] and a key of `keys` [B, N, D] in its batch row (NaN counts as 0: a
    pool's free slots)."""
    q, keys = (np.nan_to_num(np.abs(np.asarray(x, np.float64))) for x in (q, keys))
    products = q.reshape(q.shape[0], -1, q.shape[-1]) @ keys.transpose(0, 2, 1)
    return float(products.max(initial=0.0)) * abs(float(scale))


def attention_mass_tolerance(keys: int, head_dim: int, terms: int, magnitude, score_magnitude=1.0,
                             dtype=np.float32) -> float:
    """Largest difference between two computations of a sum of `terms` softmax probabilities over
    `keys` keys (the attention mass H2O, SnapKV and TOVA score with), of at most `magnitude`: each
    probability carries γ̃(keys) relative from its normaliser and 2·γ̃(head_dim)·score_magnitude
    from its score and the normaliser's (as in `attention_tolerance`), their sum γ̃(terms)."""
    relative = gamma(keys, dtype) + 2 * gamma(head_dim, dtype) * float(score_magnitude) + gamma(terms, dtype)
    return 2 * float(magnitude) * relative


def logsumexp_tolerance(terms: int, head_dim: int, score_magnitude=1.0, magnitude=0.0, dtype=np.float32) -> float:
    """Largest difference between two computations of log Σ exp(s_i) over `terms` scores, each a dot
    product of `head_dim` terms whose absolute values sum to `score_magnitude` (as in
    `attention_tolerance`), the result at most `magnitude` in absolute value: each score, so the
    log-sum-exp, moves by 2·γ̃(head_dim)·score_magnitude; the sum of positive exponentials carries
    2·γ̃(terms) relative, which its log turns into as much absolute; adding the largest score back
    rounds to u·magnitude in each computation."""
    return 2 * (gamma(head_dim, dtype) * float(score_magnitude) + gamma(terms, dtype)
                + roundoff(dtype) * float(magnitude))


def training_losses(config, sequence_length: int, tokens: int, losses, logits_magnitude, dtype=np.float32):
    """Largest differences between the per-step `losses` of two runs of one training (a decoder with
    `config`, batches of `tokens` tokens in rows of `sequence_length`, logits of at most
    `logits_magnitude`) that sum in different orders (another mesh, process count, remat): step k's
    loss carries its logits' `model_tolerance` through `log_probability`, and the mean over the
    tokens; each earlier update carries its gradients' relative error, sums over the batch's tokens
    through the network (`network(max(n, tokens), layers, 1)`), and moves later losses by at most
    that part of the change of the loss it made (first order; the losses' steps |L_{j+1} - L_j|
    also hold the batches' differences, which only adds margin). Elements of a gradient that the
    error can flip move the loss by no more than their own, as small, share."""
    losses = np.abs(np.asarray(losses, np.float64))
    n = max(config.hidden_size, config.intermediate_size, sequence_length)
    logits = model_tolerance(config, sequence_length, logits_magnitude, dtype)
    loss = log_probability(logits, config.vocab_size, dtype) + 2 * gamma(tokens, dtype) * losses
    gradient = network(max(n, tokens), config.num_layers, 1.0, dtype)
    moved = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(losses)))])
    return loss + gradient * moved


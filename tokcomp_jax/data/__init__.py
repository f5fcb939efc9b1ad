"""Text that evaluation hides needles in and training reads: the corpora."""
from tokcomp_jax.data.corpora import CORPORA, corpus_documents, corpus_units

__all__ = ["CORPORA", "corpus_documents", "corpus_units"]

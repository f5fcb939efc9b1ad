"""Learned compressors: tokens trained to stand in for a prompt, and the attention masks that train
them (gist tokens, Mu, Li & Goodman, 2023, arXiv:2304.08467), and their input pipeline."""
from tokcomp_jax.learned.data import PackedWindows, corpus_windows, split_documents, tokenize_documents
from tokcomp_jax.learned.gist_mask import (
    VARIANTS,
    gist_attention,
    gist_block_mask,
    gist_mask,
    gist_mask_block,
    gist_mask_from_ids,
    splash_gist_mask,
)

__all__ = ["VARIANTS", "gist_attention", "gist_block_mask", "gist_mask", "gist_mask_block", "gist_mask_from_ids",
           "splash_gist_mask", "PackedWindows", "corpus_windows", "split_documents", "tokenize_documents"]

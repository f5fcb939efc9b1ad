"""Composing presses, and reusing one compressed context for several questions."""
import numpy as np
import pytest

import tokcomp_jax as tc
from press_helpers import kept_positions, random_rows


def test_chain_applies_presses_in_order(model):
    rows = random_rows([40, 23])
    _, chained = tc.prefill(model, rows, press=tc.presses.chain(tc.presses.knorm(0.5), tc.presses.streaming_llm(0.5)))
    _, first = tc.prefill(model, rows, press=tc.presses.knorm(0.5))
    for row, length in enumerate((40, 23)):
        after_knorm = kept_positions(first, row)
        kept_after_both = max(1, int(max(1, int(length * 0.5)) * 0.5))
        for layer_kept, layer_first in zip(kept_positions(chained, row), after_knorm):
            for head_kept, head_first in zip(layer_kept, layer_first):
                # StreamingLLM on what Knorm left: its 4 oldest entries, then its most recent ones.
                recent = kept_after_both - 4
                assert head_kept == head_first[:4] + (head_first[-recent:] if recent else [])
    assert chained.capacities == (max(1, int(20 * 0.5)),) * 2


def test_per_layer_assignment(model):
    rows = random_rows([32])
    press = tc.presses.per_layer({1: tc.presses.streaming_llm(0.75)})
    _, cache = tc.prefill(model, rows, press=press)
    assert cache.capacities == (32, 8)
    assert kept_positions(cache)[0] == [list(range(32))] * 2
    assert kept_positions(cache)[1] == [[0, 1, 2, 3, 28, 29, 30, 31]] * 2
    both = tc.presses.per_layer([tc.presses.knorm(0.5), None], default=tc.presses.streaming_llm(0.5))
    assert tc.prefill(model, rows, press=both)[1].capacities == (16, 32)
    assert press is tc.presses.per_layer({1: tc.presses.streaming_llm(0.75)})


@pytest.mark.parametrize("bad", [lambda: tc.presses.chain(), lambda: tc.presses.chain("knorm"),
                                 lambda: tc.presses.per_layer({0: "snapkv"})])
def test_composition_rejects_what_is_not_a_press(bad):
    with pytest.raises(ValueError, match="press"):
        bad()


def test_one_compressed_context_serves_several_questions(model):
    """Question-agnostic compression: compress the context once, then prefill each question on it;
    the compressed cache is left untouched for the next question."""
    context, questions = random_rows([48])[0], random_rows([5, 9], seed=1)
    press = tc.presses.snapkv(0.5, window_size=8)
    _, compressed = tc.prefill(model, [context], press=press, capacity=48 + 16)
    assert compressed.capacities == (24 + 16,) * 2
    snapshot = [np.asarray(layer.keys).copy() for layer in compressed.layers]
    answers = []
    for question in questions:
        logits, cache = tc.prefill(model, [question], cache=compressed, all_logits=True)
        answers.append(np.asarray(logits))
        assert np.asarray(cache.lengths)[:, 0, 0].tolist() == [24 + len(question)] * 2
        assert cache.positions[0][0, 0, 24:24 + len(question)].tolist() == list(range(48, 48 + len(question)))
    for layer, keys in zip(compressed.layers, snapshot):
        np.testing.assert_array_equal(layer.keys, keys)
    again, _ = tc.prefill(model, [questions[0]], cache=compressed, all_logits=True)
    np.testing.assert_array_equal(again, answers[0])

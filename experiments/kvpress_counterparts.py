"""kvpress's counterpart of each of our presses, for the side-by-side scripts in this folder."""

# kvpress's class for each press name of `tc.presses.make_press`.
KVPRESS = {"streaming_llm": "StreamingLLMPress", "knorm": "KnormPress", "snapkv": "SnapKVPress",
           "observed_attention": "ObservedAttentionPress", "tova": "TOVAPress", "keydiff": "KeyDiffPress",
           "random": "RandomPress", "expected_attention": "ExpectedAttentionPress", "pyramidkv": "PyramidKVPress"}


def kvpress_press(kvpress, name: str, ratio: float):
    """kvpress's press for our `name` at `ratio` (None for "none", the full cache)."""
    if name == "none":
        return None
    if name == "adakv_snapkv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    return getattr(kvpress, KVPRESS[name])(compression_ratio=ratio)

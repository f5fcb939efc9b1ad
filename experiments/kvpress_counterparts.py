"""kvpress's counterpart of each of our presses, and both models loaded from one GGUF file, for the
side-by-side scripts in this folder."""
import os
import sys
import types


import tokcomp_jax as tc
from rates import machine_description

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


def load_both(model_name: str, dtype: str, attn_implementation: str) -> types.SimpleNamespace:
    """Our model and tokenizer, and transformers' from the same file (`hf_model`, `hf_tokenizer`), with
    the reference modules (`kvpress`, `torch`, `transformers`); `machine` describes where they run."""
    try:
        import kvpress
        import torch
        import transformers
    except ImportError as e:
        sys.exit(f"this script compares with kvpress: pip install -e '.[test]' ({e})")
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = tc.load(model_name, dtype=dtype)
    directory, filename = os.path.split(tc.checkpoints.resolve_model_path(model_name))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=getattr(torch, dtype), attn_implementation=attn_implementation).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    machine = (f"{machine_description()}; torch {torch.__version__} {torch.get_num_threads()} threads, "
               f"{attn_implementation} attention; transformers {transformers.__version__}")
    return types.SimpleNamespace(model=model, tokenizer=tokenizer, hf_model=hf_model, hf_tokenizer=hf_tokenizer,
                                 kvpress=kvpress, torch=torch, transformers=transformers, machine=machine)

"""Tokenizers built from GGUF metadata or a Hugging Face `tokenizer.json`, with chat templates."""
from __future__ import annotations

import json
import os
from typing import Sequence

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, pre_tokenizers

from tokcomp_jax.checkpoints.weights import CheckpointError

# Pre-tokenizer split patterns of llama.cpp's `tokenizer.ggml.pre` types.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                   r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PATTERNS = {
    "llama-bpe": _LLAMA3_PATTERN,
    "qwen2": _LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}"),
}
_CONTROL_TOKEN_TYPES = (3, 4)  # llama.cpp token types CONTROL and USER_DEFINED


class Tokenizer:
    """Text <-> ids, special tokens and the chat template of a model (see `tc.load`)."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None, eos_ids: Sequence[int],
                 pad_id: int | None, chat_template: str | None, add_bos: bool):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.pad_id = pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.chat_template = chat_template
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text map to their ids."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], *,
                            add_generation_prompt: bool = True) -> str:
        """Renders `[{"role": ..., "content": ...}]` with the model's own Jinja chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; pass chat=False and format the prompt yourself.")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        special = lambda i: self.backend.id_to_token(i) if i is not None else ""
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=special(self.bos_id), eos_token=special(self.eos_ids[0] if self.eos_ids else None))

    @classmethod
    def from_gguf(cls, gguf_file) -> "Tokenizer":
        """A byte-level BPE tokenizer from `tokenizer.ggml.*` metadata (as llama.cpp builds it)."""
        meta = gguf_file.metadata
        if meta("tokenizer.ggml.model") != "gpt2":
            raise CheckpointError(
                f"{gguf_file.path}: tokenizer model {meta('tokenizer.ggml.model')!r} is not supported "
                "(byte-level BPE, 'gpt2', is); pass load_tokenizer=False to load the weights alone.")
        tokens, merges = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise CheckpointError(
                f"{gguf_file.path} lacks tokenizer.ggml.tokens or tokenizer.ggml.merges; "
                "pass load_tokenizer=False to load the weights alone.")
        merges = [tuple(m.split(" ", 1)) for m in merges]
        try:
            if any(len(m) != 2 for m in merges):
                raise ValueError("a merge is not two tokens separated by a space")
            backend = tokenizers.Tokenizer(tokenizers.models.BPE(
                {t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
        except Exception as e:  # the tokenizers library raises bare Exceptions
            raise CheckpointError(f"{gguf_file.path}: the tokenizer metadata is inconsistent ({e}); "
                                  "pass load_tokenizer=False to load the weights alone.") from e
        pre = meta("tokenizer.ggml.pre", "gpt2")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLIT_PATTERNS)
        if pre in _SPLIT_PATTERNS:
            split = pre_tokenizers.Split(tokenizers.Regex(_SPLIT_PATTERNS[pre]), behavior="isolated")
            backend.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
        elif pre == "smollm":
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        types = meta("tokenizer.ggml.token_type", [1] * len(tokens))
        backend.add_special_tokens([
            tokenizers.AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types) if kind in _CONTROL_TOKEN_TYPES])
        eos = meta("tokenizer.ggml.eos_token_id")
        eot = meta("tokenizer.ggml.eot_token_id")
        return cls(backend, bos_id=meta("tokenizer.ggml.bos_token_id"),
                   eos_ids=[i for i in dict.fromkeys((eos, eot)) if i is not None],
                   pad_id=meta("tokenizer.ggml.padding_token_id"),
                   chat_template=meta("tokenizer.chat_template"),
                   add_bos=bool(meta("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_hf_dir(cls, directory: str) -> "Tokenizer":
        """Loads `tokenizer.json` with `tokenizer_config.json` / `generation_config.json` beside it."""
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing; pass load_tokenizer=False to load the weights alone.")
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as e:
            raise CheckpointError(f"{path} is not a valid tokenizer file: {e}") from e
        tok_config = _optional_json(os.path.join(directory, "tokenizer_config.json"))
        gen_config = _optional_json(os.path.join(directory, "generation_config.json"))
        model_config = _optional_json(os.path.join(directory, "config.json"))
        template = tok_config.get("chat_template")
        template_file = os.path.join(directory, "chat_template.jinja")
        if template is None and os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                template = f.read()
        token_id = lambda v: backend.token_to_id(v if isinstance(v, str) else v.get("content")) if v else None
        eos = gen_config.get("eos_token_id", model_config.get("eos_token_id"))
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if not eos_ids and token_id(tok_config.get("eos_token")) is not None:
            eos_ids = [token_id(tok_config.get("eos_token"))]
        bos = model_config.get("bos_token_id", token_id(tok_config.get("bos_token")))
        return cls(backend, bos_id=bos, eos_ids=eos_ids,
                   pad_id=token_id(tok_config.get("pad_token")),
                   chat_template=template, add_bos=False)  # tokenizer.json's post-processor adds BOS


def _optional_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)

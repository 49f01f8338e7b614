"""Host-LLM tokenizers from local files only: a HF model directory, or a GGUF file's metadata.

Nothing here downloads: HF directories load with `local_files_only=True`, and a GGUF tokenizer
is rebuilt from `tokenizer.ggml.*` metadata into a `tokenizers` byte-level BPE wrapped in
`transformers.PreTrainedTokenizerFast`, so every caller sees the same tokenizer interface.

The GGUF pre-tokenizer is chosen from `tokenizer.ggml.pre` as llama.cpp does
(`llama-vocab.cpp`): "gpt2"/"default" split with the GPT-2 regex; "smollm" (and the StarCoder
family that shares its rule) first split every digit on its own, then apply the GPT-2 regex.
BOS/EOS are added to encoded text only when `tokenizer.ggml.add_bos_token` / `add_eos_token`
say so (SmolLM2: neither).
"""

from pathlib import Path

from meg_jax.checkpoints.errors import CheckpointError

# llama.cpp token types (gguf.TokenType): CONTROL tokens are special, USER_DEFINED are added
# tokens that are matched whole but decoded as text.
_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre values whose pre-tokenizer we reproduce: True = split digits individually.
_PRE_TOKENIZERS = {
    "default": False,
    "gpt2": False,
    "smollm": True,
    "starcoder": True,
    "refact": True,
    "codeshell": True,
}


def load_hf_tokenizer(path):
    """The tokenizer of a HF model directory, from its own files (never downloads)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot load a tokenizer from local files ({err})") from err


def _pre_tokenizer(pre: str, path: Path):
    from tokenizers import pre_tokenizers

    if pre not in _PRE_TOKENIZERS:
        raise CheckpointError(
            f"{path}: GGUF tokenizer.ggml.pre={pre!r} is not supported "
            f"(supported: {sorted(_PRE_TOKENIZERS)})"
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if not _PRE_TOKENIZERS[pre]:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


def _post_processor(tokens: list[str], bos: int | None, eos: int | None):
    """Adds BOS/EOS around encoded text (None: nothing is added, which is also the default)."""
    from tokenizers import processors

    if bos is None and eos is None:
        return None
    prefix = [f"{tokens[bos]}:0"] if bos is not None else []
    suffix = [f"{tokens[eos]}:0"] if eos is not None else []
    specials = [(tokens[i], i) for i in (bos, eos) if i is not None]
    return processors.TemplateProcessing(
        single=" ".join([*prefix, "$A:0", *suffix]),
        pair=" ".join([*prefix, "$A:0", *suffix, "$B:1", *suffix]),
        special_tokens=list(dict.fromkeys(specials)),
    )


def tokenizer_from_gguf(metadata: dict, path):
    """A `PreTrainedTokenizerFast` rebuilt from GGUF `tokenizer.ggml.*` metadata (BPE only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{path}: GGUF tokenizer.ggml.model={kind!r} is not supported (supported: 'gpt2', "
            "byte-level BPE)"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(f"{path}: GGUF tokenizer.ggml.tokens or .merges is missing")
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(
            f"{path}: GGUF tokenizer.ggml.token_type has {len(types)} entries for "
            f"{len(tokens)} tokens"
        )
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise CheckpointError(
                f"{path}: GGUF tokenizer.ggml.merges[{i}]={merge!r} is not two tokens"
            )
        pairs.append(tuple(parts))

    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"), path)
    tok.decoder = decoders.ByteLevel()
    # Added tokens are matched whole before BPE runs, as llama.cpp does for them.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
    )

    def special(kind: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{kind}_token_id")
        return tokens[int(index)] if index is not None else None

    def added(kind: str, flag: str) -> int | None:
        index = metadata.get(f"tokenizer.ggml.{kind}_token_id")
        return int(index) if index is not None and metadata.get(flag, False) else None

    processor = _post_processor(
        tokens,
        added("bos", "tokenizer.ggml.add_bos_token"),
        added("eos", "tokenizer.ggml.add_eos_token"),
    )
    if processor is not None:
        tok.post_processor = processor
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special("bos"),
        eos_token=special("eos"),
        unk_token=special("unknown"),
        pad_token=special("padding"),
        clean_up_tokenization_spaces=False,
    )

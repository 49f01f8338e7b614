"""Tiny random Hugging Face models saved to disk: the PyTorch references of the parity tests."""

from pathlib import Path

import torch
from transformers import (
    GPTJConfig,
    GPTJForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
)

VOCAB = 97


def _save(model, path: Path, **save_kwargs) -> Path:
    model.save_pretrained(path, **save_kwargs)
    return path


def tiny_llama(
    path: Path, tie: bool = False, vocab: int = VOCAB, init_range: float = 0.02, **save_kwargs
):
    """GQA (4 query heads over 2 KV heads) with llama3 rope scaling; weights ~ N(0, init_range)
    (HF's default 0.02 leaves a tiny model's logits nearly flat)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        tie_word_embeddings=tie,
        initializer_range=init_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    return model, _save(model, path, **save_kwargs)


def tiny_gptj(path: Path, vocab: int = VOCAB, **save_kwargs):
    torch.manual_seed(0)
    config = GPTJConfig(
        vocab_size=vocab,
        n_positions=256,
        n_embd=64,
        n_layer=3,
        n_head=4,
        rotary_dim=8,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = GPTJForCausalLM(config).eval()
    return model, _save(model, path, **save_kwargs)


def tiny_phi(path: Path, vocab: int = VOCAB, **save_kwargs):
    torch.manual_seed(0)
    config = PhiConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        partial_rotary_factor=0.5,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = PhiForCausalLM(config).eval()
    return model, _save(model, path, **save_kwargs)


TINY_MODELS = {"llama": tiny_llama, "gptj": tiny_gptj, "phi": tiny_phi}

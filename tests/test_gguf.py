"""GGUF reading: a tiny random HF Llama, written as llama.cpp would, loads to the same logits.

The GGUF is made here with `gguf.GGUFWriter`: llama.cpp tensor names, Q/K rows permuted as
llama.cpp's converter does, float32 tensors, and a tiny byte-level BPE tokenizer in metadata.
"""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_tiny import tiny_llama
from tokenizers import pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

from meg_jax.checkpoints.errors import CheckpointError
from meg_jax.checkpoints.gguf_reader import (
    load_gguf_decoder,
    open_gguf,
    permute_qk,
    unpermute_qk,
)
from meg_jax.checkpoints.hosts import load_host
from meg_jax.checkpoints.tokenizer import tokenizer_from_gguf
from meg_jax.models.decoder import Decoder

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"]
# Every byte's character, then one token per merge result.
TOKENS = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet())
TOKENS += [m.replace(" ", "") for m in MERGES]

# HF name -> llama.cpp name, written out independently of the reader's own table.
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_hf_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(TOKENS),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def write_gguf(path, model, *, arch="llama", skip=(), pre="smollm", add_bos=False):
    """`model` as llama.cpp's converter would write it (float32, Q/K rows permuted)."""
    cfg = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(add_bos)
    tied = cfg.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp writes no output.weight for tied embeddings
        name = gguf_name(hf_name)
        if name in skip:
            continue
        array = tensor.numpy().astype(np.float32)
        if name.endswith("attn_q.weight"):
            array = permute_qk(array, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            array = permute_qk(array, cfg.num_key_value_heads)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_qk_permutation_round_trips():
    w = np.random.RandomState(0).randn(4 * 8, 5).astype(np.float32)
    permuted = permute_qk(w, 4)
    assert not np.array_equal(permuted, w)
    # Head 0's HF rows (0, 4) are the rotated pair; llama.cpp stores them adjacent.
    np.testing.assert_array_equal(permuted[:2], w[[0, 4]])
    np.testing.assert_array_equal(unpermute_qk(permuted, 4), w)


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_matches_hf_logits(tmp_path, tie):
    model = tiny_hf_llama(tie)
    path = write_gguf(tmp_path / "tiny.gguf", model)
    config, params, _ = load_gguf_decoder(path, neuron_layer=1)
    assert config.tie_embeddings == tie
    assert (config.n_kv_heads, config.bos_token_id, config.eos_token_ids) == (2, 1, (2,))
    tokens = np.random.RandomState(0).randint(3, len(TOKENS), (2, 12))
    mask = np.ones_like(tokens)
    mask[0, :4] = 0
    ours = Decoder(config).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask))
    with torch.no_grad():
        ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours)[0, 4:], ref[0, 4:], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ours)[1], ref[1], atol=1e-4, rtol=1e-4)


def test_gguf_tokenizer(tmp_path):
    metadata, _ = open_gguf(write_gguf(tmp_path / "t.gguf", tiny_hf_llama(False)))
    tok = tokenizer_from_gguf(metadata, tmp_path / "t.gguf")
    ids = tok("hello world")["input_ids"]  # no BOS: add_bos_token is False
    assert tok.convert_ids_to_tokens(ids) == ["hello", "Ġworld"]
    assert tok.decode(ids) == "hello world"
    # smollm splits digits one by one before BPE, so the "1 2" merge never applies ...
    assert tok.convert_ids_to_tokens(tok("x12")["input_ids"]) == ["x", "1", "2"]
    chat = tok("<|im_start|>hello\n<|im_end|>")["input_ids"]
    assert chat[0] == 1 and chat[-1] == 2 and tok.decode(chat) == "<|im_start|>hello\n<|im_end|>"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    # ... while plain GPT-2 pre-tokenisation keeps "12" whole; BOS is added when asked.
    metadata, _ = open_gguf(
        write_gguf(tmp_path / "g.gguf", tiny_hf_llama(False), pre="gpt2", add_bos=True)
    )
    tok = tokenizer_from_gguf(metadata, tmp_path / "g.gguf")
    assert tok.convert_ids_to_tokens(tok("x12")["input_ids"]) == ["<|im_start|>", "x", "12"]


def test_load_host_gguf_path(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf_llama(True))
    config, params, tok = load_host(path, neuron_layer=2)
    assert config.neuron_layer == 2 and "layers" in params
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"


def test_load_host_hf_dir(tmp_path):
    """A HF directory: weights through the HF reader, the directory's own tokenizer files."""
    gguf_path = write_gguf(tmp_path / "tok.gguf", tiny_hf_llama(False))
    _, directory = tiny_llama(tmp_path / "hf")
    tokenizer_from_gguf(open_gguf(gguf_path)[0], gguf_path).save_pretrained(directory)
    config, _, tok = load_host(directory)
    assert config.arch == "llama" and config.n_layers == 3
    assert tok.convert_ids_to_tokens(tok("hello world")["input_ids"]) == ["hello", "Ġworld"]


def test_wrong_architecture_is_refused(tmp_path):
    path = write_gguf(tmp_path / "neox.gguf", tiny_hf_llama(False), arch="gptneox")
    with pytest.raises(CheckpointError, match=r"neox\.gguf.*architecture='gptneox'"):
        load_gguf_decoder(path)


def test_missing_tensor_is_named(tmp_path):
    path = write_gguf(tmp_path / "gap.gguf", tiny_hf_llama(False), skip={"blk.1.ffn_up.weight"})
    with pytest.raises(CheckpointError, match=r"gap\.gguf: missing tensors \['blk\.1\.ffn_up"):
        load_gguf_decoder(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="junk.gguf"):
        load_gguf_decoder(path)
    with pytest.raises(CheckpointError, match="not a registered host"):
        load_host(tmp_path / "nowhere")

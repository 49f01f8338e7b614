"""The PyTorch side of the benchmarks: transformers' Llama holding exactly our SmolLM2 weights,
with the dynamic neuron attached the way the MeG reference patches its MLP."""

import contextlib

import common  # noqa: F401  (sets OMP_WAIT_POLICY before torch starts; puts the repo on sys.path)
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from meg_jax.checkpoints.convert import flatten_tree, transpose
from meg_jax.checkpoints.hf_decoder import decoder_rules
from meg_jax.models.config import LMConfig


def torch_llama(config: LMConfig, params) -> LlamaForCausalLM:
    """transformers' Llama holding exactly our weights (the HF key map run backwards)."""
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids),
        pad_token_id=config.pad_token_id,
    )
    flat = flatten_tree(params)
    state = {}
    for rule in decoder_rules(config):
        if rule.target not in flat:
            continue  # the untied head of a tied model
        value = np.asarray(flat[rule.target])
        invert = (lambda a: a.T) if rule.transform is transpose else (lambda a: a)
        layers = [(rule.source.format(i=i), value[i]) for i in range(config.n_layers)]
        for name, array in layers if rule.stacked else [(rule.source, value)]:
            state[name] = torch.from_numpy(np.array(invert(array)))  # a writable copy
    model = LlamaForCausalLM(hf_config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model


@contextlib.contextmanager
def neuron_attached(model: LlamaForCausalLM, layer: int, w_in, b_in: float, w_out):
    """Within the block, layer `layer`'s MLP also adds (x . w_in + b_in) * w_out at every
    position, x being the MLP's input: the identity-activation neuron (w_in, w_out [D])."""
    w_in, w_out = torch.as_tensor(np.asarray(w_in)), torch.as_tensor(np.asarray(w_out))

    def hook(module, inputs, output):
        x = inputs[0]
        return output + ((x @ w_in + float(b_in))[..., None] * w_out)

    handle = model.model.layers[layer].mlp.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()

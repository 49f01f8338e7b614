"""The dynamic neuron against HF models widened by one MLP unit, as the MeG reference builds them.

GPT-J / Phi-2 (METHOD.md §2.1): `fc_in` gets one more output row (+ bias), `fc_out` one more
input column; the unit uses the MLP's gelu_new. Llama: the reference's `PatchedLlamaMLP` computes
`down_proj(cat(act(gate(x)) * up(x), extra_proj(x)))`, a *linear* extra unit (config
`neuron_activation="identity"`). The references are built from the flat neuron vector by slicing
it in the reference's layout `[w_in (D), b_in (1, GPT-J/Phi only), w_out (D)]`, so the test also
pins `unflatten_neuron` to that layout.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_tiny import VOCAB, tiny_gptj, tiny_llama, tiny_phi

from meg_jax.checkpoints.hf_decoder import load_hf_decoder
from meg_jax.checkpoints.presets import lm_config
from meg_jax.models.decoder import Decoder
from meg_jax.models.neuron import (
    Neuron,
    flatten_neuron,
    neuron_vector_size,
    unflatten_neuron,
    zero_neuron,
)

LAYER = 1  # of 3: layers below and above the patched one exist
B, T = 3, 10


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, neuron):
    return Decoder(cfg).apply({"params": params}, tokens, None, None, neuron)


def _widened_linear(linear: torch.nn.Linear, row=None, bias=None, column=None) -> torch.nn.Linear:
    """A copy of `linear` with one more output `row` (and `bias` entry) or input `column`."""
    weight = linear.weight.detach()
    if row is not None:
        weight = torch.cat([weight, row[None]], dim=0)
    if column is not None:
        weight = torch.cat([weight, column[:, None]], dim=1)
    wide = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    with torch.no_grad():
        wide.weight.copy_(weight)
        if linear.bias is not None:
            b = linear.bias.detach()
            wide.bias.copy_(torch.cat([b, bias[None]]) if bias is not None else b)
    return wide


def _hf_patched(model, arch: str, flat: np.ndarray):
    """A copy of the HF model whose layer-`LAYER` MLP holds the flat neuron as one more unit."""
    model = copy.deepcopy(model)
    v = torch.tensor(flat, dtype=torch.float32)
    if arch in ("gptj", "phi"):
        d = (len(flat) - 1) // 2
        w_in, b_in, w_out = v[:d], v[d], v[d + 1 :]
        if arch == "gptj":
            mlp, names = model.transformer.h[LAYER].mlp, ("fc_in", "fc_out")
        else:
            mlp, names = model.model.layers[LAYER].mlp, ("fc1", "fc2")
        setattr(mlp, names[0], _widened_linear(getattr(mlp, names[0]), row=w_in, bias=b_in))
        setattr(mlp, names[1], _widened_linear(getattr(mlp, names[1]), column=w_out))
    else:
        d = len(flat) // 2
        w_in, w_out = v[:d], v[d:]
        mlp = model.model.layers[LAYER].mlp
        down = _widened_linear(mlp.down_proj, column=w_out)

        def forward(x, mlp=mlp, down=down, w_in=w_in):
            gated = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            return down(torch.cat([gated, (x @ w_in)[..., None]], dim=-1))

        mlp.forward = forward
    return model


TINY = {"gptj": tiny_gptj, "llama": tiny_llama, "phi": tiny_phi}


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    model, path = TINY[request.param](tmp_path_factory.mktemp(request.param))
    activation = "identity" if request.param == "llama" else "model"
    cfg, params = load_hf_decoder(path, neuron_layer=LAYER, neuron_activation=activation)
    tokens = np.random.RandomState(0).randint(3, VOCAB, (B, T)).astype(np.int32)
    return request.param, model, cfg, params, tokens


def _flat_neurons(cfg, seed: int = 2) -> np.ndarray:
    """[B, P] random neurons large enough to move the logits well beyond float noise."""
    size = neuron_vector_size(cfg.d_model, cfg.neuron_has_bias)
    return np.random.RandomState(seed).randn(B, size).astype(np.float32) * 0.5


def test_patched_model_equals_widened_hf_model_per_row(tiny):
    arch, model, cfg, params, tokens = tiny
    flat = _flat_neurons(cfg)
    ours = np.asarray(
        _forward(cfg, params, tokens, unflatten_neuron(flat, cfg.d_model, arch != "llama"))
    )
    with torch.no_grad():
        plain = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        for row in range(B):  # each row carries its own neuron
            ref = _hf_patched(model, arch, flat[row])(torch.tensor(tokens[row : row + 1])).logits
            np.testing.assert_allclose(ours[row], ref[0].numpy(), atol=1e-4, rtol=0)
    assert np.abs(ours - plain).max() > 0.1  # the neuron really changes the model


def test_zero_neuron_is_bit_identical_to_unpatched(tiny):
    _, _, cfg, params, tokens = tiny
    patched = _forward(cfg, params, tokens, zero_neuron(B, cfg.d_model))
    plain = _forward(cfg, params, tokens, None)
    assert np.array_equal(np.asarray(patched), np.asarray(plain))


@pytest.mark.parametrize("with_bias", [True, False])
def test_flatten_unflatten_round_trip(with_bias):
    d = 5
    flat = np.arange(3 * neuron_vector_size(d, with_bias), dtype=np.float32).reshape(3, -1)
    neuron = unflatten_neuron(jnp.asarray(flat), d, with_bias)
    # The reference layout, sliced by hand.
    np.testing.assert_array_equal(neuron.w_in, flat[:, :d])
    np.testing.assert_array_equal(neuron.w_out, flat[:, -d:])
    np.testing.assert_array_equal(neuron.b_in, flat[:, d] if with_bias else np.zeros(3))
    np.testing.assert_array_equal(flatten_neuron(neuron, with_bias), flat)
    single = unflatten_neuron(jnp.asarray(flat[1]), d, with_bias)
    assert single.w_in.shape == (d,) and single.b_in.shape == ()
    np.testing.assert_array_equal(single.w_out, flat[1, -d:])
    with pytest.raises(ValueError, match="expected"):
        unflatten_neuron(jnp.asarray(flat[:, 1:]), d, with_bias)


def test_neuron_round_trip_from_fields():
    rng = np.random.RandomState(0)
    neuron = Neuron(*(jnp.asarray(rng.randn(*s), jnp.float32) for s in ((2, 4), (2,), (2, 4))))
    again = unflatten_neuron(flatten_neuron(neuron, True), 4, True)
    for a, b in zip(again, neuron, strict=True):
        np.testing.assert_array_equal(a, b)
    assert neuron.batch_size == 2


@pytest.mark.parametrize(
    ("preset", "size"), [("gpt-j-6b", 8193), ("phi-2", 5121), ("llama-3-8b-instruct", 8192)]
)
def test_reference_vector_sizes(preset, size):
    """METHOD.md §2.1: the DiT's sequence length for each paper model."""
    cfg = lm_config(preset)
    assert neuron_vector_size(cfg.d_model, cfg.neuron_has_bias) == size
    assert zero_neuron(1, cfg.d_model).w_in.shape == (1, cfg.d_model)

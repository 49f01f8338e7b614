"""The 1-D DiT denoiser: shapes, conditioning, inits, dropout, dtype, full-size parameter count."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax.diffusion.config import DIT_PRESETS
from meg_jax.diffusion.dit import DiT1D, sincos_positions

TINY = dataclasses.replace(DIT_PRESETS["tiny"], patch_size=16, depth=1)  # 70 values: 5 tokens
B, P = 3, 70
KEY = jax.random.key(3)


def _inputs(width):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, P)), jnp.float32)
    t = jnp.asarray([0, 500, 999], jnp.int32)
    cond = jnp.asarray(rng.normal(size=(B, width)), jnp.float32)
    return x, t, cond


class _Jitted:
    """A DiT whose init and apply are jitted: eager op-by-op dispatch is far slower on CPU."""

    def __init__(self, config, channels=2):
        module = DiT1D(config, channels)
        self.init = jax.jit(module.init)
        self.apply = jax.jit(module.apply, static_argnames="train")


def _init(config, width, channels=2):
    model = _Jitted(config, channels)
    x, t, cond = _inputs(width)
    return model, model.init(jax.random.key(0), x, t, cond)["params"], (x, t, cond)


@pytest.fixture(scope="module")
def tiny():
    """(model, params, inputs) of the tiny DiT with a 24-d condition, compiled once."""
    return _init(TINY, 24)


def _count(params):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def test_output_shape_crop_and_condition_normalisation(tiny):
    model, params, (x, t, cond) = tiny
    out = model.apply({"params": params}, x, t, cond)
    assert out.shape == (B, 2, P) and out.dtype == jnp.float32
    assert params["patch_out"]["kernel"].shape == (TINY.hidden, 2 * TINY.patch_size)
    # The condition is L2-normalised first: its scale does not matter.
    np.testing.assert_allclose(model.apply({"params": params}, x, t, 5 * cond), out, atol=1e-5)
    # ...but its direction does, and so does the timestep.
    assert np.abs(model.apply({"params": params}, x, t, cond[::-1]) - out).max() > 1e-3
    assert np.abs(model.apply({"params": params}, x, t[::-1], cond) - out).max() > 1e-3


def test_cond_scale_multiplies_the_normalised_condition(tiny):
    model, params, (x, t, cond) = tiny
    scaled = _Jitted(dataclasses.replace(TINY, cond_scale=4.0))
    out = scaled.apply({"params": params}, x, t, cond)
    # The same as the unscaled network with a 4x projection kernel (the bias is not scaled).
    proj = params["cond_proj"]
    bigger = {**params, "cond_proj": {**proj, "kernel": 4.0 * proj["kernel"]}}
    np.testing.assert_allclose(out, model.apply({"params": bigger}, x, t, cond), atol=1e-5)
    assert np.abs(out - model.apply({"params": params}, x, t, cond)).max() > 1e-3


def test_condition_tokens_add_the_scaled_condition_to_every_token(tiny):
    plain, plain_params, (x, t, cond) = tiny
    assert "cond_tokens" not in plain_params  # off by default (the reference)
    model, params, _ = _init(dataclasses.replace(TINY, cond_tokens=True), 24)
    assert params["cond_tokens"]["kernel"].shape == (24, TINY.hidden)
    out = model.apply({"params": params}, x, t, cond)
    # The same normalised, scaled condition: its length still does not matter.
    np.testing.assert_allclose(model.apply({"params": params}, x, t, 5 * cond), out, atol=1e-5)
    # With the token projection zeroed it is the network without it, parameter for parameter...
    zeroed = {**params, "cond_tokens": jax.tree.map(jnp.zeros_like, params["cond_tokens"])}
    rest = {k: v for k, v in params.items() if k != "cond_tokens"}
    without = plain.apply({"params": rest}, x, t, cond)
    np.testing.assert_allclose(model.apply({"params": zeroed}, x, t, cond), without, atol=1e-6)
    # ...and otherwise the token stream carries the condition.
    assert np.abs(out - without).max() > 1e-3


def test_condition_projection_only_when_widths_differ():
    for width in (TINY.hidden, 24):
        x, t, cond = _inputs(width)
        params = jax.eval_shape(DiT1D(TINY, 2).init, jax.random.key(0), x, t, cond)["params"]
        if width == TINY.hidden:
            assert "cond_proj" not in params
        else:
            assert params["cond_proj"]["kernel"].shape == (24, TINY.hidden)


def test_reference_init_is_pytorch_linear_default_and_adaln_zero_starts_at_zero(tiny):
    model, params, inputs = tiny
    for layer in (params["block0"]["attn"]["qkv"], params["block0"]["fc2"], params["patch_in"]):
        bound = 1 / np.sqrt(layer["kernel"].shape[0])
        for leaf in (layer["kernel"], layer["bias"]):
            assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.8 * bound
    assert np.abs(model.apply({"params": params}, *inputs)).max() > 1e-2
    zero_cfg = dataclasses.replace(TINY, adaln_zero=True)
    zero_model, zero_params, inputs = _init(zero_cfg, 24)
    np.testing.assert_array_equal(zero_model.apply({"params": zero_params}, *inputs), 0.0)
    assert np.all(np.asarray(zero_params["block0"]["adaLN"]["kernel"]) == 0)


def test_condition_dropout_only_in_training(tiny):
    _, params, inputs = tiny
    model = _Jitted(dataclasses.replace(TINY, cond_dropout=0.5))
    eval_out = model.apply({"params": params}, *inputs)
    np.testing.assert_array_equal(model.apply({"params": params}, *inputs), eval_out)
    train = [
        model.apply({"params": params}, *inputs, train=True, rngs={"dropout": jax.random.key(i)})
        for i in range(2)
    ]
    assert np.abs(train[0] - eval_out).max() > 1e-3
    assert np.abs(train[0] - train[1]).max() > 1e-3


def test_condition_noise_only_in_training_and_sized_by_cond_noise(tiny):
    _, params, inputs = tiny
    no_dropout = dataclasses.replace(TINY, cond_dropout=0.0)
    clean = _Jitted(no_dropout).apply({"params": params}, *inputs)

    def train_out(noise, key=KEY):
        model = _Jitted(dataclasses.replace(no_dropout, cond_noise=noise))
        eval_out = model.apply({"params": params}, *inputs)
        np.testing.assert_array_equal(eval_out, clean)  # sampling never sees the noise
        return model.apply({"params": params}, *inputs, train=True, rngs={"dropout": key})

    np.testing.assert_allclose(train_out(1e-6), clean, atol=1e-5)
    moved = [np.abs(train_out(noise) - clean).max() for noise in (0.05, 0.5)]
    assert 1e-4 < moved[0] < moved[1]
    assert np.abs(train_out(0.5) - train_out(0.5, jax.random.key(1))).max() > 1e-4
    # The step is a direction change only: a 5x longer condition gets the same noisy output.
    x, t, cond = inputs
    noisy = _Jitted(dataclasses.replace(no_dropout, cond_noise=0.5))
    np.testing.assert_allclose(
        noisy.apply({"params": params}, x, t, 5 * cond, train=True, rngs={"dropout": KEY}),
        train_out(0.5),
        atol=1e-5,
    )


def test_bfloat16_compute_keeps_float32_params_and_close_outputs(tiny):
    model, params, inputs = tiny
    bf16 = _Jitted(dataclasses.replace(TINY, compute_dtype="bfloat16"))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    ref = np.asarray(model.apply({"params": params}, *inputs))
    low = np.asarray(bf16.apply({"params": params}, *inputs))
    assert low.dtype == np.float32
    assert np.abs(low - ref).max() < 0.05 * np.abs(ref).max()


def test_sincos_positions_formula():
    pos = sincos_positions(4, 6)
    omega = 1 / 10000 ** (np.arange(3) / 3)
    np.testing.assert_allclose(pos[2], np.concatenate([np.sin(2 * omega), np.cos(2 * omega)]))
    with pytest.raises(ValueError, match="even"):
        sincos_positions(4, 5)


def test_dit_b_parameter_count_at_full_size():
    # GPT-J's neuron (8193 values, 82 tokens) with a 768-d BERT condition: no projection.
    cfg = DIT_PRESETS["DiT-B"]
    model = DiT1D(cfg, 2)
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((2, 8193), jnp.float32),
        jax.ShapeDtypeStruct((2,), jnp.int32),
        jax.ShapeDtypeStruct((2, 768), jnp.float32),
    )["params"]
    d, s, f = cfg.hidden, cfg.patch_size, cfg.frequency_dim
    per_block = (d * 6 * d + 6 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d)
    per_block += 4 * d * d + d
    expected = (s * d + d) + (f * d + d + d * d + d) + cfg.depth * per_block
    expected += (d * 2 * d + 2 * d) + (d * 2 * s + 2 * s)
    assert _count(shapes) == expected
    assert 125e6 < expected < 135e6  # METHOD.md: DiT-B, about 131M parameters

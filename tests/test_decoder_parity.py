"""Our decoders against tiny random HF PyTorch models: logits, padding, split runs, dtypes.

One batch holds a left-padded, a right-padded and an unpadded row, so both padding sides are
checked by the same compiled forward. HF gets explicit position ids that count only real tokens
(what HF `generate` does and what our default positions are); logits are compared only at real
tokens, since what a pad position outputs is irrelevant.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_tiny import VOCAB, tiny_gptj, tiny_llama, tiny_phi

from meg_jax.checkpoints.hf_decoder import load_hf_decoder
from meg_jax.models.decoder import Decoder
from meg_jax.models.neuron import Neuron

T = 12
LEFT_PADS, RIGHT_PADS = 4, 3

TINY = {"llama": tiny_llama, "gptj": tiny_gptj, "phi": tiny_phi}  # llama: GQA + llama3 rope


def _batch():
    tokens = np.random.RandomState(0).randint(3, VOCAB, (3, T)).astype(np.int32)
    mask = np.ones((3, T), bool)
    mask[0, :LEFT_PADS] = False
    mask[1, T - RIGHT_PADS :] = False
    tokens[~mask] = 0
    return tokens, mask


def _hf_logits(model, tokens, mask) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


def _random_neuron(cfg, batch: int, scale: float = 1.0) -> Neuron:
    rng = np.random.RandomState(1)
    d = cfg.d_model
    w_in, b_in, w_out = rng.randn(batch, d), rng.randn(batch), rng.randn(batch, d)
    parts = (w_in * scale / np.sqrt(d), b_in * scale, w_out * scale)
    return Neuron(*(jnp.asarray(p, jnp.float32) for p in parts))


@functools.partial(jax.jit, static_argnums=0)
def _forwards(cfg, params, tokens, mask, neuron):
    """Everything one float32 model is checked on, in one compiled program (compiles dominate
    the test time): plain logits, patched logits, and the patched model run in two pieces split
    at the neuron layer."""
    model = Decoder(cfg)
    p = {"params": params}
    plain = model.apply(p, tokens, mask)
    patched = model.apply(p, tokens, mask, None, neuron)
    hidden = model.apply(p, tokens, mask, method=Decoder.hidden_before)
    split = model.apply(p, hidden, mask, None, neuron, method=Decoder.logits_from)
    return {"plain": plain, "patched": patched, "hidden": hidden, "split": split}


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    """(model dir, HF logits, our float32 outputs) for one tiny model."""
    model, path = TINY[request.param](tmp_path_factory.mktemp(request.param))
    cfg, params = load_hf_decoder(path, neuron_layer=1)
    tokens, mask = _batch()
    ours = _forwards(cfg, params, tokens, mask, _random_neuron(cfg, len(tokens)))
    ours = {k: np.asarray(v) for k, v in ours.items()}
    return path, _hf_logits(model, tokens, mask), ours


def test_logits_match_hf_with_left_and_right_padding(tiny):
    _, ref, ours = tiny
    _, mask = _batch()
    assert ours["plain"].shape == (3, T, VOCAB) and ours["plain"].dtype == np.float32
    # Float32 everywhere: differences are summation order only.
    np.testing.assert_allclose(ours["plain"][mask], ref[mask], atol=1e-4, rtol=0)


def test_tied_embeddings_match_hf(tmp_path):
    model, path = tiny_llama(tmp_path, tie=True)
    cfg, params = load_hf_decoder(path, neuron_layer=1)
    assert cfg.tie_embeddings and "lm_head" not in params
    tokens, mask = _batch()
    ours = jax.jit(Decoder(cfg).apply)({"params": params}, tokens, mask)
    ref = _hf_logits(model, tokens, mask)
    np.testing.assert_allclose(np.asarray(ours)[mask], ref[mask], atol=1e-4, rtol=0)


def test_split_execution_equals_full_forward(tiny):
    _, ref, ours = tiny
    _, mask = _batch()
    assert ours["hidden"].shape == (3, T, 64)
    np.testing.assert_allclose(ours["split"][mask], ours["patched"][mask], atol=1e-5)
    # The neuron is live, so the first comparison is not between two unpatched models.
    assert np.abs(ours["patched"][mask] - ref[mask]).max() > 1e-2


@functools.partial(jax.jit, static_argnums=(0, 2))
def _half_forwards(cfg_bf16, params_bf16, cfg_f16, params_f16, tokens, mask):
    """bfloat16 and float16 logits, in one compiled program."""
    return (
        Decoder(cfg_bf16).apply({"params": params_bf16}, tokens, mask),
        Decoder(cfg_f16).apply({"params": params_f16}, tokens, mask),
    )


def test_half_precision_stays_close_to_float32(tiny):
    path, ref, _ = tiny
    loaded = [load_hf_decoder(path, neuron_layer=1, dtype=d) for d in ("bfloat16", "float16")]
    for (cfg, params), dtype in zip(loaded, (jnp.bfloat16, jnp.float16), strict=True):
        assert cfg.jnp_dtype == dtype
        assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(params))
    tokens, mask = _batch()
    outputs = _half_forwards(*loaded[0], *loaded[1], tokens, mask)
    # Random tiny models have logits of order 0.5; bfloat16 keeps 8 mantissa bits, float16 11.
    for logits, dtype, rel in zip(outputs, (jnp.bfloat16, jnp.float16), (0.05, 0.01), strict=True):
        assert logits.dtype == dtype
        ours = np.asarray(logits.astype(jnp.float32))[mask]
        assert np.isfinite(ours).all()
        np.testing.assert_allclose(ours, ref[mask], atol=rel * np.abs(ref[mask]).max(), rtol=0)

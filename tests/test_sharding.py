"""Sharded loading and forward on 8 fake CPU devices, partition-rule errors, and no recompiles.

The multi-device run needs its own process (XLA fixes the device count at start-up), so it
loads the tiny checkpoints written here, runs a (data=2 x model=4) forward and prints JSON; the
test compares that with the ordinary single-device forward of this process.
"""

import functools
import json

import chex
import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_with_fake_devices

import meg_jax.models.generate as generate_module
from meg_jax.checkpoints.hf_decoder import abstract_decoder_params, load_hf_decoder
from meg_jax.infra.sharding import DECODER_RULES, match_partition_rules
from meg_jax.models.config import LMConfig
from meg_jax.models.decoder import Decoder
from meg_jax.models.generate import greedy_generate, left_pad

# The "model" axis splits the vocabulary, so it must divide it (hf_tiny's 97 does not).
VOCAB = 128
B, T = 4, 8

_SHARDED_RUN = """
import json, sys
import jax, numpy as np
from meg_jax.checkpoints.hf_decoder import abstract_decoder_params, load_hf_decoder
from meg_jax.models.decoder import Decoder
from meg_jax.infra.sharding import DECODER_RULES, make_mesh, param_shardings, shard_batch

mesh = make_mesh(data=2, model=4)
tokens = np.asarray({tokens})
mask = np.asarray({mask}, bool)
result = {{"n_devices": jax.device_count()}}
for name, path in {dirs}.items():
    cfg, params = load_hf_decoder(
        path, shardings_fn=lambda cfg, abstract: param_shardings(mesh, DECODER_RULES, abstract)
    )
    x, m = shard_batch(mesh, (tokens, mask))
    logits = jax.jit(Decoder(cfg).apply)({{"params": params}}, x, m)
    kernel = params["layers"]["mlp"]["fc_in" if cfg.arch == "gptj" else "up"]["kernel"]
    result[name] = {{
        "logits": np.asarray(logits).tolist(),
        "kernel_spec": [str(axis) for axis in kernel.sharding.spec],
        "kernel_shards": sorted({{tuple(s.data.shape) for s in kernel.addressable_shards}}),
        "n_kernel_shards": len(kernel.addressable_shards),
        "embed_shards": sorted(
            {{tuple(s.data.shape) for s in params["embed"]["embedding"].addressable_shards}}
        ),
        "tokens_shards": sorted({{tuple(s.data.shape) for s in x.addressable_shards}}),
    }}
print(json.dumps(result))
"""


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, mask):
    return Decoder(cfg).apply({"params": params}, tokens, mask)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    llama = hf_tiny.tiny_llama(root / "llama", vocab=VOCAB)[1]
    gptj = hf_tiny.tiny_gptj(root / "gptj", vocab=VOCAB)[1]
    return {"llama": str(llama), "gptj": str(gptj)}


def test_sharded_forward_equals_single_device(tiny_dirs):
    tokens = np.random.RandomState(0).randint(3, VOCAB, (B, T))
    mask = np.ones((B, T), bool)
    mask[1, :3] = False  # one left-padded row
    code = _SHARDED_RUN.format(tokens=tokens.tolist(), mask=mask.tolist(), dirs=tiny_dirs)
    result = json.loads(run_with_fake_devices(code, n_devices=8).strip().splitlines()[-1])
    assert result["n_devices"] == 8

    for name, path in tiny_dirs.items():
        cfg, params = load_hf_decoder(path)
        single = np.asarray(_forward(cfg, params, tokens, mask))
        sharded = result[name]
        np.testing.assert_allclose(np.asarray(sharded["logits"]), single, atol=1e-5, rtol=0)
        # The MLP input kernel [L, D, F] is split over its F axis into 4 model shards, and
        # replicated over the 2 data rows of the mesh: 8 shards of [L, D, F / 4].
        layers, d, f = params["layers"]["mlp"]["fc_in" if name == "gptj" else "up"]["kernel"].shape
        assert sharded["kernel_spec"] == ["None", "None", "model"]
        assert sharded["kernel_shards"] == [[layers, d, f // 4]]
        assert sharded["n_kernel_shards"] == 8
        assert sharded["embed_shards"] == [[VOCAB, cfg.d_model // 4]]
        assert sharded["tokens_shards"] == [[B // 2, T]]


def test_unmatched_parameter_raises():
    abstract = {
        "embed": {"embedding": jax.ShapeDtypeStruct((8, 4), jnp.float32)},
        "layers": {"mlp": {"extra_proj": {"kernel": jax.ShapeDtypeStruct((2, 4, 1), jnp.float32)}}},
    }
    with pytest.raises(ValueError, match="layers/mlp/extra_proj/kernel.*matches no partition rule"):
        match_partition_rules(DECODER_RULES, abstract)
    # A rule of higher rank than its parameter is an error too, not a silent broadcast.
    with pytest.raises(ValueError, match="rank"):
        match_partition_rules(
            DECODER_RULES, {"lm_head": {"bias": jax.ShapeDtypeStruct((), jnp.float32)}}
        )


def test_repeated_generation_does_not_retrace(monkeypatch):
    """`default_positions` runs once per trace of `greedy_generate`, on a traced mask; chex
    allows it one trace, so any retrace (a recompile) of the calls below fails the test."""
    cfg = LMConfig(
        arch="llama",
        vocab_size=32,
        d_model=16,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        head_dim=8,
        d_ff=32,
        norm_eps=1e-5,
        rotary_dim=8,
        neuron_layer=1,
    )
    # Random values in the abstract shapes: `Decoder.init` would spend seconds compiling the
    # PRNG, and the values do not matter here.
    rng = np.random.RandomState(0)
    params = jax.tree.map(
        lambda leaf: jnp.asarray(rng.randn(*leaf.shape) * 0.1, leaf.dtype),
        abstract_decoder_params(cfg),
    )
    monkeypatch.setattr(
        generate_module,
        "default_positions",
        chex.assert_max_traces(generate_module.default_positions, n=1),
    )
    for _ in range(3):
        # New prompt contents, a new-but-equal config and fresh parameter buffers each time.
        prompts = [list(rng.randint(1, 32, n)) for n in (3, 5)]
        tokens, mask = left_pad(prompts, pad_id=0)
        fresh = jax.tree.map(jnp.array, params)
        out = greedy_generate(cfg.replace(), fresh, tokens, mask, max_new_tokens=3, stop_ids=(1,))
        assert out.shape == (2, 3)
    # The guard does catch a retrace: a longer prompt bucket is a new shape.
    tokens, mask = left_pad([[2] * 9], pad_id=0)
    with pytest.raises(AssertionError, match="traced"):
        greedy_generate(cfg, params, tokens, mask, max_new_tokens=3, stop_ids=(1,))

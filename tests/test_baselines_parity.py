"""MEMIT and AlphaEdit updates against PyTorch computations of the same formulas, on tiny random
Hugging Face Llama and GPT-J models; FT-L's L-infinity constraint.

The PyTorch side reads keys with a forward hook on the MLP output projection and residuals from
`output_hidden_states`, row by row without padding, so it shares no code with ours.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_tiny import VOCAB, tiny_llama
from transformers import GPTJConfig, GPTJForCausalLM

from meg_jax.baselines.alphaedit import AlphaEditConfig, alphaedit, null_space_projector
from meg_jax.baselines.edited_host import (
    EditRows,
    out_kernel,
    scored_logprobs,
    stream_before,
    suffix_logprobs,
    suffix_rows,
)
from meg_jax.baselines.ft import FTConfig, fine_tune
from meg_jax.baselines.memit import MemitConfig, TargetConfig, memit, optimize_targets
from meg_jax.baselines.stats import accumulate
from meg_jax.checkpoints.hf_decoder import load_hf_decoder

LAYERS = (0, 1)
N_EDITS, N_CONTEXTS = 4, 2


def _out_module(model, arch, layer):
    if arch == "llama":
        return model.model.layers[layer].mlp.down_proj
    return model.transformer.h[layer].mlp.fc_out


def _rows(seed: int = 0):
    """Scored rows: per edit N_CONTEXTS rows (the first the bare prompt), random tokens."""
    rng = np.random.default_rng(seed)
    ids, owner, pos, start = [], [], [], []
    bare = []
    for e in range(N_EDITS):
        prompt = rng.integers(3, VOCAB, size=int(rng.integers(4, 8))).tolist()
        subject = int(rng.integers(1, len(prompt)))
        target = rng.integers(3, VOCAB, size=2).tolist()
        for c in range(N_CONTEXTS):
            context = rng.integers(3, VOCAB, size=3 * c).tolist()
            ids.append(tuple(context + prompt + target))
            owner.append(e)
            pos.append(len(context) + subject)
            start.append(len(context) + len(prompt))
        bare.append(len(ids) - N_CONTEXTS)
    rows = EditRows(tuple(ids), tuple(owner), tuple(pos), tuple(start))
    return rows, rows.select(bare)


def _torch_keys(model, arch, rows, layer):
    keys = np.zeros((N_EDITS, model.config.intermediate_size if arch == "llama" else 4 * 64))
    count = np.zeros(N_EDITS)
    seen = {}
    hook = _out_module(model, arch, layer).register_forward_hook(
        lambda m, inputs, out: seen.__setitem__("k", inputs[0])
    )
    with torch.no_grad():
        for ids, e, p in zip(rows.ids, rows.owner, rows.pos, strict=True):
            model(torch.tensor([ids]))
            keys[e] += seen["k"][0, p].double().numpy()
            count[e] += 1
    hook.remove()
    return keys / count[:, None]


def _torch_resid(model, rows, layer):
    out = []
    with torch.no_grad():
        for ids, p in zip(rows.ids, rows.pos, strict=True):
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            out.append(hidden[layer + 1][0, p].double().numpy())
    return np.stack(out)


def _torch_moment(model, arch, sequences, layer):
    total, count, seen = 0.0, 0, {}
    hook = _out_module(model, arch, layer).register_forward_hook(
        lambda m, inputs, out: seen.__setitem__("k", inputs[0])
    )
    with torch.no_grad():
        for ids in sequences:
            model(torch.tensor([ids]))
            k = seen["k"][0].double()
            total = total + k.T @ k
            count += k.shape[0]
    hook.remove()
    return (total / count).numpy()


def _torch_update(model, arch, rows, bare, zs, solve):
    """The multi-layer spread with the model edited in place, layer after layer."""
    for i, layer in enumerate(LAYERS):
        keys = _torch_keys(model, arch, rows, layer)
        resid = (zs - _torch_resid(model, bare, LAYERS[-1])) / (len(LAYERS) - i)
        k, r = torch.tensor(keys), torch.tensor(resid)
        delta = solve(layer, k, r)  # [F, D] float64
        weight = _out_module(model, arch, layer).weight  # torch layout [D, F]
        with torch.no_grad():
            weight += delta.T.to(weight.dtype)


def _tiny_gptj4(path):
    """hf_tiny's GPT-J with a fourth layer: GPT-J's layer-0 keys depend on the token alone (no
    attention before its MLP), so over a 97-token vocabulary their moment is singular; the
    test edits layers 1 and 2 and still reads a residual that is not the last (ln_f-normed)."""
    torch.manual_seed(0)
    config = GPTJConfig(
        vocab_size=VOCAB,
        n_positions=256,
        n_embd=64,
        n_layer=4,
        n_head=4,
        rotary_dim=8,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = GPTJForCausalLM(config).eval()
    model.save_pretrained(path)
    return model, path


def _setup(tmp_path, arch):
    global LAYERS
    LAYERS = {"llama": (0, 1), "gptj": (1, 2)}[arch]
    make = {"llama": tiny_llama, "gptj": _tiny_gptj4}[arch]
    model, path = make(tmp_path)
    config, params = load_hf_decoder(path)
    rows, bare = _rows()
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 30, 60)
    # Every batch of 5 or 8 (the statistics' batch sizes below) holds one sequence of the
    # longest length, 29, so each pads to one width: one compiled moment program per batch
    # size instead of one per batch's longest sequence, with padding in every batch still.
    lengths[(np.arange(60) % 5 == 0) | (np.arange(60) % 8 == 0)] = 29
    sequences = [tuple(rng.integers(3, VOCAB, size=int(n)).tolist()) for n in lengths]
    return model, config, params, rows, bare, sequences


def _targets(config, params, bare):
    from meg_jax.baselines.edited_host import residual_at

    h = residual_at(config, params, bare, LAYERS[-1])
    return (
        h + np.random.default_rng(2).normal(size=h.shape) * np.linalg.norm(h, axis=1)[:, None] * 0.3
    )


@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_key_moments_match_torch(tmp_path, arch):
    model, config, params, _, _, sequences = _setup(tmp_path, arch)
    state = accumulate(config, params, sequences, LAYERS, batch_size=5)
    for i, layer in enumerate(LAYERS):
        ours = state["sum"][i] / state["count"]
        np.testing.assert_allclose(
            ours, _torch_moment(model, arch, sequences, layer), rtol=2e-4, atol=1e-6
        )


@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_memit_update_matches_torch(tmp_path, arch):
    model, config, params, rows, bare, sequences = _setup(tmp_path, arch)
    state = accumulate(config, params, sequences, LAYERS, batch_size=8)
    moments = {layer: state["sum"][i] / state["count"] for i, layer in enumerate(LAYERS)}
    zs = _targets(config, params, bare)
    cfg = MemitConfig(layers=LAYERS, mom2_update_weight=3.0)
    edited, info = memit(config, params, rows, bare, zs, moments, cfg)

    def solve(layer, k, r):
        lhs = cfg.mom2_update_weight * torch.tensor(moments[layer]) + k.T @ k
        return torch.linalg.solve(lhs, k.T @ r)

    _torch_update(model, arch, rows, bare, zs, solve)
    for layer in LAYERS:
        theirs = _out_module(model, arch, layer).weight.detach().numpy().T
        before = np.asarray(out_kernel(params, config, layer))
        assert np.abs(theirs - before).max() > 1e-3  # the update is not trivially zero
        np.testing.assert_allclose(
            np.asarray(out_kernel(edited, config, layer)), theirs, rtol=1e-4, atol=2e-5
        )


@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_alphaedit_sequential_matches_torch(tmp_path, arch):
    model, config, params, rows, bare, sequences = _setup(tmp_path, arch)
    state = accumulate(config, params, sequences, LAYERS, batch_size=8)
    moments = {layer: state["sum"][i] / state["count"] for i, layer in enumerate(LAYERS)}
    # A threshold in the widest gap of the lower half of the spectrum, so rounding cannot move
    # an eigenvalue across it.
    threshold = {}
    for layer, m in moments.items():
        values = np.sort(np.linalg.eigvalsh(m))
        half = values[: len(values) // 2 + 1]
        gap = int(np.argmax(np.diff(np.log(np.maximum(half, 1e-12)))))
        threshold[layer] = float(np.sqrt(max(half[gap], 1e-12) * half[gap + 1]))
    cfg = AlphaEditConfig(l2=0.5)
    memit_cfg = MemitConfig(layers=LAYERS)
    projectors = {layer: null_space_projector(moments[layer], threshold[layer]) for layer in LAYERS}
    caches = {layer: np.zeros_like(moments[layer]) for layer in LAYERS}
    zs = _targets(config, params, bare)
    # Two sequential batches: the same requests twice, the second seeing the first's keys.
    edited, caches, _ = alphaedit(
        config, params, rows, bare, zs, projectors, caches, memit_cfg, cfg
    )
    edited, caches, _ = alphaedit(
        config, edited, rows, bare, zs, projectors, caches, memit_cfg, cfg
    )

    torch_cache = {
        layer: torch.zeros(moments[layer].shape, dtype=torch.float64) for layer in LAYERS
    }
    torch_p = {}
    for layer in LAYERS:
        u, s, _ = torch.linalg.svd(torch.tensor(moments[layer]))
        small = u[:, s < threshold[layer]]
        torch_p[layer] = small @ small.T
        assert 0 < small.shape[1] < u.shape[0]  # a proper null space

    def solve(layer, k, r):
        p = torch_p[layer]
        lhs = p @ (k.T @ k + torch_cache[layer]) + cfg.l2 * torch.eye(p.shape[0], dtype=p.dtype)
        return torch.linalg.solve(lhs, p @ k.T @ r)

    for _ in range(2):
        _torch_update(model, arch, rows, bare, zs, solve)
        for layer in LAYERS:
            k = torch.tensor(_torch_keys(model, arch, rows, layer))
            torch_cache[layer] += k.T @ k
    for layer in LAYERS:
        theirs = _out_module(model, arch, layer).weight.detach().numpy().T
        np.testing.assert_allclose(
            np.asarray(out_kernel(edited, config, layer)), theirs, rtol=1e-4, atol=2e-5
        )
        np.testing.assert_allclose(caches[layer], torch_cache[layer].numpy(), rtol=1e-4, atol=1e-6)


def test_alphaedit_update_leaves_null_space_keys_unchanged():
    """The projected update maps every key in the preserved subspace to zero: W K0 unchanged."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    values = np.array([5.0] * 6 + [1e-4] * 6)
    moment = basis @ np.diag(values) @ basis.T
    p = null_space_projector(moment, 1e-2)
    from meg_jax.baselines.alphaedit import alphaedit_delta

    delta = alphaedit_delta(rng.normal(size=(3, 12)), rng.normal(size=(3, 5)), p, 0 * moment, 1.0)
    preserved = basis[:, :6]  # the directions ordinary keys span
    np.testing.assert_allclose(preserved.T @ delta, 0, atol=1e-10)


def test_ft_respects_the_linf_bound_and_lowers_the_loss(tmp_path):
    _, config, params, rows, _, _ = _setup(tmp_path, "llama")
    bound = 1e-3
    edited, info = fine_tune(
        config,
        params,
        rows,
        FTConfig(layer=1, lr=1e-2, steps=5, norm_constraint=bound, batch_size=3),
    )
    change = np.asarray(out_kernel(edited, config, 1)) - np.asarray(out_kernel(params, config, 1))
    assert np.abs(change).max() <= bound * (1 + 1e-5)
    assert np.abs(change).max() >= bound * 0.5  # it moved (to the box's edge, at this lr)
    _, loose = fine_tune(
        config,
        params,
        rows,
        FTConfig(layer=1, lr=1e-2, steps=5, norm_constraint=10.0, batch_size=3),
    )
    _, first = fine_tune(
        config,
        params,
        rows,
        FTConfig(layer=1, lr=1e-2, steps=1, norm_constraint=10.0, batch_size=3),
    )
    assert loose["train_nll_last_epoch"] < first["train_nll_last_epoch"]


@pytest.mark.parametrize("arch", ["llama", "gptj"])
@pytest.mark.parametrize("neuron_layer", [0, 2])
def test_suffix_logprobs_equal_the_whole_rows(tmp_path, arch, neuron_layer):
    """Target fitting runs only the slots from the changed one on, against cached keys and
    values of the earlier ones; log-probs and their gradient equal those of the whole rows with
    the change added (every start layer, the neuron layer's segment split below, at or above)."""
    _, config, params, _, _, _ = _setup(tmp_path, arch)
    config = dataclasses.replace(config, neuron_layer=neuron_layer)
    rng = np.random.default_rng(3)
    shared = rng.integers(3, VOCAB, size=10).tolist()  # slots [0, 8) are cached
    ids, pos, start = [], [], []
    for length in (4, 7, 5):
        prompt = shared + rng.integers(3, VOCAB, size=length).tolist()
        ids.append(tuple(prompt + rng.integers(3, VOCAB, size=2).tolist()))
        pos.append(int(rng.integers(len(shared), len(prompt))))
        start.append(len(prompt))
    rows = EditRows(tuple(ids), (0, 1, 2), tuple(pos), tuple(start))
    tokens, mask = rows.padded(config.pad_token_id)
    positions, labels, _ = rows.scored(tokens.shape[1])
    add = jnp.asarray(rng.normal(size=(3, config.d_model)), jnp.float32)
    for layer in range(config.n_layers):
        h0 = stream_before(config, params, tokens, mask, layer)
        onehot = jax.nn.one_hot(jnp.asarray(pos), tokens.shape[1])[..., None]

        def whole(a, h0=h0, onehot=onehot, layer=layer):
            lp, _ = scored_logprobs(
                config,
                params,
                h0 + onehot * a[:, None],
                mask,
                layer,
                jnp.asarray(positions),
                jnp.asarray(labels),
            )
            return jnp.sum(lp), lp

        suffix = suffix_rows(config, params, tokens, mask, np.asarray(pos), positions, layer)
        assert int(suffix.split) == 8

        def cut(a, suffix=suffix, layer=layer):
            lp, _ = suffix_logprobs(config, params, suffix, a, jnp.asarray(labels), layer)
            return jnp.sum(lp), lp

        # Compiled (a program per start layer) rather than run op by op: the same functions.
        (_, want), grad_want = jax.jit(jax.value_and_grad(whole, has_aux=True))(add)
        (_, got), grad_got = jax.jit(jax.value_and_grad(cut, has_aux=True))(add)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grad_got, grad_want, rtol=1e-4, atol=1e-6)


def test_target_deltas_respect_the_clamp(tmp_path):
    """Every fitted delta stays within clamp_norm_factor * ||h|| (a random tiny model's logits
    hardly depend on its residual, so the loss itself is checked on SmolLM2, in
    test_baselines_smollm2.py)."""
    _, config, params, rows, bare, _ = _setup(tmp_path, "gptj")
    cfg = TargetConfig(lr=0.5, steps=5, kl_factor=0.0, weight_decay=0.0, clamp_norm_factor=0.3)
    zs, _ = optimize_targets(config, params, rows, None, N_EDITS, LAYERS[-1], cfg)
    from meg_jax.baselines.edited_host import residual_at

    h = residual_at(config, params, bare, LAYERS[-1])
    norms = np.linalg.norm(zs - h, axis=1) / np.linalg.norm(h, axis=1)
    np.testing.assert_allclose(norms, 0.3, rtol=1e-4)  # lr 0.5 runs into the clamp


def test_targets_are_cached_for_the_same_rows_only(tmp_path):
    """MEMIT's and AlphaEdit's first batch fit the same targets: `fitted_targets` writes them
    once, reads them back for the same host tag, layer, settings and rows, and fits again when
    any of these differ or no cache is given."""
    from meg_jax.baselines.run import fitted_targets

    _, config, params, rows, _, _ = _setup(tmp_path, "gptj")
    cfg = TargetConfig(lr=0.5, steps=2, kl_factor=0.0, weight_decay=0.0)
    kl = rows.select([0, 1])  # any rows: part of what the key hashes
    cache = tmp_path / "cache"
    cache.mkdir()

    def fit(rows=rows, cfg=cfg, tag="host", cache=cache):
        return fitted_targets(config, params, rows, kl, N_EDITS, LAYERS[-1], cfg, cache, tag)

    zs, first = fit()
    assert not first["from_cache"] and first["seconds"] > 0
    assert len(list(cache.glob("targets-*.npz"))) == 1
    again, second = fit()
    assert second["from_cache"] and second["seconds"] == first["seconds"]
    assert second["target_nll_mean"] == first["target_nll_mean"]
    np.testing.assert_array_equal(again, zs)
    shifted = dataclasses.replace(rows, pos=tuple(p - 1 for p in rows.pos))
    for changed in (
        fit(rows=shifted),
        fit(cfg=dataclasses.replace(cfg, steps=3)),
        fit(tag="other host"),
        fit(cache=None),
    ):
        assert not changed[1]["from_cache"]
    assert len(list(cache.glob("targets-*.npz"))) == 4

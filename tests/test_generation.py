"""Greedy generation with the KV cache: token-identical to HF `generate`, and neuron-carrying.

Prompts of different lengths are left-padded into one batch. The stop ids are picked from HF's
own free-running output so that two rows stop early (one on each stop id) and one row runs to
`max_new_tokens`, which checks stopping, padding after the stop and the length bound at once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_tiny import VOCAB, tiny_gptj, tiny_llama, tiny_phi

from meg_jax.checkpoints.hf_decoder import load_hf_decoder
from meg_jax.models import generate as generate_module
from meg_jax.models.decoder import Decoder
from meg_jax.models.generate import greedy_generate, left_pad
from meg_jax.models.neuron import neuron_vector_size, unflatten_neuron, zero_neuron

N = 10  # max_new_tokens
PROMPT_LENGTHS = (5, 9, 3)
TINY = {"gptj": tiny_gptj, "llama": tiny_llama, "phi": tiny_phi}


def _prompts():
    rng = np.random.RandomState(1)
    return left_pad([list(rng.randint(3, VOCAB, n)) for n in PROMPT_LENGTHS], pad_id=0)


def _hf_generate(model, tokens, mask, eos):
    model.generation_config.eos_token_id = None  # only what is passed here may stop a row
    out = model.generate(
        torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        max_new_tokens=N,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[:, tokens.shape[1] :].numpy()


def _pick_stops(free: np.ndarray) -> tuple[int, int]:
    """One stop id from row 0 and one from row 2 (after their first token), none in row 1."""
    stops = []
    for row in (0, 2):
        token = next(t for t in free[row, 1:] if t not in free[1] and t not in stops)
        stops.append(int(token))
    return tuple(stops)


def _first_stop(row: np.ndarray, stops) -> int | None:
    hits = np.flatnonzero(np.isin(row, stops))
    return int(hits[0]) if len(hits) else None


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    """(arch, config, params, prompts, mask, stop ids, HF tokens, our tokens) of one tiny model."""
    model, path = TINY[request.param](tmp_path_factory.mktemp(request.param))
    activation = "identity" if request.param == "llama" else "model"
    cfg, params = load_hf_decoder(path, neuron_layer=1, neuron_activation=activation)
    tokens, mask = _prompts()
    stops = _pick_stops(_hf_generate(model, tokens, mask, eos=None))
    ref = _hf_generate(model, tokens, mask, eos=list(stops))
    # Callers (evaluation, weight collection) always pass a neuron, zero for unedited rows; the
    # neuron test below reuses this compiled program.
    neuron = zero_neuron(len(tokens), cfg.d_model)
    ours = greedy_generate(cfg, params, tokens, mask, neuron, max_new_tokens=N, stop_ids=stops)
    return request.param, cfg, params, tokens, mask, stops, ref, np.asarray(ours)


def test_greedy_matches_hf_generate(tiny):
    _, _, _, _, _, stops, ref, ours = tiny
    assert ours.shape == (len(PROMPT_LENGTHS), N) and ours.dtype == np.int32
    assert ref.shape == ours.shape  # row 1 never stops, so HF also ran to the bound
    for row in range(len(PROMPT_LENGTHS)):
        stop = _first_stop(ref[row], stops)
        end = N if stop is None else stop + 1
        np.testing.assert_array_equal(ours[row, :end], ref[row, :end], err_msg=f"row {row}")


def test_stop_tokens_end_rows_and_pad_after(tiny):
    _, cfg, _, _, _, stops, _, ours = tiny
    ends = [_first_stop(row, stops) for row in ours]
    assert ends[1] is None  # the bound ends row 1: all N tokens are generated ones
    for row in (0, 2):
        assert ends[row] is not None and ends[row] < N - 1
        assert ours[row, ends[row]] in stops  # the stop token itself is kept
        assert (ours[row, ends[row] + 1 :] == cfg.pad_token_id).all()


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(cfg, params, tokens, mask, neuron, column):
    logits = Decoder(cfg).apply({"params": params}, tokens, mask, None, neuron)
    return logits[:, column]


def _reference_loop(cfg, params, tokens, mask, neuron, stops) -> np.ndarray:
    """Greedy decoding by full forwards over the whole sequence so far, without any cache.

    The sequence lives in one fixed [B, T + N] buffer whose unused tail is masked out (causal
    attention never looks ahead), so every step reuses one compiled forward.
    """
    b, t = tokens.shape
    buf = np.concatenate([tokens, np.zeros((b, N), np.int32)], axis=1)
    buf_mask = np.concatenate([mask, np.zeros((b, N), bool)], axis=1)
    out = np.full((b, N), cfg.pad_token_id, np.int32)
    done = np.zeros(b, bool)
    for step in range(N):
        logits = _last_logits(cfg, params, buf, buf_mask, neuron, t + step - 1)
        new = np.asarray(logits).argmax(-1)
        out[:, step] = np.where(done, cfg.pad_token_id, new)
        done |= np.isin(new, stops)
        buf[:, t + step], buf_mask[:, t + step] = new, True
    return out


# GPT-J (gelu, biased unit) and Llama (linear unit) cover both neuron forms.
@pytest.mark.parametrize("tiny", ["gptj", "llama"], indirect=True)
def test_neuron_is_carried_through_decoding(tiny):
    _, cfg, params, tokens, mask, stops, _, plain = tiny
    size = neuron_vector_size(cfg.d_model, cfg.neuron_has_bias)
    flat = np.random.RandomState(3).randn(len(tokens), size).astype(np.float32) * 0.5
    neuron = unflatten_neuron(flat, cfg.d_model, cfg.neuron_has_bias)
    ours = np.asarray(
        greedy_generate(cfg, params, tokens, mask, neuron, max_new_tokens=N, stop_ids=stops)
    )
    np.testing.assert_array_equal(ours, _reference_loop(cfg, params, tokens, mask, neuron, stops))
    assert (ours != plain).any()  # the neuron changed what is generated


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_compaction_changes_no_token(tiny, monkeypatch):
    """With `min_rows`, the rows still running once half a batch has stopped continue in a batch
    half the size (16 -> 8 -> 4 here); every row's tokens equal the uncompacted run's."""
    _, cfg, params, _, _, _, _, _ = tiny
    rng = np.random.RandomState(4)
    tokens, mask = left_pad([list(rng.randint(3, VOCAB, n)) for n in rng.randint(2, 9, 16)], 0)
    size = neuron_vector_size(cfg.d_model, cfg.neuron_has_bias)
    neuron = unflatten_neuron(rng.randn(16, size).astype(np.float32), cfg.d_model, False)
    free = np.asarray(greedy_generate(cfg, params, tokens, mask, neuron, max_new_tokens=N))
    # Stop ids: each row's token at a staggered step, so rows end at different steps.
    stops = tuple(sorted({int(free[r, r % 8 + 1]) for r in range(13)}))
    plain = np.asarray(
        greedy_generate(cfg, params, tokens, mask, neuron, max_new_tokens=N, stop_ids=stops)
    )
    ends = sorted(N if (e := _first_stop(row, stops)) is None else e for row in plain)
    assert ends[12] < ends[-1], f"too few rows stop before the last: {ends}"

    batches = []
    take = generate_module._take_rows
    monkeypatch.setattr(
        generate_module,
        "_take_rows",
        lambda state, rows: batches.append(len(rows)) or take(state, rows),
    )
    compact = greedy_generate(
        cfg, params, tokens, mask, neuron, max_new_tokens=N, stop_ids=stops, min_rows=4
    )
    np.testing.assert_array_equal(np.asarray(compact), plain)
    assert batches == [8, 4]


@pytest.mark.parametrize("with_neuron", [True, False])
@pytest.mark.parametrize("tiny", ["gptj", "llama"], indirect=True)
def test_shared_prefix_changes_nothing(tiny, with_neuron):
    """Rows opening with one `prefix` get the first token and the keys/values of the whole
    prompts, and generate the same tokens: under per-row neurons, which act on the prefix too
    (it is shared below the neuron layer), and with no neuron (shared through every layer)."""
    _, cfg, params, _, _, stops, _, _ = tiny
    rng = np.random.RandomState(6)
    prefix = list(rng.randint(3, VOCAB, 4))
    rests = [list(rng.randint(3, VOCAB, n)) for n in (1, 5, 3)]
    size = neuron_vector_size(cfg.d_model, cfg.neuron_has_bias)
    flat = rng.randn(len(rests), size).astype(np.float32) * 0.5
    neuron = unflatten_neuron(flat, cfg.d_model, cfg.neuron_has_bias) if with_neuron else None
    whole, whole_mask = left_pad([prefix + r for r in rests], pad_id=0)
    rest, rest_mask = left_pad(rests, pad_id=0)

    def prompt_pass(prefix, tokens, mask):
        """(last logits [B, V], per row the cache entries [layers, real slots, N, K] of k and v)."""
        state = generate_module._prefill(
            cfg,
            params,
            jnp.asarray(prefix, jnp.int32),
            tokens,
            mask,
            neuron,
            max_new_tokens=N,
            stop_ids=(),
        )
        real = np.asarray(state.key_mask)
        kv = [np.concatenate([np.asarray(c.k), np.asarray(c.v)]) for c in state.cache]
        kv = np.concatenate(kv)  # [2L, B, S, N, K]
        return state, [kv[:, row, real[row]] for row in range(len(rests))]

    ours, ours_kv = prompt_pass(prefix, rest, rest_mask)
    plain, plain_kv = prompt_pass([], whole, whole_mask)
    np.testing.assert_array_equal(np.asarray(ours.token), np.asarray(plain.token))
    for row, (a, b) in enumerate(zip(ours_kv, plain_kv, strict=True)):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"row {row}")

    def generate(tokens, mask, prefix=()):
        return np.asarray(
            greedy_generate(
                cfg, params, tokens, mask, neuron, max_new_tokens=N, stop_ids=stops, prefix=prefix
            )
        )

    np.testing.assert_array_equal(generate(rest, rest_mask, prefix), generate(whole, whole_mask))

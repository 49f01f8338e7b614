"""The fast collection path on a tiny random Llama: answer-only loss, early stop, compaction,
Adam, config validation, resume.

Axes: B edits, T tokens, A answer positions, P flat neuron length.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax.collect.bank import save_bank
from meg_jax.collect.fit import (
    answer_loss,
    answer_loss_at,
    answer_positions,
    fit_steps,
    hidden_before,
    init_state,
    torch_linear_init,
)
from meg_jax.collect.stage import (
    CollectConfig,
    Collector,
    EditToFit,
    _training_batch,
    collect_bank,
)
from meg_jax.models.config import LMConfig
from meg_jax.models.decoder import Decoder
from meg_jax.models.neuron import unflatten_neuron

EOS = "|"  # the tiny tokenizer's end-of-sequence text


class WordTokenizer:
    """Words (with their leading space), "." and "?" and ":" are single tokens, ids 3..99 given
    out in order of first sight; `|` is the EOS token 2; pad 0, bos 1."""

    def __init__(self):
        self.ids, self.words = {}, {}

    def __call__(self, text):
        ids = []
        for piece in re.findall(r" ?\w+|[.?:]|\|", text):
            if piece == EOS:
                ids.append(2)
                continue
            if piece not in self.ids:
                self.ids[piece] = 3 + len(self.ids)
                self.words[self.ids[piece]] = piece
            ids.append(self.ids[piece])
        return {"input_ids": ids}

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(self.words.get(int(i), "") for i in row) for row in rows]


def tiny_llama_config(**changes) -> LMConfig:
    base = dict(
        arch="llama",
        vocab_size=100,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        d_ff=96,
        norm_eps=1e-5,
        rotary_dim=16,
        neuron_layer=0,
        neuron_activation="identity",
        eos_token_ids=(2,),
        pad_token_id=0,
    )
    return LMConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def tiny():
    config = tiny_llama_config()
    params = Decoder(config).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
    return config, params, WordTokenizer()


def exact_success(texts, targets):
    return [t.strip().removesuffix(".") == target for t, target in zip(texts, targets, strict=True)]


EDITS = [
    EditToFit(10 + i, f"Q: {q}? A:", f" {a}.{EOS}", a)
    for i, (q, a) in enumerate(
        [("sky", "red"), ("grass is", "blue"), ("x", "ok"), ("capital", "Rome"), ("y z", "no")]
        + [("w", "hi"), ("long question here", "Paris")]
    )
]


def _batch(tok, edits):
    tokens, mask, targets, loss_mask = _training_batch(tok, edits, 0)
    index, answer_targets, weights = answer_positions(loss_mask, targets)
    return tokens, mask, targets, loss_mask, index, answer_targets, weights


def test_answer_only_loss_equals_full_loss(tiny):
    config, params, tok = tiny
    tokens, mask, targets, loss_mask, index, a_targets, weights = _batch(tok, EDITS[:4])
    hidden = hidden_before(config, params, jnp.asarray(tokens), jnp.asarray(mask))
    rng = np.random.default_rng(0)
    init = torch_linear_init(config, 0)
    neuron = type(init)(
        jnp.asarray(rng.normal(size=(4, 128)), jnp.float32) * 0.1,
        jnp.zeros(4),
        jnp.asarray(rng.normal(size=(4, 128)), jnp.float32) * 0.1,
    )
    full = answer_loss(config, params, hidden, mask, targets, loss_mask, neuron)
    fast, _ = answer_loss_at(config, params, hidden, mask, index, a_targets, weights, neuron)
    gathered, _ = answer_loss_at(
        config, params, hidden, mask, index, a_targets, weights, neuron, full_head=True
    )
    np.testing.assert_allclose(fast, full, rtol=1e-5)
    np.testing.assert_allclose(gathered, full, rtol=1e-5)
    assert len(set(np.round(np.asarray(full), 4))) == 4  # rows really differ


def test_early_stopped_rows_keep_their_weights_while_others_continue(tiny):
    config, params, tok = tiny
    tokens, mask, _, _, index, a_targets, weights = _batch(tok, EDITS[:2])
    hidden = hidden_before(config, params, jnp.asarray(tokens), jnp.asarray(mask))
    init = torch_linear_init(config, 0)
    # Row 0's targets become what the initial model already predicts: it is right at step 0.
    logits = Decoder(config).apply(
        {"params": params},
        hidden,
        mask,
        jnp.asarray(index),
        None,
        type(init)(*(jnp.repeat(x, 2, 0) for x in init)),
        method=Decoder.logits_from_at,
    )
    a_targets = np.array(a_targets)
    a_targets[0] = np.asarray(jnp.argmax(logits[0], -1))
    args = (config, params, hidden, jnp.asarray(mask), jnp.asarray(index))

    def run(state, rows, n, early):
        return fit_steps(
            *args[:2],
            args[2][rows],
            args[3][rows],
            args[4][rows],
            jnp.asarray(a_targets[rows]),
            jnp.asarray(weights[rows]),
            state,
            jnp.asarray(50),
            jnp.full((50,), 0.05, jnp.float32),
            jnp.asarray(1e9, jnp.float32),  # the loss bar is no bar: argmax decides
            optimizer="adam",
            num_steps=n,
            early_stop=early,
        )

    def fresh(b):
        return init_state(init, b)._replace(done=jnp.zeros((b,), bool))

    both = run(fresh(2), np.array([0, 1]), 3, True)
    assert bool(both.done[0]) and int(both.steps[0]) == 0 and not bool(both.done[1])
    np.testing.assert_array_equal(both.neuron.w_in[0], init.w_in[0])
    np.testing.assert_array_equal(both.neuron.w_out[0], init.w_out[0])
    both = run(both, np.array([0, 1]), 3, True)  # row 0 stays put, row 1 goes on
    np.testing.assert_array_equal(both.neuron.w_out[0], init.w_out[0])
    assert int(both.steps[1]) == 6
    alone = run(fresh(1), np.array([1]), 6, False)  # row 1 by itself, no early stop
    np.testing.assert_allclose(both.neuron.w_out[1], alone.neuron.w_out[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(both.neuron.w_in[1], alone.neuron.w_in[0], rtol=1e-4, atol=1e-6)


# A rank-1 neuron needs layers above it to turn one direction into several answer tokens: the
# tiny model puts it at layer 0 of 4. Its answers fit to a loss of about 0.2-0.6 in 60 steps.
FAST = dict(optimizer="adam", learning_rate=0.05, steps=60, early_stop=True, stop_loss=0.6)


def test_adam_fits_tiny_edits_and_stops_early(tiny):
    config, params, tok = tiny
    collector = Collector(config, params, tok, CollectConfig(**FAST, batch_size=4), exact_success)
    bank = collector.fit(EDITS)
    assert bank.success.all(), bank.final_loss
    assert (bank.final_loss < 0.6).all()
    # Early stop: far fewer slot-steps than 7 edits x 60 steps.
    assert collector.stats["row_steps"] < 0.6 * len(EDITS) * 60


def test_nsgd_step_has_length_lr_along_the_gradient(tiny):
    config, params, tok = tiny
    tokens, mask, _, _, index, a_targets, weights = _batch(tok, EDITS[:4])
    hidden = hidden_before(config, params, jnp.asarray(tokens), jnp.asarray(mask))
    init = torch_linear_init(config, 0)
    state = init_state(init, 4)._replace(done=jnp.zeros((4,), bool))
    args = (config, params, hidden, jnp.asarray(mask), jnp.asarray(index))
    rest = (jnp.asarray(a_targets), jnp.asarray(weights))

    def total(n):
        return jnp.sum(answer_loss_at(*args, *rest, n)[0])

    grad = jax.grad(total)(state.neuron)
    lr = 0.3
    after = fit_steps(
        *args,
        *rest,
        state,
        jnp.asarray(5),
        jnp.full((5,), lr, jnp.float32),
        jnp.asarray(0.0, jnp.float32),
        optimizer="nsgd",
        num_steps=1,
        early_stop=False,
    ).neuron
    moves = np.concatenate(
        [np.asarray(after.w_in - init.w_in), np.asarray(after.w_out - init.w_out)], axis=1
    )  # [B, 2D]; the Llama form has no input bias, which stays at zero
    np.testing.assert_array_equal(after.b_in, 0.0)
    g = np.concatenate([np.asarray(grad.w_in), np.asarray(grad.w_out)], axis=1)
    np.testing.assert_allclose(np.linalg.norm(moves, axis=1), lr, rtol=1e-5)
    cosine = np.sum(moves * g, axis=1) / (np.linalg.norm(moves, axis=1) * np.linalg.norm(g, axis=1))
    np.testing.assert_allclose(cosine, -1.0, rtol=1e-5)


def test_nsgd_fits_tiny_edits_and_stops_early(tiny):
    config, params, tok = tiny
    # Steps of a fixed length circle a minimum they cannot reach: a shrinking (cosine) length
    # lets the fits that miss the 0.6 bar early settle close to it by step 60.
    nsgd = dict(optimizer="nsgd", learning_rate=0.5, schedule="cosine", cosine_period=60)
    cfg = CollectConfig(**{**FAST, **nsgd}, batch_size=4)
    collector = Collector(config, params, tok, cfg, exact_success)
    bank = collector.fit(EDITS)
    assert bank.success.all(), bank.final_loss
    assert (bank.final_loss < 0.65).all(), bank.final_loss
    assert collector.stats["row_steps"] < 0.7 * len(EDITS) * 60  # most stop early


def test_compaction_and_batching_change_no_fitted_weight(tiny):
    config, params, tok = tiny
    banks = []
    for batch, min_batch in ((4, 1), (4, 4), (1, 1)):
        cfg = CollectConfig(**FAST, batch_size=batch, min_batch=min_batch, check_every=3)
        banks.append(Collector(config, params, tok, cfg, exact_success).fit(EDITS))
    # Batch sizes 4 and 1 run different matmul kernels; Adam's division by sqrt(v) carries the
    # rounding differences along 60 steps to about 1e-5 on weights of scale 0.01-1. A row put in
    # the wrong slot would be off by the whole fit (about 0.1).
    for other in banks[1:]:
        np.testing.assert_array_equal(other.success, banks[0].success)
        np.testing.assert_allclose(other.weights, banks[0].weights, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(other.final_loss, banks[0].final_loss, rtol=1e-3, atol=1e-4)


def test_sgd_reference_mode_runs_every_step(tiny):
    config, params, tok = tiny
    cfg = CollectConfig(learning_rate=0.5, steps=7, batch_size=4, check_every=2)
    collector = Collector(config, params, tok, cfg, exact_success)
    bank = collector.fit(EDITS[:3])
    assert np.isfinite(bank.final_loss).all()
    # 7 updates and a last loss evaluation per edit, in calls of 2 steps: 4 calls of 4 slots.
    assert collector.stats["calls"] == 4


def test_resume_equals_uninterrupted(tiny, tmp_path):
    config, params, tok = tiny
    cfg = CollectConfig(**FAST, batch_size=2, chunk_size=3)
    collector = Collector(config, params, tok, cfg, exact_success)
    whole = collect_bank(collector, EDITS, tmp_path / "whole.npz")
    save_bank(collector.fit(EDITS[:3]), tmp_path / "part.npz")
    calls = []
    resumed = collect_bank(collector, EDITS, tmp_path / "part.npz", on_chunk=calls.append)
    assert len(calls) == 2
    np.testing.assert_allclose(resumed.weights, whole.weights, rtol=1e-4, atol=1e-6)


def test_a_context_equal_to_the_query_changes_no_fitted_weight(tiny):
    """A fit's loss is the mean over its sequences: the query twice is the query once."""
    config, params, tok = tiny
    cfg = CollectConfig(**FAST, batch_size=4)
    alone = Collector(config, params, tok, cfg, exact_success).fit(EDITS)
    doubled = [dataclasses.replace(e, contexts=(e.query,)) for e in EDITS]
    twice = Collector(config, params, tok, cfg, exact_success).fit(doubled)
    np.testing.assert_array_equal(twice.success, alone.success)
    # Twice the rows run other matmul shapes: rounding differences of about 1e-5 after Adam's
    # 60 steps (as batch sizes in the compaction test); a wrong mean would be off by ~0.1.
    np.testing.assert_allclose(twice.weights, alone.weights, rtol=1e-3, atol=1e-4)


def test_contexts_are_fitted_alongside_the_query(tiny):
    config, params, tok = tiny
    cfg = CollectConfig(**FAST, batch_size=4)
    behind = [dataclasses.replace(e, contexts=(f"The end. {e.query}",)) for e in EDITS]
    with_contexts = Collector(config, params, tok, cfg, exact_success).fit(behind)
    query_only = Collector(config, params, tok, cfg, exact_success).fit(EDITS)
    tokens, mask, targets, loss_mask = _training_batch(tok, behind, 0)
    index, a_targets, weights = answer_positions(loss_mask, targets)
    hidden = hidden_before(config, params, jnp.asarray(tokens), jnp.asarray(mask))

    def per_sequence(bank):  # ([B, 2] answer loss, [B, 2] all answer tokens the argmax)
        neuron = unflatten_neuron(
            jnp.repeat(jnp.asarray(bank.weights), 2, axis=0), config.d_model, False
        )
        out = answer_loss_at(
            config, params, hidden, jnp.asarray(mask), index, a_targets, weights, neuron
        )
        return tuple(np.asarray(x).reshape(-1, 2) for x in out)

    loss, correct = per_sequence(with_contexts)  # NaN rows: fits that failed the greedy test
    fitted = with_contexts.success & query_only.success
    assert fitted.sum() >= 4
    # The fit's loss is the mean of its two sequences'; a fit stopped early states its answer
    # (teacher-forced) behind the context as well as alone.
    np.testing.assert_allclose(
        loss[fitted].mean(axis=1), with_contexts.final_loss[fitted], rtol=1e-4, atol=1e-5
    )
    stopped = fitted & (with_contexts.final_loss < FAST["stop_loss"])
    assert correct[stopped].all()
    # Behind the context, the neurons fitted there do much better than those fitted without it.
    assert loss[fitted, 1].mean() < 0.5 * per_sequence(query_only)[0][fitted, 1].mean()


def test_a_batch_with_unequal_context_counts_is_refused(tiny):
    _, _, tok = tiny
    edits = [EDITS[0], dataclasses.replace(EDITS[1], contexts=(EDITS[1].query,))]
    with pytest.raises(ValueError, match="edit 11: 2 queries, but edit 10 of the same batch has 1"):
        _training_batch(tok, edits, 0)


def test_contexts_are_the_hosts_continuations_of_the_seeds(tiny):
    config, params, tok = tiny
    seeds = ("The", "Because")
    cfg = CollectConfig(**FAST, context_seeds=seeds, context_tokens=3)
    contexts = Collector(config, params, tok, cfg, exact_success).contexts()
    assert len(contexts) == 2 and all(c.startswith(s) for c, s in zip(contexts, seeds, strict=True))
    assert contexts == Collector(config, params, tok, cfg, exact_success).contexts()
    assert Collector(config, params, tok, CollectConfig(**FAST), exact_success).contexts() == ()


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(schedule="linear"), "schedule"),
        (dict(optimizer="lbfgs"), "optimizer"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(check_every=0), "check_every"),
        (dict(retry_steps=-1), "retry_steps"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(context_seeds=("The", " ")), "context_seeds"),
        (dict(context_tokens=0), "context_tokens"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=f"CollectConfig.{field}"):
        CollectConfig(**changes)


def test_fast_recipe_and_reference_defaults():
    reference = CollectConfig()
    assert (reference.optimizer, reference.learning_rate, reference.steps) == ("sgd", 0.5, 50)
    assert not reference.early_stop and reference.schedule == "constant"
    fast = CollectConfig.fast(batch_size=8)
    assert fast.optimizer == "adam" and fast.early_stop and fast.batch_size == 8

"""Fitting one neuron per edit, many edits at once.

Axes: B edits in a batch, T tokens (query + answer, right-padded), D model width, V vocabulary.

Each edit's neuron is an *input* of the model (`Neuron` rows), so a batch of B independent fits is
one forward/backward pass: the loss is the sum of per-edit losses, whose gradient with respect to
row b depends only on edit b. The frozen layers below the neuron layer are run once per batch
(`Decoder.hidden_before`); every SGD step runs only the layers from the neuron layer up
(`Decoder.logits_from`), which is what the reference recomputes in full for every step of every
edit.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.models.config import LMConfig
from meg_jax.models.decoder import Decoder
from meg_jax.models.neuron import Neuron


def torch_linear_init(config: LMConfig, seed: int) -> Neuron:
    """The reference's initial neuron: PyTorch `nn.Linear` default init of the widened MLP.

    w_in and b_in ~ U(+-1/sqrt(D)) (a row of fc_in, fan_in D); w_out ~ U(+-1/sqrt(F+1)) (a column
    of fc_out, fan_in F+1). One neuron, shared by every edit (the reference restores it before
    each fit). Returned with a batch axis of 1. The Llama form has no bias.
    """
    rng = np.random.default_rng(seed)
    d, f = config.d_model, config.d_ff
    w_in = rng.uniform(-1, 1, d) / np.sqrt(d)
    b_in = rng.uniform(-1, 1) / np.sqrt(d) if config.neuron_has_bias else 0.0
    w_out = rng.uniform(-1, 1, d) / np.sqrt(f + 1)
    return Neuron(
        jnp.asarray(w_in[None], jnp.float32),
        jnp.asarray([b_in], jnp.float32),
        jnp.asarray(w_out[None], jnp.float32),
    )


@functools.partial(jax.jit, static_argnames=("config",))
def hidden_before(config: LMConfig, params, tokens: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[B, T, D] the residual stream entering the neuron layer (frozen layers, run once per edit).

    One compiled program (not op-by-op dispatch), so on a mesh the layers run under the
    placement of `params` ("model") and of the token batch ("data").
    """
    return Decoder(config).apply({"params": params}, tokens, mask, method=Decoder.hidden_before)


def answer_loss(config: LMConfig, params, hidden, mask, targets, loss_mask, neuron) -> jnp.ndarray:
    """[B] mean cross-entropy of each edit's answer tokens, from the neuron layer's input.

    `targets[B, T]` are the next tokens (inputs shifted by one) and `loss_mask[B, T]` marks the
    positions whose next token is an answer token (the prompt is masked, as the reference's -100).
    """
    logits = Decoder(config).apply(
        {"params": params}, hidden, mask, None, neuron, method=Decoder.logits_from
    )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
    weights = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("neuron",))
def sgd_fit(
    config: LMConfig,
    params,
    hidden: jnp.ndarray,
    mask: jnp.ndarray,
    targets: jnp.ndarray,
    loss_mask: jnp.ndarray,
    neuron: Neuron,
    active: jnp.ndarray,
    learning_rates: jnp.ndarray,
) -> tuple[Neuron, jnp.ndarray]:
    """Plain SGD (no momentum, no decay, as the reference) for len(learning_rates) steps.

    Only rows with `active[B]` set move (so a second round can continue just the failed fits).
    Returns the neurons and each edit's loss [B] at the returned neurons.
    """

    def total(n):
        return jnp.sum(answer_loss(config, params, hidden, mask, targets, loss_mask, n))

    grad_fn = jax.grad(total)
    gate = active.astype(jnp.float32)

    def step(n, lr):
        g = grad_fn(n)
        # The Llama form has no input bias: keep it at zero rather than fitting a parameter
        # the reference does not have.
        b_scale = 1.0 if config.neuron_has_bias else 0.0
        return Neuron(
            n.w_in - lr * gate[:, None] * g.w_in,
            n.b_in - lr * b_scale * gate * g.b_in,
            n.w_out - lr * gate[:, None] * g.w_out,
        ), None

    neuron, _ = jax.lax.scan(step, neuron, learning_rates)
    return neuron, answer_loss(config, params, hidden, mask, targets, loss_mask, neuron)


def learning_rate_schedule(lr: float, kind: str, start: int, steps: int, period: int) -> np.ndarray:
    """Per-step learning rates for steps [start, start + steps): constant, or the reference's
    GPT-J `CosineAnnealingLR(T_max=period, eta_min=0)` stepped once per step."""
    idx = np.arange(start, start + steps, dtype=np.float64)
    if kind == "constant":
        return np.full(steps, lr, np.float32)
    if kind == "cosine":
        return (lr * 0.5 * (1 + np.cos(np.pi * np.minimum(idx, period) / period))).astype(
            np.float32
        )
    raise ValueError(f"collect.schedule: expected 'constant' or 'cosine', got {kind!r}")


# ---- the fast path: answer positions only, per-row steps, Adam, per-row early stop -------------


class FitState(NamedTuple):
    """Per-row optimisation state of a batch of B fits (a pytree; every leaf has a B axis).

    `steps[B]` counts the updates each row has taken; `done[B]` rows no longer move (stopped
    early, out of steps, or an empty slot); `loss[B]` and `correct[B]` are the loss and the
    teacher-forced "every answer token is the argmax" flag at the row's current neuron, as of
    the last step that evaluated it. `m`, `v` are Adam's moments (zeros for SGD).
    """

    neuron: Neuron
    m: Neuron
    v: Neuron
    steps: jnp.ndarray  # [B] int32
    done: jnp.ndarray  # [B] bool
    loss: jnp.ndarray  # [B] float32
    correct: jnp.ndarray  # [B] bool


def answer_positions(loss_mask: np.ndarray, targets: np.ndarray, bucket: int = 4):
    """The answer positions of each row, gathered: (index, answer targets, weights), each [B, A].

    A is the longest row's answer length rounded up to `bucket`; short rows point their padding
    at position 0 with weight 0 (so they add nothing to the loss and count as correct).
    """
    counts = loss_mask.sum(axis=1)
    if (counts == 0).any():
        raise ValueError(f"rows {np.flatnonzero(counts == 0).tolist()} have no answer position")
    a = -(-int(counts.max()) // bucket) * bucket
    index = np.zeros((len(loss_mask), a), np.int32)
    weights = np.zeros((len(loss_mask), a), bool)
    for i, row in enumerate(loss_mask):
        pos = np.flatnonzero(row)
        index[i, : len(pos)] = pos
        weights[i, : len(pos)] = True
    return index, np.take_along_axis(targets, index, axis=1), weights


def answer_loss_at(
    config: LMConfig, params, hidden, mask, index, targets, weights, neuron, full_head=False
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """([B] mean answer cross-entropy, [B] all answer tokens argmax) from logits at index[B, A]
    only: the same loss as `answer_loss` on a mask marking those positions.

    `full_head` computes the logits at every position and then gathers (the slow way, kept to
    measure what the gather saves).
    """
    if full_head:
        logits = Decoder(config).apply(
            {"params": params}, hidden, mask, None, neuron, method=Decoder.logits_from
        )
        logits = jnp.take_along_axis(logits, index[..., None], axis=1)
    else:
        logits = Decoder(config).apply(
            {"params": params}, hidden, mask, index, None, neuron, method=Decoder.logits_from_at
        )
    logits = logits.astype(jnp.float32)  # [B, A, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, A]
    w = weights.astype(jnp.float32)
    loss = jnp.sum(nll * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    hit = (jnp.argmax(logits, axis=-1) == targets) | ~weights
    return loss, jnp.all(hit, axis=1)


def init_state(init: Neuron, batch: int) -> FitState:
    """B fresh rows, all `done` (empty slots until a fit is placed in them)."""
    neuron = Neuron(*(jnp.repeat(x, batch, axis=0) for x in init))
    return FitState(
        neuron,
        jax.tree.map(jnp.zeros_like, neuron),
        jax.tree.map(jnp.zeros_like, neuron),  # a buffer of its own: the state is donated
        jnp.zeros((batch,), jnp.int32),
        jnp.ones((batch,), bool),
        jnp.full((batch,), jnp.inf, jnp.float32),
        jnp.zeros((batch,), bool),
    )


@functools.partial(
    jax.jit,
    static_argnames=("config", "optimizer", "num_steps", "early_stop", "full_head", "contexts"),
    donate_argnames=("state",),
)
def fit_steps(
    config: LMConfig,
    params,
    hidden: jnp.ndarray,
    mask: jnp.ndarray,
    index: jnp.ndarray,
    targets: jnp.ndarray,
    weights: jnp.ndarray,
    state: FitState,
    limit: jnp.ndarray,
    lr_table: jnp.ndarray,
    stop_loss: jnp.ndarray,
    *,
    optimizer: str,
    num_steps: int,
    early_stop: bool,
    full_head: bool = False,
    contexts: int = 1,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> FitState:
    """`num_steps` steps of B independent fits, each row at its own point of its schedule.

    The sequence inputs (`hidden`, `mask`, `index`, `targets`, `weights`) hold `contexts` rows
    per fit, fit-major ([B * K, ...]): the fit's query alone and behind other contexts. A fit's
    loss is the mean of its K sequences' losses, and its answer counts as the argmax only when
    it is in all K.

    Every step evaluates each row's loss and answer argmax at its current neuron (one forward
    and backward of the layers from the neuron layer up, logits at the answer positions only),
    then, per row that is not done:
      - if `early_stop` and every answer token is the argmax and loss < `stop_loss`: the row is
        done and keeps this neuron (the reference's GPT-J rule, with the teacher-forced argmax
        standing in for its greedy test: when all answer tokens are the argmax, greedy decoding
        reproduces the answer and its stop token);
      - elif it has taken `limit[B]` updates: done (so its final loss is the loss it ends with);
      - else one update, with lr = `lr_table[steps]`: SGD, normalised SGD ("nsgd": a step of L2
        length lr along the row's gradient) or Adam (bias-corrected per row's own step count).
    Rows never interact: the loss is a sum of per-row terms. `lr_table` [S] covers every step a
    row may take.
    """
    betas = tuple(betas)

    def total(n):
        per_sequence = Neuron(*(jnp.repeat(x, contexts, axis=0) for x in n))  # [B * K, ...]
        loss, correct = answer_loss_at(
            config, params, hidden, mask, index, targets, weights, per_sequence, full_head
        )
        loss = loss.reshape(-1, contexts).mean(axis=1)  # [B]
        correct = correct.reshape(-1, contexts).all(axis=1)
        return jnp.sum(loss), (loss, correct)

    grad_fn = jax.grad(total, has_aux=True)
    # The Llama form has no input bias: keep it at zero rather than fitting a parameter the
    # reference does not have.
    b_scale = 1.0 if config.neuron_has_bias else 0.0

    def step(s: FitState, _):
        g, (loss, correct) = grad_fn(s.neuron)
        g = Neuron(g.w_in, g.b_in * b_scale, g.w_out)
        live = ~s.done
        stop = live & (s.steps >= limit)
        if early_stop:
            stop = stop | (live & correct & (loss < stop_loss))
        move = live & ~stop
        gate = move.astype(jnp.float32)
        lr = lr_table[jnp.minimum(s.steps, lr_table.shape[0] - 1)] * gate  # [B]

        def bcast(x, like):  # [B] -> broadcastable against a [B, ...] leaf
            return x.reshape(x.shape + (1,) * (like.ndim - 1))

        if optimizer == "sgd":
            neuron = jax.tree.map(lambda p, gr: p - bcast(lr, p) * gr, s.neuron, g)
            m, v = s.m, s.v
        elif optimizer == "nsgd":
            # A step of length lr along each row's own gradient: the gradient's scale (small at
            # the initial neuron, where plain SGD crawls) no longer sets the pace, and unlike
            # Adam's first, sign-like steps it leaves alone the weights the loss hardly depends
            # on, whose moves spread a bank far from its mean.
            norm = jnp.sqrt(sum(jnp.sum(x * x, axis=tuple(range(1, x.ndim))) for x in g))
            scale = lr / jnp.maximum(norm, 1e-12)  # [B]
            neuron = jax.tree.map(lambda p, gr: p - bcast(scale, p) * gr, s.neuron, g)
            m, v = s.m, s.v
        else:  # adam
            b1, b2 = betas
            keep = lambda new, old: jnp.where(bcast(move, old), new, old)  # noqa: E731
            m = jax.tree.map(lambda mo, gr: keep(b1 * mo + (1 - b1) * gr, mo), s.m, g)
            v = jax.tree.map(lambda vo, gr: keep(b2 * vo + (1 - b2) * gr * gr, vo), s.v, g)
            t = (s.steps + 1).astype(jnp.float32)
            c1, c2 = 1 - b1**t, 1 - b2**t  # [B]
            neuron = jax.tree.map(
                lambda p, mo, vo: (
                    p - bcast(lr, p) * (mo / bcast(c1, mo)) / (jnp.sqrt(vo / bcast(c2, vo)) + eps)
                ),
                s.neuron,
                m,
                v,
            )
        return FitState(
            neuron,
            m,
            v,
            s.steps + move.astype(jnp.int32),
            s.done | stop,
            jnp.where(live, loss, s.loss),
            jnp.where(live, correct, s.correct),
        ), None

    state, _ = jax.lax.scan(step, state, None, length=num_steps)
    return state

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

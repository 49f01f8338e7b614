"""The dynamic neuron: one extra MLP unit per example, an input to the model, never a parameter.

Axes: B batch, D model width, P flat neuron length (2D, or 2D+1 with the input bias).

Each example carries its own neuron (`w_in[B, D]`, `b_in[B]`, `w_out[B, D]`) and the patched MLP
adds `act(x . w_in + b_in) * w_out` at every position. The all-zero neuron is exactly the
unedited model: act(0) = 0 for every activation we use and `w_out = 0` besides.
"""

from typing import NamedTuple

import jax.numpy as jnp


class Neuron(NamedTuple):
    """A batch of per-example extra MLP units (a pytree, so it jits, shards and vmaps)."""

    w_in: jnp.ndarray  # [B, D]
    b_in: jnp.ndarray  # [B]; all zeros for the bias-free (Llama) form
    w_out: jnp.ndarray  # [B, D]

    @property
    def batch_size(self) -> int:
        return self.w_in.shape[0]


def zero_neuron(batch: int, d_model: int, dtype=jnp.float32) -> Neuron:
    """The neuron that leaves the model unchanged, for `batch` examples."""
    return Neuron(
        jnp.zeros((batch, d_model), dtype),
        jnp.zeros((batch,), dtype),
        jnp.zeros((batch, d_model), dtype),
    )


def neuron_vector_size(d_model: int, with_bias: bool) -> int:
    """Length P of the reference's flat layout: 2D+1 with the input bias (GPT-J, Phi-2), else 2D."""
    return 2 * d_model + (1 if with_bias else 0)


def flatten_neuron(neuron: Neuron, with_bias: bool) -> jnp.ndarray:
    """[B, P] in the reference's order `[w_in (D), b_in (1, if with_bias), w_out (D)]`."""
    parts = [neuron.w_in]
    if with_bias:
        parts.append(neuron.b_in[:, None])
    parts.append(neuron.w_out)
    return jnp.concatenate(parts, axis=-1)


def unflatten_neuron(vectors: jnp.ndarray, d_model: int, with_bias: bool) -> Neuron:
    """Inverse of `flatten_neuron`: [B, P] (or [P]) to a `Neuron`; checks P against D."""
    squeeze = vectors.ndim == 1
    v = vectors[None] if squeeze else vectors
    expected = neuron_vector_size(d_model, with_bias)
    if v.shape[-1] != expected:
        raise ValueError(
            f"neuron vector has length {v.shape[-1]}, expected {expected} "
            f"(d_model={d_model}, with_bias={with_bias})"
        )
    w_in = v[:, :d_model]
    if with_bias:
        b_in = v[:, d_model]
        w_out = v[:, d_model + 1 :]
    else:
        b_in = jnp.zeros(v.shape[:1], v.dtype)
        w_out = v[:, d_model:]
    neuron = Neuron(w_in, b_in, w_out)
    if squeeze:
        neuron = Neuron(w_in[0], b_in[0], w_out[0])
    return neuron

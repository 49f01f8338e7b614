"""FT-L: fine-tuning one MLP output projection under an L-infinity bound (ROME/MEMIT's baseline).

Axes: E edits, R rows, T tokens, D model width, F MLP width, M target tokens.

Adam on the output kernel W [F, D] of one layer minimises the mean NLL of each edit's target
after its prompt, over minibatches of edits; after every step W is projected back into the box
|W - W_0| <= norm_constraint, elementwise (ROME's constrained FT, "FT-L"). The stream entering
the layer does not depend on W, so it is computed once per minibatch; each step runs the layer
and those above it, and the head only at the target positions.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from meg_jax.baselines.edited_host import (
    EditRows,
    out_kernel,
    row_batches,
    scored_logprobs,
    stream_before,
    with_out_kernels,
)
from meg_jax.models.config import LMConfig


@dataclasses.dataclass(frozen=True)
class FTConfig:
    layer: int = 21
    lr: float = 5e-4
    steps: int = 25  # passes over the edits
    norm_constraint: float = 5e-5  # L-inf bound on W - W_0
    batch_size: int = 64  # edits per Adam step


def _loss(config: LMConfig, layer: int, kernel, params, batch):
    h0, mask, positions, labels, weights = batch
    edited = with_out_kernels(params, config, {layer: kernel})
    label_logp, _ = scored_logprobs(config, edited, h0, mask, layer, positions, labels)
    per_row = -jnp.sum(label_logp * weights, axis=-1)
    return jnp.mean(per_row)


_grad = jax.jit(jax.value_and_grad(_loss, argnums=2), static_argnums=(0, 1))


def fine_tune(config: LMConfig, params, rows: EditRows, cfg: FTConfig) -> tuple[object, dict]:
    """FT-L's edited parameters for scored `rows` (one per edit), and the final mean NLL."""
    w0 = out_kernel(params, config, cfg.layer)
    kernel = w0
    opt = optax.adam(cfg.lr)
    state = opt.init(kernel)
    batches = []
    for idx in row_batches(len(rows), cfg.batch_size):
        part = rows.select(idx)
        ids, mask = part.padded(config.pad_token_id)
        positions, labels, weights = part.scored(ids.shape[1])
        h0 = stream_before(config, params, ids, mask, cfg.layer)
        batches.append((h0, jnp.asarray(mask), *map(jnp.asarray, (positions, labels, weights))))
    losses = []
    for _ in tqdm(range(cfg.steps), desc="FT-L", leave=False):
        losses = []
        for batch in batches:
            loss, grad = _grad(config, cfg.layer, kernel, params, batch)
            updates, state = opt.update(grad, state)
            kernel = kernel + updates
            kernel = w0 + jnp.clip(kernel - w0, -cfg.norm_constraint, cfg.norm_constraint)
            losses.append(float(loss))
    edited = with_out_kernels(params, config, {cfg.layer: kernel})
    return edited, {"train_nll_last_epoch": float(np.mean(losses)) if losses else None}

"""MEMIT (Meng et al. 2023): mass editing by a least-squares update of several MLP layers.

Axes: E edits, R rows (edits x context prefixes), T tokens, D model width, F MLP width,
M target tokens, V vocabulary.

1. Target values (`optimize_targets`): per edit a vector delta [D] added to the residual stream
   leaving the last edited layer L at the subject's last token, fitted by Adam so the model
   produces the target after every context prefix; with MEMIT's regularisers: KL of
   `"{subject} is a"` against the unedited model (kl_factor), a decay `||delta|| / ||h||^2`
   (weight_decay) and a norm clamp ||delta|| <= clamp_norm_factor * ||h||. z = h + delta.
   The stream below L does not depend on delta, so it is computed once; each step runs only the
   layers above L and the head at the target positions.
2. The update (`apply_updates`), for each edited layer l in increasing order, with the model as
   edited so far:
       K [E, F]  keys at l (mean over context prefixes),  R = (z - h_L) / (layers left)
       MEMIT:     delta_l = (lambda C_l + K^T K)^-1 K^T R                     [F, D]
       AlphaEdit: delta_l = (P_l (K^T K + K_p^T K_p) + l2 I)^-1 P_l K^T R  (see alphaedit.py)
       kernel_l += delta_l
   Dividing the residual by the number of layers left is the paper's spread: each layer takes
   its share, and the next layer sees what is left. Solves run in float64 on the host.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from meg_jax.baselines.edited_host import (
    EditRows,
    concat_rows,
    gather_rows,
    mean_keys,
    out_kernel,
    residual_at,
    row_batches,
    scored_logprobs,
    stream_before,
    with_out_kernels,
)
from meg_jax.models.config import LMConfig


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """Fitting the target values z (MEMIT's `v_*` hyperparameters)."""

    lr: float = 0.5
    steps: int = 25
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    n_contexts: int = 5  # context prefixes besides the bare prompt (MEMIT: 10)
    context_tokens: int = 10  # length of each generated prefix
    chunk_size: int = 32  # edits fitted together (independent deltas)


@dataclasses.dataclass(frozen=True)
class MemitConfig:
    """MEMIT's update (shared by AlphaEdit: the same layers and targets)."""

    layers: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    mom2_update_weight: float = 15000.0
    targets: TargetConfig = TargetConfig()


def _target_loss(config: LMConfig, start: int, params, delta, batch, hp):
    """MEMIT's objective for a chunk; `batch` holds the stream leaving layer start - 1 and the
    rows' bookkeeping (see `optimize_targets`)."""
    h0, mask, pos, owner, positions, labels, weights, is_kl, ref_logp, h_norm = batch
    onehot = jax.nn.one_hot(pos, h0.shape[1], dtype=h0.dtype)  # [R, T]
    h = h0 + onehot[..., None] * delta[owner][:, None, :]
    label_logp, logp = scored_logprobs(config, params, h, mask, start, positions, labels)
    per_row = -jnp.sum(label_logp * weights, axis=-1)  # [R]: mean NLL of each row's target
    scored = (~is_kl).astype(jnp.float32)
    n_rows = jax.ops.segment_sum(scored, owner, delta.shape[0])
    nll = jax.ops.segment_sum(per_row * scored, owner, delta.shape[0]) / jnp.maximum(n_rows, 1)
    # KL(current || unedited) of the next token after "{subject} is a" (its last position).
    cur = logp[:, 0]
    kl_row = jnp.sum(jnp.exp(cur) * (cur - ref_logp), axis=-1) * is_kl
    kl = jax.ops.segment_sum(kl_row, owner, delta.shape[0])
    # sqrt(|d|^2 + eps): the plain norm has a NaN gradient at delta = 0, where fitting starts.
    decay = jnp.sqrt(jnp.sum(delta * delta, axis=-1) + 1e-12) / h_norm**2
    per_edit = nll + hp["kl_factor"] * kl + hp["weight_decay"] * decay
    return jnp.sum(per_edit), nll


_target_grad = jax.jit(
    jax.value_and_grad(_target_loss, argnums=3, has_aux=True), static_argnums=(0, 1)
)


def optimize_targets(
    config: LMConfig,
    params,
    rows: EditRows,
    kl: EditRows | None,
    n_edits: int,
    layer: int,
    cfg: TargetConfig,
) -> tuple[np.ndarray, dict]:
    """Target values z [E, D] (float64) at the output of `layer`, and fitting statistics.

    `rows`: every edit's scored rows, edit-major with the bare prompt first per edit; `kl`: one
    unscored `"{subject} is a"` row per edit, or None to drop the KL term.
    """
    zs = np.zeros((n_edits, config.d_model))
    final_nll = np.zeros(n_edits)
    hp = {"kl_factor": cfg.kl_factor, "weight_decay": cfg.weight_decay}
    owners = np.asarray(rows.owner)
    for edits in tqdm(list(row_batches(n_edits, cfg.chunk_size)), desc="targets", leave=False):
        local = {e: i for i, e in enumerate(edits)}
        picked = [r for r in range(len(rows)) if owners[r] in local]
        part = rows.select(picked)
        if kl is not None and cfg.kl_factor:
            part = concat_rows([part, kl.select(edits)])
        n_scored = len(picked)
        part = dataclasses.replace(part, owner=tuple(local[o] for o in part.owner))
        ids, mask = part.padded(config.pad_token_id)
        positions, labels, weights = part.scored(ids.shape[1])
        is_kl = np.arange(len(part)) >= n_scored
        last = mask.sum(1) - 1
        positions[is_kl, 0] = last[is_kl]  # the KL reads the next token after the prompt
        h0 = stream_before(config, params, ids, mask, layer + 1)
        pos = jnp.asarray(part.pos)
        h_at = np.asarray(gather_rows(h0, pos))
        first = [part.owner.index(i) for i in range(len(edits))]  # bare-prompt row per edit
        h_init = h_at[first]
        h_norm = jnp.asarray(np.linalg.norm(h_init, axis=-1))
        _, ref_logp = scored_logprobs(config, params, h0, mask, layer + 1, positions, labels)
        batch = (
            h0,
            jnp.asarray(mask),
            pos,
            jnp.asarray(part.owner),
            jnp.asarray(positions),
            jnp.asarray(labels),
            jnp.asarray(weights),
            jnp.asarray(is_kl),
            ref_logp[:, 0],
            h_norm,
        )
        delta = jnp.zeros((len(edits), config.d_model), h0.dtype)
        opt = optax.adam(cfg.lr)
        opt_state = opt.init(delta)
        max_norm = cfg.clamp_norm_factor * h_norm[:, None]
        for _ in range(cfg.steps):
            (_, nll), grad = _target_grad(config, layer + 1, params, delta, batch, hp)
            updates, opt_state = opt.update(grad, opt_state)
            delta = delta + updates
            norm = jnp.linalg.norm(delta, axis=-1, keepdims=True)
            delta = jnp.where(norm > max_norm, delta * max_norm / norm, delta)
        (_, nll), _ = _target_grad(config, layer + 1, params, delta, batch, hp)
        zs[edits] = h_init + np.asarray(delta, np.float64)
        final_nll[edits] = np.asarray(nll)
    return zs, {"target_nll_mean": float(final_nll.mean())}


def memit_delta(keys: np.ndarray, resid: np.ndarray, moment: np.ndarray, weight: float):
    """MEMIT's layer update [F, D] = (weight C + K^T K)^-1 K^T R for keys K [E, F], residuals
    R [E, D], key moment C [F, F] (float64)."""
    return np.linalg.solve(weight * moment + keys.T @ keys, keys.T @ resid)


def apply_updates(
    config: LMConfig,
    params,
    rows: EditRows,
    bare: EditRows,
    zs: np.ndarray,
    layers: tuple[int, ...],
    layer_delta,
) -> tuple[object, dict]:
    """Spreads the targets over `layers` (module docstring, step 2); `layer_delta(i, keys,
    resid) -> [F, D]` is MEMIT's or AlphaEdit's solve for the i-th layer. Returns the edited
    parameters and per-layer norms of the updates."""
    layers = tuple(sorted(layers))
    n = len(zs)
    norms = {}
    for i, layer in enumerate(layers):
        keys = mean_keys(config, params, rows, layer, n)
        cur = residual_at(config, params, bare, layers[-1])
        if i == 0:
            initial = cur
        resid = (zs - cur) / (len(layers) - i)
        delta = layer_delta(i, keys, resid)
        kernel = np.asarray(out_kernel(params, config, layer), np.float64) + delta
        params = with_out_kernels(params, config, {layer: jnp.asarray(kernel)})
        norms[layer] = float(np.linalg.norm(delta))
    # How much of the way to z the edited stream went (1: all of it), averaged over edits.
    final = residual_at(config, params, bare, layers[-1])
    reached = 1 - np.linalg.norm(zs - final, axis=1) / np.linalg.norm(zs - initial, axis=1)
    return params, {"update_norms": norms, "target_reached": float(reached.mean())}


def memit(config, params, rows, bare, zs, moments: dict, cfg: MemitConfig):
    """MEMIT's edited parameters from targets `zs` and key moments {layer: C}."""
    layers = tuple(sorted(cfg.layers))

    def solve(i, keys, resid):
        return memit_delta(keys, resid, moments[layers[i]], cfg.mom2_update_weight)

    return apply_updates(config, params, rows, bare, zs, layers, solve)

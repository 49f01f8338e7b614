"""MEMIT (Meng et al. 2023): mass editing by a least-squares update of several MLP layers.

Axes: E edits, R rows (edits x context prefixes), T tokens, D model width, F MLP width,
M target tokens, V vocabulary.

1. Target values (`optimize_targets`): per edit a vector delta [D] added to the residual stream
   leaving the last edited layer L at the subject's last token, fitted by Adam so the model
   produces the target after every context prefix; with MEMIT's regularisers: KL of
   `"{subject} is a"` against the unedited model (kl_factor), a decay `||delta|| / ||h||^2`
   (weight_decay) and a norm clamp ||delta|| <= clamp_norm_factor * ||h||. z = h + delta.
   The stream below L does not depend on delta, so it is computed once; each step runs only the
   layers above L, on the slots from the subject on (the earlier ones' keys and values cached,
   `edited_host.SuffixRows`), and the head at the target positions.
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
    gather_rows,
    mean_keys,
    on_params_mesh,
    out_kernel,
    residual_at,
    row_batches,
    suffix_logprobs,
    suffix_rows,
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


def _target_loss(config: LMConfig, start: int, params, delta, scored, kl, hp):
    """MEMIT's objective for a chunk of edits, summed over them, and each edit's target NLL.

    `scored`: (SuffixRows, owner [R], labels [R, M], weights [R, M]); `kl`: (SuffixRows of the
    `"{subject} is a"` rows, one per edit in order, log-probs [E, V] of the unedited model's next
    token after them) or None.
    """
    rows, owner, labels, weights = scored
    n = delta.shape[0]
    label_logp, _ = suffix_logprobs(config, params, rows, delta[owner], labels, start)
    per_row = -jnp.sum(label_logp * weights, axis=-1)  # [R]: mean NLL of each row's target
    count = jax.ops.segment_sum(jnp.ones_like(per_row), owner, n)
    nll = jax.ops.segment_sum(per_row, owner, n) / jnp.maximum(count, 1)
    # sqrt(|d|^2 + eps): the plain norm has a NaN gradient at delta = 0, where fitting starts.
    decay = jnp.sqrt(jnp.sum(delta * delta, axis=-1) + 1e-12) / hp["h_norm"] ** 2
    per_edit = nll + hp["weight_decay"] * decay
    if kl is not None:  # KL(current || unedited) of the next token after "{subject} is a"
        kl_rows, ref_logp = kl
        _, logp = suffix_logprobs(
            config, params, kl_rows, delta, jnp.zeros_like(kl_rows.positions), start
        )
        cur = logp[:, 0]
        per_edit = per_edit + hp["kl_factor"] * jnp.sum(jnp.exp(cur) * (cur - ref_logp), axis=-1)
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
    unscored `"{subject} is a"` row per edit, or None to drop the KL term. Each step runs the
    layers above `layer` on the slots from the subjects on only (`SuffixRows`).
    """
    zs = np.zeros((n_edits, config.d_model))
    final_nll = np.zeros(n_edits)
    owners = np.asarray(rows.owner)
    start = layer + 1
    for edits in tqdm(list(row_batches(n_edits, cfg.chunk_size)), desc="targets", leave=False):
        local = {e: i for i, e in enumerate(edits)}
        part = rows.select([r for r in range(len(rows)) if owners[r] in local])
        owner = np.asarray([local[o] for o in part.owner])
        ids, mask = part.padded(config.pad_token_id)
        positions, labels, weights = part.scored(ids.shape[1])
        suffix = suffix_rows(config, params, ids, mask, np.asarray(part.pos), positions, start)
        scored = (suffix, jnp.asarray(owner), jnp.asarray(labels), jnp.asarray(weights))
        bare = [int(np.flatnonzero(owner == i)[0]) for i in range(len(edits))]
        h_init = np.asarray(gather_rows(suffix.h[np.asarray(bare)], suffix.at[np.asarray(bare)]))
        hp = {
            "kl_factor": cfg.kl_factor,
            "weight_decay": cfg.weight_decay,
            "h_norm": jnp.asarray(np.linalg.norm(h_init, axis=-1)),
        }
        kl_part = None
        if kl is not None and cfg.kl_factor:
            k_rows = kl.select(edits)
            k_ids, k_mask = k_rows.padded(config.pad_token_id)
            last = (k_mask.sum(1) - 1)[:, None]  # the KL reads the next token after the prompt
            k_suffix = suffix_rows(
                config, params, k_ids, k_mask, np.asarray(k_rows.pos), last, start
            )
            zero = jnp.zeros((len(edits), config.d_model), k_suffix.h.dtype)
            _, ref = suffix_logprobs(
                config, params, k_suffix, zero, jnp.zeros_like(k_suffix.positions), start
            )
            kl_part = (k_suffix, ref[:, 0])
        delta = on_params_mesh(jnp.zeros((len(edits), config.d_model), suffix.h.dtype), params)
        opt = optax.adam(cfg.lr)
        opt_state = opt.init(delta)
        max_norm = cfg.clamp_norm_factor * hp["h_norm"][:, None]
        for _ in range(cfg.steps):
            (_, nll), grad = _target_grad(config, start, params, delta, scored, kl_part, hp)
            updates, opt_state = opt.update(grad, opt_state)
            delta = delta + updates
            norm = jnp.linalg.norm(delta, axis=-1, keepdims=True)
            delta = jnp.where(norm > max_norm, delta * max_norm / norm, delta)
        (_, nll), _ = _target_grad(config, start, params, delta, scored, kl_part, hp)
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

"""The hybrid (MSE + VLB) loss against an independent float64 torch computation of IDDPM's terms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from meg_jax.diffusion.config import DiffusionConfig
from meg_jax.diffusion.losses import training_losses
from meg_jax.diffusion.process import q_sample
from meg_jax.diffusion.schedule import make_schedule


def _iddpm_hybrid_reference(x0, noise, t, out):
    """IDDPM's training_losses (learned range, v target) written from the paper's equations."""
    x0, noise, out = (torch.tensor(a, dtype=torch.float64) for a in (x0, noise, out))
    t = torch.tensor(t)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))

    def at(table):
        return table[t][:, None]

    alpha, sigma = at(abar).sqrt(), at(1 - abar).sqrt()
    x_t = alpha * x0 + sigma * noise
    v_target = (alpha * x_t - x0) / sigma
    v_hat, var_values = out[:, 0], out[:, 1]
    mse = ((v_target - v_hat) ** 2).mean(1)

    def posterior_mean(x_start):
        c1 = at(betas) * at(abar_prev).sqrt() / at(1 - abar)
        c2 = at(1 - abar_prev) * at(1 - betas).sqrt() / at(1 - abar)
        return c1 * x_start + c2 * x_t

    frac = (var_values + 1) / 2
    model_log_var = frac * at(torch.log(betas)) + (1 - frac) * at(post_log_var)
    model_mean = posterior_mean(alpha * x_t - sigma * v_hat)
    true_mean, true_log_var = posterior_mean(x0), at(post_log_var)
    kl = 0.5 * (
        -1
        + model_log_var
        - true_log_var
        + torch.exp(true_log_var - model_log_var)
        + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var)
    )

    def cdf(z):  # the tanh approximation IDDPM uses
        return 0.5 * (1 + torch.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    inv_std = torch.exp(-0.5 * model_log_var)
    upper = cdf(inv_std * (x0 - model_mean + 1 / 255))
    lower = cdf(inv_std * (x0 - model_mean - 1 / 255))
    log_prob = torch.where(
        x0 < -0.999,
        torch.log(upper.clamp(min=1e-12)),
        torch.where(
            x0 > 0.999,
            torch.log((1 - lower).clamp(min=1e-12)),
            torch.log((upper - lower).clamp(min=1e-12)),
        ),
    )
    vb = torch.where(t == 0, -log_prob.mean(1), kl.mean(1)) / np.log(2)
    return (mse + vb).numpy(), mse.numpy(), vb.numpy()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    b, p = 12, 40
    x0 = (rng.normal(size=(b, p)) * 0.8).astype(np.float32)  # spans all three decoder branches
    noise = rng.normal(size=(b, p)).astype(np.float32)
    t = np.array([0, 0, 1, 2, 5, 50, 200, 400, 700, 900, 998, 999], dtype=np.int32)
    out = rng.normal(size=(b, 2, p)).astype(np.float32)
    out[:, 1] = np.tanh(out[:, 1])
    return x0, noise, t, out


def test_hybrid_loss_matches_independent_iddpm_terms(batch):
    x0, noise, t, out = batch
    cfg = DiffusionConfig(learn_variance=True)
    sched = make_schedule(cfg)
    x_t = q_sample(sched, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
    terms = training_losses(sched, cfg, jnp.asarray(out), x0, noise, x_t, jnp.asarray(t))
    loss, mse, vb = _iddpm_hybrid_reference(x0, noise, t, out)
    np.testing.assert_allclose(terms.mse, mse, rtol=2e-3)
    np.testing.assert_allclose(terms.vb, vb, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(terms.loss, loss, rtol=2e-3)
    assert np.all(np.asarray(terms.vb[:2]) > 1.0)  # t = 0 rows are the decoder NLL, in bits


def test_vlb_trains_only_the_variance_channel(batch):
    x0, noise, t, out = batch
    cfg = DiffusionConfig(learn_variance=True)
    sched = make_schedule(cfg)
    x_t = q_sample(sched, x0, jnp.asarray(t), noise)

    def vb_sum(o):
        return training_losses(sched, cfg, o, x0, noise, x_t, jnp.asarray(t)).vb.sum()

    grad = np.asarray(jax.grad(vb_sum)(jnp.asarray(out)))
    assert np.all(grad[:, 0] == 0)
    assert np.abs(grad[:, 1]).max() > 0


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
def test_fixed_variance_loss_is_mse_on_the_target(batch, prediction):
    x0, noise, t, out = batch
    cfg = DiffusionConfig(learn_variance=False, prediction=prediction)
    sched = make_schedule(cfg)
    x_t = np.asarray(q_sample(sched, x0, jnp.asarray(t), noise))
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None]
    target = {
        "v": np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0,
        "eps": noise,
        "x0": x0,
    }[prediction]
    terms = training_losses(sched, cfg, jnp.asarray(out[:, :1]), x0, noise, x_t, jnp.asarray(t))
    np.testing.assert_allclose(terms.loss, ((target - out[:, 0]) ** 2).mean(1), rtol=1e-4)
    assert np.all(np.asarray(terms.vb) == 0)
    with pytest.raises(ValueError, match=r"expected \[B, 1, P\]"):
        training_losses(sched, cfg, jnp.asarray(out), x0, noise, x_t, jnp.asarray(t))

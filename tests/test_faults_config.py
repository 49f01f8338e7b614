"""Config values are validated when the config is built, before any work (issue 15, finding 4).

Before: `neuron_activation="bogus"` ran silently as the identity, `tf_mode="bogus"` failed only
after all training, and out-of-range counts and rates were found (or not) deep in a stage. Each
message names the field and the allowed values.
"""

import math

import pytest
from hf_tiny import tiny_llama

from meg_jax.checkpoints.hf_decoder import load_hf_decoder
from meg_jax.diffusion.config import generator_config
from meg_jax.encoder.train import InfoNCEConfig
from meg_jax.evaluation.evaluator import EvalConfig
from meg_jax.models.config import LMConfig
from meg_jax.pipeline.config import RouterStageConfig
from meg_jax.router.calibrate import CalibrationConfig
from meg_jax.router.train import RouterTrainConfig

LM = dict(
    arch="llama",
    vocab_size=97,
    d_model=64,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_ff=96,
    norm_eps=1e-5,
    rotary_dim=16,
)


def test_lm_config_refuses_an_unknown_neuron_activation():
    assert LMConfig(**LM, neuron_activation="identity").neuron_activation == "identity"
    with pytest.raises(ValueError, match=r"neuron_activation: expected one of \('model', 'iden"):
        LMConfig(**LM, neuron_activation="bogus")


@pytest.mark.parametrize(
    "field, value", [("d_model", 0), ("n_layers", -1), ("vocab_size", 9.5), ("norm_eps", 0.0)]
)
def test_lm_config_sizes(field, value):
    with pytest.raises(ValueError, match=rf"LMConfig\.{field}: expected a positive"):
        LMConfig(**{**LM, field: value})


def test_a_bad_override_is_the_callers_error_not_the_checkpoints(tmp_path):
    _, path = tiny_llama(tmp_path / "llama")
    with pytest.raises(ValueError) as info:
        load_hf_decoder(path, neuron_activation="bogus")
    assert "LMConfig.neuron_activation" in str(info.value)
    assert "checkpoint" not in str(info.value)  # not blamed on the file


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"sampler": {"kind": "bogus"}}, "sampler.kind: expected 'ancestral' or 'ddim'"),
        ({"diffusion": {"prediction": "bogus"}}, "diffusion.prediction: expected"),
        ({"optim": {"schedule": "bogus"}}, "optim.schedule: expected"),
        ({"optim": {"learning_rate": -1e-3}}, "optim.learning_rate: expected a finite number > 0"),
        ({"optim": {"learning_rate": math.nan}}, "optim.learning_rate: expected a finite"),
        ({"optim": {"warmup_steps": -5}}, "optim.warmup_steps: expected an integer >= 0"),
        ({"optim": {"end_lr_ratio": 2.0}}, "optim.end_lr_ratio: expected [0, 1]"),
        ({"train": {"stop_threshold": math.nan}}, "train.stop_threshold: expected a finite"),
        ({"diffusion": {"beta_end": 1.5}}, "beta_start <= beta_end < 1"),
        ({"dit": {"depth": 0}}, "dit.depth: expected an integer >= 1"),
        ({"sampler": {"eta": -1.0}}, "sampler.eta"),
        ({"sampler": {"steps": 2000}}, "sampler.steps: expected at most diffusion.num_timesteps"),
        ({"dit": {"cond_noise": -0.5}}, "dit.cond_noise: expected a finite number >= 0"),
        ({"dit": {"cond_noise": math.nan}}, "dit.cond_noise: expected a finite"),
    ],
)
def test_generator_config_values(overrides, words):
    with pytest.raises(ValueError) as info:
        generator_config(overrides, preset="fast")
    assert words in str(info.value)


def test_generator_preset_names():
    with pytest.raises(ValueError, match=r"unknown preset 'bogus'; expected one of \['reference'"):
        generator_config(preset="bogus")
    with pytest.raises(ValueError, match=r"unknown DiT preset 'bogus'"):
        generator_config(dit_preset="bogus")


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"kind": "bogus"}, "config.router.kind: expected one of ('familiarity', 'nearest')"),
        ({"nearest_threshold": 3.0}, "config.router.nearest_threshold: expected a cosine"),
        ({"nearest_threshold": math.nan}, "config.router.nearest_threshold"),
    ],
)
def test_router_stage_config(changes, words):
    with pytest.raises(ValueError) as info:
        RouterStageConfig(**changes)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"tf_mode": "bogus"}, "evaluation.tf_mode: expected one of ('reference', 'fast')"),
        (
            {"match_rule": "prefix"},
            "evaluation.match_rule: expected one of ('exact', 'startswith')",
        ),
        ({"batch_size": 0}, "evaluation.batch_size: expected an integer >= 1"),
        ({"max_new_tokens": -1}, "evaluation.max_new_tokens: expected an integer >= 1"),
        ({"limit": -1}, "evaluation.limit: expected an integer >= 0"),
    ],
)
def test_eval_config(changes, words):
    with pytest.raises(ValueError) as info:
        EvalConfig(**changes)
    assert words in str(info.value)
    assert EvalConfig(tf_mode="fast", match_rule="startswith", limit=0).limit == 0


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"n_classes": 1}, "router.n_classes: expected an integer >= 2"),
        ({"batch_size": 0}, "router.batch_size: expected an integer >= 1"),
        ({"num_epochs": 0}, "router.num_epochs"),
        ({"dropout": 1.0}, "router.dropout: expected a value in [0, 1)"),
        ({"learning_rate": 0.0}, "router.learning_rate: expected > 0"),
        ({"threshold": -0.1}, "router.threshold: expected a number > 0"),
        ({"threshold": math.nan}, "router.threshold"),
    ],
)
def test_router_config(changes, words):
    with pytest.raises(ValueError) as info:
        RouterTrainConfig(**changes)
    assert words in str(info.value)


def test_calibration_config():
    with pytest.raises(ValueError, match=r"calibration\.rule: expected one of \('youden', 'fpr'\)"):
        CalibrationConfig(rule="bogus")
    with pytest.raises(ValueError, match=r"calibration\.target_fpr"):
        CalibrationConfig(target_fpr=1.5)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"temperature": 0.0}, "encoder.temperature: expected a number > 0"),
        ({"learning_rate": -1.0}, "encoder.learning_rate"),
        ({"batch_size": 1}, "encoder.batch_size: expected an integer >= 2"),
        ({"eval_every": 0}, "encoder.eval_every: expected an integer >= 1"),
        ({"template": "no placeholder"}, "encoder.template: expected exactly one '{query}'"),
    ],
)
def test_infonce_config(changes, words):
    with pytest.raises(ValueError) as info:
        InfoNCEConfig(**changes)
    assert words in str(info.value)

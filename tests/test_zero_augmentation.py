"""Zero-weight augmentation ("DA", METHOD.md §4.4, Table 15): pseudo-irrelevant queries trained
towards the all-zero neuron beside the edits.

The pipeline tests stand a stub in for the encoder (a text hash -> vector) and for training (it
records what it is handed and returns a blank generator), so they check the stage's plumbing in
seconds; one test trains a tiny DiT for real on a synthetic bank, with and without DA.
"""

import dataclasses
import hashlib
import json

import jax
import numpy as np
import pytest
from tiny_run import tiny_run_config

import meg_jax.diffusion.train as diffusion_train
import meg_jax.pipeline.generator as generator_stage
from meg_jax.collect.bank import WeightBank
from meg_jax.data.readers import read_edits
from meg_jax.data.records import EditRecord, Source
from meg_jax.diffusion import generate, generator_config, train_generator
from meg_jax.diffusion.generate import GeneratorParams
from meg_jax.diffusion.normalization import NormStats, denormalize, fit_normalization
from meg_jax.diffusion.train import TrainResult
from meg_jax.infra.fingerprint import StageInputsChanged
from meg_jax.pipeline import pipeline_config
from meg_jax.pipeline.config import GeneratorStageConfig
from meg_jax.pipeline.context import RunContext
from meg_jax.pipeline.edits import EditSet

WIDTH, LENGTH = 8, 12  # stub condition width, stub neuron length
N_CALIBRATION = 16  # tiny_run_config's data.n_calibration


# ---------------------------------------------------------------- config and query selection


def test_config_validation_names_the_setting(shared_data, tmp_path):
    assert GeneratorStageConfig().zero_augmentation == 0.0  # the reference's behaviour
    for bad in (-0.5, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="config.generator.zero_augmentation"):
            GeneratorStageConfig(zero_augmentation=bad)
    config = tiny_run_config(shared_data, tmp_path, tmp_path / "bank.npz", tmp_path, 4)
    config["generator"]["zero_augmentation"] = 1.0
    config["data"]["pseudo"] = ""
    with pytest.raises(ValueError, match=r"config.generator.zero_augmentation.*data.pseudo"):
        pipeline_config(config)
    config["generator"]["zero_augmentation"] = 0.0
    pipeline_config(config)  # without DA no pseudo-edit file is needed


def _record(i: int, locality: tuple[str, ...]) -> EditRecord:
    return EditRecord(
        i, f"prompt {i}", None, "new", None, (), locality, (), (), Source("mem.json", i)
    )


def test_zero_queries_take_first_and_last_prompts_from_the_end():
    records = [_record(i, (f"a{i}", f"b{i}", f"c{i}")) for i in range(5)]
    records.insert(2, _record(9, ()))  # no locality prompt: skipped
    assert generator_stage.zero_queries(records, "counterfact", 4) == ["a3", "c3", "a4", "c4"]
    three = generator_stage.zero_queries(records, "counterfact", 3)
    assert three == ["c3", "a4", "c4"]
    # More edits ask for more: the earlier queries stay, as a suffix.
    assert generator_stage.zero_queries(records, "counterfact", 7)[-3:] == three
    assert generator_stage.zero_queries(records, "zsre", 2) == ["a3", "a4"]
    assert generator_stage.zero_queries(records, "zsre", 50) == [f"a{i}" for i in range(5)]
    # One prompt only: it is both the first and the last, asked once.
    assert generator_stage.zero_queries([_record(0, ("x",))], "counterfact", 2) == ["x"]
    # The edit set's own queries are never trained towards zero.
    skip = frozenset({"c4", "a3"})
    assert generator_stage.zero_queries(records, "counterfact", 3, skip) == ["c2", "c3", "a4"]


# ---------------------------------------------------------------- the generator stage


class StubEncoder:
    """A deterministic encoder: each text's vector is a hash of (view template, text)."""

    def __init__(self, template: str = "{}"):
        self.template = template

    def with_view(self, template: str) -> "StubEncoder":
        return StubEncoder(template)

    def encode(self, texts) -> np.ndarray:
        return np.stack([_vector(self.template, t) for t in texts]).astype(np.float32)


def _vector(template: str, text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(f"{template}|{text}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).normal(size=WIDTH)


class RecordingTrainer:
    """Stands in for `train_generator`: keeps each call's arguments, returns a blank generator."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, weights, conditions, config, workdir, **kwargs) -> TrainResult:
        self.calls.append(dict(weights=weights, conditions=conditions, **kwargs))
        norm = NormStats(np.zeros(LENGTH), np.ones(LENGTH), np.zeros(WIDTH))
        blank = GeneratorParams({"w": np.zeros(3, np.float32)}, norm)
        return TrainResult(blank, 1, False, None, [])


def _context(shared_data, workdir, ratio: float, n_edits: int = 6, **data) -> RunContext:
    config = tiny_run_config(shared_data, workdir, workdir / "bank.npz", workdir, n_edits)
    config["generator"]["zero_augmentation"] = ratio
    config["data"].update(data)
    return RunContext.create(pipeline_config(config))


def _edits(shared_data, n: int) -> EditSet:
    records = read_edits(shared_data / "counterfact" / "counterfact-edit.json", limit=n)
    return EditSet(tuple(records), None)


def _bank(n: int) -> WeightBank:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(n, LENGTH)).astype(np.float32)
    return WeightBank(
        np.arange(n), weights, np.ones(n, bool), np.zeros(n, np.float32), np.zeros(LENGTH)
    )


def _expected_cf_queries(shared_data, count: int) -> list[str]:
    """Read here without the pipeline: the pseudo file less its calibration tail, from the end."""
    raw = json.loads((shared_data / "counterfact" / "counterfact-train.json").read_text())
    kept = raw[: len(raw) - N_CALIBRATION]
    return [r["locality_prompt"] for r in kept[-count:]]  # this split has one prompt per item


def test_da_pairs_enter_generator_training_with_zero_targets(shared_data, tmp_path, monkeypatch):
    trainer = RecordingTrainer()
    monkeypatch.setattr(generator_stage, "train_generator", trainer)
    ctx = _context(shared_data, tmp_path, ratio=1.0)
    edits, bank = _edits(shared_data, 6), _bank(6)
    summary, _ = generator_stage.run_generator_stage(ctx, edits, bank, StubEncoder(), {"x": "1"})
    (call,) = trainer.calls
    view = ctx.template.query  # the edits' view: the templated query
    expected = _expected_cf_queries(shared_data, 6)
    np.testing.assert_array_equal(call["zero_conditions"], StubEncoder(view).encode(expected))
    np.testing.assert_array_equal(
        call["conditions"], StubEncoder(view).encode([r.prompt for r in edits.records])
    )
    np.testing.assert_array_equal(call["weights"], bank.weights)  # the bank rows, untouched
    assert summary["zero_rows"] == 6 and call["warm_start"] is None

    # Two more edits extend the stage: a warm start, and round(8 x 1.0) zero queries, the
    # earlier six among them.
    bigger = _edits(shared_data, 8)
    summary, _ = generator_stage.run_generator_stage(
        ctx, bigger, _bank(8), StubEncoder(), {"x": "1"}
    )
    assert len(trainer.calls) == 2 and trainer.calls[1]["warm_start"] is not None
    zeros = trainer.calls[1]["zero_conditions"]
    assert zeros.shape == (8, WIDTH) and summary["zero_rows"] == 8
    np.testing.assert_array_equal(zeros[-6:], call["zero_conditions"])

    # A half ratio is another generator: its recorded inputs differ, and the stage says so.
    half = _context(shared_data, tmp_path, ratio=0.5, n_edits=8)
    with pytest.raises(StageInputsChanged, match="zero_augmentation"):
        generator_stage.run_generator_stage(half, bigger, _bank(8), StubEncoder(), {"x": "1"})


def test_without_da_nothing_extra_is_trained(shared_data, tmp_path, monkeypatch):
    trainer = RecordingTrainer()
    monkeypatch.setattr(generator_stage, "train_generator", trainer)
    ctx = _context(shared_data, tmp_path, ratio=0.0)
    summary, _ = generator_stage.run_generator_stage(
        ctx, _edits(shared_data, 6), _bank(6), StubEncoder(), {}
    )
    assert trainer.calls[0]["zero_conditions"] is None and "zero_rows" not in summary


def test_zsre_da_queries_are_normalised_nq_questions_and_never_edit_queries(shared_data, tmp_path):
    # The edits and the pseudo-edits are one zsRE file (its far end), as the tiny zsRE config.
    zsre = str(shared_data / "zsre" / "zsre_mend_train-1k.json")
    ctx = _context(shared_data, tmp_path, 1.0, edits=zsre, pseudo=zsre, kind="zsre")
    edits = EditSet(tuple(read_edits(zsre, limit=6)), None)
    queries = generator_stage.zero_augmentation_queries(ctx, edits)
    assert len(queries) == 6
    raw = json.loads((shared_data / "zsre" / "zsre_mend_train-1k.json").read_text())
    questions = {r["loc"].partition("nq question: ")[2].lower() for r in raw}
    for q in queries:
        assert "nq question" not in q and q.endswith("?") and q == q.capitalize()
        assert q[:-1].lower() in questions  # "Who wrote x?" from "nq question: who wrote x"
    own = {q for r in edits.records for q in (r.prompt, *r.paraphrases, *r.locality_prompts)}
    assert not own & set(queries)
    # All the pseudo-edits' questions at most, whatever the ratio asks.
    many = _context(shared_data, tmp_path, 1000.0, edits=zsre, pseudo=zsre, kind="zsre")
    assert 6 < len(generator_stage.zero_augmentation_queries(many, edits)) < 6000


def test_fingerprint_includes_the_ratio_and_the_pseudo_file(shared_data, tmp_path):
    edits = _edits(shared_data, 4)

    def inputs(ratio, **data):
        ctx = _context(shared_data, tmp_path, ratio, n_edits=4, **data)
        return generator_stage.generator_inputs(ctx, edits, {"collect": "c"})

    off, half, one = inputs(0.0), inputs(0.5), inputs(1.0)
    assert "zero_augmentation" not in off.config  # runs without DA keep their identity
    assert len({off.fingerprint, half.fingerprint, one.fingerprint}) == 3
    assert len({off.lineage, half.lineage, one.lineage}) == 3
    assert inputs(1).fingerprint == one.fingerprint  # 1 and 1.0 are one setting
    other = inputs(1.0, pseudo=str(shared_data / "counterfact" / "counterfact-edit.json"))
    assert other.fingerprint != one.fingerprint
    assert inputs(0.0, pseudo="").fingerprint == off.fingerprint  # unused pseudo file: no matter


def _dit_inputs(shared_data, tmp_path):
    """`inputs(**dit)`: the generator stage's inputs on 4 edits with these DiT overrides."""
    edits = _edits(shared_data, 4)

    def inputs(**dit):
        ctx = _context(shared_data, tmp_path, 0.0, n_edits=4)
        g = ctx.cfg.generator
        overrides = {**g.overrides, "dit": dit}
        cfg = dataclasses.replace(ctx.cfg, generator=dataclasses.replace(g, overrides=overrides))
        return generator_stage.generator_inputs(RunContext.create(cfg), edits, {"collect": "c"})

    return inputs


def test_condition_noise_enters_the_generator_identity_only_when_on(shared_data, tmp_path):
    inputs = _dit_inputs(shared_data, tmp_path)
    off, zero, on = inputs(), inputs(cond_noise=0.0), inputs(cond_noise=0.3)
    assert "cond_noise" not in off.config["generator"]["dit"]  # earlier runs keep their identity
    assert zero.fingerprint == off.fingerprint and zero.lineage == off.lineage
    assert on.config["generator"]["dit"]["cond_noise"] == 0.3
    assert on.fingerprint != off.fingerprint and on.lineage != off.lineage


def test_condition_tokens_enter_the_generator_identity_only_when_on(shared_data, tmp_path):
    inputs = _dit_inputs(shared_data, tmp_path)
    off, on = inputs(cond_tokens=False), inputs(cond_tokens=True)
    assert "cond_tokens" not in off.config["generator"]["dit"]  # earlier runs keep their identity
    assert on.config["generator"]["dit"]["cond_tokens"] is True
    assert on.fingerprint != off.fingerprint and on.lineage != off.lineage
    # Each added setting is left out on its own: noise on, tokens off.
    noisy = inputs(cond_tokens=False, cond_noise=0.3).config["generator"]["dit"]
    assert "cond_tokens" not in noisy and noisy["cond_noise"] == 0.3


# ---------------------------------------------------------------- a generator trained with DA

N, M, L, E = 48, 48, 96, 16
SAMPLER = {"kind": "ddim", "steps": 20, "chunk_size": 48}  # one compiled shape for every call
STEPS = 300
TRAIN = {
    "dit": {"cond_dropout": 0.0},
    "optim": {"learning_rate": 1e-2, "warmup_steps": 50},
    "train": {
        "num_steps": STEPS,
        "batch_size": 32,  # both runs share one padded batch, so one compiled train step
        "shuffle": True,
        "ema_decay": 0.0,
        "eval_every": STEPS,
        "log_every": STEPS,
        "checkpoint_every": STEPS,
        "stop_threshold": 0.0,  # train the full budget
        "criterion_sampler": SAMPLER,
    },
    "sampler": SAMPLER,
}


def _synthetic(seed=0):
    """Bank rows (a smooth function of their condition, away from zero: a common offset) and
    other random conditions for the DA rows."""
    rng = np.random.default_rng(seed)
    cond = rng.normal(size=(N + M, E)).astype(np.float32)
    mixing = rng.normal(size=(E, L)) / np.sqrt(E)
    unit = cond / np.linalg.norm(cond, axis=1, keepdims=True) * np.sqrt(E)
    weights = 0.3 * np.tanh(unit @ mixing) + 0.2 * np.sign(rng.normal(size=L))
    return weights[:N].astype(np.float32), cond[:N], cond[N:]


def test_generator_trained_with_da_returns_the_zero_neuron_for_da_queries(tmp_path, monkeypatch):
    weights, cond, zero_cond = _synthetic()
    # "fast" standardises around the bank mean: the zero neuron is NOT x0 = 0.
    config = generator_config(TRAIN, preset="fast", dit_preset="tiny")
    seen = []
    real = diffusion_train.make_train_step

    def recording(config, mesh):
        step = real(config, mesh)

        def wrapped(state, x0, c, mask, rng):
            if len(seen) < 3:  # the first epoch: 96 rows in batches of 32
                seen.append((np.asarray(x0), np.asarray(c), np.asarray(mask)))
            return step(state, x0, c, mask, rng)

        return wrapped

    monkeypatch.setattr(diffusion_train, "make_train_step", recording)
    with_da = train_generator(weights, cond, config, tmp_path / "da", zero_conditions=zero_cond)

    # The normalisation describes the fitted neurons only.
    fitted = fit_normalization(config.normalization, weights, cond)
    for got, want in zip(with_da.state.norm, fitted, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    # What training was handed over one epoch: every bank row with its own target, every DA row
    # with the target that is the zero neuron in weight space.
    x0 = np.concatenate([s[0] for s in seen])[np.concatenate([s[2] for s in seen]) > 0]
    c = np.concatenate([s[1] for s in seen])[np.concatenate([s[2] for s in seen]) > 0]
    raw = np.asarray(denormalize(with_da.state.norm, x0))
    centred = np.concatenate([cond, zero_cond]) - np.asarray(fitted.cond_center)
    order = [int(np.argmin(np.abs(centred - row).sum(1))) for row in c]
    assert sorted(order) == list(range(N + M))
    targets = np.concatenate([weights, np.zeros((M, L), np.float32)])
    np.testing.assert_allclose(raw, targets[order], atol=1e-5)
    assert np.abs(x0[np.asarray(order) >= N]).max() > 0.5  # zero in weight space, not in x0
    assert with_da.evaluations[-1]["zero_l2_mean"] >= 0.0
    assert "bank_criterion" in with_da.evaluations[-1]

    without = train_generator(weights, cond, config, tmp_path / "plain")
    row_norm = float(np.linalg.norm(weights, axis=1).mean())  # about 2.7
    rng = jax.random.key(1)
    da_norms = np.linalg.norm(np.asarray(generate(with_da.state, zero_cond, rng, config)), axis=1)
    plain_norms = np.linalg.norm(np.asarray(generate(without.state, zero_cond, rng, config)), 1)
    assert da_norms.mean() < 0.15 * row_norm, (da_norms.mean(), row_norm)
    assert plain_norms.mean() > 0.5 * row_norm, (plain_norms.mean(), row_norm)
    # DA does not cost the edits their neurons.
    fits = np.asarray(generate(with_da.state, cond, rng, config)) - weights
    assert np.linalg.norm(fits, axis=1).mean() < 0.3 * row_norm

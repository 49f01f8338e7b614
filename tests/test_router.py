"""Router stage: the familiarity network, its entropy gate, training, calibration, real data."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import run_with_fake_devices
from test_bert import MINILM

from meg_jax.data.readers import read_edits
from meg_jax.encoder.text_encoder import TextEncoder
from meg_jax.router.calibrate import (
    CalibrationConfig,
    calibrate,
    roc_auc,
    roc_curve,
    write_calibration,
)
from meg_jax.router.network import FamiliarityConfig, FamiliarityNet, entropy
from meg_jax.router.train import RouterTrainConfig, random_labels, restore_router, train_router


def test_entropy_natural_log_with_clamp():
    logits = np.array([[0.0] * 10, [100.0] + [0.0] * 9, [0.0, 0.0] + [-1e4] * 8])
    h = np.asarray(entropy(logits))
    np.testing.assert_allclose(h[:1], [np.log(10)], rtol=1e-6)
    np.testing.assert_allclose(h[2], np.log(2) - 8 * 1e-8 * np.log(1e-8), rtol=1e-5)
    assert 0 < h[1] < 1e-3  # clamped probabilities keep it finite and positive


def test_network_matches_the_reference_size():
    # 768-d BERT: 5 blocks of 768->3072->768 plus a 768->10 head, about 23.6M parameters.
    shapes = jax.eval_shape(
        FamiliarityNet(FamiliarityConfig(768)).init,
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, 768), np.float32),
    )
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n == 5 * (768 * 3072 + 3072 + 3072 * 768 + 768) + 768 * 10 + 10


def test_roc_auc_threshold_and_report_files(tmp_path):
    rng = np.random.default_rng(0)
    pos = rng.uniform(0.0, 0.6, 200)
    neg = rng.uniform(0.4, 1.0, 300)
    fpr, tpr, thresholds = roc_curve(pos, neg)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(thresholds) > 0)
    np.testing.assert_allclose(roc_auc(pos, neg), np.trapezoid(tpr, fpr), rtol=1e-9)
    np.testing.assert_allclose(roc_auc(pos, neg), 1 - 0.5 * (0.2 / 0.6) * (0.2 / 0.6), atol=0.03)
    report = calibrate(pos, neg, report_sets={"edited": pos[:10], "unrelated": neg})
    assert 0.4 <= report["threshold"] <= 0.6
    assert report["routed_fraction"]["edited"] == 1.0
    strict = calibrate(pos, neg, CalibrationConfig(rule="fpr", target_fpr=0.0))
    assert strict["fpr"] == 0.0 and strict["threshold"] <= neg.min()
    write_calibration(report, tmp_path / "cal.json", tmp_path / "roc.png")
    assert json.loads((tmp_path / "cal.json").read_text())["auc"] == report["auc"]
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="positive"):
        calibrate(np.array([np.nan]), neg)


def test_training_memorises_is_deterministic_and_resumes(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    config = RouterTrainConfig(
        n_blocks=2, expansion=2, batch_size=16, num_epochs=40, learning_rate=1e-2, save_every=20
    )
    first = train_router(x, config, tmp_path / "a")
    # Another run, stopped at epoch 10 (step 30) and resumed from its checkpoint, must end
    # exactly where the first did: determinism and resume in one check.
    train_router(x, dataclasses.replace(config, num_epochs=10), tmp_path / "b")
    resumed = train_router(x, config, tmp_path / "b")
    jax.tree.map(np.testing.assert_array_equal, resumed.params, first.params)
    logits = FamiliarityNet(first.config).apply({"params": first.params}, x)
    labels = random_labels(40, 10, config.seed)
    assert np.mean(np.argmax(logits, -1) == labels) == 1.0  # random labels memorised
    h_seen = first.entropy(x)
    h_new = first.entropy(np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32))
    assert np.median(h_seen) < np.median(h_new)
    assert first.with_threshold(np.median(h_new)).route(x).mean() > 0.9
    restored = restore_router(tmp_path / "b", config, 16)
    np.testing.assert_array_equal(restored.entropy(x), first.entropy(x))
    with pytest.raises(ValueError, match=r"expected \[N, 16\]"):
        first.entropy(x[:, :8])


def test_training_from_a_trained_router_leaves_its_parameters_usable(tmp_path):
    # Extending a router (new queries appended) starts from its parameters; the donated training
    # state must be a copy, or the router handed in would be left with deleted arrays.
    x = np.random.default_rng(0).standard_normal((24, 8)).astype(np.float32)
    config = RouterTrainConfig(n_blocks=1, expansion=2, batch_size=8, num_epochs=2)
    first = train_router(x[:16], config, tmp_path / "first")
    before = first.entropy(x)
    extended = train_router(x, config, tmp_path / "extended", init_params=first.params)
    np.testing.assert_array_equal(first.entropy(x), before)
    assert not np.array_equal(extended.entropy(x), before)


def test_router_trains_on_eight_fake_devices(tmp_path):
    x = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    config = RouterTrainConfig(n_blocks=1, expansion=2, batch_size=12, num_epochs=3, dropout=0.0)
    want = train_router(x, config, tmp_path / "one").entropy(x)
    run_with_fake_devices(
        f"""
        import numpy as np
        from meg_jax.router.train import RouterTrainConfig, train_router
        x = np.load({str(tmp_path / "x.npy")!r})
        config = RouterTrainConfig(**{dataclasses.asdict(config)!r})
        router = train_router(x, config, {str(tmp_path / "eight")!r})
        assert router.mesh.shape["data"] == 8
        np.save({str(tmp_path / "eight.npy")!r}, router.entropy(x))
        """
    )
    # 12 examples per step either way (padded to 16 rows on 8 devices): the same training.
    np.testing.assert_allclose(np.load(tmp_path / "eight.npy"), want, atol=1e-5)


@pytest.mark.slow
def test_router_separates_edits_from_unrelated_queries_on_counterfact(tmp_path, shared_data):
    """Untuned MiniLM [CLS] of raw queries; 96 edits + 48 calibration pseudo-edits."""
    edits = read_edits(shared_data / "counterfact" / "counterfact-edit.json", limit=96)
    calib = read_edits(shared_data / "counterfact" / "counterfact-train.json")[-48:]
    encoder = TextEncoder.from_pretrained(MINILM, n_top_layers=1, batch_size=64)
    sets = {
        "edit": [r.prompt for r in edits],
        "edit_paraphrase": [r.paraphrases[0] for r in edits],
        "edit_locality": [r.locality_prompts[0] for r in edits],
        "calib": [r.prompt for r in calib],
        "calib_paraphrase": [r.paraphrases[0] for r in calib],
        "calib_locality": [r.locality_prompts[0] for r in calib],
    }
    cls = {k: encoder.encode(v) for k, v in sets.items()}
    # A narrower network than the reference's (2 blocks, 1x) keeps the test fast.
    config = RouterTrainConfig(n_blocks=2, expansion=1, batch_size=48, num_epochs=40)
    router = train_router(np.concatenate([cls["edit"], cls["calib"]]), config, tmp_path)
    h = {k: router.entropy(v) for k, v in cls.items()}
    report = calibrate(
        h["calib_paraphrase"],
        h["calib_locality"],
        report_sets={k: h[k] for k in ("edit", "edit_paraphrase", "edit_locality")},
    )
    routed = report["routed_fraction"]
    assert report["auc"] > 0.75
    assert roc_auc(h["edit_paraphrase"], h["edit_locality"]) > 0.75
    # The paper's behaviour: edited queries routed, paraphrases mostly, unrelated mostly not.
    assert routed["edit"] >= 0.95
    assert routed["edit_paraphrase"] > 0.6
    assert routed["edit_locality"] < 0.35
    assert routed["edit_paraphrase"] > routed["edit_locality"] + 0.4

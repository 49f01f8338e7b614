"""The nearest-query gate: its distance, batching, files, devices, and real CounterFact queries."""

import json

import numpy as np
import pytest
from conftest import run_with_fake_devices
from test_bert import MINILM

from meg_jax.data.readers import read_edits
from meg_jax.encoder.text_encoder import TextEncoder
from meg_jax.infra.sharding import make_mesh
from meg_jax.router.calibrate import calibrate, roc_auc
from meg_jax.router.gate import load_router
from meg_jax.router.nearest import NearestGate


def _brute_force(memory, queries):
    unit = memory / np.linalg.norm(memory, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return 1.0 - (q @ unit.T).max(axis=1)


def test_score_is_the_cosine_distance_to_the_nearest_memorised_query():
    rng = np.random.default_rng(0)
    memory = rng.normal(size=(37, 8)).astype(np.float32)
    queries = rng.normal(size=(50, 8)).astype(np.float32)
    # 16 rows per batch: 50 queries take four batches, the last one wrapped around.
    gate = NearestGate.build(memory, 0.2, make_mesh(), batch_size=16)
    np.testing.assert_allclose(gate.score(queries), _brute_force(memory, queries), atol=1e-6)
    # A memorised query is at distance 0 whatever its length; routing is "below the threshold".
    np.testing.assert_allclose(gate.score(3 * memory[:5]), 0.0, atol=1e-6)
    assert gate.route(memory).all()
    np.testing.assert_array_equal(gate.route(queries), gate.score(queries) < 0.2)
    assert not gate.with_threshold(0.0).route(queries).any() and gate.threshold == 0.2
    # A query's score does not depend on what else is in the call.
    np.testing.assert_array_equal(gate.score(queries[7:8]), gate.score(queries)[7:8])
    assert gate.score(np.zeros((0, 8), np.float32)).shape == (0,)


def test_bad_conditions_are_refused_with_the_row():
    memory = np.ones((4, 3), np.float32)
    memory[2] = 0.0
    with pytest.raises(ValueError, match="row 2 is zero or not finite"):
        NearestGate.build(memory, 0.1, make_mesh())
    gate = NearestGate.build(np.ones((4, 3), np.float32), 0.1, make_mesh())
    with pytest.raises(ValueError, match=r"expected \[N, 3\]"):
        gate.score(np.ones((2, 5), np.float32))


def test_a_saved_gate_is_what_load_router_reads_back(tmp_path):
    rng = np.random.default_rng(1)
    memory, queries = rng.normal(size=(9, 6)), rng.normal(size=(20, 6))
    gate = NearestGate.build(memory, 0.3, make_mesh(), batch_size=8)
    gate.save(tmp_path)
    assert json.loads((tmp_path / "router.json").read_text())["kind"] == "nearest"
    loaded = load_router(tmp_path, make_mesh())
    assert isinstance(loaded, NearestGate) and loaded.threshold == 0.3
    np.testing.assert_array_equal(loaded.score(queries), gate.score(queries))
    (tmp_path / "nearest.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="nearest.npy: no readable nearest-query gate"):
        load_router(tmp_path, make_mesh())


def test_the_gate_on_eight_fake_devices_scores_as_on_one(tmp_path):
    rng = np.random.default_rng(2)
    memory, queries = rng.normal(size=(30, 8)), rng.normal(size=(45, 8))
    np.save(tmp_path / "memory.npy", memory)
    np.save(tmp_path / "queries.npy", queries)
    want = NearestGate.build(memory, 0.1, make_mesh(), batch_size=12).score(queries)
    run_with_fake_devices(
        f"""
        import numpy as np
        from meg_jax.infra.sharding import make_mesh
        from meg_jax.router.nearest import NearestGate
        mesh = make_mesh()
        assert mesh.shape["data"] == 8
        folder = {str(tmp_path)!r}
        gate = NearestGate.build(np.load(folder + "/memory.npy"), 0.1, mesh, 12)
        np.save(folder + "/eight.npy", gate.score(np.load(folder + "/queries.npy")))
        """
    )
    np.testing.assert_allclose(np.load(tmp_path / "eight.npy"), want, atol=1e-6)


@pytest.mark.slow
def test_the_gate_separates_paraphrases_from_neighbourhood_prompts_on_counterfact(shared_data):
    """Untuned MiniLM [CLS] of raw queries; 96 edits + 48 calibration pseudo-edits memorised,
    the threshold calibrated on the pseudo-edits, the edits' own prompts then routed."""
    edits = read_edits(shared_data / "counterfact" / "counterfact-edit.json", limit=96)
    calib = read_edits(shared_data / "counterfact" / "counterfact-train.json")[-48:]
    encoder = TextEncoder.from_pretrained(MINILM, n_top_layers=1, batch_size=64)

    def cls(records, field):
        return encoder.encode([getattr(r, field)[0] for r in records])

    prompts = encoder.encode([r.prompt for r in [*calib, *edits]])
    gate = NearestGate.build(prompts, 0.1, make_mesh())
    d = {
        "edit_paraphrase": gate.score(cls(edits, "paraphrases")),
        "edit_locality": gate.score(cls(edits, "locality_prompts")),
    }
    report = calibrate(
        gate.score(cls(calib, "paraphrases")),
        gate.score(cls(calib, "locality_prompts")),
        report_sets={"edit": gate.score(prompts[48:]), **d},
    )
    routed = report["routed_fraction"]
    print(report["auc"], roc_auc(d["edit_paraphrase"], d["edit_locality"]), routed)
    assert report["auc"] > 0.9 and roc_auc(d["edit_paraphrase"], d["edit_locality"]) > 0.9
    assert routed["edit"] == 1.0
    assert routed["edit_paraphrase"] > 0.8 and routed["edit_locality"] < 0.15

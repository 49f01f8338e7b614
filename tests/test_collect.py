"""Weight collection on the real SmolLM2, against the shared reference bank.

The bank in ../shared/data was fitted by the MeG reference's PyTorch code (true reset per edit,
SGD lr 0.5, 50 steps, layer 14); our batched, split-execution fit from the same initial neuron
must land on the same neurons and pass the same greedy success test.
"""

import numpy as np
import pytest

from meg_jax.collect.bank import WeightBank, load_bank, save_bank
from meg_jax.collect.fit import learning_rate_schedule
from meg_jax.collect.stage import CollectConfig, Collector, collect_bank
from meg_jax.data.readers import read_edits
from meg_jax.data.templates import get_template
from meg_jax.evaluation.metrics import answer_ag_correct
from meg_jax.pipeline.collection import edits_to_fit


def test_fit_matches_reference_bank_and_resumes(shared_data, tmp_path):
    hosts = pytest.importorskip("meg_jax.checkpoints.hosts")
    try:
        config, params, tok = hosts.load_host(
            "smollm2", neuron_layer=14, neuron_activation="identity"
        )
    except FileNotFoundError as err:
        pytest.skip(str(err))
    bank_path = shared_data / "banks" / "smollm2_cf256" / "bank.npz"
    reference = load_bank(bank_path)
    template = get_template("smollm2")
    records = read_edits(shared_data / "counterfact" / "counterfact-edit.json", limit=3)
    edits = edits_to_fit(records, template)
    collector = Collector(
        config,
        params,
        tok,
        CollectConfig(batch_size=2, chunk_size=2, init_from_bank=str(bank_path)),
        lambda texts, targets: answer_ag_correct(texts, targets, template.answer_cuts),
    )
    out = tmp_path / "bank.npz"
    # A partial bank from an "interrupted" run: the first chunk only.
    save_bank(collector.fit_batch(edits[:2]), out)
    calls = []
    bank = collect_bank(collector, edits, out, on_chunk=calls.append)
    assert len(calls) == 1 and len(bank) == 3  # resumed: only the last chunk was fitted
    rows = {int(c): i for i, c in enumerate(reference.case_id)}
    for i, r in enumerate(records):
        ref = reference.weights[rows[r.id]]
        assert bank.success[i] == reference.success[rows[r.id]]
        displacement = np.linalg.norm(ref - reference.init)
        assert np.linalg.norm(bank.weights[i] - ref) < 0.02 * displacement
    np.testing.assert_array_equal(bank.init, reference.init)


def test_bank_round_trip_and_errors(tmp_path):
    bank = WeightBank(
        np.arange(3),
        np.ones((3, 4), np.float32),
        np.array([True, False, True]),
        np.zeros(3, np.float32),
        np.zeros(4, np.float32),
    )
    save_bank(bank, tmp_path / "b.npz")
    again = load_bank(tmp_path / "b.npz")
    np.testing.assert_array_equal(again.fitted, [True, False, True])
    np.savez(tmp_path / "bad.npz", weights=np.ones((2, 2)))
    with pytest.raises(ValueError, match="bad.npz: weight bank lacks field"):
        load_bank(tmp_path / "bad.npz")


def test_learning_rate_schedules():
    np.testing.assert_allclose(learning_rate_schedule(0.5, "constant", 0, 3, 10), [0.5] * 3)
    cosine = learning_rate_schedule(1.0, "cosine", 0, 11, 10)
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[10] == pytest.approx(0)
    with pytest.raises(ValueError, match="collect.schedule"):
        learning_rate_schedule(1.0, "linear", 0, 3, 10)

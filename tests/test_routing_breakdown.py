"""Where Generality is lost: the routing breakdown of each AG reading (share routed, AG when
routed, AG when given the zero neuron, AG of the bank's own neuron), on a tiny end-to-end run
that evaluates every paraphrase and locality prompt (`evaluation.all_prompts`)."""

import json

import numpy as np
import pytest
from tiny_run import make_given_bank, make_tiny_host, tiny_run_config

from meg_jax.collect.bank import WeightBank
from meg_jax.data.readers import read_edits
from meg_jax.data.templates import get_template
from meg_jax.evaluation.report import format_routing
from meg_jax.pipeline import pipeline_config, run
from meg_jax.pipeline.evaluation import bank_neuron_editor, routing_breakdown

N_EDITS = 6


def write_multi_counterfact(shared_data, path, n):
    """The first `n` shared CounterFact edits in MEMIT's multi_counterfact form, with 1 or 2
    paraphrases and 1 to 3 neighbourhood prompts each (borrowed from the next records)."""
    records = read_edits(shared_data / "counterfact" / "counterfact-edit.json", limit=n)
    out = []
    for i, r in enumerate(records):
        assert r.subject in r.prompt, r.id
        neighbours = [records[(i + k) % n].locality_prompts[0] for k in range(3)]
        out.append(
            {
                "case_id": r.id,
                "requested_rewrite": {
                    "prompt": r.prompt.replace(r.subject, "{}", 1),
                    "subject": r.subject,
                    "target_new": {"str": r.target_new},
                    "target_true": {"str": r.target_true},
                },
                "paraphrase_prompts": [r.paraphrases[0], f"In short, {r.prompt}"][: 1 + i % 2],
                "neighborhood_prompts": neighbours[: 1 + i % 3],
            }
        )
    path.write_text(json.dumps(out))
    return path


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """(config, summaries) of a tiny run evaluated on every prompt."""
    root = tmp_path_factory.mktemp("breakdown")
    host = make_tiny_host(root / "host", shared_data)
    bank = make_given_bank(root / "bank.npz", shared_data, N_EDITS)
    edits = write_multi_counterfact(shared_data, root / "multi_counterfact.json", N_EDITS)
    config = tiny_run_config(shared_data, host, bank, root / "run", N_EDITS)
    config["data"]["edits"] = str(edits)
    config["evaluation"]["all_prompts"] = True
    cfg = pipeline_config(config)
    return cfg, run(cfg)


def test_breakdown_adds_up_to_the_headline_figures(trained):
    _, summaries = trained
    meg = summaries["meg"]
    assert meg["all_prompts"] and meg["n_gen"] > N_EDITS and meg["n_loc"] > N_EDITS
    for kind in ("rel", "gen", "loc"):
        entry = meg["routing"][kind]
        assert entry["n"] == meg[f"n_{kind}"]
        share = entry["routed"]
        total = share * (entry["ag_when_routed"] or 0.0)
        total += (1.0 - share) * (entry["ag_when_not_routed"] or 0.0)
        assert total == pytest.approx(meg[f"{kind}_ag"], abs=1e-9), kind
    table = format_routing(meg)
    assert table.count("\n") == 5 and "gen" in table


def test_bank_neuron_readings_cover_every_edit_and_prompt(trained):
    _, summaries = trained
    meg = summaries["meg"]
    assert meg["n_bank_neuron"] == N_EDITS  # the given bank: every row fitted
    for key in ("rel_ag_bank_neuron", "gen_ag_bank_neuron", "gen_tf_bank_neuron"):
        assert 0.0 <= meg[key] <= 100.0
    gen = meg["routing"]["gen"]
    assert gen["n_bank_neuron"] == meg["n_gen"]
    assert gen["ag_bank_neuron"] == pytest.approx(meg["gen_ag_bank_neuron"], abs=1e-9)
    assert "ag_bank_neuron" not in meg["routing"]["loc"]


def test_unedited_model_agrees_with_itself_on_every_locality_prompt(trained):
    cfg, summaries = trained
    unedited = summaries["unedited"]
    assert unedited["n_loc"] == summaries["meg"]["n_loc"]
    assert unedited["loc_ag"] == 100.0 and unedited["loc_tf_self"] == 100.0
    # The answer memo keeps its format: one map from templated prompt to the raw answer,
    # now holding every locality prompt.
    from pathlib import Path

    (memo,) = (Path(cfg.workdir) / "edits").glob("answers-*.json")
    answers = json.loads(memo.read_text())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in answers.items())
    template = get_template(cfg.host.template)
    rows = [json.loads(line) for line in open(Path(cfg.workdir) / "evaluation/meg/examples.jsonl")]
    loc = [row["loc_query"] for row in rows]
    loc += [e["query"] for row in rows for e in row.get("loc_extra", [])]
    assert len(loc) == unedited["n_loc"]
    assert all(template.format_query(q) in answers for q in loc)


def test_routing_breakdown_by_hand():
    rows = [
        {"id": 1, "gen_query": "a", "gen_ag": True, "gen_extra": [{"query": "b", "ag": False}]},
        {"id": 2, "gen_query": "c", "gen_ag": True},
    ]
    bank_rows = [{"id": 1, "gen_query": "a", "gen_ag": False, "gen_extra": [{"ag": True}]}]
    routed = {"gen": np.asarray([True, False, False])}
    entry = routing_breakdown(rows, routed, bank_rows)["gen"]
    assert entry["n"] == 3 and entry["routed"] == pytest.approx(1 / 3)
    assert entry["ag_when_routed"] == 100.0 and entry["ag_when_not_routed"] == 50.0
    assert entry["n_bank_neuron"] == 2 and entry["ag_bank_neuron"] == 50.0
    assert entry["ag_bank_neuron_when_routed"] == 0.0
    assert entry["ag_bank_neuron_when_not_routed"] == 100.0
    assert "ag_bank_neuron" not in routing_breakdown(rows, routed)["gen"]


def test_bank_neuron_editor_gives_each_record_its_own_row(shared_data):
    records = read_edits(shared_data / "counterfact" / "counterfact-edit.json", limit=3)
    d = 4
    weights = np.arange(3 * 2 * d, dtype=np.float32).reshape(3, 2 * d) + 1.0
    weights[2] = np.nan  # a failed fit: its record is left out
    ids = np.asarray([records[1].id, records[0].id, records[2].id], np.int64)
    bank = WeightBank(ids, weights, np.ones(3, bool), np.zeros(3, np.float32), np.zeros(2 * d))
    editor, covered = bank_neuron_editor(records, bank, d, with_bias=False)
    assert [r.id for r in covered] == [records[0].id, records[1].id]
    queries = [records[0].paraphrases[0], records[1].prompt, "unrelated", records[2].prompt]
    neuron = editor(queries)
    np.testing.assert_array_equal(neuron.w_in[0], weights[1, :d])  # records[0] is row 1
    np.testing.assert_array_equal(neuron.w_out[1], weights[0, d:])
    assert not neuron.w_in[2:].any() and not neuron.w_out[2:].any()  # zero neuron

"""End to end: every MeG stage on a tiny host, real records, the real MiniLM encoder.

A tiny random Llama with the GPT-2 vocabulary stands in for the LLM (its tokenizer is the real
GPT-2 one, saved beside it), so the run is minutes, not hours; the point is that the stages fit
together, skip, resume and extend, and that the trained work directory loads and evaluates the
same, not that a random model edits well. A random model cannot be made to state a fact by one
neuron, so the weight bank is given (random neurons marked fitted); the collection stage itself is
checked on the real SmolLM2 in test_collect.py.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_run import make_given_bank, make_tiny_host, tiny_run_config

import meg_jax
from meg_jax.collect.bank import WeightBank, load_bank, save_bank
from meg_jax.collect.stage import CollectConfig
from meg_jax.data.readers import read_edits
from meg_jax.data.templates import get_template
from meg_jax.infra.fingerprint import StageInputsChanged, StageRecord, without_legacy
from meg_jax.infra.sharding import make_mesh
from meg_jax.pipeline import pipeline_config, run
from meg_jax.pipeline.collection import edits_to_fit, fit_settings
from meg_jax.pipeline.context import StageNotReady
from meg_jax.router.gate import load_router
from meg_jax.router.nearest import NearestGate

N_EDITS = 6
N_BANK = 9  # the given bank covers the edits of the extension too


@pytest.fixture(scope="module")
def tiny_host(shared_data, tmp_path_factory):
    return make_tiny_host(tmp_path_factory.mktemp("host"), shared_data)


@pytest.fixture(scope="module")
def given_bank(shared_data, tmp_path_factory):
    return make_given_bank(tmp_path_factory.mktemp("bank") / "given_bank.npz", shared_data, N_BANK)


def _config(shared_data, host, bank, workdir, **changes):
    """The tiny run's config; `a__b=value` changes field a.b."""
    config = tiny_run_config(shared_data, host, bank, workdir, N_EDITS)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return pipeline_config(config)


@pytest.fixture(scope="module")
def trained(shared_data, tiny_host, given_bank, tmp_path_factory):
    """(config, summaries) of one trained tiny work directory, shared by the tests below."""
    workdir = tmp_path_factory.mktemp("run")
    cfg = _config(shared_data, tiny_host, given_bank, workdir)
    return cfg, run(cfg)


def _records(workdir, stage):
    return StageRecord.read(workdir / stage)


def test_pipeline_end_to_end_and_rerun_changes_nothing(trained):
    cfg, summaries = trained
    workdir = cfg.workdir
    unedited, meg = summaries["unedited"], summaries["meg"]
    assert unedited["loc_ag"] == 100.0  # the unedited model agrees with itself
    for key in ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf"):
        assert 0.0 <= meg[key] <= 100.0
    from pathlib import Path

    workdir = Path(workdir)
    for name in (
        "summary.json",
        "editor.json",
        "router/calibration.json",
        "router/roc.png",
        "router/router.msgpack",
        "generator/params.msgpack",
        "collect/bank.npz",
        "evaluation/meg/summary.json",
        "evaluation/meg/metrics.png",
        "evaluation/unedited/examples.jsonl",
    ):
        assert (workdir / name).is_file(), name
    stages = ("edits", "encoder", "router", "collect", "generator", "evaluation")
    records = {s: _records(workdir, s) for s in stages}
    assert all(r is not None and r.finished for r in records.values())
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    again = run(cfg)  # every stage is finished for these inputs: nothing is re-entered
    assert again == summaries
    after = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    changed = {str(p.relative_to(workdir)) for p in after if before.get(p) != after[p]}
    assert changed <= {"config.json", "editor.json"}, changed


def test_load_editor_and_evaluate_reproduce_the_pipeline(trained, shared_data):
    cfg, summaries = trained
    from pathlib import Path

    from meg_jax.evaluate import evaluate

    workdir = Path(cfg.workdir)
    rows = [json.loads(line) for line in (workdir / "evaluation/meg/examples.jsonl").open()]
    editor = meg_jax.load_editor(workdir, batch_size=8)
    for kind in ("rel", "gen", "loc"):
        queries = [r[f"{kind}_query"] for r in rows]
        assert editor.generate(queries) == [r[f"{kind}_prediction"] for r in rows]
    # The evaluate command recomputes (retrain of the derived stage) the same readings.
    import dataclasses

    redo = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, retrain=True))
    assert evaluate(redo) == summaries
    again = [json.loads(line) for line in (workdir / "evaluation/meg/examples.jsonl").open()]
    assert again == rows


def test_a_query_neuron_does_not_depend_on_its_batch(trained):
    cfg, _ = trained
    editor = meg_jax.load_editor(cfg.workdir, batch_size=8)
    editor.editor.router = None  # route everything: every query is sampled
    queries = ["Where is the Eiffel Tower?", "Who wrote Hamlet?", "What is the capital of Peru?"]
    alone = editor.editor.flat([queries[1]])[0]
    for batch in ([queries[1], queries[0]], queries, [queries[2], queries[0], queries[1]] * 5):
        flat = editor.editor.flat(batch)
        assert np.array_equal(flat[batch.index(queries[1])], alone)
    assert np.any(alone != 0)


def test_changed_inputs_stop_each_stage_with_the_ways_out(
    trained, shared_data, tiny_host, given_bank, tmp_path
):
    cfg, _ = trained
    cases = {
        "encoder": {"encoder__infonce__temperature": 0.5},
        "router": {"router__train__num_epochs": 21},
        "generator": {"generator__overrides": {"train": {"num_steps": 21, "eval_every": 10}}},
    }
    for stage, change in cases.items():
        changed = _config(shared_data, tiny_host, given_bank, cfg.workdir, **change)
        with pytest.raises(StageInputsChanged, match=rf"stage '{stage}'.*retrain=True") as err:
            run(changed)
        assert "fresh work directory" in str(err.value)
    # Collection: another bank file is another input.
    other = tmp_path / "other.npz"
    bank = load_bank(given_bank)
    save_bank(
        WeightBank(bank.case_id, bank.weights * 2, bank.success, bank.final_loss, bank.init), other
    )
    changed = _config(shared_data, tiny_host, other, cfg.workdir)
    with pytest.raises(StageInputsChanged, match=r"stage 'collect'.*setting bank"):
        run(changed)
    # Fewer edits is not an extension.
    with pytest.raises(StageInputsChanged, match="removed"):
        run(_config(shared_data, tiny_host, given_bank, cfg.workdir, data__n_edits=N_EDITS - 1))
    # One stage alone needs the stages before it finished for the same inputs, and runs none
    # after it.
    with pytest.raises(StageNotReady, match="--config.stage=edits"):
        run(_config(shared_data, tiny_host, given_bank, tmp_path / "empty", stage="router"))
    assert run(_config(shared_data, tiny_host, given_bank, tmp_path / "one", stage="edits")) == {}
    assert _records(tmp_path / "one", "edits").finished
    assert not (tmp_path / "one" / "encoder").exists()


def test_adding_edits_extends_every_stage(trained, shared_data, tiny_host, given_bank, tmp_path):
    _copy_stages(trained, tmp_path)  # every stage finished on the N_EDITS edits
    bank_before = load_bank(tmp_path / "collect" / "bank.npz")
    router_before = _records(tmp_path, "router")
    bigger = _config(shared_data, tiny_host, given_bank, tmp_path, data__n_edits=N_EDITS + 2)
    summaries = run(bigger)
    bank_after = load_bank(tmp_path / "collect" / "bank.npz")
    assert len(bank_after) == N_EDITS + 2
    for field in ("case_id", "weights", "success", "final_loss"):
        assert np.array_equal(getattr(bank_after, field)[:N_EDITS], getattr(bank_before, field))
    for stage in ("router", "collect", "generator"):
        record = _records(tmp_path, stage)
        assert record.finished and len(record.inputs.items) == N_EDITS + 2, stage
    assert _records(tmp_path, "router").inputs.fingerprint != router_before.inputs.fingerprint
    # The router was retrained on the union from its initialisation: the router of a run on
    # the union from scratch, bit for bit.
    scratch = _config(
        shared_data, tiny_host, given_bank, tmp_path / "scratch", data__n_edits=N_EDITS + 2
    )
    _train_through_router(scratch)
    assert _leaves_equal(_router(tmp_path), _router(tmp_path / "scratch"))
    assert summaries["meg"]["n_records"] == N_EDITS + 2
    assert summaries["unedited"]["loc_ag"] == 100.0


def test_a_warm_router_extension_continues_from_the_trained_router(
    trained, shared_data, tiny_host, given_bank, tmp_path
):
    _copy_stages(trained, tmp_path, ("edits", "encoder", "router"))  # trained on N_EDITS
    before = _router(tmp_path)
    changes = {"data__n_edits": N_EDITS + 2, "router__extend_warm": True}
    bigger = _config(shared_data, tiny_host, given_bank, tmp_path, **changes)
    _train_through_router(bigger)
    record = _records(tmp_path, "router")
    log = tmp_path / "router" / "runs" / record.inputs.fingerprint / "warm" / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in log.open()]
    epochs = bigger.router.extend_epochs  # one step per epoch: the batch holds every query
    assert steps[-1] == epochs and len(record.inputs.items) == N_EDITS + 2
    assert not _leaves_equal(_router(tmp_path), before)


def test_a_nearest_gate_routes_the_run_and_extends_as_from_scratch(
    trained, shared_data, tiny_host, given_bank, tmp_path
):
    cfg = _config(shared_data, tiny_host, given_bank, tmp_path, router__kind="nearest")
    _copy_stages(trained, tmp_path, ("edits", "encoder"))  # the gate's inputs, as trained
    _train_through_router(cfg)
    gate = load_router(tmp_path / "router", make_mesh())
    record = _records(tmp_path, "router")
    assert isinstance(gate, NearestGate) and record.summary["calibrated"]
    assert gate.threshold == record.summary["threshold"]
    assert record.inputs.config["kind"] == "nearest" and "train" not in record.inputs.config
    # More edits: the gate on the union, as a run on the union from scratch builds it.
    changes = {"data__n_edits": N_EDITS + 2}
    bigger = _config(
        shared_data, tiny_host, given_bank, tmp_path, router__kind="nearest", **changes
    )
    summaries = run(bigger)
    scratch = _config(
        shared_data, tiny_host, given_bank, tmp_path / "scratch", router__kind="nearest", **changes
    )
    _train_through_router(scratch)
    grown, fresh = (
        load_router(w / "router", make_mesh()) for w in (tmp_path, tmp_path / "scratch")
    )
    np.testing.assert_array_equal(np.asarray(grown.memory), np.asarray(fresh.memory))
    assert grown.threshold == fresh.threshold
    routing = summaries["meg"]["routing"]
    assert routing["rel"]["routed"] == 1.0  # every edit prompt is memorised: distance 0


def test_the_familiarity_router_keeps_its_identity_from_before_gate_kinds(trained):
    cfg, _ = trained
    config = _records(Path(cfg.workdir), "router").inputs.config
    assert "kind" not in config and "nearest_threshold" not in config and "train" in config


def _copy_stages(trained, workdir: Path, stages=None) -> None:
    """The trained run's finished `stages` (all: the whole work directory) copied into
    `workdir`: a test that extends a run starts from the shared run's stages (its records name
    no folder, only their inputs) instead of training the same stages again."""
    source = Path(trained[0].workdir)
    if stages is None:
        shutil.copytree(source, workdir, dirs_exist_ok=True)
    for stage in stages or ():
        shutil.copytree(source / stage, workdir / stage)


def _train_through_router(cfg) -> None:
    """Runs the stages up to and including the router, one at a time."""
    for stage in ("edits", "encoder", "router"):
        run(dataclasses.replace(cfg, stage=stage))


def _router(workdir) -> dict:
    """The trained router's parameters in `workdir`, as host arrays."""
    return jax.tree.map(np.asarray, load_router(workdir / "router", make_mesh()).params)


def _leaves_equal(a: dict, b: dict) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(x, y) for x, y in pairs)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="config.collect.fit: unknown config key"):
        pipeline_config({"collect": {"fit": {"lerning_rate": 0.1}}})


def test_collection_inputs_are_keyed_by_dataset_ids(shared_data):
    records = read_edits(shared_data / "counterfact" / "counterfact-edit.json", limit=3)
    template = get_template("gptj")
    edits = edits_to_fit(records, template)
    assert [e.case_id for e in edits] == [r.id for r in records]
    assert edits[0].query == template.format_query(records[0].prompt)
    assert edits[0].answer == template.format_answer(records[0].target_new)
    assert edits[0].target == records[0].target_new
    assert edits[0].contexts == ()
    behind = edits_to_fit(records, get_template("smollm2_qa"), ("The sun rose.", "I think"))
    assert behind[1].contexts == tuple(
        get_template("smollm2_qa").format_query(f"{c} {records[1].prompt}")
        for c in ("The sun rose.", "I think.")
    )


def test_context_settings_enter_the_collection_identity_only_when_on():
    """Banks collected before contexts existed keep their stage identity."""
    off = fit_settings(CollectConfig.fast())
    assert "context_seeds" not in off and "context_tokens" not in off
    on = fit_settings(CollectConfig.fast(context_seeds=("The",)))
    assert on["context_seeds"] == ("The",) and on["context_tokens"] == 10


def test_settings_added_later_leave_the_identity_only_at_their_legacy_values():
    settings = {"a": 1, "dit": {"noise": 0.0, "width": 8}, "seeds": (), "tokens": 10}
    dropped = without_legacy(settings, {"dit.noise": 0, "seeds": []}, ("tokens",))
    assert dropped == {"a": 1, "dit": {"width": 8}}  # 0 == 0.0 and () == [] in JSON form
    assert settings["dit"] == {"noise": 0.0, "width": 8} and "tokens" in settings  # a copy
    changed = {**settings, "seeds": ("The",)}
    assert without_legacy(changed, {"dit.noise": 0, "seeds": []}, ("tokens",)) == changed


def test_an_artefact_changed_behind_its_stage_is_evaluated_again(trained):
    """Evaluation reads back its results only while the editor's files are the ones it
    evaluated: a router file rewritten without its stage's inputs changing is re-evaluated."""
    from pathlib import Path

    cfg, summaries = trained
    workdir = Path(cfg.workdir)
    router_json = workdir / "router" / "router.json"
    original = router_json.read_bytes()
    before = _records(workdir, "evaluation").inputs
    try:
        router_json.write_text(json.dumps(json.loads(original), indent=4))  # same meaning
        again = run(cfg)
        after = _records(workdir, "evaluation").inputs
        assert after.upstream["artefacts"] != before.upstream["artefacts"]
        assert _records(workdir, "router").inputs == _records(workdir, "router").inputs
        assert again == summaries  # the same router, evaluated again
    finally:
        router_json.write_bytes(original)

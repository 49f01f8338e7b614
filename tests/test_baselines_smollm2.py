"""Each baseline inserts a few CounterFact facts into SmolLM2 and the unchanged evaluator sees
them (configs/baseline_smollm2.py:tiny, with fewer steps still)."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from meg_jax.baselines import baseline_config, run_baseline
from meg_jax.evaluation.evaluator import EvalConfig, evaluate_meg
from meg_jax.inference.editor import zero_editor
from meg_jax.inference.runner import ModelRunner

REPO = Path(__file__).resolve().parents[1]
EDITS = REPO.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
N = 3

pytestmark = pytest.mark.skipif(not EDITS.is_file(), reason=f"{EDITS} not found")


def _config(method: str):
    spec = importlib.util.spec_from_file_location("c", REPO / "configs/baseline_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(f"method={method},tiny")


@pytest.fixture(scope="module")
def setup():
    from meg_jax.checkpoints.hosts import load_host
    from meg_jax.data.download import load_edits
    from meg_jax.data.templates import get_template

    try:
        host = load_host("smollm2")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return host, load_edits(EDITS, limit=N), get_template("smollm2")


@pytest.fixture(scope="module")
def unedited(setup):
    """The unedited model's readings, the same for every method: evaluated once."""
    host, records, template = setup
    return _rel(host, host.params, records, template)


def _rel(host, params, records, template):
    runner = ModelRunner(host.config, params, host.tokenizer, batch_size=4, show_progress=False)
    cfg = EvalConfig(batch_size=4, max_new_tokens=6)
    _, summary = evaluate_meg(
        runner, records, template, zero_editor(host.config.d_model), None, cfg
    )
    return summary


# MEMIT's own SmolLM2 run is test_baseline_pipeline's, through train and evaluate (the same
# evaluator); AlphaEdit, MEMIT's projected update, also runs its target fit and statistics here.
@pytest.mark.parametrize("method", ["ft", "alphaedit"])
def test_baseline_inserts_facts(setup, unedited, method, tmp_path_factory):
    host, records, template = setup
    cfg = baseline_config(_config(method).baseline)
    if method == "ft":  # a loose box: this checks the plumbing, not FT-L's tuned bound
        cfg = dataclasses.replace(
            cfg, ft=dataclasses.replace(cfg.ft, lr=1e-2, norm_constraint=5e-2)
        )
    workdir = tmp_path_factory.getbasetemp() / "baselines"  # statistics shared by the methods
    edited, info = run_baseline(method, host, records, template, cfg, workdir)
    before = unedited
    after = _rel(host, edited, records, template)
    assert before["rel_ag"] == 0.0  # CounterFact's targets are counterfactual
    # The edited model reads the new targets under teacher forcing (MEMIT reaches about 60 % TF
    # on SmolLM2 with the tiny variant's short fitting; the unedited model near 0 %).
    assert after["rel_tf"] >= before["rel_tf"] + 30, (method, before, after, info)

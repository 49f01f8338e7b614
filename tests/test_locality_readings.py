"""Locality readings that measure something: the empty-label guard and Loc TF on the unedited
model's own tokens (100 for the unedited model by construction, lower once edited)."""

import numpy as np
import pytest
from test_evaluator import _random_editor, setup  # noqa: F401 (the fixture)

from meg_jax.data.preprocess import pre_edit_answers
from meg_jax.data.templates import get_template
from meg_jax.evaluation.evaluator import (
    EmptyLabelsError,
    EvalConfig,
    check_locality_labels,
    evaluate_meg,
)
from meg_jax.inference.editor import zero_editor
from meg_jax.inference.runner import ModelRunner

GPT2_VOCAB = 50257  # the tokenizer's vocabulary


@pytest.fixture(scope="module")
def loc_setup(setup):  # noqa: F811 (the imported fixture)
    """test_evaluator's tiny Llama and records, with the unedited model's locality labels."""
    config, params, tokenizer, records, _ = setup
    runner = ModelRunner(config, params, tokenizer, batch_size=4, show_progress=False)
    template = get_template("gptj")
    zero = zero_editor(config.d_model)
    labels = pre_edit_answers(
        [r.locality_prompts[0] for r in records],
        template,
        lambda prompts: runner.generate(prompts, zero(prompts), 8),
    )
    return config, runner, records, template, labels


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_unedited_model_scores_100_on_every_token_level_loc_reading(loc_setup, mode):
    config, runner, records, template, labels = loc_setup
    cfg = EvalConfig(batch_size=4, max_new_tokens=8, tf_mode=mode, max_empty_labels=1.0)
    rows, summary = evaluate_meg(
        runner, records, template, zero_editor(config.d_model), labels, cfg, loc_reference="own"
    )
    assert summary["loc_ag"] == 100.0
    assert summary["loc_tf_self"] == 100.0
    assert all(len(r["loc_generated"]) >= 1 for r in rows)  # the stop token is part of it
    # An edited model is read against the unedited model's tokens, and moves off them.
    reference = [r["loc_generated"] for r in rows]
    _, edited = evaluate_meg(
        runner, records, template, _random_editor(config.d_model), labels, cfg, reference
    )
    assert edited["loc_tf_self"] < 100.0
    assert "score_loc_tf_self" in edited and "loc_tf" in edited


def test_self_tf_reads_forward_passes_where_the_generation_left_the_reference(loc_setup):
    config, runner, records, template, labels = loc_setup
    cfg = EvalConfig(batch_size=4, max_new_tokens=8, max_empty_labels=1.0)
    rows, _ = evaluate_meg(runner, records, template, zero_editor(config.d_model), labels, cfg)
    # A reference the model did not generate: its first token replaced everywhere.
    wrong = [[(r["loc_generated"][0] + 1) % GPT2_VOCAB, *r["loc_generated"][1:]] for r in rows]
    _, summary = evaluate_meg(
        runner, records, template, zero_editor(config.d_model), labels, cfg, wrong
    )
    first_wrong = np.mean([1.0 / len(w) for w in wrong])
    assert summary["loc_tf_self"] <= 100.0 * (1 - first_wrong) + 1e-9


def test_empty_label_guard_fires_and_names_the_file():
    labels = ["Paris", "", "", "English"]
    assert check_locality_labels(labels, "edits.json", 0.5) == 0.5
    with pytest.raises(EmptyLabelsError, match=r"edits.json: 2 of 4 pre-edit locality answers"):
        check_locality_labels(labels, "edits.json", 0.1)
    with pytest.raises(ValueError, match="max_empty_labels"):
        EvalConfig(max_empty_labels=1.5)

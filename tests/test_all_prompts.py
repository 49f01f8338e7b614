"""`EvalConfig.all_prompts`: every paraphrase and locality prompt a record has, each locality
prompt against the unedited model's own answer, readings averaged over prompts, and MeG's
first-prompt readings kept beside them."""

import dataclasses

import numpy as np
import pytest
from test_evaluator import _random_editor, setup  # noqa: F401 (the fixture)

from meg_jax.data.preprocess import pre_edit_answers
from meg_jax.data.templates import get_template
from meg_jax.evaluation.evaluator import EvalConfig, evaluate_meg, kind_entries, loc_references
from meg_jax.evaluation.report import format_table
from meg_jax.inference.editor import zero_editor
from meg_jax.inference.runner import ModelRunner

SIX = ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf")


def multi_prompt(records):
    """The records with several paraphrases and locality prompts (1 to 3 each, varying by
    record so prompt-weighted and record-weighted means differ), as multi_counterfact has."""
    out = []
    for i, r in enumerate(records):
        others = [records[(i + k) % len(records)] for k in range(1, 3)]
        paraphrases = (r.paraphrases[0], f"In short, {r.prompt}")[: 1 + i % 2]
        loc = (r.locality_prompts[0], *(o.locality_prompts[0] for o in others))[: 1 + i % 3]
        out.append(
            dataclasses.replace(
                r, paraphrases=paraphrases, locality_prompts=loc, locality_answers=()
            )
        )
    return out


@pytest.fixture(scope="module")
def multi(setup):  # noqa: F811 (the imported fixture)
    """Tiny Llama runner, multi-prompt records, and the unedited model's label per prompt."""
    config, params, tokenizer, records, _ = setup
    runner = ModelRunner(config, params, tokenizer, batch_size=8, show_progress=False)
    template = get_template("gptj")
    zero = zero_editor(config.d_model)
    records = multi_prompt(records)
    flat = pre_edit_answers(
        [p for r in records for p in r.locality_prompts],
        template,
        lambda prompts: runner.generate(prompts, zero(prompts), 8),
    )
    it = iter(flat)
    labels = [tuple(next(it) for _ in r.locality_prompts) for r in records]
    return config, runner, records, template, labels


CFG = EvalConfig(
    batch_size=8, max_new_tokens=8, tf_mode="fast", max_empty_labels=1.0, all_prompts=True
)


def test_unedited_model_scores_100_on_every_locality_prompt(multi):
    config, runner, records, template, labels = multi
    zero = zero_editor(config.d_model)
    rows, summary = evaluate_meg(runner, records, template, zero, labels, CFG, "own")
    assert summary["n_records"] == len(records)
    assert summary["n_gen"] == sum(len(r.paraphrases) for r in records) > len(records)
    assert summary["n_loc"] == sum(len(r.locality_prompts) for r in records) > len(records)
    assert summary["loc_ag"] == 100.0
    assert summary["loc_tf_self"] == 100.0
    assert summary["first_prompt"]["loc_tf_self"] == 100.0
    entries = kind_entries(rows, "loc")
    assert [e["query"] for e in entries] == [p for r in records for p in r.locality_prompts]
    assert all(e["tf_self"] == 1.0 for e in entries)  # a share per prompt
    assert "all prompts" in format_table(summary)


def test_first_prompt_readings_are_the_first_only_protocol(multi):
    config, runner, records, template, labels = multi
    editor = _random_editor(config.d_model)
    first_only = dataclasses.replace(CFG, all_prompts=False)
    _, plain = evaluate_meg(runner, records, template, editor, [a[0] for a in labels], first_only)
    rows, summary = evaluate_meg(runner, records, template, editor, labels, CFG)
    for key in (*SIX, "score"):
        assert summary["first_prompt"][key] == pytest.approx(plain[key], abs=1e-9), key
    # The first-only path takes per-prompt labels too (their first), with the same readings.
    _, tupled = evaluate_meg(runner, records, template, editor, labels, first_only)
    assert {k: tupled[k] for k in SIX} == {k: plain[k] for k in SIX}
    # The row's own fields are the first prompt; the others are in the extras.
    assert all(
        len(row.get("gen_extra", [])) == len(r.paraphrases) - 1
        for row, r in zip(rows, records, strict=True)
    )


def test_readings_average_over_every_prompt(multi):
    """Each all-prompt reading equals the prompt-weighted mean of first-only evaluations of the
    records cut so that each of their prompts in turn comes first."""
    config, runner, records, template, labels = multi
    editor = _random_editor(config.d_model)
    _, summary = evaluate_meg(runner, records, template, editor, labels, CFG)
    first_only = dataclasses.replace(CFG, all_prompts=False)
    sums = dict.fromkeys(SIX[2:], 0.0)
    for slot in range(2):  # paraphrases: loc left out (no labels)
        cut = [
            dataclasses.replace(r, paraphrases=r.paraphrases[slot:])
            for r in records
            if len(r.paraphrases) > slot
        ]
        _, part = evaluate_meg(runner, cut, template, editor, None, first_only)
        for key in ("gen_ag", "gen_tf"):
            sums[key] += part[key] * part["n_gen"]
    for slot in range(3):  # locality prompts
        picked = [i for i, r in enumerate(records) if len(r.locality_prompts) > slot]
        cut = [
            dataclasses.replace(records[i], locality_prompts=records[i].locality_prompts[slot:])
            for i in picked
        ]
        cut_labels = [labels[i][slot] for i in picked]
        _, part = evaluate_meg(runner, cut, template, editor, cut_labels, first_only)
        for key in ("loc_ag", "loc_tf"):
            sums[key] += part[key] * part["n_loc"]
    for key in SIX[2:]:
        n = summary["n_gen"] if key.startswith("gen") else summary["n_loc"]
        assert summary[key] == pytest.approx(sums[key] / n, abs=1e-6), key


def test_edited_model_is_read_against_each_prompt_own_reference(multi):
    config, runner, records, template, labels = multi
    zero = zero_editor(config.d_model)
    rows, _ = evaluate_meg(runner, records, template, zero, labels, CFG, "own")
    reference = loc_references(rows, True)
    assert [len(r) for r in reference] == [len(r.locality_prompts) for r in records]
    editor = _random_editor(config.d_model)
    _, edited = evaluate_meg(runner, records, template, editor, labels, CFG, reference)
    assert edited["loc_tf_self"] < 100.0
    # The unedited model read against its own references (not "own") is still exactly 100.
    _, again = evaluate_meg(runner, records, template, zero, labels, CFG, reference)
    assert again["loc_tf_self"] == 100.0
    assert np.isclose(again["first_prompt"]["loc_tf_self"], 100.0)


def test_all_prompts_needs_a_label_per_locality_prompt(multi):
    config, runner, records, template, labels = multi
    zero = zero_editor(config.d_model)
    with pytest.raises(ValueError, match=r"all_prompts needs one pre-edit label per locality"):
        evaluate_meg(runner, records, template, zero, [a[0] for a in labels], CFG)
    short = [a[:1] for a in labels]
    with pytest.raises(ValueError, match=r"locality_prompts.*got 1"):
        evaluate_meg(runner, records, template, zero, short, CFG)

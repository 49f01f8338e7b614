"""MeG AG post-processing and matching (exact and startswith), Locality AG, and the Score."""

import pytest

from meg_jax.data.templates import get_template
from meg_jax.evaluation.metrics import (
    answer_ag_correct,
    answer_matches,
    harmonic_mean,
    locality_ag_correct,
    meg_score,
    percent,
    postprocess_answer,
    postprocess_locality_answer,
)

GPTJ = get_template("gptj")
PHI2 = get_template("phi2")


@pytest.mark.parametrize(
    "continuation, cuts, expected",
    [
        (" Paris.\nQ: What is", GPTJ.answer_cuts, " Paris"),
        (" Paris\\n.\nQ:", GPTJ.answer_cuts, " Paris"),  # literal backslash cut first
        (" Paris..", GPTJ.answer_cuts, " Paris."),  # one dot only, as adjust_dots
        (" Paris. \t", GPTJ.answer_cuts, " Paris"),
        (" Paris.\nOutput: Rome", PHI2.answer_cuts, " Paris.\nOutput: Rome"),  # Phi-2: no cut
        ("\n Paris", GPTJ.answer_cuts, ""),
    ],
)
def test_postprocess_answer(continuation, cuts, expected):
    assert postprocess_answer(continuation, cuts) == expected


def test_exact_and_startswith_matching():
    assert answer_matches(" paris", "Paris")
    assert not answer_matches("Paris", "Paris")  # the reference compares with " " + target
    assert not answer_matches(" Paris Hilton", "Paris")
    assert answer_matches(" Paris Hilton", "Paris", rule="startswith")
    assert not answer_matches(" Pari", "Paris", rule="startswith")
    with pytest.raises(ValueError, match="unknown match rule"):
        answer_matches(" Paris", "Paris", rule="contains")


def test_answer_ag_correct_over_a_batch():
    continuations = [" Paris.\nQ: x", " Rome.", " Paris Hilton.", " paris\\", " Paris.."]
    flags = answer_ag_correct(continuations, ["Paris"] * 5, GPTJ.answer_cuts)
    assert flags == [True, False, False, True, False]
    assert percent(flags) == pytest.approx(40.0)
    assert answer_ag_correct(continuations, ["Paris"] * 5, GPTJ.answer_cuts, "startswith") == [
        True,
        False,
        True,
        True,
        True,
    ]
    with pytest.raises(ValueError, match="continuations has 5 items but targets has 1"):
        answer_ag_correct(continuations, ["Paris"], GPTJ.answer_cuts)


def test_locality_ag_is_case_sensitive_agreement_with_the_stored_answer():
    cuts = GPTJ.locality_cuts
    assert postprocess_locality_answer("  Walter Sobchak...\nQ: x", cuts) == "Walter Sobchak"
    assert postprocess_locality_answer(" a\\b.", cuts) == "a\\b"  # Loc: no backslash cut
    continuations = [" Walter Sobchak.\nQ:", " walter sobchak", " The Dude"]
    flags = locality_ag_correct(continuations, ["Walter Sobchak"] * 3, cuts)
    assert flags == [True, False, False]


def test_meg_score_matches_the_paper_example():
    # Phi-2, ZsRE, 10k edits, MeG (METHOD.md §1.2)
    assert meg_score(95.07, 97.04, 59.69, 74.17, 91.14, 95.84) == pytest.approx(82.80, abs=5e-3)
    assert harmonic_mean([50.0, 100.0]) == pytest.approx(200 / 3)
    assert meg_score(100, 100, 0.0, 100, 100, 100) == 0.0
    with pytest.raises(ValueError, match="percentages"):
        meg_score(0.95, 97.04, 59.69, 74.17, 191.14, 95.84)
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean([50.0, -1.0])
    with pytest.raises(ValueError, match="no examples"):
        percent([])

"""MEMIT/ROME metrics: zsRE token accuracy (P1), CounterFact ES/PS/NS (P2), n-gram fluency."""

import math

import pytest
from transformers import AutoTokenizer

from meg_jax.data.preprocess import normalize_locality_prompts
from meg_jax.data.readers import read_edits
from meg_jax.evaluation.classic import (
    counterfact_case,
    counterfact_queries,
    counterfact_summary,
    generation_entropy,
    memit_zsre_queries,
    memit_zsre_summary,
    ngram_entropy,
    words,
)
from meg_jax.evaluation.teacher_forcing import build_target_query, build_tf_queries


@pytest.fixture(scope="module")
def gpt2(shared_data):
    return AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2", local_files_only=True)


def test_memit_zsre_queries_use_raw_prompts_and_gold_locality(gpt2, shared_data):
    record = read_edits(shared_data / "zsre" / "zsre_mend_train-1k.json", limit=1)[0]
    queries = memit_zsre_queries(gpt2, record)
    assert queries["rewrite"] == [(record.prompt, build_tf_queries(gpt2, record.prompt, "uniform"))]
    assert queries["paraphrase"][0] == (
        record.paraphrases[0],
        build_tf_queries(gpt2, record.paraphrases[0], "uniform"),
    )
    # the "nq question: " prefix stays, "?" is appended, the gold answer is the target
    loc = "nq question: john goodman's character in the big lebowski?"
    assert queries["neighborhood"] == [(loc, build_tf_queries(gpt2, loc, "Walter Sobchak"))]
    assert len(queries["neighborhood"][0][1]) == 4  # " Walter", " Sob", "ch", "ak"
    # a MeG-preprocessed record's question is already normalised: asked as is, not with "??"
    (normalised,) = normalize_locality_prompts([record])
    asked = memit_zsre_queries(gpt2, normalised)["neighborhood"][0][0]
    assert asked == "John goodman's character in the big lebowski?"


def test_memit_zsre_summary():
    cases = [
        {"rewrite": [True, True], "paraphrase": [True, False], "neighborhood": [False]},
        {"rewrite": [True], "paraphrase": [True, True, False, False], "neighborhood": [True, True]},
    ]
    summary = memit_zsre_summary(cases)
    assert summary["efficacy"] == pytest.approx(100.0)
    assert summary["paraphrase"] == pytest.approx(50.0)
    assert summary["specificity"] == pytest.approx(50.0)
    assert summary["score"] == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 50))
    with pytest.raises(ValueError, match="case 0 has no rewrite tokens"):
        memit_zsre_summary([{"rewrite": [], "paraphrase": [True], "neighborhood": [True]}])


def test_counterfact_queries_pair_new_and_true_targets(gpt2, shared_data):
    record = read_edits(shared_data / "counterfact" / "counterfact-edit.json", limit=1)[0]
    queries = counterfact_queries(gpt2, record)
    assert [len(queries[k]) for k in ("rewrite", "paraphrase", "neighborhood")] == [1, 1, 1]
    prompt, (new, true) = queries["neighborhood"][0]
    assert prompt == "Michel Rocard is a native speaker of"
    assert new == build_target_query(gpt2, "Michel Rocard is a native speaker of", "English")
    assert true == build_target_query(gpt2, "Michel Rocard is a native speaker of", "French")


def test_counterfact_case_and_summary_by_hand():
    e1, e2 = math.exp(-1), math.exp(-2)
    case = counterfact_case(
        {
            # mean NLL new 1 vs true 2: the new object wins
            "rewrite": [([-1.0, -1.0], [-2.0])],
            # NLL (3 vs 1): loses; (0.5 vs 1): wins
            "paraphrase": [([-3.0], [-1.0]), ([-0.25, -0.75], [-1.0])],
            # neighbourhood succeeds when the TRUE object is more likely: NLL true 1 < new 2
            "neighborhood": [([-2.0], [-1.0])],
        }
    )
    assert case["es"] == 1.0 and case["ps"] == 0.5 and case["ns"] == 1.0
    assert case["em"] == pytest.approx(e1 - e2)
    assert case["pm"] == pytest.approx(((math.exp(-3) - e1) + (math.exp(-0.5) - e1)) / 2)
    assert case["nm"] == pytest.approx(e1 - e2)
    tie = counterfact_case(
        {
            "rewrite": [([-1.0], [-1.0])],
            "paraphrase": [([-1.0], [-1.0])],
            "neighborhood": [([-1.0], [-1.0])],
        }
    )
    assert tie["es"] == tie["ps"] == tie["ns"] == 0.0  # strict inequalities, as ROME

    summary = counterfact_summary([case, tie])
    assert summary["ES"] == pytest.approx(50.0) and summary["PS"] == pytest.approx(25.0)
    assert summary["NS"] == pytest.approx(50.0)
    assert summary["EM"] == pytest.approx(100 * (e1 - e2) / 2)
    assert summary["score"] == pytest.approx(3 / (1 / 50 + 1 / 25 + 1 / 50))


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams {ab: 2, ba: 1}, trigrams {aba: 1, bab: 1}
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    expected = (2 / 3 * h2 + 4 / 3 * h3) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected)
    assert generation_entropy(["a b a b", "word"]) == pytest.approx(100 * expected / 2)
    assert ngram_entropy("a a a a a") == 0.0  # one repeated n-gram carries no information
    assert words("Don't stop, it's 3.5 well-known.") == [
        "Do", "n't", "stop", ",", "it", "'s", "3.5", "well-known", ".",
    ]  # fmt: skip

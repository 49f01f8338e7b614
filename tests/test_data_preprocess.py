"""Templates and MeG preprocessing: normalisation, dedup, the known-fact filter, locality labels,
and the on-disk cache (hit without calling the model; invalidated when an input changes)."""

import dataclasses

import pytest

from meg_jax.data.preprocess import (
    PreprocessConfig,
    dedup_by_subject,
    meg_preprocess_config,
    normalize_nq_question,
    prepare_edits,
)
from meg_jax.data.records import DataFormatError, EditRecord, Source
from meg_jax.data.templates import get_template


def record(i, subject, prompt, target, loc="nq question: who wrote hamlet"):
    return EditRecord(
        id=100 + i,
        prompt=prompt,
        subject=subject,
        target_new=target,
        target_true=None,
        paraphrases=(f"paraphrase {i}",),
        locality_prompts=(loc,),
        locality_answers=("Shakespeare",),
        generation_prompts=(),
        source=Source("zsre.json", i),
    )


RECORDS = [
    record(0, "UniFirst", "What does UniFirst make?", "uniform"),
    record(1, "UniFirst", "Who founded UniFirst?", "Aldo Croatti"),  # duplicate subject
    record(2, "Delta Serpentis", "Delta Serpentis is in which constellation?", "Serpens"),
    record(3, "Oslo", "Oslo is the capital of?", "Norway", loc="nq question: where is {x}"),
]


class FakeModel:
    """Greedy 'generation' from a table of templated prompts; counts its calls."""

    def __init__(self, table, default=" no idea.\nQ: more"):
        self.table, self.default, self.calls = table, default, []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return [self.table.get(p, self.default) for p in prompts]


GPTJ = get_template("gptj")


def known_answers():
    return FakeModel(
        {
            GPTJ.format_query("What does UniFirst make?"): " Uniform.\nQ: next",  # known: dropped
            GPTJ.format_query("Oslo is the capital of?"): " Sweden\\n.",
            GPTJ.format_query("Who wrote hamlet?"): " William Shakespeare.\nQ: x",
            GPTJ.format_query("Where is {x}?"): " Nowhere..",
        }
    )


def test_templates_are_the_reference_strings():
    q = "Who wrote Hamlet?"
    assert GPTJ.format_query(q) == (
        "Q: Answer the following question in less than 5 words. Who wrote Hamlet?\nA:"
    )
    assert get_template("phi2").format_query(q) == (
        "Instruct:Answer the following question in less than 5 words. Who wrote Hamlet?\nOutput:"
    )
    llama = "Answer the following question in less than 5 words: Who wrote Hamlet? \nAnswer:"
    assert get_template("llama3").format_query(q) == llama
    assert get_template("smollm2").format_query(q) == llama
    assert get_template("smollm2_chat").format_query(q) == (
        "<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert GPTJ.format_answer("Shakespeare") == " Shakespeare.<|endoftext|>"
    assert get_template("llama3").format_answer("A") == " A.<|end_of_text|>"
    assert get_template("smollm2").format_answer("A") == " A.<|im_end|>"
    assert (GPTJ.answer_cuts, GPTJ.locality_cuts) == (("\\", "\n"), ("\n",))
    assert get_template("phi2").answer_cuts == get_template("phi2").locality_cuts == ()
    with pytest.raises(ValueError, match="unknown prompt template 'gpt5'"):
        get_template("gpt5")


def test_normalize_nq_question_and_dedup():
    assert normalize_nq_question("nq question: john goodman's character in the big lebowski") == (
        "John goodman's character in the big lebowski?"
    )
    # str.capitalize lower-cases the rest, exactly as the reference
    assert normalize_nq_question("nq question: who is Bob Dylan") == "Who is bob dylan?"
    assert normalize_nq_question("Michel Rocard is a native speaker of") == (
        "Michel Rocard is a native speaker of"
    )
    no_subject = dataclasses.replace(RECORDS[0], subject=None)
    kept = dedup_by_subject(RECORDS + [no_subject, no_subject])
    assert [r.source.index for r in kept] == [0, 2, 3, 0, 0]


def test_zsre_preprocessing_filters_known_facts_and_labels_locality():
    model = known_answers()
    prepared = prepare_edits(RECORDS, "fake-gptj", model, meg_preprocess_config("zsre", "gptj"))
    # record 1 is a duplicate subject, record 0 is already known (" Uniform." == "uniform")
    assert [r.source.index for r in prepared.records] == [2, 3]
    assert [r.id for r in prepared.records] == [102, 103]  # the dataset ids stay on the record
    assert prepared.edit_answers == ("no idea", "Sweden\\n")  # Loc cuts: newline only
    assert prepared.records[0].locality_prompts == ("Who wrote hamlet?",)
    assert prepared.locality_labels == ("William Shakespeare", "Nowhere")
    # first call: the three deduplicated edit prompts; second: the kept records' locality prompts
    assert model.calls[0] == [GPTJ.format_query(RECORDS[i].prompt) for i in (0, 2, 3)]
    assert model.calls[1] == [
        GPTJ.format_query("Who wrote hamlet?"),
        GPTJ.format_query("Where is {x}?"),
    ]


def test_counterfact_preprocessing_keeps_every_record():
    model = known_answers()
    config = meg_preprocess_config("counterfact", "gptj")
    prepared = prepare_edits(RECORDS, "fake-gptj", model, config)
    assert len(prepared.records) == 4 and prepared.edit_answers is None
    assert len(model.calls) == 1  # locality labels only
    assert prepared.records[0].locality_prompts == ("nq question: who wrote hamlet",)


def test_cache_hit_skips_the_model_and_changes_invalidate(tmp_path):
    config = PreprocessConfig(template="gptj")
    first = prepare_edits(RECORDS, "fake-gptj", known_answers(), config, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("preprocess-*.json"))) == 1

    unused = FakeModel({})
    again = prepare_edits(RECORDS, "fake-gptj", unused, config, cache_dir=tmp_path)
    assert unused.calls == [] and again == first

    changed = [dataclasses.replace(RECORDS[0], target_new="overalls")] + RECORDS[1:]
    model = known_answers()
    recomputed = prepare_edits(changed, "fake-gptj", model, config, cache_dir=tmp_path)
    assert len(model.calls) == 2 and recomputed.cache_key != first.cache_key
    assert len(recomputed.records) == 3  # "overalls" is not what the model says: kept now

    for model_id, other_config in (
        ("fake-gptj-v2", config),
        ("fake-gptj", PreprocessConfig(template="llama3")),
        ("fake-gptj", PreprocessConfig(template="gptj", dedup_by_subject=False)),
    ):
        model = known_answers()
        prepare_edits(RECORDS, model_id, model, other_config, cache_dir=tmp_path)
        assert len(model.calls) == 2, (model_id, other_config)
    assert len(list(tmp_path.glob("preprocess-*.json"))) == 5


def test_source_is_not_part_of_the_cache_key(tmp_path):
    config = PreprocessConfig(template="gptj")
    prepare_edits(RECORDS, "m", known_answers(), config, cache_dir=tmp_path)
    moved = [dataclasses.replace(r, source=Source("elsewhere/zsre.json", 0)) for r in RECORDS]
    unused = FakeModel({})
    prepare_edits(moved, "m", unused, config, cache_dir=tmp_path)
    assert unused.calls == []


def test_corrupt_cache_and_bad_answer_fn(tmp_path):
    config = PreprocessConfig(template="gptj")
    prepared = prepare_edits(RECORDS, "m", known_answers(), config, cache_dir=tmp_path)
    (path,) = tmp_path.glob("preprocess-*.json")
    assert prepared.cache_key.startswith(path.stem.removeprefix("preprocess-"))
    path.write_text('{"cache_key": "truncated')
    with pytest.raises(DataFormatError, match=f"{path.name}: unreadable preprocessing cache"):
        prepare_edits(RECORDS, "m", known_answers(), config, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="answer_fn must return a list of 3 strings, got 1"):
        prepare_edits(RECORDS, "m", lambda prompts: ["one"], config)
    no_loc = [dataclasses.replace(RECORDS[2], locality_prompts=(), locality_answers=())]
    with pytest.raises(DataFormatError, match=r"zsre\.json: record 2, field 'locality_prompts'"):
        prepare_edits(no_loc, "m", known_answers(), config)

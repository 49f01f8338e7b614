"""Edit-file readers: every format, detection, the override, malformed files, the real data."""

import json

import pytest

from meg_jax.data.readers import detect_format, read_edits
from meg_jax.data.records import DataFormatError

ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform", "uniforms"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}
ROME_CF = {
    "case_id": 7,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Danielle Darrieux speaks", "The language of Danielle Darrieux is"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jean Gabin speaks"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
EASYEDIT_CF = {
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}
USER = {
    "prompt": "The capital of Freedonia is",
    "target": "Fredville",
    "subject": "Freedonia",
    "paraphrases": "Freedonia's capital city is",
    "locality_prompts": ["The capital of France is"],
    "locality_answers": ["Paris"],
}


def write(tmp_path, name, records, jsonl=False):
    path = tmp_path / name
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


def test_zsre_target_answers_and_alt(tmp_path):
    second = dict(ZSRE, rephrase=["Which product is UniFirst's?", "UniFirst makes what?"], id=41)
    path = write(tmp_path, "zsre.json", [ZSRE, second])
    meg = read_edits(path)
    assert detect_format(ZSRE, "f") == "zsre"
    assert [r.id for r in meg] == [0, 41]
    first = meg[0]
    assert first.prompt == ZSRE["src"] and first.subject == "UniFirst"
    assert (first.target_new, first.target_true) == ("uniform", None)
    assert first.paraphrases == ("What will be the product of UniFirst?",)
    assert meg[1].paraphrases == ("Which product is UniFirst's?", "UniFirst makes what?")
    # loc kept verbatim: MEMIT's P1 uses it with the prefix; MeG normalises it later
    assert first.locality_prompts == (ZSRE["loc"],)
    assert first.locality_answers == ("Walter Sobchak",)
    assert (first.source.file, first.source.index) == (str(path), 0)
    easyedit = read_edits(path, zsre_target="alt")
    assert (easyedit[0].target_new, easyedit[0].target_true) == ("unmanned aircraft", "uniform")


def test_rome_counterfact(tmp_path):
    (record,) = read_edits(write(tmp_path, "cf.json", [ROME_CF]))
    assert record.id == 7
    assert record.prompt == "The mother tongue of Danielle Darrieux is"
    assert (record.target_new, record.target_true) == ("English", "French")
    assert record.paraphrases == tuple(ROME_CF["paraphrase_prompts"])
    assert record.locality_prompts == tuple(ROME_CF["neighborhood_prompts"])
    assert record.locality_answers == ("French", "French")
    assert record.generation_prompts == ("Danielle Darrieux's mother tongue is",)


def test_easyedit_flat_counterfact(tmp_path):
    (record,) = read_edits(write(tmp_path, "flat.json", [EASYEDIT_CF]))
    assert record.prompt == EASYEDIT_CF["prompt"]
    assert (record.target_new, record.target_true) == ("English", "French")
    assert record.paraphrases == (EASYEDIT_CF["rephrase_prompt"],)
    assert record.locality_prompts == ("Michel Rocard is a native speaker of",)
    assert record.locality_answers == ("French",)


def test_user_json_and_jsonl(tmp_path):
    minimal = {"prompt": "Water boils at", "target": "50 degrees"}
    for jsonl in (False, True):
        records = read_edits(write(tmp_path, f"u{jsonl}.jsonl", [USER, minimal], jsonl=jsonl))
        assert [r.id for r in records] == [0, 1]
        assert records[0].paraphrases == ("Freedonia's capital city is",)
        assert records[0].locality_answers == ("Paris",)
        assert records[1].subject is None and records[1].paraphrases == ()
        assert records[1].target_new == "50 degrees"


def test_format_override_validates_against_the_given_format(tmp_path):
    path = write(tmp_path, "u.json", [USER])
    with pytest.raises(
        DataFormatError, match=r"u\.json: record 0, field 'locality_prompt': missing"
    ):
        read_edits(path, format="easyedit_cf")
    with pytest.raises(ValueError, match="unknown edit-file format 'csv'"):
        read_edits(path, format="csv")


def test_undetectable_first_record(tmp_path):
    path = write(tmp_path, "odd.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataFormatError, match=r"odd\.json: record 0: cannot tell the format"):
        read_edits(path)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a", "target": "b"},\n {"prompt": "c" "target": "d"}\n]')
    with pytest.raises(DataFormatError, match=r"bad\.json: malformed JSON at line 3"):
        read_edits(path)
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"prompt": "a", "target": "b"}\n\n{"prompt": "c", "target":\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl: record 1 \(line 3\): malformed JSON"):
        read_edits(lines)
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(DataFormatError, match=r"empty\.json: the file is empty"):
        read_edits(empty)


@pytest.mark.parametrize(
    "records, message",
    [
        (
            [ZSRE, {k: v for k, v in ZSRE.items() if k != "loc_ans"}],
            r"record 1, field 'loc_ans': missing",
        ),
        (
            [ZSRE, dict(ZSRE, answers="uniform")],
            r"record 1, field 'answers': expected a list of strings, got str",
        ),
        ([dict(ZSRE, answers=[])], r"record 0, field 'answers': expected at least one answer"),
        ([dict(ZSRE, rephrase=["ok", 3])], r"record 0, field 'rephrase': item 1: expected a str"),
        ([dict(ZSRE, src="  ")], r"record 0, field 'src': expected a non-empty string"),
        ([dict(ZSRE, id="7")], r"record 0, field 'id': expected an integer, got str"),
        (
            [
                ROME_CF,
                dict(
                    ROME_CF,
                    case_id=8,
                    requested_rewrite=dict(ROME_CF["requested_rewrite"], target_new={"id": "Q1"}),
                ),
            ],
            r"record 1, field 'requested_rewrite\.target_new\.str': missing",
        ),
        (
            [dict(ROME_CF, requested_rewrite=dict(ROME_CF["requested_rewrite"], prompt="X is"))],
            r"record 0, field 'requested_rewrite\.prompt': expected a '\{\}' placeholder",
        ),
        (
            [ROME_CF, dict(ROME_CF, neighborhood_prompts=None)],
            r"record 1, field 'neighborhood_prompts': expected a list of strings, got null",
        ),
        ([EASYEDIT_CF, ["not", "an", "object"]], r"record 1: expected a JSON object, got list"),
        ([USER, dict(USER, paraphrase=["typo"])], r"record 1, field 'paraphrase': unknown"),
        (
            [USER, dict(USER, locality_answers=["a", "b"])],
            r"record 1, field 'locality_answers': expected one answer per locality prompt \(1\)",
        ),
        ([ROME_CF, ROME_CF], r"record 1, field 'id': id 7 repeats record 0's"),
    ],
)
def test_malformed_records_name_file_index_and_field(tmp_path, records, message):
    path = write(tmp_path, "edits.json", records)
    with pytest.raises(DataFormatError, match=r"edits\.json: " + message):
        read_edits(path)


def test_limit_keeps_the_first_records(tmp_path):
    path = write(tmp_path, "u.json", [dict(USER, id=i) for i in range(5)])
    assert [r.id for r in read_edits(path, limit=2)] == [0, 1]


def test_real_counterfact_and_zsre_files_parse(shared_data):
    edit = read_edits(shared_data / "counterfact" / "counterfact-edit.json")
    train = read_edits(shared_data / "counterfact" / "counterfact-train.json")
    zsre = read_edits(shared_data / "zsre" / "zsre_mend_train-1k.json")
    assert (len(edit), len(train), len(zsre)) == (10_000, 10_000, 1_000)
    assert edit[0].prompt == "The mother tongue of Danielle Darrieux is"
    assert (edit[0].target_new, edit[0].target_true) == ("English", "French")
    assert edit[-1].id == 21918 and edit[-1].target_new == "composer"
    assert {r.id for r in edit}.isdisjoint(r.id for r in train)
    assert zsre[1].target_new == "Serpens" and zsre[1].subject == "Delta Serpentis"
    assert all(r.locality_prompts[0].startswith("nq question: ") for r in zsre)

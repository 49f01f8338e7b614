"""zsRE as the paper prepares it (METHOD.md §1.4, issue 13 item 2): merged sources, dedup by
subject across them, the wrong-answer filter with N counted after it, NQ normalisation of every
locality prompt (router calibration included), the pseudo-edit split disjoint from the edit set,
and a user-supplied rephrase file."""

import json
import shutil
from types import SimpleNamespace

import pytest

from meg_jax.data import locate
from meg_jax.data.preprocess import normalize_nq_question
from meg_jax.data.records import DataFormatError
from meg_jax.data.rephrases import apply_rephrases, read_rephrases
from meg_jax.data.sources import check_disjoint, pseudo_split, read_spec, split_spec
from meg_jax.data.templates import get_template
from meg_jax.pipeline import edits as edits_stage
from meg_jax.pipeline import query_side
from meg_jax.pipeline.config import DataConfig, HostConfig, PipelineConfig, RouterStageConfig


def zsre(subject: str, question: str, answer: str, loc: str = "who wrote hamlet") -> dict:
    return {
        "subject": subject,
        "src": question,
        "rephrase": f"{question} (again)",
        "alt": "nothing",
        "answers": [answer],
        "loc": f"nq question: {loc}",
        "loc_ans": "Shakespeare",
    }


def write(path, records) -> str:
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


@pytest.fixture
def two_files(tmp_path):
    """An "eval" and a "train_10000" file: train repeats an eval subject and holds a known fact."""
    eval_file = write(
        tmp_path / "eval.json",
        [
            zsre("Alpha", "What is Alpha made of?", "gold", "who is alpha's mother"),
            zsre("Beta", "Where is Beta?", "Paris"),  # the fake model knows this one
            zsre("Gamma", "When was Gamma born?", "1900"),
        ],
    )
    train_file = write(
        tmp_path / "train.json",
        [
            zsre("Alpha", "Who made Alpha?", "Bob"),  # a repeated subject: dropped by dedup
            zsre("Delta", "What is Delta?", "a river"),
            zsre("Epsilon", "What does Epsilon play?", "piano"),
        ],
    )
    return eval_file, train_file


# ---------------------------------------------------------------------------------------------
# Merged sources


def test_a_spec_names_one_file_or_several(tmp_path):
    assert split_spec("a.json") == ["a.json"]
    assert split_spec("zsre/a.json + zsre/b.json") == ["zsre/a.json", "zsre/b.json"]
    plus = tmp_path / "odd+name.json"
    plus.write_text("[]")
    assert split_spec(str(plus)) == [str(plus)]  # an existing file is one file, "+" or not
    with pytest.raises(ValueError, match=r"data.edits: .*empty name"):
        split_spec("a.json++b.json")
    with pytest.raises(ValueError, match="names a file twice"):
        split_spec("a.json+a.json")
    with pytest.raises(ValueError, match="data.pseudo"):
        split_spec("", field="data.pseudo")


def test_merged_files_keep_order_sources_and_unique_ids(two_files):
    eval_file, train_file = two_files
    records = read_spec(f"{eval_file}+{train_file}")
    assert [r.subject for r in records] == ["Alpha", "Beta", "Gamma", "Alpha", "Delta", "Epsilon"]
    # Position ids of the second file follow the first's: 0..2, then 3..5.
    assert [r.id for r in records] == [0, 1, 2, 3, 4, 5]
    assert records[3].source.file == train_file and records[3].source.index == 0
    # `limit` trims the merged list; the ids do not depend on it.
    assert [r.id for r in read_spec(f"{eval_file}+{train_file}", limit=4)] == [0, 1, 2, 3]


def test_explicit_ids_that_do_not_clash_are_kept(tmp_path):
    a = [dict(zsre("A", "a?", "x"), id=10)]
    b = [dict(zsre("B", "b?", "y"), id=3), dict(zsre("C", "c?", "z"), id=10)]
    records = read_spec(f"{write(tmp_path / 'a.json', a)}+{write(tmp_path / 'b.json', b)}")
    # b's id 10 clashes with a's: all of b is shifted past a's largest id (10 + 1 - 3).
    assert [r.id for r in records] == [10, 11, 18]
    c = [dict(zsre("D", "d?", "w"), id=0)]
    records = read_spec(f"{write(tmp_path / 'a.json', a)}+{write(tmp_path / 'c.json', c)}")
    assert [r.id for r in records] == [10, 0]


def test_an_error_in_the_second_file_names_that_file(tmp_path, two_files):
    bad = zsre("Zeta", "What is Zeta?", "z")
    del bad["loc_ans"]
    bad_file = write(tmp_path / "bad.json", [bad])
    with pytest.raises(DataFormatError, match=r"bad\.json: record 0, field 'loc_ans'"):
        read_spec(f"{two_files[0]}+{bad_file}")


def test_a_missing_paper_file_says_what_it_is_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "data_dirs", lambda: [tmp_path])
    with pytest.raises(FileNotFoundError, match=r"EasyEdit.*Place it at .*zsre_mend_train_10000"):
        read_spec("zsre/zsre_mend_train_10000.json")


# ---------------------------------------------------------------------------------------------
# The edits stage's preparation, with a fake unedited model


class FakeMemo:
    """The unedited model: knows "Paris" for any question about Beta, else answers "no idea"."""

    calls: list = []

    def __init__(self, ctx):
        self.model_id = "fake"

    def __call__(self, prompts):
        FakeMemo.calls.append(list(prompts))
        return [" Paris\n" if "Beta" in p else " no idea\n" for p in prompts]


def fake_ctx(**data) -> SimpleNamespace:
    cfg = PipelineConfig(
        data=DataConfig(kind="zsre", **data),
        host=HostConfig(template="gptj"),
        router=RouterStageConfig(calibrate=True),
    )
    tokenizer = lambda text: {"input_ids": text.split()}  # noqa: E731
    host = SimpleNamespace(tokenizer=tokenizer)
    return SimpleNamespace(cfg=cfg, host=lambda: host, template=get_template("gptj"))


def test_prepare_merges_dedups_filters_and_counts_n_after_the_filter(two_files, monkeypatch):
    monkeypatch.setattr(edits_stage, "AnswerMemo", FakeMemo)
    eval_file, train_file = two_files
    spec = f"{eval_file}+{train_file}"
    ctx = fake_ctx(edits=spec, n_edits=3)
    prepared = edits_stage.prepare(ctx, spec, 3)
    # Alpha (train) is a repeated subject and Beta is known: 3 kept are Alpha, Gamma, Delta.
    assert [r.subject for r in prepared.records] == ["Alpha", "Gamma", "Delta"]
    assert [r.id for r in prepared.records] == [0, 2, 4]
    assert prepared.records[0].locality_prompts == ("Who is alpha's mother?",)
    assert all(
        not p.startswith("nq question") for r in prepared.records for p in r.locality_prompts
    )
    assert len(prepared.locality_labels) == 3
    # n=4 reaches into the second file past the filter: Epsilon is the fourth kept.
    ctx4 = fake_ctx(edits=spec, n_edits=4)
    assert [r.subject for r in edits_stage.prepare(ctx4, spec, 4).records][-1] == "Epsilon"


def test_prepare_puts_in_the_rephrase_file(two_files, tmp_path, monkeypatch):
    monkeypatch.setattr(edits_stage, "AnswerMemo", FakeMemo)
    spec = "+".join(two_files)
    rephrases = tmp_path / "glm.json"
    rephrases.write_text(
        json.dumps({"What is Alpha made of?": ["Alpha consists of what?", "Alpha is made of?"]})
    )
    ctx = fake_ctx(edits=spec, n_edits=2, rephrases=str(rephrases))
    records = edits_stage.prepare(ctx, spec, 2).records
    assert records[0].paraphrases == ("Alpha consists of what?", "Alpha is made of?")
    assert records[1].paraphrases == ("When was Gamma born? (again)",)  # no entry: its own
    ctx = fake_ctx(edits=spec, n_edits=2, rephrases=str(rephrases), rephrases_mode="append")
    first = edits_stage.prepare(ctx, spec, 2).records[0]
    assert first.paraphrases[0] == "What is Alpha made of? (again)" and len(first.paraphrases) == 3
    # The rephrase file is an input of the edits stage: changing it changes the fingerprint.
    before = edits_stage.source_id(str(rephrases))
    rephrases.write_text(json.dumps({"What is Alpha made of?": ["Other?"]}))
    assert edits_stage.source_id(str(rephrases)) != before


def test_a_bad_rephrase_mode_is_a_config_error():
    with pytest.raises(ValueError, match="config.data.rephrases_mode"):
        DataConfig(rephrases_mode="prepend")


# ---------------------------------------------------------------------------------------------
# The pseudo-edit split and the router's calibration prompts


def test_pseudo_edits_from_another_file_lose_every_edit_subject(tmp_path, two_files):
    pool = read_spec("+".join(two_files))
    pseudo_file = write(
        tmp_path / "mend_train.json",
        [
            zsre("Gamma", "Is Gamma old?", "yes"),  # an eval subject: out
            zsre("Theta", "Who made Alpha?", "Bob"),  # a train question: out (the reference's rule)
            zsre("Iota", "Where is Iota?", "Rome"),
            zsre("Iota", "What is Iota?", "a city"),  # a repeated subject: out
            zsre("Kappa", "What is Kappa?", "a letter"),
        ],
    )
    pseudo = read_spec(pseudo_file)
    split = pseudo_split(pseudo, pool, by_subject=True)
    assert [r.subject for r in split] == ["Iota", "Kappa"]
    assert pseudo_split(pseudo, pool, by_subject=False) == pseudo  # CounterFact: as read
    assert check_disjoint(pool, split, by_subject=True) == 0


def test_pseudo_edits_from_the_edit_file_itself_and_an_edit_set_grown_into_them(tmp_path):
    rows = [zsre(f"S{i}", f"What is S{i}?", "x") for i in range(6)]
    rows.append(zsre("S1", "Where is S1?", "y"))  # S1 again at the far end: not a pseudo-edit
    path = write(tmp_path / "one.json", rows)
    records = read_spec(path)
    split = pseudo_split(records, records, by_subject=True)  # not held against itself
    assert [r.subject for r in split] == [f"S{i}" for i in range(6)]
    tail = split[-2:]  # S4, S5: what _pseudo takes from the far end
    assert check_disjoint(records[:4], tail, by_subject=True) == 0
    with pytest.raises(DataFormatError, match=r"one\.json: record 4: edit id 4 is also a pseudo"):
        check_disjoint(records[:5], tail, by_subject=True)
    with pytest.raises(DataFormatError, match="also a pseudo"):  # CounterFact too
        check_disjoint(records[:5], tail, by_subject=False)


def test_router_calibration_prompts_are_nq_normalised_and_split(tmp_path, two_files):
    pseudo_file = write(
        tmp_path / "mend_train.json",
        [zsre("Gamma", "Is Gamma old?", "yes")]
        + [zsre(f"P{i}", f"What is P{i}?", "x", f"who is p{i}") for i in range(6)],
    )
    ctx = fake_ctx(edits="+".join(two_files), pseudo=pseudo_file, n_calibration=2)
    pool, calibration = query_side._pseudo(ctx)
    assert [r.subject for r in calibration] == ["P4", "P5"]
    assert [r.locality_prompts[0] for r in calibration] == ["Who is p4?", "Who is p5?"]
    assert [r.subject for r in pool] == ["P0", "P1", "P2", "P3"]  # Gamma is an edit subject
    # The split depends on the edit files: changing them is a change of the encoder's inputs.
    other = write(tmp_path / "other.json", [zsre("Omega", "What is Omega?", "o")])
    assert query_side._pseudo_id(ctx) != query_side._pseudo_id(
        fake_ctx(edits=other, pseudo=pseudo_file, n_calibration=2)
    )


# ---------------------------------------------------------------------------------------------
# Rephrase files


def test_rephrase_file_forms(tmp_path, two_files):
    records = read_spec(two_files[0])
    by_key = tmp_path / "by_key.json"
    by_key.write_text(json.dumps({"Where is Beta?": "Beta lies where?", "2": ["G?", "G2?"]}))
    out, matched = apply_rephrases(records, read_rephrases(by_key))
    assert matched == 2 and out[1].paraphrases == ("Beta lies where?",)
    assert out[2].paraphrases == ("G?", "G2?") and out[0] == records[0]
    # MeG's GLM-rephrased file: its ids are re-indexed per LLM, so the `src` is what matches.
    glm = tmp_path / "glm.jsonl"
    glm.write_text(
        "\n".join(
            json.dumps({"id": 0, "src": "When was Gamma born?", "rephrase": ["Gamma's birth?"]})
            for _ in range(1)
        )
        + "\n"
        + json.dumps({"id": 1, "rephrases": ["By id?"]})
    )
    out, matched = apply_rephrases(records, read_rephrases(glm))
    assert matched == 2
    assert out[2].paraphrases == ("Gamma's birth?",) and out[1].paraphrases == ("By id?",)
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"src": "Where is Beta?", "rephrase": ["B?"]}))  # a single record
    assert apply_rephrases(records, read_rephrases(one))[0][1].paraphrases == ("B?",)


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"Where is Beta?": []}', r"key 'Where is Beta\?': an empty list"),
        ('{"Where is Beta?": ["ok", 3]}', r"key 'Where is Beta\?': item 1: expected a non-empty"),
        ('{"Where is Beta?": {"a": 1}}', r"key 'Where is Beta\?': expected a list of rephrases"),
        ('[{"src": "x"}]', r"record 0, field 'rephrases': missing"),
        ('[{"rephrase": ["a"]}]', r"record 0: no 'src' or 'prompt'"),
        ('[{"src": "x", "rephrase": ["a"]}, {"src": "x", "rephrase": ["b"]}]', "record 1.*already"),
        ('{"a": ["b"]', "malformed JSON"),
        ("{}", "no rephrases"),
    ],
)
def test_rephrase_file_errors_name_file_and_key(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=rf"bad\.json.*{message}"):
        read_rephrases(path)


def test_rephrase_mode_must_be_known(two_files, tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"Where is Beta?": ["B?"]}')
    with pytest.raises(ValueError, match="rephrase mode"):
        apply_rephrases(read_spec(two_files[0]), read_rephrases(path), "prepend")


# ---------------------------------------------------------------------------------------------
# The real zsRE file (../shared/data)


def test_the_real_zsre_file_merged_deduplicated_normalised_and_split(shared_data, tmp_path):
    real = shared_data / "zsre" / "zsre_mend_train-1k.json"
    copy = tmp_path / "zsre_mend_train-1k-copy.json"
    shutil.copy(real, copy)
    merged = read_spec(f"{real}+{copy}")
    assert len(merged) == 2000 and [r.id for r in merged] == list(range(2000))
    from meg_jax.data.preprocess import dedup_by_subject

    unique = dedup_by_subject(merged)
    assert len(unique) == 991  # 1000 records, 991 subjects; the copy adds none
    assert all(r.source.file == str(real) for r in unique)
    first = merged[0]
    assert first.locality_prompts[0] == "nq question: john goodman's character in the big lebowski"
    assert normalize_nq_question(first.locality_prompts[0]) == (
        "John goodman's character in the big lebowski?"
    )
    # The tiny zsRE config: edits and pseudo-edits both from this file, the pseudo-edits its end.
    split = pseudo_split(read_spec(str(real)), read_spec(str(real)), by_subject=True)
    assert len(split) == 991
    ctx = fake_ctx(edits=str(real), pseudo=str(real), n_calibration=8, n_pseudo_pairs=24)
    pool, calibration = query_side._pseudo(ctx)
    assert len(calibration) == 8 and len(pool) == 24
    for r in calibration:
        question = r.locality_prompts[0]
        assert not question.startswith("nq question") and question.endswith("?")
        assert question[0] == question[0].upper()
    check_disjoint(read_spec(str(real), limit=32), [*pool, *calibration], by_subject=True)


# ---------------------------------------------------------------------------------------------
# The paper's zsRE configs


@pytest.mark.parametrize("model", ["gptj", "phi2", "llama3"])
def test_paper_zsre_configs_merge_the_two_files_and_take_a_rephrase_file(model):
    from meg_jax.pipeline.cli import load_config
    from tests.conftest import REPO_ROOT

    path = REPO_ROOT / "configs" / f"{model}_zsre.py"
    cfg, _ = load_config(["--config", f"{path}:n=2048"])
    assert split_spec(cfg.data.edits) == [
        "zsre/zsre_mend_eval.json",
        "zsre/zsre_mend_train_10000.json",
    ]
    assert cfg.data.pseudo == "zsre/zsre_mend_train.json" and cfg.data.kind == "zsre"
    assert cfg.data.rephrases == "" and cfg.data.n_pseudo_pairs == 4000  # one MEND rephrase each
    cfg, _ = load_config(["--config", f"{path}:rephrases=/glm/zsre.json"])
    assert cfg.data.rephrases == "/glm/zsre.json" and cfg.data.n_pseudo_pairs == 2000

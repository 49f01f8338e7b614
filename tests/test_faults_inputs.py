"""Edit files are bounded by the reader, and downloads are checked (issue 15, findings 3, 4, 6).

Before: `load_edits(limit=-1)` silently dropped the last record, a `case_id` of 2**70 passed and
overflowed after minutes of fitting, a 5,000-character prompt reached an allocation it could not
fit, and a downloaded dataset was trusted with no checksum.
"""

import hashlib
import json
import re

import pytest

from meg_jax.data import download
from meg_jax.data.download import ChecksumError, load_edits
from meg_jax.data.readers import read_edits
from meg_jax.data.records import DataFormatError


def _user_file(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def _edits(n=3):
    return [{"prompt": f"The capital of Land{i} is", "target": f"City{i}"} for i in range(n)]


# ---- limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [-1, -3, 0, 1.5, True])
def test_bad_limits_are_errors(tmp_path, limit):
    path = _user_file(tmp_path / "e.jsonl", _edits())
    for read in (load_edits, read_edits):
        with pytest.raises(ValueError, match=r"limit: expected a positive integer"):
            read(path, limit=limit)


def test_good_limits(tmp_path):
    path = _user_file(tmp_path / "e.jsonl", _edits())
    assert [r.id for r in load_edits(path, limit=2)] == [0, 1]
    assert len(load_edits(path, limit=10)) == len(load_edits(path)) == 3


# ---- ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [2**70, 2**63, -(2**63) - 1])
def test_ids_outside_int64_name_the_record(tmp_path, value):
    records = _edits()
    records[2]["id"] = value
    path = _user_file(tmp_path / "e.jsonl", records)
    with pytest.raises(DataFormatError) as info:
        load_edits(path)
    message = str(info.value)
    assert f"{path}: record 2, field 'id'" in message and "int64" in message


def test_counterfact_case_id_outside_int64(tmp_path):
    record = {
        "case_id": 2**70,
        "requested_rewrite": {
            "prompt": "{} plays",
            "subject": "Toko Yasuda",
            "target_new": {"str": "piano"},
            "target_true": {"str": "guitar"},
        },
        "paraphrase_prompts": ["Toko Yasuda is incredible at"],
        "neighborhood_prompts": ["John Lennon performs on the"],
    }
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(DataFormatError, match=r"record 0, field 'case_id': 1180591620717411303424"):
        load_edits(path)


def test_largest_int64_id_is_accepted(tmp_path):
    records = _edits(1)
    records[0]["id"] = 2**63 - 1
    assert load_edits(_user_file(tmp_path / "e.jsonl", records))[0].id == 2**63 - 1


# ---- text lengths ---------------------------------------------------------------------------


def test_long_prompt_is_refused_by_the_reader_naming_the_record(tmp_path):
    records = _edits()
    records[1]["prompt"] = "x" * 5000
    path = _user_file(tmp_path / "e.jsonl", records)
    with pytest.raises(DataFormatError) as info:
        load_edits(path)
    message = str(info.value)
    assert f"{path}: record 1, field 'prompt': 5000 characters" in message
    assert "max_chars=2000" in message
    # The bound is a setting: a user who means long prompts raises it.
    assert len(load_edits(path, max_chars=6000)) == 3


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("target", "y" * 2001, "target_new"),
        ("paraphrases", ["ok", "z" * 2001], "paraphrases[1]"),
        ("locality_prompts", ["w" * 2001], "locality_prompts[0]"),
    ],
)
def test_every_text_is_bounded(tmp_path, field, value, named):
    records = _edits(1)
    records[0][field] = value
    path = _user_file(tmp_path / "e.jsonl", records)
    with pytest.raises(DataFormatError, match=rf"record 0, field '{re.escape(named)}': 2001 char"):
        load_edits(path)


def test_bad_max_chars(tmp_path):
    path = _user_file(tmp_path / "e.jsonl", _edits())
    with pytest.raises(ValueError, match="max_chars: expected a positive integer"):
        load_edits(path, max_chars=0)


# ---- download checksums ---------------------------------------------------------------------

BODY = json.dumps([{"src": "q?", "answers": ["a"], "rephrase": "q2?", "alt": "b", "loc": "l",
                    "loc_ans": "m", "subject": "s"}]).encode()  # fmt: skip


def _serve(monkeypatch, body: bytes):
    calls = []

    def fetch(url):
        calls.append(url)
        return body

    monkeypatch.setattr(download, "fetch_url", fetch)
    return calls


def test_pinned_hash_mismatch_writes_nothing_and_names_url_and_hashes(tmp_path, monkeypatch):
    pinned = hashlib.sha256(b"the real file").hexdigest()
    monkeypatch.setitem(download.KNOWN_SHA256, "zsre_eval", pinned)
    _serve(monkeypatch, BODY)
    with pytest.raises(ChecksumError) as info:
        load_edits("zsre_eval", cache_dir=tmp_path)
    message = str(info.value)
    assert download.DATA_HOST + "zsre_mend_eval.json" in message
    assert pinned in message and hashlib.sha256(BODY).hexdigest() in message
    assert not (tmp_path / "zsre_mend_eval.json").exists()


def test_pinned_hash_match_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setitem(download.KNOWN_SHA256, "zsre_eval", hashlib.sha256(BODY).hexdigest())
    _serve(monkeypatch, BODY)
    assert len(load_edits("zsre_eval", cache_dir=tmp_path)) == 1


def test_unpinned_hash_is_recorded_then_enforced_on_the_cache(tmp_path, monkeypatch):
    calls = _serve(monkeypatch, BODY)
    assert len(load_edits("zsre_eval", cache_dir=tmp_path)) == 1
    record = tmp_path / "zsre_mend_eval.json.sha256"
    assert record.read_text().split()[0] == hashlib.sha256(BODY).hexdigest()
    assert len(load_edits("zsre_eval", cache_dir=tmp_path)) == 1 and len(calls) == 1
    # The cached copy is cut short (a full disk, a crash while copying by hand).
    cached = tmp_path / "zsre_mend_eval.json"
    cached.write_bytes(BODY[:-20])
    with pytest.raises(ChecksumError, match=r"zsre_mend_eval\.json: the cached copy of https"):
        load_edits("zsre_eval", cache_dir=tmp_path)
    assert not cached.exists()
    # Run again: downloaded afresh, checked against the recorded hash.
    assert len(load_edits("zsre_eval", cache_dir=tmp_path)) == 1 and len(calls) == 2


def test_a_changed_download_is_refused_against_the_recorded_hash(tmp_path, monkeypatch):
    (tmp_path / "zsre_mend_eval.json.sha256").write_text("0" * 64 + "  zsre_mend_eval.json\n")
    _serve(monkeypatch, BODY)
    with pytest.raises(ChecksumError, match="delete that record to accept"):
        load_edits("zsre_eval", cache_dir=tmp_path)
    assert not (tmp_path / "zsre_mend_eval.json").exists()


def test_a_file_placed_by_hand_is_trusted_on_first_use(tmp_path, monkeypatch):
    calls = _serve(monkeypatch, b"never fetched")
    (tmp_path / "zsre_mend_eval.json").write_bytes(BODY)
    assert len(load_edits("zsre_eval", cache_dir=tmp_path)) == 1 and not calls
    assert (tmp_path / "zsre_mend_eval.json.sha256").is_file()

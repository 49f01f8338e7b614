"""`load_edits`: local paths, named datasets fetched once into a cache, and the offline error.

No test touches the network: `fetch_url` is replaced in every test that could reach it.
"""

import json
import urllib.error

import pytest

from meg_jax.data import download
from meg_jax.data.download import DatasetUnavailableError, load_edits

ROME_RECORD = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "{} plays",
        "subject": "Toko Yasuda",
        "target_new": {"str": "piano"},
        "target_true": {"str": "guitar"},
    },
    "paraphrase_prompts": ["Toko Yasuda is incredible at"],
    "neighborhood_prompts": ["John Lennon performs on the"],
}


def test_offline_error_says_what_to_download_and_where(tmp_path, monkeypatch):
    def offline(url):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(download, "fetch_url", offline)
    with pytest.raises(DatasetUnavailableError) as info:
        load_edits("zsre_eval", cache_dir=tmp_path)
    message = str(info.value)
    assert "https://rome.baulab.info/data/dsets/zsre_mend_eval.json" in message
    assert str(tmp_path / "zsre_mend_eval.json") in message
    assert "no network" in message
    assert not any(tmp_path.iterdir())


def test_named_dataset_is_downloaded_once(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(url):
        calls.append(url)
        return json.dumps([ROME_RECORD]).encode()

    monkeypatch.setattr(download, "fetch_url", fake_fetch)
    first = load_edits("multi_counterfact", cache_dir=tmp_path)
    assert calls == ["https://rome.baulab.info/data/dsets/multi_counterfact.json"]
    # No temp file left; the checksum recorded at first download sits beside the file.
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["multi_counterfact.json", "multi_counterfact.json.sha256"]
    assert first[0].prompt == "Toko Yasuda plays" and first[0].target_new == "piano"

    def must_not_fetch(url):
        raise AssertionError("fetched again")

    monkeypatch.setattr(download, "fetch_url", must_not_fetch)
    assert load_edits("multi_counterfact", cache_dir=tmp_path) == first


def test_a_download_that_is_not_json_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "fetch_url", lambda url: b"<html>proxy error</html>")
    with pytest.raises(DatasetUnavailableError, match="not JSON.*nothing was written"):
        load_edits("counterfact", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_local_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"prompt": "Water boils at", "target": "50 degrees"}) + "\n")
    assert load_edits(path, cache_dir=tmp_path)[0].target_new == "50 degrees"
    with pytest.raises(FileNotFoundError, match="not a known dataset name"):
        load_edits("zsre_test", cache_dir=tmp_path)


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEG_JAX_CACHE", str(tmp_path))
    assert download.default_cache_dir() == tmp_path / "datasets"

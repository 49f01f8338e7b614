"""One resolution order for a config's data files: a path, the data directory, the download."""

import json

import pytest

from meg_jax.data import download, locate


def test_a_path_then_the_data_directory(tmp_path, monkeypatch):
    given = tmp_path / "mine.json"
    given.write_text("[]")
    assert locate.locate(str(given))[0] == given
    data = tmp_path / "data"
    (data / "counterfact").mkdir(parents=True)
    (data / "counterfact" / "counterfact-edit.json").write_text("[]")
    monkeypatch.setenv(locate.ENV_DATA_DIR, str(data))
    path, how = locate.locate("counterfact/counterfact-edit.json")
    assert path == data.resolve() / "counterfact" / "counterfact-edit.json"
    assert "data directory" in how


def test_the_default_files_download_once_without_a_data_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "data_dirs", lambda: [])
    urls = []

    def fake_fetch(url):
        urls.append(url)
        return json.dumps([{"case_id": 0}]).encode()

    monkeypatch.setattr(download, "fetch_url", fake_fetch)
    path, how = locate.locate("counterfact/counterfact-edit.json", cache_dir=tmp_path)
    assert path == tmp_path / "counterfact-edit.json" and path.is_file()
    assert urls == [download.EASYEDIT_CF + "counterfact-edit.json"] and "cache" in how
    assert locate.locate("counterfact/counterfact-edit.json", cache_dir=tmp_path)[0] == path
    assert len(urls) == 1


def test_an_unknown_name_says_where_to_put_it(monkeypatch):
    monkeypatch.setattr(locate, "data_dirs", lambda: [])
    with pytest.raises(FileNotFoundError, match="no such file.*MEG_JAX_DATA"):
        locate.locate("nowhere/edits.json")

"""Key statistics: cached per layer, resumed after an interruption, the same either way (the
baseline configs are checked in test_configs.py)."""

from pathlib import Path

import numpy as np
import pytest
from hf_tiny import tiny_llama

from meg_jax.baselines import stats
from meg_jax.baselines.stats import StatsConfig, key_moments
from meg_jax.checkpoints.hf_decoder import load_hf_decoder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
LAYERS = (0, 2)


def _tokenizer(text):
    """Characters to ids of the 97-token tiny vocabulary (no real tokenizer needed)."""
    return {"input_ids": [3 + ord(c) % 90 for c in text]}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    _, path = tiny_llama(tmp_path_factory.mktemp("llama"))
    return load_hf_decoder(path)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not found")
def test_moments_are_cached_and_resumed(host, tmp_path, monkeypatch):
    config, params = host
    cfg = StatsConfig(data_dir=str(SHARED), n_texts=40, max_tokens=12, batch_size=8, save_every=2)
    whole = key_moments(config, params, _tokenizer, LAYERS, cfg, tmp_path / "a", "tiny")
    assert set(whole) == set(LAYERS) and whole[0].shape == (config.d_ff, config.d_ff)
    np.testing.assert_allclose(whole[0], whole[0].T, atol=1e-12)

    # A second call reads the cache and computes nothing.
    monkeypatch.setattr(stats, "accumulate", lambda *a, **k: pytest.fail("recomputed"))
    again = key_moments(config, params, _tokenizer, LAYERS, cfg, tmp_path / "a", "tiny")
    np.testing.assert_array_equal(again[2], whole[2])
    monkeypatch.undo()

    # Interrupted after its first progress save (2 of 5 batches), then resumed.
    real = stats.accumulate

    def crash_after_save(*args, on_progress=None, **kwargs):
        def save_then_stop(state):
            on_progress(state)
            raise KeyboardInterrupt

        return real(*args, on_progress=save_then_stop, **kwargs)

    monkeypatch.setattr(stats, "accumulate", crash_after_save)
    with pytest.raises(KeyboardInterrupt):
        key_moments(config, params, _tokenizer, LAYERS, cfg, tmp_path / "b", "tiny")
    partial = list((tmp_path / "b").glob("*partial*"))
    assert len(partial) == 1 and int(np.load(partial[0])["done"]) == 16
    monkeypatch.undo()
    seen = []

    def counting(*args, **kwargs):
        seen.append(kwargs["state"]["done"] if kwargs.get("state") else args[5]["done"])
        return real(*args, **kwargs)

    monkeypatch.setattr(stats, "accumulate", counting)
    resumed = key_moments(config, params, _tokenizer, LAYERS, cfg, tmp_path / "b", "tiny")
    assert seen == [16]  # started where the save left off
    assert not list((tmp_path / "b").glob("*partial*"))
    for layer in LAYERS:
        np.testing.assert_allclose(resumed[layer], whole[layer], rtol=1e-10, atol=1e-14)

"""The MeG editor's guard: a generated neuron that is not finite becomes the zero neuron (the
unedited model) and is counted, never handed to the host."""

import numpy as np

import meg_jax.inference.editor as editor_module
from meg_jax.inference.editor import MeGEditor, query_id


class _Encoder:
    """Stands in for a TextEncoder: a fixed vector per text."""

    def encode(self, texts):
        return np.ones((len(texts), 4), np.float32)


def test_non_finite_generated_neurons_become_zero_and_are_counted(monkeypatch):
    d_model = 3

    def fake_generate(params, conditions, rng, config, mesh=None, ids=None, chunk_size=None):
        out = np.arange(len(conditions) * 2 * d_model, dtype=np.float32).reshape(
            len(conditions), -1
        )
        out[1, 2] = np.nan  # the second query's sample diverged
        return out + 1.0

    monkeypatch.setattr(editor_module, "generate", fake_generate)
    editor = MeGEditor(_Encoder(), _Encoder(), None, None, None, d_model, False)
    flat = editor.flat(["a", "b", "c"])
    assert np.all(flat[1] == 0) and np.all(np.isfinite(flat))
    assert np.all(flat[[0, 2]] != 0)
    assert editor.non_finite == 1
    neuron = editor(["a", "b", "c"])
    assert np.all(np.asarray(neuron.w_in)[1] == 0) and editor.non_finite == 2


def test_query_ids_name_the_text_only():
    assert query_id("Who wrote Hamlet?") == query_id("Who wrote Hamlet?")
    assert query_id("Who wrote Hamlet?") != query_id("Who wrote Hamlet ?")

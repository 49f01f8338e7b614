"""Encoder stage: InfoNCE loss, retrieval, tokenisation, encoding, determinism and resume."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import run_with_fake_devices
from test_bert import MINILM, tiny_bert_dir

from meg_jax.data.readers import read_edits
from meg_jax.encoder.infonce import (
    info_nce_loss,
    pseudo_edit_pairs,
    retrieval_loss,
    retrieval_sets,
    retrieval_top1,
    split_pairs,
)
from meg_jax.encoder.text_encoder import TextEncoder, apply_template, batch_rows, cls_vectors
from meg_jax.encoder.tokenize import BertTokenizer, bucket_length
from meg_jax.encoder.train import InfoNCEConfig, restore_best_top_layers, train_infonce
from meg_jax.infra.trees import flatten_tree

GPTJ_TEMPLATE = "Q: Answer the following question in less than 5 words. {query}\nA:"


def _reference_info_nce(p: torch.Tensor, o: torch.Tensor, tau: float) -> torch.Tensor:
    """The reference's formulation: [cos(p_i, o_i), p_i . o_j (j != i)], CE on index 0."""
    p = torch.nn.functional.normalize(p, dim=-1)
    o = torch.nn.functional.normalize(o, dim=-1)
    positive = (p * o).sum(-1, keepdim=True)
    negative = (p @ o.T).masked_fill(torch.eye(len(p), dtype=torch.bool), float("-inf"))
    logits = torch.cat([positive, negative], dim=1) / tau
    return torch.nn.functional.cross_entropy(logits, torch.zeros(len(p), dtype=torch.long))


@pytest.mark.parametrize("tau", [1.0, 0.05])
def test_info_nce_matches_reference_loss_and_gradient(tau):
    rng = np.random.default_rng(0)
    p, o = rng.standard_normal((2, 8, 16)).astype(np.float32)
    tp = torch.tensor(p, requires_grad=True)
    want = _reference_info_nce(tp, torch.tensor(o), tau)
    want.backward()
    got, grad = jax.value_and_grad(info_nce_loss)(jnp.asarray(p), jnp.asarray(o), tau)
    np.testing.assert_allclose(got, want.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, tp.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_retrieval_top1_and_sets():
    gallery = np.eye(4, dtype=np.float32)
    queries = gallery[[0, 1, 3, 2]] + 0.1  # rows 2 and 3 point at each other's original
    assert retrieval_top1(queries, gallery) == 0.5
    assert retrieval_top1(queries, gallery, np.array([0, 1, 3, 2])) == 1.0
    originals, paraphrases, targets = retrieval_sets([("a", "a1"), ("a", "a2"), ("b", "b1")])
    assert originals == ["a", "b"] and paraphrases == ["a1", "a2", "b1"]
    assert targets.tolist() == [0, 0, 1]


def test_split_pairs_holds_out_unseen_texts():
    pairs = [(f"o{i // 2}", f"p{i}") for i in range(40)]
    pairs += [(f"q{i}", f"o{i}") for i in range(20)]  # paraphrases equal to other originals
    train, val = split_pairs(pairs, 20, seed=0)
    assert len(val) >= 5 and len(train) + len(val) <= 60
    assert not {t for p in train for t in p} & {t for p in val for t in p}
    assert split_pairs(pairs, 20, seed=0) == (train, val)


def test_pseudo_edit_pairs_from_real_files(shared_data):
    cf = read_edits(shared_data / "counterfact" / "counterfact-train.json", limit=3)
    assert pseudo_edit_pairs(cf) == [(r.prompt, r.paraphrases[0]) for r in cf]
    zsre = read_edits(shared_data / "zsre" / "zsre_mend_train-1k.json", limit=2)
    assert pseudo_edit_pairs(zsre)[0] == (
        "What is the product made by UniFirst?",
        zsre[0].paraphrases[0],
    )


def test_template_needs_one_placeholder():
    assert apply_template(GPTJ_TEMPLATE, ["x {y}"]) == [GPTJ_TEMPLATE.replace("{query}", "x {y}")]
    with pytest.raises(ValueError, match="exactly once"):
        apply_template("Q: {q}", ["x"])


def test_tokenizer_buckets_and_truncation():
    tok = BertTokenizer(MINILM, max_length=8)
    assert [bucket_length(n, 512) for n in (1, 16, 17, 600)] == [16, 16, 32, 512]
    batch = tok(["hello world", "one two three four five six seven eight nine"])
    assert batch.ids.shape == (2, 8)
    assert batch.ids[1, -1] == 102 and batch.mask[1].all()  # truncated, [SEP] kept
    assert batch.mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    with pytest.raises(TypeError, match="text 1"):
        tok(["fine", None])


def test_batch_rows():
    assert [batch_rows(n, 64, 1) for n in (1, 3, 64, 100)] == [1, 4, 64, 100]
    assert batch_rows(3, 64, 8) == 8


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.from_pretrained(MINILM, n_top_layers=1, batch_size=16)


def test_encode_is_padding_and_order_invariant(minilm):
    texts = [f"The capital of country number {i} is" for i in range(5)]
    texts += ["A long query " + "with many words " * 12, "short"]
    cls_vectors._clear_cache()
    together = minilm.encode(texts)
    alone = np.stack([minilm.encode([t])[0] for t in texts[:3]])
    np.testing.assert_allclose(together[:3], alone, atol=1e-5)
    # 7 texts in 3 length buckets x 1 batch-size bucket, then 1 text alone: at most 4 compilations
    assert cls_vectors._cache_size() <= 4
    normed = minilm.with_view(normalize=True).encode(texts[:2])
    np.testing.assert_allclose(np.linalg.norm(normed, axis=-1), 1.0, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data):
    """A tiny random BERT with MiniLM's tokenizer, and 64 real CounterFact pairs."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_bert_dir(root / "bert", with_tokenizer=True)
    records = read_edits(shared_data / "counterfact" / "counterfact-train.json", limit=64)
    return root, pseudo_edit_pairs(records)


TINY_CONFIG = InfoNCEConfig(batch_size=8, num_steps=6, eval_every=3, seed=1, learning_rate=3e-3)
TINY_TEXTS = slice(0, 11)


def _tiny_run(root, workdir, pairs, num_steps):
    encoder = TextEncoder.from_pretrained(root / "bert", n_top_layers=1, batch_size=16)
    config = dataclasses.replace(TINY_CONFIG, num_steps=num_steps)
    return train_infonce(encoder, pairs[:48], pairs[48:], config, workdir), encoder


def test_training_is_deterministic_and_resumes_exactly(tiny, tmp_path):
    root, pairs = tiny
    first, encoder = _tiny_run(root, tmp_path / "a", pairs, 6)
    # A second run, stopped after step 3 and resumed from its checkpoint, must end exactly where
    # the first did: determinism and resume in one check.
    _tiny_run(root, tmp_path / "b", pairs, 3)
    resumed, _ = _tiny_run(root, tmp_path / "b", pairs, 6)
    assert [h["step"] for h in first.history] == [0, 3, 6]
    assert [h["step"] for h in resumed.history] == [6]  # steps 0 and 3 came from the checkpoint
    assert resumed.best_step == first.best_step
    assert resumed.history[-1]["val_top1"] == first.history[-1]["val_top1"]
    jax.tree.map(np.testing.assert_array_equal, resumed.top_layers, first.top_layers)
    restored = restore_best_top_layers(encoder, TINY_CONFIG, tmp_path / "b")
    jax.tree.map(np.testing.assert_array_equal, restored, first.top_layers)
    with pytest.raises(ValueError, match=r"val_pairs\[0\].*share text with train_pairs"):
        train_infonce(encoder, pairs[:48], pairs[:8], TINY_CONFIG, tmp_path / "leak")
    with pytest.raises(ValueError, match=r"train_pairs\[1\]: expected an \(original"):
        train_infonce(encoder, [("a", "b"), ("c",)], pairs[48:], TINY_CONFIG, tmp_path / "bad")
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert {x["event"] for x in lines} == {"eval", "train"}
    assert all(np.isfinite(x["loss"]) for x in lines if x["event"] == "train")


def test_selection_keeps_the_lowest_loss_or_the_first_best_top1_checkpoint(tiny, tmp_path):
    root, pairs = tiny
    encoder = TextEncoder.from_pretrained(root / "bert", n_top_layers=1, batch_size=16)
    by_loss = dataclasses.replace(TINY_CONFIG, num_steps=9)
    assert by_loss.select == "val_loss"  # the default
    result = train_infonce(encoder, pairs[:48], pairs[48:], by_loss, tmp_path / "loss")
    losses = {h["step"]: h["val_loss"] for h in result.history}
    assert len(set(losses.values())) == len(losses)  # the loss moves with every checkpoint
    assert result.best_step == min(losses, key=losses.get)
    top1 = {h["step"]: h["val_top1"] for h in result.history}
    assert result.best_step != max(top1, key=top1.get)  # here top-1 would keep another step
    by_top1 = dataclasses.replace(by_loss, select="val_top1")
    other = train_infonce(encoder, pairs[:48], pairs[48:], by_top1, tmp_path / "top1")

    def readings(history):
        return [(h["step"], h["val_top1"], h["val_loss"]) for h in history]

    assert readings(other.history) == readings(result.history)  # the same training
    assert other.best_step == max(top1, key=top1.get)  # the first of ties
    assert result.best_val_loss == pytest.approx(losses[result.best_step], rel=1e-6)
    assert result.best_val_top1 == next(
        h["val_top1"] for h in result.history if h["step"] == result.best_step
    )
    with pytest.raises(ValueError, match="encoder.infonce.select"):
        InfoNCEConfig(select="val_top5")


def test_retrieval_loss_is_cross_entropy_over_the_gallery():
    rng = np.random.default_rng(0)
    queries, gallery = rng.normal(size=(5, 8)), rng.normal(size=(7, 8))
    targets = np.array([0, 3, 3, 6, 1])
    q = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=-1, keepdims=True)
    logits = torch.from_numpy(q @ g.T / 0.05)
    expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(targets)).item()
    assert retrieval_loss(queries, gallery, targets, 0.05) == pytest.approx(expected, rel=1e-9)
    # Every cosine equal: the loss of a uniform guess, log M, whatever the temperature.
    assert retrieval_loss(np.ones((3, 4)), np.ones((7, 4)), np.zeros(3, int), 0.1) == (
        pytest.approx(np.log(7))
    )


@pytest.mark.slow
def test_infonce_improves_paraphrase_retrieval_on_counterfact(tmp_path, shared_data, minilm):
    records = read_edits(shared_data / "counterfact" / "counterfact-train.json", limit=384)
    train_pairs = pseudo_edit_pairs(records[:128])
    held_out = pseudo_edit_pairs(records[128:])  # 256 pairs, originals unseen in training
    config = InfoNCEConfig(
        template=GPTJ_TEMPLATE, batch_size=64, num_steps=12, eval_every=12, learning_rate=3e-4
    )
    result = train_infonce(minilm, train_pairs, held_out, config, tmp_path)
    before, after = result.history[0]["val_top1"], result.history[-1]["val_top1"]
    assert after > before, (before, after)
    assert result.best_step == 12 and result.best_val_top1 == after
    tuned = minilm.with_top_layers(result.top_layers).with_view(template=GPTJ_TEMPLATE)
    texts = [o for o, _ in held_out[:4]]
    untuned = minilm.with_view(template=GPTJ_TEMPLATE).encode(texts)
    assert np.abs(tuned.encode(texts) - untuned).max() > 1e-3  # the tuned layers are in use


def test_encode_and_train_on_eight_fake_devices(tiny, tmp_path):
    root, pairs = tiny
    reference, encoder = _tiny_run(root, tmp_path / "one", pairs, 6)
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    run_with_fake_devices(
        f"""
        import dataclasses, json, jax, numpy as np
        from meg_jax.infra.trees import flatten_tree
        from meg_jax.encoder.text_encoder import TextEncoder
        from meg_jax.encoder.train import InfoNCEConfig, train_infonce
        from meg_jax.infra.sharding import make_mesh
        pairs = [tuple(p) for p in json.load(open({str(tmp_path / "pairs.json")!r}))]
        bert = {str(root / "bert")!r}
        enc = TextEncoder.from_pretrained(bert, batch_size=16)
        assert enc.mesh.shape["data"] == 8
        vectors = enc.encode([o for o, _ in pairs[{TINY_TEXTS.start}:{TINY_TEXTS.stop}]])
        config = dataclasses.replace(InfoNCEConfig(), **{_fields(TINY_CONFIG)!r})
        res = train_infonce(enc, pairs[:48], pairs[48:], config, {str(tmp_path / "eight")!r})
        assert len(res.top_layers["q"]["kernel"].sharding.device_set) == 8
        layers = flatten_tree(res.top_layers)
        np.savez({str(tmp_path / "eight.npz")!r}, vectors=vectors, step=res.best_step, **layers)
        try:
            TextEncoder.from_pretrained(bert, batch_size=12)
        except ValueError as err:
            assert "multiple of the mesh" in str(err)
        else:
            raise AssertionError("a batch of 12 over 8 devices was accepted")
        """
    )
    eight = np.load(tmp_path / "eight.npz")
    want = encoder.encode([o for o, _ in pairs[TINY_TEXTS]])
    np.testing.assert_allclose(eight["vectors"], want, atol=1e-5)
    assert int(eight["step"]) == reference.best_step > 0  # the same trained checkpoint kept
    # Adam's normalised steps turn reduction-order differences of near-zero gradients into
    # differences of up to a step's size in single weights, so the whole update is compared: the
    # eight devices' update agrees with one device's to 1% of its length.
    start = flatten_tree(encoder.params["top_layers"])
    trained = flatten_tree(reference.top_layers)
    update = np.concatenate([np.ravel(trained[k] - start[k]) for k in trained])
    apart = np.concatenate([np.ravel(eight[k] - trained[k]) for k in trained])
    assert np.linalg.norm(apart) < 0.01 * np.linalg.norm(update)


def _fields(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}

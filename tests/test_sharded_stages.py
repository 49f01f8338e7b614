"""Stages that hold many edits, on 8 fake CPU devices against one device.

Collection: the edits' slots split over the mesh's "data" axis, the host's weights over "model"
(data=8, and data=4 x model=2). Generator training: minibatches drawn from the one bank array,
the batch split over "data", float32 and bfloat16 compute.

XLA fixes the device count when its backend starts, so the 8-device runs are a subprocess
(`conftest.run_with_fake_devices`) writing its results to a file; this process computes the
ordinary single-device results and compares.

Tolerances. The sharded and single-device runs do the same arithmetic in a different order
(per-device batch sizes pick other matmul kernels; the "model" split sums partial products
across devices), so they agree to float32 rounding per step, carried along the fit. For
collection that is the figure tests/test_collect_fast.py measured for batch sizes 4 vs 1
(Adam over 60 steps: about 1e-5 on weights of scale 0.01-1, bounded here by rtol 1e-3, atol
1e-4), while a row put in the wrong slot, a missed update or a fit of another edit is off by the
whole fit, which the test checks is at least 100 times larger.
"""

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_with_fake_devices

from meg_jax.collect.stage import CollectConfig, Collector
from meg_jax.infra.trees import flatten_tree
from meg_jax.models.decoder import Decoder

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_collect_fast import EDITS, FAST, WordTokenizer, exact_success, tiny_llama_config  # noqa: E402

# Adam with per-row early stop, as the fast recipe; 7 edits in 4 slots (8 on data=8: the slot
# count is rounded up to the data size), two steps per call, compaction down to 4 rows.
COLLECT = dict(FAST, batch_size=4, min_batch=1, check_every=2)

_COLLECT_RUN = """
import dataclasses, json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
import meg_jax.collect.stage as stage
from meg_jax.infra.sharding import make_mesh
from meg_jax.infra.trees import unflatten_tree
from test_collect_fast import EDITS, WordTokenizer, exact_success, tiny_llama_config

assert jax.device_count() == 8
with np.load({params!r}) as f:
    params = unflatten_tree({{k: f[k] for k in f.files}})
config = tiny_llama_config()
seen = []
real_fit_steps = stage.fit_steps

def spy(config, params, hidden, mask, index, targets, weights, state, *rest, **kw):
    kernel = params["layers"]["mlp"]["up"]["kernel"]
    seen.append({{
        "hidden": [str(a) for a in hidden.sharding.spec],
        "w_in": [str(a) for a in state.neuron.w_in.sharding.spec],
        "steps": [str(a) for a in state.steps.sharding.spec],
        "rows_per_device": sorted({{s.data.shape[0] for s in state.steps.addressable_shards}}),
        "kernel": [str(a) for a in kernel.sharding.spec],
        "width": int(hidden.shape[0]),
    }})
    return real_fit_steps(config, params, hidden, mask, index, targets, weights, state, *rest, **kw)

stage.fit_steps = spy
out = {{}}
for name, (data, model) in {{"data8": (8, 1), "data4_model2": (4, 2)}}.items():
    seen.clear()
    collector = stage.Collector(
        config, params, WordTokenizer(), stage.CollectConfig(**{cfg!r}), exact_success,
        mesh=make_mesh(data, model),
    )
    bank = collector.fit({edits})
    np.savez({out!r} + "_" + name + ".npz", weights=bank.weights, success=bank.success,
             loss=bank.final_loss)
    out[name] = {{"first": seen[0], "last": seen[-1], "calls": len(seen)}}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = tiny_llama_config()
    params = Decoder(config).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
    path = tmp_path_factory.mktemp("sharded") / "params.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in flatten_tree(params).items()})
    return config, params, path


def test_sharded_collection_equals_one_device(tiny, tmp_path):
    config, params, params_path = tiny
    code = _COLLECT_RUN.format(
        params=str(params_path), cfg=COLLECT, out=str(tmp_path / "bank"), edits="EDITS"
    )
    placed = json.loads(run_with_fake_devices(code, n_devices=8).strip().splitlines()[-1])

    single = Collector(config, params, WordTokenizer(), CollectConfig(**COLLECT), exact_success)
    one = single.fit(EDITS)
    assert one.success.all(), one.final_loss
    init = np.asarray(single.init.w_in[0])
    moved = np.abs(one.weights[:, : init.size] - init).max(axis=1)  # each fit's own distance
    # Rows differ from each other by the whole fit: a swapped row could not pass the tolerance.
    apart = min(np.abs(one.weights[i] - one.weights[j]).max() for i in range(7) for j in range(i))
    assert moved.min() > 100 * 1e-4 and apart > 100 * 1e-4, (moved, apart)

    for name in ("data8", "data4_model2"):
        with np.load(tmp_path / f"bank_{name}.npz") as sharded:
            np.testing.assert_array_equal(sharded["success"], one.success, err_msg=name)
            np.testing.assert_allclose(
                sharded["weights"], one.weights, rtol=1e-3, atol=1e-4, err_msg=name
            )
            np.testing.assert_allclose(
                sharded["loss"], one.final_loss, rtol=1e-3, atol=1e-4, err_msg=name
            )

    # Where things ran: slots over "data", host weights over "model" (replicated over "data").
    d8, d4 = placed["data8"], placed["data4_model2"]
    for run in (d8, d4):
        assert run["first"]["hidden"][0] == "data" and run["first"]["w_in"][0] == "data"
        assert run["first"]["steps"] == ["data"]
    assert d8["first"]["width"] == 8 and d8["first"]["rows_per_device"] == [1]
    assert d8["first"]["kernel"] == ["None", "None", "model"]  # model axis of size 1
    assert d4["first"]["width"] == 4 and d4["first"]["rows_per_device"] == [1]
    assert d4["first"]["kernel"] == ["None", "None", "model"]


# ---- generator training ------------------------------------------------------------------------

# 60 rows (one failed fit dropped: 59 trained) in minibatches of 16: the fourth batch of each
# epoch is short and padded, and 6 steps cross an epoch boundary. The criterion at step 6 samples
# all 59 conditions (split over "data" on the mesh).
GEN_TRAIN = {
    "dit": {"cond_dropout": 0.0},
    "optim": {"learning_rate": 1e-3, "warmup_steps": 2},
    "train": {
        "num_steps": 6,
        "batch_size": 16,
        "shuffle": True,
        "eval_every": 6,
        "log_every": 1,
        "checkpoint_every": 6,
    },
}

_GENERATOR_RUN = """
import dataclasses, json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from test_sharded_stages import GEN_TRAIN, generator_bank
from meg_jax.diffusion import generator_config, train_generator
from meg_jax.infra.sharding import make_mesh

assert jax.device_count() == 8
weights, cond, success = generator_bank()
out = {{}}
for dtype in ("float32", "bfloat16"):
    overrides = {{**GEN_TRAIN, "dit": {{**GEN_TRAIN["dit"], "compute_dtype": dtype}}}}
    config = generator_config(overrides, preset="fast", dit_preset="tiny")
    result = train_generator(
        weights, cond, config, {root!r} + "/" + dtype, success=success, mesh=make_mesh(8, 1)
    )
    leaves = jax.tree.leaves(result.state.params)
    np.savez({root!r} + "/" + dtype + ".npz", *[np.asarray(x) for x in leaves])
    out[dtype] = {{
        "criterion": result.criterion,
        "replicated": all(x.sharding.spec == jax.sharding.PartitionSpec() for x in leaves),
        "copies": len(leaves[0].addressable_shards),
    }}
print(json.dumps(out))
"""


def generator_bank(rows: int = 60, length: int = 96, width: int = 16):
    """(weights [N, P], conditions [N, E], success [N]): a smooth synthetic bank, row 5 failed."""
    rng = np.random.default_rng(0)
    cond = rng.normal(size=(rows, width)).astype(np.float32)
    weights = (0.3 * np.tanh(cond @ rng.normal(size=(width, length)) / 4)).astype(np.float32)
    success = np.ones(rows, bool)
    success[5] = False
    return weights, cond, success


def _losses(workdir):
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return np.asarray([e["loss"] for e in events if e["event"] == "train"])


def test_sharded_generator_training_equals_one_device(tmp_path):
    from meg_jax.diffusion import generator_config, train_generator

    root = tmp_path / "eight"
    code = _GENERATOR_RUN.format(root=str(root))
    placed = json.loads(run_with_fake_devices(code, n_devices=8).strip().splitlines()[-1])

    weights, cond, success = generator_bank()
    for dtype, (loss_rtol, param_share) in {
        # float32: the same sums in another order (the gradient all-reduce over 8 devices), to
        # float rounding; Adam's first steps are ~lr * sign(g), which flips on near-zero
        # gradients, hence a share of how far the parameters moved rather than a rounding bound
        # (as tests/test_diffusion_train.py's one-step comparison).
        "float32": (1e-5, 0.05),
        # bfloat16: products rounded to 8 bits of mantissa (relative 2^-8 = 0.4%), per-device
        # partial sums in another order; a wrong batch or a dropped row moves the loss by far
        # more (the loss of a fresh generator varies by ~10% across batches). Parameters are
        # not compared: rounding flips Adam's sign(g) steps on near-zero gradients, and such a
        # parameter differs by its whole move (measured: 0.0028 of a largest move of 0.0030).
        "bfloat16": (2e-2, None),
    }.items():
        overrides = {**GEN_TRAIN, "dit": {**GEN_TRAIN["dit"], "compute_dtype": dtype}}
        config = generator_config(overrides, preset="fast", dit_preset="tiny")
        init = generator_config(
            {**overrides, "train": {**GEN_TRAIN["train"], "num_steps": 1}},
            preset="fast",
            dit_preset="tiny",
        )
        one = train_generator(weights, cond, config, tmp_path / dtype, success=success)
        start = train_generator(weights, cond, init, tmp_path / f"{dtype}_start", success=success)
        a = [np.asarray(x) for x in jax.tree.leaves(one.state.params)]
        s = [np.asarray(x) for x in jax.tree.leaves(start.state.params)]
        with np.load(root / f"{dtype}.npz") as f:
            b = [f[f"arr_{i}"] for i in range(len(a))]
        diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
        moved = max(float(np.abs(x - y).max()) for x, y in zip(a, s, strict=True))
        losses_one, losses_eight = _losses(tmp_path / dtype), _losses(root / dtype)
        assert len(losses_one) == 6
        np.testing.assert_allclose(losses_eight, losses_one, rtol=loss_rtol, err_msg=dtype)
        assert moved > 1e-4, (dtype, moved)
        if param_share is not None:
            assert diff < param_share * moved, (dtype, diff, moved)
        assert placed[dtype]["criterion"] == pytest.approx(one.criterion, rel=10 * loss_rtol)
        assert placed[dtype]["replicated"] and placed[dtype]["copies"] == 8  # batch split
        print(
            dtype,
            "params",
            diff,
            "of",
            moved,
            "losses",
            np.abs(losses_eight / losses_one - 1).max(),
        )


def test_minibatches_are_the_normalised_bank_without_a_copy():
    from meg_jax.diffusion import generator_config
    from meg_jax.diffusion.bank import prepare_bank
    from meg_jax.diffusion.normalization import center_conditions, fit_normalization, normalize
    from meg_jax.diffusion.train import _minibatch

    weights, cond, success = generator_bank()
    config = generator_config(GEN_TRAIN, preset="fast", dit_preset="tiny")
    # Every row kept: the training bank is the caller's arrays, not a copy.
    whole = prepare_bank(weights, cond)
    assert whole.weights is weights and whole.conditions is cond
    bank = prepare_bank(weights, cond, success)
    zeros = np.random.default_rng(1).normal(size=(3, cond.shape[1])).astype(np.float32)
    norm = fit_normalization(config.normalization, bank.weights, bank.conditions)
    rows = np.array([58, 0, 59, 61, 3, 0])  # bank rows, zero rows (59..61), padding copies
    x0, c = _minibatch(bank, zeros, norm, rows)
    full_x0 = np.asarray(normalize(norm, np.concatenate([bank.weights, np.zeros((3, 96))])))
    full_c = np.asarray(center_conditions(norm, np.concatenate([bank.conditions, zeros])))
    np.testing.assert_array_equal(x0, full_x0[rows].astype(np.float32))
    np.testing.assert_array_equal(c, full_c[rows])


# Each edit fitted alone and behind one context: two sequences per slot, split with the slots.
_BEHIND = "[dataclasses.replace(e, contexts=('The end. ' + e.query,)) for e in EDITS]"


def test_sharded_collection_with_contexts_equals_one_device(tiny, tmp_path):
    config, params, params_path = tiny
    code = _COLLECT_RUN.format(
        params=str(params_path), cfg=COLLECT, out=str(tmp_path / "bank"), edits=_BEHIND
    )
    placed = json.loads(run_with_fake_devices(code, n_devices=8).strip().splitlines()[-1])
    behind = [dataclasses.replace(e, contexts=("The end. " + e.query,)) for e in EDITS]
    single = Collector(config, params, WordTokenizer(), CollectConfig(**COLLECT), exact_success)
    one = single.fit(behind)
    assert one.success.sum() >= 4
    for name in ("data8", "data4_model2"):
        with np.load(tmp_path / f"bank_{name}.npz") as sharded:
            np.testing.assert_array_equal(sharded["success"], one.success, err_msg=name)
            np.testing.assert_allclose(
                sharded["weights"], one.weights, rtol=1e-3, atol=1e-4, err_msg=name
            )
    # Two sequences per slot: 8 slots hold 16 rows, 2 on each of the 8 data devices.
    assert placed["data8"]["first"]["width"] == 16

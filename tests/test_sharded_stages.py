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
import json, sys
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
    bank = collector.fit(EDITS)
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
    code = _COLLECT_RUN.format(params=str(params_path), cfg=COLLECT, out=str(tmp_path / "bank"))
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

"""The memory plan: parameter and optimiser bytes against hand computation, nothing allocated."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax.diffusion.config import generator_config
from meg_jax.models.config import LMConfig
from meg_jax.plan import _mesh, parse_args
from meg_jax.planning import DEVICE_SETS, StageSizes, plan_stages, verdict
from meg_jax.planning.flops import matmul_flops
from meg_jax.planning.memory import GIB, device_mesh, format_plan
from meg_jax.planning.programs import collection_programs, mesh_of
from tests.conftest import run_with_fake_devices

# A tiny Llama: V 512, D 64, L 2, F 128, 4 query heads over 2 KV heads of 16, untied.
TINY = LMConfig(
    arch="llama",
    vocab_size=512,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_ff=128,
    norm_eps=1e-5,
    rotary_dim=16,
    neuron_layer=1,
    neuron_activation="identity",
    eos_token_ids=(1,),
)
SIZES = StageSizes(
    edits_batch=4, collect_tokens=8, eval_batch=4, prompt_tokens=8, new_tokens=4,
    generator_batch=8, cond_width=32, bank_edits=100,
)  # fmt: skip
GEN = {"dit": {"patch_size": 32, "hidden": 64, "depth": 2, "heads": 4, "frequency_dim": 32}}


def tiny_host_bytes(model_shards: int) -> int:
    """Per-device float32 bytes of TINY's parameters with the weights split `model_shards` ways.

    Split: embedding (over D), q k v o, gate up down, lm_head (over V). Replicated: the norms.
    """
    v, d, f, k = 512, 64, 128, 2 * 16
    layer_split = d * d + 2 * d * k + d * d + 3 * d * f  # q, k, v, o, gate, up, down
    split = v * d + d * v + 2 * layer_split
    replicated = d + 2 * (2 * d)  # final norm, two norms per layer
    return 4 * (split // model_shards + replicated)


def tiny_dit_params() -> int:
    """Parameters of the test DiT: patch S 32, width D 64, 2 blocks, condition E 32 (so a
    projection), timestep features F 32, 2 output channels (the reference's learned variance)."""
    s, d, e, f, c = 32, 64, 32, 32, 2
    block = (d * 6 * d + 6 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d)
    block += 4 * d * d + d  # fc2
    return (
        (s * d + d)  # patch_in
        + (f * d + d + d * d + d)  # timestep MLP
        + (e * d + d)  # condition projection
        + 2 * block
        + (d * 2 * d + 2 * d)  # final adaLN
        + (d * c * s + c * s)  # patch_out
    )


def _live() -> dict:
    return {id(a): a.shape for a in jax.live_arrays()}


def test_plan_matches_hand_computation_and_allocates_nothing():
    before = _live()
    plans = plan_stages(TINY, (1, 1), SIZES, generator_config(GEN))
    after = _live()
    # The diffusion schedule's [1000] tables (built eagerly by the train step's factory) are the
    # only arrays a plan makes; no parameter, batch, state or cache is ever allocated.
    new = [shape for i, shape in after.items() if i not in before]
    assert all(shape == (1000,) for shape in new), new

    by_name = {p.name: p for plan in plans for p in plan.programs}
    assert set(by_name) == {
        "collect/prefix",
        "collect/fit_step",
        "generator/train_step",
        "evaluate/prefill",
        "evaluate/decode",
    }
    for name in ("collect/prefix", "collect/fit_step", "evaluate/prefill", "evaluate/decode"):
        assert by_name[name].param_bytes == tiny_host_bytes(1)
        assert by_name[name].optimizer_bytes == 0  # SGD on the neuron; the host is frozen
    gen = by_name["generator/train_step"]
    assert gen.param_bytes == 4 * tiny_dit_params()
    # AdamW: two float32 moments per parameter, plus step counters (int32 scalars).
    assert 0 <= gen.optimizer_bytes - 2 * gen.param_bytes <= 16
    # Fit inputs: hidden [4, 8, 64] float32, mask [4, 8] bool, targets [4, 8] int32, loss mask,
    # neurons 2 x [4, 64] + [4] float32, active [4] bool, one learning rate.
    fit = by_name["collect/fit_step"]
    assert fit.input_bytes == 4 * 8 * 64 * 4 + 32 + 128 + 32 + (2 * 4 * 64 + 4) * 4 + 4 + 4
    # Decode inputs hold the KV cache: L x [B, prompt + new, KV heads, head dim] keys and values.
    cache = 2 * 2 * 4 * (8 + 4) * 2 * 16 * 4
    assert cache <= by_name["evaluate/decode"].input_bytes < cache + 4096
    for p in by_name.values():
        assert p.activation_bytes > 0 and p.flops > 0
        assert p.peak_bytes == (
            p.param_bytes + p.optimizer_bytes + p.input_bytes + p.activation_bytes + p.output_bytes
        )
    assert "collect/fit_step" in format_plan(plans)


def test_matmul_flops_count_every_layer_and_scan_step():
    """The prefix of a 3-layer TINY below layer 2 runs two layers as a `lax.scan`: its FLOPs are
    twice one layer's by hand (XLA's cost analysis counts a loop body once), and a scan of ten
    matmuls counts ten, its gradient with respect to the input twice that."""
    config = dataclasses.replace(TINY, n_layers=3, neuron_layer=2)
    (prefix, _) = collection_programs(config, mesh_of((1, 1)), SIZES)
    tokens, t, h, hd, kv = 4 * 8, 8, 4, 16, 2 * 16
    weights = 64 * 64 + 2 * 64 * kv + 64 * 64 + 3 * 64 * 128  # q, k, v, o, gate, up, down
    attention = 2 * (2 * 4 * h * t * t * hd)  # scores and the weighted sum of values
    assert matmul_flops(prefix.traced) == 2 * (2 * weights * tokens + attention)

    def chain(w, x):  # w [10, 8, 8], x [3, 8]
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

    w, x = jnp.ones((10, 8, 8)), jnp.ones((3, 8))
    assert matmul_flops(jax.jit(chain).trace(w, x)) == 10 * 2 * 3 * 8 * 8
    assert matmul_flops(jax.jit(jax.grad(chain, 1)).trace(w, x)) == 2 * 10 * 2 * 3 * 8 * 8


def test_plan_splits_parameters_over_the_model_axis():
    code = """
        import json
        from meg_jax.diffusion.config import generator_config
        from meg_jax.planning import plan_stages
        from tests.test_plan import GEN, SIZES, TINY
        gen = generator_config(GEN)
        plans = plan_stages(TINY, (2, 2), SIZES, gen, stages=("collect", "generator"))
        print(json.dumps([p.to_dict() for p in plans]))
    """
    plans = json.loads(
        run_with_fake_devices(code, n_devices=4, timeout=300).strip().splitlines()[-1]
    )
    collect, generator = plans
    assert collect["mesh"] == "2x2" and generator["mesh"] == "4x1"
    fit = {p["name"]: p for p in collect["programs"]}["collect/fit_step"]
    assert fit["param_bytes"] == tiny_host_bytes(2)
    # The fit's batch is split over data=2: half the hidden states of the one-device plan.
    assert fit["input_bytes"] < 4 * 8 * 64 * 4
    gen = generator["programs"][0]
    assert gen["param_bytes"] == 4 * tiny_dit_params()  # the DiT is replicated


def test_verdicts_and_device_meshes():
    v4 = DEVICE_SETS["tpu-v4-8"]
    assert verdict(int(0.5 * 32 * GIB), v4) == "fits"
    assert verdict(int(0.95 * 32 * GIB), v4) == "tight"
    assert verdict(33 * GIB, v4) == "no"
    assert device_mesh(v4, (2, 2)) == (2, 2)  # the asked mesh when it uses the 4 chips
    assert device_mesh(v4, (1, 8)) == (1, 4)  # else every chip on "model"
    assert device_mesh(DEVICE_SETS["gpu-80gb"], None) == (1, 1)


def test_cli_arguments():
    assert _mesh("2x4") == (2, 4)
    args = parse_args(["--model=gptj", "--mesh=1x4", "--edits-batch=8", "--devices=gpu-80gb"])
    assert args.mesh == (1, 4) and args.edits_batch == 8 and args.devices == ["gpu-80gb"]
    with pytest.raises(SystemExit):
        parse_args(["--model=gptj", "--mesh=four"])
    with pytest.raises(SystemExit):
        parse_args(["--model=gptj", "--devices=tpu-v9"])


def test_full_size_parameter_figures_without_allocation():
    """GPT-J's per-device parameter bytes on a 1x4 mesh, from shapes: 6.05e9 bf16 values / 4."""
    from meg_jax.checkpoints.presets import lm_config
    from meg_jax.planning.programs import abstract_host_params, per_device_bytes, total_bytes

    cfg = lm_config("gpt-j-6b", dtype="bfloat16")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    before = len(jax.live_arrays())
    params = abstract_host_params(cfg, mesh)
    assert total_bytes(params) == per_device_bytes(params) == 2 * 6_050_882_784
    assert len(jax.live_arrays()) == before

"""Full size, for real: GPT-J-6B-shaped random weights in bfloat16, one step of every stage.

    nice -n 10 python bench/scale.py [--edits 8] [--tokens 32] [--eval-batch 8]
                                     [--generator-batch 32] [--runs 2] [--no-plans]
    JAX_PLATFORMS=cuda python bench/scale.py --no-plans --memory-budget-gib 120 [sizes...]

With the true GPT-J-6B shapes (meg_jax/checkpoints/presets.py) and random bfloat16 weights
(12.1 GB, made leaf by leaf and layer by layer in bfloat16 so that no float32 copy of the model
ever exists), on this machine's CPU (the top level of scale.json) or, with JAX_PLATFORMS naming
an accelerator, on that device (filed under `accelerator_runs[<device kind>]`, or
`[<device kind>, <model>]` for another `--model`, the CPU run kept):
  * collection: the frozen prefix below the neuron layer once per batch, then one SGD step of
    `--edits` fits (`collect.fit.sgd_fit`, forward and backward from the neuron layer up w.r.t.
    the per-edit neurons; a one-step call also evaluates the loss at the result, so the figure
    slightly overstates a step);
  * generator: one AdamW step of DiT-B (bfloat16 compute) on `--generator-batch` GPT-J-length
    neurons (8193 values) with 768-wide conditions (`diffusion.train_step.make_train_step`);
  * evaluation: one greedy batch with the KV cache (`models.generate.greedy_generate`) of
    `--eval-batch` prompts of `--prompt-tokens` tokens, `--new-tokens` new tokens, each row with
    its own neuron.
Each is timed `--runs` times after a warm-up (compilation) run; the median is reported with
tokens/s, FLOP/s (collection and generator: the step's matmul FLOPs counted on its jaxpr,
`meg_jax.planning.flops`, every layer of the layer scan included, which XLA's cost analysis
misses; evaluation: 2 x non-embedding parameters per token, plus nothing for attention), the
process's peak resident memory during the stage (sampled every 20 ms), on an accelerator its
allocator's peak, and XLA's per-program temporaries.

The 10,000-edit projection scales the measured per-item times (assumptions recorded in the
JSON) beside the reference's reported hours; the per-device-set figures are a roofline estimate
(FLOPs at 40% of peak bf16, decoding at weight-read bandwidth), not measurements. The memory plan
of GPT-J, Phi-2 and Llama-3-8B on every named device set comes from `python -m meg_jax.plan`,
each in its own process (8 fake CPU devices).
"""

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, RESULTS, machine, median, write_result  # noqa: I001  (sets up sys.path)

from meg_jax.planning.memory import cpu_xla_flags

PLATFORM = os.environ.get("JAX_PLATFORMS") or "cpu"
if PLATFORM == "cpu":
    # XLA:CPU would otherwise hoist a float32 copy of the stacked bfloat16 weights out of the
    # layer loop (meg_jax/planning/memory.py): 22 GiB more than the model, on a 24 GiB machine.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + cpu_xla_flags(1)).strip()

import jax  # noqa: E402

jax.config.update("jax_platforms", PLATFORM)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from meg_jax.checkpoints.hf_decoder import abstract_decoder_params  # noqa: E402
from meg_jax.checkpoints.presets import lm_config  # noqa: E402
from meg_jax.collect.fit import sgd_fit  # noqa: E402
from meg_jax.diffusion.config import generator_config  # noqa: E402
from meg_jax.diffusion.normalization import NormStats  # noqa: E402
from meg_jax.diffusion.train_step import init_state, make_train_step  # noqa: E402
from meg_jax.infra.files import write_json_atomic  # noqa: E402
from meg_jax.infra.sharding import make_mesh  # noqa: E402
from meg_jax.infra.trees import flatten_tree, unflatten_tree  # noqa: E402
from meg_jax.models.decoder import Decoder  # noqa: E402
from meg_jax.models.generate import greedy_generate  # noqa: E402
from meg_jax.models.neuron import Neuron, neuron_vector_size  # noqa: E402
from meg_jax.planning.flops import matmul_flops  # noqa: E402

GIB = 2**30
SCALE_JSON = RESULTS / "scale.json"  # write_result("scale", ...) writes the same file
N_EDITS = 10_000
# The reference's hours (METHOD.md §3.3, §4.4, Table 20; Phi-2 zsRE).
REFERENCE = {
    "collection_h_per_1024_edits_rtx4090d_phi2": 0.114,
    "collection_h_10000_edits_rtx4090d_phi2": 1.175,
    "dit_training_h_10000_edits_4x_rtx4090d": 11.66,
}
# Peak dense bf16 FLOP/s and memory bandwidth per chip, from the vendors' data sheets.
DEVICE_PEAKS = {
    "tpu-v4-8": {"chips": 4, "flops": 275e12, "bandwidth": 1.2e12},
    "tpu-v5e-8": {"chips": 8, "flops": 197e12, "bandwidth": 0.82e12},
    "gpu-80gb": {"chips": 1, "flops": 989e12, "bandwidth": 3.35e12},  # H100 SXM
    "gpu-141gb": {"chips": 1, "flops": 989e12, "bandwidth": 4.8e12},  # H200
}
MFU = 0.4


class PeakRSS:
    """The process's peak resident memory while the block runs (sampled from /proc)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def memory_fields(mem: PeakRSS) -> dict:
    """The stage's peak host memory and, on an accelerator, its allocator's peak so far.

    JAX cannot reset the allocator's peak, so on an accelerator the figure is the largest since
    the process started: stages run generator, collection, evaluation, and the first two are
    each their own (the generator's is below the model's weights alone).
    """
    out = {"peak_rss_gib": round(mem.peak / GIB, 3)}
    stats = jax.devices()[0].memory_stats() if PLATFORM != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak_gib_so_far"] = round(stats["peak_bytes_in_use"] / GIB, 3)
    return out


def random_params(config, seed: int = 0):
    """GPT-J-shaped parameters in the config's dtype, made without a float32 copy of any stack.

    Stacked layer leaves [L, ...] start as zeros and get one layer at a time written in place
    (a donated update), so the largest float32 temporary is one layer of one matrix.
    """
    dtype = config.jnp_dtype
    abstract = flatten_tree(abstract_decoder_params(config))
    key = jax.random.PRNGKey(seed)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def draw(key, shape, kind):
        if kind == "ones":
            return jnp.ones(shape, dtype)
        if kind == "zeros":
            return jnp.zeros(shape, dtype)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    @functools.partial(jax.jit, donate_argnums=0)
    def put(stack, layer, i):
        return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)

    out = {}
    for n, (path, leaf) in enumerate(sorted(abstract.items())):
        kind = "ones" if path.endswith("scale") else "zeros" if path.endswith("bias") else "normal"
        leaf_key = jax.random.fold_in(key, n)
        if path.startswith("layers/") and kind == "normal":
            stack = jnp.zeros(leaf.shape, dtype)
            for i in range(leaf.shape[0]):
                stack = put(stack, draw(jax.random.fold_in(leaf_key, i), leaf.shape[1:], kind), i)
            out[path] = stack
        else:
            out[path] = draw(leaf_key, leaf.shape, kind)
        jax.block_until_ready(out[path])
    return unflatten_tree(out)


def timed_runs(fn, runs: int) -> dict:
    """Warm-up (compiles) then `runs` timings of `fn()` (which must block)."""
    start = time.perf_counter()
    fn()
    warm = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": median(times), "runs_s": times, "warmup_s": warm}


def temp_gib(compiled) -> float:
    return round(compiled.memory_analysis().temp_size_in_bytes / GIB, 3)


def bench_collection(config, params, args) -> dict:
    b, t = args.edits, args.tokens
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), bool)
    answer = np.zeros((b, t), bool)
    answer[:, t - 6 : t - 1] = True  # the last five positions predict answer tokens
    targets, loss_mask = jnp.roll(tokens, -1, axis=1), jnp.asarray(answer)
    prefix = jax.jit(
        lambda p, x, m: Decoder(config).apply({"params": p}, x, m, method=Decoder.hidden_before)
    )
    prefix_t = prefix.trace(params, tokens, mask)
    prefix_c = prefix_t.lower().compile()
    hidden = prefix_c(params, tokens, mask)
    d = config.d_model

    def neuron():
        return Neuron(
            jnp.full((b, d), 0.01, jnp.float32), jnp.zeros((b,), jnp.float32), jnp.zeros((b, d))
        )

    lrs, active = jnp.full((1,), 0.07, jnp.float32), jnp.ones((b,), bool)
    fit_t = sgd_fit.trace(config, params, hidden, mask, targets, loss_mask, neuron(), active, lrs)
    fit_c = fit_t.lower().compile()
    pre_flops, step_flops = matmul_flops(prefix_t), matmul_flops(fit_t)
    fit_need = (
        sum(x.nbytes for x in jax.tree.leaves(params)) + fit_c.memory_analysis().temp_size_in_bytes
    )
    with PeakRSS() as mem:
        pre = timed_runs(lambda: prefix_c(params, tokens, mask).block_until_ready(), args.runs)
        if fit_need <= args.memory_budget_gib * GIB:
            fit = timed_runs(
                lambda: jax.block_until_ready(
                    fit_c(params, hidden, mask, targets, loss_mask, neuron(), active, lrs)
                ),
                args.runs,
            )
        else:
            # Not run: it would take the machine past the budget (other people's work runs here).
            # Estimated at the prefix's measured FLOP rate instead, and labelled as such.
            rate = pre_flops / pre["median_s"]
            fit = {
                "median_s": step_flops / rate,
                "estimated": True,
                "why_not_run": (
                    f"XLA plans {fit_need / GIB:.1f} GiB (weights + temporaries) for this step, "
                    f"over the {args.memory_budget_gib} GiB budget of this shared machine; the "
                    "backward pass keeps each layer's weight slice of the layer scan as a "
                    "residual (GPT-J: 19 layers x 0.4 GB); time = its FLOPs at the prefix's FLOP/s"
                ),
            }
    return {
        "edits_per_batch": b,
        "tokens_per_edit": t,
        "prefix": {
            **pre,
            "tokens_per_s": b * t / pre["median_s"],
            "flop_per_s": pre_flops / pre["median_s"],
            "flops": pre_flops,
            "xla_temp_gib": temp_gib(prefix_c),
        },
        "fit_step": {
            **fit,
            "tokens_per_s": b * t / fit["median_s"],
            "flop_per_s": step_flops / fit["median_s"],
            "flops": step_flops,
            "xla_temp_gib": temp_gib(fit_c),
            "planned_peak_gib": round(fit_need / GIB, 3),
        },
        **memory_fields(mem),
    }


def bench_generator(config, args) -> dict:
    gen = generator_config({"dit": {"compute_dtype": "bfloat16"}}, dit_preset="DiT-B")
    length = neuron_vector_size(config.d_model, config.neuron_has_bias)
    g, width = args.generator_batch, 768
    mesh = make_mesh(1, 1)
    norm = NormStats(jnp.zeros(length), jnp.ones(length), jnp.zeros(width))
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.normal(size=(g, length)), jnp.float32)
    cond = jnp.asarray(rng.normal(size=(g, width)), jnp.float32)
    rows, key = jnp.ones((g,), jnp.float32), jax.random.PRNGKey(0)
    step = make_train_step(gen, mesh)
    holder = {"state": init_state(gen, norm, width, jax.random.PRNGKey(0), mesh)}
    traced = step.trace(holder["state"], x0, cond, rows, key)
    compiled = traced.lower().compile()

    def run():
        holder["state"], metrics = compiled(holder["state"], x0, cond, rows, key)
        jax.block_until_ready(metrics)

    with PeakRSS() as mem:
        times = timed_runs(run, args.runs)
    flops = matmul_flops(traced)
    return {
        "dit": "DiT-B (hidden 768, depth 12, 12 heads, patch 100), bfloat16 compute",
        "batch": g,
        "neuron_length": length,
        **times,
        "samples_per_s": g / times["median_s"],
        "tokens_per_s": g * -(-length // gen.dit.patch_size) / times["median_s"],
        "flop_per_s": flops / times["median_s"],
        "flops": flops,
        "xla_temp_gib": temp_gib(compiled),
        **memory_fields(mem),
    }


def bench_evaluation(config, params, args) -> dict:
    b, t, n = args.eval_batch, args.prompt_tokens, args.new_tokens
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), bool)
    d = config.d_model
    neuron = Neuron(
        jnp.asarray(rng.normal(size=(b, d)) * 0.01, jnp.float32),
        jnp.zeros((b,), jnp.float32),
        jnp.asarray(rng.normal(size=(b, d)) * 0.01, jnp.float32),
    )

    def run():
        # No stop ids: every row decodes all `n` tokens, a fixed amount of work per run.
        jax.block_until_ready(
            greedy_generate(config, params, tokens, mask, neuron, max_new_tokens=n)
        )

    with PeakRSS() as mem:
        times = timed_runs(run, args.runs)
    embed = config.vocab_size * config.d_model
    count = sum(x.size for x in jax.tree.leaves(params)) - embed
    processed = b * (t + n - 1)
    return {
        "batch": b,
        "prompt_tokens": t,
        "new_tokens": n,
        **times,
        "new_tokens_per_s": b * n / times["median_s"],
        "tokens_per_s": processed / times["median_s"],
        "flop_per_s": 2 * count * processed / times["median_s"],
        "flops_estimate": 2 * count * processed,
        **memory_fields(mem),
    }


def projection(result: dict, args) -> dict:
    """10,000 edits from the measured per-item times; assumptions spelled out."""
    col, gen, ev = result["collection"], result["generator"], result["evaluation"]
    b = col["edits_per_batch"]
    success_test = ev["median_s"] / ev["batch"] * args.success_tokens / ev["new_tokens"]
    out = {}
    for steps in (50, 160, 500):
        per_edit = (col["prefix"]["median_s"] + steps * col["fit_step"]["median_s"]) / b
        out[f"collection_h_at_{steps}_steps"] = N_EDITS * (per_edit + success_test) / 3600
    epoch_s = N_EDITS / gen["samples_per_s"]
    out["generator_h_per_epoch"] = epoch_s / 3600
    out["generator_h_at_1000_epochs"] = 1000 * epoch_s / 3600
    per_query = ev["median_s"] / ev["batch"]
    out["evaluation_h_12_queries_per_edit"] = N_EDITS * 12 * per_query / 3600
    out["assumptions"] = (
        "collection: one prefix per batch of edits plus S SGD steps (S = 50 Llama-3, 160 Phi-2's "
        "maximum, 500 GPT-J's maximum), and one greedy success test of "
        f"{args.success_tokens} tokens per edit; generator: one epoch = 10,000 samples at the "
        "measured samples/s (the reference trains for tens of thousands of epochs and reports "
        "no step count; 1,000 epochs is its first stopping check); evaluation: 12 generated "
        "queries of the measured length per edit"
    )
    return out


def device_estimates(result: dict, args) -> dict:
    """Roofline estimates (not measurements) of the same 10,000-edit work per device set."""
    col, gen, ev = result["collection"], result["generator"], result["evaluation"]
    b = col["edits_per_batch"]
    param_bytes = result["model"]["param_bytes"]
    out = {}
    for name, dev in DEVICE_PEAKS.items():
        rate = dev["chips"] * dev["flops"] * MFU
        flops_collect = N_EDITS / b * (col["prefix"]["flops"] + 500 * col["fit_step"]["flops"])
        flops_gen_epoch = N_EDITS / gen["batch"] * gen["flops"]
        # Decoding at batch B reads the weights once per step: bound by bandwidth below B ~ 100.
        steps = N_EDITS * 12 / args.estimate_batch * args.new_tokens
        decode_s = steps * param_bytes / (dev["chips"] * dev["bandwidth"])
        eval_s = max(N_EDITS * 12 * ev["flops_estimate"] / ev["batch"] / rate, decode_s)
        out[name] = {
            "collection_h_at_500_steps": flops_collect / rate / 3600,
            "generator_h_per_epoch": flops_gen_epoch / rate / 3600,
            "evaluation_h_12_queries_per_edit": eval_s / 3600,
        }
    out["assumptions"] = (
        f"the steps' matmul FLOPs (counted on their jaxprs), at {MFU:.0%} of the chips' "
        f"peak dense bf16 FLOP/s; evaluation no faster than reading the weights once per "
        f"decoding step at batch {args.estimate_batch}; estimates, not measurements"
    )
    return out


def memory_plans(args) -> dict:
    """`python -m meg_jax.plan` for the three full-size models, each in its own process."""
    plans = {}
    for model in ("gptj", "phi2", "llama3_8b"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "plan.json"
            cmd = [sys.executable, "-m", "meg_jax.plan", f"--model={model}", f"--json={path}"]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
            plan = json.loads(path.read_text())
            plan["wall_s"] = round(time.perf_counter() - start, 1)
            plan["printed"] = proc.stdout.splitlines()
            plans[model] = plan
            print(proc.stdout, flush=True)
    return plans


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edits", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--success-tokens", type=int, default=20)
    parser.add_argument("--generator-batch", type=int, default=32)
    parser.add_argument("--estimate-batch", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--no-plans", action="store_true")
    parser.add_argument("--memory-budget-gib", type=float, default=16.0)
    parser.add_argument("--model", default="gpt-j-6b", help="preset (smaller ones: smoke tests)")
    args = parser.parse_args()

    accelerator = jax.devices()[0].device_kind if PLATFORM != "cpu" else None
    result = {"args": vars(args), "reference": REFERENCE}
    if not args.no_plans:
        result["memory_plans"] = memory_plans(args)

    config = lm_config(args.model, dtype="bfloat16")
    # The generator first: on an accelerator its allocator peak is then its own (memory_fields).
    result["generator"] = bench_generator(config, args)
    print(json.dumps(result["generator"]), flush=True)
    with PeakRSS() as mem:
        start = time.perf_counter()
        params = random_params(config)
        init_s = time.perf_counter() - start
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    result["model"] = {
        "name": f"{args.model} (random weights, true shapes)",
        "dtype": "bfloat16",
        "param_bytes": param_bytes,
        "param_gib": round(param_bytes / GIB, 3),
        "init_s": round(init_s, 1),
        "init_peak_rss_gib": round(mem.peak / GIB, 3),
    }
    print(json.dumps(result["model"]), flush=True)
    result["collection"] = bench_collection(config, params, args)
    print(json.dumps(result["collection"]), flush=True)
    result["evaluation"] = bench_evaluation(config, params, args)
    print(json.dumps(result["evaluation"]), flush=True)
    del params
    projected = projection(result, args)
    if accelerator is None:
        result["projection_10000_edits_this_cpu"] = projected
        result["estimate_10000_edits_per_device_set"] = device_estimates(result, args)
        # Accelerator runs filed earlier stay: a CPU rerun replaces the CPU figures only.
        runs = _read_scale().get("accelerator_runs", {})
        result.update(accelerator=_accelerator_note(runs), accelerator_runs=runs)
        path = write_result("scale", result)
    else:
        key = accelerator if args.model == "gpt-j-6b" else f"{accelerator}, {args.model}"
        path = file_accelerator_run(key, {**result, "projection_10000_edits": projected})
    print(json.dumps(projected, indent=1))
    print(f"wrote {path}")


def file_accelerator_run(key: str, run: dict) -> Path:
    """Adds an accelerator's run to scale.json under `accelerator_runs[key]`, keeping the CPU
    run (and its machine and date) at the top level; the run carries its own."""
    result = _read_scale()
    run["machine"] = machine()
    run["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    result.setdefault("accelerator_runs", {})[key] = run
    result["accelerator"] = _accelerator_note(result["accelerator_runs"])
    write_json_atomic(SCALE_JSON, result)
    return SCALE_JSON


def _read_scale() -> dict:
    return json.loads(SCALE_JSON.read_text()) if SCALE_JSON.exists() else {}


def _accelerator_note(runs: dict) -> str:
    if not runs:
        return "none: every figure in this file is this CPU's"
    return "the top level is this CPU's run; accelerator_runs holds runs on " + ", ".join(
        sorted(runs)
    )


if __name__ == "__main__":
    main()

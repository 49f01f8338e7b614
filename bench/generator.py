"""The generator on the real SmolLM2 bank: the reference recipe vs ours, and hardware use.

    python bench/generator.py [--steps 2000] [--eval-every 250] [--success-every 500]

(a) Both recipes train for the same number of steps on the 255 fitted neurons of
../shared/data/banks/smollm2_cf256, conditioned on all-MiniLM-L6-v2 [CLS] vectors of the
templated prompts. Every `--eval-every` steps: the stopping criterion (mean + std of the
raw-space L2 distance between generated and target neurons; DDIM-50 with one shared noise
vector for both recipes, so the two curves are measured the same way; the reference's own check
uses 1000 ancestral steps, which costs minutes per check on this CPU), and every
`--success-every` steps the generated-weight success rate (SmolLM2 with the generated neuron
answers its target, greedy, MeG's exact match). `ratio` = our criterion / the reference's at
the last common step (lower is better; the target is <= 0.2). Also recorded: the wall time at
which ours first went below 0.5. Plot: bench/results/generator.png.
(b) Training samples/s and sampling queries/s, converted to FLOP/s with XLA's cost analysis of
the compiled step, as a fraction of this machine's measured float32 matmul throughput.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import RESULTS, SHARED, median, write_result

from meg_jax.checkpoints.hosts import encoder_path, load_host
from meg_jax.collect.bank import load_bank
from meg_jax.data.jsonio import read_records
from meg_jax.data.templates import get_template
from meg_jax.diffusion.config import SamplerConfig, generator_config
from meg_jax.diffusion.generate import generate
from meg_jax.diffusion.train import train_generator
from meg_jax.encoder.text_encoder import TextEncoder
from meg_jax.evaluation.metrics import answer_ag_correct
from meg_jax.inference.runner import ModelRunner
from meg_jax.models.neuron import unflatten_neuron

CRITERION_SAMPLER = {"kind": "ddim", "steps": 50, "shared_noise": True}


def matmul_flops_per_s(n: int = 2048, runs: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / median(times)


def success_callback(runner, prompts, targets, template, every):
    def callback(step, state, samples, record):
        if step % every:
            return None
        neurons = unflatten_neuron(np.asarray(samples), runner.config.d_model, False)
        texts = runner.generate(prompts, neurons, 20, template.generation_stops)
        return {"success": float(np.mean(answer_ag_correct(texts, targets, template.answer_cuts)))}

    return callback


def train_recipe(name, preset, args, bank, conditions, runner, prompts, targets, template, tmp):
    overrides = {
        "train": {
            "num_steps": args.steps,
            "eval_every": args.eval_every,
            "checkpoint_every": args.steps,
            "stop_threshold": 0.0,  # run every step; we record when 0.5 is crossed
            "criterion_sampler": CRITERION_SAMPLER,
        }
    }
    cfg = generator_config(overrides, preset)
    began = time.perf_counter()
    result = train_generator(
        bank.weights,
        conditions,
        cfg,
        tmp / name,
        success=bank.success,
        init=bank.init,
        callback=success_callback(runner, prompts, targets, template, args.success_every),
    )
    wall = time.perf_counter() - began
    curve = [
        {k: e[k] for k in ("criterion", "mean", "std", "success", "wall_s") if k in e}
        | {"step": (i + 1) * args.eval_every}
        for i, e in enumerate(result.evaluations)
    ]
    crossed = next((c for c in curve if c["criterion"] < 0.5), None)
    return cfg, result, {"curve": curve, "train_wall_s": wall, "first_below_0.5": crossed}


def hardware_use(cfg, result, conditions, peak):
    """Samples/s of training and queries/s of sampling, and their FLOP/s over `peak`."""
    from meg_jax.diffusion.train_step import make_train_step
    from meg_jax.infra.sharding import make_mesh

    mesh = make_mesh()
    n = conditions.shape[0]
    step = make_train_step(cfg, mesh)
    x0 = np.zeros((n, result.state.norm.center.shape[-1]), np.float32)
    mask = np.ones(n, np.float32)
    args = (result.state, x0, conditions, mask, jax.random.PRNGKey(0))
    flops = step.lower(*args).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops)["flops"]
    state = result.state
    times = []
    for _ in range(6):
        t = time.perf_counter()
        state, metrics = step(state, *args[1:])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    train_s = median(times[1:])
    sampler = SamplerConfig(kind="ddim", steps=50)
    rng = jax.random.PRNGKey(1)
    generate(state, conditions, rng, cfg, sampler).block_until_ready()
    t = time.perf_counter()
    generate(state, conditions, rng, cfg, sampler).block_until_ready()
    sample_s = time.perf_counter() - t
    # Sampling FLOPs: 50 denoiser forwards; a forward is a third of a training step's FLOPs.
    sample_flops = 50 * flops / 3
    return {
        "matmul_flops_per_s": peak,
        "train_samples_per_s": n / train_s,
        "train_flops_per_step": flops,
        "train_fraction_of_matmul": flops / train_s / peak,
        "sampling_queries_per_s": n / sample_s,
        "sampling_fraction_of_matmul": sample_flops / sample_s / peak,
    }


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, c in curves.items():
        a.plot([p["step"] for p in c], [p["criterion"] for p in c], marker="o", label=name)
        pts = [p for p in c if "success" in p]
        b.plot([p["step"] for p in pts], [100 * p["success"] for p in pts], marker="o", label=name)
    a.axhline(0.5, color="k", lw=0.8, ls="--")
    a.set_yscale("log")
    a.set(xlabel="step", ylabel="mean + std L2 (raw)", title="stopping criterion")
    b.set(xlabel="step", ylabel="%", title="generated-weight success", ylim=(0, 105))
    a.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main():
    import tempfile
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--success-every", type=int, default=500)
    args = parser.parse_args()

    bank = load_bank(SHARED / "banks" / "smollm2_cf256" / "bank.npz")
    edits = read_records(SHARED / "banks" / "smollm2_cf256" / "edits.json")
    template = get_template("smollm2")
    encoder = TextEncoder.from_pretrained(encoder_path("minilm"), template=template.query)
    conditions = encoder.encode([e["prompt"] for e in edits])
    keep = bank.fitted
    prompts = [template.format_query(e["prompt"]) for e, k in zip(edits, keep, strict=True) if k]
    targets = [e["target_new"] for e, k in zip(edits, keep, strict=True) if k]
    config, params, tok = load_host("smollm2", neuron_layer=14, neuron_activation="identity")
    runner = ModelRunner(config, params, tok, batch_size=64, show_progress=False)

    out, curves = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trained = {}
        for name, preset in (("ours", "fast"), ("reference", "reference")):
            *trained[name], info = train_recipe(
                name, preset, args, bank, conditions, runner, prompts, targets, template, tmp
            )
            out[name] = info
            curves[name] = info["curve"]
            print(name, info["curve"][-1], "first < 0.5:", info["first_below_0.5"], flush=True)
        hardware = hardware_use(*trained["ours"], conditions[keep], matmul_flops_per_s())
    plot(curves, RESULTS / "generator.png")
    last = {k: v["curve"][-1]["criterion"] for k, v in out.items()}
    result = {
        "benchmark": "generator",
        "ratio": last["ours"] / last["reference"],
        "steps": args.steps,
        "criterion_at_last_step": last,
        "criterion_sampler": CRITERION_SAMPLER,
        "ours_first_below_0.5": out["ours"]["first_below_0.5"],
        "recipes": out,
        "hardware": hardware,
        "plot": "bench/results/generator.png",
    }
    print(result["ratio"], hardware)
    print(write_result("generator", result))


if __name__ == "__main__":
    main()

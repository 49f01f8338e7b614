"""Weight collection on SmolLM2: our batched stage vs a batch-1 loop like the reference's.

    python bench/collection.py [--edits 256] [--loop-edits 24] [--runs 2] [--generator-steps 1000]

Workload: the first `--edits` CounterFact edits of ../shared/data, templated as the pipeline does
(`smollm2` template, neuron at layer 14, identity activation), every fit from the same seeded
PyTorch-Linear-style initial neuron.

Ours: `Collector.fit` on all edits at once with `CollectConfig.fast()` (Adam, early stop once
every answer token is the argmax and the loss is below 0.2, logits at the answer positions
only, 32 slots refilled as fits finish, compaction at the tail), then the greedy success test.

Baseline ("torch", the headline): the reference's stage-3 procedure at batch 1 in PyTorch
transformers on the same float32 weights: the neuron (w_in, w_out) hooked onto layer 14's MLP,
HF causal-LM loss with the prompt masked, plain SGD lr 0.5 for 50 steps (the SmolLM2 schedule,
METHOD.md §3.3b), then a greedy `generate` of up to 20 tokens and the same success test. It runs
on the first `--loop-edits` edits only (about 7 s per edit here; 256 would take half an hour);
each timed run takes the next `--loop-edits / --runs` of them. Runs alternate with ours.

Also measured: each lever alone (per-step time of the compiled step at several settings, and
slot-steps per edit of each optimiser/stop rule), the achieved FLOP/s of our step (XLA's count
of the compiled step's FLOPs over its measured time) against float32 matmul throughput measured
here, and with `--generator-steps` the generated-weight success of a generator (preset "fast")
trained on the bank our stage produced.
"""

import argparse
import dataclasses
import time

import common  # noqa: F401  (first: it configures torch's thread pool)
import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import SHARED, median, write_result
from torch_reference import torch_llama

from meg_jax.checkpoints.hosts import load_host
from meg_jax.collect.fit import answer_positions, fit_steps, init_state, torch_linear_init
from meg_jax.collect.stage import CollectConfig, Collector, _training_batch
from meg_jax.data.readers import read_edits
from meg_jax.data.templates import get_template
from meg_jax.evaluation.metrics import answer_ag_correct
from meg_jax.pipeline.collection import edits_to_fit

LAYER = 14


def torch_loop(model, tokenizer, config, edits, success_fn, init) -> list[bool]:
    """The reference's stage 3, one edit at a time: SGD on the hooked neuron, then greedy test."""
    out = []
    for edit in edits:
        w_in = torch.tensor(np.asarray(init.w_in[0]), requires_grad=True)
        w_out = torch.tensor(np.asarray(init.w_out[0]), requires_grad=True)

        def hook(module, inputs, output, w_in=w_in, w_out=w_out):
            return output + (inputs[0] @ w_in)[..., None] * w_out

        handle = model.model.layers[LAYER].mlp.register_forward_hook(hook)
        try:
            n_prompt = len(tokenizer(edit.query)["input_ids"])
            ids = torch.tensor([tokenizer(edit.query + edit.answer)["input_ids"]])
            labels = ids.clone()
            labels[:, :n_prompt] = -100
            optimizer = torch.optim.SGD([w_in, w_out], lr=0.5)
            for _ in range(50):
                optimizer.zero_grad()
                model(input_ids=ids, labels=labels).loss.backward()
                optimizer.step()
            with torch.inference_mode():
                prompt = torch.tensor([tokenizer(edit.query)["input_ids"]])
                new = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=False,
                    max_new_tokens=20,
                    eos_token_id=list(config.eos_token_ids),
                    pad_token_id=config.pad_token_id,
                )[0, prompt.shape[1] :]
            text = tokenizer.decode(new, skip_special_tokens=True)
            out.append(bool(success_fn([text], [edit.target])[0]))
        finally:
            handle.remove()
    return out


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    """float32 [n, n] x [n, n] matmul throughput, median of `repeats` (XLA on this CPU)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / median(times)


def step_flops(config, batch: int, length: int, answers: int) -> float:
    """Matmul FLOPs of one fit step, counted by hand: forward of layers neuron_layer.. L-1 on
    batch x length tokens (projections, MLP, attention scores and values) and the head at
    `answers` positions per row, and the backward with respect to activations only (the same
    again; no weight gradients). XLA's cost analysis counts a loop body once, not per trip, so
    it undercounts scanned layers and steps."""
    d, f, h, kv, hd = (
        config.d_model,
        config.d_ff,
        config.n_heads,
        config.n_kv_heads,
        config.head_dim,
    )
    per_token_layer = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f)
    per_token_layer += 2 * 2 * length * h * hd  # scores and weighted values, full T x T
    layers = config.n_layers - config.neuron_layer
    forward = batch * (length * layers * per_token_layer + answers * 2 * d * config.vocab_size)
    return 2.0 * forward


def step_timing(config, params, tokenizer, edits, cfg: CollectConfig, batch: int, runs: int = 3):
    """(seconds per step, XLA FLOPs per step) of the compiled fit step at `batch` slots."""
    rows = [edits[i % len(edits)] for i in range(batch)]
    tokens, mask, targets, loss_mask = _training_batch(tokenizer, rows, config.pad_token_id)
    index, a_targets, weights = answer_positions(loss_mask, targets)
    from meg_jax.models.decoder import Decoder

    hidden = Decoder(config).apply(
        {"params": params}, jnp.asarray(tokens), jnp.asarray(mask), method=Decoder.hidden_before
    )
    init = torch_linear_init(config, cfg.seed)
    static = dict(
        optimizer=cfg.optimizer,
        num_steps=cfg.check_every,
        early_stop=False,
        full_head=cfg.full_head,
    )
    args = (config, params, hidden, jnp.asarray(mask), jnp.asarray(index))
    rest = (jnp.asarray(a_targets), jnp.asarray(weights))
    tail = (
        jnp.asarray(10_000, jnp.int32),
        jnp.full((10_000,), cfg.learning_rate, jnp.float32),
        jnp.asarray(cfg.stop_loss, jnp.float32),
    )

    def fresh():
        return init_state(init, batch)._replace(done=jnp.zeros((batch,), bool))

    compiled = fit_steps.lower(*args, *rest, fresh(), *tail, **static).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = float(cost.get("flops", float("nan"))) / cfg.check_every
    length, answers = mask.shape[1], (index.shape[1] if not cfg.full_head else mask.shape[1])
    flops = step_flops(config, batch, length, answers)
    times = []
    for _ in range(runs + 1):
        state = fresh()
        t0 = time.perf_counter()
        jax.block_until_ready(fit_steps(*args, *rest, state, *tail, **static))
        times.append((time.perf_counter() - t0) / cfg.check_every)
    return median(times[1:]), flops, xla_flops


def steps_to_stop(config, params, tokenizer, edits, cfg: CollectConfig, n: int):
    """Per edit: (updates taken before the early stop, argmax correct when stopped)."""
    from meg_jax.models.decoder import Decoder

    tokens, mask, targets, loss_mask = _training_batch(tokenizer, edits, config.pad_token_id)
    index, a_targets, weights = answer_positions(loss_mask, targets)
    hidden = Decoder(config).apply(
        {"params": params}, jnp.asarray(tokens), jnp.asarray(mask), method=Decoder.hidden_before
    )
    b = len(edits)
    state = init_state(torch_linear_init(config, cfg.seed), b)._replace(done=jnp.zeros(b, bool))
    state = fit_steps(
        config,
        params,
        hidden,
        jnp.asarray(mask),
        jnp.asarray(index),
        jnp.asarray(a_targets),
        jnp.asarray(weights),
        state,
        jnp.asarray(n, jnp.int32),
        jnp.full((n + 1,), cfg.learning_rate, jnp.float32),
        jnp.asarray(cfg.stop_loss, jnp.float32),
        optimizer=cfg.optimizer,
        num_steps=n + 1,
        early_stop=True,
    )
    return np.asarray(state.steps), np.asarray(state.correct)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=256)
    parser.add_argument("--loop-edits", type=int, default=24)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--generator-steps", type=int, default=0, help="0: no generator check")
    args = parser.parse_args()
    torch.set_num_threads(2)

    config, params, tokenizer = load_host(
        "smollm2", neuron_layer=LAYER, neuron_activation="identity"
    )
    template = get_template("smollm2")
    records = read_edits(SHARED / "counterfact" / "counterfact-edit.json", limit=args.edits)
    edits = edits_to_fit(records, template)

    def success_fn(texts, targets):
        return answer_ag_correct(texts, targets, template.answer_cuts, "exact")

    fast = CollectConfig.fast()
    init = torch_linear_init(config, fast.seed)
    model = torch_llama(config, params)
    for p in model.parameters():
        p.requires_grad_(False)

    # ---- headline: ours on all edits vs the batch-1 loop, alternating -------------------------
    per_run = max(1, args.loop_edits // args.runs)
    collector = Collector(config, params, tokenizer, fast, success_fn)
    # Warm-up (compiles every shape the timed runs meet): the 32 longest edits have the same
    # padded length as all of them, and their tail walks through every compaction size.
    longest = sorted(edits, key=lambda e: -len(tokenizer(e.query + e.answer)["input_ids"]))
    _, warm_ours = _timed(lambda: collector.fit(longest[: fast.batch_size]))
    _, warm_torch = _timed(
        lambda: torch_loop(model, tokenizer, config, edits[:1], success_fn, init)
    )
    ours_s, torch_s, loop_success, banks = [], [], [], []
    for r in range(args.runs):
        collector.stats.update(steps=0, row_steps=0, calls=0)
        bank, dt = _timed(lambda: collector.fit(edits))
        ours_s.append(dt)
        banks.append(bank)
        chunk = edits[r * per_run : (r + 1) * per_run]
        flags, dt = _timed(
            lambda c=chunk: torch_loop(model, tokenizer, config, c, success_fn, init)
        )
        torch_s.append(dt / len(chunk))
        loop_success.extend(flags)
        print(f"run {r}: ours {ours_s[-1]:.1f} s, torch {torch_s[-1]:.2f} s/edit", flush=True)
    bank = banks[-1]
    n_loop = len(loop_success)
    ours_eps = len(edits) / median(ours_s)
    torch_eps = 1.0 / median(torch_s)

    headline = {
        "what": "CounterFact edits fitted per second on SmolLM2 (layer 14), ours vs a batch-1 "
        "PyTorch loop following the reference's stage 3",
        "ratio": ours_eps / torch_eps,
        "edits": len(edits),
        "ours": {
            "config": dataclasses.asdict(fast),
            "edits_per_s": ours_eps,
            "s_per_edit": 1.0 / ours_eps,
            "success_rate": float(bank.success.mean()),
            "success_rate_on_loop_edits": float(bank.success[:n_loop].mean()),
            "median_final_loss": float(np.median(bank.final_loss)),
            "slot_steps_per_edit": collector.stats["row_steps"] / len(edits),
            "runs_s": ours_s,
            "warmup_s_32_edits_including_compile": warm_ours,
        },
        "torch_loop": {
            "procedure": "batch 1, SGD lr 0.5, 50 steps, constant, neuron hooked on layer 14's "
            "MLP, greedy test of 20 tokens",
            "edits_timed": n_loop,
            "note": f"runs on a subset: {per_run} edits per run, {args.runs} runs",
            "edits_per_s": torch_eps,
            "s_per_edit": 1.0 / torch_eps,
            "success_rate": float(np.mean(loop_success)),
            "runs_s_per_edit": torch_s,
            "warmup_s_one_edit": warm_torch,
        },
    }
    print(write_result("collection", headline), headline["ratio"], flush=True)

    # ---- levers: per-step time of the compiled step, slot-steps per edit of each recipe --------
    levers = {}
    for name, cfg, batch in (
        ("full_head_b16", CollectConfig(full_head=True), 16),
        ("answer_head_b16", CollectConfig(), 16),
        ("answer_head_b32", CollectConfig(), 32),
        ("answer_head_b64", CollectConfig(), 64),
        ("adam_answer_head_b32", fast, 32),
    ):
        step_s, flops, xla_flops = step_timing(config, params, tokenizer, edits, cfg, batch)
        levers[name] = {
            "batch": batch,
            "step_s": step_s,
            "flops_per_step": flops,
            "xla_cost_analysis_flops_per_step (one loop trip)": xla_flops,
            "gflop_per_s": flops / step_s / 1e9,
        }
        print(name, levers[name], flush=True)
    # Steps each edit takes before it stops, per recipe: one compiled call on the first 32
    # edits (32 slots, no refills), `n` steps at most.
    recipes = {}
    for name, cfg, n in (
        ("sgd_lr0.5_early_stop", CollectConfig(early_stop=True), 50),
        ("adam_lr0.1_early_stop (fast)", fast, 30),
    ):
        steps, correct = steps_to_stop(config, params, tokenizer, edits[:32], cfg, n)
        recipes[name] = {
            "edits": 32,
            "max_steps": n,
            "updates_per_edit_mean": float(steps.mean()),
            "updates_per_edit_median": float(np.median(steps)),
            "updates_per_edit_max": int(steps.max()),
            "argmax_correct_at_stop": float(correct.mean()),
        }
        print(name, recipes[name], flush=True)
    recipes["sgd_lr0.5_no_stop (reference)"] = {"updates_per_edit_mean": 50}

    matmul = matmul_flops_per_s()
    step = levers["adam_answer_head_b32"]
    result = {
        **headline,
        "flops": {
            "matmul_f32_flops_per_s": matmul,
            "step_flops_per_s": step["flops_per_step"] / step["step_s"],
            "fraction_of_matmul": step["flops_per_step"] / step["step_s"] / matmul,
            "how": "matmul FLOPs of the fit step counted by hand (step_flops: 32 slots, Adam, "
            "answer head, forward + activation backward of layers 14-29) over its measured "
            "time; matmul: jitted 2048^3 float32, same script",
        },
        "levers_step_time": levers,
        "levers_steps_per_edit": recipes,
    }
    if args.generator_steps:
        result["generator"] = generator_check(
            bank, records, config, params, tokenizer, template, args.generator_steps
        )
        print(result["generator"], flush=True)
    path = write_result("collection", result)
    print(path, f"ratio {result['ratio']:.1f}")


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def generator_check(bank, records, config, params, tokenizer, template, steps: int) -> dict:
    """The generator (preset "fast", `steps` steps) trained on `bank`: its stopping criterion and
    generated-weight success on the bank's fitted edits (SmolLM2 with the generated neuron
    answers the target, greedy, exact match). bench/results/generator.json has the same recipe
    on the shared reference bank (SGD, 50 steps) for comparison."""
    import tempfile
    from pathlib import Path

    from meg_jax.diffusion.config import generator_config
    from meg_jax.diffusion.train import train_generator
    from meg_jax.encoder.text_encoder import TextEncoder
    from meg_jax.inference.runner import ModelRunner
    from meg_jax.models.neuron import unflatten_neuron
    from meg_jax.pipeline import _encoder_path

    encoder = TextEncoder.from_pretrained(_encoder_path("minilm"), template=template.query)
    conditions = encoder.encode([r.prompt for r in records])
    keep = bank.fitted
    prompts = [template.format_query(r.prompt) for r, k in zip(records, keep, strict=True) if k]
    targets = [r.target_new for r, k in zip(records, keep, strict=True) if k]
    runner = ModelRunner(config, params, tokenizer, batch_size=64, show_progress=False)

    def callback(step, state, samples, record):
        if step % steps:
            return None
        neurons = unflatten_neuron(np.asarray(samples), config.d_model, False)
        texts = runner.generate(prompts, neurons, 20, template.generation_stops)
        return {"success": float(np.mean(answer_ag_correct(texts, targets, template.answer_cuts)))}

    overrides = {
        "train": {
            "num_steps": steps,
            "eval_every": steps,
            "checkpoint_every": steps,
            "stop_threshold": 0.0,
            "criterion_sampler": {"kind": "ddim", "steps": 50, "shared_noise": True},
        }
    }
    cfg = generator_config(overrides, "fast")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train_generator(
            bank.weights,
            conditions,
            cfg,
            Path(tmp) / "gen",
            success=bank.success,
            init=bank.init,
            callback=callback,
        )
    last = result.evaluations[-1]
    return {
        "preset": "fast",
        "steps": steps,
        "fitted_edits": int(keep.sum()),
        "criterion": float(last["criterion"]),
        "generated_weight_success": float(last["success"]),
        "train_wall_s": time.perf_counter() - began,
        "compare": "bench/results/generator.json, recipe 'ours' at the same step, trained on the "
        "shared reference bank",
    }


if __name__ == "__main__":
    main()

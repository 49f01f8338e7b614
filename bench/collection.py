"""Weight collection on SmolLM2: our batched stage vs a batch-1 loop like the reference's.

    python bench/collection.py [--edits 256] [--loop-edits 24] [--runs 2] [--generator-steps 1000]
                               [--parts headline,levers,generator] [--bank BANK] [--label L]

Workload: the first `--edits` CounterFact edits of ../shared/data, templated as the main job
does (host, layer, activation, prompt form and fit recipe all read from configs/smollm2_cf.py:
`smollm2_qa`, layer 14, identity), every fit from the same seeded PyTorch-Linear-style initial
neuron.

headline. Ours: `Collector.fit` on all edits at once with the main job's recipe,
`CollectConfig.fast()` (Adam, early stop once every answer token is the argmax and the loss is
below `stop_loss`, logits at the answer positions only, 32 slots refilled as fits finish,
compaction at the tail), then the greedy success test; its bank is saved to
runs/bench_collection/bank.npz. Baseline ("torch"): the reference's stage-3 procedure at batch 1
in PyTorch transformers on the same float32 weights: the neuron (w_in, w_out) hooked onto layer
14's MLP, HF causal-LM loss with the prompt masked, plain SGD lr 0.5 for 50 steps (the SmolLM2
schedule, METHOD.md §3.3b), then a greedy `generate` of up to 20 tokens and the same success
test. It runs on the first `--loop-edits` edits only (20-30 s per edit here); each timed run
takes the next `--loop-edits / --runs` of them. Runs alternate with ours. `ratio` is our edits/s
over the loop's.

levers. Each lever alone (per-step time of the compiled step at several settings, and per
optimiser/stop rule the updates per edit and the spread of the fitted neurons: a bank whose rows
spread further from their mean is harder for the generator), and the achieved FLOP/s of our step
(matmul FLOPs counted by hand over its measured time) against float32 matmul throughput measured
here.

generator. The generated-weight success of a generator (preset "fast", `--generator-steps`)
trained on a bank of this recipe: the headline's, or `--bank` (e.g. the main job's
runs/<workdir>/collect/bank.npz, rows matched to edits by case id) when the headline does not
run in this invocation; its criterion curve (six checks) with wall times, and the bank's spread
(the criterion is an absolute distance). A bank of `--edits` rows is reported as `generator`,
another size as `generator_<N>_edits` (the issue's 1,024-edit generator); `--label` names a bank
of another recipe (`--label fitnsgd`: `generator_<N>_edits_fitnsgd`).

Parts not run keep their figures from the existing collection.json; each part records the load
average it ran at.
"""

import argparse
import dataclasses
import json
import os
import time

import common  # noqa: F401  (first: it configures torch's thread pool)
import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import REPO, RESULTS, SHARED, median, write_result
from torch_reference import torch_llama

from meg_jax.checkpoints.hosts import encoder_path, load_host
from meg_jax.collect.bank import load_bank, save_bank
from meg_jax.collect.fit import answer_positions, fit_steps, init_state, torch_linear_init
from meg_jax.collect.stage import CollectConfig, Collector, _training_batch
from meg_jax.data.readers import read_edits
from meg_jax.data.templates import get_template
from meg_jax.evaluation.metrics import answer_ag_correct
from meg_jax.pipeline import load_config
from meg_jax.pipeline.collection import edits_to_fit

MAIN_JOB = REPO / "configs" / "smollm2_cf.py"
BANK = REPO / "runs" / "bench_collection" / "bank.npz"  # the headline's bank, for the generator
PARTS = ("headline", "levers", "generator")


def torch_loop(model, tokenizer, config, edits, success_fn, init) -> list[bool]:
    """The reference's stage 3, one edit at a time: SGD on the hooked neuron, then greedy test."""
    out = []
    for edit in edits:
        w_in = torch.tensor(np.asarray(init.w_in[0]), requires_grad=True)
        w_out = torch.tensor(np.asarray(init.w_out[0]), requires_grad=True)

        def hook(module, inputs, output, w_in=w_in, w_out=w_out):
            return output + (inputs[0] @ w_in)[..., None] * w_out

        handle = model.model.layers[config.neuron_layer].mlp.register_forward_hook(hook)
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
    """Per edit: (updates taken before the early stop, argmax correct when stopped), and the
    mean L2 distance of the stopped neurons from their mean."""
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
    flat = np.concatenate([np.asarray(x).reshape(b, -1) for x in state.neuron], axis=1)
    spread = float(np.linalg.norm(flat - flat.mean(0), axis=1).mean())
    return np.asarray(state.steps), np.asarray(state.correct), spread


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=256)
    parser.add_argument("--loop-edits", type=int, default=24)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--generator-steps", type=int, default=1000)
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="which parts to run; the others keep their figures from collection.json",
    )
    parser.add_argument(
        "--bank",
        default=str(BANK),
        help="the bank the generator part trains on when the headline does not run",
    )
    parser.add_argument("--label", default="", help="a suffix of the generator part's key")
    parser.add_argument(
        "--generator-overrides",
        type=json.loads,
        default={},
        help='JSON overrides of the fast preset, e.g. \'{"train": {"batch_size": 0}}\'',
    )
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        parser.error(f"--parts: unknown {sorted(unknown)}; expected some of {PARTS}")
    torch.set_num_threads(2)

    main_job, _ = load_config(["--config", str(MAIN_JOB)])
    host = main_job.host
    config, params, tokenizer = load_host(
        host.name, neuron_layer=host.neuron_layer, neuron_activation=host.neuron_activation
    )
    template = get_template(host.template)
    records = read_edits(SHARED / "counterfact" / "counterfact-edit.json", limit=args.edits)
    edits = edits_to_fit(records, template)
    fast = main_job.collect.fit
    path = RESULTS / "collection.json"
    result = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for stamp in ("machine", "date"):  # write_result adds this run's
        result.pop(stamp, None)
    if "headline" in parts:
        result.update(headline(args, config, params, tokenizer, template, edits, fast))
        result["headline_load_average"] = os.getloadavg()
        print(write_result("collection", result), result["ratio"], flush=True)
    if "levers" in parts:
        nsgd = load_config(["--config", f"{MAIN_JOB}:fit=nsgd"])[0].collect.fit
        result.update(levers(config, params, tokenizer, edits, fast, nsgd))
        result["levers_load_average"] = os.getloadavg()
        write_result("collection", result)
    if "generator" in parts:
        bank = load_bank(args.bank)
        by_id = {r.id: r for r in read_edits(SHARED / "counterfact" / "counterfact-edit.json")}
        bank_records = [by_id[int(i)] for i in bank.case_id]
        # The headline's size under "generator", another bank's (e.g. 1,024 edits) beside it.
        key = "generator" if len(bank) == args.edits else f"generator_{len(bank)}_edits"
        key += f"_{args.label}" if args.label else ""
        result[key] = {
            **generator_check(
                bank,
                bank_records,
                config,
                params,
                tokenizer,
                template,
                args.generator_steps,
                args.generator_overrides,
            ),
            "bank": args.bank,
            "load_average": os.getloadavg(),
        }
        print(result[key], flush=True)
    print(write_result("collection", result), f"ratio {result['ratio']:.1f}")


def headline(args, config, params, tokenizer, template, edits, fast) -> dict:
    """Ours on all edits vs the batch-1 loop, alternating; saves our bank to `BANK`."""

    def success_fn(texts, targets):
        return answer_ag_correct(texts, targets, template.answer_cuts, "exact")

    init = torch_linear_init(config, fast.seed)
    model = torch_llama(config, params)
    for p in model.parameters():
        p.requires_grad_(False)
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
    BANK.parent.mkdir(parents=True, exist_ok=True)
    save_bank(bank, BANK)
    n_loop = len(loop_success)
    ours_eps = len(edits) / median(ours_s)
    torch_eps = 1.0 / median(torch_s)
    return {
        "what": "CounterFact edits fitted per second on SmolLM2 (layer 14), ours vs a batch-1 "
        "PyTorch loop following the reference's stage 3",
        "ratio": ours_eps / torch_eps,
        "edits": len(edits),
        "template": template.name,
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


def levers(config, params, tokenizer, edits, fast, nsgd) -> dict:
    """Per-step time of the compiled step per setting, updates per edit and neuron spread of
    each recipe (the main job's `fast`, its `:fit=nsgd` variant's `nsgd`, and others), and the
    achieved FLOP/s of our step against this machine's float32 matmul throughput."""
    steps_time = {}
    for name, cfg, batch in (
        ("full_head_b16", CollectConfig(full_head=True), 16),
        ("answer_head_b16", CollectConfig(), 16),
        ("answer_head_b32", CollectConfig(), 32),
        ("answer_head_b64", CollectConfig(), 64),
        ("fast_answer_head_b32", fast, 32),
    ):
        step_s, flops, xla_flops = step_timing(config, params, tokenizer, edits, cfg, batch)
        steps_time[name] = {
            "batch": batch,
            "step_s": step_s,
            "flops_per_step": flops,
            "xla_cost_analysis_flops_per_step (one loop trip)": xla_flops,
            "gflop_per_s": flops / step_s / 1e9,
        }
        print(name, steps_time[name], flush=True)
    # Steps each edit takes before it stops, per recipe: one compiled call on the first 32
    # edits (32 slots, no refills), `n` steps at most.
    recipes = {}
    looser = CollectConfig.fast(learning_rate=0.2, stop_loss=1.0)  # rejected: a worse bank
    for name, cfg, n in (
        ("sgd_lr0.5_early_stop", CollectConfig(early_stop=True), 50),
        ("adam_lr0.2_stop1.0_early_stop (rejected, see CollectConfig.fast)", looser, 50),
        (f"nsgd_lr{nsgd.learning_rate}_early_stop (fit=nsgd)", nsgd, 50),
        ("nsgd_lr2.0_early_stop", dataclasses.replace(nsgd, learning_rate=2.0), 50),
        (f"adam_lr{fast.learning_rate}_stop{fast.stop_loss}_early_stop (fast)", fast, 50),
    ):
        steps, correct, spread = steps_to_stop(config, params, tokenizer, edits[:32], cfg, n)
        recipes[name] = {
            "edits": 32,
            "max_steps": n,
            "updates_per_edit_mean": float(steps.mean()),
            "updates_per_edit_median": float(np.median(steps)),
            "updates_per_edit_max": int(steps.max()),
            "argmax_correct_at_stop": float(correct.mean()),
            "neuron_spread": spread,
        }
        print(name, recipes[name], flush=True)
    recipes["sgd_lr0.5_no_stop (reference)"] = {"updates_per_edit_mean": 50}
    matmul = matmul_flops_per_s()
    step = steps_time["fast_answer_head_b32"]
    return {
        "flops": {
            "matmul_f32_flops_per_s": matmul,
            "step_flops_per_s": step["flops_per_step"] / step["step_s"],
            "fraction_of_matmul": step["flops_per_step"] / step["step_s"] / matmul,
            "how": "matmul FLOPs of the fit step counted by hand (step_flops: 32 slots, the "
            "fast recipe, answer head, forward + activation backward of layers 14-29) over its "
            "measured time; matmul: jitted 2048^3 float32, same script",
        },
        "levers_step_time": steps_time,
        "levers_steps_per_edit": recipes,
    }


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def generator_check(
    bank, records, config, params, tokenizer, template, steps: int, overrides: dict
) -> dict:
    """The generator (preset "fast" with `overrides`, at most `steps` steps, stopping as the
    pipeline does once the criterion is below the threshold) trained on `bank`: its stopping
    criterion and generated-weight success on the bank's fitted edits where it stopped (SmolLM2
    with the generated neuron answers the target, greedy, exact match).
    bench/results/generator.json has the same recipe on the shared reference bank (SGD, 50 steps)
    for comparison."""
    import tempfile
    from pathlib import Path

    from meg_jax.diffusion.config import generator_config
    from meg_jax.diffusion.train import train_generator
    from meg_jax.encoder.text_encoder import TextEncoder
    from meg_jax.inference.runner import ModelRunner
    from meg_jax.models.neuron import unflatten_neuron

    encoder = TextEncoder.from_pretrained(encoder_path("minilm"), template=template.query)
    conditions = encoder.encode([r.prompt for r in records])
    keep = bank.fitted
    fitted = bank.weights[keep]
    prompts = [template.format_query(r.prompt) for r, k in zip(records, keep, strict=True) if k]
    targets = [r.target_new for r, k in zip(records, keep, strict=True) if k]
    runner = ModelRunner(config, params, tokenizer, batch_size=64, show_progress=False)

    def callback(step, state, samples, record):
        # Generating for every edit costs minutes: only where training ends (below the
        # stopping criterion, or at the last step).
        if step < steps and not record["criterion"] < cfg.train.stop_threshold:
            return {"at_step": step}
        neurons = unflatten_neuron(np.asarray(samples), config.d_model, False)
        texts = runner.generate(prompts, neurons, 20, template.generation_stops)
        return {
            "at_step": step,
            "success": float(np.mean(answer_ag_correct(texts, targets, template.answer_cuts))),
        }

    train = {
        "num_steps": steps,
        "eval_every": max(steps // 6, 1),
        "checkpoint_every": steps,
        "criterion_sampler": {"kind": "ddim", "steps": 50, "shared_noise": True},
    }
    cfg = generator_config({**overrides, "train": {**overrides.get("train", {}), **train}}, "fast")
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
        "overrides": overrides,
        "steps": result.step,
        "max_steps": steps,
        "stopped": result.stopped,
        "fitted_edits": int(keep.sum()),
        "criterion": float(last["criterion"]),
        "generated_weight_success": float(last["success"]),
        "train_wall_s": time.perf_counter() - began,
        "curve": [
            {k: e[k] for k in ("at_step", "wall_s", "criterion")} for e in result.evaluations
        ],
        "first_below_0.5": next(
            (
                {k: e[k] for k in ("at_step", "wall_s", "criterion")}
                for e in result.evaluations
                if e["criterion"] < 0.5
            ),
            None,
        ),
        # The criterion is an absolute L2 distance: its meaning depends on the bank's scale.
        "bank_spread": float(np.linalg.norm(fitted - fitted.mean(0), axis=1).mean()),
        "compare": "bench/results/generator.json, recipe 'ours' at the same step, trained on the "
        "shared reference bank",
    }


if __name__ == "__main__":
    main()

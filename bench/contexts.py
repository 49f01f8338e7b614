"""Collection contexts: how often each fitted neuron answers its own edit's paraphrase.

    python bench/contexts.py [--n 64] [--contexts 0,2]

For each context count K, collects the first `n` CounterFact edits with the main job's recipe
(configs/smollm2_cf.py:n=N,ctx=K, each in its own work directory under runs/bench_contexts) and
evaluates Rel and Gen with every edit's own fitted neuron plugged in (the evaluator's bank-neuron
reading: no router, no generator). That reading caps what MeG's generated neurons can reach on
paraphrases. One run per K.

bench/results/contexts.json: per K, the collection wall time, the contexts the host wrote, the
fitted share and the four readings; `gen_ag_gain` is Gen AG at the largest K minus at K = 0.
"""

import argparse
import shutil
import time

from common import REPO, write_result

from meg_jax.infra.fingerprint import StageRecord
from meg_jax.pipeline import load_config
from meg_jax.pipeline.cli import setup_logging
from meg_jax.pipeline.collection import run_collect_stage
from meg_jax.pipeline.context import RunContext
from meg_jax.pipeline.edits import run_edits_stage
from meg_jax.pipeline.evaluation import bank_neuron_readings


def measure(n: int, k: int) -> dict:
    workdir = REPO / "runs" / "bench_contexts" / f"ctx{k}"
    shutil.rmtree(workdir, ignore_errors=True)
    spec = str(REPO / "configs" / "smollm2_cf.py") + f":n={n},ctx={k}"
    cfg = load_config(["--config", spec, f"--config.workdir={workdir}"])[0]
    ctx = RunContext.create(cfg)
    edits = run_edits_stage(ctx)
    began = time.perf_counter()
    bank, _ = run_collect_stage(ctx, edits)
    wall = time.perf_counter() - began
    _, readings = bank_neuron_readings(ctx, ctx.runner(), edits.records, cfg.evaluation)
    return {
        "collect_s": wall,
        "fitted": float(bank.fitted.mean()),
        "contexts": StageRecord.read(workdir / "collect").summary.get("contexts", []),
        **readings,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--contexts", default="0,2")
    args = parser.parse_args()
    setup_logging(0)
    counts = sorted(int(k) for k in args.contexts.split(","))
    arms = {str(k): measure(args.n, k) for k in counts}
    gain = arms[str(counts[-1])]["gen_ag_bank_neuron"] - arms[str(counts[0])]["gen_ag_bank_neuron"]
    result = {
        "benchmark": "contexts",
        "gen_ag_gain": gain,
        "edits": args.n,
        "arms": arms,
        "runs": 1,
    }
    for k, arm in arms.items():
        print(
            f"ctx={k}: Gen AG {arm['gen_ag_bank_neuron']:.1f}, Gen TF "
            f"{arm['gen_tf_bank_neuron']:.1f}, collection {arm['collect_s']:.0f} s"
        )
    print(write_result("contexts", result))


if __name__ == "__main__":
    main()

"""Incremental editing against training from scratch, on SmolLM2 and CounterFact.

    python bench/incremental.py [--base 256] [--add 64] [--base-from WORKDIR]

In one run: train `base` edits (configs/smollm2_cf.py:n=BASE) in work directory A, then add
`add` more (n=BASE+ADD in A: only the new neurons are fitted, the generator continues from its
trained weights on the union, the router is retrained on the union (`router.extend_warm`, off by
default), the encoder is reused); and train BASE+ADD edits from scratch
in work directory B. Both are evaluated on the same BASE+ADD edits; the Score is also reported on
the earlier and the new edits apart. One run of each (a from-scratch run is tens of minutes on
this CPU), so the ratio is a single measurement, not a median. `--base-from` starts A as a copy
of a work directory already trained on the same BASE edits and settings (e.g. bench/quality.py's
CounterFact-256 (a) seed 0): the base is then not retrained (and not timed); the pipeline's stage
fingerprints refuse a directory trained on anything else.

bench/results/incremental.json: `ratio` (from-scratch training time over the addition's) and
`score_delta` (from-scratch Score minus incremental Score), with per-stage times of each.
"""

import argparse
import json
import shutil
import time

import numpy as np
from common import REPO, write_result

from meg_jax.evaluation.evaluator import SIX
from meg_jax.evaluation.metrics import meg_score
from meg_jax.infra.fingerprint import StageRecord
from meg_jax.pipeline import STAGES, load_config, run
from meg_jax.pipeline.cli import setup_logging


def config(workdir, n: int):
    spec = str(REPO / "configs" / "smollm2_cf.py") + f":n={n}"
    return load_config(["--config", spec, f"--config.workdir={workdir}"])[0]


def _records(workdir) -> dict:
    stages = [s for s in STAGES if s != "evaluation"]
    return {s: StageRecord.read(workdir / s) for s in stages}


def train(workdir, n: int) -> tuple[float, dict]:
    """Wall time of training `n` edits in `workdir`, and of each stage that ran (0: skipped)."""
    before = _records(workdir)
    began = time.perf_counter()
    run(config(workdir, n), evaluate=False)
    wall = time.perf_counter() - began
    # A skipped stage leaves its record (and the wall time of the run that made it) untouched.
    after = _records(workdir)
    times = {s: r.wall_s if r != before[s] else 0.0 for s, r in after.items()}
    return wall, times


def readings(rows: list[dict]) -> dict:
    """The six readings and Score of a subset of evaluated records (TF: mean per query)."""
    out = {}
    for key in SIX:
        values = [float(r[key]) for r in rows if key in r]
        out[key] = 100.0 * float(np.mean(values)) if values else float("nan")
    out["score"] = meg_score(*(out[k] for k in SIX))
    return out


def evaluate(workdir, n: int, base: int) -> dict:
    summaries = run(config(workdir, n), evaluate=True)
    path = workdir / "evaluation" / "meg" / "examples.jsonl"
    rows = [json.loads(line) for line in path.open()]
    return {
        "all": {k: summaries["meg"][k] for k in (*SIX, "score")},
        "earlier_edits": readings(rows[:base]),
        "new_edits": readings(rows[base:]),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=int, default=256)
    parser.add_argument("--add", type=int, default=64)
    parser.add_argument("--base-from", default="", help="a work directory trained on BASE edits")
    args = parser.parse_args()
    setup_logging(0)
    inc, scratch = REPO / "runs" / "bench_incremental", REPO / "runs" / "bench_scratch"
    for folder in (inc, scratch):
        shutil.rmtree(folder, ignore_errors=True)
    total = args.base + args.add
    if args.base_from:
        shutil.copytree(args.base_from, inc)
    base_s, base_stages = train(inc, args.base)
    add_s, add_stages = train(inc, total)
    scratch_s, scratch_stages = train(scratch, total)
    inc_eval, scratch_eval = evaluate(inc, total, args.base), evaluate(scratch, total, args.base)
    result = {
        "benchmark": "incremental",
        "ratio": scratch_s / add_s,
        "score_delta": scratch_eval["all"]["score"] - inc_eval["all"]["score"],
        "edits": {"base": args.base, "added": args.add},
        "base_from": args.base_from or None,
        "wall_s": {
            "base": None if args.base_from else base_s,
            "addition": add_s,
            "from_scratch": scratch_s,
        },
        "stages_s": {"base": base_stages, "addition": add_stages, "from_scratch": scratch_stages},
        "incremental": inc_eval,
        "from_scratch": scratch_eval,
        "runs": 1,
    }
    print(
        f"addition {add_s:.0f} s vs from scratch {scratch_s:.0f} s: ratio {result['ratio']:.2f}; "
        f"Score {inc_eval['all']['score']:.2f} vs {scratch_eval['all']['score']:.2f}"
    )
    print(write_result("incremental", result))


if __name__ == "__main__":
    main()

"""The main job end to end on the embedded default: its MeG Score, readings and wall times.

    python bench/default.py [--variant n=1024] [--workdir runs/bench_default]

Runs `configs/smollm2_cf.py` (SmolLM2-135M GGUF on CPU, CounterFact edits from ../shared/data)
exactly as `python -m meg_jax.train --config configs/smollm2_cf.py:<variant>` does, in a fresh
work directory (so nothing is resumed and the wall time covers every stage), then writes
bench/results/default.json: `score` is the edited model's MeG Score (harmonic mean of Rel/Gen/Loc
x AG/TF), beside the six readings, the unedited model's, the routing rates, `edits`, the total
`wall_s`, each stage's wall time (`stages`, from the stage records) and the generator stage's
summary (steps, criterion, whether it stopped below the threshold). A variant writes
bench/results/default_<variant>.json instead (`n=1024`: default_n1024.json).
"""

import argparse
import shutil
import time

from common import REPO, write_result

from meg_jax.evaluation.evaluator import SIX
from meg_jax.infra.fingerprint import StageRecord
from meg_jax.pipeline import STAGES, load_config, run
from meg_jax.pipeline.cli import setup_logging


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench_default"))
    args = parser.parse_args()

    spec = "configs/smollm2_cf.py" + (f":{args.variant}" if args.variant else "")
    cfg, _ = load_config(["--config", str(REPO / spec), f"--config.workdir={args.workdir}"])
    setup_logging(0)
    shutil.rmtree(args.workdir, ignore_errors=True)  # a fresh run: nothing resumed
    began = time.perf_counter()
    summaries = run(cfg, evaluate=True)
    wall = time.perf_counter() - began
    meg, unedited = summaries["meg"], summaries["unedited"]
    records = {s: StageRecord.read(REPO / args.workdir / s) for s in STAGES}  # all finished
    result = {
        "benchmark": "default",
        "score": meg["score"],
        "edits": meg["n_records"],
        "wall_s": wall,
        "stages": {s: record.wall_s for s, record in records.items()},
        "readings": {k: meg[k] for k in SIX},
        "unedited": {k: unedited[k] for k in (*SIX, "score")},
        "routed": meg.get("routed"),
        "routing": meg.get("routing"),
        "bank_fitted": records["collect"].summary.get("fitted"),
        "generator": records["generator"].summary,
        "config": spec,
    }
    print(f"MeG Score {result['score']:.2f} in {wall / 60:.1f} min: {result['readings']}")
    name = "default" + (f"_{args.variant.replace('=', '')}" if args.variant else "")
    print(write_result(name, result))


if __name__ == "__main__":
    main()

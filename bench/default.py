"""The main job end to end on the embedded default: its MeG Score, readings and wall time.

    python bench/default.py [--variant n=64] [--workdir runs/bench_default]

Runs `configs/smollm2_cf.py` (SmolLM2-135M GGUF on CPU, CounterFact edits from ../shared/data)
exactly as `python -m meg_jax.train --config configs/smollm2_cf.py:<variant>` does, in a fresh
work directory (so nothing is resumed and the wall time covers every stage), then writes
bench/results/default.json: `score` is the edited model's MeG Score (harmonic mean of Rel/Gen/Loc
x AG/TF), beside the six readings, the unedited model's, the routing rates and the wall time.
"""

import argparse
import importlib.util
import shutil
import time

from common import REPO, write_result

from meg_jax.evaluation.evaluator import SIX
from meg_jax.pipeline import pipeline_config, run


def load_config(variant: str):
    spec = importlib.util.spec_from_file_location("smollm2_cf", REPO / "configs" / "smollm2_cf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant or None)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench_default"))
    args = parser.parse_args()

    config = load_config(args.variant)
    config.workdir = args.workdir
    shutil.rmtree(args.workdir, ignore_errors=True)  # a fresh run: nothing resumed
    began = time.perf_counter()
    summaries = run(pipeline_config(config))
    wall = time.perf_counter() - began
    meg, unedited = summaries["meg"], summaries["unedited"]
    result = {
        "benchmark": "default",
        "score": meg["score"],
        "readings": {k: meg[k] for k in SIX},
        "unedited": {k: unedited[k] for k in (*SIX, "score")},
        "routed": meg.get("routed"),
        "bank_fitted": meg.get("bank_fitted"),
        "edits": meg["n_records"],
        "config": f"configs/smollm2_cf.py:{args.variant}"
        if args.variant
        else "configs/smollm2_cf.py",
        "wall_s": wall,
    }
    print(f"MeG Score {result['score']:.2f} in {wall / 60:.1f} min: {result['readings']}")
    print(write_result("default", result))


if __name__ == "__main__":
    main()

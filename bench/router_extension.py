"""The router's extension against retraining it, over router seeds (issue "load, query, extend").

    python bench/router_extension.py [--base 256] [--add 64] [--seeds 42,0,1,2] [--workdir DIR]

`bench/incremental.py` trains the whole pipeline once per arm, so its Score gap is one draw of
every stage. This isolates the router, the stage whose draw moves routing most: on the work
directory of configs/smollm2_cf.py:n=BASE+ADD (`--workdir`, e.g. bench/incremental.py's
runs/bench_scratch: its edits and tuned encoder; trained first where missing), per
router seed, (1) a router trained on the calibration queries and the first BASE edits, then
extended to all edits for `router.extend_epochs` from its weights, as the pipeline's extend does;
(2) a router trained from scratch on all edits for `router.train.num_epochs`. Each is calibrated
as the router stage does (Youden's J on the held-out pseudo-edits' first paraphrase against their
first neighbourhood prompt), and read on the edits' first paraphrases (the share routed: the Gen
reading's routed share), the new edits' paraphrases, and their first neighbourhood prompts (the
Loc reading's routed share, lower is better).

bench/results/router_extension.json: per seed and arm the calibration AUC, threshold and routed
shares, and the mean and sample std over seeds of scratch minus extended.
"""

import argparse
import dataclasses
import shutil
from pathlib import Path

import numpy as np
from common import REPO, write_result

from meg_jax.pipeline import load_config
from meg_jax.pipeline.cli import setup_logging
from meg_jax.pipeline.context import RunContext
from meg_jax.pipeline.edits import run_edits_stage
from meg_jax.pipeline.query_side import (
    calibration_queries,
    calibration_records,
    router_queries,
    run_encoder_stage,
)
from meg_jax.router.calibrate import calibrate
from meg_jax.router.train import train_router

READINGS = ("auc", "gen_routed", "gen_new_routed", "loc_routed")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=int, default=256)
    parser.add_argument("--add", type=int, default=64)
    parser.add_argument("--seeds", default="42,0,1,2")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench_router_extension"))
    args = parser.parse_args()
    setup_logging(0)
    total = args.base + args.add
    workdir = Path(args.workdir)
    spec = str(REPO / "configs" / "smollm2_cf.py") + f":n={total}"
    cfg = load_config(["--config", spec, f"--config.workdir={workdir}"])[0]
    ctx = RunContext.create(cfg)
    edits = run_edits_stage(ctx)
    encoder, _ = run_encoder_stage(ctx)
    calibration = calibration_records(ctx)
    records = edits.records
    queries = router_queries(encoder, calibration, records)  # as the router stage trains on
    n_base = len(calibration) + args.base
    positive, negative = calibration_queries(encoder, calibration)
    gen = encoder.encode([r.paraphrases[0] for r in records])
    loc = encoder.encode([r.locality_prompts[0] for r in records])

    def readings(router) -> dict:
        report = calibrate(
            router.entropy(positive),
            router.entropy(negative),
            cfg.router.calibration,
            {
                "gen_routed": router.entropy(gen),
                "gen_new_routed": router.entropy(gen[args.base :]),
                "loc_routed": router.entropy(loc),
            },
        )
        return {"auc": report["auc"], "threshold": report["threshold"], **report["routed_fraction"]}

    runs = REPO / "runs" / "bench_router_extension" / "routers"
    shutil.rmtree(runs, ignore_errors=True)
    per_seed = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        train = dataclasses.replace(cfg.router.train, seed=seed)
        base = train_router(queries[:n_base], train, runs / f"base-{seed}")
        extend = dataclasses.replace(train, num_epochs=cfg.router.extend_epochs)
        extended = train_router(queries, extend, runs / f"extended-{seed}", init_params=base.params)
        scratch = train_router(queries, train, runs / f"scratch-{seed}")
        per_seed[seed] = {"extended": readings(extended), "from_scratch": readings(scratch)}
        print(seed, per_seed[seed])
    gaps = {
        k: [per_seed[s]["from_scratch"][k] - per_seed[s]["extended"][k] for s in per_seed]
        for k in READINGS
    }
    result = {
        "benchmark": "router_extension",
        "edits": {"base": args.base, "added": args.add},
        "epochs": {"scratch": cfg.router.train.num_epochs, "extend": cfg.router.extend_epochs},
        "seeds": per_seed,
        "scratch_minus_extended": {
            k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)), "values": v}
            for k, v in gaps.items()
        },
        "runs": len(per_seed),
    }
    print(write_result("router_extension", result))


if __name__ == "__main__":
    main()

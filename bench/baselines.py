"""FT-L, MEMIT and AlphaEdit on SmolLM2 under MeG's protocol and the classic one.

    nice -n 10 python bench/baselines.py --n 256 [--n 1024] [--methods ft,memit,alphaedit]

For each edit count and method a child process runs the pipeline of
`configs/baseline_smollm2.py:method=...,n=...` (work directory runs/bench_baselines/<method>-<n>)
through its stage functions: the edits stage (the first n CounterFact edits of ../shared/data,
locality labels = the unedited model's answers, as MeG's main job), the baseline stage, and the
evaluation stage MeG's runs use (the edited weights with the all-zero neuron): MeG's six readings
and Score, and MEMIT's CounterFact ES/PS/NS; the unedited model's readings are computed by the
first method and read by the others (`evaluation.unedited_cache`, runs/bench_baselines/unedited).
AlphaEdit's single batch reads the target values MEMIT fitted for the same edits from the
statistics cache (its `edit_seconds` still counts their fitting time: the cost when run alone).
Wall time of the editing (key statistics apart:
computed once per host, cached in runs/bench_baselines/stats, reported separately) and peak
resident memory (the process's maximum RSS after editing, and after loading the host, so the
difference is what editing added) come from that child, so the methods do not share an
allocator's high-water mark. The unedited model's row comes from the same evaluation. Each run
records its date and the machine's load. Runs not repeated are kept: those finished in the work
directory, then those in the committed bench/results/baselines.json (so `--n 1024` adds a
column instead of replacing the table).

MeG's column comes from a trained MeG work directory of the same edits (`--meg N=WORKDIR`,
e.g. the quality benchmark's chosen configuration, evaluated with `evaluation.classic=True` so
that the classic readings exist): its evaluation summary, and as its editing time the wall time
its training stages recorded (edits, encoder, router, collect, generator). Its peak memory is not
measured here (null): those stages ran in another process.

Writes bench/results/baselines.json (top level `methods` keyed ft / memit / alphaedit / meg,
each with `score` per edit count) and bench/results/baselines.png.
"""

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import common

WORK = common.REPO / "runs" / "bench_baselines"
METHODS = ("ft", "memit", "alphaedit")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(method: str, n: int, out: Path) -> None:
    """Edit and evaluate in this process through the pipeline's stage functions (what
    `python -m meg_jax.train` then `meg_jax.evaluate` run); writes its result to `out`."""
    from meg_jax.infra.files import write_json_atomic
    from meg_jax.pipeline.baseline import baseline_under_test, run_baseline_stage
    from meg_jax.pipeline.cli import load_config, setup_logging
    from meg_jax.pipeline.context import RunContext
    from meg_jax.pipeline.edits import run_edits_stage
    from meg_jax.pipeline.evaluation import run_evaluation_stage

    edits_path = common.SHARED / "counterfact" / "counterfact-edit.json"
    cfg, _ = load_config(
        [
            "--config",
            f"{common.REPO / 'configs/baseline_smollm2.py'}:method={method},n={n}",
            f"--config.workdir={WORK / f'{method}-{n}'}",
            f"--config.data.edits={edits_path}",
            f"--config.baseline.stats_dir={WORK / 'stats'}",  # shared by the methods
            f"--config.evaluation.unedited_cache={WORK / 'unedited'}",  # evaluated once
        ]
    )
    setup_logging(0)
    ctx = RunContext.create(cfg)
    ctx.host()
    rss_host = _peak_rss_mb()
    edits = run_edits_stage(ctx)  # locality labels: the unedited model's answers, as MeG's
    result: dict = {"method": method, "n_edits": len(edits.records)}
    start = time.perf_counter()
    edited, lineage = run_baseline_stage(ctx, edits)
    result["edit_total_seconds"] = time.perf_counter() - start  # 0 when done by an earlier run
    result["info"] = json.loads((ctx.workdir / "baseline" / "info.json").read_text())
    result["peak_rss_mb_after_edit"] = _peak_rss_mb()
    result["peak_rss_mb_after_host_load"] = rss_host
    ctx.manifest().write(ctx.workdir)
    start = time.perf_counter()
    summaries = run_evaluation_stage(
        ctx, edits, {"baseline": lineage}, baseline_under_test(ctx, edited)
    )
    result["eval_seconds"] = time.perf_counter() - start
    result.update(readings(summaries[method], summaries["unedited"]))
    result["machine"] = common.machine()  # each run's own load: runs of one file differ
    result["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    write_json_atomic(out, json.loads(json.dumps(result, default=float)))


def readings(edited: dict, unedited: dict) -> dict:
    """A result's readings from two evaluation summaries: the edited model's MeG-protocol
    figures and classic metrics at the top level, the unedited model's under "unedited"."""

    def split(row: dict) -> dict:
        return {
            "meg_protocol": {k: v for k, v in row.items() if k != "classic"},
            "classic": row.get("classic", {}),
        }

    return {**split(edited), "unedited": split(unedited)}


def meg_run(workdir: Path) -> dict:
    """A trained MeG work directory's readings in the shape of a baseline's result."""
    from meg_jax.infra.fingerprint import StageRecord

    summary = json.loads((workdir / "summary.json").read_text())
    stages = ("edits", "encoder", "router", "collect", "generator")
    walls = {s: StageRecord.read(workdir / s).wall_s for s in stages}
    run: dict = {"method": "meg", "workdir": str(workdir), "stage_seconds": walls}
    run["n_edits"] = summary["meg"].get("n_records")
    run["info"] = {"edit_seconds": sum(walls.values())}
    run["peak_rss_mb_after_edit"] = None  # trained in another process: not measured here
    run.update(readings(summary["meg"], summary["unedited"]))
    return run


def plot(methods: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("rel_ag", "gen_ag", "loc_ag", "rel_tf", "gen_tf", "loc_tf", "score")
    counts = sorted({int(k) for m in methods.values() for k in m["score"]})
    fig, axes = plt.subplots(1, len(counts), figsize=(7 * len(counts), 4), squeeze=False)
    for ax, n in zip(axes[0], counts, strict=True):
        width = 0.8 / max(len(methods), 1)
        for i, (name, m) in enumerate(methods.items()):
            run = m["runs"].get(str(n))
            if run is None:
                continue
            values = [run["meg_protocol"].get(k, 0.0) for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], values, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
        ax.set_ylim(0, 100)
        ax.set_title(f"SmolLM2, {n} CounterFact edits (MeG protocol)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not on them
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, action="append")
    parser.add_argument("--methods", default="ft,memit,alphaedit")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "N", "OUT"))
    parser.add_argument("--meg", action="append", default=[], metavar="N=WORKDIR")
    args = parser.parse_args()
    if args.one:
        one(args.one[0], int(args.one[1]), Path(args.one[2]))
        return
    counts = args.n or [256]
    WORK.mkdir(parents=True, exist_ok=True)
    runs: dict = {}
    for n in counts:
        for method in args.methods.split(","):
            if method == "unedited":  # every method's evaluation has the unedited row
                continue
            out = WORK / f"result-{method}-{n}.json"
            if not out.is_file():  # finished runs are kept: rerunning resumes
                cmd = [sys.executable, __file__, "--one", method, str(n), str(out)]
                subprocess.run(cmd, check=True)
            run = json.loads(out.read_text())
            runs.setdefault(method, {})[str(n)] = run
            if "unedited" in run:
                runs.setdefault("unedited", {}).setdefault(str(n), run["unedited"])
    # Runs of other edit counts finished earlier (e.g. only some methods had time for them).
    for out in sorted(WORK.glob("result-*-*.json")):
        method, n = out.stem.split("-")[1:]
        runs.setdefault(method, {}).setdefault(n, json.loads(out.read_text()))
    # Then those the committed results hold (a fresh clone has no work directory), each with
    # the date and machine of the file it was measured for unless it records its own.
    old, stamp = common.earlier_result(common.RESULTS / "baselines.json")
    for method, m in {**old.get("methods", {}), "unedited": old.get("unedited") or {}}.items():
        for n, run in m.get("runs", {}).items():
            runs.setdefault(method, {}).setdefault(n, {**stamp, **run})
    for item in args.meg:
        n, _, workdir = item.partition("=")
        runs.setdefault("meg", {})[n] = meg_run(Path(workdir))
    methods = {}
    for method, by_n in runs.items():
        methods[method] = {
            "score": {n: r["meg_protocol"].get("score") for n, r in by_n.items()},
            "classic_score": {n: r["classic"].get("score") for n, r in by_n.items()},
            "edit_seconds": {n: r.get("info", {}).get("edit_seconds") for n, r in by_n.items()},
            "peak_rss_mb": {n: r.get("peak_rss_mb_after_edit") for n, r in by_n.items()},
            "runs": by_n,
        }
    unedited = methods.pop("unedited", None)
    plot(methods, common.RESULTS / "baselines.png")
    result = {
        "what": "FT-L, MEMIT, AlphaEdit and MeG on SmolLM2-135M-Instruct (GGUF Q4_1, float32 "
        "compute), first n CounterFact edits of counterfact-edit.json, configs/baseline_smollm2.py "
        "and MeG's work directories given by --meg",
        "methods": methods,
        "unedited": unedited,
    }
    print(common.write_result("baselines", result))
    for method, m in methods.items():
        print(method, json.dumps(m["score"]), json.dumps(m["classic_score"]))


if __name__ == "__main__":
    main()

"""Edit quality on SmolLM2 over seeds: MeG as published, with DA, and the best configuration.

    python bench/quality.py [--n 256,1024] [--seeds 0,1,2] [--configs a,b,c] [--zsre [a,b,c]]
                            [--best KEY=VALUE ...] [--variant NAME=VARIANT]
                            [--override NAME:KEY=VALUE] [--workdir DIR] [--smoke]

Cells: each dataset and size (CounterFact edit split of ../shared/data with `--n` edits; with
`--zsre` also zsRE, 256 edits of zsre/zsre_mend_train-1k.json, its far end the pseudo-edits) times
each configuration (`--zsre a`: zsRE only for the configurations named):
  a  MeG as published: configs/smollm2_cf.py as it is (the project's SmolLM2 recipe: the
     reference's wherever it works on SmolLM2; its docstring says where not), DA off;
  b  with zero-weight augmentation: configs/smollm2_cf.py:da=1.0;
  c  the best configuration: configs/smollm2_cf.py with the `--best KEY=VALUE` overrides (any
     `--config.KEY=VALUE` of the pipeline; `--best --config.x=y` reads the same). Not run while
     no `--best` is given.
`--variant c=da=1.0` sets a configuration's variant string, `--override a:KEY=VALUE` adds an
override to any configuration. `--variant NAME=VARIANT` with another NAME (say `c2`) declares a
further candidate configuration, run when `--configs` names it: alternatives for (c) measured
side by side; `score_best` stays configuration c's.

Every cell runs its config once per seed (`meg_jax.pipeline.seeds.run_seeds`: `<cell>/seed-<s>`)
and reports mean, sample standard deviation (ddof=1, the paper's ±), min and max over the seeds
of the six readings and the Score (unedited and MeG), the empty pre-edit label share, MeG's
routing breakdown, and each run's wall time (`trained_s`: the stages this run computed itself,
as their records hold them; adopted stages count nothing, a resumed stage only its last part).

Resuming and sharing. Each cell's work directory is named by the cell and a hash of its config,
so a changed configuration (the generator preset's resolved settings included) gets a new
directory instead of a refused rerun. A finished cell's result is kept in `<workdir>/cells/` and
read back without touching the pipeline; an interrupted cell continues from its stages'
records. Stages that do not depend on the configuration's difference are adopted from earlier
cells (`run_seeds(donors=...)`): the edit set and the bank for every configuration and seed (the
256-edit bank is extended to 1,024, not refitted), the encoder per seed across configurations
and sizes.

bench/results/quality.json holds this invocation's cells and keeps every other cell the file
already had (each with the date and machine it was measured on), so cells can be measured on
different days: `score` (configuration a, CounterFact-1024, mean over seeds; null with
`score_note` when no run has that cell), `score_best` (configuration c, the same),
`empty_label_share` (the largest fraction over all runs), `targets`, `cells`, and quality.png
(mean ± std per reading and cell). `--smoke` runs a tiny random host (tests/tiny_run.py) through
the same code in seconds per run and writes `<workdir>/quality_smoke.json` instead.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from common import REPO, RESULTS, SHARED, earlier_result, write_result

from meg_jax.evaluation.evaluator import SIX
from meg_jax.infra.files import write_bytes_atomic, write_json_atomic
from meg_jax.infra.fingerprint import digest
from meg_jax.pipeline import load_config
from meg_jax.pipeline.cli import ConfigError, setup_logging, user_errors
from meg_jax.pipeline.generator import generator_settings
from meg_jax.pipeline.seeds import STD_KIND, run_seeds

CONFIG_FILE = "configs/smollm2_cf.py"
VARIANTS = {"a": "", "b": "da=1.0", "c": ""}
TARGETS = {
    "empty_label_share_max": 0.05,
    "score_a_min": 70.0,  # CounterFact-256 and -1024 (paper, GPT-J CF-1024: 69.68)
    "score_c_min": 80.0,  # (paper, GPT-J with DA: 85.76)
    "std_max": 2.0,
}
ZSRE = [
    "data.edits=zsre/zsre_mend_train-1k.json",
    "data.kind=zsre",
    # The pseudo-edits are the file's far end, less every subject of the edits (the pipeline's
    # pseudo split and its disjointness check): 1,000 records hold ~600 beyond 256 edits.
    "data.pseudo=zsre/zsre_mend_train-1k.json",
    "data.n_pseudo_pairs=400",
    "data.n_val_pairs=50",
    "data.n_calibration=128",
]
HEADLINE = (*SIX, "score")
SMOKE_CONFIG = '''"""bench/quality.py --smoke: tests/tiny_run.py's tiny run; `:da=R` turns DA on."""
import json

from meg_jax.infra.config import parse_arg


def get_config(arg=None):
    v = parse_arg(arg, da=0.0)
    c = json.loads({tree!r})
    c["generator"]["zero_augmentation"] = float(v.da)
    return c
'''


def _override_pair(text: str) -> str:
    text = text.removeprefix("--config.")
    if "=" not in text:
        raise SystemExit(f"error: override {text!r}: expected KEY=VALUE")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", default=None, help="CounterFact edit counts, e.g. 256,1024")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--configs", default=None, help="configurations to run: a,b,c")
    p.add_argument(
        "--zsre",
        nargs="?",
        const="",
        default=None,
        metavar="CONFIGS",
        help="also zsRE with 256 edits, for CONFIGS (default: those of --configs)",
    )
    p.add_argument("--best", action="append", default=[], help="KEY=VALUE override of config c")
    p.add_argument("--variant", action="append", default=[], help="NAME=VARIANT (config file)")
    p.add_argument("--override", action="append", default=[], help="NAME:KEY=VALUE")
    p.add_argument("--workdir", default=None, help="where the runs go (runs/bench_quality)")
    p.add_argument("--smoke", action="store_true", help="tiny random host: the code path only")
    # `--best --config.x=y`: argparse would read the value as an option, so take it as written.
    args = list(sys.argv[1:] if argv is None else argv)
    args = [f"--best={a}" if i and args[i - 1] == "--best" else a for i, a in enumerate(args)]
    args = [a for i, a in enumerate(args) if not (a == "--best" and i + 1 < len(args))]
    ns = p.parse_args(args)
    ns.n = [int(x) for x in (ns.n or ("4" if ns.smoke else "256,1024")).split(",") if x]
    ns.seeds = [int(x) for x in (ns.seeds or ("0,1" if ns.smoke else "0,1,2")).split(",") if x]
    ns.configs = [c for c in (ns.configs or ("a,b" if ns.smoke else "a,b,c")).split(",") if c]
    if ns.zsre is not None:
        ns.zsre = [c for c in ns.zsre.split(",") if c] or ns.configs
    named = {*VARIANTS, *(v.partition("=")[0] for v in ns.variant)}
    for flag, configs in (("--configs", ns.configs), ("--zsre", ns.zsre or [])):
        unknown = [c for c in configs if c not in named]
        if unknown:
            p.error(f"{flag}: unknown {unknown}; expected some of {sorted(named)} (--variant)")
    ns.workdir = Path(ns.workdir or REPO / "runs" / ("bench_quality" + "_smoke" * ns.smoke))
    return ns


def configurations(args) -> dict[str, dict]:
    """name -> {variant, overrides} (module docstring)."""
    out = {name: {"variant": VARIANTS[name], "overrides": []} for name in VARIANTS}
    for item in args.variant:
        name, _, variant = item.partition("=")
        if not name.isidentifier():
            raise SystemExit(f"error: --variant {item!r}: expected NAME=VARIANT")
        out[name] = {"variant": variant, "overrides": []}
    for item in args.override:
        name, _, pair = item.partition(":")
        if name not in out:
            raise SystemExit(f"error: --override {item!r}: expected NAME:KEY=VALUE")
        out[name]["overrides"].append(_override_pair(pair))
    out["c"]["overrides"] += [_override_pair(b) for b in args.best]
    return out


def smoke_config_file(workdir: Path, n: int) -> str:
    """A config file of the tiny run (host and given bank made once under `workdir`)."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_run import make_given_bank, make_tiny_host, tiny_run_config

    folder = workdir / "smoke"
    host, bank = folder / "host", folder / "bank.npz"
    if not (host / "config.json").is_file():
        host.mkdir(parents=True, exist_ok=True)
        make_tiny_host(host, SHARED)
    if not bank.is_file():
        make_given_bank(bank, SHARED, n)
    tree = tiny_run_config(SHARED, host, bank, folder / "unused", n)
    path = folder / "config.py"
    write_bytes_atomic(path, SMOKE_CONFIG.format(tree=json.dumps(tree)).encode("utf-8"))
    return str(path)


def cell_config(args, base_file: str, dataset: str, n: int, name: str, setup: dict):
    """(the cell's PipelineConfig, its work directory, its command line) or raises ConfigError."""
    spec = base_file + (f":{setup['variant']}" if setup["variant"] else "")
    pairs = [f"data.n_edits={n}", *(ZSRE if dataset == "zsre" else []), *setup["overrides"]]
    argv = ["--config", spec, *[f"--config.{p}" for p in pairs]]
    cfg, _ = load_config(argv)
    cell = f"{dataset}-{n}-{name}"
    # The generator's settings as its preset resolves them: a changed preset is a new cell, not
    # one read back from `cells/` (the pipeline's own stage identity holds them too).
    resolved = {**dataclasses.asdict(cfg), "workdir": ""}
    resolved["generator_settings"] = generator_settings(cfg.generator.build())
    key = digest(resolved)[:8]
    workdir = args.workdir / f"{cell}-{key}"
    # Every configuration and seed of a dataset and size compares with the same unedited model:
    # evaluated once (a location, so outside the cell's key).
    shared = dataclasses.replace(cfg.evaluation, unedited_cache=str(args.workdir / "unedited"))
    cfg = dataclasses.replace(cfg, workdir=str(workdir), evaluation=shared)
    return cfg, workdir, argv


def _stat(stat: dict | None) -> dict | None:
    return None if stat is None else {k: stat[k] for k in ("mean", "std", "min", "max", "n")}


def cell_result(result: dict) -> dict:
    """The cell's figures from `run_seeds`' aggregate (module docstring)."""
    r = result["readings"]
    runs = []
    for run in result["runs"]:
        stages = run["stages_s"]
        own = [s for s in stages if s not in run["adopted"]]
        runs.append(
            {
                "seed": run["seed"],
                "trained_s": sum(stages[s] or 0.0 for s in own),
                "stages_s": stages,
                "adopted": run["adopted"],
                "workdir": run["workdir"],
            }
        )
    return {
        "meg": {k: _stat(r.get(f"meg.{k}")) for k in (*HEADLINE, "loc_tf_self")},
        "unedited": {k: _stat(r.get(f"unedited.{k}")) for k in (*HEADLINE, "loc_tf_self")},
        "empty_label_share": _stat(r.get("unedited.empty_label_share")),
        "routing": {
            k.removeprefix("meg."): _stat(v)
            for k, v in r.items()
            if k.startswith(("meg.routing.", "meg.routed."))
        },
        "runs": runs,
        "wall_s_per_run": sum(x["trained_s"] for x in runs) / max(len(runs), 1),
    }


def checks(name: str, dataset: str, cell: dict) -> dict:
    """Which targets the cell meets (None: no target for it)."""
    score = cell["meg"]["score"]
    floor = {"a": TARGETS["score_a_min"], "c": TARGETS["score_c_min"]}.get(name)
    empty = cell["empty_label_share"]
    std = score["std"] if score else None
    return {
        "score": None if floor is None or dataset != "cf" or not score else score["mean"] >= floor,
        "std": None if std is None else std <= TARGETS["std_max"],
        "empty_labels": None if empty is None else empty["max"] <= TARGETS["empty_label_share_max"],
    }


def run_cell(args, base_file, dataset, n, name, setup) -> dict:
    """One cell: read back when finished earlier, else run over the seeds (resumable)."""
    label = f"{dataset}-{n}/{name}"
    try:
        cfg, workdir, argv = cell_config(args, base_file, dataset, n, name, setup)
    except ConfigError as err:
        return {"cell": label, "error": f"configuration: {err}"}
    saved = args.workdir / "cells" / f"{workdir.name}.json"
    head = {"cell": label, "dataset": dataset, "n": n, "config": name, "command": argv}
    if saved.is_file():
        done = json.loads(saved.read_text(encoding="utf-8"))
        if done.get("seeds") == args.seeds:
            print(f"{label}: done earlier ({saved})")
            return done
    donors = sorted(p.parent for p in args.workdir.glob("*/seed-*/config.json"))
    began = time.perf_counter()
    try:
        result = run_seeds(cfg, args.seeds, donors=donors)
    except user_errors() as err:  # bad input for this cell: say so and go on with the others
        return {**head, "error": f"{type(err).__name__}: {err}", "workdir": str(workdir)}
    cell = {
        **head,
        "workdir": str(workdir),
        "seeds": args.seeds,
        "bench_wall_s": time.perf_counter() - began,
        **cell_result(result),
    }
    cell["met"] = checks(name, dataset, cell)
    write_json_atomic(saved, cell)
    return cell


def summary(args, cells: dict, planned: list[str]) -> dict:
    def mean_of(label):
        cell = cells.get(label, {})
        score = cell.get("meg", {}).get("score") if "error" not in cell else None
        return None if score is None else score["mean"]

    shares = [c["empty_label_share"]["max"] for c in cells.values() if c.get("empty_label_share")]
    out = {
        "benchmark": "quality",
        "score": mean_of("cf-1024/a"),
        "score_best": mean_of("cf-1024/c"),
        "empty_label_share": max(shares) if shares else None,
        "std": STD_KIND,
        "targets": TARGETS,
        "seeds": args.seeds,
        "complete": all(label in cells and "error" not in cells[label] for label in planned),
        "cells": cells,
    }
    for key, label in (("score", "cf-1024/a"), ("score_best", "cf-1024/c")):
        if out[key] is None:
            why = cells.get(label, {}).get("error", "not measured yet")
            out[f"{key}_note"] = f"{label}: {why}"
    return out


def earlier_cells(path: Path) -> dict:
    """The cells of the results file at `path` (the committed one in a fresh clone), each
    stamped with that file's date and machine unless it records its own: kept beside this
    invocation's cells, so a run of some cells (say CounterFact-1024 on another day) does not
    drop the others. A cell run now replaces its earlier reading."""
    old, stamp = earlier_result(path)
    cells = old.get("cells", {})
    return {label: {**stamp, **cell} for label, cell in cells.items() if "error" not in cell}


def format_table(cells: dict) -> str:
    head = f"{'cell':14} | " + " | ".join(f"{k:>12}" for k in HEADLINE) + " | empty | min/run"
    lines = [head, "-" * len(head)]
    for label, cell in cells.items():
        if "error" in cell:
            lines.append(f"{label:14} | {cell['error'][:100]}")
            continue
        vals = []
        for k in HEADLINE:
            s = cell["meg"][k]
            std = f"±{s['std']:4.1f}" if s and s["std"] is not None else "     "
            vals.append(f"{s['mean']:7.2f}{std}" if s else f"{'-':>12}")
        empty = cell["empty_label_share"]
        share = f"{100 * empty['max']:4.1f}%" if empty else "   - "
        lines.append(
            f"{label:14} | " + " | ".join(vals) + f" | {share} | {cell['wall_s_per_run'] / 60:7.1f}"
        )
    return "\n".join(lines)


def plot(cells: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = {k: c for k, c in cells.items() if "error" not in c}
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(HEADLINE) * max(len(done), 1) / 3), 4))
    width = 0.8 / max(len(done), 1)
    for i, (label, cell) in enumerate(done.items()):
        stats = [cell["meg"][k] for k in HEADLINE]
        means = [s["mean"] if s else np.nan for s in stats]
        errs = [(s["std"] or 0.0) if s else 0.0 for s in stats]
        x = np.arange(len(HEADLINE)) + (i - (len(done) - 1) / 2) * width
        ax.bar(x, means, width, yerr=errs, capsize=2, label=label)
    ax.set_xticks(range(len(HEADLINE)), [k.replace("_", " ") for k in HEADLINE])
    ax.set_ylim(0, 105)
    ax.set_ylabel("% (MeG, mean ± sample std over seeds)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def main(argv=None):
    args = parse_args(argv)
    setup_logging(0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    setups = configurations(args)
    if args.smoke:
        base_file = smoke_config_file(args.workdir, max(args.n))
        if args.zsre is not None:
            print("--smoke: the tiny run's given bank is CounterFact's; zsRE is left out")
    else:
        base_file = str(REPO / CONFIG_FILE)
    plan = [("cf", n, args.configs) for n in args.n]
    if args.zsre is not None and not args.smoke:
        plan.append(("zsre", 256, args.zsre))
    out = args.workdir / "quality_smoke.json" if args.smoke else RESULTS / "quality.json"
    earlier = earlier_cells(out)
    cells, planned = {}, []
    result = summary(args, {**earlier, **cells}, planned)
    for dataset, n, names in plan:
        for name in names:
            label = f"{dataset}-{n}/{name}"
            if name == "c" and not setups["c"]["overrides"] and not setups["c"]["variant"]:
                print(f"== {label}: not run, no best configuration named (--best)")
                continue
            planned.append(label)
            print(f"== {label}")
            cells[label] = run_cell(args, base_file, dataset, n, name, setups[name])
            result = summary(args, {**earlier, **cells}, planned)
            # After every cell: an interrupted bench shows what it has, "complete": false.
            if args.smoke:
                write_json_atomic(out, result)
            else:
                write_result("quality", result)
            plot(result["cells"], out.with_suffix(".png"))
    print(format_table(result["cells"]))
    print(f"score (a, CF-1024) {result['score']}, best (c) {result['score_best']}; {out}")


if __name__ == "__main__":
    main()

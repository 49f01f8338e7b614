"""One config over several seeds: a run per seed, then mean and spread of every reading.

    run_seeds(cfg, [0, 1, 2])     -> <workdir>/seed-<s>/ (a full work directory each) and
                                     <workdir>/seeds.json, <workdir>/seeds.png, a printed table

The paper reports the mean of five runs with a ± that is the SAMPLE standard deviation (ddof=1);
`seeds.json` gives that (`std`), with min, max, n and the per-seed values of every numeric leaf of
the evaluation summaries (unedited and MeG: the six readings, Score, Loc TF on the model's own
tokens, routed shares, the routing breakdown, empty-label share, classic metrics when asked).

What a seed changes. Seed s runs the config with `seed = s` (the encoder's validation split, the
sampling noise of generated neurons) and every training stage's own seed moved by s: InfoNCE
shuffling (`encoder.infonce.seed`), the router's labels, initialisation and dropout
(`router.train.seed`), the generator's initialisation, noise and batches (its `train.seed`).
Seed 0 is therefore exactly the config as written. Collection keeps its seed: a fitted neuron is
a per-edit optimisation to a fixed target, so one bank serves every seed (below), which is also
what makes several seeds affordable; the spread measured is that of the query side and the
generator over one bank.

Work shared between runs. The stages whose inputs do not involve the seed (`edits`: the prepared
edits and the unedited model's answers; `collect`: the bank; and `encoder` for runs of the same
seed) are adopted from an earlier run instead of recomputed: the donor's finished stage folder
(its files, not its training checkpoints) is copied in, with its record, so the pipeline's own
fingerprint check then skips it, or extends it when the donor covered fewer edits. A donor is
only taken when the settings its stage reads (`STAGE_READS`, whole config sections, so erring
towards not sharing) are equal to the run's, and when the run's record, if any, is the same stage
on a subset of the donor's edits. Copying rather than pointing `collect.bank` at the first seed's
bank keeps every seed directory an ordinary, self-contained work directory with the same
collection lineage, which can also be extended with more edits later. The unedited model is
the same in every seed: it is evaluated once, by the first seed, and read by the others
(`evaluation.unedited_cache`, `<workdir>/unedited` unless the config names another folder).
"""

import copy
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from meg_jax.evaluation.evaluator import KINDS, SIX
from meg_jax.evaluation.report import LABELS
from meg_jax.infra.files import write_bytes_atomic, write_json_atomic
from meg_jax.infra.fingerprint import RECORD, StageRecord
from meg_jax.pipeline.config import STAGES, PipelineConfig
from meg_jax.pipeline.run import run

log = logging.getLogger("meg_jax.pipeline")

STD_KIND = "sample standard deviation (ddof=1), the paper's ± over its runs; null when n < 2"

# What each shareable stage reads: (config prefixes included, prefixes left out), over dotted
# field names. Whole sections, so this is a superset of what the stage fingerprints: a field
# added to a section later counts as a difference, and sharing is then skipped, never wrongly
# taken. Left out: fields the stage provably ignores (the pseudo-edits for the edit set and the
# bank; `n_edits` for the encoder, whose pseudo split does not move with it, and for the bank,
# which is prefix-stable and extended, see `_compatible`).
# The unedited evaluation's cache is a location (`run_seeds` sets one per call).
_PSEUDO = ("data.pseudo", "data.n_pseudo_pairs", "data.n_val_pairs", "data.n_calibration")
_WHERE = ("evaluation.unedited_cache",)
STAGE_READS = {
    "edits": (("editor", "host", "data", "evaluation"), (*_PSEUDO, *_WHERE)),
    "encoder": (("seed", "editor", "host", "encoder", "data", "router.calibrate"),
                ("data.n_edits",)),
    "collect": (("editor", "host", "collect", "data", "evaluation"),
                (*_PSEUDO, *_WHERE, "data.n_edits")),
}  # fmt: skip
ADOPTED = "adopted.json"  # per seed directory: which stages came from which donor


def seed_workdir(workdir: str | Path, seed: int) -> Path:
    return Path(workdir) / f"seed-{seed}"


def seed_config(cfg: PipelineConfig, seed: int) -> PipelineConfig:
    """`cfg` for seed `seed`: its own work directory, `seed`, and each training stage's seed
    moved by `seed` (module docstring); collection is left as it is."""
    infonce = cfg.encoder.infonce
    train = cfg.router.train
    overrides = copy.deepcopy(dict(cfg.generator.overrides))
    overrides["train"] = {
        **dict(overrides.get("train", {})),
        "seed": cfg.generator.build().train.seed + seed,
    }
    return dataclasses.replace(
        cfg,
        workdir=str(seed_workdir(cfg.workdir, seed)),
        seed=seed,
        encoder=dataclasses.replace(
            cfg.encoder, infonce=dataclasses.replace(infonce, seed=infonce.seed + seed)
        ),
        router=dataclasses.replace(
            cfg.router, train=dataclasses.replace(train, seed=train.seed + seed)
        ),
        generator=dataclasses.replace(cfg.generator, overrides=overrides),
    )


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _compatible(stage: str, donor_cfg: dict, cfg: dict) -> bool:
    include, exclude = STAGE_READS[stage]
    # Compared as the donor's config.json holds it: JSON has lists where the dataclasses have
    # tuples (e.g. `collect.fit.context_seeds`).
    mine, theirs = _leaves(json.loads(json.dumps(cfg))), _leaves(donor_cfg)
    for name in set(mine) | set(theirs):
        if _under(name, include) and not _under(name, exclude):
            if mine.get(name, "<absent>") != theirs.get(name, "<absent>"):
                return False
    # Collection is prefix-stable in the edits: a donor with fewer edits is extended, one with
    # more could not be used (its record would cover edits this run does not have).
    return stage != "collect" or donor_cfg["data"]["n_edits"] <= cfg["data"]["n_edits"]


def _copy_atomic(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def adopt_stage(stage: str, donor: Path, workdir: Path, cfg: dict) -> bool:
    """Copies `donor`'s finished `stage` into `workdir` when it is usable there (module
    docstring); True when it did. `cfg` is the run's config as a dict."""
    donor_cfg_path = donor / "config.json"
    record = StageRecord.read(donor / stage)
    if record is None or not record.finished or not donor_cfg_path.is_file():
        return False
    if not _compatible(stage, json.loads(donor_cfg_path.read_text(encoding="utf-8")), cfg):
        return False
    mine = StageRecord.read(workdir / stage)
    if mine is not None:
        have, offered = set(mine.inputs.items), set(record.inputs.items)
        if (
            mine.inputs.lineage != record.inputs.lineage
            or not have <= offered
            or (mine.finished and have == offered)
        ):
            return False
    folder = workdir / stage
    folder.mkdir(parents=True, exist_ok=True)
    # The record goes last: a copy cut short leaves no record, so the stage simply runs.
    (folder / RECORD).unlink(missing_ok=True)
    for path in sorted((donor / stage).iterdir()):
        if path.is_file() and path.name != RECORD and not path.name.endswith(".tmp"):
            _copy_atomic(path, folder / path.name)
    _copy_atomic(donor / stage / RECORD, folder / RECORD)
    adopted = _read_json(workdir / ADOPTED)
    adopted[stage] = {"from": str(donor), "fingerprint": record.inputs.fingerprint}
    write_json_atomic(workdir / ADOPTED, adopted)
    log.info("seeds: %s of %s adopted from %s", stage, workdir, donor)
    return True


def adopt_shared(workdir: Path, cfg: dict, donors: Iterable[Path]) -> list[str]:
    """Adopts every shareable stage from the best usable donor (most edits); returns which."""
    done, donors = [], [d for d in donors if Path(d).resolve() != Path(workdir).resolve()]
    for stage in STAGE_READS:

        def size(d: Path, stage=stage) -> int:
            r = StageRecord.read(d / stage)
            return len(r.inputs.items) if r is not None else -1

        for donor in sorted(donors, key=size, reverse=True):
            if adopt_stage(stage, Path(donor), workdir, cfg):
                done.append(stage)
                break
    return done


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def stage_walls(workdir: Path) -> tuple[dict, list[str]]:
    """({stage: wall seconds of the run that finished it}, stages whose record is adopted)."""
    walls, adopted = {}, []
    marks = _read_json(workdir / ADOPTED)
    found = {p.parent.name for p in workdir.glob(f"*/{RECORD}")}  # a baseline's stages too
    order = [s for s in STAGES if s in found] + sorted(found - set(STAGES))
    for stage in order:
        record = StageRecord.read(workdir / stage)
        walls[stage] = record.wall_s
        if marks.get(stage, {}).get("fingerprint") == record.inputs.fingerprint:
            adopted.append(stage)
    return walls, adopted


def flatten(summary: dict, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a nested summary under its dotted path (booleans and None left out)."""
    out = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_):
            out[name] = float(value)
    return out


def aggregate(per_seed: Sequence[dict]) -> dict[str, dict]:
    """{dotted reading: mean, std (sample), min, max, n, values (one per run, null where the run
    has no such reading)} over the runs' summaries, readings in order of first appearance."""
    flat = [flatten(s) for s in per_seed]
    names = list(dict.fromkeys(k for f in flat for k in f))
    out = {}
    for name in names:
        values = [f.get(name) for f in flat]
        x = np.asarray([v for v in values if v is not None], np.float64)
        out[name] = {
            "mean": float(x.mean()),
            "std": float(x.std(ddof=1)) if x.size > 1 else None,
            "min": float(x.min()),
            "max": float(x.max()),
            "n": int(x.size),
            "values": values,
        }
    return out


def _cell(stat: dict | None, scale: float = 1.0) -> str:
    if stat is None:
        return f"{'-':>13}"
    std = stat["std"]
    spread = f"±{scale * std:5.2f}" if std is not None else "      "
    return f"{scale * stat['mean']:7.2f}{spread}"


def format_seeds_table(readings: dict, seeds: Sequence[int]) -> str:
    """Mean ± sample std per model of the six readings and the Score; routing and empty labels."""
    cols = [*SIX, "score"]
    names = {**LABELS, "score": "Score"}
    head = f"{'':9} | " + " | ".join(f"{names[k]:>13}" for k in cols)
    lines = [f"{len(seeds)} seeds {list(seeds)}: mean ± sample std", head, "-" * len(head)]
    for model in ("unedited", "meg"):
        cells = " | ".join(_cell(readings.get(f"{model}.{k}")) for k in cols)
        lines.append(f"{model:9} | {cells}")
    routed = [f"{k} {_cell(readings.get(f'meg.routed.{k}'), 100).strip()}%" for k in KINDS]
    lines.append("routed (MeG): " + ", ".join(routed))
    empty = readings.get("unedited.empty_label_share")
    if empty is not None:
        lines.append(f"empty pre-edit locality labels: at most {100 * empty['max']:.1f}%")
    return "\n".join(lines)


def plot_seeds(readings: dict, path: Path, title: str) -> None:
    """PNG: mean ± sample std bars of the readings (unedited beside MeG) and MeG's routing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(ax, keys, label, offset, width, color, scale=1.0):
        stats = [readings.get(k) for k in keys]
        means = [scale * s["mean"] if s else np.nan for s in stats]
        errs = [scale * (s["std"] or 0.0) if s else 0.0 for s in stats]
        x = np.arange(len(keys)) + offset
        ax.bar(x, means, width, yerr=errs, capsize=3, label=label, color=color)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), width_ratios=(8, 9))
    cols = [*SIX, "score"]
    for i, (model, color) in enumerate((("unedited", "#8c8c8c"), ("meg", "#4c72b0"))):
        bars(left, [f"{model}.{k}" for k in cols], model, (i - 0.5) * 0.4, 0.4, color)
    left.set_xticks(range(len(cols)), [{**LABELS, "score": "Score"}[k] for k in cols])
    left.set_ylim(0, 105)
    left.set_ylabel("% (mean ± sample std)")
    left.legend(fontsize=8)
    parts = (
        ("routed", "share routed", "#55a868", 100.0),
        ("ag_when_routed", "AG when routed", "#4c72b0", 1.0),
        ("ag_when_not_routed", "AG when not routed", "#c44e52", 1.0),
    )
    for i, (part, label, color, scale) in enumerate(parts):
        keys = [f"meg.routing.{k}.{part}" for k in KINDS]
        bars(right, keys, label, (i - 1) * 0.27, 0.27, color, scale)
    right.set_xticks(range(len(KINDS)), [k.capitalize() for k in KINDS])
    right.set_ylim(0, 105)
    right.set_title("MeG routing breakdown", fontsize=9)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def run_seeds(cfg: PipelineConfig, seeds: Sequence[int], donors: Iterable[Path] = ()) -> dict:
    """Runs (or resumes, or skips) `cfg` once per seed, evaluates each, and writes the aggregate
    to `<workdir>/seeds.json` and `seeds.png`; returns what it wrote.

    `donors`: other work directories whose seed-free stages may be adopted (module docstring);
    every earlier seed of this call is one already.
    """
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ValueError("run_seeds: no seeds given")
    if cfg.stage not in ("all", "evaluation"):
        raise ValueError(f"run_seeds: stage {cfg.stage!r}: seeds need the evaluation's readings")
    root, donors, runs, summaries = Path(cfg.workdir), list(donors), [], []
    if not cfg.evaluation.unedited_cache:  # evaluated by the first seed, read by the others
        shared = dataclasses.replace(cfg.evaluation, unedited_cache=str(root / "unedited"))
        cfg = dataclasses.replace(cfg, evaluation=shared)
    for seed in seeds:
        scfg = seed_config(cfg, seed)
        workdir = Path(scfg.workdir)
        adopted = adopt_shared(workdir, dataclasses.asdict(scfg), donors)
        log.info("seeds: seed %d in %s, adopted: %s", seed, workdir, ", ".join(adopted) or "none")
        began = time.perf_counter()
        summary = run(scfg, evaluate=True)
        wall = time.perf_counter() - began
        walls, shared = stage_walls(workdir)
        runs.append(
            {
                "seed": seed,
                "workdir": str(workdir),
                "wall_s": wall,  # this call's: small when the run was finished before
                "stages_s": walls,  # each stage's finishing run, as its record holds it
                "adopted": shared,  # stages whose work was done in another run
            }
        )
        summaries.append(summary)
        donors.append(workdir)
    readings = aggregate(summaries)
    result = {"seeds": seeds, "std": STD_KIND, "runs": runs, "readings": readings}
    write_json_atomic(root / "seeds.json", result)
    plot_seeds(readings, root / "seeds.png", f"{root}: {len(seeds)} seeds {seeds}")
    print(format_seeds_table(readings, seeds))
    log.info("seeds: aggregate written to %s", root / "seeds.json")
    return result

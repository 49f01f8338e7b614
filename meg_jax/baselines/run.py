"""One entry point for every weight-editing baseline: records in, edited parameters out.

Editing wall time excludes the key statistics, which are computed once per host and layer set
and cached (`stats.key_moments`); `info` reports both.

MEMIT and AlphaEdit fit the same target values z for a batch edited from the unedited host
(MEMIT's single batch, AlphaEdit's first), so those are cached beside the statistics
(`targets-<key>.npz`, the key hashing the host id, the layer, the target settings and every
token row they are fitted on) and the second method reads them back. `info["edit_seconds"]`
stays the method's cost when run alone: it includes the fitting time recorded with cached
targets (`targets_from_cache` says which batches were read, `wall_seconds` what this call took).
"""

import dataclasses
import time
from pathlib import Path

import numpy as np

from meg_jax.baselines.alphaedit import AlphaEditConfig, alphaedit, null_space_projector
from meg_jax.baselines.edited_host import row_batches
from meg_jax.baselines.ft import FTConfig, fine_tune
from meg_jax.baselines.memit import MemitConfig, memit, optimize_targets
from meg_jax.baselines.requests import edit_rows, kl_rows, text_edits
from meg_jax.baselines.stats import StatsConfig, key_moments
from meg_jax.data.templates import PromptTemplate
from meg_jax.inference.runner import ModelRunner
from meg_jax.infra.config import dataclass_from_dict
from meg_jax.infra.files import write_npz_atomic
from meg_jax.infra.fingerprint import digest
from meg_jax.models.neuron import Neuron

METHODS = ("ft", "memit", "alphaedit")
CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")  # MEMIT's context openings


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """The `baseline` section of a config file: every method's settings; which method runs is
    the pipeline's `editor` (ft | memit | alphaedit), the argument of `run_baseline`."""

    prompt: str = "template"  # "template": fit the query as evaluated; "raw": ROME's prompt
    # Names the weights in the statistics cache key ("": the pipeline's host id).
    host_id: str = ""
    # Where the key statistics are cached ("": <workdir>/stats); runs of one host may share it.
    stats_dir: str = ""
    ft: FTConfig = FTConfig()
    memit: MemitConfig = MemitConfig()
    alphaedit: AlphaEditConfig = AlphaEditConfig()
    stats: StatsConfig = StatsConfig()
    retrain: bool = False  # the pipeline's stage flag: edit again although the inputs changed

    def __post_init__(self):
        if self.prompt not in ("template", "raw"):
            raise ValueError(
                f"config.baseline.prompt: expected template or raw, got {self.prompt!r}"
            )

    def edited_layers(self, method: str) -> tuple[int, ...]:
        """The layers whose MLP output kernel `method` changes."""
        return (self.ft.layer,) if method == "ft" else tuple(sorted(self.memit.layers))

    def fingerprint(self, method: str) -> dict:
        """The settings `method`'s result depends on (not where caches live, not the other
        methods' sections): the pipeline's stage inputs."""
        out: dict = {"method": method, "prompt": self.prompt}
        if method == "ft":
            return out | {"ft": dataclasses.asdict(self.ft)}
        stats = dataclasses.asdict(self.stats)
        for where in ("data_dir", "save_every"):  # a location and a progress cadence
            stats.pop(where)
        out |= {"memit": dataclasses.asdict(self.memit), "stats": stats}
        if method == "alphaedit":
            out["alphaedit"] = dataclasses.asdict(self.alphaedit)
        return out


def baseline_config(mapping) -> BaselineConfig:
    """`BaselineConfig` from a config's `baseline` ConfigDict (unknown keys are errors)."""
    return dataclass_from_dict(BaselineConfig, mapping, "baseline")


def context_prefixes(host, n: int, tokens: int) -> list[str]:
    """MEMIT's context prefixes: the unedited model's continuation of short openings (greedy
    here, so reruns agree; MEMIT samples), braces removed, one line each."""
    if n <= 0:
        return []
    seeds = [CONTEXT_SEEDS[i % len(CONTEXT_SEEDS)] for i in range(min(n, len(CONTEXT_SEEDS)))]
    runner = ModelRunner(
        host.config, host.params, host.tokenizer, batch_size=8, show_progress=False
    )
    zero = np.zeros((len(seeds), host.config.d_model), np.float32)
    neurons = Neuron(zero, np.zeros(len(seeds), np.float32), zero)
    texts = runner.generate(seeds, neurons, tokens)
    out = []
    for seed, text in zip(seeds, texts, strict=True):
        text = (seed + text).replace("{", " ").replace("}", " ").replace("\n", " ").strip()
        out.append(" ".join(text.split()))
    return out


def fitted_targets(
    config, params, rows, kl, n_edits: int, layer: int, cfg, cache: Path | None, tag
):
    """(z [E, D], fit statistics with "seconds" and "from_cache") of `optimize_targets`, read
    from `cache` when a run with the same `tag` (host id), layer, settings and rows fitted them;
    `cache=None` always fits (the host is no longer the unedited one)."""
    path = None
    if cache is not None:
        material = [tag, layer, cfg, dataclasses.astuple(rows), dataclasses.astuple(kl)]
        path = cache / f"targets-{digest(material)[:16]}.npz"
        if path.is_file():
            with np.load(path) as data:
                fit = {"target_nll_mean": float(data["nll"]), "seconds": float(data["seconds"])}
                return data["zs"], fit | {"from_cache": True}
    start = time.perf_counter()
    zs, fit = optimize_targets(config, params, rows, kl, n_edits, layer, cfg)
    fit |= {"seconds": time.perf_counter() - start, "from_cache": False}
    if path is not None:
        write_npz_atomic(path, zs=zs, nll=fit["target_nll_mean"], seconds=fit["seconds"])
    return zs, fit


def run_baseline(
    method: str, host, records, template: PromptTemplate, cfg: BaselineConfig, workdir
):
    """(edited parameters, info) of `method` applied to `records` on `host` (config, params,
    tokenizer). The key statistics are cached in `cfg.stats_dir`, else `workdir`/stats."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; expected one of {METHODS}")
    config, params, tokenizer = host
    edits = text_edits(records, template, cfg.prompt)
    info: dict = {"method": method, "n_edits": len(edits)}
    if method == "ft":
        rows, missing = edit_rows(tokenizer, edits, [""])
        start = time.perf_counter()
        params, extra = fine_tune(config, params, rows, cfg.ft)
        info.update(extra, edit_seconds=time.perf_counter() - start, subject_missing=missing)
        return params, info

    layers = tuple(sorted(cfg.memit.layers))
    start = time.perf_counter()
    cache = Path(cfg.stats_dir) if cfg.stats_dir else Path(workdir) / "stats"
    moments = key_moments(config, params, tokenizer, layers, cfg.stats, cache, cfg.host_id)
    info["stats_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    targets = cfg.memit.targets
    contexts = [""] + context_prefixes(host, targets.n_contexts, targets.context_tokens)
    info["contexts"] = contexts
    if method == "memit":
        batches = [list(range(len(edits)))]
    else:
        size = cfg.alphaedit.batch_size or len(edits)
        batches = list(row_batches(len(edits), size))
        projectors = {
            l: null_space_projector(moments[l], cfg.alphaedit.nullspace_threshold) for l in layers
        }
        caches = {l: np.zeros_like(moments[l]) for l in layers}
        info["null_space_dims"] = {l: int(round(np.trace(p))) for l, p in projectors.items()}
    info["target_nll_mean"], info["subject_missing"], info["update_norms"] = [], 0, []
    info["targets_from_cache"], cached_seconds = [], 0.0
    for number, batch in enumerate(batches):
        part = [edits[i] for i in batch]
        rows, missing = edit_rows(tokenizer, part, contexts)
        bare, _ = edit_rows(tokenizer, part, [""])
        zs, fit = fitted_targets(
            config,
            params,
            rows,
            kl_rows(tokenizer, part),
            len(part),
            layers[-1],
            targets,
            cache if number == 0 else None,  # later batches start from an edited host
            cfg.host_id,
        )
        info["targets_from_cache"].append(fit["from_cache"])
        cached_seconds += fit["seconds"] if fit["from_cache"] else 0.0
        if method == "memit":
            params, upd = memit(config, params, rows, bare, zs, moments, cfg.memit)
        else:
            params, caches, upd = alphaedit(
                config, params, rows, bare, zs, projectors, caches, cfg.memit, cfg.alphaedit
            )
        info["target_nll_mean"].append(fit["target_nll_mean"])
        info["update_norms"].append(upd["update_norms"])
        info["subject_missing"] += missing
    info["wall_seconds"] = time.perf_counter() - start
    info["edit_seconds"] = info["wall_seconds"] + cached_seconds
    return params, info

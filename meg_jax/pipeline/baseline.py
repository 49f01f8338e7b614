"""Stage "baseline": a weight-editing baseline (FT-L, MEMIT or AlphaEdit) edits the host.

With `editor` = ft | memit | alphaedit this stage replaces MeG's encoder, router, collect and
generator stages: edits -> baseline -> evaluation. Its artefact is what the method changed, the
MLP output kernel of the edited layers (`EditedLayers`, `baseline/edited_layers.msgpack`, written
atomically), beside `baseline/info.json` (editing wall time, target fit, update norms). The key
statistics MEMIT and AlphaEdit need are cached in `baseline.stats_dir` (default
`baseline/stats/`), computed once and resumable (`meg_jax.baselines.stats`).

Its inputs are the method's own settings (`BaselineConfig.fingerprint`), the host and the edits.
A rerun on the same inputs reads the result back; changed settings are refused unless
`baseline.retrain`. A larger edit set (or an unfinished run) is edited again from the unedited
host: the methods edit in one batch (AlphaEdit's sequential batches are within one run), and
with the statistics cached only the editing itself is redone.
"""

import dataclasses
import json

import numpy as np

from meg_jax.baselines.edited_host import out_proj
from meg_jax.baselines.run import run_baseline
from meg_jax.inference.edited_model import EDITED_LAYERS, EditedLayers
from meg_jax.inference.editor import zero_editor
from meg_jax.infra.files import write_json_atomic
from meg_jax.infra.fingerprint import StageInputs
from meg_jax.pipeline.context import RunContext, log
from meg_jax.pipeline.edits import EditSet
from meg_jax.pipeline.evaluation import EditorUnderTest

LABELS = {"ft": "FT-L", "memit": "MEMIT", "alphaedit": "AlphaEdit"}


def _plain(value):
    """JSON-able numbers and lists from numpy scalars and arrays (for info.json)."""
    return np.asarray(value).tolist()


def run_baseline_stage(ctx: RunContext, edits: EditSet) -> tuple[EditedLayers, str]:
    """(the edited layers, this stage's lineage id): edited now, or read back."""
    cfg, method = ctx.cfg, ctx.cfg.editor
    b = cfg.baseline
    inputs = StageInputs(
        config=b.fingerprint(method),
        upstream={"host": ctx.host_id, "template": cfg.host.template},
        items=edits.items,
    )
    stage = ctx.stage("baseline", inputs, b.retrain)
    path = ctx.workdir / EDITED_LAYERS
    if stage.skip and path.is_file():
        edited = EditedLayers.load(path)
        stage.report(f"{LABELS[method]}, {len(edits.records)} edits")
        return edited, inputs.lineage
    stage.start()
    host = ctx.host()
    run_cfg = dataclasses.replace(b, host_id=b.host_id or ctx.host_id)
    params, info = run_baseline(
        method, host, list(edits.records), ctx.template, run_cfg, stage.folder
    )
    kernel = f"layers/mlp/{out_proj(host.config)}/kernel"
    edited = EditedLayers.between(host.params, params, kernel, b.edited_layers(method))
    if edited.same_as(host.params):  # e.g. the last edited layer is the host's last layer
        log.warning("baseline: %s changed no weight; the edited model is the unedited one", method)
    edited.save(path)
    info = json.loads(json.dumps(info, default=_plain))
    write_json_atomic(stage.folder / "info.json", info)
    summary = {
        "method": method,
        "n_edits": len(edits.records),
        "layers": list(edited.layers),
        "edit_seconds": info.get("edit_seconds"),
        "stats_seconds": info.get("stats_seconds"),
    }
    stage.finish(summary, f"{LABELS[method]}, {len(edits.records)} edits")
    return edited, inputs.lineage


def baseline_under_test(ctx: RunContext, edited: EditedLayers) -> EditorUnderTest:
    """The evaluation's edited model: the host with `edited` applied, run with the zero neuron."""
    method = ctx.cfg.editor

    def load():
        host = ctx.host()
        return zero_editor(host.config.d_model), edited.apply(host.params)

    label = f"edited model ({LABELS[method]})"
    return EditorUnderTest(method, label, load, (ctx.workdir / EDITED_LAYERS,))

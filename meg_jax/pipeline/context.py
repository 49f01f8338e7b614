"""What every stage of one run shares: settings, work directory, mesh, and models loaded once.

The host LLM and the base encoder are loaded on first use, so a run whose stages are all
finished loads only what evaluation needs, and a run of one stage only what that stage needs.
`StageRun` is the bookkeeping every stage does the same way: decide from the recorded inputs
(skip / resume / extend / fresh, `meg_jax.infra.fingerprint`), mark the start, mark the end,
and print the stage's one summary line.
"""

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from jax.sharding import Mesh

from meg_jax.checkpoints.hosts import Host, encoder_path, load_host
from meg_jax.data.templates import PromptTemplate, get_template
from meg_jax.encoder.text_encoder import TextEncoder
from meg_jax.inference.edited_model import EditorManifest, host_shardings
from meg_jax.inference.runner import ModelRunner
from meg_jax.infra.distributed import barrier, is_main_process
from meg_jax.infra.fingerprint import (
    StageInputs,
    StageInputsChanged,
    StageRecord,
    Verdict,
    decide,
)
from meg_jax.infra.sharding import make_mesh
from meg_jax.pipeline.config import PipelineConfig

log = logging.getLogger("meg_jax.pipeline")


class StageNotReady(RuntimeError):
    """A stage that was not asked to run has no finished artefact for this run's inputs."""


@dataclasses.dataclass
class RunContext:
    cfg: PipelineConfig
    workdir: Path
    mesh: Mesh
    template: PromptTemplate
    _host: Host | None = None
    _runner: ModelRunner | None = None
    _encoder: TextEncoder | None = None

    @staticmethod
    def create(cfg: PipelineConfig) -> "RunContext":
        workdir = Path(cfg.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        return RunContext(
            cfg, workdir, make_mesh(cfg.mesh_data, cfg.mesh_model), get_template(cfg.host.template)
        )

    @property
    def host_id(self) -> str:
        """Names the host and how it is run (part of every model-dependent fingerprint)."""
        h = self.cfg.host
        return f"{h.name}:{h.dtype}:layer{h.neuron_layer}:{h.neuron_activation}"

    def host(self) -> Host:
        if self._host is None:
            kwargs = self.cfg.host.load_kwargs()
            name = kwargs.pop("name")
            self._host = load_host(name, shardings_fn=host_shardings(self.mesh), **kwargs)
        return self._host

    def runner(self) -> ModelRunner:
        if self._runner is None:
            host = self.host()
            self._runner = ModelRunner(
                host.config,
                host.params,
                host.tokenizer,
                mesh=self.mesh,
                batch_size=self.cfg.evaluation.batch_size,
            )
        return self._runner

    def base_encoder(self) -> TextEncoder:
        """The encoder as loaded (untuned top layers), in the raw-query view."""
        if self._encoder is None:
            enc = self.cfg.encoder
            self._encoder = TextEncoder.from_pretrained(
                encoder_path(enc.path),
                n_top_layers=enc.n_top_layers,
                mesh=self.mesh,
                batch_size=enc.batch_size,
            )
        return self._encoder

    def manifest(self) -> EditorManifest:
        """What `load_editor` needs to rebuild this run's edited model."""
        cfg = self.cfg
        return EditorManifest(
            host=cfg.host.load_kwargs(),
            template=cfg.host.template,
            encoder=cfg.encoder.path,
            encoder_top_layers=cfg.encoder.n_top_layers,
            seed=cfg.seed,
            router=cfg.router.enabled,
            encoder_batch_size=cfg.encoder.batch_size,
            editor=cfg.editor,
        )

    def stage(
        self, name: str, inputs: StageInputs, retrain: bool, derived: bool = False
    ) -> "StageRun":
        """The bookkeeping of stage `name` with these inputs (raises if it cannot proceed).

        A `derived` stage (evaluation) trains nothing: when its inputs change it is simply
        computed again rather than refused.
        """
        folder = self.workdir / name
        wanted = self.cfg.stage in ("all", name)
        try:
            verdict = decide(name, folder, inputs, retrain=retrain and wanted)
        except StageInputsChanged:
            if not derived:
                raise
            verdict = "fresh"
        if not wanted and verdict != "skip":
            raise StageNotReady(
                f"stage {name!r} has no finished result in {folder} for this run's inputs "
                f"({verdict}); run it first: --config.stage={name} (or every stage: "
                "--config.stage=all)"
            )
        return StageRun(name, folder, inputs, verdict, retrain=retrain and wanted)


@dataclasses.dataclass
class StageRun:
    name: str
    folder: Path
    inputs: StageInputs
    verdict: Verdict
    retrain: bool = False
    began: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def run_dir(self) -> Path:
        """Training state of this input set: a resume can only continue the same inputs."""
        return self.folder / "runs" / self.inputs.fingerprint

    @property
    def skip(self) -> bool:
        return self.verdict == "skip"

    def start(self) -> None:
        """Records the inputs as unfinished (a retrain clears an earlier run of the same inputs)."""
        if self.retrain and self.run_dir.exists():
            barrier(f"before retrain {self.run_dir}")  # no process still reading it
            if is_main_process():  # one process deletes; the others wait (infra.distributed)
                shutil.rmtree(self.run_dir)
            barrier(f"retrain {self.run_dir}")
        self.folder.mkdir(parents=True, exist_ok=True)
        StageRecord(self.name, self.inputs, finished=False).write(self.folder)

    def finish(self, summary: dict, figure: str = "") -> None:
        wall = time.perf_counter() - self.began
        StageRecord(self.name, self.inputs, True, summary, wall).write(self.folder)
        self.report(figure)

    def summary(self) -> dict:
        record = StageRecord.read(self.folder)
        return record.summary if record is not None else {}

    def report(self, figure: str = "") -> None:
        """The stage's one line: name, what happened, wall time, its key figure."""
        seconds = time.perf_counter() - self.began
        what = {
            "skip": "done earlier",
            "resume": "resumed",
            "extend": "extended",
            "fresh": "ran",
        }
        log.info("%-10s %-12s %7.1f s  %s", self.name, what[self.verdict], seconds, figure)

"""The run's settings: one frozen dataclass per stage, one `PipelineConfig` holding them.

A config file (`configs/*.py`) returns an ml_collections `ConfigDict`; `pipeline_config` turns it
into these dataclasses, strict about unknown keys, and every value is checked here, before any
model is loaded. Every stage section has `retrain`: redo that stage from scratch although its
recorded inputs differ (see `meg_jax.infra.fingerprint`).
"""

import dataclasses

from meg_jax.baselines.run import METHODS as BASELINE_METHODS
from meg_jax.baselines.run import BaselineConfig
from meg_jax.collect.stage import CollectConfig
from meg_jax.data.rephrases import REPHRASE_MODES
from meg_jax.data.templates import TEMPLATES
from meg_jax.diffusion.config import GeneratorConfig, generator_config
from meg_jax.encoder.train import InfoNCEConfig
from meg_jax.evaluation.evaluator import EvalConfig
from meg_jax.infra.config import dataclass_from_dict
from meg_jax.models.config import NEURON_ACTIVATIONS
from meg_jax.router.calibrate import CalibrationConfig
from meg_jax.router.train import RouterTrainConfig

STAGES = ("edits", "encoder", "router", "collect", "generator", "evaluation")
# A weight-editing baseline (`editor` ft | memit | alphaedit) runs these instead of MeG's.
BASELINE_STAGES = ("edits", "baseline", "evaluation")
EDITORS = ("meg", *BASELINE_METHODS)
DATASET_KINDS = ("counterfact", "zsre")
DTYPES = ("float32", "bfloat16", "float16")


def _require(ok: bool, field: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"config.{field}: expected {expected}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class HostConfig:
    """The frozen LLM: a registered name ("smollm2"), a HF directory or a .gguf file."""

    name: str = "smollm2"
    neuron_layer: int = 14
    neuron_activation: str = "identity"
    dtype: str = "float32"
    template: str = "smollm2"

    def __post_init__(self):
        _require(bool(self.name), "host.name", "a host name or path", self.name)
        _require(
            self.neuron_layer >= 0, "host.neuron_layer", "a layer index >= 0", self.neuron_layer
        )
        _require(self.dtype in DTYPES, "host.dtype", f"one of {DTYPES}", self.dtype)
        acts = NEURON_ACTIVATIONS
        _require(
            self.neuron_activation in acts,
            "host.neuron_activation",
            f"one of {acts}",
            self.neuron_activation,
        )
        _require(
            self.template in TEMPLATES,
            "host.template",
            f"one of {sorted(TEMPLATES)}",
            self.template,
        )

    def load_kwargs(self) -> dict:
        """`load_host`'s name and overrides (what `editor.json` records)."""
        return {
            "name": self.name,
            "neuron_layer": self.neuron_layer,
            "neuron_activation": self.neuron_activation,
            "dtype": self.dtype,
        }


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The edit set and the disjoint pseudo-edit set (for the encoder and router calibration).

    `edits` and `pseudo` are resolved by `meg_jax.data.locate`: a path, a file under the data
    directory ($MEG_JAX_DATA or ../shared/data), or a dataset name downloaded once. Either may
    name several files joined by "+" (`zsre/zsre_mend_eval.json+zsre/zsre_mend_train_10000.json`,
    the paper's zsRE): they are merged in order, ids kept unique (`meg_jax.data.sources`), and
    MeG's preprocessing (dedup by subject, the wrong-answer filter) runs on the merged records.
    `add` names a second edit file whose records are edited too, after those of `edits`: the
    way to extend a trained work directory with new facts (so is a larger `n_edits`).
    The pseudo-edits are `pseudo` less, for zsRE, every subject and prompt of the `edits`
    files, deduplicated by subject (`meg_jax.data.sources.pseudo_split`).
    `rephrases` is a JSON file of paraphrases by record prompt or id (`meg_jax.data.rephrases`)
    that replace (`rephrases_mode="replace"`) or follow ("append") the dataset's own, for the
    edits and the pseudo-edits: the way to use GLM-4 rephrases as the paper does.
    """

    edits: str = "counterfact/counterfact-edit.json"
    kind: str = "counterfact"  # or "zsre": selects MeG's preprocessing
    n_edits: int = 256
    add: str = ""
    pseudo: str = ""  # pseudo-edit records, disjoint from `edits`
    n_pseudo_pairs: int = 2000  # the reference uses the last 2000 pseudo-edit records
    n_val_pairs: int = 200  # held out from InfoNCE for checkpoint selection
    n_calibration: int = 256  # held-out pseudo-edits for the router threshold
    max_prompt_tokens: int = 256  # longer prompts are rejected before any training
    rephrases: str = ""  # a rephrase file (paraphrases by prompt or id); "": the dataset's own
    rephrases_mode: str = "replace"  # or "append": after the dataset's paraphrases
    retrain: bool = False

    def __post_init__(self):
        _require(bool(self.edits), "data.edits", "a file or dataset name", self.edits)
        _require(
            self.rephrases_mode in REPHRASE_MODES,
            "data.rephrases_mode",
            f"one of {REPHRASE_MODES}",
            self.rephrases_mode,
        )
        _require(self.kind in DATASET_KINDS, "data.kind", f"one of {DATASET_KINDS}", self.kind)
        _require(self.n_edits >= 1, "data.n_edits", "at least 1", self.n_edits)
        for name in ("n_pseudo_pairs", "n_val_pairs", "n_calibration"):
            _require(getattr(self, name) >= 0, f"data.{name}", ">= 0", getattr(self, name))
        _require(
            self.max_prompt_tokens >= 8, "data.max_prompt_tokens", ">= 8", self.max_prompt_tokens
        )


@dataclasses.dataclass(frozen=True)
class EncoderStageConfig:
    path: str = "minilm"  # a HF BERT directory, or "minilm" for the embedded all-MiniLM-L6-v2
    n_top_layers: int = 1
    batch_size: int = 128
    infonce: InfoNCEConfig = InfoNCEConfig()
    retrain: bool = False

    def __post_init__(self):
        _require(self.n_top_layers >= 1, "encoder.n_top_layers", ">= 1", self.n_top_layers)
        _require(self.batch_size >= 1, "encoder.batch_size", ">= 1", self.batch_size)


@dataclasses.dataclass(frozen=True)
class RouterStageConfig:
    enabled: bool = True  # False: every query gets a generated neuron (the "w/o FN" ablation)
    # "familiarity": MeG's Familiarity Network and its entropy (`router.gate`). "nearest": the
    # cosine distance to the nearest memorised query (`router.nearest`), nothing trained;
    # `nearest_threshold` is its threshold when it is not calibrated.
    kind: str = "familiarity"
    nearest_threshold: float = 0.1
    calibrate: bool = True  # pick the threshold on held-out pseudo-edits; else train.threshold
    train: RouterTrainConfig = RouterTrainConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    # When edits are added to a trained router. False: retrain it on the union from its seeded
    # initialisation (the router a from-scratch run trains). True: continue from its trained
    # weights for `extend_epochs` epochs over the union, a third of the default training's cost
    # but it routes fewer paraphrases (bench/results/router_extension.json: 5.2 points fewer
    # over 4 seeds). Adding 64 edits to 256 scored 4.4 below training the 320 from scratch with
    # the warm router, 1.8 below with the retrained one (bench/incremental.py, README).
    extend_warm: bool = False
    extend_epochs: int = 100
    retrain: bool = False

    def __post_init__(self):
        _require(self.extend_epochs >= 1, "router.extend_epochs", ">= 1", self.extend_epochs)
        kinds = ("familiarity", "nearest")
        _require(self.kind in kinds, "router.kind", f"one of {kinds}", self.kind)
        _require(
            0.0 <= self.nearest_threshold <= 2.0,
            "router.nearest_threshold",
            "a cosine distance in [0, 2]",
            self.nearest_threshold,
        )


@dataclasses.dataclass(frozen=True)
class CollectStageConfig:
    bank: str = ""  # use this existing bank instead of collecting (rows matched by case id)
    fit: CollectConfig = CollectConfig()
    retrain: bool = False


@dataclasses.dataclass(frozen=True)
class GeneratorStageConfig:
    preset: str = "fast"
    dit_preset: str = ""
    overrides: dict = dataclasses.field(default_factory=dict)
    # Steps when edits are added to a trained generator (warm start; the criterion still stops).
    # 800 (of the fast preset's 3,000): with the router retrained on the union, adding 64 edits
    # to 256 then stays under a third of training the 320 from scratch (incremental.json).
    extend_steps: int = 800
    # Zero-weight augmentation (MeG's "DA", METHOD.md §4.4): round(N x this) pseudo-irrelevant
    # queries from data.pseudo trained towards the zero neuron (`pipeline.generator`). 0: off,
    # as the paper's main tables; its Table 15 uses 1.0.
    zero_augmentation: float = 0.0
    retrain: bool = False

    def __post_init__(self):
        _require(self.extend_steps >= 1, "generator.extend_steps", ">= 1", self.extend_steps)
        ratio = self.zero_augmentation
        _require(
            isinstance(ratio, int | float) and not isinstance(ratio, bool) and 0 <= ratio < 1e6,
            "generator.zero_augmentation",
            "a finite ratio >= 0 (DA queries per edit; 0 = off)",
            ratio,
        )
        self.build()  # an unknown preset or override key is a config error, found now

    def build(self) -> GeneratorConfig:
        """The generator's full settings: the preset, the DiT size preset, the overrides."""
        return generator_config(
            self.overrides, self.preset, self.dit_preset or None, "config.generator"
        )


@dataclasses.dataclass(frozen=True)
class EvaluationStageConfig(EvalConfig):
    """The evaluator's settings, plus which file to evaluate.

    `edits`: evaluate this file (resolved as `data.edits`) against the trained editor instead
    of the edit set, e.g. a held-out split; `unrelated`: also report the router's false-positive
    rate on this file's prompts (any edit file; its edit prompts are read as unrelated queries).
    """

    edits: str = ""
    n_edits: int = 0  # with `edits`: how many of its records (0: as many as data.n_edits)
    unrelated: str = ""
    # A folder where the unedited model's readings are kept for other work directories with
    # the same host, template, edits and settings ("": none; `UneditedCache`).
    unedited_cache: str = ""
    retrain: bool = False


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    workdir: str = "runs/default"
    seed: int = 0
    stage: str = "all"  # or one of STAGES: run that stage only (its upstream must be trained)
    evaluate: bool = False  # `train` evaluates at its end only when asked
    editor: str = "meg"  # or a weight-editing baseline: ft | memit | alphaedit (`baseline`)
    mesh_data: int = -1
    mesh_model: int = 1
    host: HostConfig = HostConfig()
    data: DataConfig = DataConfig()
    encoder: EncoderStageConfig = EncoderStageConfig()
    router: RouterStageConfig = RouterStageConfig()
    collect: CollectStageConfig = CollectStageConfig()
    generator: GeneratorStageConfig = GeneratorStageConfig()
    evaluation: EvaluationStageConfig = EvaluationStageConfig()
    baseline: BaselineConfig = BaselineConfig()

    def __post_init__(self):
        _require(self.editor in EDITORS, "editor", f"one of {EDITORS}", self.editor)
        stages = ("all", *(STAGES if self.editor == "meg" else BASELINE_STAGES))
        _require(
            self.stage in stages, "stage", f"one of {stages} (editor {self.editor})", self.stage
        )
        _require(
            self.mesh_data == -1 or self.mesh_data >= 1, "mesh_data", "-1 or >= 1", self.mesh_data
        )
        _require(self.mesh_model >= 1, "mesh_model", ">= 1", self.mesh_model)
        _require(bool(self.workdir), "workdir", "a directory", self.workdir)
        # Found now rather than after collection: DA draws its queries from the pseudo-edits.
        _require(
            not self.generator.zero_augmentation or bool(self.data.pseudo),
            "generator.zero_augmentation",
            "0 when config.data.pseudo is empty (DA queries come from the pseudo-edits)",
            self.generator.zero_augmentation,
        )


def pipeline_config(config_dict) -> PipelineConfig:
    """A `PipelineConfig` from a config file's ConfigDict; unknown keys are errors."""
    return dataclass_from_dict(PipelineConfig, config_dict, "config")

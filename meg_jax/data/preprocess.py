"""MeG's per-model preprocessing of an edit set, computed once and cached on disk.

Steps (METHOD.md §1.4; reference `data/get_new_zsre.py`, `get_edit_and_loc_data.py`), each a
switch of `PreprocessConfig`:
  1. `dedup_by_subject`: keep the first record of every subject (zsRE: 29,086 -> 19,964).
  2. `normalize_nq_questions`: a zsRE locality prompt `"nq question: who wrote x"` becomes
     `"Who wrote x?"` (text after the prefix, "?" appended, then Python's `str.capitalize`, which
     also lower-cases the rest, exactly as the reference). Prompts without the prefix are kept.
  3. `drop_known_facts`: ask the unedited model each templated edit prompt and keep only the
     records it gets wrong (processed answer != target_new, case-insensitively): MeG edits
     only facts the model does not already know (zsRE; CounterFact keeps everything).
  4. `locality_labels`: the unedited model's processed answer to each kept record's FIRST
     locality prompt: MeG's Locality label (agreement with the pre-edit model, not gold).
  5. Records keep their dataset ids (the reference re-indexes them 0..n-1; a dataset id on the
     record is what keys weight banks and stage fingerprints across runs).
Answers are post-processed with the template's `locality_cuts` and `.strip().rstrip(".")`,
as the reference's `get_llm_response`.

The model enters only as `answer_fn` (a `GreedyGenerateFn`: templated prompts -> decoded greedy
continuations). Its results depend on the model, so the result is cached as JSON under a
SHA-256 of the records' content, the model identity string, the full template and the config;
changing any of them recomputes, and reusing them calls the model zero times.
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from meg_jax.data.answers import GreedyGenerateFn, postprocess_locality_answer
from meg_jax.data.records import DataFormatError, EditRecord
from meg_jax.data.templates import PromptTemplate, get_template
from meg_jax.infra.files import write_json_atomic

NQ_PREFIX = "nq question: "
_CACHE_VERSION = 2


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Which preprocessing steps run (see the module docstring); defaults are MeG's zsRE."""

    template: str = "gptj"
    dedup_by_subject: bool = True
    normalize_nq_questions: bool = True
    drop_known_facts: bool = True
    locality_labels: bool = True


def meg_preprocess_config(dataset: str, template: str) -> PreprocessConfig:
    """MeG's steps for `dataset` ("zsre": all of them; "counterfact": locality labels only,
    since every CounterFact record is edited and its locality prompts are plain text)."""
    if dataset == "zsre":
        return PreprocessConfig(template=template)
    if dataset == "counterfact":
        return PreprocessConfig(
            template=template,
            dedup_by_subject=False,
            normalize_nq_questions=False,
            drop_known_facts=False,
        )
    raise ValueError(f"unknown dataset kind {dataset!r}; expected 'zsre' or 'counterfact'")


@dataclasses.dataclass(frozen=True)
class PreparedEdits:
    """A preprocessed edit set for one host model.

    Attributes:
      records: the kept records (with their dataset ids), locality prompts normalised.
      edit_answers: the unedited model's processed answers to the edit prompts (only when
        `drop_known_facts` ran; the reference's `pred`), else None.
      locality_labels: the unedited model's processed answers to `locality_prompts[0]` (the
        reference's `loc_pred`), else None.
      cache_key: the content hash the result is cached under.
    """

    records: tuple[EditRecord, ...]
    edit_answers: tuple[str, ...] | None
    locality_labels: tuple[str, ...] | None
    cache_key: str


def normalize_nq_question(text: str) -> str:
    """`"nq question: who is x"` -> `"Who is x?"`; text without the prefix is returned as is."""
    if NQ_PREFIX not in text:
        return text
    return (text.partition(NQ_PREFIX)[2] + "?").capitalize()


def normalize_locality_prompts(records: list[EditRecord]) -> list[EditRecord]:
    """`records` with every locality prompt NQ-normalised (`normalize_nq_question`).

    Every place a zsRE locality prompt is asked (evaluation, the router's calibration negatives,
    DA) must see the same question, so they all go through this one function.
    """
    return [
        dataclasses.replace(
            r, locality_prompts=tuple(normalize_nq_question(p) for p in r.locality_prompts)
        )
        for r in records
    ]


def dedup_by_subject(records: list[EditRecord]) -> list[EditRecord]:
    """The first record of each subject, in order; records without a subject are all kept."""
    seen: set[str] = set()
    kept = []
    for record in records:
        if record.subject is not None:
            if record.subject in seen:
                continue
            seen.add(record.subject)
        kept.append(record)
    return kept


def pre_edit_answers(
    questions: list[str], template: PromptTemplate, answer_fn: GreedyGenerateFn
) -> list[str]:
    """The unedited model's processed answers to raw `questions` (templated here)."""
    if not questions:
        return []
    continuations = answer_fn([template.format_query(q) for q in questions])
    if not isinstance(continuations, list) or len(continuations) != len(questions):
        got = len(continuations) if isinstance(continuations, list) else type(continuations)
        raise ValueError(f"answer_fn must return a list of {len(questions)} strings, got {got}")
    for i, c in enumerate(continuations):
        if not isinstance(c, str):
            raise ValueError(f"answer_fn returned {type(c).__name__} at position {i}, not a str")
    return [postprocess_locality_answer(c, template.locality_cuts) for c in continuations]


def cache_key(records: list[EditRecord], model_id: str, config: PreprocessConfig) -> str:
    """SHA-256 over the records' content, the model identity, the full template and config."""
    payload = {
        "version": _CACHE_VERSION,
        "model_id": model_id,
        "template": dataclasses.asdict(get_template(config.template)),
        "config": dataclasses.asdict(config),
        "records": [r.content() for r in records],
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _compute(
    records: list[EditRecord], answer_fn: GreedyGenerateFn, config: PreprocessConfig, key: str
) -> PreparedEdits:
    """The preprocessing steps in order (module docstring); the model is asked at most twice."""
    template = get_template(config.template)
    if config.locality_labels:  # checked first: a bad record must not cost a pass of the model
        for r in records:
            if not r.locality_prompts:
                raise DataFormatError(
                    f"{r.source.describe('locality_prompts')}: no locality prompt to label"
                )
    if config.dedup_by_subject:
        records = dedup_by_subject(records)
    if config.normalize_nq_questions:
        records = normalize_locality_prompts(records)
    edit_answers = None
    if config.drop_known_facts:
        answers = pre_edit_answers([r.prompt for r in records], template, answer_fn)
        wrong = [a.lower() != r.target_new.lower() for r, a in zip(records, answers, strict=True)]
        records = [r for r, keep in zip(records, wrong, strict=True) if keep]
        edit_answers = tuple(a for a, keep in zip(answers, wrong, strict=True) if keep)
    labels = None
    if config.locality_labels:
        labels = tuple(
            pre_edit_answers([r.locality_prompts[0] for r in records], template, answer_fn)
        )
    return PreparedEdits(
        records=tuple(records),
        edit_answers=edit_answers,
        locality_labels=labels,
        cache_key=key,
    )


def _to_json(prepared: PreparedEdits, model_id: str, config: PreprocessConfig) -> dict[str, Any]:
    return {
        "cache_key": prepared.cache_key,
        "model_id": model_id,
        "config": dataclasses.asdict(config),
        "records": [r.to_json() for r in prepared.records],
        "edit_answers": prepared.edit_answers,
        "locality_labels": prepared.locality_labels,
    }


def _from_json(obj: Any, path: Path, key: str) -> PreparedEdits:
    def optional_tuple(value):
        return None if value is None else tuple(value)

    try:
        if obj["cache_key"] != key:
            raise ValueError(f"it holds key {obj['cache_key']}, expected {key}")
        return PreparedEdits(
            records=tuple(EditRecord.from_json(r) for r in obj["records"]),
            edit_answers=optional_tuple(obj["edit_answers"]),
            locality_labels=optional_tuple(obj["locality_labels"]),
            cache_key=key,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DataFormatError(
            f"{path}: not a valid preprocessing cache ({type(err).__name__}: {err}); delete it "
            "to recompute"
        ) from None


def prepare_edits(
    records: list[EditRecord],
    model_id: str,
    answer_fn: GreedyGenerateFn,
    config: PreprocessConfig = PreprocessConfig(),
    cache_dir: str | os.PathLike | None = None,
) -> PreparedEdits:
    """Runs (or loads from `cache_dir`) MeG's preprocessing of `records` for one model.

    Args:
      records: the edit set as read (`meg_jax.data.readers`).
      model_id: a string that identifies the host model and its weights (e.g. the HF id and a
        revision or checkpoint hash); part of the cache key, so it must change with the model.
      answer_fn: greedy generation with the unedited model (templated prompts -> raw decoded
        continuations); called at most twice, and not at all on a cache hit.
      config: the steps to run and the template name.
      cache_dir: where `preprocess-<hash>.json` files live; None disables caching.
    """
    key = cache_key(records, model_id, config)
    path = None if cache_dir is None else Path(cache_dir) / f"preprocess-{key[:24]}.json"
    if path is not None and path.is_file():
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataFormatError(
                f"{path}: unreadable preprocessing cache ({err}); delete it to recompute"
            ) from None
        return _from_json(obj, path, key)
    prepared = _compute(records, answer_fn, config, key)
    if path is not None:
        write_json_atomic(path, _to_json(prepared, model_id, config))
    return prepared

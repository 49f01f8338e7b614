"""Edit data: records, dataset readers, MeG prompt templates and per-model preprocessing.

Public API:
    EditRecord, Source, DataFormatError                 the one record type and its error
    read_edits(path, format=None, zsre_target="answers", limit=None) -> list[EditRecord]
    load_edits(name_or_path, cache_dir=None, ...)       a path, or a known dataset name
    get_template(name) -> PromptTemplate                gptj, phi2, llama3, smollm2, smollm2_chat
    prepare_edits(records, model_id, answer_fn, config, cache_dir) -> PreparedEdits
    read_spec("a.json+b.json", limit=None) -> list[EditRecord]   several files merged
    pseudo_split(pseudo, edit_pool, by_subject), check_disjoint(edits, pseudo, by_subject)
    read_rephrases(path), apply_rephrases(records, rephrases, mode)   user-supplied paraphrases
"""

from meg_jax.data.download import KNOWN_DATASETS, DatasetUnavailableError, load_edits
from meg_jax.data.preprocess import (
    PreparedEdits,
    PreprocessConfig,
    meg_preprocess_config,
    normalize_locality_prompts,
    normalize_nq_question,
    prepare_edits,
)
from meg_jax.data.readers import FORMATS, detect_format, read_edits
from meg_jax.data.records import DataFormatError, EditRecord, Source
from meg_jax.data.rephrases import REPHRASE_MODES, Rephrases, apply_rephrases, read_rephrases
from meg_jax.data.sources import check_disjoint, pseudo_split, read_spec, split_spec
from meg_jax.data.templates import TEMPLATES, PromptTemplate, get_template

__all__ = [
    "FORMATS",
    "KNOWN_DATASETS",
    "REPHRASE_MODES",
    "TEMPLATES",
    "DataFormatError",
    "DatasetUnavailableError",
    "EditRecord",
    "PreparedEdits",
    "PreprocessConfig",
    "PromptTemplate",
    "Rephrases",
    "Source",
    "apply_rephrases",
    "check_disjoint",
    "detect_format",
    "get_template",
    "load_edits",
    "meg_preprocess_config",
    "normalize_locality_prompts",
    "normalize_nq_question",
    "prepare_edits",
    "pseudo_split",
    "read_edits",
    "read_rephrases",
    "read_spec",
    "split_spec",
]

"""Stage 1, the query encoder f_TE: BERT [CLS] vectors and their InfoNCE tuning.

Public API:
    TextEncoder.from_pretrained(path, n_top_layers=1, dtype="float32", mesh=None,
                                template="{query}", normalize=False, batch_size=128)
    TextEncoder.encode(texts) -> float32 [N, D]          batched, bucketed, jitted
    TextEncoder.with_view(...), .with_top_layers(top)    router view / generator view / tuned
    cls_vectors(config, params, ids, mask, types, normalize) -> [B, D]   the pure jitted core
    InfoNCEConfig, train_infonce(encoder, train_pairs, val_pairs, config, workdir,
                                 report_pairs=None) -> InfoNCEResult
    restore_best_top_layers(encoder, config, workdir)
    info_nce_loss(paraphrase, original, temperature), retrieval_top1(queries, gallery, targets)
    pseudo_edit_pairs(records, paraphrases_per_record=2), split_pairs(pairs, n_val, seed)
"""

from meg_jax.encoder.infonce import (
    info_nce_loss,
    pseudo_edit_pairs,
    retrieval_sets,
    retrieval_top1,
    split_pairs,
)
from meg_jax.encoder.text_encoder import TextEncoder, apply_template, cls_vectors
from meg_jax.encoder.train import (
    InfoNCEConfig,
    InfoNCEResult,
    restore_best_top_layers,
    train_infonce,
)

__all__ = [
    "InfoNCEConfig",
    "InfoNCEResult",
    "TextEncoder",
    "apply_template",
    "cls_vectors",
    "info_nce_loss",
    "pseudo_edit_pairs",
    "restore_best_top_layers",
    "retrieval_sets",
    "retrieval_top1",
    "split_pairs",
    "train_infonce",
]

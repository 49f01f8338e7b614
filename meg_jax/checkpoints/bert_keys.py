"""Hugging Face BERT checkpoints (bert-base-uncased, all-MiniLM-L6-v2) -> `BertConfig` + params.

The key map is data: one `Rule` per parameter of `meg_jax.models.bert.Bert`. Files come in two
naming layouts, both handled: `BertModel` saves bare names (`embeddings.word_embeddings.weight`),
`BertForMaskedLM`/`BertForPreTraining` prefix them with `bert.`; and old files (bert-base-uncased
itself) name LayerNorm parameters `gamma`/`beta` instead of `weight`/`bias`. The pooler and the
MLM/NSP heads are not part of the encoder and are ignored by name, so any other stray tensor
still fails loudly.
"""

from pathlib import Path

import jax

from meg_jax.checkpoints.convert import Rule, identity, load_params, transpose
from meg_jax.checkpoints.errors import CheckpointError
from meg_jax.checkpoints.files import TensorStore, open_hf_dir
from meg_jax.models.bert import Bert, split_top_layers
from meg_jax.models.bert_config import BertConfig

# Tensors a BERT file may carry that the encoder does not use: the pooler, pre-training heads,
# and the `position_ids` / `token_type_ids` buffers some older files saved.
IGNORED = (
    r"(bert\.)?pooler\..*",
    r"cls\..*",
    r"(bert\.)?embeddings\.(position_ids|token_type_ids)",
)

# config.json fields whose non-default values change the computation we implement.
_REQUIRED = {
    "model_type": (("bert",), None),
    "hidden_act": (("gelu",), "gelu"),
    "position_embedding_type": (("absolute",), "absolute"),
    "is_decoder": ((False,), False),
    "add_cross_attention": ((False,), False),
}


def bert_config_from_hf(config: dict, path: Path, **overrides) -> BertConfig:
    """`BertConfig` for a HF `config.json` dict; `overrides` set n_top_layers, dtype, ...

    Raises CheckpointError naming `path` and the field for anything we do not implement
    (relative position embeddings, decoder/cross-attention use, a non-erf activation).
    """
    for field, (allowed, default) in _REQUIRED.items():
        value = config.get(field, default)
        if value not in allowed:
            raise CheckpointError(
                f"{path}: config field {field}={value!r} is not supported (supported: {allowed})"
            )
    try:
        fields = dict(
            vocab_size=int(config["vocab_size"]),
            d_model=int(config["hidden_size"]),
            n_layers=int(config["num_hidden_layers"]),
            n_heads=int(config["num_attention_heads"]),
            d_ff=int(config["intermediate_size"]),
            max_position=int(config.get("max_position_embeddings", 512)),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(config.get("pad_token_id") or 0),
        )
    except KeyError as err:
        raise CheckpointError(f"{path}: config field {err.args[0]} is missing") from err
    fields.update(overrides)
    try:
        return BertConfig(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from err


def detect_layout(store: TensorStore) -> tuple[str, tuple[str, str]]:
    """(name prefix, LayerNorm parameter names) used by the file: ('bert.' or '', weight/gamma)."""
    names = set(store.names())
    for prefix in ("", "bert."):
        for norm_names in (("weight", "bias"), ("gamma", "beta")):
            if f"{prefix}embeddings.LayerNorm.{norm_names[0]}" in names:
                return prefix, norm_names
    raise CheckpointError(
        f"{store.path}: not a BERT checkpoint (no embeddings.LayerNorm.weight/gamma, with or "
        "without a 'bert.' prefix)"
    )


def bert_rules(prefix: str = "", norm_names: tuple[str, str] = ("weight", "bias")) -> list[Rule]:
    """The key map from HF tensor names to `Bert` parameters (one stack of all layers)."""
    scale, shift = norm_names
    e = f"{prefix}embeddings"
    rules = [
        Rule("embeddings/word/embedding", f"{e}.word_embeddings.weight"),
        Rule("embeddings/position/embedding", f"{e}.position_embeddings.weight"),
        Rule("embeddings/token_type/embedding", f"{e}.token_type_embeddings.weight"),
        Rule("embeddings/norm/scale", f"{e}.LayerNorm.{scale}"),
        Rule("embeddings/norm/bias", f"{e}.LayerNorm.{shift}"),
    ]
    p = f"{prefix}encoder.layer.{{i}}"
    linears = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "fc_in": "intermediate.dense",
        "fc_out": "output.dense",
    }
    for ours, theirs in linears.items():
        rules.append(Rule(f"layers/{ours}/kernel", f"{p}.{theirs}.weight", transpose, True))
        rules.append(Rule(f"layers/{ours}/bias", f"{p}.{theirs}.bias", identity, True))
    for ours, theirs in {
        "attn_norm": "attention.output.LayerNorm",
        "mlp_norm": "output.LayerNorm",
    }.items():
        rules.append(Rule(f"layers/{ours}/scale", f"{p}.{theirs}.{scale}", identity, True))
        rules.append(Rule(f"layers/{ours}/bias", f"{p}.{theirs}.{shift}", identity, True))
    return rules


def abstract_bert_params(config: BertConfig):
    """Parameter shapes and dtypes of `Bert(config)` without allocating anything."""
    tokens = jax.ShapeDtypeStruct((1, 1), "int32")
    return jax.eval_shape(Bert(config).init, jax.random.PRNGKey(0), tokens)["params"]


def load_hf_bert(path, *, n_top_layers: int = 0, dtype: str = "float32") -> tuple[BertConfig, dict]:
    """Reads a HF BERT directory into (`BertConfig`, params) with the last layers split off.

    Parameters land on the default device (a BERT encoder is small enough to replicate); the
    stages place them on their mesh.
    """
    hf_config, store = open_hf_dir(path)
    config = bert_config_from_hf(hf_config, Path(path) / "config.json", dtype=dtype)
    prefix, norm_names = detect_layout(store)
    params = load_params(
        store,
        bert_rules(prefix, norm_names),
        abstract_bert_params(config),
        config.n_layers,
        ignore=IGNORED,
    )
    return config.replace(n_top_layers=n_top_layers), split_top_layers(params, n_top_layers)

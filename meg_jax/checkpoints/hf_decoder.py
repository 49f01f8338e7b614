"""Hugging Face decoder checkpoints (GPT-J, Phi-2, Llama family) -> `LMConfig` + parameters.

`config.json` is translated field by field; a field whose value we do not implement (a rope
type other than llama3, attention biases on Llama, QK layer norms on Phi, ...) is an error rather
than a silently different model. The key maps are data: one `Rule` per parameter.
"""

from collections.abc import Callable
from pathlib import Path

import jax

from meg_jax.checkpoints.convert import Rule, identity, load_params, transpose
from meg_jax.checkpoints.errors import CheckpointError
from meg_jax.checkpoints.files import open_hf_dir
from meg_jax.models.config import LMConfig, RopeScaling
from meg_jax.models.decoder import Decoder

SUPPORTED = ("llama", "gptj", "phi")


def _require(config: dict, path: Path, field: str, allowed, default=None) -> None:
    value = config.get(field, default)
    if value not in allowed:
        raise CheckpointError(
            f"{path}: config field {field}={value!r} is not supported (supported: {allowed})"
        )


def _eos_ids(config: dict) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _rope_parameters(config: dict) -> dict:
    """Rotary settings from either layout: transformers v5 `rope_parameters`, or the legacy
    top-level `rope_theta` / `partial_rotary_factor` / `rope_scaling` of hub checkpoints."""
    merged = {k: config[k] for k in ("rope_theta", "partial_rotary_factor") if k in config}
    merged.update(config.get("rope_scaling") or {})
    merged.update(config.get("rope_parameters") or {})
    return merged


def _llama(config: dict, path: Path) -> dict:
    _require(config, path, "hidden_act", ("silu",), "silu")
    _require(config, path, "attention_bias", (False,), False)
    _require(config, path, "mlp_bias", (False,), False)
    scaling = _rope_parameters(config)
    rope = None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default":
        if kind == "llama3":
            rope = RopeScaling(
                float(scaling["factor"]),
                float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]),
                int(scaling["original_max_position_embeddings"]),
            )
        else:
            raise CheckpointError(
                f"{path}: rope_scaling type {kind!r} is not supported (supported: llama3)"
            )
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return dict(
        arch="llama",
        d_ff=config["intermediate_size"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rotary_dim=head_dim,
        rope_theta=float(scaling.get("rope_theta", 10000.0)),
        rope_scaling=rope,
        max_position=config.get("max_position_embeddings", 2048),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
    )


def _gptj(config: dict, path: Path) -> dict:
    _require(config, path, "activation_function", ("gelu_new",), "gelu_new")
    heads = config["n_head"]
    return dict(
        arch="gptj",
        d_model=config["n_embd"],
        n_layers=config["n_layer"],
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=config["n_embd"] // heads,
        d_ff=config.get("n_inner") or 4 * config["n_embd"],
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        rotary_dim=config.get("rotary_dim") or config["n_embd"] // heads,
        max_position=config.get("n_positions", 2048),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _phi(config: dict, path: Path) -> dict:
    _require(config, path, "hidden_act", ("gelu_new",), "gelu_new")
    _require(config, path, "qk_layernorm", (False,), False)
    heads = config["num_attention_heads"]
    head_dim = config["hidden_size"] // heads
    kv = config.get("num_key_value_heads") or heads
    rope = _rope_parameters(config)
    _require(rope, path, "rope_type", ("default",), "default")
    return dict(
        arch="phi",
        d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=head_dim,
        d_ff=config["intermediate_size"],
        norm_eps=config.get("layer_norm_eps", 1e-5),
        rotary_dim=int(rope.get("partial_rotary_factor", 0.5) * head_dim),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        max_position=config.get("max_position_embeddings", 2048),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


_TRANSLATORS: dict[str, Callable[[dict, Path], dict]] = {
    "llama": _llama,
    "gptj": _gptj,
    "phi": _phi,
}


def lm_config_from_hf(config: dict, path: Path, **overrides) -> LMConfig:
    """`LMConfig` for a HF `config.json` dict; `overrides` set neuron_layer, dtype, etc."""
    model_type = config.get("model_type")
    if model_type not in _TRANSLATORS:
        raise CheckpointError(
            f"{path}: unsupported architecture model_type={model_type!r} "
            f"(architectures={config.get('architectures')}); supported: {SUPPORTED}"
        )
    try:
        fields = _TRANSLATORS[model_type](config, path)
        fields.update(
            vocab_size=config["vocab_size"],
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=_eos_ids(config),
            pad_token_id=config.get("pad_token_id") or 0,
        )
    except CheckpointError:
        raise
    except KeyError as err:
        raise CheckpointError(
            f"{path}: required field {err.args[0]!r} is missing for model_type={model_type!r}; "
            "the config.json is incomplete or damaged: copy it again from the model's source"
        ) from err
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: a field has a value of the wrong type ({err}); the config.json is "
            "damaged: copy it again from the model's source"
        ) from err
    return make_lm_config(fields, path, overrides)


def make_lm_config(fields: dict, path, overrides: dict) -> LMConfig:
    """`LMConfig` of a checkpoint's own `fields` with the caller's `overrides` applied.

    A value the config refuses is blamed on the file `path` (a `CheckpointError`) when it came
    from the file, and left as the plain `ValueError` naming the field when it came from the
    caller (an `LMConfig.neuron_activation` typo is not the checkpoint's fault).
    """
    try:
        LMConfig(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: {err}; the checkpoint's config is damaged or unsupported"
        ) from err
    return LMConfig(**{**fields, **overrides})


def decoder_rules(config: LMConfig) -> list[Rule]:
    """The key map from HF tensor names to our decoder parameters, for `config.arch`."""

    def layer(target, source, transform=transpose):
        return Rule(f"layers/{target}", source, transform, stacked=True)

    def linear(target, source, bias: bool):
        rules = [layer(f"{target}/kernel", f"{source}.weight")]
        if bias:
            rules.append(layer(f"{target}/bias", f"{source}.bias", identity))
        return rules

    def norm(target, source, bias: bool):
        rules = [layer(f"{target}/scale", f"{source}.weight", identity)]
        if bias:
            rules.append(layer(f"{target}/bias", f"{source}.bias", identity))
        return rules

    if config.arch == "llama":
        p = "model.layers.{i}"
        rules = [Rule("embed/embedding", "model.embed_tokens.weight")]
        rules += norm("input_norm", f"{p}.input_layernorm", False)
        rules += norm("post_attn_norm", f"{p}.post_attention_layernorm", False)
        for ours in "qkvo":
            rules += linear(f"attn/{ours}", f"{p}.self_attn.{ours}_proj", False)
        for ours in ("gate", "up", "down"):
            rules += linear(f"mlp/{ours}", f"{p}.mlp.{ours}_proj", False)
        rules += [Rule("final_norm/scale", "model.norm.weight")]
        rules += [Rule("lm_head/kernel", "lm_head.weight", transpose)]
    elif config.arch == "gptj":
        p = "transformer.h.{i}"
        rules = [Rule("embed/embedding", "transformer.wte.weight")]
        rules += norm("input_norm", f"{p}.ln_1", True)
        for ours, theirs in zip("qkvo", ("q_proj", "k_proj", "v_proj", "out_proj"), strict=True):
            rules += linear(f"attn/{ours}", f"{p}.attn.{theirs}", False)
        rules += linear("mlp/fc_in", f"{p}.mlp.fc_in", True)
        rules += linear("mlp/fc_out", f"{p}.mlp.fc_out", True)
        rules += [Rule("final_norm/scale", "transformer.ln_f.weight")]
        rules += [Rule("final_norm/bias", "transformer.ln_f.bias")]
        rules += [Rule("lm_head/kernel", "lm_head.weight", transpose)]
        rules += [Rule("lm_head/bias", "lm_head.bias")]
    else:  # phi
        p = "model.layers.{i}"
        rules = [Rule("embed/embedding", "model.embed_tokens.weight")]
        rules += norm("input_norm", f"{p}.input_layernorm", True)
        for ours, theirs in zip("qkvo", ("q_proj", "k_proj", "v_proj", "dense"), strict=True):
            rules += linear(f"attn/{ours}", f"{p}.self_attn.{theirs}", True)
        rules += linear("mlp/fc_in", f"{p}.mlp.fc1", True)
        rules += linear("mlp/fc_out", f"{p}.mlp.fc2", True)
        rules += [Rule("final_norm/scale", "model.final_layernorm.weight")]
        rules += [Rule("final_norm/bias", "model.final_layernorm.bias")]
        rules += [Rule("lm_head/kernel", "lm_head.weight", transpose)]
        rules += [Rule("lm_head/bias", "lm_head.bias")]
    return rules


# Tensors a HF file may carry that are not parameters of ours (buffers, tied copies).
_IGNORED = (r".*rotary_emb\.inv_freq", r".*attn\.(masked_)?bias")


def abstract_decoder_params(config: LMConfig):
    """Parameter shapes and dtypes of `Decoder(config)` without allocating anything."""
    tokens = jax.ShapeDtypeStruct((1, 1), "int32")
    return jax.eval_shape(Decoder(config).init, jax.random.PRNGKey(0), tokens)["params"]


def load_hf_decoder(path, *, shardings_fn=None, **overrides) -> tuple[LMConfig, dict]:
    """Reads a HF model directory into (`LMConfig`, params).

    `overrides` go to the config (neuron_layer, neuron_activation, dtype, ...).
    `shardings_fn(config, abstract_params)` may return a sharding tree for direct placement.
    """
    hf_config, store = open_hf_dir(path)
    config = lm_config_from_hf(hf_config, Path(path) / "config.json", **overrides)
    abstract = abstract_decoder_params(config)
    shardings = shardings_fn(config, abstract) if shardings_fn is not None else None
    ignore = list(_IGNORED)
    if config.tie_embeddings:
        ignore.append(r"lm_head\.weight")  # a tied copy some files carry
    params = load_params(
        store, decoder_rules(config), abstract, config.n_layers, shardings=shardings, ignore=ignore
    )
    return config, params

"""meg_jax: MeG massive knowledge editing (dynamic weight generation) in JAX/Flax.

editor = meg_jax.load_editor("runs/smollm2_cf")     # a trained work directory
editor.generate(["The mother tongue of Danielle Darrieux is"])
"""


def __getattr__(name: str):
    # Lazy: `import meg_jax` stays cheap (no JAX start-up) until the API is used.
    if name in ("load_editor", "EditedModel"):
        from meg_jax.inference import edited_model

        return getattr(edited_model, name)
    raise AttributeError(f"module 'meg_jax' has no attribute {name!r}")

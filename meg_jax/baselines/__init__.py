"""Editors that change weights: FT-L, MEMIT and AlphaEdit, evaluated like MeG.

A baseline's result is edited host parameters, a pytree of the host's layout (only the edited
MLP output kernels differ from the unedited ones). Evaluate them with the unchanged evaluator:
`ModelRunner(config, edited_params, tokenizer, ...)` with `zero_editor(d_model)` as the editor,
then `evaluate_meg` / `evaluate_classic`.

    from meg_jax.baselines import BaselineConfig, run_baseline
    edited, info = run_baseline("memit", host, records, template, BaselineConfig(), workdir)

In the pipeline, `editor` = ft | memit | alphaedit selects the method and the config's `baseline`
section is a `BaselineConfig`: `python -m meg_jax.train` runs the edits and the baseline stage
(`meg_jax.pipeline.baseline`), `python -m meg_jax.evaluate` MeG's evaluation stage on the result.
"""

from meg_jax.baselines.run import BaselineConfig, baseline_config, run_baseline

__all__ = ["BaselineConfig", "baseline_config", "run_baseline"]

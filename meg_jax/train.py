"""`python -m meg_jax.train --config configs/smollm2_cf.py[:variant] [--config.key=value ...]`

A thin entry point: parse the config file, then call the library (`meg_jax.pipeline.run`).
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from meg_jax.pipeline import pipeline_config, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run(pipeline_config(_CONFIG.value))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)

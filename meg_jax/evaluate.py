"""`python -m meg_jax.evaluate --config configs/smollm2_cf.py [--config.evaluation.edits=FILE]`

Evaluates a trained work directory: the unedited and the edited model under MeG's protocol (and
the classic metrics with `--config.evaluation.classic=True`). Every training stage must be
finished for the config's inputs; nothing is trained here.
"""

import dataclasses
import sys

from meg_jax.pipeline import run
from meg_jax.pipeline.cli import main


def evaluate(cfg):
    return run(dataclasses.replace(cfg, stage="evaluation"), evaluate=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], evaluate))

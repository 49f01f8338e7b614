"""`python -m meg_jax.train --config configs/smollm2_cf.py[:variant] [--config.key=value ...]`

Trains every stage (or `--config.stage=NAME` alone) into the config's work directory; evaluates
at the end when the config asks (`evaluate=True`). See `meg_jax.pipeline.cli` for the options.
"""

import sys

from meg_jax.pipeline import run
from meg_jax.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], run))

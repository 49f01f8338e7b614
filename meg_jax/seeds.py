"""`python -m meg_jax.seeds --config configs/smollm2_cf.py[:variant] --seeds 0,1,2 [--config.k=v]`

Runs the config once per seed, each in `<workdir>/seed-<s>` (resumable like any run: finished
stages are skipped), evaluates each, and writes the mean, sample standard deviation, min and max
of every reading to `<workdir>/seeds.json` and `seeds.png` (`meg_jax.pipeline.seeds`). The other
options are those of `meg_jax.train` (`meg_jax.pipeline.cli`).
"""

import sys

from meg_jax.pipeline.cli import main


def parse_seeds(argv: list[str]) -> tuple[list[int], list[str]]:
    """(the seeds of `--seeds A,B,...`, the other arguments); a ValueError says what is wrong."""
    rest, seeds = [], None
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name != "--seeds":
            rest.append(arg)
            continue
        if not eq:
            if not args:
                raise ValueError("--seeds needs a value, e.g. --seeds 0,1,2")
            value = args.pop(0)
        try:
            seeds = [int(s) for s in value.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds {value!r}: expected comma-separated integers") from None
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"--seeds {value!r}: expected distinct integers >= 0")
    if seeds is None:
        raise ValueError("--seeds A,B,... is required (the paper averages five runs: 0,1,2,3,4)")
    return seeds, rest


def cli(argv: list[str]) -> int:
    from meg_jax.pipeline.seeds import run_seeds

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        seeds, rest = parse_seeds(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if any(a.startswith("--config.stage") for a in rest):
        print("error: --config.stage: a run over seeds runs every stage", file=sys.stderr)
        return 2
    return main(rest, lambda cfg: run_seeds(cfg, seeds))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))

"""Entrypoint for `ray job submit --working-dir . -- python jobs/tune.py --config SWEEP [--set k=v]`.

The same call as `composeae tune`: run (or resume) the sweep, print its best trial.
"""

import sys

from composeae.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))

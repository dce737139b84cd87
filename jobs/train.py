"""Entrypoint for `ray job submit --working-dir . -- python jobs/train.py --config FILE [--set k=v]`.

The same call as `composeae train`: load the config, train on Ray, print the recall table.
"""

import sys

from composeae.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

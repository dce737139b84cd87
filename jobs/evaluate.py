"""Entrypoint for `ray job submit ... -- python jobs/evaluate.py --checkpoint URL --data URL`.

The same call as `composeae eval`.
"""

import sys

from composeae.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))

"""Entrypoint for `ray job submit --working-dir . -- python jobs/nightly.py --config FILE --date D`.

The same call as `composeae nightly`: train tonight's challenger, score it against the champion,
register it and promote it when it wins. Every schedule in `cluster/` runs this file.
"""

import sys

from composeae.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))

"""What a command printed, as its user sees it: the lines a test reads from stderr, less the
lines Ray forwards from the actors of a cluster the test process is attached to.

A test that runs a command in-process while a module's Ray runtime is up (a Serve replica, a
Train worker) also captures those actors' log lines: Ray's log monitor copies them to the driver's
stderr, prefixed with the actor's name and pid, at whatever moment they arrive. A person running
the command in their own shell never sees them, so they are not part of its output."""

from __future__ import annotations

import re

FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\([^()]* pid=\d+(, ip=[^)]*)?\)")
"""The prefix Ray puts on a line forwarded from a worker: `(Name pid=123)` or
`(Name pid=123, ip=10.0.0.2)`, coloured on a terminal."""


def own_lines(text: str) -> list[str]:
    """The non-empty lines of `text` the command itself printed."""
    return [line for line in text.strip().splitlines()
            if line.strip() and not FORWARDED.match(line)]

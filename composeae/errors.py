"""The one exception type for bad user input.

Anything the user can fix (a bad config key, a missing file, an unknown model, an empty shard set)
raises `UserError` with a single line naming the problem. The command line turns it into
`error: <message>` on stderr and exit status 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""

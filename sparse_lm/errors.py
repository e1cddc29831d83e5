"""One exception type for every user-facing mistake.

The CLI prints a `UserError` as a single line and exits with status 2, instead of a traceback:
bad config values, missing files and corrupt checkpoints are the user's to fix, not ours.
"""


class UserError(Exception):
    """Bad input (config, path, corpus, checkpoint); the message names the culprit and what was expected."""

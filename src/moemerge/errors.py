"""The one exception type that the CLI turns into ``error: ...`` and exit code 2."""


class MoemergeError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""

"""The one exception type a user sees: the CLI prints its message on one line and exits non-zero."""


class LmvicError(Exception):
    """A failure caused by the input or the environment, explained in one line."""

"""The one exception type that means "the user asked for something that cannot be done"."""


class PracError(Exception):
    """A bad input or impossible request. The CLI prints it as one line and exits with code 2."""

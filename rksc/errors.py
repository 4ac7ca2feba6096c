"""User-facing errors: the CLI prints the message on one line and exits with code 2."""


class RkscError(Exception):
    """A mistake in what the user asked for (bad input, unknown model, missing file)."""

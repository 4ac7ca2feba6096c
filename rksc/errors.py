"""User-facing errors: the CLI prints the message on one line and exits with code 2."""


class RkscError(Exception):
    """A mistake in what the user asked for (bad input, unknown model, missing file)."""


class ProgramError(RkscError):
    """One problem's program raised something other than an RkscError (a bug, memory running out):
    that problem fails with this error, the others go on. The original exception is `__cause__`."""

    @classmethod
    def of(cls, e: BaseException) -> RkscError:
        if isinstance(e, RkscError):
            return e
        error = cls(f"internal error: {type(e).__name__}: {e}")
        error.__cause__ = e
        return error

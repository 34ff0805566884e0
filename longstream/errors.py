"""Errors that mean "the input is wrong": the CLI prints them as one line and exits with status 2."""


class LongstreamError(ValueError):
    """Base class of user-facing errors; the message names the thing at fault."""


class UsageError(LongstreamError):
    """A bad request (argument, path, size) not covered by a more specific error."""

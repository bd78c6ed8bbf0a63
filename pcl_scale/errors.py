"""Errors a user can act on. The CLI prints their message and exits with status 2."""


class UserError(Exception):
    """A mistake in the input or the options; the message names the value and the fix."""


class DataError(UserError, ValueError):
    """A dataset that cannot be used as asked (missing, empty, wrong column, corrupt image)."""


class DivergedError(UserError):
    """The loss became NaN or Inf; nothing was saved after it."""

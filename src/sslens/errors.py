"""User-facing errors: the CLI prints these as one paragraph, without a traceback, and exits 2."""


class UserError(ValueError):
    """Bad input or configuration that the user can fix; the message says how."""


class DatasetError(UserError):
    """A dataset is missing, empty, or unreadable."""


class SslensWarning(UserWarning):
    """Something sslens worked around (a skipped file, a cache it could not write, a degenerate
    model, a very long run): the CLI prints it as one ``sslens: warning:`` line."""

"""Errors a user can cause and fix; the CLI prints them as one line, never a traceback."""


class UserError(Exception):
    """A mistake in what the user asked for: a missing folder, an unknown dataset, no images."""

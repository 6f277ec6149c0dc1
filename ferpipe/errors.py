"""Errors a user can cause and fix; the CLI prints them as one line, never a traceback."""


class UserError(Exception):
    """A mistake in what the user asked for: a missing folder, an unknown dataset, no images."""


class StorageError(UserError):
    """The object store failed, refused or never answered, after bounded retries.

    A fault of the environment, not of ferpipe: the message names the endpoint and
    what failed (refused, timed out, signature rejected, bucket missing), so the
    person can fix the service or the credentials and rerun.
    """


class OutputBusy(UserError):
    """Another run holds the output this run was asked to write."""

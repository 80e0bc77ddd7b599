"""Errors that carry a message a user can act on (what, where, how to fix)."""


class BloodcellError(Exception):
    """A failure explained for the user; the CLI prints it without a traceback."""


class DataError(BloodcellError):
    """The input data cannot be used as given."""


class StorageError(BloodcellError):
    """Object storage refused or lost a request."""


class DiskFullError(BloodcellError):
    """A local disk (state directory, cache or temporary folder) has no space left."""

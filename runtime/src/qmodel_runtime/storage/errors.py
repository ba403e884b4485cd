"""The errors storage raises. Every message names the URI and says what to check, in the user's terms."""

from __future__ import annotations

from qmodel_runtime.manifest import ManifestError


class StorageError(Exception):
    """A storage operation failed; the message is complete and meant for the user."""


class PermanentStorageError(StorageError):
    """Retrying cannot help (no such bucket, access denied, bad endpoint, bad URI)."""


class TransientStorageError(StorageError):
    """A temporary fault (connection lost, 5xx, throttling) outlasted every retry."""


class NotFoundError(PermanentStorageError):
    """The object or prefix does not exist."""


class IntegrityError(StorageError, ManifestError):
    """Bytes do not match the manifest; the message names the file."""

"""The one error hierarchy of the crypto package.

Every failure caused by what a remote party sent is a ``RemoteError``; every
failure caused by how this process used the API is a ``LocalError``. Both are
``ValueError`` subclasses so that callers that only know the builtin still catch
them. Messages never contain key material.
"""


class CryptoError(ValueError):
    """Base class of every error raised by the crypto package."""


class RemoteError(CryptoError):
    """The peer (or anyone on the path) sent something that must be rejected."""


class LocalError(CryptoError):
    """This process misused the API, or a local limit was reached."""

"""Every error imgci raises on purpose. This module imports nothing from imgci.

Contract: code inside imgci raises only subclasses of :class:`ImgciError` for conditions a user can cause or
fix (bad input, unreachable registry, full disk, corrupt data). Third-party exceptions (requests, sqlite3,
OSError) are translated into these where they are raised. The CLI catches ``ImgciError`` at its boundary and
prints ``error: <message>`` (plus the hint) without a traceback; anything else is a bug and keeps its traceback.

Hierarchy::

    ImgciError
    ├── UsageError                  bad command-line input
    ├── InvalidReferenceError       an image reference that does not parse
    ├── DigestError
    │   ├── InvalidDigestError      a malformed digest string (rejected before any path is built)
    │   └── DigestMismatchError     content does not hash or size to what was declared
    ├── StoreError                  the local state store
    │   ├── ImageNotFoundError      no such ref in the store
    │   ├── BlobNotFoundError       a blob the store should have is missing
    │   ├── StoreCorruptError       the index or a blob failed verification
    │   └── StorageFullError        ENOSPC / EDQUOT while writing
    ├── ArchiveError                layer / rootfs tarballs
    │   ├── UnsafeArchiveError      an entry would escape its target or is not allowed
    │   └── CorruptArchiveError     truncated or malformed archive or compression stream
    ├── PlatformError               no manifest for the requested platform
    ├── DockerfileError             a Dockerfile that does not parse or expand (carries file and 1-based line)
    ├── BuildError                  a build step failed (carries the Dockerfile location when there is one)
    │   └── SandboxError            RUN's sandbox cannot be set up here (namespaces, id maps, mounts); hint = the fix
    ├── CredentialsError            config.json or a credential helper failed
    └── RegistryError               talking to a registry (carries registry, repository, digest, status)
        ├── RegistryUnreachableError  connection refused / reset / timed out / DNS (temporary)
        ├── AuthenticationError       401: credentials missing or wrong
        ├── AuthorizationError        403: authenticated but not allowed
        ├── RegistryNotFoundError     404: repository, manifest or blob unknown
        └── RegistryProtocolError     the registry answered something the spec does not allow
"""

from __future__ import annotations


class ImgciError(Exception):
    """Base of every error imgci raises for a condition the user can cause or fix.

    ``hint`` is an optional next step for the user ("run imgci login …").
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def report(self) -> dict[str, str | None]:
        """This error as JSON for the imgci process that started this one (see :func:`from_report`)."""
        return {"type": type(self).__name__, "message": self.message, "hint": self.hint}


def from_report(doc: object) -> ImgciError | None:
    """The error a child imgci process sent as :meth:`ImgciError.report`, as the same class of this module (message
    and hint; a class that needs more than those becomes a plain ImgciError); None when ``doc`` is not such a
    report or names no imgci error class."""
    if not isinstance(doc, dict) or not isinstance(doc.get("message"), str):
        return None
    cls = globals().get(str(doc.get("type")))
    if not (isinstance(cls, type) and issubclass(cls, ImgciError)):
        return None
    hint = doc.get("hint") if isinstance(doc.get("hint"), str) else None
    try:
        return cls(doc["message"], hint=hint)
    except TypeError:
        return ImgciError(doc["message"], hint=hint)


class UsageError(ImgciError):
    """Bad command-line input."""


class InvalidReferenceError(ImgciError):
    """An image reference that does not parse."""


class DigestError(ImgciError):
    """A digest problem."""


class InvalidDigestError(DigestError):
    """A digest string that is not ``algorithm:hex`` of a supported algorithm."""


class DigestMismatchError(DigestError):
    """Content whose digest or size differs from what was declared."""

    def __init__(self, message: str, *, expected: str = "", actual: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.expected = expected
        self.actual = actual


class StoreError(ImgciError):
    """The local state store."""


class ImageNotFoundError(StoreError):
    """No image with that reference in the local store."""


class BlobNotFoundError(StoreError):
    """A blob the store should have is missing."""


class StoreCorruptError(StoreError):
    """The index or a blob failed verification."""


class StorageFullError(StoreError):
    """The disk holding the state directory (or an output) is full."""


class ArchiveError(ImgciError):
    """A layer or rootfs archive problem."""


class UnsafeArchiveError(ArchiveError):
    """An archive entry that would escape its target directory or is not allowed."""


class CorruptArchiveError(ArchiveError):
    """A truncated or malformed archive or compression stream."""


class PlatformError(ImgciError):
    """No manifest in an index matches the requested platform."""


class DockerfileError(ImgciError):
    """A Dockerfile problem at ``file``:``line`` (1-based; 0 when it concerns the whole file).

    The message is prefixed with the location once, here, so every caller reports it the same way.
    """

    def __init__(self, message: str, *, file: str, line: int = 0, hint: str | None = None) -> None:
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {message}", hint=hint)
        self.file = file
        self.line = line
        self.detail = message


class BuildError(ImgciError):
    """A build step failed. ``file``/``line`` locate the instruction when known (for CI annotations)."""

    def __init__(self, message: str, *, file: str = "", line: int = 0, hint: str | None = None) -> None:
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        super().__init__(f"{where}{message}", hint=hint)
        self.file = file
        self.line = line
        self.detail = message


class SandboxError(BuildError):
    """The sandbox that runs RUN cannot be set up on this machine; ``hint`` says what to change."""


class CredentialsError(ImgciError):
    """docker's config.json or a credential helper could not be used."""


class RegistryError(ImgciError):
    """A registry request failed.

    ``temporary`` says whether retrying the same request may succeed (408, 429, 5xx, connection errors);
    the transport retries exactly those. ``retry_after`` is the server's requested delay in seconds, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        registry: str = "",
        repository: str = "",
        digest: str = "",
        status: int | None = None,
        temporary: bool = False,
        retry_after: float | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.registry = registry
        self.repository = repository
        self.digest = digest
        self.status = status
        self.temporary = temporary
        self.retry_after = retry_after


class RegistryUnreachableError(RegistryError):
    """Connection refused, reset or timed out, or the host name does not resolve."""


class AuthenticationError(RegistryError):
    """401: no credentials, or wrong ones."""


class AuthorizationError(RegistryError):
    """403: the credentials are valid but not allowed to do this."""


class RegistryNotFoundError(RegistryError):
    """404: the repository, manifest or blob does not exist."""


class RegistryProtocolError(RegistryError):
    """The registry answered something the distribution spec does not allow."""
